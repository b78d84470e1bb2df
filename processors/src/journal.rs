//! The command journal: what a partition's owner decided, in order, fenced
//! by the partition's ownership epoch.
//!
//! One CQL partition per command partition. A processor takes a partition
//! over by raising its epoch ([`Journal::claim`], an LWT), reads what the
//! journal holds, and records where its own entries begin
//! ([`Journal::begin`], an LWT conditional on its epoch). From then on a
//! round of decisions is a plain write ([`Journal::append`]): each entry
//! carries its owner's epoch, also as its write timestamp, and the append
//! reads the epoch back before anything else is written (the writes and
//! read-backs of a processor's partitions that come together share
//! requests). So per takeover two conditional writes, per round none:
//!
//! - an entry of an older epoch at or past a newer epoch's first seq is a
//!   fenced owner's and is discarded by every reader ([`valid`]); where the
//!   newer owner writes the same seq, its entry outranks the old one;
//! - an entry that the newer owner could not see when it began lies below
//!   its first seq and stands: the fenced owner learns of the newer epoch
//!   when it reads the epoch back, stops before writing anything else, and
//!   the newer owner finishes the entry as one of its predecessor's.
//!
//! Everything else an owner writes (stream rows, operation records, Kafka)
//! follows from standing entries, and the next owner redoes what is past the
//! relay position before it decides anything, so a decision is never lost
//! and never taken twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use serde::{Deserialize, Serialize};
use sluice_streams::group_commit::GroupCommit;
use sluice_streams::{prepared, replicas};

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

/// What [`Journal::claim`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claimant's epoch.
    pub epoch: i64,
    /// Earlier owners whose Kafka producers may still be live: a processor's
    /// producer serves all its partitions ([`crate::kafka`]), so only
    /// fencing it makes sure none of their transactions commits after the
    /// claimant read the relay position. The claimant fences them before it
    /// reads it; [`Journal::begin`] forgets them. Owners named by an earlier
    /// claim that never began stay on the list.
    pub fence: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Applied,
    /// A newer owner raised the epoch: this one may write nothing more.
    Fenced,
}

