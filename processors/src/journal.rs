//! The command journal: what a partition's owner decided, in order, fenced
//! by the partition's ownership epoch.
//!
//! One CQL partition per command partition. A processor takes a partition
//! over by raising its epoch ([`Journal::claim`], an LWT); it journals each
//! round of decisions in one batch conditional on that epoch
//! ([`Journal::append`]), so once a newer owner exists, the older one can
//! journal nothing more: it learns it was fenced and stops. Everything else
//! an owner writes (stream rows, operation records, Kafka) follows from
//! journal entries, and the next owner redoes what is past the relay
//! position before it decides anything, so a decision is never lost and
//! never taken twice.

use std::future::Future;
use std::sync::Arc;

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use serde::{Deserialize, Serialize};

use crate::amqp::consumer::PartitionRef;
use crate::event_store::StoredEvent;

/// One decided command.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Position in the partition's decision order.
    pub seq: i64,
    pub stream_id: String,
    pub command_key: String,
    pub operation_id: String,
    pub command_type: String,
    pub source: String,
    pub command_id: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The events the command appended to its stream.
    Appended(Vec<StoredEvent>),
    /// A business rule said no.
    Rejected(String),
}

/// The journal failed (down, timeout); after an append error the outcome is
/// unknown, so the owner reads the journal again before it goes on.
#[derive(Debug, thiserror::Error)]
#[error("command journal: {0}")]
pub struct JournalError(pub String);

#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Applied,
    /// A newer owner raised the epoch: this one may write nothing more.
    Fenced,
}

pub trait Journal: Send + Sync {
    /// Makes `owner` the partition's owner with a new epoch, returned.
    fn claim(&self, partition: &PartitionRef, owner: &str) -> impl Future<Output = Result<i64, JournalError>> + Send;
    /// The partition's current epoch.
    fn epoch(&self, partition: &PartitionRef) -> impl Future<Output = Result<i64, JournalError>> + Send;
    /// Entries from `seq` on, in order.
    fn entries_from(
        &self,
        partition: &PartitionRef,
        seq: i64,
    ) -> impl Future<Output = Result<Vec<Entry>, JournalError>> + Send;
    /// The last entry's seq and the relay position noted in the journal.
    fn ends(&self, partition: &PartitionRef) -> impl Future<Output = Result<JournalEnds, JournalError>> + Send;
    /// Journals `entries` if `epoch` is still the partition's: all or none.
    fn append(
        &self,
        partition: &PartitionRef,
        epoch: i64,
        entries: &[Entry],
    ) -> impl Future<Output = Result<Appended, JournalError>> + Send;
    /// Notes that entries before `next` are relayed, and drops those older
    /// than `trim_below`.
    fn relayed(
        &self,
        partition: &PartitionRef,
        next: i64,
        trim_below: Option<i64>,
    ) -> impl Future<Output = Result<(), JournalError>> + Send;
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalEnds {
    pub last_seq: Option<i64>,
    /// The next seq to relay, as last noted (the Kafka transaction's
    /// committed position is the authority; this is its fallback).
    pub relayed: Option<i64>,
}

/// An event as the journal keeps it.
#[derive(Serialize, Deserialize)]
struct JournaledEvent {
    version: i64,
    event_id: String,
    event_type: String,
    payload: serde_json::Value,
    recorded_at_ms: i64,
}

/// The journal in the CQL store (`command_journal`).
pub struct CqlJournal {
    session: Arc<Session>,
    read_epoch: PreparedStatement,
    raise_epoch: PreparedStatement,
    insert: PreparedStatement,
    select_from: PreparedStatement,
    last: PreparedStatement,
    note_relayed: PreparedStatement,
    trim: PreparedStatement,
}

fn journal_err(e: impl std::fmt::Display) -> JournalError {
    JournalError(e.to_string())
}

/// Journal rows live this long at most (seconds) even if never trimmed.
const ENTRY_TTL_S: i32 = 30 * 24 * 3600;

impl CqlJournal {
    pub async fn new(session: Arc<Session>) -> Result<Self, JournalError> {
        let prepare = |cql: &'static str| {
            let session = session.clone();
            async move { session.prepare(cql).await.map_err(journal_err) }
        };
        Ok(Self {
            read_epoch: prepare(
                "SELECT epoch FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? LIMIT 1",
            )
            .await?,
            raise_epoch: prepare(
                "UPDATE command_journal SET epoch = ?, owner = ? \
                 WHERE tenant = ? AND context = ? AND partition = ? IF epoch = ?",
            )
            .await?,
            insert: prepare(
                "INSERT INTO command_journal (tenant, context, partition, seq, stream_id, command_key, \
                 operation_id, command_type, source, command_id, rejection, events) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            )
            .await?,
            select_from: prepare(
                "SELECT seq, stream_id, command_key, operation_id, command_type, source, command_id, rejection, \
                 events FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? AND seq >= ?",
            )
            .await?,
            last: prepare(
                "SELECT seq, relayed FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? \
                 ORDER BY seq DESC LIMIT 1",
            )
            .await?,
            // The write timestamp is the position itself: a late note of an
            // older position never hides a newer one.
            note_relayed: prepare(
                "UPDATE command_journal USING TIMESTAMP ? SET relayed = ? \
                 WHERE tenant = ? AND context = ? AND partition = ?",
            )
            .await?,
            trim: prepare("DELETE FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? AND seq < ?")
                .await?,
            session,
        })
    }

