//! The HTTP routes: commands in (`/events`), reads out (operations, read
//! models), health and the API's own description. Handlers translate; the
//! rules live in the modules they call.
//!
//! Every route is listed once, in [`routes`]: the router is built from that
//! list, and a test holds it against the OpenAPI document that the
//! `#[utoipa::path]` attributes below describe, so the two cannot drift.

use std::sync::{Arc, OnceLock};

use axum::body::{to_bytes, Body};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use sluice_schemas::catalog;
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use sluice_telemetry::trace_context;
use tracing::{debug, info_span, warn, Instrument};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::binding::read_events;
use crate::openapi::{CloudEventDoc, CommandSchemaList, HealthDoc, OperationDoc, OrderDoc};
use crate::problem::Problem;
use crate::queue::{QueueError, QueuedCommand};
use crate::rate_limit::retry_after_seconds;
use crate::AppState;

/// Every path the edge serves, with its handlers.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/events", post(accept).put(accept)),
        ("/operations/{id}", get(operation)),
        ("/orders/{order_id}", get(order)),
        ("/customers/{customer_id}/orders", get(crate::reads::customer_orders)),
        ("/sales/daily", get(crate::reads::daily_sales)),
        ("/patients/{patient_id}/onboarding", get(patient_onboarding)),
        ("/schemas/commands", get(list_command_schemas)),
        ("/schemas/commands/{type}", get(command_schema)),
        ("/healthz", get(healthz)),
        ("/readyz", get(ready)),
        ("/openapi.json", get(openapi_json)),
    ]
}

/// The paths of [`routes`], for the test that compares them with the document.
pub fn served_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _)| path).collect()
}

pub fn router(state: Arc<AppState>) -> Router {
    let timeout = std::time::Duration::from_millis(state.config.request_timeout_ms.max(1));
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| router.route(path, methods))
        // Errors are problem documents everywhere, unknown routes included;
        // axum still adds `Allow` to the 405.
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(timeout, crate::limits::request_timeout))
}

async fn no_such_route(method: Method, uri: Uri) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-such-route",
        "No such route",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} does not take {method}; see the Allow header", uri.path()),
    )
}

pub(crate) fn authenticate<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Caller, Problem> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| Problem::unauthorized("send Authorization: Bearer <api key>").at_header("authorization"))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Problem::unauthorized("Authorization must be: Bearer <api key>").at_header("authorization"))?;
    // The key itself never goes into a log or a problem document.
    state.keys.authenticate(key).ok_or_else(|| Problem::unauthorized("unknown API key").at_header("authorization"))
}

/// [`authenticate`] for a read route, then the key's read rate limit.
pub(crate) fn authenticate_read<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Caller, Problem> {
    let caller = authenticate(state, headers)?;
    spend(&state.read_limiter, caller, "read rate limit")?;
    Ok(caller)
}

/// Takes a token from `caller`'s bucket in `limiter`, or says when to retry.
fn spend(limiter: &crate::rate_limit::RateLimiter, caller: &Caller, what: &str) -> Result<(), Problem> {
    limiter.check(caller.key_index()).map_err(|wait| {
        Problem::rate_limited(
            format!("key {} is over its {what} ({})", caller.key_name, limiter.limit()),
            retry_after_seconds(wait),
        )
    })
}

/// What a 202 for one event says.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcceptedOperation {
    /// Same CloudEvent (`source`, `id`) ⇒ same operation id.
    pub operation_id: String,
    /// Always `accepted`: the command is durably queued.
    #[schema(example = "accepted")]
    pub status: &'static str,
    /// `/operations/{operation_id}`.
    pub location: String,
}

/// What a 202 for a batch says: one operation per event, in order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcceptedBatch {
    pub operations: Vec<AcceptedOperation>,
}

/// The body of a 202: one operation, or a batch's.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Accepted {
    One(AcceptedOperation),
    Batch(AcceptedBatch),
}

