//! `sluice status` against the real stack: healthy while a tenant's roles
//! run and keep up, unhealthy with a dead letter or without consumers, and
//! the binary's `status --json` and `dlq list --json` as scripts use them.

use std::time::Duration;

use serde_json::Value;
use sluice_cli::ops::status::{status, Severity, StatusOptions, StatusReport};
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(60);

fn kinds(report: &StatusReport) -> Vec<&'static str> {
    report.problems.iter().filter(|p| p.severity == Severity::Critical).map(|p| p.kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_is_healthy_while_the_roles_keep_up_and_says_what_is_wrong_when_not() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // The reminder due in ten minutes: within the hour `sluice status` looks
    // ahead for pending timers.
    settings.processor.processes.assessment_timeout_ms = 600_000;
    settings.amqp.partitions = 2;
    let platform = Platform::start(settings.clone(), Role::All).await;
    let response = platform.post_event(&tenant, &submit_order(&tenant, "st-1", "o-st", "c-st")).await;
    let op = platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let data = serde_json::json!({"patient_id": "p-st", "name": "Ada"});
    let enrol = command(&tenant, "st-enrol", "com.example.patients.EnrollPatient", data);
    assert_eq!(platform.post_event(&tenant, &enrol).await.status(), 202);
    let options = StatusOptions::default();

    // Healthy once the projections have applied the events (no lag at all
    // allowed) and the onboarding process waits for the assessment; the
    // partition owners once the management API's statistics have them.
    let strict = StatusOptions { max_lag: 0, ..Default::default() };
    let report = eventually(WAIT, "a healthy status", || async {
        let report = status(&settings, &strict).await.expect("status");
        let onboarding = report.tenants[0].processes.as_ref()?.iter().find(|p| p.process == "onboarding")?.clone();
        let owned = report.tenants[0].contexts.iter().all(|c| c.partitions.iter().all(|p| p.owner.is_some()));
        (report.healthy && owned && onboarding.by_stage.get("awaiting_assessment") == Some(&1)).then_some(report)
    })
    .await;
    let onboarding = &report.tenants[0].processes.as_ref().unwrap()[0];
    assert_eq!(report.tenants[0].parked_keys, Some(vec![]), "no key parked");
    assert_eq!(
        (onboarding.timers_pending, onboarding.timers_due),
        (1, 0),
        "the reminder timer is set, due within the hour, not due yet"
    );
    let patients = report.tenants[0].contexts.iter().find(|c| c.context == "patients").expect("patients context");
    let patient_events = patients.events.as_ref().expect("patients topic");
    // Offsets count the transactions' commit markers too.
    assert!(patient_events.end_offsets_total >= 3, "enrolled and scheduled, and a commit marker: {patient_events:?}");
    assert_eq!(patient_events.lag_total, Some(0), "both projected, the consumer past the markers");
    assert!(report.servers.iter().all(|s| s.reachable), "{:?}", report.servers);
    let projection = report.projection.as_ref().expect("projection");
    assert_eq!(
        (projection.name.as_str(), projection.active, projection.building),
        (settings.projector.name.as_str(), 1, None)
    );
    let ctx = report.tenants[0].contexts.iter().find(|c| c.context == "orders").expect("orders context");
    assert_eq!(report.tenants[0].tenant, tenant.name);
    assert_eq!(ctx.partitions.len(), 2, "{:?}", ctx.partitions);
    for p in &ctx.partitions {
        assert!(p.queue.exists && p.queue.consumers == 1, "{p:?}");
        // The processor role runs in this test process: `<host>-<pid>`.
        let mine = format!("-{}", std::process::id());
        assert!(p.owner.as_deref().is_some_and(|o| o.ends_with(&mine)), "held by this process: {p:?}");
    }
    assert_eq!((ctx.dlq.queue.exists, ctx.dlq.queue.ready), (true, 0));
    let events = ctx.events.as_ref().expect("events topic");
    assert_eq!(events.topic, format!("{}.orders.events", tenant.name));
    assert_eq!(events.partitions.len() as i32, settings.processor.topic_partitions);
    assert!(events.end_offsets_total >= 2, "one event and its commit marker: {events:?}");
    assert_eq!(events.lag_total, Some(0));
    let subjects = ctx.subjects.as_ref().expect("registry subjects");
    let submitted = format!("{}.orders.events-com.example.orders.OrderSubmitted", tenant.name);
    let subject =
        subjects.iter().find(|s| s.subject == submitted).unwrap_or_else(|| panic!("{submitted} in {subjects:?}"));
    assert!(!subject.versions.is_empty());

    // A dead letter makes it unhealthy, with the class counted.
    let bad = serde_json::json!({"specversion": "1.0", "id": "st-bad", "source": tenant.source, "type": "com.example.orders.SubmitOrder", "data": {"order_id": 7}});
    publish_raw(
        &orders_queue(&tenant),
        bad.to_string().as_bytes(),
        Some("op-st-bad"),
        lapin::types::FieldTable::default(),
    )
    .await;
    let report = eventually(WAIT, "the dead letter to show", || async {
        let report = status(&settings, &options).await.expect("status");
        // The processors' re-drive briefly holds the DLQ every few seconds.
        let dlq = &report.tenants[0].contexts.iter().find(|c| c.context == "orders")?.dlq;
        (dlq.queue.ready == 1 && dlq.by_class.get("malformed_command") == Some(&1)).then_some(report)
    })
    .await;
    assert!(!report.healthy);
    assert_eq!(kinds(&report), ["dead_letters"]);
    let tolerant = StatusOptions { max_dlq: 1, ..Default::default() };
    assert!(status(&settings, &tolerant).await.expect("status").healthy, "--max-dlq 1 tolerates it");

    // Without processors nothing consumes the work queue.
    platform.stop().await.unwrap();
    let report = status(&settings, &tolerant).await.expect("status");
    assert!(!report.healthy);
    assert!(kinds(&report).iter().all(|k| *k == "no_consumers"), "{:?}", report.problems);
    assert!(
        report.problems.iter().any(|p| p.kind == "no_consumers" && p.subject == orders_queue(&tenant)),
        "{:?}",
        report.problems
    );
    delete_tenant_queues(&settings, &tenant).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_binary_reports_json_and_exits_non_zero_when_unhealthy() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    seed_dead_letters(
        &tenant,
        &[SeedLetter::new(
            "bin-1",
            Some("com.example.orders.SubmitOrder"),
            Some("malformed_command"),
            "data /order_id: 7 is not of type \"string\"",
        )],
    )
    .await;

    let output = run_sluice(&settings, &["dlq", "list", "--json"]);
    assert!(output.status.success(), "dlq list: {}", String::from_utf8_lossy(&output.stderr));
    let listing: Value = serde_json::from_slice(&output.stdout).expect("dlq list --json is JSON");
    assert_eq!(listing["matching"], 1);
    assert_eq!(listing["groups"][0]["type"], "com.example.orders.SubmitOrder");
    assert_eq!(listing["groups"][0]["error_class"], "malformed_command");
    assert_eq!(listing["groups"][0]["count"], 1);
    assert_eq!(listing["messages"][0]["message_id"], "bin-1");
    assert_eq!(listing["messages"][0]["reason"], "data /order_id: 7 is not of type \"string\"");

    let output = run_sluice(&settings, &["status", "--json"]);
    assert_eq!(output.status.code(), Some(1), "unhealthy exits 1: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("status --json is JSON");
    assert_eq!(report["healthy"], false);
    let problems: Vec<(&str, &str)> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["severity"] == "critical")
        .map(|p| (p["kind"].as_str().unwrap(), p["subject"].as_str().unwrap()))
        .collect();
    let work = orders_queue(&tenant);
    let dlq = orders_dlq(&tenant);
    let topic = format!("{}.orders.events", tenant.name);
    for expected in
        [("no_consumers", work.as_str()), ("dead_letters", dlq.as_str()), ("events_topic_missing", topic.as_str())]
    {
        assert!(problems.contains(&expected), "{expected:?} in {problems:?}");
    }
    let orders = report["tenants"][0]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["context"] == "orders")
        .expect("orders context");
    assert_eq!(orders["dlq"]["by_class"]["malformed_command"], 1);
    assert_eq!(queue_depth(&dlq).await, 1, "status read the DLQ without consuming it");
    delete_tenant_queues(&settings, &tenant).await;
}
