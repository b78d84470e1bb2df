//! Each tenant on its own Kafka cluster: a tenant whose `kafka_brokers` names
//! a cluster of its own has its events topics there (and only there),
//! produced exactly once by its partitions' relays, and its read models are
//! projected from there; the other tenant's stay on the default cluster.
//!
//! The test starts a second single-node Kafka from the stack's own script
//! (ports 9192/9193, a state folder of its own) and stops it at the end,
//! even when the test fails.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use sluice_cli::ops::status::{status, StatusOptions};
use sluice_cli::serve::Role;
use sluice_tests::{
    command, eventually, orders_off_in_kafka_at, submit_order, test_settings, Answer, Platform, TestTenant, KAFKA,
};

const SECOND: &str = "127.0.0.1:9192";

/// The second cluster, stopped and its data removed when dropped.
struct SecondKafka {
    state: PathBuf,
}

impl SecondKafka {
    fn script(&self, verb: &str) -> std::process::ExitStatus {
        std::process::Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../compose/native/kafka.sh"))
            .arg(verb)
            .env("SLUICE_STATE_DIR", &self.state)
            .env("SLUICE_KAFKA_PORT", "9192")
            .env("SLUICE_KAFKA_CONTROLLER_PORT", "9193")
            .status()
            .expect("run compose/native/kafka.sh")
    }

    async fn start() -> Self {
        let state = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.state/second-kafka");
        let _ = std::fs::remove_dir_all(&state);
        let second = Self { state };
        let second = tokio::task::spawn_blocking(move || {
            for verb in ["start", "wait"] {
                let status = second.script(verb);
                assert!(status.success(), "kafka.sh {verb} (second cluster): {status}");
            }
            second
        })
        .await
        .expect("start thread");
        second
    }
}

impl Drop for SecondKafka {
    fn drop(&mut self) {
        let _ = self.script("stop");
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The topics the cluster at `brokers` holds.
async fn topics_at(brokers: &str) -> Vec<String> {
    let brokers = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("kafka client");
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
        metadata.topics().iter().map(|t| t.name().to_owned()).collect()
    })
    .await
    .expect("metadata thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_on_its_own_kafka_cluster_has_its_events_and_read_models_from_there_only() {
    let second = SecondKafka::start().await;
    let shared = TestTenant::new();
    let own = TestTenant::new();
    let mut settings = test_settings(&[&shared, &own]);
    settings.tenants[1].kafka_brokers = Some(SECOND.into());
    let platform = Platform::start(settings.clone(), Role::All).await;
    let wait = Duration::from_secs(60);

    // Each tenant submits and ships two orders, end to end: the operation
    // says its read model has its events, and the order reads shipped.
    let mut orders = Vec::new();
    for tenant in [&shared, &own] {
        for i in 0..2 {
            let order = format!("o-{i}");
            let ship = command(
                tenant,
                &format!("ship-{i}"),
                "com.example.orders.ShipOrder",
                json!({"order_id": order, "carrier": "dhl", "tracking_number": format!("t-{i}")}),
            );
            for event in [submit_order(tenant, &format!("submit-{i}"), &order, "cu"), ship] {
                let answer = Answer::read(platform.post_event(tenant, &event).await).await;
                assert_eq!(answer.status, 202, "{}: {:?}", tenant.name, answer.body);
                let location = answer.body["location"].as_str().expect("location").to_owned();
                let done = platform.await_operation(tenant, &location, wait).await;
                assert_eq!(done["status"], "succeeded", "{done}");
                eventually(wait, "the operation's read model to have its events", || async {
                    let (_, body) = platform.get_json(tenant, &location).await;
                    (body["read_models"]["orders"]["caught_up"] == true).then_some(())
                })
                .await;
            }
            let (status, view) = platform.get_json(tenant, &format!("/orders/{order}")).await;
            assert_eq!((status, view["status"].as_str()), (200, Some("shipped")), "{}: {view}", tenant.name);
            orders.push(order);
        }
    }
    let orders = &orders[..2];

    // The process manager and the patients projection of its cluster: an
    // enrolment's event is read there, the process schedules the
    // assessment, and the onboarding read model shows both steps.
    for tenant in [&shared, &own] {
        let enroll = command(
            tenant,
            "enroll-p1",
            "com.example.patients.EnrollPatient",
            json!({"patient_id": "p1", "name": "Ada"}),
        );
        assert_eq!(platform.post_event(tenant, &enroll).await.status().as_u16(), 202);
        eventually(wait, "the process to schedule the assessment", || async {
            let (status, view) = platform.get_json(tenant, "/patients/p1/onboarding").await;
            let steps: Vec<&str> =
                view["steps"].as_array().into_iter().flatten().filter_map(|s| s["step"].as_str()).collect();
            (status == 200 && steps == ["enrolled", "assessment_scheduled"]).then_some(())
        })
        .await;
    }

    // Each tenant's events topic is on its own cluster, and only there; the
    // records there are its stored events, each exactly once.
    let (first_topics, second_topics) = (topics_at(KAFKA).await, topics_at(SECOND).await);
    for (tenant, home, other, brokers) in
        [(&shared, &first_topics, &second_topics, KAFKA), (&own, &second_topics, &first_topics, SECOND)]
    {
        let topic = sluice_schemas::names::events_topic(&tenant.name, "orders");
        assert!(home.contains(&topic), "{topic} is not on its cluster {brokers}");
        let elsewhere: Vec<&String> = other.iter().filter(|t| t.starts_with(&format!("{}.", tenant.name))).collect();
        assert!(elsewhere.is_empty(), "{} has topics on the other cluster: {elsewhere:?}", tenant.name);
        let off = orders_off_in_kafka_at(brokers, tenant, orders).await;
        assert!(off.is_empty(), "{}: {off:?}", tenant.name);
    }

    // `sluice status` reports both clusters, each with its tenant.
    let report = status(&settings, &StatusOptions::default()).await.expect("status");
    let kafka: Vec<_> = report.servers.iter().filter(|s| s.name == "kafka").collect();
    assert_eq!(kafka.len(), 2, "{kafka:?}");
    assert!(kafka.iter().all(|s| s.reachable), "{kafka:?}");
    assert!(kafka[1].address == SECOND && kafka[1].detail.contains(&own.name), "{kafka:?}");

    platform.stop().await.unwrap();
    drop(second);
}
