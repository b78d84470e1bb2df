//! Router tests without a socket: the real router and handlers, a queue and a
//! read store that are test doubles. The same behaviour against the real
//! RabbitMQ is in `tests/tests/edge_*.rs`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use sluice_projections::store::{OperationRow, OrderView, ReadModelError};
use tower::ServiceExt;

use crate::auth::{hash_key, KeyConfig, TenantConfig};
use crate::queue::{CommandQueue, QueueError, QueuedCommand};
use crate::{AppState, IngestConfig, Reads};

/// Records what it was given; answers with `outcome` (a function of the
/// command's position, so a batch can fail part-way).
struct MemoryQueue {
    published: Mutex<Vec<QueuedCommand>>,
    outcome: Box<dyn Fn(usize) -> Result<(), QueueError> + Send + Sync>,
    ready: AtomicBool,
}

impl MemoryQueue {
    fn accepting() -> Arc<Self> {
        Self::answering(|_| Ok(()))
    }

    fn answering(outcome: impl Fn(usize) -> Result<(), QueueError> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self { published: Mutex::new(Vec::new()), outcome: Box::new(outcome), ready: AtomicBool::new(true) })
    }

    fn published(&self) -> Vec<QueuedCommand> {
        self.published.lock().unwrap().clone()
    }
}

impl CommandQueue for MemoryQueue {
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>> {
        let mut published = self.published.lock().unwrap();
        let result = (self.outcome)(published.len());
        if result.is_ok() {
            published.push(command.clone());
        }
        Box::pin(async move { result })
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A read store with no rows.
struct NoReads;

impl Reads for NoReads {
    fn order<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Option<OrderView>, ReadModelError>> {
        Box::pin(async { Ok(None) })
    }
    fn operation<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Option<OperationRow>, ReadModelError>> {
        Box::pin(async { Ok(None) })
    }
    fn customer_orders<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: i32,
        _: Option<&'a str>,
    ) -> BoxFuture<
        'a,
        Result<
            sluice_projections::store::Page<sluice_projections::store::CustomerOrderView>,
            sluice_projections::store::QueryError,
        >,
    > {
        Box::pin(async { Ok(sluice_projections::store::Page { items: vec![], next_cursor: None }) })
    }
    fn daily_sales<'a>(
        &'a self,
        _: &'a str,
        _: i64,
        _: i64,
    ) -> BoxFuture<'a, Result<Vec<sluice_projections::store::DaySales>, ReadModelError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn applied_offsets(&self) -> BoxFuture<'_, Result<sluice_projections::store::Offsets, ReadModelError>> {
        Box::pin(async { Ok(Default::default()) })
    }
}

fn tenant(name: &str) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        sources: vec![format!("/{name}/")],
        keys: vec![KeyConfig {
            sha256: hex::encode(hash_key(&format!("{name}-key"))),
            commands: vec![],
            name: String::new(),
        }],
        amqp_url: None,
        kafka_brokers: None,
    }
}

fn app_with(config: IngestConfig, queue: Arc<MemoryQueue>) -> Router {
    let state = AppState::new(config, &[tenant("acme"), tenant("globex")], 4, queue, Arc::new(NoReads)).unwrap();
    crate::routes::router(Arc::new(state))
}

fn edge(queue: Arc<MemoryQueue>) -> Router {
    app_with(IngestConfig::default(), queue)
}

fn order_event(tenant: &str, id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": format!("/{tenant}/shop"), "type": "com.example.orders.SubmitOrder",
           "data": {"order_id": "o1", "customer_id": "c1", "currency": "EUR",
                    "lines": [{"sku": "tea", "quantity": 1, "unit_price_cents": 100}]}})
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Answer { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
}

fn post(tenant: &str, content_type: &str) -> axum::http::request::Builder {
    Request::post("/events")
        .header("authorization", format!("Bearer {tenant}-key"))
        .header("content-type", content_type)
}

async fn send(app: &Router, tenant: &str, event: &Value) -> Answer {
    let request = post(tenant, "application/cloudevents+json").body(Body::from(event.to_string())).unwrap();
    call(app, request).await
}

