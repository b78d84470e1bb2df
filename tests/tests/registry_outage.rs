//! The registry refusing for a while is not poison: a projector whose
//! schema registry answers 429 and 503 (a stand-in in front of the real
//! Apicurio) waits and retries, parks no key and dead-letters nothing, and
//! applies every event once the registry answers again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::json;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(120);

/// A registry that refuses (alternately 429 and 503) while `failing`, and
/// otherwise passes every request through to the real one.
struct StandIn {
    upstream: String,
    failing: AtomicBool,
    refused: AtomicU64,
    http: reqwest::Client,
}

async fn registry(State(s): State<Arc<StandIn>>, request: Request) -> Response {
    if s.failing.load(Ordering::SeqCst) {
        let n = s.refused.fetch_add(1, Ordering::SeqCst);
        let status = if n % 2 == 0 { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::SERVICE_UNAVAILABLE };
        let body = json!({"error_code": status.as_u16(), "message": "stand-in registry refusing"});
        return (status, axum::Json(body)).into_response();
    }
    let path = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let method = request.method().clone();
    let content_type = request.headers().get("content-type").cloned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    let mut forward = s.http.request(method, format!("{}{path}", s.upstream)).body(body);
    if let Some(ct) = content_type {
        forward = forward.header("content-type", ct);
    }
    match forward.send().await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = answer.headers().get("content-type").cloned();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            if let Some(ct) = ct {
                response.headers_mut().insert("content-type", ct);
            }
            response
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// Records in `topic` (its partitions' end offsets summed).
async fn records_in(topic: &str) -> i64 {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .set("group.id", "sluice-test-registry-outage")
            .create()
            .expect("kafka client");
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).expect("topic metadata");
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        assert!(!partitions.is_empty(), "{topic} exists");
        partitions.iter().map(|p| consumer.fetch_watermarks(&topic, *p, timeout).expect("watermarks").1).sum()
    })
    .await
    .expect("watermarks task")
}

async fn parked_keys(projection: &str) -> Vec<String> {
    let rows = cql_sluice()
        .await
        .query_unpaged("SELECT key FROM projection_parked_keys WHERE projection = ? AND version = 1", (projection,))
        .await
        .expect("parked keys")
        .into_rows_result()
        .expect("rows");
    rows.rows::<(String,)>().expect("typed rows").map(|r| r.expect("row").0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_refusing_for_a_while_parks_no_key_and_loses_nothing() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processor = Platform::start(settings.clone(), Role::Processor).await;

    // The projector alone sees the registry through the stand-in, refusing
    // from its first request on (its schema cache starts empty).
    let real = settings.registry.url.clone();
    let upstream = real.find("/apis/").map_or(real.clone(), |i| real[..i].to_owned());
    let stand_in = Arc::new(StandIn {
        upstream,
        failing: AtomicBool::new(true),
        refused: AtomicU64::new(0),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(registry).with_state(stand_in.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut projector_settings = settings.clone();
    projector_settings.registry.url = real.replacen(&stand_in.upstream, &format!("http://127.0.0.1:{port}"), 1);
    let _projector = SluiceProcess::spawn(&projector_settings, "projector");

    // Orders go through the edge and the processors (the real registry);
    // every other one is shipped too.
    let mut locations = Vec::new();
    for i in 0..12 {
        let response = edge.post_event(&tenant, &submit_order(&tenant, &format!("s{i}"), &format!("o{i}"), "c1")).await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
    }
    for location in &locations {
        assert_eq!(edge.await_operation(&tenant, location, WAIT).await["status"], "succeeded");
    }
    let mut ships = Vec::new();
    for i in (0..12).step_by(2) {
        let ship = command(
            &tenant,
            &format!("ship{i}"),
            "com.example.orders.ShipOrder",
            json!({"order_id": format!("o{i}"), "carrier": "ups", "tracking_number": format!("1Z{i}")}),
        );
        ships.push(edge.post_event(&tenant, &ship).await.headers()["location"].to_str().unwrap().to_owned());
    }
    for location in &ships {
        assert_eq!(edge.await_operation(&tenant, location, WAIT).await["status"], "succeeded");
    }

    // The projector keeps asking and keeps being refused, both ways (or,
    // wrongly, gives up on records as poison).
    let topic = format!("{}.orders.events", tenant.name);
    let dead_letters = sluice_streams::dead_letter::dead_letter_topic(&topic, &settings.projector.name);
    eventually(WAIT, "the projector to be refused by the registry, 429 and 503, again and again", || async {
        (stand_in.refused.load(Ordering::SeqCst) >= 6 || records_in(&dead_letters).await > 0).then_some(())
    })
    .await;
    assert_eq!(records_in(&dead_letters).await, 0, "a refusing registry dead-letters nothing");
    assert_eq!(parked_keys(&settings.projector.name).await, Vec::<String>::new(), "and parks no key");
    let (status, _) = edge.get_json(&tenant, "/orders/o0").await;
    assert_eq!(status, 404, "nothing applied while the registry refuses");

    // The registry answers again: every event is applied, in order.
    stand_in.failing.store(false, Ordering::SeqCst);
    for i in 0..12 {
        let expected = if i % 2 == 0 { "shipped" } else { "submitted" };
        let order = eventually(WAIT, &format!("order o{i} {expected}"), || async {
            let (status, order) = edge.get_json(&tenant, &format!("/orders/o{i}")).await;
            (status == 200 && order["status"] == expected).then_some(order)
        })
        .await;
        assert_eq!(order["version"], if i % 2 == 0 { 2 } else { 1 }, "o{i}");
    }
    assert_eq!(records_in(&dead_letters).await, 0, "still nothing dead-lettered");
    assert!(parked_keys(&settings.projector.name).await.is_empty(), "still no parked key");

    server.abort();
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}