pub trait Journal: Send + Sync {
    /// Makes `owner` the partition's owner with a new epoch.
    fn claim(&self, partition: &PartitionRef, owner: &str) -> impl Future<Output = Result<Claim, JournalError>> + Send;
    /// The partition's epoch now (`None`: never claimed).
    fn epoch(&self, partition: &PartitionRef) -> impl Future<Output = Result<Option<i64>, JournalError>> + Send;
    /// The standing entries from `seq` on, in order.
    fn entries_from(
        &self,
        partition: &PartitionRef,
        seq: i64,
    ) -> impl Future<Output = Result<Vec<Entry>, JournalError>> + Send;
    /// The next seq to relay, as last noted (the Kafka transaction's
    /// committed position is the authority; this is its fallback).
    fn relay_note(&self, partition: &PartitionRef) -> impl Future<Output = Result<Option<i64>, JournalError>> + Send;
    /// Records that `epoch`'s entries begin at `first_seq`, if `epoch` is
    /// still the partition's; forgets what readers from `read_from` on no
    /// longer need, and the owners its claim had to fence.
    fn begin(
        &self,
        partition: &PartitionRef,
        epoch: i64,
        first_seq: i64,
        read_from: i64,
    ) -> impl Future<Output = Result<Appended, JournalError>> + Send;
    /// Journals `entries` (all or none) for `epoch`, then answers whether
    /// `epoch` is still the partition's: when it is not, the entries may
    /// stand or not, and the caller may write nothing more. The same write
    /// notes that entries before `relayed` are relayed (as [`Journal::relayed`]
    /// does, without trimming).
    fn append(
        &self,
        partition: &PartitionRef,
        epoch: i64,
        entries: &[Entry],
        relayed: i64,
    ) -> impl Future<Output = Result<Appended, JournalError>> + Send;
    /// Records that `epoch`'s owner let the partition go with nothing of it
    /// left in flight (every round finished), if `epoch` is still the
    /// partition's: the next claim has no one to fence.
    fn release(
        &self,
        partition: &PartitionRef,
        epoch: i64,
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

/// Whether an entry at `seq` written by `written_by` stands, given each
/// epoch's first seq: it does unless a newer epoch began at or before it.
/// Entries journaled before epochs were written into them stand.
pub fn valid(seq: i64, written_by: Option<i64>, first_seqs: &BTreeMap<i64, i64>) -> bool {
    let Some(epoch) = written_by else { return true };
    !first_seqs.range(epoch + 1..).any(|(_, &first)| first <= seq)
}

/// The first seqs a reader from `read_from` on still needs, with `epoch`'s
/// added: every epoch beginning past `read_from`, and of those beginning at
/// or before it the newest (it alone decides about entries from there on).
pub fn first_seqs_to_keep(
    first_seqs: &BTreeMap<i64, i64>,
    read_from: i64,
    epoch: i64,
    first_seq: i64,
) -> BTreeMap<i64, i64> {
    let newest_before = first_seqs.iter().filter(|(_, &first)| first <= read_from).map(|(&e, _)| e).max();
    let mut kept: BTreeMap<i64, i64> = first_seqs
        .iter()
        .filter(|(&e, &first)| first > read_from || Some(e) == newest_before)
        .map(|(&e, &first)| (e, first))
        .collect();
    kept.insert(epoch, first_seq);
    kept
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
    read_claim: PreparedStatement,
    raise_epoch: PreparedStatement,
    read_first_seqs: PreparedStatement,
    write_first_seqs: PreparedStatement,
    select_from: PreparedStatement,
    read_relay_note: PreparedStatement,
    release: PreparedStatement,
    note_relayed: PreparedStatement,
    trim: PreparedStatement,
    /// [`Journal::append`]'s writes: the rounds of a processor's partitions
    /// that come together share a request ([`GroupCommit`]), each
    /// partition's rows still applied whole.
    /// A unit is one partition's rows, applied all or none (a batch applies
    /// the rows of one partition together).
    appends: GroupCommit<Vec<JournalRow>>,
    /// The epochs read back after those writes, shared the same way.
    read_backs: GroupCommit<ReadBack, Arc<EpochsAt>>,
}

/// A row of a partition's journal write: an entry, or the relay position
/// noted.
enum JournalRow {
    Entry(Vec<Option<CqlValue>>),
    Relayed(Vec<Option<CqlValue>>),
}

impl JournalRow {
    fn values(&self) -> &[Option<CqlValue>] {
        match self {
            JournalRow::Entry(values) | JournalRow::Relayed(values) => values,
        }
    }

    /// About what the row adds to a batch's size (its text and numbers).
    fn bytes(&self) -> usize {
        self.values()
            .iter()
            .map(|v| match v {
                Some(CqlValue::Text(t)) => t.len(),
                _ => 8,
            })
            .sum()
    }
}

/// A partition's epoch, read with its row at a seq just written.
type ReadBack = (String, &'static str, i32, i64);
/// What a group of read-backs found: the epoch by (tenant, context,
/// partition, seq); a seq without a row is absent.
type EpochsAt = HashMap<ReadBack, Option<i64>>;

/// Bytes of journal rows per write, below the CQL store's batch size limit
/// (50 KiB by default): an owner splits a round's entries into appends of
/// about this size at most ([`crate::owner`]), and grouped appends share a
/// batch up to it (one larger append goes alone).
pub const MAX_BYTES_PER_WRITE: usize = 24 * 1024;

/// Read-backs per request of a group: partitions × seqs are read (`IN` on
/// both), so a request stays small.
const READ_BACKS_PER_READ: usize = 16;

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
        let prepare_read = |cql: &'static str| {
            let session = session.clone();
            async move { prepared::prepare_read(&session, cql).await.map_err(journal_err) }
        };
        // The epoch is the write timestamp: where a newer owner journals
        // a seq a fenced one wrote too, the newer entry wins.
        let insert = prepare(
            "INSERT INTO command_journal (tenant, context, partition, seq, written_by, stream_id, \
             command_key, operation_id, command_type, source, command_id, rejection, events) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?",
        )
        .await?;
        // The write timestamp is the position itself: a late note of an
        // older position never hides a newer one.
        let note_relayed = prepare(
            "UPDATE command_journal USING TIMESTAMP ? SET relayed = ? \
             WHERE tenant = ? AND context = ? AND partition = ?",
        )
        .await?;
        // Selecting only the static epoch reads a partition up to its first
        // live row, past every trimmed row not yet compacted away
        // (milliseconds per read on a busy partition: most of the CQL
        // store's CPU in the bench); reading the seqs just written seeks
        // straight to them.
        let read_epochs_at_seqs = prepare_read(
            "SELECT partition, seq, epoch FROM command_journal \
             WHERE tenant = ? AND context = ? AND partition IN ? AND seq IN ?",
        )
        .await?;
        Ok(Self {
            read_epoch: prepare_read(
                "SELECT epoch FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? LIMIT 1",
            )
            .await?,
            read_claim: prepare_read(
                "SELECT epoch, owner, to_fence FROM command_journal \
                 WHERE tenant = ? AND context = ? AND partition = ? LIMIT 1",
            )
            .await?,
            raise_epoch: prepare(
                "UPDATE command_journal SET epoch = ?, owner = ?, to_fence = ? \
                 WHERE tenant = ? AND context = ? AND partition = ? IF epoch = ?",
            )
            .await?,
            read_first_seqs: prepare_read(
                "SELECT first_seqs FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? LIMIT 1",
            )
            .await?,
            write_first_seqs: prepare(
                "UPDATE command_journal SET first_seqs = ?, to_fence = null \
                 WHERE tenant = ? AND context = ? AND partition = ? IF epoch = ?",
            )
            .await?,
            select_from: prepare_read(
                "SELECT seq, written_by, stream_id, command_key, operation_id, command_type, source, command_id, \
                 rejection, events FROM command_journal \
                 WHERE tenant = ? AND context = ? AND partition = ? AND seq >= ?",
            )
            .await?,
            read_relay_note: prepare_read(
                "SELECT relayed FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? LIMIT 1",
            )
            .await?,
            release: prepare(
                "UPDATE command_journal SET owner = null \
                 WHERE tenant = ? AND context = ? AND partition = ? IF epoch = ?",
            )
            .await?,
            note_relayed: note_relayed.clone(),
            trim: prepare("DELETE FROM command_journal WHERE tenant = ? AND context = ? AND partition = ? AND seq < ?")
                .await?,
            appends: {
                let session = session.clone();
                GroupCommit::new("journal", move |writes| {
                    write_partitions(session.clone(), insert.clone(), note_relayed.clone(), writes)
                })
            },
            read_backs: {
                let session = session.clone();
                GroupCommit::new("journal_read_backs", move |keys| {
                    read_epochs_at(session.clone(), read_epochs_at_seqs.clone(), keys)
                })
            },
            session,
        })
    }