/// The (path, method) pairs the router answers, asked of the router itself:
/// a request with a method no route has gets a 405 whose `Allow` lists the
/// methods of that path. HEAD comes with every GET and is left out.
async fn served_operations(app: &Router) -> BTreeSet<(String, String)> {
    let mut served = BTreeSet::new();
    for path in crate::routes::served_paths() {
        let concrete = path.replace(['{', '}'], "");
        let request = Request::builder().method("PATCH").uri(&concrete).body(Body::empty()).unwrap();
        let answer = call(app, request).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{path} answers PATCH");
        let allow = answer.headers["allow"].to_str().unwrap().to_owned();
        for method in allow.split(',').map(str::trim).filter(|m| *m != "HEAD") {
            served.insert((path.to_owned(), method.to_ascii_lowercase()));
        }
    }
    served
}

#[tokio::test]
async fn the_router_and_the_openapi_document_agree() {
    let app = edge(MemoryQueue::accepting());
    let answer = call(&app, Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    let document = answer.body;
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let served = served_operations(&app).await;
    assert!(!served.is_empty());
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in /openapi.json: {undocumented:?}");
    assert!(not_served.is_empty(), "in /openapi.json but not served: {not_served:?}");

    // Every documented path parameter is a segment of its path, every
    // documented error is a problem document, operationIds are unique.
    let mut operation_ids = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has an operationId"));
            assert!(operation_ids.insert(id.to_owned()), "operationId {id} repeats");
            for parameter in operation["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "path") {
                let name = parameter["name"].as_str().unwrap();
                assert!(path.contains(&format!("{{{name}}}")), "{method} {path}: path parameter {name}");
            }
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(response["content"]["application/problem+json"].is_object(), "{method} {path} {status}");
                }
            }
        }
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problem_documents() {
    let app = edge(MemoryQueue::accepting());
    let answer = call(&app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(answer.body["type"], "https://sluice.dev/problems/no-such-route");
    let answer =
        call(&app, Request::builder().method(Method::DELETE).uri("/events").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(answer.headers["allow"], "POST,PUT");
}

#[tokio::test]
async fn one_keys_flood_does_not_stop_another_key() {
    let config = IngestConfig { rate_limit_per_second: 1.0, rate_limit_burst: 3, ..IngestConfig::default() };
    let queue = MemoryQueue::accepting();
    let app = app_with(config, queue.clone());
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(send(&app, "acme", &order_event("acme", &format!("a{i}"))).await.status.as_u16());
    }
    assert_eq!(statuses, [202, 202, 202, 429, 429, 429, 429, 429, 429, 429]);
    let limited = send(&app, "acme", &order_event("acme", "a-last")).await;
    assert_eq!(limited.headers["content-type"], "application/problem+json");
    assert_eq!(limited.headers["retry-after"], "1");
    assert_eq!(limited.body["type"], "https://sluice.dev/problems/rate-limited");
    // globex has its own bucket, full.
    for i in 0..3 {
        assert_eq!(send(&app, "globex", &order_event("globex", &format!("g{i}"))).await.status, StatusCode::ACCEPTED);
    }
    assert_eq!(queue.published().len(), 6, "429s queue nothing");
}

#[tokio::test]
async fn reads_have_a_rate_limit_per_key_of_their_own() {
    let config = IngestConfig { read_rate_limit_per_second: 1.0, read_rate_limit_burst: 2, ..IngestConfig::default() };
    let queue = MemoryQueue::accepting();
    let app = app_with(config, queue.clone());
    let read = |tenant: &str| {
        Request::get("/orders/o1").header("authorization", format!("Bearer {tenant}-key")).body(Body::empty()).unwrap()
    };
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call(&app, read("acme")).await.status.as_u16());
    }
    assert_eq!(statuses, [404, 404, 429, 429], "two reads of the burst, then limited");
    let limited = call(&app, read("acme")).await;
    assert_eq!(limited.body["type"], "https://sluice.dev/problems/rate-limited");
    assert!(limited.body["detail"].as_str().unwrap().contains("read rate limit"));
    assert_eq!(call(&app, read("globex")).await.status, StatusCode::NOT_FOUND, "another key's bucket is full");
    assert_eq!(
        send(&app, "acme", &order_event("acme", "w1")).await.status,
        StatusCode::ACCEPTED,
        "reads spend no write tokens"
    );
}