/// Send commands as CloudEvents
///
/// CloudEvents 1.0 HTTP binding: structured mode (`application/cloudevents+json`),
/// batch mode (`application/cloudevents-batch+json`; all events or none), or binary
/// mode (attributes in `ce-*` headers, data in the body with its own Content-Type).
/// `202` only once RabbitMQ confirmed that every event is queued. `PUT` is the
/// same as `POST` (the document's PUT operation is this one, copied by
/// [`crate::openapi`]).
#[utoipa::path(
    post,
    path = "/events",
    tag = "commands",
    operation_id = "post_events",
    security(("bearer" = [])),
    params(
        ("ce-specversion" = Option<String>, Header, description = "Binary mode: `1.0`. Attribute values are percent-encoded."),
        ("ce-id" = Option<String>, Header, description = "Binary mode: the event id; (source, id) is the command key."),
        ("ce-source" = Option<String>, Header, description = "Binary mode: URI-reference under one of the tenant's sources."),
        ("ce-type" = Option<String>, Header, description = "Binary mode: the command type."),
        ("ce-dataschema" = Option<String>, Header, description = "Binary mode: the `$id` of the command's JSON Schema."),
        ("ce-time" = Option<String>, Header, description = "Binary mode: RFC 3339 timestamp."),
        ("ce-subject" = Option<String>, Header, description = "Binary mode: subject."),
        ("traceparent" = Option<String>, Header, description = "W3C trace context, carried to the queue as the AMQP header `traceparent`; the CloudEvent's own `traceparent` extension wins."),
    ),
    request_body(
        description = "One CloudEvent, a batch of them, or (binary mode) the event's data.",
        content(
            (CloudEventDoc = "application/cloudevents+json"),
            (Vec<CloudEventDoc> = "application/cloudevents-batch+json"),
            (Object = "application/json"),
        )
    ),
    responses(
        (status = 202, description = "Durably queued.", body = Accepted,
            headers(("location" = String, description = "`/operations/{id}`; single events only"))),
        (status = 400, description = "Not a valid CloudEvent (the attribute is named), unknown type or dataschema.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key may not send as this source, or this type.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch too large.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type or datacontenttype not supported.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`data` fails the command's schema (the JSON pointers are named).", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The key is over its rate limit.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64, description = "Seconds until a request will be allowed"))),
        (status = 503, description = "RabbitMQ unavailable: type `unavailable` (nothing queued) or `unconfirmed` (may be queued; retry the same event).", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64, description = "Seconds to wait before retrying"))),
    )
)]
async fn accept(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let response = match accept_inner(&state, &headers, body).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    };
    metrics::counter!("sluice_http_event_requests_total", "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

async fn accept_inner(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, Problem> {
    let caller = authenticate(state, headers)?;
    // Before the body is read: a flooding key costs the edge as little as possible.
    spend(&state.limiter, caller, "rate limit")?;
    let limit = state.config.max_body_bytes;
    let body =
        to_bytes(body, limit).await.map_err(|_| Problem::too_large(format!("the body exceeds {limit} bytes")))?;
    let events = read_events(headers, &body)?;
    if events.len() > state.config.max_batch {
        return Err(Problem::too_large(format!(
            "a batch holds at most {} events, this one {}",
            state.config.max_batch,
            events.len()
        )));
    }
    let batch = events.len() > 1 || is_batch(headers);
    let http_traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());

    let mut commands = Vec::with_capacity(events.len());
    // One span per command: a child of the trace the client sent, if any.
    let mut spans = Vec::with_capacity(events.len());
    let mut failures: Vec<(usize, Problem)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let extension = event.extensions.get("traceparent").and_then(Value::as_str);
        let received = trace_context::pick(extension, http_traceparent);
        let span = info_span!("sluice.ingest", tenant = %caller.tenant, r#type = %event.ty, id = %event.id);
        sluice_telemetry::set_parent(&span, received);
        match admit(state, caller, event, sluice_telemetry::onward(&span, received)) {
            Ok(command) => {
                commands.push(command);
                spans.push(span);
            }
            Err(problem) => failures.push((index, problem)),
        }
    }
    if let Some((_, first)) = failures.first() {
        if !batch {
            return Err(failures.remove(0).1);
        }
        let status = first.status_code();
        let errors = failures
            .iter()
            .map(|(i, p)| json!({"index": i, "status": p.status, "detail": p.detail, "errors": p.errors}))
            .collect();
        return Err(Problem::new(
            status,
            "batch-refused",
            "Batch refused",
            format!("{} of {} events refused; none was accepted", failures.len(), events.len()),
        )
        .with_errors(errors));
    }

    // Publish all, then answer: a 202 means every event was confirmed.
    let confirm_started = std::time::Instant::now();
    let publishes = commands.iter().zip(&spans).map(|(c, span)| state.queue.publish(c).instrument(span.clone()));
    let results = futures::future::join_all(publishes).await;
    metrics::histogram!("sluice_publish_confirm_seconds").record(confirm_started.elapsed().as_secs_f64());
    if results.iter().any(Result::is_err) {
        return Err(not_confirmed(caller, batch, &commands, &results));
    }

    let accepted: Vec<AcceptedOperation> = commands
        .iter()
        .map(|c| AcceptedOperation {
            operation_id: c.operation_id.clone(),
            status: "accepted",
            location: format!("/operations/{}", c.operation_id),
        })
        .collect();
    // One line per command: a debug line, or the edge writes ~300 bytes of
    // log for each one it accepts (27 MB in a four-minute quick bench).
    for (event, command) in events.iter().zip(&commands) {
        debug!(tenant = %caller.tenant, r#type = %event.ty, id = %event.id, operation = %command.operation_id, "accepted");
    }
    if batch {
        return Ok(
            (StatusCode::ACCEPTED, Json(Accepted::Batch(AcceptedBatch { operations: accepted }))).into_response()
        );
    }
    let one = accepted.into_iter().next().expect("one event was accepted");
    let location = HeaderValue::from_str(&one.location).expect("operation ids are hex");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(Accepted::One(one))).into_response())
}

