//! Tenants never see each other: A cannot send as B, cannot read B's
//! operations or read models (404, so existence does not leak), and each
//! tenant's queue and topic, read whole, hold only that tenant's commands
//! and events.

use std::time::Duration;

use rdkafka::Message;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_cannot_send_as_or_read_another() {
    let (a, b) = (TestTenant::new(), TestTenant::new());
    let settings = test_settings(&[&a, &b]);
    // The edge alone first: what each tenant's queue holds is looked at
    // before any processor takes it.
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let response = edge.post_event(&b, &submit_order(&b, "b1", "shared-id", "customer-of-b")).await;
    assert_eq!(response.status(), 202);
    let b_location = response.headers()["location"].to_str().unwrap().to_owned();

    // A sending as B's source: refused, nothing queued for anyone.
    let mut forged = submit_order(&a, "a-forged", "x", "c");
    forged["source"] = serde_json::json!(b.source);
    let response = edge.post_event(&a, &forged).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    // A's own order with the same order id.
    let response = edge.post_event(&a, &submit_order(&a, "a1", "shared-id", "customer-of-a")).await;
    assert_eq!(response.status(), 202);
    let a_location = response.headers()["location"].to_str().unwrap().to_owned();

    // Each tenant's queue holds exactly its own command, whole.
    for (tenant, id) in [(&a, "a1"), (&b, "b1")] {
        let messages = peek_queue(&orders_queue(tenant)).await;
        assert_eq!(messages.len(), 1, "{}'s queue: {messages:?}", tenant.name);
        let (properties, body) = &messages[0];
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!((event["source"].as_str(), event["id"].as_str()), (Some(tenant.source.as_str()), Some(id)));
        assert_eq!(amqp_header(properties, "sluice-tenant").as_deref(), Some(tenant.name.as_str()));
    }
    edge.stop().await.unwrap();

    let platform = Platform::start(settings, Role::All).await;
    assert_eq!(platform.await_operation(&b, &b_location, WAIT).await["status"], "succeeded");
    let op = platform.await_operation(&a, &a_location, WAIT).await;
    assert_eq!(op["status"], "succeeded", "not rejected as a duplicate of B's order");
    assert_eq!(op["events"][0]["topic"], format!("{}.orders.events", a.name));
    for tenant in [&a, &b] {
        eventually(WAIT, "each order readable by its tenant", || async {
            (platform.get_json(tenant, "/orders/shared-id").await.0 == 200).then_some(())
        })
        .await;
    }

    // A reading B's operation: 404, the same as for ids that do not exist,
    // so A learns nothing; each tenant reads its own order under the same id.
    let (status, problem) = platform.get_json(&a, &b_location).await;
    assert_eq!((status, problem["status"].as_i64()), (404, Some(404)));
    assert_eq!(platform.get_json(&a, "/orders/never-existed").await.0, 404);
    let (_, a_order) = platform.get_json(&a, "/orders/shared-id").await;
    assert_eq!(a_order["customer_id"], "customer-of-a");
    let (_, b_order) = platform.get_json(&b, "/orders/shared-id").await;
    assert_eq!(b_order["customer_id"], "customer-of-b", "B's read model untouched by A");

    // Each tenant's topic, read whole as a data team would, holds exactly
    // its own event. (Customer ids with non-hex letters: the Avro body also
    // holds hex ids, where a short id like "ca" turns up by chance.)
    for (tenant, own, other) in [(&a, "customer-of-a", "customer-of-b"), (&b, "customer-of-b", "customer-of-a")] {
        let topic = format!("{}.orders.events", tenant.name);
        let records = read_committed_topic(&topic).await;
        assert_eq!(records.len(), 1, "{topic} holds one record");
        use rdkafka::message::Headers;
        let source = records[0]
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_source").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(source, Some(format!("/sluice/{}/orders", tenant.name)));
        let body = String::from_utf8_lossy(records[0].payload().unwrap()).into_owned();
        assert!(body.contains(own) && !body.contains(other), "{topic} holds {own}'s order only");
    }
    // And the event store keeps their streams apart.
    assert_eq!(stored_events(&a.name, "shared-id").await.len(), 1);
    assert_eq!(stored_events(&b.name, "shared-id").await.len(), 1);
    platform.stop().await.unwrap();
}
