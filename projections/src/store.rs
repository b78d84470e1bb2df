//! Read models in the CQL store: the writes projections make and the queries
//! the edge serves. Reads touch only the CQL store, so they keep answering
//! while RabbitMQ, Kafka and the processors are down.

use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde::Serialize;
use serde_json::Value;

use crate::orders::OrderWrite;

#[derive(Debug, thiserror::Error)]
#[error("read model store: {0}")]
pub struct ReadModelError(pub String);

fn rm_err(e: impl std::fmt::Display) -> ReadModelError {
    ReadModelError(e.to_string())
}

/// An order as clients read it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderView {
    pub order_id: String,
    pub customer_id: Option<String>,
    pub status: Option<String>,
    pub currency: Option<String>,
    pub lines: Value,
    pub total_cents: Option<i64>,
    pub version: Option<i64>,
    pub submitted_at: Option<String>,
    pub updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
}

/// An operation as clients read it (the row the processors wrote).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperationRow {
    pub status: String,
    pub command_type: Option<String>,
    pub source: Option<String>,
    pub command_id: Option<String>,
    pub events: Option<Value>,
    pub error: Option<String>,
    pub updated_at: Option<String>,
}

fn rfc3339(ts: Option<CqlTimestamp>) -> Option<String> {
    ts.and_then(|t| chrono::DateTime::from_timestamp_millis(t.0)).map(|t| t.to_rfc3339())
}

pub struct ReadModels {
    session: Arc<Session>,
    insert_order: PreparedStatement,
    update_status: PreparedStatement,
    select_order: PreparedStatement,
    select_operation: PreparedStatement,
}

type OrderRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<String>,
    Option<String>,
);

type OpRow = (Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, Option<CqlTimestamp>);

impl ReadModels {
    pub async fn new(session: Arc<Session>) -> Result<Self, ReadModelError> {
        let insert_order = session
            .prepare(
                "INSERT INTO orders_by_id (tenant, order_id, customer_id, status, currency, lines, total_cents, \
                 version, submitted_at, updated_at) VALUES (?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            )
            .await
            .map_err(rm_err)?;
        let update_status = session
            .prepare(
                "UPDATE orders_by_id USING TIMESTAMP ? SET status = ?, version = ?, updated_at = ?, \
                 cancel_reason = ?, carrier = ?, tracking_number = ? WHERE tenant = ? AND order_id = ?",
            )
            .await
            .map_err(rm_err)?;
        let select_order = session
            .prepare(
                "SELECT order_id, customer_id, status, currency, lines, total_cents, version, submitted_at, \
                 updated_at, carrier, tracking_number, cancel_reason FROM orders_by_id WHERE tenant = ? AND order_id = ?",
            )
            .await
            .map_err(rm_err)?;
        let select_operation = session
            .prepare(
                "SELECT status, command_type, source, command_id, events, error, updated_at FROM operations \
                 WHERE tenant = ? AND operation_id = ?",
            )
            .await
            .map_err(rm_err)?;
        Ok(Self { session, insert_order, update_status, select_order, select_operation })
    }

    /// Applies one order write. The write timestamp is the stream version, so
    /// a later version always wins and a repeated write changes nothing.
    pub async fn write_order(&self, tenant: &str, write: &OrderWrite) -> Result<(), ReadModelError> {
        match write {
            OrderWrite::Submitted { order_id, customer_id, currency, lines, total_cents, at_ms, version } => {
                let lines = serde_json::to_string(lines).map_err(rm_err)?;
                let at = CqlTimestamp(*at_ms);
                self.session
                    .execute_unpaged(
                        &self.insert_order,
                        (tenant, order_id, customer_id, currency, lines, total_cents, version, at, at, version),
                    )
                    .await
                    .map_err(rm_err)?;
            }
            OrderWrite::StatusChanged { order_id, status, at_ms, version, cancel_reason, shipment } => {
                let (carrier, tracking) = match shipment {
                    Some((c, t)) => (Some(c.as_str()), Some(t.as_str())),
                    None => (None, None),
                };
                self.session
                    .execute_unpaged(
                        &self.update_status,
                        (version, *status, version, CqlTimestamp(*at_ms), cancel_reason, carrier, tracking, tenant, order_id),
                    )
                    .await
                    .map_err(rm_err)?;
            }
        }
        Ok(())
    }

    pub async fn order(&self, tenant: &str, order_id: &str) -> Result<Option<OrderView>, ReadModelError> {
        let result = self.session.execute_unpaged(&self.select_order, (tenant, order_id)).await.map_err(rm_err)?;
        let rows = result.into_rows_result().map_err(rm_err)?;
        let Some(row) = rows.maybe_first_row::<OrderRow>().map_err(rm_err)? else {
            return Ok(None);
        };
        let (order_id, customer_id, status, currency, lines, total_cents, version, submitted_at, updated_at, carrier, tracking_number, cancel_reason) = row;
        // A status update that arrives before its submission (replay out of
        // order) leaves a row without customer: not an order yet.
        if customer_id.is_none() {
            return Ok(None);
        }
        Ok(Some(OrderView {
            order_id,
            customer_id,
            status,
            currency,
            lines: lines.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or(Value::Null),
            total_cents,
            version,
            submitted_at: rfc3339(submitted_at),
            updated_at: rfc3339(updated_at),
            carrier,
            tracking_number,
            cancel_reason,
        }))
    }

    pub async fn operation(&self, tenant: &str, operation_id: &str) -> Result<Option<OperationRow>, ReadModelError> {
        let result = self.session.execute_unpaged(&self.select_operation, (tenant, operation_id)).await.map_err(rm_err)?;
        let rows = result.into_rows_result().map_err(rm_err)?;
        let Some(row) = rows.maybe_first_row::<OpRow>().map_err(rm_err)? else {
            return Ok(None);
        };
        let (status, command_type, source, command_id, events, error, updated_at) = row;
        Ok(Some(OperationRow {
            status: status.unwrap_or_else(|| "processing".into()),
            command_type,
            source,
            command_id,
            events: events.and_then(|e| serde_json::from_str(&e).ok()),
            error,
            updated_at: rfc3339(updated_at),
        }))
    }
}
