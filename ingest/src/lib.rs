//! The HTTP edge: CloudEvents in, operation URLs and read models out.
//!
//! - [`routes`]: the axum router and handlers.
//! - [`binding`]: CloudEvents HTTP binding (structured, binary, batch).
//! - [`auth`]: bearer API keys, hashed, compared in constant time.
//! - [`operation_id`]: signed operation ids (no write on the hot path).
//! - [`queue`]: publishing with confirms; 202 only after the confirm.
//! - [`problem`]: RFC 9457 problem documents.
#![forbid(unsafe_code)]

pub mod auth;
pub mod binding;
pub mod operation_id;
pub mod problem;
pub mod queue;
pub mod routes;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use sluice_projections::store::{OperationRow, OrderView, ReadModelError, ReadModels};
use sluice_schemas::catalog::CommandSchemas;

use crate::auth::Keys;
use crate::operation_id::OperationIds;
use crate::queue::CommandQueue;

/// Settings of the ingest role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Where the edge listens (default 127.0.0.1:8088; `SLUICE_HTTP_ADDR`).
    pub http_addr: String,
    /// Largest request body accepted (default 1 MiB).
    pub max_body_bytes: usize,
    /// Most events in one batch (default 100).
    pub max_batch: usize,
    /// How long to wait for RabbitMQ's confirm before answering 503 (default 5000).
    pub confirm_timeout_ms: u64,
    /// Publishes awaiting a confirm at once (default 1024).
    pub max_in_flight: usize,
    /// Refuse events without `dataschema` (default false: the type's default schema applies).
    pub require_dataschema: bool,
    /// Secret signing operation ids; set it in production (`SLUICE_INGEST__OPERATION_SECRET`).
    pub operation_secret: String,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8088".into(),
            max_body_bytes: 1 << 20,
            max_batch: 100,
            confirm_timeout_ms: 5_000,
            max_in_flight: 1024,
            require_dataschema: false,
            operation_secret: "sluice-dev-operation-secret".into(),
        }
    }
}

/// The reads the edge serves, behind a trait so routes test without a database.
pub trait Reads: Send + Sync {
    fn order<'a>(&'a self, tenant: &'a str, order_id: &'a str) -> BoxFuture<'a, Result<Option<OrderView>, ReadModelError>>;
    fn operation<'a>(&'a self, tenant: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<OperationRow>, ReadModelError>>;
}

impl Reads for ReadModels {
    fn order<'a>(&'a self, tenant: &'a str, order_id: &'a str) -> BoxFuture<'a, Result<Option<OrderView>, ReadModelError>> {
        Box::pin(ReadModels::order(self, tenant, order_id))
    }
    fn operation<'a>(&'a self, tenant: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<OperationRow>, ReadModelError>> {
        Box::pin(ReadModels::operation(self, tenant, id))
    }
}

/// Everything a handler needs, shared.
pub struct AppState {
    pub config: IngestConfig,
    pub keys: Keys,
    pub schemas: CommandSchemas,
    pub operation_ids: OperationIds,
    pub queue: Arc<dyn CommandQueue>,
    pub reads: Arc<dyn Reads>,
}
