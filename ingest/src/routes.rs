//! The HTTP routes: commands in (`/events`), reads out (operations, read
//! models), health. Handlers translate; the rules live in the modules they call.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sluice_schemas::catalog;
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tracing::{info, warn};

use crate::auth::Caller;
use crate::binding::read_events;
use crate::problem::Problem;
use crate::queue::QueuedCommand;
use crate::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/events", post(accept).put(accept))
        .route("/operations/{id}", get(operation))
        .route("/orders/{order_id}", get(order))
        .route("/schemas/commands", get(list_command_schemas))
        .route("/schemas/commands/{ty}", get(command_schema))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .with_state(state)
}

fn authenticate<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Caller, Problem> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| Problem::unauthorized("send Authorization: Bearer <api key>"))?;
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Problem::unauthorized("Authorization must be: Bearer <api key>"))?;
    state.keys.authenticate(key).ok_or_else(|| Problem::unauthorized("unknown API key"))
}

/// `POST|PUT /events`: validate, route, publish with confirms, then 202.
async fn accept(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match accept_inner(&state, &headers, body).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

async fn accept_inner(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, Problem> {
    let caller = authenticate(state, headers)?;
    let limit = state.config.max_body_bytes;
    let body = to_bytes(body, limit)
        .await
        .map_err(|_| Problem::too_large(format!("the body exceeds {limit} bytes")))?;
    let events = read_events(headers, &body)?;
    if events.len() > state.config.max_batch {
        return Err(Problem::too_large(format!("a batch holds at most {} events", state.config.max_batch)));
    }
    let batch = events.len() > 1 || is_batch(headers);

    let mut commands = Vec::with_capacity(events.len());
    let mut failures: Vec<(usize, Problem)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        match admit(state, caller, event) {
            Ok(command) => commands.push(command),
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
        return Err(Problem::new(status, "batch-refused", "Batch refused", format!("{} of {} events refused; none was accepted", failures.len(), events.len()))
            .with_errors(errors));
    }

    // Publish all, then answer. A 202 means every event was confirmed.
    let results = futures::future::join_all(commands.iter().map(|c| state.queue.publish(c))).await;
    let failed: Vec<_> = results.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e))).collect();
    if !failed.is_empty() {
        for (_, e) in &failed {
            warn!(tenant = %caller.tenant, error = %e, "publish failed");
        }
        let queued: Vec<Value> = results
            .iter()
            .zip(&commands)
            .enumerate()
            .filter(|(_, (r, _))| r.is_ok())
            .map(|(i, (_, c))| json!({"index": i, "operation_id": c.operation_id}))
            .collect();
        // Events of a batch that were confirmed stay queued; retrying the
        // batch is safe because commands are deduplicated by (source, id).
        return Err(Problem::unavailable("the command queue did not confirm; retry later").with_errors(queued));
    }

    let accepted: Vec<Value> = commands
        .iter()
        .map(|c| json!({"operation_id": c.operation_id, "status": "accepted", "location": format!("/operations/{}", c.operation_id)}))
        .collect();
    for (event, command) in events.iter().zip(&commands) {
        info!(tenant = %caller.tenant, r#type = %event.ty, id = %event.id, operation = %command.operation_id, "accepted");
    }
    let mut response = if batch {
        (StatusCode::ACCEPTED, Json(json!({"operations": accepted}))).into_response()
    } else {
        (StatusCode::ACCEPTED, Json(accepted[0].clone())).into_response()
    };
    if !batch {
        let location = format!("/operations/{}", commands[0].operation_id);
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    Ok(response)
}

fn is_batch(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/cloudevents-batch+json"))
}

/// The edge's rules for one event: permission, schema, route.
fn admit(state: &AppState, caller: &Caller, event: &CloudEvent) -> Result<QueuedCommand, Problem> {
    if !caller.may_send_as(&event.source) {
        return Err(Problem::forbidden(format!("this key may not send as source {}", event.source)));
    }
    let context = catalog::context_of_command(&event.ty)
        .ok_or_else(|| Problem::malformed(format!("unknown command type {}", event.ty)))?;
    if !caller.may_send(&event.ty) {
        return Err(Problem::forbidden(format!("this key may not send {}", event.ty)));
    }
    match &event.dataschema {
        Some(schema) => match state.schemas.type_of_schema(schema) {
            Some(ty) if ty == event.ty => {}
            Some(ty) => return Err(Problem::malformed(format!("dataschema {schema} is the schema of {ty}, not {}", event.ty))),
            None => return Err(Problem::malformed(format!("dataschema {schema} is not a known schema"))),
        },
        None if state.config.require_dataschema => return Err(Problem::malformed("dataschema is required")),
        None => {}
    }
    if event.data_base64.is_some() {
        return Err(Problem::unsupported_media_type(format!("{} takes JSON data", event.ty)));
    }
    if let Some(media) = &event.datacontenttype {
        let media = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if media != "application/json" && !media.ends_with("+json") {
            return Err(Problem::unsupported_media_type(format!("{} takes JSON data, not {media}", event.ty)));
        }
    }
    let data = event.data.as_ref().ok_or_else(|| Problem::invalid_data(format!("{} needs data", event.ty)))?;
    state.schemas.validate(&event.ty, data).map_err(|errors| {
        let pointers: Vec<&str> = errors.iter().map(|e| if e.pointer.is_empty() { "/" } else { e.pointer.as_str() }).collect();
        Problem::invalid_data(format!("data fails its schema at {}", pointers.join(", ")))
            .with_errors(errors.iter().map(|e| json!({"pointer": e.pointer, "problem": e.problem})).collect())
    })?;

    let operation_id = state.operation_ids.issue(&caller.tenant, &event.source, &event.id);
    let mut headers = vec![
        ("cloudEvents:specversion".to_owned(), event.specversion.clone()),
        ("cloudEvents:id".to_owned(), event.id.clone()),
        ("cloudEvents:source".to_owned(), event.source.clone()),
        ("cloudEvents:type".to_owned(), event.ty.clone()),
    ];
    if let Some(traceparent) = event.extensions.get("traceparent").and_then(Value::as_str) {
        headers.push(("traceparent".to_owned(), traceparent.to_owned()));
    }
    Ok(QueuedCommand {
        routing_key: names::routing_key(&caller.tenant, context.name),
        operation_id,
        tenant: caller.tenant.clone(),
        body: serde_json::to_vec(event).expect("a CloudEvent always serializes"),
        headers,
    })
}

/// `GET /operations/{id}`: never 404 for an id handed to this tenant.
async fn operation(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, Problem> {
    let caller = authenticate(&state, &headers)?;
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
            body
        }
        // Issued by us, not yet picked up by a processor.
        None => json!({"id": id, "status": "accepted", "events": []}),
    };
    Ok(Json(body).into_response())
}

