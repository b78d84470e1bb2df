//! Tenants never see each other: A cannot send as B, cannot read B's
//! operations or read models (404, so existence does not leak), and A's
//! commands and events never reach B's queue or topic.

use std::time::Duration;

use rdkafka::Message;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_cannot_send_as_or_read_another() {
    let (a, b) = (TestTenant::new(), TestTenant::new());
    let platform = Platform::start(test_settings(&[&a, &b]), Role::All).await;

    // B's order exists.
    let response = platform.post_event(&b, &submit_order(&b, "b1", "shared-id", "customer-of-b")).await;
    let b_location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(platform.await_operation(&b, &b_location, WAIT).await["status"], "succeeded");
    eventually(WAIT, "B's order readable by B", || async {
        (platform.get_json(&b, "/orders/shared-id").await.0 == 200).then_some(())
    })
    .await;

    // A sending as B's source: refused, nothing queued for anyone.
    let mut forged = submit_order(&a, "a-forged", "x", "c");
    forged["source"] = serde_json::json!(b.source);
    let response = platform.post_event(&a, &forged).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/problem+json");

    // A reading B's operation and B's order: 404, the same as for ids that
    // do not exist, so A learns nothing.
    let (status, problem) = platform.get_json(&a, &b_location).await;
    assert_eq!((status, problem["status"].as_i64()), (404, Some(404)));
    assert_eq!(platform.get_json(&a, "/orders/shared-id").await.0, 404);
    assert_eq!(platform.get_json(&a, "/orders/never-existed").await.0, 404);

    // A's own order with the same order id lives apart from B's.
    let response = platform.post_event(&a, &submit_order(&a, "a1", "shared-id", "customer-of-a")).await;
    let a_location = response.headers()["location"].to_str().unwrap().to_owned();
    let op = platform.await_operation(&a, &a_location, WAIT).await;
    assert_eq!(op["status"], "succeeded", "not rejected as a duplicate of B's order");
    assert_eq!(op["events"][0]["topic"], format!("{}.orders.events", a.name));
    let a_order = eventually(WAIT, "A's order", || async {
        let (s, body) = platform.get_json(&a, "/orders/shared-id").await;
        (s == 200).then_some(body)
    })
    .await;
    assert_eq!(a_order["customer_id"], "customer-of-a");
    let (_, b_order) = platform.get_json(&b, "/orders/shared-id").await;
    assert_eq!(b_order["customer_id"], "customer-of-b", "B's read model untouched by A");

    // Each tenant's topic holds only its own events. (Customer ids with
    // non-hex letters: the Avro body also holds hex ids, where a short id
    // like "ca" turns up by chance.)
    for (tenant, customer) in [(&a, "customer-of-a"), (&b, "customer-of-b")] {
        let topic = format!("{}.orders.events", tenant.name);
        let position = if tenant.name == a.name {
            &op["events"][0]
        } else {
            &platform.get_json(&b, &b_location).await.1["events"][0]
        };
        let record =
            read_record(&topic, position["partition"].as_i64().unwrap() as i32, position["offset"].as_i64().unwrap())
                .await;
        let bytes = record.payload().unwrap();
        assert!(String::from_utf8_lossy(bytes).contains(customer), "{topic} holds {customer}'s order");
        assert!(!String::from_utf8_lossy(bytes).contains(if customer == "customer-of-a" {
            "customer-of-b"
        } else {
            "customer-of-a"
        }));
    }
    // And the event store keeps their streams apart.
    assert_eq!(stored_events(&a.name, "shared-id").await.len(), 1);
    assert_eq!(stored_events(&b.name, "shared-id").await.len(), 1);
    platform.stop().await.unwrap();
}
