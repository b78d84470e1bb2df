//! The event store: one stream per aggregate in the CQL store, appended with a
//! lightweight transaction on the next version (optimistic concurrency).

use std::future::Future;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, Row};
use serde_json::Value;

/// An event as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub version: i64,
    pub event_id: String,
    pub event_type: String,
    pub payload: Value,
    /// The (source, id) of the command that caused it: redeliveries find it.
    pub command_key: String,
    pub operation_id: String,
    pub recorded_at_ms: i64,
    /// Kafka confirmed it (false until then, and for events just decided).
    pub produced: bool,
}

/// Identifies one stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamRef<'a> {
    pub tenant: &'a str,
    pub context: &'a str,
    pub stream_id: &'a str,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Append {
    Applied,
    /// Someone else appended first: reload and decide again.
    Conflict,
}

/// The store failed (down, timeout): the command is retried with backoff.
#[derive(Debug, thiserror::Error)]
#[error("event store: {0}")]
pub struct StoreError(pub String);

pub trait EventStore: Send + Sync {
    fn load(&self, stream: StreamRef<'_>) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;
    /// Appends events whose versions continue the stream; all or nothing.
    fn append(
        &self,
        stream: StreamRef<'_>,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<Append, StoreError>> + Send;
    /// Marks an event as confirmed by Kafka.
    fn mark_produced(&self, stream: StreamRef<'_>, version: i64)
        -> impl Future<Output = Result<(), StoreError>> + Send;
}

pub struct CqlEventStore {
    session: Arc<Session>,
    load: PreparedStatement,
    insert: PreparedStatement,
    mark: PreparedStatement,
}

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl CqlEventStore {
    pub async fn new(session: Arc<Session>) -> Result<Self, StoreError> {
        let load = session
            .prepare(
                "SELECT version, event_id, event_type, payload, command_key, operation_id, recorded_at, produced \
                 FROM events WHERE tenant = ? AND context = ? AND stream_id = ?",
            )
            .await
            .map_err(store_err)?;
        let insert = session
            .prepare(
                "INSERT INTO events (tenant, context, stream_id, version, event_id, event_type, payload, \
                 command_key, operation_id, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await
            .map_err(store_err)?;
        let mark = session
            .prepare(
                "UPDATE events SET produced = true WHERE tenant = ? AND context = ? AND stream_id = ? AND version = ?",
            )
            .await
            .map_err(store_err)?;
        Ok(Self { session, load, insert, mark })
    }
}

type EventRow = (i64, String, String, String, String, String, CqlTimestamp, Option<bool>);

impl EventStore for CqlEventStore {
    async fn load(&self, stream: StreamRef<'_>) -> Result<Vec<StoredEvent>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.load, (stream.tenant, stream.context, stream.stream_id))
            .await
            .map_err(store_err)?;
        let rows = result.into_rows_result().map_err(store_err)?;
        rows.rows::<EventRow>()
            .map_err(store_err)?
            .map(|row| {
                let (version, event_id, event_type, payload, command_key, operation_id, recorded_at, produced) =
                    row.map_err(store_err)?;
                Ok(StoredEvent {
                    version,
                    event_id,
                    event_type,
                    payload: serde_json::from_str(&payload).map_err(store_err)?,
                    command_key,
                    operation_id,
                    recorded_at_ms: recorded_at.0,
                    produced: produced.unwrap_or(false),
                })
            })
            .collect()
    }

    async fn append(&self, stream: StreamRef<'_>, events: &[StoredEvent]) -> Result<Append, StoreError> {
        // A conditional batch within one partition is applied atomically: all
        // versions are new, or nothing is written.
        let mut batch = Batch::new(BatchType::Logged);
        let mut values = Vec::with_capacity(events.len());
        for event in events {
            batch.append_statement(self.insert.clone());
            values.push((
                stream.tenant,
                stream.context,
                stream.stream_id,
                event.version,
                event.event_id.as_str(),
                event.event_type.as_str(),
                event.payload.to_string(),
                event.command_key.as_str(),
                event.operation_id.as_str(),
                CqlTimestamp(event.recorded_at_ms),
            ));
        }
        let result = self.session.batch(&batch, values).await.map_err(store_err)?;
        let rows = result.into_rows_result().map_err(store_err)?;
        // The first column of an LWT result is `[applied]`.
        // On a conflict the row also carries the existing columns, so read it
        // untyped.
        let first = rows.rows::<Row>().map_err(store_err)?.next().transpose().map_err(store_err)?;
        let applied =
            matches!(first.and_then(|row| row.columns.into_iter().next().flatten()), Some(CqlValue::Boolean(true)));
        Ok(if applied { Append::Applied } else { Append::Conflict })
    }

    async fn mark_produced(&self, stream: StreamRef<'_>, version: i64) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.mark, (stream.tenant, stream.context, stream.stream_id, version))
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
