//! The HTTP edge: CloudEvents in, operation URLs and read models out.
//!
//! - [`routes`]: the axum router and handlers; every route is listed once.
//! - [`openapi`]: the OpenAPI document, generated from the handlers.
//! - [`binding`]: CloudEvents HTTP binding (structured, binary, batch).
//! - [`auth`]: bearer API keys, hashed, compared in constant time.
//! - [`rate_limit`]: a token bucket per API key.
//! - [`queue`]: publishing with confirms; 202 only after the confirm;
//!   reconnects to RabbitMQ by itself.
//! - [`problem`]: RFC 9457 problem documents.
#![forbid(unsafe_code)]

pub mod auth;
pub mod binding;
pub mod cursor;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod queue;
pub mod rate_limit;
pub mod reads;
pub mod routes;

#[cfg(test)]
mod router_tests;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use sluice_projections::store::{
    CustomerOrderView, DaySales, OperationRow, OrderView, Page, QueryError, ReadModelError, ReadModels,
};
use sluice_schemas::catalog::CommandSchemas;

use crate::auth::{Keys, TenantConfig};
use crate::queue::CommandQueue;
use crate::rate_limit::{RateLimit, RateLimiter};
use sluice_schemas::operation_id::OperationIds;

/// Settings of the ingest role.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Requests per second each API key may make to `/events`, refilled
    /// continuously; a batch counts as one request (default 1000; 0 = no limit).
    pub rate_limit_per_second: f64,
    /// Requests a key may make at once after being idle (default 2000).
    pub rate_limit_burst: u32,
    /// Read requests per second each API key may make (operations, read
    /// models), in buckets of their own so reads never spend the writes'
    /// tokens (default 1000; 0 = no limit).
    pub read_rate_limit_per_second: f64,
    /// Read requests a key may make at once after being idle (default 2000).
    pub read_rate_limit_burst: u32,
    /// A request not received and handled within this is answered `408`
    /// (default 30 000).
    pub request_timeout_ms: u64,
    /// Connections held open at once; more wait until one closes
    /// (default 1024).
    pub max_connections: usize,
    /// The demo stack: serve with the published dev secret and demo keys on
    /// an address other machines can reach (default false: refused).
    pub demo: bool,
}

/// The operation secret of the demo configuration, published with sluice.
pub const DEV_OPERATION_SECRET: &str = "sluice-dev-operation-secret";

/// SHA-256 of the demo configuration's keys (`acme-dev-key`,
/// `globex-dev-key`), published with sluice.
pub const DEMO_KEY_SHA256: &[&str] = &[
    "7f2e6802f17f6ba210bb387707340e4fa6d03de0347ddcc5dd4ece4439694fce",
    "12cad79350669be6df490bdd33bd12237b1b5c2b917224bf9b70b380e35c3e95",
];

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8088".into(),
            max_body_bytes: 1 << 20,
            max_batch: 100,
            confirm_timeout_ms: 5_000,
            max_in_flight: 1024,
            require_dataschema: false,
            operation_secret: DEV_OPERATION_SECRET.into(),
            rate_limit_per_second: 1_000.0,
            rate_limit_burst: 2_000,
            read_rate_limit_per_second: 1_000.0,
            read_rate_limit_burst: 2_000,
            request_timeout_ms: 30_000,
            max_connections: 1_024,
            demo: false,
        }
    }
}

/// The reads the edge serves, behind a trait so routes test without a database.
pub trait Reads: Send + Sync {
    fn order<'a>(
        &'a self,
        tenant: &'a str,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<OrderView>, ReadModelError>>;
    fn operation<'a>(
        &'a self,
        tenant: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<OperationRow>, ReadModelError>>;
    fn customer_orders<'a>(
        &'a self,
        tenant: &'a str,
        customer_id: &'a str,
        limit: i32,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Page<CustomerOrderView>, QueryError>>;
    fn daily_sales<'a>(
        &'a self,
        tenant: &'a str,
        from_ms: i64,
        to_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<DaySales>, ReadModelError>>;
    /// Next offset the serving read models will apply, per (topic, partition).
    fn applied_offsets(&self) -> BoxFuture<'_, Result<sluice_projections::store::Offsets, ReadModelError>>;
    /// A patient's onboarding (patients projection). Defaults to "none", so
    /// test doubles that do not serve patients need not implement it.
    fn patient_onboarding<'a>(
        &'a self,
        _tenant: &'a str,
        _patient_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<sluice_projections::patients::OnboardingView>, ReadModelError>> {
        Box::pin(async { Ok(None) })
    }
}

