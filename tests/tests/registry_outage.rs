//! The registry refusing for a while is not poison: a projector whose
//! schema registry answers 429 and 503 (a stand-in in front of the real
//! Apicurio) waits and retries, parks no key and dead-letters nothing, and
//! applies every event once the registry answers again. A registry that
//! lost a schema (404 for its id) is: the key is parked, and once the
//! schema is back `sluice dlt replay` applies its records in order. On the
//! command side, a registry refusing the processors past all their retries
//! dead-letters no decided command: its events reach Kafka once it answers.

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

/// A registry that refuses (alternately 429 and 503) while `failing`,
/// answers 404 for schemas by id while `lost`, and otherwise passes every
/// request through to the real one.
struct StandIn {
    upstream: String,
    failing: AtomicBool,
    lost: AtomicBool,
    refused: AtomicU64,
    http: reqwest::Client,
}

impl StandIn {
    /// Serves on a port of its own; the registry URL that reaches it.
    async fn start(real: &str, failing: bool, lost: bool) -> (Arc<Self>, String, tokio::task::JoinHandle<()>) {
        let upstream = real.find("/apis/").map_or(real.to_owned(), |i| real[..i].to_owned());
        let stand_in = Arc::new(StandIn {
            upstream,
            failing: AtomicBool::new(failing),
            lost: AtomicBool::new(lost),
            refused: AtomicU64::new(0),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(registry).with_state(stand_in.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url = real.replacen(&stand_in.upstream, &format!("http://127.0.0.1:{port}"), 1);
        (stand_in, url, server)
    }
}

async fn registry(State(s): State<Arc<StandIn>>, request: Request) -> Response {
    if s.lost.load(Ordering::SeqCst) && request.uri().path().contains("/schemas/ids/") {
        let body = json!({"error_code": 40403, "message": "Schema not found"});
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
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
    let (stand_in, url, server) = StandIn::start(&settings.registry.url, true, false).await;
    let mut projector_settings = settings.clone();
    projector_settings.registry.url = url;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_whose_schema_the_registry_lost_parks_its_key_until_sluice_dlt_replay_applies_it_in_order() {
    use sluice_cli::ops::dlt::{Dlt, DltFilter};
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processor = Platform::start(settings.clone(), Role::Processor).await;
    let (stand_in, url, server) = StandIn::start(&settings.registry.url, false, true).await;
    let mut projector_settings = settings.clone();
    projector_settings.registry.url = url;
    let _projector = SluiceProcess::spawn(&projector_settings, "projector");

    // While the registry has lost the schemas, o1 is submitted and shipped:
    // undecodable, then parked behind it.
    let submit = edge.post_event(&tenant, &submit_order(&tenant, "s1", "o1", "c1")).await;
    assert_eq!(
        edge.await_operation(&tenant, submit.headers()["location"].to_str().unwrap(), WAIT).await["status"],
        "succeeded"
    );
    let ship = command(
        &tenant,
        "ship1",
        "com.example.orders.ShipOrder",
        json!({"order_id": "o1", "carrier": "ups", "tracking_number": "1Z1"}),
    );
    let ship = edge.post_event(&tenant, &ship).await;
    assert_eq!(
        edge.await_operation(&tenant, ship.headers()["location"].to_str().unwrap(), WAIT).await["status"],
        "succeeded"
    );
    let dlt = Dlt::new(settings.clone(), cql_sluice().await);
    let only_o1 = DltFilter { tenant: Some(tenant.name.clone()), key: Some("o1".into()), ..Default::default() };
    // A listing reads the parked keys, then the topics: both are awaited.
    let listing = eventually(WAIT, "o1's two events dead-lettered and o1 parked", || async {
        let listing = dlt.list(&only_o1, |_| {}).await.expect("dlt list");
        (listing.records.len() >= 2 && !listing.parked.is_empty()).then_some(listing)
    })
    .await;
    let classes: Vec<&str> = listing.records.iter().map(|r| r.class.as_str()).collect();
    assert_eq!(classes, ["undecodable", "parked"], "{listing:?}");
    assert_eq!(listing.parked.len(), 1, "o1 parked: {listing:?}");
    assert_eq!(listing.parked[0].consumer, settings.projector.name);

    let report = sluice_cli::ops::status::status(&settings, &Default::default()).await.expect("status");
    let parked = report.tenants[0].parked_keys.clone().expect("parked keys known");
    assert_eq!(
        parked.iter().map(|p| (p.consumer.as_str(), p.keys)).collect::<Vec<_>>(),
        [(settings.projector.name.as_str(), 1)]
    );
    assert!(report.problems.iter().any(|p| p.kind == "keys_parked"), "{:?}", report.problems);

    // The schema is back: new keys apply, o1 stays parked until replayed.
    stand_in.lost.store(false, Ordering::SeqCst);
    let other = edge.post_event(&tenant, &submit_order(&tenant, "s2", "o2", "c1")).await;
    assert_eq!(other.status(), 202);
    eventually(WAIT, "o2 applied", || async { (edge.get_json(&tenant, "/orders/o2").await.0 == 200).then_some(()) })
        .await;
    assert_eq!(edge.get_json(&tenant, "/orders/o1").await.0, 404, "o1 waits behind its dead letters");

    let mut seen = Vec::new();
    let outcome = dlt
        .replay(
            &settings.projector.name,
            &tenant.name,
            "o1",
            ("test", "schemas restored"),
            Duration::from_secs(1),
            |done, total| seen.push((done, total)),
        )
        .await
        .expect("replay");
    assert_eq!((outcome.applied, outcome.failed.clone(), outcome.unparked), (2, None, true), "{outcome:?}");
    assert_eq!(seen, [(1, 2), (2, 2)], "progress per record");
    let (status, order) = edge.get_json(&tenant, "/orders/o1").await;
    assert_eq!(
        (status, order["status"].as_str(), order["version"].as_i64()),
        (200, Some("shipped"), Some(2)),
        "{order}"
    );
    assert!(parked_keys(&settings.projector.name).await.is_empty(), "unparked");
    // Applied out of its partition's order, o1 still counts in the day's
    // sales: o2 from the partition's running total, o1 from a slot of its own.
    let totals: i64 = [edge.get_json(&tenant, "/orders/o1").await.1, edge.get_json(&tenant, "/orders/o2").await.1]
        .iter()
        .map(|o| o["total_cents"].as_i64().expect("a total"))
        .sum();
    let today = chrono::Utc::now().date_naive();
    let sales = edge.get_json(&tenant, &format!("/sales/daily?from={}&to={today}", today.pred_opt().unwrap())).await.1;
    let days = sales["days"].as_array().expect("days");
    let counted = days.iter().map(|d| (d["orders"].as_i64().unwrap(), d["total_cents"].as_i64().unwrap()));
    assert_eq!(counted.fold((0, 0), |(o, t), (do_, dt)| (o + do_, t + dt)), (2, totals), "{sales}");
    let audit = sluice_cli::ops::audit::AuditLog::new(cql_sluice().await).list(Some(&tenant.name), 10).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].action.as_deref(), audit[0].status.as_deref(), audit[0].reason.as_deref()),
        (Some("dlt-replay"), Some("done"), Some("schemas restored"))
    );

    let replayed_again =
        dlt.replay(&settings.projector.name, &tenant.name, "o1", ("test", "again"), Duration::ZERO, |_, _| {}).await;
    assert!(replayed_again.is_err(), "a key that is not parked is not replayed");

    server.abort();
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_refusing_the_processors_past_all_retries_dead_letters_no_decided_command() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // Two attempts are over long before the registry answers again; a
    // decided (journaled) command must outlast the refusal anyway.
    settings.processor.retry_delays_ms = vec![200, 500];
    settings.processor.max_attempts = 2;
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    // The processors alone see the registry through the stand-in, refusing
    // from their first request on (their schema cache starts empty).
    let (stand_in, url, server) = StandIn::start(&settings.registry.url, true, false).await;
    let mut processor_settings = settings.clone();
    processor_settings.registry.url = url;
    let processor = Platform::start(processor_settings, Role::Processor).await;

    let mut locations = Vec::new();
    for i in 0..10 {
        let response = edge.post_event(&tenant, &submit_order(&tenant, &format!("r{i}"), &format!("o{i}"), "c1")).await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
    }
    // Decided and stored, but not in Kafka: tried again and again, past
    // `max_attempts`, never dead-lettered. (The partition's later commands
    // wait behind the round that cannot be produced; none of them is
    // dead-lettered either.)
    eventually(WAIT, "a decided command retried past max_attempts while the registry refuses", || async {
        let mut most = 0;
        for location in &locations {
            let (_, op) = edge.get_json(&tenant, location).await;
            assert_ne!(op["status"], "dead_lettered", "a command was dead-lettered: {op}");
            most = most.max(op["attempts"].as_i64().unwrap_or(0));
        }
        (most > 2 && stand_in.refused.load(Ordering::SeqCst) >= 6).then_some(())
    })
    .await;
    let dlq = sluice_schemas::names::dead_letter_queue(&tenant.name, "orders");
    assert_eq!(queue_depth(&dlq).await, 0, "nothing in the DLQ");
    assert_eq!(stored_events(&tenant.name, "o0").await.len(), 1, "decided and stored while the registry refused");

    stand_in.failing.store(false, Ordering::SeqCst);
    for location in &locations {
        assert_eq!(edge.await_operation(&tenant, location, WAIT).await["status"], "succeeded");
    }
    let orders: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
    assert_orders_in_kafka_exactly_once(&tenant, &orders).await;
    server.abort();
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}
