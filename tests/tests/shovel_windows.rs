//! A shovel slower than the broker's consumer timeout (30 min by default;
//! `--rate 5` over 10,000 dead letters takes longer) moves each message
//! once: it holds messages for one window at most, then gives them back and
//! walks on. The test shortens the broker's consumer timeout for its run,
//! which every channel opened meanwhile gets, so it is alone in its file.

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_cli::ops::audit::AuditLog;
use sluice_cli::ops::dead_letter::Filter;
use sluice_cli::ops::dlq::{ShovelOptions, Who};
use sluice_tests::*;

fn rabbit_eval(expression: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", "sluice@localhost", "eval", expression])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl eval {expression}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A setting of the broker (`rabbit` application), as Erlang prints it.
fn rabbit_setting(key: &str) -> String {
    let value = rabbit_eval(&format!("application:get_env(rabbit, {key})."));
    let value = value.trim_start_matches("{ok,").trim_end_matches('}').to_owned();
    assert!(value.parse::<u64>().is_ok(), "the broker's {key}: {value}");
    value
}

/// Sets the broker's consumer timeout (ms) for channels opened from now on,
/// and has them check it every 200 ms (not every minute).
fn consumer_timeout(ms: u64) {
    rabbit_eval(&format!("application:set_env(rabbit, consumer_timeout, {ms})."));
    rabbit_eval("application:set_env(rabbit, channel_tick_interval, 200).");
}

/// Puts the broker's settings back, whatever the test's outcome.
struct Restore(Vec<(&'static str, String)>);

impl Drop for Restore {
    fn drop(&mut self) {
        for (key, value) in &self.0 {
            rabbit_eval(&format!("application:set_env(rabbit, {key}, {value})."));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shovel_slower_than_the_consumer_timeout_moves_each_message_once() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let parking = parking_queue(&tenant).await;
    let seeded = letters("w", 60);
    seed_dead_letters(&tenant, &seeded).await;
    let selected: BTreeSet<String> = seeded
        .iter()
        .filter(|l| l.class.as_deref() == Some("retries_exhausted"))
        .map(|l| l.message_id.clone())
        .collect();

    let restore =
        Restore(["consumer_timeout", "channel_tick_interval"].into_iter().map(|k| (k, rabbit_setting(k))).collect());
    consumer_timeout(2_000);
    let dlq = dlq_ops().await;
    let audit = AuditLog::new(sluice_cli::serve::connect_cql(&settings).await.expect("CQL store"));
    let who = Who { actor: "test-ops".into(), reason: "park the exhausted ones".into() };
    let filter = Filter { class: Some("retries_exhausted".into()), ..Default::default() };
    // 20 moves at 2 a second: ten seconds, five consumer timeouts.
    let options = ShovelOptions {
        to: Some(parking.clone()),
        rate: Some(2.0),
        window: Some(Duration::from_millis(1_000)),
        ..Default::default()
    };
    let report = dlq
        .shovel(&audit, &who, &tenant_scope(&tenant), &filter, &options, &mut |_| {})
        .await
        .expect("a windowed shovel outlives the consumer timeout");
    drop(restore);
    assert_eq!((report.selected, report.moved), (20, 20), "{report:?}");
    assert_eq!(report.queues[0].examined, 60, "each message looked at once: {report:?}");

    let parked = drain_ids(&parking).await;
    let left = drain_ids(&dlq_name).await;
    assert_eq!(parked.len(), 20, "nothing parked twice: {parked:?}");
    assert_eq!(parked.iter().cloned().collect::<BTreeSet<_>>(), selected);
    assert_eq!(left.len(), 40, "nothing left twice, nothing lost: {left:?}");
    assert!(left.iter().all(|id| !selected.contains(id)));
    let entries = audit.list(Some(&tenant.name), 10).await.unwrap();
    assert_eq!((entries.len(), entries[0].count), (1, 20), "one audit row for the DLQ, all 20 in it");
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}