/// The 503 after failed publishes: `unconfirmed` when any command may be
/// queued anyway, else `unavailable` (nothing of it is queued). A batch's
/// problem lists the events that are queued (with their operations) and
/// what became of the others: retrying the whole batch is safe, commands are
/// deduplicated by (source, id).
fn not_confirmed(
    caller: &Caller,
    batch: bool,
    commands: &[QueuedCommand],
    results: &[Result<(), QueueError>],
) -> Problem {
    let errors: Vec<&QueueError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    for e in &errors {
        warn!(tenant = %caller.tenant, error = %e, "publish failed");
    }
    let maybe_queued = errors.iter().any(|e| e.maybe_queued());
    let detail = match (maybe_queued, batch) {
        (true, _) => "RabbitMQ did not confirm in time; a command may or may not be queued. Retry the same CloudEvent (same source and id): it is deduplicated and keeps its operation.",
        (false, false) => "RabbitMQ is unavailable; nothing was queued. Retry later.",
        (false, true) => "RabbitMQ is unavailable; the events listed without an operation_id were not queued. Retry the batch later.",
    };
    let problem = if maybe_queued { Problem::unconfirmed(detail) } else { Problem::unavailable(detail) };
    if !batch {
        return problem;
    }
    let per_event = results
        .iter()
        .zip(commands)
        .enumerate()
        .map(|(i, (result, command))| match result {
            Ok(()) => json!({"index": i, "operation_id": command.operation_id}),
            Err(e) if e.maybe_queued() => {
                json!({"index": i, "problem": "not confirmed: may or may not be queued"})
            }
            Err(_) => json!({"index": i, "problem": "not queued"}),
        })
        .collect();
    problem.with_errors(per_event)
}

fn is_batch(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/cloudevents-batch+json"))
}