    async fn current_epoch(&self, key: (&str, &str, i32)) -> Result<Option<i64>, JournalError> {
        let result = self.session.execute_unpaged(&self.read_epoch, key).await.map_err(journal_err)?;
        let rows = result.into_rows_result().map_err(journal_err)?;
        Ok(rows.maybe_first_row::<(Option<i64>,)>().map_err(journal_err)?.and_then(|(epoch,)| epoch))
    }

    async fn first_seqs(&self, key: (&str, &str, i32)) -> Result<BTreeMap<i64, i64>, JournalError> {
        let result = self.session.execute_unpaged(&self.read_first_seqs, key).await.map_err(journal_err)?;
        let rows = result.into_rows_result().map_err(journal_err)?;
        let row = rows.maybe_first_row::<(Option<BTreeMap<i64, i64>>,)>().map_err(journal_err)?;
        Ok(row.and_then(|(map,)| map).unwrap_or_default())
    }
}

/// Writes a group of partitions' journal rows: unlogged batches of the
/// partitions on the same replicas, each partition's rows in one batch (so
/// applied together), at most [`MAX_BYTES_PER_WRITE`] each but for a
/// larger partition write going alone.
async fn write_partitions(
    session: Arc<Session>,
    insert: PreparedStatement,
    note_relayed: PreparedStatement,
    units: Vec<Vec<JournalRow>>,
) -> Result<(), String> {
    let cluster = session.get_cluster_state();
    // A partition write begins with an entry (it always has one), which
    // says where the partition lives.
    let batches = replicas::batches_by_weight(units, MAX_BYTES_PER_WRITE, JournalRow::bytes, |row| match row {
        JournalRow::Entry(values) => replicas::of(&cluster, &insert, values),
        JournalRow::Relayed(_) => None,
    });
    let requests = batches.into_iter().map(|rows| {
        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let (statement, row_values) = match row {
                JournalRow::Entry(v) => (&insert, v),
                JournalRow::Relayed(v) => (&note_relayed, v),
            };
            batch.append_statement(statement.clone());
            values.push(row_values);
        }
        let session = &session;
        async move { session.batch(&batch, values).await.map(drop) }
    });
    futures::future::try_join_all(requests).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads a group of partitions' epochs at seqs just written: one request
