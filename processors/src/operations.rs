//! Operation records: what became of each command the edge accepted. The edge
//! reads them (`GET /operations/{id}`); only processors write them.

use std::future::Future;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde::Serialize;

/// Where a produced event landed in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventPosition {
    #[serde(rename = "type")]
    pub event_type: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Processing { attempt: u32 },
    Succeeded(Vec<EventPosition>),
    Rejected(String),
    DeadLettered(String),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Processing { .. } => "processing",
            Status::Succeeded(_) => "succeeded",
            Status::Rejected(_) => "rejected",
            Status::DeadLettered(_) => "dead_lettered",
        }
    }

    /// States a redelivered command must not change: its effect happened.
    pub fn is_settled(name: &str) -> bool {
        matches!(name, "succeeded" | "rejected")
    }
}

/// The command an operation is about.
#[derive(Debug, Clone, Copy)]
pub struct OperationRef<'a> {
    pub tenant: &'a str,
    pub operation_id: &'a str,
    pub command_type: &'a str,
    pub source: &'a str,
    pub command_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("operation store: {0}")]
pub struct OperationError(pub String);

pub trait OperationStore: Send + Sync {
    /// The recorded status name, if any.
    fn status(
        &self,
        tenant: &str,
        operation_id: &str,
    ) -> impl Future<Output = Result<Option<String>, OperationError>> + Send;
    fn record(&self, op: OperationRef<'_>, status: &Status) -> impl Future<Output = Result<(), OperationError>> + Send;
}

pub struct CqlOperationStore {
    session: Arc<Session>,
    /// Which processor instance wrote a record (`handled_by`), for ops.
    instance: String,
    select: PreparedStatement,
    upsert: PreparedStatement,
}

fn op_err(e: impl std::fmt::Display) -> OperationError {
    OperationError(e.to_string())
}

impl CqlOperationStore {
    pub async fn new(session: Arc<Session>, instance: &str) -> Result<Self, OperationError> {
        let select = session
            .prepare("SELECT status FROM operations WHERE tenant = ? AND operation_id = ?")
            .await
            .map_err(op_err)?;
        let upsert = session
            .prepare(
                "INSERT INTO operations (tenant, operation_id, status, command_type, source, command_id, \
                 events, error, updated_at, attempts, handled_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .await
            .map_err(op_err)?;
        Ok(Self { session, instance: instance.to_owned(), select, upsert })
    }
}

impl OperationStore for CqlOperationStore {
    async fn status(&self, tenant: &str, operation_id: &str) -> Result<Option<String>, OperationError> {
        let result = self.session.execute_unpaged(&self.select, (tenant, operation_id)).await.map_err(op_err)?;
        let rows = result.into_rows_result().map_err(op_err)?;
        let row = rows.maybe_first_row::<(Option<String>,)>().map_err(op_err)?;
        Ok(row.and_then(|(status,)| status))
    }

    async fn record(&self, op: OperationRef<'_>, status: &Status) -> Result<(), OperationError> {
        let attempts = match status {
            Status::Processing { attempt } => Some(i32::try_from(*attempt).unwrap_or(i32::MAX)),
            _ => None,
        };
        let (events, error) = match status {
            Status::Processing { .. } => (None, None),
            Status::Succeeded(positions) => (Some(serde_json::to_string(positions).map_err(op_err)?), None),
            Status::Rejected(reason) | Status::DeadLettered(reason) => (None, Some(reason.clone())),
        };
        let now = CqlTimestamp(chrono::Utc::now().timestamp_millis());
        self.session
            .execute_unpaged(
                &self.upsert,
                (
                    op.tenant,
                    op.operation_id,
                    status.name(),
                    op.command_type,
                    op.source,
                    op.command_id,
                    events,
                    error,
                    now,
                    attempts,
                    self.instance.as_str(),
                ),
            )
            .await
            .map_err(op_err)?;
        Ok(())
    }
}