impl Reads for ReadModels {
    fn order<'a>(
        &'a self,
        tenant: &'a str,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<OrderView>, ReadModelError>> {
        Box::pin(ReadModels::order(self, tenant, order_id))
    }
    fn operation<'a>(
        &'a self,
        tenant: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<OperationRow>, ReadModelError>> {
        Box::pin(ReadModels::operation(self, tenant, id))
    }
    fn customer_orders<'a>(
        &'a self,
        tenant: &'a str,
        customer_id: &'a str,
        limit: i32,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Page<CustomerOrderView>, QueryError>> {
        Box::pin(ReadModels::customer_orders(self, tenant, customer_id, limit, cursor))
    }
    fn daily_sales<'a>(
        &'a self,
        tenant: &'a str,
        from_ms: i64,
        to_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<DaySales>, ReadModelError>> {
        Box::pin(ReadModels::daily_sales(self, tenant, from_ms, to_ms))
    }
    fn applied_offsets(&self) -> BoxFuture<'_, Result<sluice_projections::store::Offsets, ReadModelError>> {
        Box::pin(ReadModels::applied_offsets(self))
    }
    fn patient_onboarding<'a>(
        &'a self,
        tenant: &'a str,
        patient_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<sluice_projections::patients::OnboardingView>, ReadModelError>> {
        Box::pin(ReadModels::patient_onboarding(self, tenant, patient_id))
    }
}

/// Everything a handler needs, shared.
pub struct AppState {
    pub config: IngestConfig,
    pub keys: Keys,
    pub schemas: CommandSchemas,
    pub operation_ids: OperationIds,
    /// Signs the listing cursors handed out.
    pub cursors: cursor::Cursors,
    /// One token bucket per key in `keys`, so one key's flood spends only its own tokens.
    pub limiter: RateLimiter,
    /// The same per key for the read routes.
    pub read_limiter: RateLimiter,
    pub queue: Arc<dyn CommandQueue>,
    pub reads: Arc<dyn Reads>,
    /// Partitions of every context's commands (`amqp.partitions`): a
    /// command goes to the one its stream key hashes to.
    pub partitions: u16,
}

impl AppState {
    /// Builds the edge's state from its configuration; every invalid field
    /// is reported at once.
    pub fn new(
        config: IngestConfig,
        tenants: &[TenantConfig],
        partitions: u16,
        queue: Arc<dyn CommandQueue>,
        reads: Arc<dyn Reads>,
    ) -> Result<Self, String> {
        let mut problems = Vec::new();
        let keys = Keys::new(tenants).map_err(|e| problems.push(e)).ok();
        let limit = RateLimit::new(config.rate_limit_per_second, config.rate_limit_burst)
            .map_err(|e| problems.push(format!("ingest.{e}")))
            .ok();
        let read_limit = RateLimit::new(config.read_rate_limit_per_second, config.read_rate_limit_burst)
            .map_err(|e| problems.push(format!("ingest.read_{e}")))
            .ok();
        if config.max_batch == 0 {
            problems.push("ingest.max_batch must be at least 1".into());
        }
        if config.max_in_flight == 0 {
            problems.push("ingest.max_in_flight must be at least 1".into());
        }
        if partitions == 0 {
            problems.push("amqp.partitions must be at least 1".into());
        }
        let (Some(keys), Some(limit), Some(read_limit), true) = (keys, limit, read_limit, problems.is_empty()) else {
            return Err(problems.join("; "));
        };
        Ok(Self {
            limiter: RateLimiter::new(limit, keys.len()),
            read_limiter: RateLimiter::new(read_limit, keys.len()),
            keys,
            schemas: CommandSchemas::load(),
            operation_ids: OperationIds::new(&config.operation_secret),
            cursors: cursor::Cursors::new(&config.operation_secret),
            queue,
            reads,
            partitions,
            config,
        })
    }
}