/// `GET /orders/{order_id}` from the read model.
async fn order(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(order_id): Path<String>) -> Result<Response, Problem> {
    let caller = authenticate(&state, &headers)?;
    let view = state.reads.order(&caller.tenant, &order_id).await.map_err(|e| {
        warn!(error = %e, "order read failed");
        Problem::unavailable("the read store is unavailable")
    })?;
    match view {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(Problem::not_found(format!("no order {order_id}"))),
    }
}

async fn list_command_schemas(State(state): State<Arc<AppState>>) -> Json<Value> {
    let list: Vec<Value> = catalog::CONTEXTS
        .iter()
        .flat_map(|c| c.commands.iter().map(move |cmd| (c.name, cmd.ty)))
        .map(|(context, ty)| json!({"type": ty, "context": context, "id": state.schemas.default_schema_id(ty), "href": format!("/schemas/commands/{ty}")}))
        .collect();
    Json(json!({"schemas": list}))
}

async fn command_schema(Path(ty): Path<String>) -> Result<Response, Problem> {
    let spec = catalog::CONTEXTS
        .iter()
        .flat_map(|c| c.commands)
        .find(|c| c.ty == ty)
        .ok_or_else(|| Problem::not_found(format!("no schema for {ty}")))?;
    Ok(([(header::CONTENT_TYPE, "application/schema+json")], spec.schema).into_response())
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.queue.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        Problem::unavailable("not connected to RabbitMQ").into_response()
    }
}
