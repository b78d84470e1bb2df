//! With Kafka stopped for 30 seconds, longer than all of a command's retries,
//! commands whose decision is journaled keep being retried by their
//! partition's owner (never dead-lettered: a stored event is never
//! stranded) and then succeed, their events in Kafka once each; none is lost. This test stops the shared broker, so it is the only test in
//! its file (test files run one after another).

use std::time::Duration;

use sluice_cli::serve::Role;
use sluice_tests::*;

/// Restarts Kafka when dropped, even if the test fails half-way.
struct KafkaBack;

impl Drop for KafkaBack {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../compose/native/kafka.sh");
        let _ = std::process::Command::new(script).arg("start").status();
        let _ = std::process::Command::new(script).arg("wait").status();
    }
}

fn kafka(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../compose/native/kafka.sh");
    let status = std::process::Command::new(script).arg(action).status().expect("kafka.sh");
    assert!(status.success(), "kafka.sh {action} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_retry_through_a_kafka_outage_and_then_succeed() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // Two attempts (each waits up to the producer's 10 s delivery timeout)
    // are over well before the outage is. A command whose decision is
    // journaled must outlast it anyway.
    settings.processor.retry_delays_ms = vec![200, 500];
    settings.processor.max_attempts = 2;
    settings.processor.redrive_interval_ms = 500;
    let platform = Platform::start(settings, Role::All).await;
    // The topic exists and the producer is warm before the outage.
    let warm = platform.post_event(&tenant, &submit_order(&tenant, "warm", "o-warm", "c1")).await;
    assert_eq!(
        platform.await_operation(&tenant, warm.headers()["location"].to_str().unwrap(), Duration::from_secs(60)).await
            ["status"],
        "succeeded"
    );

    let _guard = KafkaBack;
    kafka("stop");
    let outage = std::time::Instant::now();
    let mut locations = Vec::new();
    for i in 0..20 {
        let response =
            platform.post_event(&tenant, &submit_order(&tenant, &format!("k{i}"), &format!("o{i}"), "c1")).await;
        assert_eq!(response.status(), 202, "the edge does not need Kafka");
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
    }
    // While Kafka is down the commands are retried, not failed.
    let (_, op) = eventually(Duration::from_secs(30), "a retry in progress", || async {
        let (s, op) = platform.get_json(&tenant, &locations[0]).await;
        (op["status"] == "processing" && op["attempts"].as_i64().unwrap_or(0) >= 2).then_some((s, op))
    })
    .await;
    assert_eq!(op["status"], "processing");
    // The outage lasts at least 30 s and until a command was tried more
    // often than `max_attempts` allows: watched all along, no command (its
    // events stored) is dead-lettered.
    let dlq = sluice_schemas::names::dead_letter_queue(&tenant.name, "orders");
    loop {
        let mut most_attempts = 0;
        for location in &locations {
            let (_, op) = platform.get_json(&tenant, location).await;
            assert_ne!(op["status"], "dead_lettered", "a command whose events are stored was dead-lettered: {op}");
            most_attempts = most_attempts.max(op["attempts"].as_i64().unwrap_or(0));
        }
        assert_eq!(queue_depth(&dlq).await, 0, "nothing in the DLQ");
        if outage.elapsed() >= Duration::from_secs(30) && most_attempts > 2 {
            eprintln!("Kafka down {:?}; a command is at attempt {most_attempts}", outage.elapsed());
            break;
        }
        assert!(outage.elapsed() < Duration::from_secs(120), "no command was retried past max_attempts");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kafka("start");
    kafka("wait");

    for location in &locations {
        let op = platform.await_operation(&tenant, location, Duration::from_secs(180)).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    for i in 0..20 {
        assert_eq!(stored_events(&tenant.name, &format!("o{i}")).await.len(), 1);
    }
    // The aborted transactions left nothing a read_committed reader sees.
    let orders: Vec<String> = (0..20).map(|i| format!("o{i}")).chain(["o-warm".to_owned()]).collect();
    assert_orders_in_kafka_exactly_once(&tenant, &orders).await;
    platform.stop().await.unwrap();
}
