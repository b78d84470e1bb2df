//! Malformed messages injected past the edge: straight into the work queue
//! (each ends in the DLQ with its reason) and straight into the events topic
//! (each ends in the projection's dead-letter topic). The processes stay up
//! and the valid command sent afterwards goes through untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_commands_in_the_work_queue_are_dead_lettered_with_their_reason() {
    let tenant = TestTenant::new();
    let platform = Platform::start(test_settings(&[&tenant]), Role::All).await;
    let queue = sluice_tests::orders_queue(&tenant);
    eventually(WAIT, "the processor consuming", || async { (queue_consumers(&queue).await >= 1).then_some(()) }).await;

    let event = |v: serde_json::Value| v.to_string().into_bytes();
    let src = tenant.source.clone();
    let mut header = FieldTable::default();
    header.insert("cloudEvents:type".into(), AMQPValue::LongString(LongString::from("forged")));
    // (message id, body, headers, expected error class, words the reason must hold)
    let cases: Vec<(&str, Vec<u8>, FieldTable, &str, &str)> = vec![
        ("m01", b"\xff\xfe garbage".to_vec(), FieldTable::default(), "malformed_message", "not JSON"),
        ("m02", b"[1,2,3]".to_vec(), FieldTable::default(), "malformed_message", "JSON object"),
        (
            "m03",
            event(json!({"source": src, "specversion": "1.0", "type": "com.example.orders.SubmitOrder"})),
            FieldTable::default(),
            "malformed_message",
            "id",
        ),
        (
            "m04",
            event(json!({"id": "x", "source": src, "specversion": "0.3", "type": "com.example.orders.SubmitOrder"})),
            FieldTable::default(),
            "malformed_message",
            "specversion",
        ),
        (
            "m05",
            event(
                json!({"id": "x", "source": src, "specversion": "1.0", "type": "com.example.orders.SubmitOrder", "time": "noon"}),
            ),
            FieldTable::default(),
            "malformed_message",
            "time",
        ),
        (
            "m06",
            event(
                json!({"id": "x6", "source": src, "specversion": "1.0", "type": "com.example.orders.Unknown", "data": {}}),
            ),
            FieldTable::default(),
            "malformed_command",
            "Unknown",
        ),
        (
            "m07",
            event(
                json!({"id": "x7", "source": src, "specversion": "1.0", "type": "com.example.orders.SubmitOrder", "data": {"order_id": "o"}}),
            ),
            FieldTable::default(),
            "malformed_command",
            "schema",
        ),
        (
            "m08",
            event(json!({"id": "x8", "source": src, "specversion": "1.0", "type": "com.example.orders.CancelOrder"})),
            FieldTable::default(),
            "malformed_command",
            "schema",
        ),
        (
            "m09",
            event(
                json!({"id": "x9", "source": src, "specversion": "1.0", "type": "com.example.orders.ShipOrder", "data": "text"}),
            ),
            header,
            "malformed_command",
            "schema",
        ),
        ("m10", b"".to_vec(), FieldTable::default(), "malformed_message", "not JSON"),
        (
            "m11",
            event(
                json!({"id": "x11", "source": "has spaces", "specversion": "1.0", "type": "com.example.orders.SubmitOrder"}),
            ),
            FieldTable::default(),
            "malformed_message",
            "source",
        ),
    ];
    for (id, body, headers, _, _) in &cases {
        publish_raw(&queue, body, Some(id), headers.clone()).await;
    }
    // And one without an operation id.
    publish_raw(&queue, &event(submit_order(&tenant, "noid", "o-noid", "c")), None, FieldTable::default()).await;

    let dlq = orders_dlq(&tenant);
    eventually(WAIT, "every malformed message in the DLQ", || async {
        (queue_depth(&dlq).await as usize == cases.len() + 1).then_some(())
    })
    .await;
    let dead: BTreeMap<String, (String, String)> = drain_queue(&dlq)
        .await
        .into_iter()
        .map(|(p, _)| {
            let id = p.message_id().as_ref().map(|s| s.to_string()).unwrap_or_else(|| "none".into());
            (
                id,
                (
                    amqp_header(&p, "x-sluice-error-class").unwrap_or_default(),
                    amqp_header(&p, "x-sluice-reason").unwrap_or_default(),
                ),
            )
        })
        .collect();
    for (id, _, _, class, words) in &cases {
        let (got_class, reason) = &dead[*id];
        assert_eq!(got_class, class, "{id}: {reason}");
        assert!(reason.contains(words), "{id}: reason {reason:?} should mention {words:?}");
    }
    assert_eq!(dead["none"].0, "malformed_message");

    // The processor is still up: a valid command goes through.
    let response = platform.post_event(&tenant, &submit_order(&tenant, "after", "o-after", "c1")).await;
    let op = platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "succeeded");
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_records_in_the_events_topic_go_to_the_projection_dead_letter_topic() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::All).await;
    let topic = format!("{}.orders.events", tenant.name);
    // A real event first: its schema id is a valid id of another record type.
    let response = platform.post_event(&tenant, &submit_order(&tenant, "real", "o-real", "c1")).await;
    let op = platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    let position = &op["events"][0];
    let real =
        read_record(&topic, position["partition"].as_i64().unwrap() as i32, position["offset"].as_i64().unwrap()).await;
    let real_value = real.payload().unwrap().to_vec();
    let submitted_id = &real_value[1..5];
    let cancelled_id = {
        let r: serde_json::Value = reqwest::Client::new()
            .post(format!("http://127.0.0.1:8081/apis/ccompat/v7/subjects/{topic}-com.example.orders.OrderCancelled/versions"))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(json!({"schema": sluice_schemas::catalog::event_spec("com.example.orders.OrderCancelled").unwrap().avro}).to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (r["id"].as_u64().unwrap() as u32).to_be_bytes()
    };
    let with = |prefix: &[u8], body: &[u8]| [prefix, body].concat();
    // (key, value): each must be refused with its reason.
    let cases: Vec<(String, Option<Vec<u8>>)> = vec![
        ("k-magic".into(), Some(with(&[7], &real_value[1..]))),
        ("k-unknown-id".into(), Some(with(&[0, 0x7f, 0xff, 0xff, 0xf0], &real_value[5..]))),
        ("k-truncated".into(), Some(real_value[..real_value.len() / 2].to_vec())),
        ("k-short".into(), Some(vec![0, 0, 0])),
        ("k-empty".into(), None),
        ("k-garbage-body".into(), Some(with(&[&[0u8][..], submitted_id].concat(), &[0xff; 9]))),
        ("k-wrong-type".into(), Some(with(&[&[0u8][..], &cancelled_id].concat(), &[2, 0x41]))),
        ("k-text".into(), Some(b"{\"order_id\":\"o1\"}".to_vec())),
    ];
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for (key, value) in &cases {
        // No ce_* headers at all, as a foreign producer might send.
        let mut record = FutureRecord::to(&topic)
            .key(key.as_str())
            .headers(OwnedHeaders::new().insert(Header { key: "x-junk", value: Some("1") }));
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }
    // A healthy event afterwards is applied.
    let response = platform.post_event(&tenant, &submit_order(&tenant, "later", "o-later", "c1")).await;
    platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    eventually(WAIT, "the later order applied", || async {
        (platform.get_json(&tenant, "/orders/o-later").await.0 == 200).then_some(())
    })
    .await;

    let dlt = sluice_streams::dead_letter::dead_letter_topic(&topic, &settings.projector.name);
    let records = eventually(WAIT, "every malformed record dead-lettered", || async {
        let records = read_topic(&dlt).await;
        (records.len() >= cases.len()).then_some(records)
    })
    .await;
    let reasons: BTreeMap<String, String> = records
        .iter()
        .map(|m| {
            let reason = m
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == "sluice_reason"))
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            (String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(), reason)
        })
        .collect();
    for (key, _) in &cases {
        assert!(reasons.get(key).is_some_and(|r| !r.is_empty()), "{key} dead-lettered with a reason: {reasons:?}");
    }
    assert_eq!(platform.get_json(&tenant, "/orders/o-real").await.0, 200, "earlier rows untouched");
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_copy_that_cannot_be_published_hands_the_delivery_back_instead_of_holding_it() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::Processor).await;
    let queue = sluice_tests::orders_queue(&tenant);
    let dlq = orders_dlq(&tenant);
    eventually(WAIT, "the processor consuming", || async { (queue_consumers(&queue).await >= 1).then_some(()) }).await;

    // The DLQ is gone (deleted by mistake): the copy of a malformed message
    // cannot be published.
    delete_queue(&dlq).await;
    publish_raw(&queue, b"\xff not json", Some("m-held"), FieldTable::default()).await;
    // The delivery goes back to the queue again and again, never held: the
    // broker counts its deliveries.
    eventually(WAIT, "the delivery handed back and delivered again", || async {
        (redeliveries(&queue).await >= 2).then_some(())
    })
    .await;

    // The DLQ is back: the next try lands the message there, with its reason.
    declare_tenant_queues(&settings, &tenant).await;
    eventually(WAIT, "the message in the DLQ", || async { (queue_depth(&dlq).await == 1).then_some(()) }).await;
    eventually(WAIT, "the work queue empty, nothing unacked", || async {
        (queue_info(&queue).await?["messages"] == 0).then_some(())
    })
    .await;
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_the_broker_dead_lettered_at_its_delivery_limit_is_re_driven_like_exhausted_retries() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let platform = Platform::start(settings, Role::Processor).await;
    // RabbitMQ moved it after its delivery limit (a settle that kept
    // failing): no sluice verdict on it.
    seed_dead_letters(
        &tenant,
        &[SeedLetter::new("dl-1", Some("com.example.orders.ShipOrder"), None, "delivery_limit")],
    )
    .await;
    // Annotated, re-driven, tried again: now it meets its real verdict (this
    // ShipOrder lacks its carrier).
    let letter = eventually(WAIT, "the letter re-driven and tried again", || async {
        let listing = dlq_ops().await.list(&tenant_scope(&tenant), &Default::default()).await.ok()?;
        listing.messages.into_iter().find(|m| m.error_class == "malformed_command")
    })
    .await;
    assert_eq!(letter.message_id.as_deref(), Some("dl-1"));
    platform.stop().await.unwrap();
}
