//! One command through every hop, driven through HTTP only, then each hop
//! checked from outside: the Kafka record (Confluent wire format, schema in
//! the registry, Avro body), the row in the CQL store, the read API.

use std::time::Duration;

use rdkafka::Message;
use sluice_cli::serve::Role;
use sluice_tests::{cql, read_record, submit_order, test_settings, Platform, TestTenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submitted_order_reaches_kafka_the_registry_and_the_read_model() {
    let (tenant, other) = (TestTenant::new(), TestTenant::new());
    let settings = test_settings(&[&tenant, &other]);
    let projection = settings.projector.name.clone();
    let platform = Platform::start(settings, Role::All).await;

    // 1. The edge answers 202 with an operation URL.
    let event = submit_order(&tenant, "cmd-1", "order-1", "customer-1");
    let response = platform.post_event(&tenant, &event).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/operations/"), "{location}");

    // 2. The operation ends `succeeded` and names where the event landed.
    let operation = platform.await_operation(&tenant, &location, Duration::from_secs(60)).await;
    assert_eq!(operation["status"], "succeeded", "{operation}");
    let produced = &operation["events"][0];
    assert_eq!(produced["type"], "com.example.orders.OrderSubmitted");
    let topic = format!("{}.orders.events", tenant.name);
    assert_eq!(produced["topic"], topic.as_str());

    // 3. The Kafka record: key = order id, magic byte 0, a schema id the
    //    registry resolves to OrderSubmitted, an Avro body with the order.
    let record =
        read_record(&topic, produced["partition"].as_i64().unwrap() as i32, produced["offset"].as_i64().unwrap()).await;
    assert_eq!(record.key(), Some(&b"order-1"[..]));
    let value = record.payload().expect("record value");
    assert_eq!(value[0], 0, "magic byte");
    let schema_id = u32::from_be_bytes(value[1..5].try_into().unwrap());
    let registry: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:8081/apis/ccompat/v7/schemas/ids/{schema_id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let schema = apache_avro::Schema::parse_str(registry["schema"].as_str().unwrap()).unwrap();
    assert_eq!(schema.name().unwrap().fullname(None), "com.example.orders.OrderSubmitted");
    let subjects: Vec<String> =
        reqwest::get("http://127.0.0.1:8081/apis/ccompat/v7/subjects").await.unwrap().json().await.unwrap();
    assert!(
        subjects.contains(&format!("{topic}-com.example.orders.OrderSubmitted")),
        "TopicRecordNameStrategy subject"
    );
    #[allow(deprecated)] // the plain datum reader is what a data team would use too
    let decoded = apache_avro::from_avro_datum(&schema, &mut &value[5..], None).unwrap();
    let decoded: sluice_schemas::orders::OrderSubmitted = apache_avro::from_value(&decoded).unwrap();
    assert_eq!(decoded.order_id, "order-1");
    assert_eq!(decoded.customer_id, "customer-1");
    assert_eq!(decoded.total_cents, 2 * 450 + 1200);
    assert_eq!(decoded.lines.len(), 2);
    let header = |name: &str| {
        use rdkafka::message::Headers;
        record
            .headers()
            .and_then(|h| h.iter().find(|x| x.key == name))
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("ce_type").as_deref(), Some("com.example.orders.OrderSubmitted"));
    assert_eq!(header("ce_subject").as_deref(), Some("order-1"));

    // 4. The read model, through the API and straight from the CQL store.
    let (status, order) = sluice_tests::eventually(Duration::from_secs(30), "the order in the read model", || async {
        let (status, body) = platform.get_json(&tenant, "/orders/order-1").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(order["status"], "submitted");
    assert_eq!(order["total_cents"], 2100);
    let session = cql().await;
    let rows = session
        .query_unpaged(
            format!("SELECT status, total_cents FROM sluice.{projection}_by_id_v1 WHERE tenant = ? AND order_id = ?"),
            (&tenant.name, "order-1"),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let (row_status, total): (String, i64) = rows.single_row().unwrap();
    assert_eq!((row_status.as_str(), total), ("submitted", 2100));

    // 5. Another configured tenant's key sees neither the operation nor the
    //    order: both are 404 for it, as if they did not exist.
    let (status, body) = platform.get_json(&other, &location).await;
    assert_eq!(status, 404, "another tenant's operation: {body}");
    let (status, body) = platform.get_json(&other, "/orders/order-1").await;
    assert_eq!(status, 404, "another tenant's order: {body}");

    platform.stop().await.unwrap();
}