/// The edge's rules for one event: permission, schema, route. `traceparent`
/// goes on the AMQP message.
fn admit(
    state: &AppState,
    caller: &Caller,
    event: &CloudEvent,
    traceparent: Option<String>,
) -> Result<QueuedCommand, Problem> {
    if names::is_process_source(&caller.tenant, &event.source) {
        return Err(Problem::forbidden(format!(
            "source {} is reserved for the platform's process managers",
            event.source
        ))
        .at_attribute("source"));
    }
    if !caller.may_send_as(&event.source) {
        return Err(
            Problem::forbidden(format!("this key may not send as source {}", event.source)).at_attribute("source")
        );
    }
    let context = catalog::context_of_command(&event.ty)
        .ok_or_else(|| Problem::malformed(format!("unknown command type {}", event.ty)).at_attribute("type"))?;
    if !caller.may_send(&event.ty) {
        return Err(Problem::forbidden(format!("this key may not send {}", event.ty)).at_attribute("type"));
    }
    match &event.dataschema {
        Some(schema) => match state.schemas.type_of_schema(schema) {
            Some(ty) if ty == event.ty => {}
            Some(ty) => {
                return Err(Problem::malformed(format!("dataschema {schema} is the schema of {ty}, not {}", event.ty))
                    .at_attribute("dataschema"))
            }
            None => {
                return Err(
                    Problem::malformed(format!("dataschema {schema} is not a known schema")).at_attribute("dataschema")
                )
            }
        },
        None if state.config.require_dataschema => {
            return Err(Problem::malformed("dataschema is required").at_attribute("dataschema"))
        }
        None => {}
    }
    // The declared type first: XML sent in binary mode is told it is XML.
    if let Some(media) = &event.datacontenttype {
        let media = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if media != "application/json" && !media.ends_with("+json") {
            return Err(Problem::unsupported_media_type(format!("{} takes JSON data, not {media}", event.ty))
                .at_attribute("datacontenttype"));
        }
    }
    if event.data_base64.is_some() {
        return Err(Problem::unsupported_media_type(format!("{} takes JSON data, not binary data", event.ty))
            .at_attribute("datacontenttype"));
    }
    let data = event.data.as_ref().ok_or_else(|| {
        Problem::invalid_data(format!("{} needs data", event.ty))
            .with_errors(vec![json!({"pointer": "", "attribute": "data", "problem": "data is required"})])
    })?;
    state.schemas.validate(&event.ty, data).map_err(|errors| {
        let pointers: Vec<&str> =
            errors.iter().map(|e| if e.pointer.is_empty() { "/" } else { e.pointer.as_str() }).collect();
        Problem::invalid_data(format!("data fails its schema at {}", pointers.join(", ")))
            .with_errors(errors.iter().map(|e| json!({"pointer": e.pointer, "problem": e.problem})).collect())
    })?;

    // The schema requires the stream key as a string; checked anyway, so a
    // schema that forgot it cannot send every stream to one partition.
    let stream_key = catalog::stream_key(&event.ty, data)
        .ok_or_else(|| Problem::invalid_data(format!("{} needs its stream key as a string", event.ty)))?;
    let partition = names::command_partition(&caller.tenant, stream_key, state.partitions);
    let operation_id = state.operation_ids.issue(&caller.tenant, &event.source, &event.id);
    let mut headers = vec![
        ("cloudEvents:specversion".to_owned(), event.specversion.clone()),
        ("cloudEvents:id".to_owned(), event.id.clone()),
        ("cloudEvents:source".to_owned(), event.source.clone()),
        ("cloudEvents:type".to_owned(), event.ty.clone()),
    ];
    if let Some(traceparent) = traceparent {
        headers.push(("traceparent".to_owned(), traceparent));
    }
    Ok(QueuedCommand {
        routing_key: names::routing_key(&caller.tenant, context.name, partition),
        operation_id,
        tenant: caller.tenant.clone(),
        body: serde_json::to_vec(event).expect("a CloudEvent always serializes"),
        headers,
    })
}

/// The state of an operation
///
/// Never `404` for an id this API handed to the caller's tenant, even before
/// a processor picked the command up (`accepted`); `404` for ids of other
/// tenants and made-up ones.
#[utoipa::path(
    get,
    path = "/operations/{id}",
    tag = "reads",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "From the `Location` of the 202")),
    responses(
        (status = 200, description = "The operation.", body = OperationDoc),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not an operation of this tenant.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read store is unavailable.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
async fn operation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let caller = authenticate_read(&state, &headers)?;
    if !state.operation_ids.verify(&caller.tenant, &id) {
        return Err(Problem::not_found("no such operation"));
    }
    let row = state.reads.operation(&caller.tenant, &id).await.map_err(|e| {
        warn!(error = %e, "operation read failed");
        Problem::unavailable("the read store is unavailable")
    })?;
    let body = match row {
        Some(row) => {
            let mut body = serde_json::to_value(&row).unwrap_or_default();
            body["id"] = json!(id);
            if body["events"].is_null() {
                body["events"] = json!([]);
            }
            // Read-your-writes: has the read model applied this operation's
            // events? Absent while nothing was produced.
            // Each read model the events feed (the one of their topic's
            // context) says whether it applied them all.
            if let Some(events) = body["events"].as_array().filter(|e| !e.is_empty()) {
                let applied = state.reads.applied_offsets().await.unwrap_or_default();
                let mut read_models = serde_json::Map::new();
                for e in events {
                    let topic = e["topic"].as_str().unwrap_or_default();
                    let Some(context) = sluice_projections::apply::context_of(topic) else { continue };
                    let key = (topic.to_owned(), e["partition"].as_i64().unwrap_or(-1) as i32);
                    let applied =
                        applied.get(&key).is_some_and(|next| *next > e["offset"].as_i64().unwrap_or(i64::MAX));
                    let entry = read_models.entry(context.to_owned()).or_insert_with(|| json!({"caught_up": true}));
                    entry["caught_up"] = json!(entry["caught_up"].as_bool().unwrap_or(false) && applied);
                }
                body["read_models"] = Value::Object(read_models);
            }
            body
        }
        // Issued by us, not yet picked up by a processor.
        None => json!({"id": id, "status": "accepted", "events": []}),
    };
    Ok(Json(body).into_response())
}