    async fn current_epoch(&self, key: (&str, &str, i32)) -> Result<Option<i64>, JournalError> {
        let result = self.session.execute_unpaged(&self.read_epoch, key).await.map_err(journal_err)?;
        let rows = result.into_rows_result().map_err(journal_err)?;
        Ok(rows.maybe_first_row::<(Option<i64>,)>().map_err(journal_err)?.and_then(|(epoch,)| epoch))
    }
}

fn key(partition: &PartitionRef) -> (&str, &str, i32) {
    (partition.tenant.as_str(), partition.context, i32::from(partition.partition))
}

/// The `[applied]` column of an LWT's answer.
fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, JournalError> {
    let rows = result.into_rows_result().map_err(journal_err)?;
    let first = rows.rows::<Row>().map_err(journal_err)?.next().transpose().map_err(journal_err)?;
    Ok(matches!(first.and_then(|row| row.columns.into_iter().next().flatten()), Some(CqlValue::Boolean(true))))
}

type EntryRow = (i64, String, String, String, String, String, String, Option<String>, Option<String>);

impl Journal for CqlJournal {
    async fn claim(&self, partition: &PartitionRef, owner: &str) -> Result<i64, JournalError> {
        let (tenant, context, p) = key(partition);
        loop {
            let current = self.current_epoch((tenant, context, p)).await?;
            let next = current.unwrap_or(0) + 1;
            let result = self
                .session
                .execute_unpaged(&self.raise_epoch, (next, owner, tenant, context, p, current))
                .await
                .map_err(journal_err)?;
            if applied(result)? {
                return Ok(next);
            }
            // Another claim came in between: read again and go above it.
        }
    }

    async fn epoch(&self, partition: &PartitionRef) -> Result<i64, JournalError> {
        Ok(self.current_epoch(key(partition)).await?.unwrap_or(0))
    }