/// per tenant and context (and [`READ_BACKS_PER_READ`]), naming the
/// partitions and the seqs.
async fn read_epochs_at(
    session: Arc<Session>,
    select: PreparedStatement,
    keys: Vec<ReadBack>,
) -> Result<Arc<EpochsAt>, String> {
    let mut by_context: HashMap<(String, &'static str), Vec<ReadBack>> = HashMap::new();
    for key in keys {
        by_context.entry((key.0.clone(), key.1)).or_default().push(key);
    }
    let reads = by_context.into_iter().flat_map(|((tenant, context), keys)| {
        let chunks: Vec<Vec<ReadBack>> = keys.chunks(READ_BACKS_PER_READ).map(<[ReadBack]>::to_vec).collect();
        let (session, select) = (&session, &select);
        chunks.into_iter().map(move |chunk| {
            let tenant = tenant.clone();
            async move {
                let mut partitions: Vec<i32> = chunk.iter().map(|k| k.2).collect();
                let mut seqs: Vec<i64> = chunk.iter().map(|k| k.3).collect();
                partitions.sort_unstable();
                partitions.dedup();
                seqs.sort_unstable();
                seqs.dedup();
                let result = session
                    .execute_unpaged(select, (tenant.as_str(), context, partitions, seqs))
                    .await
                    .map_err(|e| e.to_string())?;
                let rows = result.into_rows_result().map_err(|e| e.to_string())?;
                let found: Vec<(i32, i64, Option<i64>)> = rows
                    .rows::<(i32, i64, Option<i64>)>()
                    .map_err(|e| e.to_string())?
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?;
                // Only the seqs asked of each partition: the read also
                // returns rows at the other partitions' seqs.
                Ok::<_, String>(
                    found
                        .into_iter()
                        .map(|(p, seq, epoch)| ((tenant.clone(), context, p, seq), epoch))
                        .filter(|(key, _)| chunk.contains(key))
                        .collect::<Vec<_>>(),
                )
            }
        })
    });
    let found = futures::future::try_join_all(reads).await?;
    Ok(Arc::new(found.into_iter().flatten().collect()))
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

type EntryRow = (i64, Option<i64>, String, String, String, String, String, String, Option<String>, Option<String>);

fn entry_of(row: EntryRow) -> Result<Entry, JournalError> {
    let (seq, _, stream_id, command_key, operation_id, command_type, source, command_id, rejection, events) = row;
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
}

impl Journal for CqlJournal {
    async fn claim(&self, partition: &PartitionRef, owner: &str) -> Result<Claim, JournalError> {
        let (tenant, context, p) = key(partition);
        loop {
            let result =
                self.session.execute_unpaged(&self.read_claim, (tenant, context, p)).await.map_err(journal_err)?;
            let rows = result.into_rows_result().map_err(journal_err)?;
            let (current, previous, mut fence) = rows
                .maybe_first_row::<(Option<i64>, Option<String>, Option<BTreeSet<String>>)>()
                .map_err(journal_err)?
                .map(|(epoch, previous, fence)| (epoch, previous, fence.unwrap_or_default()))
                .unwrap_or_default();
            // This processor's own producer ends its transactions itself.
            fence.extend(previous.filter(|previous| previous != owner));
            fence.remove(owner);
            let next = current.unwrap_or(0) + 1;
            let result = self
                .session
                .execute_unpaged(&self.raise_epoch, (next, owner, &fence, tenant, context, p, current))
                .await
                .map_err(journal_err)?;
            if applied(result)? {
                return Ok(Claim { epoch: next, fence: fence.into_iter().collect() });
            }
            // Another claim came in between: read again and go above it.
        }
    }

    async fn epoch(&self, partition: &PartitionRef) -> Result<Option<i64>, JournalError> {
        self.current_epoch(key(partition)).await
    }

    async fn entries_from(&self, partition: &PartitionRef, seq: i64) -> Result<Vec<Entry>, JournalError> {
        let (tenant, context, p) = key(partition);
        let first_seqs = self.first_seqs((tenant, context, p)).await?;
        let pager = self
            .session
            .execute_iter(self.select_from.clone(), (tenant, context, p, seq))
            .await
            .map_err(journal_err)?;
        let rows: Vec<EntryRow> =
            pager.rows_stream::<EntryRow>().map_err(journal_err)?.try_collect().await.map_err(journal_err)?;
        rows.into_iter().filter(|(seq, written_by, ..)| valid(*seq, *written_by, &first_seqs)).map(entry_of).collect()
    }

    async fn relay_note(&self, partition: &PartitionRef) -> Result<Option<i64>, JournalError> {
        let result = self.session.execute_unpaged(&self.read_relay_note, key(partition)).await.map_err(journal_err)?;
        let rows = result.into_rows_result().map_err(journal_err)?;
        Ok(rows.maybe_first_row::<(Option<i64>,)>().map_err(journal_err)?.and_then(|(relayed,)| relayed))
    }

    async fn begin(
        &self,
        partition: &PartitionRef,
        epoch: i64,
        first_seq: i64,
        read_from: i64,
    ) -> Result<Appended, JournalError> {
        let (tenant, context, p) = key(partition);
        // Only the epoch's holder writes the map, so reading it first and
        // writing it whole under the condition loses nothing.
        let kept = first_seqs_to_keep(&self.first_seqs((tenant, context, p)).await?, read_from, epoch, first_seq);
        let result = self
            .session
            .execute_unpaged(&self.write_first_seqs, (kept, tenant, context, p, Some(epoch)))
            .await
            .map_err(journal_err)?;
        Ok(if applied(result)? { Appended::Applied } else { Appended::Fenced })
    }

    async fn append(
        &self,
        partition: &PartitionRef,
        epoch: i64,
        entries: &[Entry],
        relayed: i64,
    ) -> Result<Appended, JournalError> {
        let (tenant, context, p) = key(partition);
        let text = |s: &str| Some(CqlValue::Text(s.to_owned()));
        let mut rows = Vec::with_capacity(entries.len() + 1);
        for entry in entries {
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
            rows.push(JournalRow::Entry(vec![
                text(tenant),
                text(context),
                Some(CqlValue::Int(p)),
                Some(CqlValue::BigInt(entry.seq)),
                Some(CqlValue::BigInt(epoch)),
                text(&entry.stream_id),
                text(&entry.command_key),
                text(&entry.operation_id),
                text(&entry.command_type),
                text(&entry.source),
                text(&entry.command_id),
                rejection.map(CqlValue::Text),
                events.map(CqlValue::Text),
                Some(CqlValue::Int(ENTRY_TTL_S)),
                Some(CqlValue::BigInt(epoch)),
            ]));
        }
        if relayed > 0 {
            let position = Some(CqlValue::BigInt(relayed));
            rows.push(JournalRow::Relayed(vec![
                position.clone(),
                position,
                text(tenant),
                text(context),
                Some(CqlValue::Int(p)),
            ]));
        }
        // With the writes of the processor's other partitions that come
        // together; this partition's rows are applied whole or not at all.
        self.appends.send(vec![rows]).await.map_err(JournalError)?;
        // Read after the write: a newer owner that began after this read
        // saw these entries, one that began before it is seen here. Read at
        // the first entry: no row there (a newer owner relayed and trimmed
        // it) reads as no epoch, fenced.
        let now = match entries.first() {
            Some(first) => {
                let at = (tenant.to_owned(), partition.context, p, first.seq);
                let found = self.read_backs.send(vec![at.clone()]).await.map_err(JournalError)?;
                found.and_then(|found| found.get(&at).copied().flatten())
            }
            None => self.current_epoch((tenant, context, p)).await?,
        };
        Ok(if now == Some(epoch) { Appended::Applied } else { Appended::Fenced })
    }

    async fn release(&self, partition: &PartitionRef, epoch: i64) -> Result<Appended, JournalError> {
        let (tenant, context, p) = key(partition);
        let result = self
            .session
            .execute_unpaged(&self.release, (tenant, context, p, Some(epoch)))
            .await
            .map_err(journal_err)?;
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
