//! `sluice dlq list` and `show` against the real broker: listing consumes
//! nothing and keeps the order (the measured cost — one delivery per listing
//! in `x-delivery-count` — is checked too, so a broker upgrade that changes
//! it shows up here), filters select what they say, a queue with a delivery
//! limit is refused, and `show` tells the whole story of one dead letter.

use std::time::Duration;

use sluice_cli::ops::dead_letter::Filter;
use sluice_cli::ops::OpsError;
use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_consumes_nothing_and_keeps_the_order() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let letters: Vec<SeedLetter> = (0..300)
        .map(|i| {
            let class = if i % 3 == 0 { "retries_exhausted" } else { "malformed_command" };
            SeedLetter::new(&format!("ord-{i:04}"), Some("com.example.orders.SubmitOrder"), Some(class), "why")
        })
        .collect();
    seed_dead_letters(&tenant, &letters).await;
    let dlq = dlq_ops().await;
    let scope = tenant_scope(&tenant);
    for round in 1..=3 {
        let listing = dlq.list(&scope, &Filter::default()).await.expect("list");
        assert_eq!(listing.matching, 300, "round {round}");
        let ids: Vec<&str> = listing.messages.iter().map(|m| m.message_id.as_deref().unwrap()).collect();
        let expected: Vec<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
        assert_eq!(ids, expected, "round {round}: listed in queue order");
        // Measured on RabbitMQ 3.10: each earlier listing counted as one delivery.
        assert!(listing.messages.iter().all(|m| m.dlq_deliveries == round - 1), "round {round}: x-delivery-count");
        assert_eq!(queue_depth(&dlq_name).await, 300, "round {round}: all back in the queue");
        assert_eq!(queue_consumers(&dlq_name).await, 0, "round {round}: the listing's consumer is gone");
    }
    let drained = drain_ids(&dlq_name).await;
    let expected: Vec<String> = letters.iter().map(|l| l.message_id.clone()).collect();
    assert_eq!(drained, expected, "still all there, in the order they were dead-lettered");
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_select_by_type_class_reason_source_and_age() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let old = chrono::Utc::now() - chrono::Duration::hours(3);
    let mut letters = vec![
        SeedLetter::new(
            "f-1",
            Some("com.example.orders.SubmitOrder"),
            Some("malformed_command"),
            "data /currency: \"EURO\" is not one of the allowed values",
        ),
        SeedLetter::new(
            "f-2",
            Some("com.example.orders.SubmitOrder"),
            Some("malformed_command"),
            "data /lines: [] has fewer than 1 item",
        ),
        SeedLetter::new(
            "f-3",
            Some("com.example.orders.CancelOrder"),
            Some("retries_exhausted"),
            "gave up after 6 attempts: Kafka: timed out",
        ),
        SeedLetter::new("f-4", None, Some("malformed_message"), "body is not JSON: expected value"),
        SeedLetter::new("f-5", Some("com.example.orders.ShipOrder"), None, "delivery_limit"),
    ];
    letters[2].dead_lettered_at = old;
    letters[4].dead_lettered_at = old;
    seed_dead_letters(&tenant, &letters).await;
    let dlq = dlq_ops().await;
    let scope = tenant_scope(&tenant);
    let ids = |listing: &sluice_cli::ops::dlq::Listing| -> Vec<String> {
        listing.messages.iter().map(|m| m.message_id.clone().unwrap()).collect()
    };
    let by_type = Filter { command_type: Some("SubmitOrder".into()), ..Default::default() };
    assert_eq!(ids(&dlq.list(&scope, &by_type).await.unwrap()), ["f-1", "f-2"]);
    let by_reason = Filter { reason: Some("euro".into()), ..Default::default() };
    assert_eq!(ids(&dlq.list(&scope, &by_reason).await.unwrap()), ["f-1"]);
    let by_class = Filter { class: Some("malformed".into()), ..Default::default() };
    assert_eq!(ids(&dlq.list(&scope, &by_class).await.unwrap()), ["f-1", "f-2", "f-4"]);
    let broker = Filter { class: Some("broker_".into()), ..Default::default() };
    assert_eq!(ids(&dlq.list(&scope, &broker).await.unwrap()), ["f-5"]);
    let by_source = Filter { source: Some(format!("/{}/", tenant.name)), ..Default::default() };
    assert_eq!(
        ids(&dlq.list(&scope, &by_source).await.unwrap()),
        ["f-1", "f-2", "f-3", "f-5"],
        "the non-JSON one has no source"
    );
    let old_ones = Filter { older_than: Some(Duration::from_secs(3_600)), ..Default::default() };
    let listing = dlq.list(&scope, &old_ones).await.unwrap();
    assert_eq!(ids(&listing), ["f-3", "f-5"]);
    assert!(listing.messages.iter().all(|m| m.age_seconds.unwrap() >= 3 * 3_600 - 5));
    let all = dlq.list(&scope, &Filter::default()).await.unwrap();
    assert_eq!(all.groups.len(), 4);
    assert_eq!(
        (all.groups[0].command_type.as_str(), all.groups[0].error_class.as_str(), all.groups[0].count),
        ("com.example.orders.SubmitOrder", "malformed_command", 2)
    );
    assert_eq!(all.groups[0].reasons.len(), 2);
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn show_tells_the_whole_story_of_one_dead_letter() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let letters = [
        SeedLetter::new(
            "s-1",
            Some("com.example.orders.CancelOrder"),
            Some("retries_exhausted"),
            "gave up after 6 attempts: store down",
        ),
        SeedLetter::new("s-2", Some("com.example.orders.ShipOrder"), None, "delivery_limit"),
    ];
    seed_dead_letters(&tenant, &letters).await;
    let dlq = dlq_ops().await;
    let scope = tenant_scope(&tenant);

    let found = dlq.show(&scope, "s-1").await.expect("show s-1");
    assert_eq!(found.len(), 1);
    let d = &found[0];
    assert_eq!(d.summary.error_class, "retries_exhausted");
    assert_eq!(d.summary.reason.as_deref(), Some("gave up after 6 attempts: store down"));
    assert_eq!(d.summary.attempts, Some(6));
    assert_eq!(d.summary.original_queue.as_deref(), Some(orders_queue(&tenant).as_str()));
    assert_eq!(d.attempt_history.len(), 6);
    assert!(d.payload_is_json);
    assert_eq!(d.payload["type"], "com.example.orders.CancelOrder");
    assert_eq!(d.payload["data"]["order_id"], "o-s-1");
    assert_eq!(d.headers["x-sluice-error-class"], "retries_exhausted");
    assert_eq!(d.properties["content_type"], "application/cloudevents+json");

    let found = dlq.show(&scope, "s-2").await.expect("show s-2");
    let d = &found[0];
    assert_eq!(d.summary.error_class, "broker_delivery_limit");
    assert_eq!(d.deaths.len(), 1);
    assert_eq!(d.deaths[0]["reason"], "delivery_limit");
    assert_eq!(d.deaths[0]["queue"], orders_queue(&tenant));
    assert_eq!(d.summary.original_queue.as_deref(), Some(orders_queue(&tenant).as_str()), "from x-death");

    assert!(matches!(dlq.show(&scope, "nope").await, Err(OpsError::NotFound(..))));
    assert_eq!(queue_depth(&orders_dlq(&tenant)).await, 2, "show consumed nothing");
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dlq_with_a_delivery_limit_is_not_read() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    seed_dead_letters(
        &tenant,
        &[SeedLetter::new("l-1", Some("com.example.orders.SubmitOrder"), Some("malformed_command"), "bad")],
    )
    .await;
    // A policy gives this DLQ (only) a delivery limit.
    let policy = format!("sluice-test-limit-{}", tenant.name);
    let path = format!("/policies/%2F/{policy}");
    let body = serde_json::json!({"pattern": format!("^{}$", dlq_name.replace('.', "\\.")), "definition": {"delivery-limit": 5}, "apply-to": "queues"});
    let response = rabbitmq_management(reqwest::Method::PUT, &path, Some(body)).await;
    assert!(response.status().is_success(), "policy: {}", response.status());
    eventually(Duration::from_secs(15), "the policy to apply", || async {
        let info: serde_json::Value =
            rabbitmq_management(reqwest::Method::GET, &format!("/queues/%2F/{dlq_name}"), None)
                .await
                .json()
                .await
                .ok()?;
        (info["effective_policy_definition"]["delivery-limit"] == 5).then_some(())
    })
    .await;

    let dlq = dlq_ops().await;
    let result = dlq.list(&tenant_scope(&tenant), &Filter::default()).await;
    rabbitmq_management(reqwest::Method::DELETE, &path, None).await;
    match result {
        Err(OpsError::Refused(why)) => assert!(why.contains("delivery limit of 5"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let drained = drain_queue(&dlq_name).await;
    assert_eq!(drained.len(), 1);
    // With a delivery limit the broker always sets the header; 0 = never delivered.
    let count = amqp_header(&drained[0].0, "x-delivery-count");
    assert!(matches!(count.as_deref(), None | Some("LongLongInt(0)")), "never delivered: {count:?}");
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}