/// An order, from the read model
#[utoipa::path(
    get,
    path = "/orders/{order_id}",
    tag = "reads",
    security(("bearer" = [])),
    params(("order_id" = String, Path)),
    responses(
        (status = 200, description = "The order.", body = OrderDoc),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order for this tenant.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read store is unavailable.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
async fn order(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Result<Response, Problem> {
    let caller = authenticate_read(&state, &headers)?;
    let view = state.reads.order(&caller.tenant, &order_id).await.map_err(|e| {
        warn!(error = %e, "order read failed");
        Problem::unavailable("the read store is unavailable")
    })?;
    match view {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(Problem::not_found(format!("no order {order_id}"))),
    }
}

/// The command types and their JSON Schemas (`dataschema` values)
#[utoipa::path(
    get,
    path = "/schemas/commands",
    tag = "schemas",
    responses((status = 200, description = "Every command type.", body = CommandSchemaList))
)]
async fn list_command_schemas(State(state): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = catalog::CONTEXTS
        .iter()
        .flat_map(|c| c.commands.iter().map(move |cmd| (c.name, cmd.ty)))
        .map(|(context, ty)| json!({"type": ty, "context": context, "id": state.schemas.default_schema_id(ty), "href": format!("/schemas/commands/{ty}")}))
        .collect();
    Json(json!({"schemas": list}))
}

/// The JSON Schema of one command type
#[utoipa::path(
    get,
    path = "/schemas/commands/{type}",
    tag = "schemas",
    params(("type" = String, Path, description = "A command type, e.g. `com.example.orders.SubmitOrder`")),
    responses(
        (status = 200, description = "The schema.", body = Object, content_type = "application/schema+json"),
        (status = 404, description = "No such command type.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn command_schema(Path(ty): Path<String>) -> Result<Response, Problem> {
    let spec = catalog::CONTEXTS
        .iter()
        .flat_map(|c| c.commands)
        .find(|c| c.ty == ty)
        .ok_or_else(|| Problem::not_found(format!("no schema for {ty}")))?;
    Ok(([(header::CONTENT_TYPE, "application/schema+json")], spec.schema).into_response())
}

/// Liveness: the process answers
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive.", body = HealthDoc)))]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: connected to RabbitMQ, so a command can be accepted
///
/// Each tenant's commands go to its own connection (a broker or a vhost,
/// see the configuration). `connections` lists them, without credentials,
/// with their tenants and whether each is up. While some but not all are
/// down the edge stays ready (`status: degraded`): it still accepts the
/// other tenants' commands, and another edge instance would not reach the
/// missing broker either.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready (`status: ready`), or some connections down (`status: degraded`; their tenants get 503).", body = HealthDoc),
        (status = 503, description = "No connection to RabbitMQ is up (reconnecting).", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let connections = state.queue.connections();
    let down: Vec<&str> = connections.iter().filter(|c| !c.ready).map(|c| c.connection.as_str()).collect();
    if down.len() == connections.len() {
        return Problem::unavailable(format!("not connected to RabbitMQ (reconnecting): {}", down.join(", ")))
            .into_response();
    }
    let status = if down.is_empty() { "ready" } else { "degraded" };
    Json(json!({"status": status, "connections": connections})).into_response()
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object))
)]
async fn openapi_json() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(crate::openapi::document_json);
    ([(header::CONTENT_TYPE, "application/json")], document.as_str()).into_response()
}

/// A patient's onboarding: its status and history of steps
///
/// Written by the patients projection from the `patients` events, among them
/// the reminders and the escalation the onboarding process sends.
#[utoipa::path(
    get,
    path = "/patients/{patient_id}/onboarding",
    tag = "reads",
    security(("bearer" = [])),
    params(("patient_id" = String, Path)),
    responses(
        (status = 200, description = "The onboarding.", body = crate::openapi::OnboardingDoc),
        (status = 401, description = "Missing or unknown API key.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No enrolled patient with this id for this tenant.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The read store is unavailable.", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = u64))),
    )
)]
pub(crate) async fn patient_onboarding(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(patient_id): Path<String>,
) -> Result<Response, Problem> {
    let caller = authenticate_read(&state, &headers)?;
    let view = state.reads.patient_onboarding(&caller.tenant, &patient_id).await.map_err(|e| {
        warn!(error = %e, "onboarding read failed");
        Problem::unavailable("the read store is unavailable")
    })?;
    match view {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(Problem::not_found(format!("no onboarding for patient {patient_id}"))),
    }
}
