//! Topics sluice creates carry the configured replication: the factor
//! reaches the broker (a single dev broker refuses 2, by name), and
//! `min.insync.replicas` is set on the topic.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use sluice_processors::kafka::{ensure_topics, Replication};
use sluice_tests::*;

const BROKERS: &str = "127.0.0.1:9092";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_carry_the_configured_replication() {
    require_stack().await;
    let topic = format!("sluice-test-topics-{}", uuid::Uuid::new_v4().simple());
    let two_replicas = Replication { factor: 2, min_insync: 1 };
    let refused = ensure_topics(BROKERS, std::slice::from_ref(&topic), 1, two_replicas).await.unwrap_err();
    assert!(refused.to_string().contains("InvalidReplicationFactor"), "one broker cannot hold two replicas: {refused}");

    ensure_topics(BROKERS, std::slice::from_ref(&topic), 1, Replication { factor: 1, min_insync: 2 }).await.unwrap();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", BROKERS).create().expect("admin client");
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = admin.describe_configs(&[ResourceSpecifier::Topic(&topic)], &options).await.unwrap();
    let config = described.into_iter().next().unwrap().expect("topic config");
    let min_insync = config.get("min.insync.replicas").and_then(|e| e.value.clone());
    assert_eq!(min_insync.as_deref(), Some("2"));
    let retention = config.get("retention.ms").and_then(|e| e.value.clone());
    assert_eq!(retention.as_deref(), Some("-1"), "events are kept forever");
    admin.delete_topics(&[&topic], &options).await.unwrap();
}
