//! A platform told to stop (SIGTERM) while Kafka answers nothing (SIGSTOP:
//! its sockets stay open) exits in bounded time: its consumers' close and
//! its lag lookups wait for a group coordinator that never answers, and are
//! left to finish alone after their limits. (Seen once in CI: a platform
//! stopped just as Kafka came back from an outage waited for good.) This
//! test freezes the shared broker, so it is the only test in its file (test
//! files run one after another).

use std::time::{Duration, Instant};

use sluice_tests::*;

/// The longest a stop may take with Kafka frozen: the consumers' close is
/// given 15 s, the roles drain in parallel.
const STOPS_WITHIN: Duration = Duration::from_secs(45);

/// Kafka's process, as the stack scripts recorded it.
fn kafka_pid() -> String {
    let state = std::env::var("SLUICE_STATE_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.state").to_owned());
    let recorded = std::fs::read_to_string(format!("{state}/run/kafka.pid")).expect("Kafka's pid file");
    recorded.split_whitespace().next().expect("a pid").to_owned()
}

fn signal(signal: &str, pid: &str) {
    let status = std::process::Command::new("kill").args([signal, pid]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pid}");
}

/// Thaws Kafka when dropped, even if the test fails half-way, and waits
/// until it answers again.
struct Thaw(String);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../compose/native/kafka.sh");
        let _ = std::process::Command::new(script).arg("wait").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_platform_stops_in_bounded_time_while_kafka_answers_nothing() {
    require_stack().await;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    let base = edge_on_free_port(&mut settings);
    let mut sluice = SluiceProcess::spawn(&settings, "all");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the edge", || async {
        http.get(format!("{base}/healthz")).send().await.ok().map(drop)
    })
    .await;

    // A command goes all the way to the read model: the processor owns its
    // partition, the projector's consumers are in their group.
    let response = http
        .post(format!("{base}/events"))
        .bearer_auth(&tenant.key)
        .header("content-type", "application/cloudevents+json")
        .body(submit_order(&tenant, "f-1", "o-frozen", "c1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually(Duration::from_secs(60), "the order readable", || async {
        let r = http.get(format!("{base}/orders/o-frozen")).bearer_auth(&tenant.key).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    let pid = kafka_pid();
    signal("-STOP", &pid);
    let _thaw = Thaw(pid);
    let asked = Instant::now();
    signal("-TERM", &sluice.child.id().to_string());
    let exit = eventually(STOPS_WITHIN, "sluice to exit with Kafka frozen", || {
        let exited = sluice.child.try_wait().expect("try_wait");
        async move { exited }
    })
    .await;
    eprintln!("sluice exited {:?} after SIGTERM with Kafka frozen", asked.elapsed());
    assert_eq!(exit.code(), Some(0), "a clean exit; log: {}", sluice.log.display());
}
