//! The edge against the real RabbitMQ, with no processor running (ingest
//! role only), so every accepted command stays in its tenant's queue where
//! the test can count and read it: each CloudEvents mode, what the queued
//! message carries, operation ids, and the API's own description.

use lapin::BasicProperties;
use reqwest::Method;
use serde_json::{json, Value};
use sluice_cli::serve::Role;
use sluice_tests::{
    amqp_header, delete_queue, drain_queue, orders_queue, queue_depth, submit_order, test_settings, Answer, Platform,
    TestTenant,
};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn ingest_only(tenants: &[&TestTenant]) -> Platform {
    Platform::start(test_settings(tenants), Role::Ingest).await
}

fn assert_accepted(answer: &Answer, context: &str) -> String {
    assert_eq!(answer.status, 202, "{context}: {}", answer.body);
    let id = answer.body["operation_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: operation_id in {}", answer.body))
        .to_owned();
    assert_eq!(answer.body["status"], "accepted", "{context}");
    assert_eq!(answer.header("location"), Some(format!("/operations/{id}").as_str()), "{context}: Location");
    assert_eq!(answer.body["location"], format!("/operations/{id}"), "{context}");
    id
}

fn message_id(properties: &BasicProperties) -> String {
    properties.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_queues_a_command_the_processors_can_read() {
    let tenant = TestTenant::new();
    let platform = ingest_only(&[&tenant]).await;
    let queue = orders_queue(&tenant);
    let url = platform.url("/events");
    let mut expected = Vec::new(); // (operation id, CloudEvent id)

    // Structured, POST and PUT; the HTTP traceparent header travels.
    for (i, method) in [Method::POST, Method::PUT].into_iter().enumerate() {
        let event = submit_order(&tenant, &format!("structured-{i}"), &format!("order-s{i}"), "c-1");
        let response = platform
            .http
            .request(method.clone(), &url)
            .bearer_auth(&tenant.key)
            .header("content-type", "application/cloudevents+json; charset=utf-8")
            .header("traceparent", TRACEPARENT)
            .body(event.to_string())
            .send()
            .await
            .unwrap();
        let id = assert_accepted(&Answer::read(response).await, &format!("structured {method}"));
        expected.push((id, format!("structured-{i}")));
    }
    assert_eq!(queue_depth(&queue).await, 2);

    // Binary: attributes in percent-encoded ce-* headers, JSON data in the
    // body under any JSON media type, or under none (the CloudEvents Python
    // SDK's `to_binary` sends no Content-Type for an event without
    // datacontenttype).
    for (i, content_type) in [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/vnd.acme.order+json"),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        let data = json!({"order_id": format!("order-b{i}"), "customer_id": "c-1", "currency": "EUR",
                          "lines": [{"sku": "tea", "quantity": 1, "unit_price_cents": 450}]});
        let mut request = platform.http.post(&url).bearer_auth(&tenant.key);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("binary-{i}"))
            .header("ce-source", &tenant.source)
            .header("ce-type", "com.example.orders.SubmitOrder")
            .header("ce-subject", "order%20b") // percent-decoded to "order b"
            .header("ce-time", "2026-11-26T10:00:00Z")
            .header("ce-dataschema", "https://sluice.dev/schemas/commands/com.example.orders.SubmitOrder/1")
            .body(data.to_string())
            .send()
            .await
            .unwrap();
        let id = assert_accepted(&Answer::read(response).await, &format!("binary {content_type:?}"));
        expected.push((id, format!("binary-{i}")));
    }
    assert_eq!(queue_depth(&queue).await, 6);

    // Batch: one 202 for all, an operation per event, in order.
    let events: Vec<Value> =
        (0..3).map(|i| submit_order(&tenant, &format!("batch-{i}"), &format!("order-x{i}"), "c-2")).collect();
    let response = platform
        .http
        .post(&url)
        .bearer_auth(&tenant.key)
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events).to_string())
        .send()
        .await
        .unwrap();
    let answer = Answer::read(response).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert!(answer.header("location").is_none(), "a batch has one operation per event, no single Location");
    let operations = answer.body["operations"].as_array().expect("operations");
    assert_eq!(operations.len(), 3);
    for (i, operation) in operations.iter().enumerate() {
        assert_eq!(operation["status"], "accepted");
        expected.push((operation["operation_id"].as_str().unwrap().to_owned(), format!("batch-{i}")));
    }
    assert_eq!(queue_depth(&queue).await, 9);

    // What the processors get: persistent structured-mode CloudEvents, the
    // operation id as message id, the attributes and traceparent as headers.
    let messages = drain_queue(&queue).await;
    assert_eq!(messages.len(), expected.len());
    for ((properties, body), (operation_id, event_id)) in messages.iter().zip(&expected) {
        assert_eq!(&message_id(properties), operation_id, "queue order is publish order");
        assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(properties.content_type().as_ref().map(|s| s.as_str()), Some("application/cloudevents+json"));
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(&event["id"], event_id);
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(amqp_header(properties, "cloudEvents:id").as_deref(), Some(event_id.as_str()));
        assert_eq!(amqp_header(properties, "cloudEvents:source").as_deref(), Some(tenant.source.as_str()));
        assert_eq!(amqp_header(properties, "cloudEvents:type").as_deref(), Some("com.example.orders.SubmitOrder"));
        assert_eq!(amqp_header(properties, "sluice-tenant").as_deref(), Some(tenant.name.as_str()));
        let traceparent = amqp_header(properties, "traceparent");
        if event_id.starts_with("structured") {
            assert_eq!(traceparent.as_deref(), Some(TRACEPARENT), "{event_id}: HTTP traceparent header");
        } else {
            assert_eq!(traceparent, None, "{event_id}");
        }
        if event_id.starts_with("binary") {
            assert_eq!(event["subject"], "order b");
            assert_eq!(event["data"]["currency"], "EUR", "JSON data is data, not data_base64");
            assert!(event.get("data_base64").is_none());
        }
    }
    platform.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevent_traceparent_extension_wins_over_the_http_header() {
    let tenant = TestTenant::new();
    let platform = ingest_only(&[&tenant]).await;
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    let mut event = submit_order(&tenant, "traced", "order-t", "c-1");
    event["traceparent"] = json!(own);
    let response = platform
        .http
        .post(platform.url("/events"))
        .bearer_auth(&tenant.key)
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", TRACEPARENT)
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_accepted(&Answer::read(response).await, "traced");
    // Binary mode: ce-traceparent is the extension.
    let response = platform
        .http
        .post(platform.url("/events"))
        .bearer_auth(&tenant.key)
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "traced-binary")
        .header("ce-source", &tenant.source)
        .header("ce-type", "com.example.orders.CancelOrder")
        .header("ce-traceparent", own)
        .header("traceparent", TRACEPARENT)
        .body(json!({"order_id": "order-t", "reason": "changed my mind"}).to_string())
        .send()
        .await
        .unwrap();
    assert_accepted(&Answer::read(response).await, "traced binary");
    let messages = drain_queue(&orders_queue(&tenant)).await;
    let traceparents: Vec<_> = messages.iter().map(|(p, _)| amqp_header(p, "traceparent")).collect();
    assert_eq!(traceparents, [Some(own.to_owned()), Some(own.to_owned())]);
    platform.stop().await.unwrap();
    delete_queue(&orders_queue(&tenant)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_cloudevent_keeps_its_operation_and_operations_stay_with_their_tenant() {
    let (tenant, other) = (TestTenant::new(), TestTenant::new());
    let platform = ingest_only(&[&tenant, &other]).await;
    let event = submit_order(&tenant, "retried", "order-r", "c-1");
    let first = assert_accepted(&Answer::read(platform.post_event(&tenant, &event).await).await, "first");
    let second = assert_accepted(&Answer::read(platform.post_event(&tenant, &event).await).await, "retry");
    assert_eq!(first, second, "same (source, id), same operation");
    // Same id from another source is another command.
    let mut elsewhere = event.clone();
    elsewhere["source"] = json!(format!("/{}/pos", tenant.name));
    let third = assert_accepted(&Answer::read(platform.post_event(&tenant, &elsewhere).await).await, "other source");
    assert_ne!(first, third);
    // Both deliveries are queued; the processors deduplicate them.
    assert_eq!(queue_depth(&orders_queue(&tenant)).await, 3);

    // Not processed yet (no processor runs): accepted, not 404.
    let location = format!("/operations/{first}");
    let (status, body) = platform.get_json(&tenant, &location).await;
    assert_eq!((status, body["status"].as_str(), body["id"].as_str()), (200, Some("accepted"), Some(first.as_str())));
    assert_eq!(body["events"], json!([]));

    // Another tenant's key: 404, as for a made-up id.
    let response = platform.http.get(platform.url(&location)).bearer_auth(&other.key).send().await.unwrap();
    Answer::read(response).await.assert_problem(404, "not-found", "other tenant");
    let made_up = format!("/operations/{}", "0".repeat(first.len()));
    let response = platform.http.get(platform.url(&made_up)).bearer_auth(&tenant.key).send().await.unwrap();
    Answer::read(response).await.assert_problem(404, "not-found", "made-up id");
    let response = platform.http.get(platform.url(&location)).send().await.unwrap();
    Answer::read(response).await.assert_problem(401, "unauthorized", "no key");
    assert_eq!(queue_depth(&orders_queue(&other)).await, 0);
    platform.stop().await.unwrap();
    delete_queue(&orders_queue(&tenant)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_what_the_server_answers() {
    let tenant = TestTenant::new();
    let platform = ingest_only(&[&tenant]).await;
    let response = platform.http.get(platform.url("/openapi.json")).send().await.unwrap();
    let answer = Answer::read(response).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", answer.body["openapi"]);
    let paths = answer.body["paths"].as_object().expect("paths");
    for path in ["/events", "/operations/{id}", "/orders/{order_id}", "/healthz", "/readyz", "/openapi.json"] {
        assert!(paths.contains_key(path), "{path} is documented");
    }
    // Every documented operation is served: a request reaches a handler,
    // not the router's "no such route" or "method not allowed".
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace('{', "x-").replace('}', "");
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let response = platform.http.request(method.clone(), platform.url(&concrete)).send().await.unwrap();
            let answer = Answer::read(response).await;
            assert_ne!(answer.status, 405, "{method} {path}");
            assert_ne!(answer.body["type"], "https://sluice.dev/problems/no-such-route", "{method} {path}");
        }
    }
    // And something undocumented is not.
    let response = platform.http.get(platform.url("/admin")).send().await.unwrap();
    Answer::read(response).await.assert_problem(404, "no-such-route", "undocumented path");

    // Health, readiness and the schemas need no key.
    for path in ["/healthz", "/readyz", "/schemas/commands", "/schemas/commands/com.example.orders.SubmitOrder"] {
        let status = platform.http.get(platform.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
    platform.stop().await.unwrap();
}