#[tokio::test]
async fn the_http_traceparent_travels_unless_the_event_has_its_own() {
    const HTTP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OWN: &str = "00-11111111111111111111111111111111-2222222222222222-01";
    let queue = MemoryQueue::accepting();
    let app = edge(queue.clone());
    let mut with_own = order_event("acme", "t2");
    with_own["traceparent"] = json!(OWN);
    for event in [order_event("acme", "t1"), with_own] {
        let request = post("acme", "application/cloudevents+json")
            .header("traceparent", HTTP)
            .body(Body::from(event.to_string()));
        assert_eq!(call(&app, request.unwrap()).await.status, StatusCode::ACCEPTED);
    }
    let headers: Vec<Option<String>> = queue
        .published()
        .iter()
        .map(|c| c.headers.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(headers, [Some(HTTP.to_owned()), Some(OWN.to_owned())]);

    // A malformed header is ignored, not refused.
    let request = post("acme", "application/cloudevents+json")
        .header("traceparent", "junk")
        .body(Body::from(order_event("acme", "t3").to_string()));
    assert_eq!(call(&app, request.unwrap()).await.status, StatusCode::ACCEPTED);
    assert!(queue.published()[2].headers.iter().all(|(k, _)| k != "traceparent"));
}

#[tokio::test]
async fn a_503_says_whether_the_command_may_be_queued() {
    let app = edge(MemoryQueue::answering(|_| Err(QueueError::Unavailable("down".into()))));
    let answer = send(&app, "acme", &order_event("acme", "u1")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(answer.body["type"], "https://sluice.dev/problems/unavailable");

    let app = edge(MemoryQueue::answering(|_| Err(QueueError::Unconfirmed("timeout".into()))));
    let answer = send(&app, "acme", &order_event("acme", "u2")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body["type"], "https://sluice.dev/problems/unconfirmed");

    // A batch whose second event was refused: the first is queued and listed.
    let queue = MemoryQueue::answering(|n| if n == 0 { Ok(()) } else { Err(QueueError::Refused("nack".into())) });
    let app = edge(queue.clone());
    let batch = json!([order_event("acme", "b1"), order_event("acme", "b2")]);
    let request = post("acme", "application/cloudevents-batch+json").body(Body::from(batch.to_string())).unwrap();
    let answer = call(&app, request).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body["type"], "https://sluice.dev/problems/unavailable");
    assert_eq!(answer.body["errors"][0]["operation_id"].as_str(), Some(queue.published()[0].operation_id.as_str()));
    assert_eq!(answer.body["errors"][1]["problem"], "not queued");
}

#[tokio::test]
async fn readiness_follows_the_queue() {
    let queue = MemoryQueue::accepting();
    let app = edge(queue.clone());
    assert_eq!(call(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await.status, StatusCode::OK);
    queue.ready.store(false, Ordering::SeqCst);
    let answer = call(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "1");
}

#[tokio::test]
async fn an_operation_is_its_tenants_only() {
    let queue = MemoryQueue::accepting();
    let app = edge(queue.clone());
    let accepted = send(&app, "acme", &order_event("acme", "op1")).await;
    let location = accepted.headers["location"].to_str().unwrap().to_owned();
    let again = send(&app, "acme", &order_event("acme", "op1")).await;
    assert_eq!(again.body["operation_id"], accepted.body["operation_id"], "a retry gets the same operation");
    let get = |key: &str| {
        Request::get(&location).header("authorization", format!("Bearer {key}")).body(Body::empty()).unwrap()
    };
    let mine = call(&app, get("acme-key")).await;
    assert_eq!((mine.status, mine.body["status"].as_str()), (StatusCode::OK, Some("accepted")));
    assert_eq!(call(&app, get("globex-key")).await.status, StatusCode::NOT_FOUND);
}
