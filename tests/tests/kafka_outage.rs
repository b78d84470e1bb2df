//! With Kafka stopped for 30 seconds, commands retry through the delay queues
//! and then succeed; none is lost. This test stops the shared broker, so it
//! is the only test in its file (test files run one after another).

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
    // Enough patience for a 30 s outage plus the broker's restart.
    settings.processor.retry_delays_ms = vec![1_000, 2_000, 5_000, 10_000];
    settings.processor.max_attempts = 12;
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
    let remaining = Duration::from_secs(30).saturating_sub(outage.elapsed());
    tokio::time::sleep(remaining).await; // the outage itself: 30 s of no Kafka, by the definition
    kafka("start");
    kafka("wait");

    for location in &locations {
        let op = platform.await_operation(&tenant, location, Duration::from_secs(180)).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    for i in 0..20 {
        assert_eq!(stored_events(&tenant.name, &format!("o{i}")).await.len(), 1);
    }
    platform.stop().await.unwrap();
}