    async fn entries_from(&self, partition: &PartitionRef, seq: i64) -> Result<Vec<Entry>, JournalError> {
        let (tenant, context, p) = key(partition);
        let pager = self
            .session
            .execute_iter(self.select_from.clone(), (tenant, context, p, seq))
            .await
            .map_err(journal_err)?;
        let rows: Vec<EntryRow> =
            pager.rows_stream::<EntryRow>().map_err(journal_err)?.try_collect().await.map_err(journal_err)?;
        rows.into_iter()
            .map(|(seq, stream_id, command_key, operation_id, command_type, source, command_id, rejection, events)| {
                let verdict = match rejection {
                    Some(reason) => Verdict::Rejected(reason),
                    None => {
                        let events: Vec<JournaledEvent> =
                            serde_json::from_str(events.as_deref().unwrap_or("[]")).map_err(journal_err)?;
                        Verdict::Appended(
                            events
                                .into_iter()
                                .map(|e| StoredEvent {
                                    version: e.version,
                                    event_id: e.event_id,
                                    event_type: e.event_type,
                                    payload: e.payload,
                                    command_key: command_key.clone(),
                                    operation_id: operation_id.clone(),
                                    recorded_at_ms: e.recorded_at_ms,
                                })
                                .collect(),
                        )
                    }
                };
                Ok(Entry { seq, stream_id, command_key, operation_id, command_type, source, command_id, verdict })
            })
            .collect()
    }

    async fn ends(&self, partition: &PartitionRef) -> Result<JournalEnds, JournalError> {
        let result = self.session.execute_unpaged(&self.last, key(partition)).await.map_err(journal_err)?;
        let rows = result.into_rows_result().map_err(journal_err)?;
        let row = rows.maybe_first_row::<(Option<i64>, Option<i64>)>().map_err(journal_err)?;
        Ok(row.map(|(last_seq, relayed)| JournalEnds { last_seq, relayed }).unwrap_or_default())
    }

    async fn append(&self, partition: &PartitionRef, epoch: i64, entries: &[Entry]) -> Result<Appended, JournalError> {
        let (tenant, context, p) = key(partition);
        // One conditional batch within the partition: the epoch check and
        // every entry are applied together, or nothing is.
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.raise_epoch.clone());
        let owner: Option<&str> = None;
        let mut values: Vec<Box<dyn scylla::serialize::row::SerializeRow + Send + Sync>> =
            Vec::with_capacity(entries.len() + 1);
        values.push(Box::new((epoch, owner, tenant.to_owned(), context.to_owned(), p, Some(epoch))));
        for entry in entries {
            batch.append_statement(self.insert.clone());
            let (rejection, events) = match &entry.verdict {
                Verdict::Rejected(reason) => (Some(reason.clone()), None),
                Verdict::Appended(events) => {
                    let journaled: Vec<JournaledEvent> = events
                        .iter()
                        .map(|e| JournaledEvent {
                            version: e.version,
                            event_id: e.event_id.clone(),
                            event_type: e.event_type.clone(),
                            payload: e.payload.clone(),
                            recorded_at_ms: e.recorded_at_ms,
                        })
                        .collect();
                    (None, Some(serde_json::to_string(&journaled).map_err(journal_err)?))
                }
            };
            values.push(Box::new((
                tenant.to_owned(),
                context.to_owned(),
                p,
                entry.seq,
                entry.stream_id.clone(),
                entry.command_key.clone(),
                entry.operation_id.clone(),
                entry.command_type.clone(),
                entry.source.clone(),
                entry.command_id.clone(),
                rejection,
                events,
                ENTRY_TTL_S,
            )));
        }
        let result = self.session.batch(&batch, values).await.map_err(journal_err)?;
        Ok(if applied(result)? { Appended::Applied } else { Appended::Fenced })
    }

    async fn relayed(&self, partition: &PartitionRef, next: i64, trim_below: Option<i64>) -> Result<(), JournalError> {
        let (tenant, context, p) = key(partition);
        self.session
            .execute_unpaged(&self.note_relayed, (next, next, tenant, context, p))
            .await
            .map_err(journal_err)?;
        if let Some(below) = trim_below {
            self.session.execute_unpaged(&self.trim, (tenant, context, p, below)).await.map_err(journal_err)?;
        }
        Ok(())
    }
}
