//! The event store: one stream per aggregate in the CQL store. A command
//! partition's owner writes its streams' events plainly ([`EventStore::write`]):
//! the command journal already took the decision, fenced by ownership.
//! Process-manager streams, written by whoever consumes the triggering
//! record, are appended with a lightweight transaction on the next version
//! (optimistic concurrency, [`EventStore::append`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::TryStreamExt;

use scylla::client::session::Session;
use scylla::statement::batch::BatchType;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, Row};
use serde_json::Value;
use sluice_streams::group_commit::GroupCommit;
use sluice_streams::prepared::prepare_read;
use sluice_streams::replicas;

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
    /// Loads several streams, each as [`EventStore::load`] does, in as few
    /// requests as the store allows; the histories in the order of
    /// `streams`.
    fn load_all(
        &self,
        streams: &[StreamRef<'_>],
    ) -> impl Future<Output = Result<Vec<Vec<StoredEvent>>, StoreError>> + Send {
        futures::future::try_join_all(streams.iter().map(|stream| self.load(*stream)))
    }
    /// Appends events whose versions continue the stream; all or nothing.
    fn append(
        &self,
        stream: StreamRef<'_>,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<Append, StoreError>> + Send;
    /// Writes events a partition owner journaled (idempotent: the same
    /// rows each time).
    fn write(
        &self,
        stream: StreamRef<'_>,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Writes several streams' journaled events, each stream's as
    /// [`EventStore::write`] does, in as few requests as the store allows
    /// (the CQL store: with the other writes that come while one is in
    /// flight, [`GroupCommit`]).
    fn write_all(
        &self,
        streams: &[(StreamRef<'_>, &[StoredEvent])],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            futures::future::try_join_all(streams.iter().map(|(stream, events)| self.write(*stream, events))).await?;
            Ok(())
        }
    }
}

/// Rows in one write of several streams (a stream's rows stay together).
const ROWS_PER_WRITE: usize = 32;

/// Streams in one read of several.
const STREAMS_PER_READ: usize = 32;

pub struct CqlEventStore {
    session: Arc<Session>,
    load: PreparedStatement,
    insert: PreparedStatement,
    upsert: PreparedStatement,
    /// Journaled streams' rows ([`EventStore::write_all`]): the rounds of a
    /// processor's partitions that come together share the requests.
    grouped: GroupCommit<Vec<EventValues>>,
    /// Streams loaded by [`EventStore::load_all`]: the rounds that come
    /// together share the reads.
    loads: GroupCommit<StreamKey, Arc<Histories>>,
}

/// A stream by (tenant, context, stream id).
type StreamKey = (String, String, String);
/// What a group of loads found: each stream's events in version order (a
/// stream with none is absent).
type Histories = HashMap<StreamKey, Vec<StoredEvent>>;

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl CqlEventStore {
    pub async fn new(session: Arc<Session>) -> Result<Self, StoreError> {
        let load = prepare_read(
            &session,
            "SELECT version, event_id, event_type, payload, command_key, operation_id, recorded_at \
             FROM events WHERE tenant = ? AND context = ? AND stream_id = ?",
        )
        .await
        .map_err(store_err)?;
        let load_many = prepare_read(
            &session,
            "SELECT stream_id, version, event_id, event_type, payload, command_key, operation_id, recorded_at \
             FROM events WHERE tenant = ? AND context = ? AND stream_id IN ?",
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
        let upsert = session
            .prepare(
                "INSERT INTO events (tenant, context, stream_id, version, event_id, event_type, payload, \
                 command_key, operation_id, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .await
            .map_err(store_err)?;
        let grouped = {
            let (session, upsert) = (session.clone(), upsert.clone());
            GroupCommit::new("events", move |streams| write_streams(session.clone(), upsert.clone(), streams))
        };
        let loads = {
            let (session, load) = (session.clone(), load.clone());
            GroupCommit::new("event_reads", move |streams| {
                read_streams(session.clone(), load.clone(), load_many.clone(), streams)
            })
        };
        Ok(Self { session, load, insert, upsert, grouped, loads })
    }
}

/// Writes streams' rows: streams on the same replicas share a batch; each
/// stream's rows stay in one, which is applied whole (one partition).
async fn write_streams(
    session: Arc<Session>,
    upsert: PreparedStatement,
    streams: Vec<Vec<EventValues>>,
) -> Result<(), String> {
    let cluster = session.get_cluster_state();
    let batches = replicas::batches(streams, ROWS_PER_WRITE, |row| replicas::of(&cluster, &upsert, row));
    let writes = batches.into_iter().map(|values| {
        let (session, upsert) = (&session, &upsert);
        async move {
            let batch = replicas::batch_of(BatchType::Unlogged, upsert, values.len());
            session.batch(&batch, values).await
        }
    });
    futures::future::try_join_all(writes).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Loads streams: streams on the same replicas share a read (one partition
/// key list, `IN`); each stream is read once, however often it is asked for.
async fn read_streams(
    session: Arc<Session>,
    load: PreparedStatement,
    load_many: PreparedStatement,
    streams: Vec<StreamKey>,
) -> Result<Arc<Histories>, String> {
    let cluster = session.get_cluster_state();
    let mut seen = std::collections::HashSet::new();
    let units = streams.into_iter().filter(|key| seen.insert(key.clone())).map(|key| vec![key]);
    let groups = replicas::batches(units, STREAMS_PER_READ, |key| {
        let (tenant, context, stream_id) = key;
        (tenant.clone(), context.clone(), replicas::of(&cluster, &load, &(tenant, context, stream_id)))
    });
    let reads = groups.into_iter().map(|keys| {
        let (session, load_many) = (&session, &load_many);
        async move {
            let (tenant, context) = (&keys[0].0, &keys[0].1);
            let ids: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
            let pager = session.execute_iter(load_many.clone(), (tenant, context, ids)).await;
            let rows = pager.map_err(store_err)?.rows_stream::<StreamEventRow>().map_err(store_err)?;
            let rows: Vec<StreamEventRow> = rows.try_collect().await.map_err(store_err)?;
            Ok::<_, StoreError>((tenant.clone(), context.clone(), rows))
        }
    });
    let mut found = Histories::new();
    for (tenant, context, rows) in futures::future::try_join_all(reads).await.map_err(|e| e.to_string())? {
        for (stream_id, version, event_id, event_type, payload, command_key, operation_id, at) in rows {
            let row = (version, event_id, event_type, payload, command_key, operation_id, at);
            let event = stored(row).map_err(|e| e.to_string())?;
            found.entry((tenant.clone(), context.clone(), stream_id)).or_default().push(event);
        }
    }
    for history in found.values_mut() {
        history.sort_by_key(|e| e.version);
    }
    Ok(Arc::new(found))
}

type EventRow = (i64, String, String, String, String, String, CqlTimestamp);
/// An [`EventRow`] with its stream id first.
type StreamEventRow = (String, i64, String, String, String, String, String, CqlTimestamp);

fn stored(row: EventRow) -> Result<StoredEvent, StoreError> {
    let (version, event_id, event_type, payload, command_key, operation_id, recorded_at) = row;
    Ok(StoredEvent {
        version,
        event_id,
        event_type,
        payload: serde_json::from_str(&payload).map_err(store_err)?,
        command_key,
        operation_id,
        recorded_at_ms: recorded_at.0,
    })
}

impl EventStore for CqlEventStore {
    async fn load(&self, stream: StreamRef<'_>) -> Result<Vec<StoredEvent>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.load, (stream.tenant, stream.context, stream.stream_id))
            .await
            .map_err(store_err)?;
        let rows = result.into_rows_result().map_err(store_err)?;
        rows.rows::<EventRow>().map_err(store_err)?.map(|row| stored(row.map_err(store_err)?)).collect()
    }

    async fn load_all(&self, streams: &[StreamRef<'_>]) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
        let key = |s: &StreamRef<'_>| (s.tenant.to_owned(), s.context.to_owned(), s.stream_id.to_owned());
        let found = self.loads.send(streams.iter().map(key).collect()).await.map_err(store_err)?;
        let Some(found) = found else { return Ok(Vec::new()) };
        Ok(streams.iter().map(|s| found.get(&key(s)).cloned().unwrap_or_default()).collect())
    }

    async fn append(&self, stream: StreamRef<'_>, events: &[StoredEvent]) -> Result<Append, StoreError> {
        // A conditional batch within one partition is applied atomically: all
        // versions are new, or nothing is written.
        let batch = replicas::batch_of(BatchType::Logged, &self.insert, events.len());
        let result = self.session.batch(&batch, rows(stream, events)).await.map_err(store_err)?;
        let rows = result.into_rows_result().map_err(store_err)?;
        // The first column of an LWT result is `[applied]`.
        // On a conflict the row also carries the existing columns, so read it
        // untyped.
        let first = rows.rows::<Row>().map_err(store_err)?.next().transpose().map_err(store_err)?;
        let applied =
            matches!(first.and_then(|row| row.columns.into_iter().next().flatten()), Some(CqlValue::Boolean(true)));
        Ok(if applied { Append::Applied } else { Append::Conflict })
    }

    async fn write(&self, stream: StreamRef<'_>, events: &[StoredEvent]) -> Result<(), StoreError> {
        // One partition: the batch costs one write.
        let batch = replicas::batch_of(BatchType::Unlogged, &self.upsert, events.len());
        self.session.batch(&batch, rows(stream, events)).await.map_err(store_err)?;
        Ok(())
    }

    async fn write_all(&self, streams: &[(StreamRef<'_>, &[StoredEvent])]) -> Result<(), StoreError> {
        let units = streams.iter().map(|(stream, events)| rows(*stream, events)).collect();
        self.grouped.send(units).await.map(drop).map_err(store_err)
    }
}

/// The values of one event row, owned: a group commit holds them.
type EventValues = (String, String, String, i64, String, String, String, String, String, CqlTimestamp);

fn rows(stream: StreamRef<'_>, events: &[StoredEvent]) -> Vec<EventValues> {
    events
        .iter()
        .map(|event| {
            (
                stream.tenant.to_owned(),
                stream.context.to_owned(),
                stream.stream_id.to_owned(),
                event.version,
                event.event_id.clone(),
                event.event_type.clone(),
                event.payload.to_string(),
                event.command_key.clone(),
                event.operation_id.clone(),
                CqlTimestamp(event.recorded_at_ms),
            )
        })
        .collect()
}
