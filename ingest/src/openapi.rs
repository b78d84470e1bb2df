//! The OpenAPI document of the edge (`GET /openapi.json`), generated at
//! compile time from the `#[utoipa::path]` attributes on the handlers in
//! [`crate::routes`]. The types here exist only to describe bodies whose Rust
//! types live in crates that do not depend on utoipa (the CloudEvent
//! envelope, the read models); the response types the edge itself builds are
//! described by their own definitions.

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::problem::{FieldError, Problem};
use crate::routes::{Accepted, AcceptedBatch, AcceptedOperation};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice",
        license(name = "Apache-2.0"),
        description = "Asynchronous command API: send every change as a CloudEvent, get 202 and an operation to poll; read models are served synchronously. Every request but health, schemas and this document carries `Authorization: Bearer <key>`; the key decides the tenant.",
    ),
    paths(
        crate::routes::accept,
        crate::routes::operation,
        crate::routes::order,
        crate::reads::customer_orders,
        crate::reads::daily_sales,
        crate::routes::patient_onboarding,
        crate::routes::list_command_schemas,
        crate::routes::command_schema,
        crate::routes::healthz,
        crate::routes::ready,
        crate::routes::openapi_json,
    ),
    components(schemas(
        Problem, FieldError, Accepted, AcceptedOperation, AcceptedBatch, CloudEventDoc, OperationDoc, ProducedEventDoc,
        OrderDoc, CommandSchemaList, CommandSchemaEntry, HealthDoc, CustomerOrdersDoc, CustomerOrderDoc, DailySalesDoc, DaySalesDoc,
        OnboardingDoc, OnboardingStepDoc
    )),
    modifiers(&BearerAuth, &PutEventsIsPostEvents),
    tags(
        (name = "commands", description = "Changes: CloudEvents in, 202 and an operation out"),
        (name = "reads", description = "Operations and read models"),
        (name = "schemas", description = "The JSON Schemas command data must satisfy"),
        (name = "health", description = "Liveness, readiness, this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key of the tenant; stored hashed on the server"))
                    .build(),
            ),
        );
    }
}

/// `PUT /events` is served by the same handler as `POST /events`; the
/// document says so with a copy of the POST operation under its own
/// operationId (operationIds must be unique, so `method(post, put)` on the
/// handler, which would repeat it, does not do).
struct PutEventsIsPostEvents;

impl Modify for PutEventsIsPostEvents {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(item) = openapi.paths.paths.get_mut("/events") {
            let mut put = item.post.clone().expect("POST /events is documented");
            put.operation_id = Some("put_events".into());
            item.put = Some(put);
        }
    }
}

/// The document as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub fn document_json() -> String {
    serde_json::to_string(&document()).expect("the OpenAPI document serializes")
}

/// A CloudEvent 1.0 in structured mode (JSON format).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // describes a body; never built
pub struct CloudEventDoc {
    /// `1.0`.
    pub specversion: String,
    /// Unique per source: a retry of the same (source, id) is the same command.
    pub id: String,
    /// URI-reference under one of the tenant's sources, e.g. `/acme/shop`.
    pub source: String,
    /// The command type, e.g. `com.example.orders.SubmitOrder`.
    #[serde(rename = "type")]
    pub ty: String,
    /// `application/json` or a `+json` type (commands take JSON data).
    pub datacontenttype: Option<String>,
    /// The `$id` of the type's JSON Schema (`GET /schemas/commands`); the
    /// type's default schema applies when absent.
    pub dataschema: Option<String>,
    pub subject: Option<String>,
    /// RFC 3339.
    pub time: Option<String>,
    /// The command; must satisfy the type's schema.
    #[schema(value_type = Object)]
    pub data: Option<Value>,
    /// W3C trace context (distributed-tracing extension).
    pub traceparent: Option<String>,
}

/// An operation: what became of one command.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OperationDoc {
    pub id: String,
    #[schema(pattern = "^(accepted|processing|succeeded|rejected|dead_lettered)$")]
    pub status: String,
    /// The domain events the command produced, where they landed.
    pub events: Vec<ProducedEventDoc>,
    /// Why it was rejected or dead-lettered.
    pub error: Option<String>,
    pub command_type: Option<String>,
    pub source: Option<String>,
    pub command_id: Option<String>,
    pub updated_at: Option<String>,
    /// Set on a `dead_lettered` operation whose command ops sent back: the
    /// URL of the new attempt's operation (this answer does not change).
    pub retried_as: Option<String>,
}

/// Where one domain event was written.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ProducedEventDoc {
    #[serde(rename = "type")]
    pub ty: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// An order from the read model.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OrderDoc {
    pub order_id: String,
    pub customer_id: Option<String>,
    /// `submitted`, `cancelled` or `shipped`.
    pub status: Option<String>,
    pub currency: Option<String>,
    #[schema(value_type = Object)]
    pub lines: Value,
    pub total_cents: Option<i64>,
    pub version: Option<i64>,
    pub submitted_at: Option<String>,
    pub updated_at: Option<String>,
    pub carrier: Option<String>,
    pub tracking_number: Option<String>,
    pub cancel_reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CommandSchemaList {
    pub schemas: Vec<CommandSchemaEntry>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CommandSchemaEntry {
    #[serde(rename = "type")]
    pub ty: String,
    pub context: String,
    /// The schema's `$id`: the value for `dataschema`.
    pub id: String,
    pub href: String,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct HealthDoc {
    /// `ok` or `ready`.
    pub status: String,
}

/// One page of a customer's orders.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CustomerOrdersDoc {
    pub items: Vec<CustomerOrderDoc>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CustomerOrderDoc {
    pub order_id: String,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub total_cents: Option<i64>,
    pub submitted_at: Option<String>,
    pub version: Option<i64>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct DailySalesDoc {
    pub days: Vec<DaySalesDoc>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct DaySalesDoc {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub orders: i64,
    pub total_cents: i64,
}

/// A patient's onboarding.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OnboardingDoc {
    pub patient_id: String,
    /// `enrolled`, `awaiting_assessment`, `escalated` or `completed`.
    pub status: String,
    pub reminders_sent: i64,
    pub escalated: bool,
    /// Stream version of the newest step.
    pub version: i64,
    /// Oldest first.
    pub steps: Vec<OnboardingStepDoc>,
}

/// One step of an onboarding.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OnboardingStepDoc {
    pub version: i64,
    /// `enrolled`, `assessment_scheduled`, `reminder_sent`, `escalated` or `assessment_completed`.
    pub step: String,
    pub detail: String,
    /// RFC 3339.
    pub at: String,
}
