//! Applying Kafka records to one version of a [`Projection`]'s read models:
//! decode via the registry, take the key's memo from an earlier event this
//! consumer applied (in the batch, or in an earlier one: [`Memos`]) or read
//! it, turn the event into rows, and on poison (cannot be decoded or does
//! not fit) hand it to [`DeadLetters`]. A batch's rows are written together,
//! grouped by partition ([`Tables::write_rows`]), beside its additions
//! counted into their running totals ([`Tables::tally`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::StreamExt;
use rdkafka::message::{Headers, Message};
use scylla::client::session::Session;
use sluice_schemas::codec::EventCodec;
use sluice_streams::backoff::Backoff;
use sluice_streams::batch::{self, SettleBatch};
use sluice_streams::dead_letter::DeadLetters;
use sluice_streams::settle::{settle_record, Settled};
use sluice_streams::{decode_record, ApplyError};
use tracing::{debug, info_span, warn, Instrument};

use crate::projection::{Projection, Write};
use crate::store::tables::{Addition, Row, Tables};
use crate::store::{rm_err, ReadModelError};

/// The tenant an events topic belongs to (`<tenant>.<context>.events`).
pub fn tenant_of(topic: &str) -> Option<&str> {
    sluice_schemas::names::parse_events_topic(topic).map(|(tenant, _)| tenant)
}

/// The bounded context an events topic belongs to.
pub fn context_of(topic: &str) -> Option<&str> {
    sluice_schemas::names::parse_events_topic(topic).map(|(_, context)| context)
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Written,
    /// The record belongs to another context's topic: not for this
    /// projection, and not poison either.
    Skipped,
}

pub struct Applier<P: Projection> {
    projection: Arc<P>,
    version: i32,
    tables: Arc<Tables>,
    codec: EventCodec,
    dead_letters: DeadLetters,
    /// Each record's apply continues its command's trace when spans are
    /// exported (not in a replay: re-applying the log is no part of the
    /// commands' work). A span per record was ~8 % of a rebuild's CPU and
    /// ~13 % of the live projector's on a backlog; without an exporter it
    /// was only a log context, and the apply's warnings name their topic
    /// and offset themselves.
    traced: bool,
}

impl<P: Projection> Applier<P> {
    /// The applier of `projection`'s `version` (its tables created if missing).
    pub async fn new(
        brokers: &str,
        registry_url: &str,
        projection: Arc<P>,
        session: Arc<Session>,
        version: i32,
    ) -> Result<Self, ReadModelError> {
        let name = projection.name();
        let tables = Arc::new(Tables::open(session.clone(), name, version, projection.tables()).await?);
        let dead_letters = DeadLetters::new(brokers, session, name, version).await?;
        Ok(Self {
            projection,
            version: tables.version,
            tables,
            codec: EventCodec::new(registry_url).map_err(rm_err)?,
            dead_letters,
            traced: true,
        })
    }

    /// The applier of a replay of `topics`: what the dead-letter topics
    /// already hold is not copied there again.
    pub async fn replaying_log(self, brokers: &str, topics: &[String]) -> Result<Self, ReadModelError> {
        let dead_letters = self.dead_letters.replaying_log(brokers, topics).await?;
        Ok(Self { dead_letters, traced: false, ..self })
    }

    /// The applier of `sluice dlt replay`: it applies the records of parked
    /// keys (it parks nothing itself).
    pub fn replaying(self) -> Self {
        Self { dead_letters: self.dead_letters.replaying(), ..self }
    }

    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dead_letters
    }

    /// The span of one record's apply: it continues the trace of the
    /// command that produced the event (none in a replay).
    fn span(&self, message: &impl Message) -> tracing::Span {
        if !self.traced || !sluice_telemetry::exporting() {
            return tracing::Span::none();
        }
        let span = info_span!("sluice.project", projection = %self.projection.name(), topic = message.topic(), offset = message.offset());
        let traceparent = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok());
        sluice_telemetry::set_parent(&span, traceparent);
        span
    }

    /// Applies a record once, out of its partition's order (a parked key's
    /// record): written, skipped, or why not. Its additions get slots of
    /// their own.
    pub async fn apply(&self, message: &impl Message) -> Result<Applied, ApplyError> {
        let (applied, made) = self.rows(message, &Mutex::new(Known::Ask), false).await?;
        self.tables.write_rows(&made.rows).await.map_err(|e| ApplyError::Transient(e.to_string()))?;
        Ok(applied)
    }

    /// The rows a record makes, not written yet: decoded, with the key's
    /// memo from `known` (an earlier event of the key in this batch) or else
    /// read from the store; `known` then holds what a later event of the key
    /// needs. `in_order`: the record is applied in its partition's order, so
    /// its additions are counted in the partition's running totals
    /// ([`Tables::tally`]) rather than written as rows.
    async fn rows(
        &self,
        message: &impl Message,
        known: &Mutex<Known<P::Memo>>,
        in_order: bool,
    ) -> Result<(Applied, Made), ApplyError> {
        let poison = |class, reason: String| ApplyError::Poison { class, reason };
        let transient = |e: ReadModelError| ApplyError::Transient(e.to_string());
        let topic = message.topic();
        if context_of(topic) != Some(self.projection.context()) {
            return Ok((Applied::Skipped, Made::default()));
        }
        let tenant = tenant_of(topic).ok_or_else(|| poison("bad_topic", format!("topic {topic} names no tenant")))?;
        let decoded = decode_record(&self.codec, &self.dead_letters, message).await?;
        debug!(tenant, event_type = decoded.name(), offset = message.offset(), "making rows");
        let event = self.projection.decode(decoded)?;
        let memo = match self.projection.memo_read(&event) {
            Some(read) => {
                let cached = known.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match cached {
                    Known::Have(memo) => memo,
                    Known::Ask => {
                        // Boxed: a rebuild reads no memo, and inline the read's
                        // future would grow every record's (moved per key).
                        let cells = Box::pin(self.tables.read_memo(tenant, &read)).await.map_err(transient)?;
                        cells.and_then(|cells| self.projection.memo_of(&cells))
                    }
                }
            }
            None => None,
        };
        let mut made = Made::default();
        for write in self.projection.writes(&event, memo.as_ref()) {
            match write {
                Write::Add { .. } if in_order => made.additions.push(Addition {
                    tenant: tenant.to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    write,
                }),
                _ => made.rows.push(self.tables.row(tenant, write).await.map_err(transient)?),
            }
        }
        *known.lock().unwrap_or_else(|e| e.into_inner()) = Known::Have(self.projection.memo_after(&event, memo));
        Ok((Applied::Written, made))
    }
}

/// What records make: rows to write, and additions to count; and how many
/// of them were applied and dead-lettered.
#[derive(Default)]
struct Made {
    rows: Vec<Row>,
    additions: Vec<Addition>,
    applied: u64,
    dead_lettered: u64,
}

/// What a batch knows of a key's memo.
#[derive(Debug, Clone)]
enum Known<M> {
    /// Nothing yet: read it from the store.
    Ask,
    /// As an earlier event of the key left it.
    Have(Option<M>),
}

/// A key of an events topic: (topic, partition, record key).
type KeyOf = (String, i32, Vec<u8>);

/// A map by [`KeyOf`], hashed with foldhash: a rebuild looks every record's
/// key up and keeps hundreds of thousands of them, where std's SipHash was
/// a visible share of the CPU. Its seed is random per process.
type KeyMap<V> = HashMap<KeyOf, V, foldhash::fast::RandomState>;

/// Keys remembered between batches at most; past it the memory starts over.
const MAX_MEMOS: usize = 200_000;

/// The memos of the keys whose last event a [`Settling`] applied itself,
/// kept from batch to batch: the next event of such a key needs no read
/// (in a rebuild, none of the keys it saw begin). What another writer may
/// have changed is not kept: all is forgotten when the consumer's
/// partitions move (another instance may have applied later events of them
/// meanwhile), and a key whose record was dead-lettered is forgotten (its
/// key is parked, and `sluice dlt replay` applies its records elsewhere).
struct Memos<M> {
    /// Only keys with a memo: a projection whose events read none (patients)
    /// keeps nothing here.
    known: Mutex<KeyMap<M>>,
    /// The consumer's rebalance count, if it is in a group
    /// (`sluice_streams::consumer::Rebalances::count`), and the count the
    /// memos were learned under.
    rebalances: Option<Arc<AtomicU64>>,
    learned_under: AtomicU64,
}

impl<M: Clone> Memos<M> {
    /// The rebalance count now; forgets everything when it moved since the
    /// memos were learned.
    fn check(&self) -> u64 {
        let Some(count) = &self.rebalances else { return 0 };
        let now = count.load(Ordering::SeqCst);
        if self.learned_under.swap(now, Ordering::SeqCst) != now {
            self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        now
    }

    fn get(&self, key: &KeyOf) -> Known<M> {
        match self.known.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            Some(memo) => Known::Have(Some(memo.clone())),
            None => Known::Ask,
        }
    }

    /// Keeps what a written batch learned, unless the partitions moved
    /// while it was applied (`began`: the count when it began).
    fn learn(&self, began: u64, learned: KeyMap<Learned<M>>) {
        if self.check() != began {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() + learned.len() > MAX_MEMOS {
            known.clear();
        }
        for (key, learned) in learned {
            match learned {
                Learned::Memo(Some(memo)) => {
                    known.insert(key, memo);
                }
                Learned::Memo(None) | Learned::Forget => {
                    known.remove(&key);
                }
                Learned::Nothing => {}
            }
        }
    }
}

/// What a batch's records of one key teach about its memo.
enum Learned<M> {
    Nothing,
    Memo(Option<M>),
    /// A record of it was dead-lettered.
    Forget,
}

/// Batches applied to one version until `stop`, counted: each order's
/// records in order (orders concurrently) turned into rows and sales
/// (retried while transient, dead-lettered when poison), then the batch's
/// rows written together, grouped by partition, beside its sales counted
/// into their running totals (retried until the store takes them).
pub struct Settling<'x, P: Projection> {
    applier: &'x Applier<P>,
    stop: &'x tokio_util::sync::CancellationToken,
    memos: Memos<P::Memo>,
    pub applied: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Rows written (one write per row, whatever batch it went in).
    pub rows: AtomicU64,
}

impl<'x, P: Projection> Settling<'x, P> {
    /// Settling for a consumer with partitions of its own (assigned, never
    /// moved).
    pub fn new(applier: &'x Applier<P>, stop: &'x tokio_util::sync::CancellationToken) -> Self {
        Self {
            applier,
            stop,
            memos: Memos { known: Mutex::default(), rebalances: None, learned_under: AtomicU64::new(0) },
            applied: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        }
    }

    /// Settling for a group member whose partitions move: `rebalances`
    /// counts the moves (`sluice_streams::consumer::Rebalances::count`).
    pub fn in_group(mut self, rebalances: Arc<AtomicU64>) -> Self {
        self.memos.learned_under = AtomicU64::new(rebalances.load(Ordering::SeqCst));
        self.memos.rebalances = Some(rebalances);
        self
    }

    /// (applied, dead-lettered) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.applied.load(Ordering::Relaxed), self.dead_lettered.load(Ordering::Relaxed))
    }

    /// What one key's records in this batch make, and what they teach
    /// about its memo; `None` when stopped. The key's memo comes from
    /// `previous` (what the batch before taught, its rows maybe not written
    /// yet), else from the memos kept, else from the store.
    async fn key_rows<M: Message + Sync>(
        &self,
        records: Vec<&M>,
        previous: Option<&KeyMap<Learned<P::Memo>>>,
    ) -> KeyMade<P::Memo> {
        let key: Option<KeyOf> =
            records.first().and_then(|r| Some((r.topic().to_owned(), r.partition(), r.key()?.to_vec())));
        let start = key.as_ref().map_or(Known::Ask, |key| match previous.and_then(|p| p.get(key)) {
            Some(Learned::Memo(memo)) => Known::Have(memo.clone()),
            Some(Learned::Forget) => Known::Ask,
            Some(Learned::Nothing) | None => self.memos.get(key),
        });
        let known = Mutex::new(start);
        let mut forget = false;
        let mut made = Made::default();
        for record in records {
            // A stop is heard between records too: one key's records can
            // fill a whole batch (a parked key's are dead-lettered one by one).
            if self.stop.is_cancelled() {
                return None;
            }
            let make = || self.applier.rows(record, &known, true);
            let settled = settle_record(&self.applier.dead_letters, record, self.stop, make)
                .instrument(self.applier.span(record))
                .await?;
            match settled {
                Settled::Applied((Applied::Written, record_made)) => {
                    made.rows.extend(record_made.rows);
                    made.additions.extend(record_made.additions);
                    made.applied += 1;
                }
                Settled::Applied(_) => continue,
                Settled::DeadLettered { .. } => {
                    made.dead_lettered += 1;
                    forget = true;
                }
            }
        }
        let learned = match known.into_inner().unwrap_or_else(|e| e.into_inner()) {
            _ if forget => Learned::Forget,
            Known::Have(memo) => Learned::Memo(memo),
            Known::Ask => Learned::Nothing,
        };
        Some((made, key.map(|key| (key, learned))))
    }

    /// Writes a batch's rows and counts its additions, concurrently;
    /// answers the rows written.
    async fn write(&self, made: &Made) -> Result<usize, ReadModelError> {
        let tables = &self.applier.tables;
        let counted = async {
            let totals = tables.tally(&made.additions).await?;
            tables.write_rows(&totals).await.map(|()| totals.len())
        };
        let (_, totals) = futures::try_join!(tables.write_rows(&made.rows), counted)?;
        Ok(made.rows.len() + totals)
    }
}

impl<P: Projection> SettleBatch for Settling<'_, P> {
    type Made = MadeBatch<P::Memo>;

    fn make<'a, M: Message + Sync>(
        &'a self,
        records: &'a [M],
        max_keys_in_flight: usize,
        previous: Option<&'a Self::Made>,
    ) -> BoxFuture<'a, Option<Self::Made>> {
        Box::pin(self.make_batch(records, max_keys_in_flight, previous))
    }

    fn write<'a>(&'a self, made: &'a Self::Made) -> BoxFuture<'a, bool> {
        Box::pin(self.write_batch(made))
    }

    fn written(&self, made: Self::Made) {
        self.keep(made);
    }
}

/// A batch's rows made and its records settled, its rows not written yet
/// ([`Settling::make_batch`]).
pub struct MadeBatch<M> {
    made: Made,
    /// What the batch taught about its keys' memos, kept once it is written.
    learned: KeyMap<Learned<M>>,
    /// The rebalance count when it began ([`Memos::check`]).
    began: u64,
    started: std::time::Instant,
    records: usize,
}

impl<P: Projection> Settling<'_, P> {
    /// Settles a batch's records (each key's in order, keys concurrently)
    /// into the rows they make, written by [`Settling::write_batch`];
    /// `None` when stopped. `previous`: a batch made before this one whose
    /// rows may not be written yet: its keys' memos come from it, not from
    /// the store (a replay makes one batch while it writes the one before).
    pub async fn make_batch<M: Message + Sync>(
        &self,
        records: &[M],
        max_keys_in_flight: usize,
        previous: Option<&MadeBatch<P::Memo>>,
    ) -> Option<MadeBatch<P::Memo>> {
        let started = std::time::Instant::now();
        let began = self.memos.check();
        let previous = previous.map(|p| &p.learned);
        let keys: Vec<BoxFuture<'_, KeyMade<P::Memo>>> = batch::by_key(records)
            .into_iter()
            .map(|records| -> BoxFuture<'_, KeyMade<P::Memo>> { Box::pin(self.key_rows(records, previous)) })
            .collect();
        let mut learned = KeyMap::with_capacity_and_hasher(keys.len(), Default::default());
        let mut each = Vec::with_capacity(keys.len());
        let mut keys_made = futures::stream::iter(keys).buffer_unordered(max_keys_in_flight.max(1));
        while let Some(key_made) = keys_made.next().await {
            let (key_made, key_learned) = key_made?;
            each.push(key_made);
            learned.extend(key_learned);
        }
        // Gathered once their number is known: a batch's rows in a vector
        // grown as they came were copied again at every doubling.
        let mut made = Made {
            rows: Vec::with_capacity(each.iter().map(|m| m.rows.len()).sum()),
            additions: Vec::with_capacity(each.iter().map(|m| m.additions.len()).sum()),
            ..Made::default()
        };
        for key_made in each {
            made.rows.extend(key_made.rows);
            made.additions.extend(key_made.additions);
            made.applied += key_made.applied;
            made.dead_lettered += key_made.dead_lettered;
        }
        // Counted once a batch: a label per record was a visible share of
        // a rebuild's CPU.
        self.applied.fetch_add(made.applied, Ordering::Relaxed);
        self.dead_lettered.fetch_add(made.dead_lettered, Ordering::Relaxed);
        let name = self.applier.projection.name();
        for (outcome, n) in [("applied", made.applied), ("dead_lettered", made.dead_lettered)] {
            if n > 0 {
                metrics::counter!("sluice_projection_events_total", "projection" => name.to_owned(), "outcome" => outcome)
                    .increment(n);
            }
        }
        Some(MadeBatch { made, learned, began, started, records: records.len() })
    }

    /// Writes a made batch's rows and counts its additions (retried until
    /// the store takes them); `false` when stopped before it was written.
    /// [`Settling::keep`] then keeps what it taught about memos.
    pub async fn write_batch(&self, batch: &MadeBatch<P::Memo>) -> bool {
        let mut backoff = Backoff::default();
        let written = loop {
            match self.write(&batch.made).await {
                Ok(written) => break written,
                Err(e) => {
                    warn!(error = %e, rows = batch.made.rows.len(), "the batch's rows were not written; retrying");
                    if !backoff.wait(self.stop).await {
                        return false;
                    }
                }
            }
        };
        self.rows.fetch_add(written as u64, Ordering::Relaxed);
        let name = self.applier.projection.name();
        metrics::counter!("sluice_projection_rows_total", "projection" => name.to_owned()).increment(written as u64);
        // Each record waited for the whole batch: that is its apply latency.
        let histogram = metrics::histogram!("sluice_projection_apply_seconds", "projection" => name.to_owned());
        let seconds = batch.started.elapsed().as_secs_f64();
        for _ in 0..batch.records {
            histogram.record(seconds);
        }
        true
    }

    /// Keeps what a written batch taught about its keys' memos (moved, not
    /// copied: a rebuild learns a memo for most of its records).
    pub fn keep(&self, batch: MadeBatch<P::Memo>) {
        self.memos.learn(batch.began, batch.learned);
    }
}

/// What one key's records in a batch make, and what they teach about its
/// memo; `None` when stopped.
type KeyMade<M> = Option<(Made, Option<(KeyOf, Learned<M>)>)>;

/// Next offsets to apply, written beside the rows every so often.
pub struct OffsetTracker {
    projection: String,
    version: i32,
    session: Arc<Session>,
    pending: Mutex<HashMap<(String, i32), i64>>,
}

impl OffsetTracker {
    pub fn new(session: Arc<Session>, projection: &str, version: i32) -> Self {
        Self { projection: projection.to_owned(), version, session, pending: Mutex::new(HashMap::new()) }
    }

    pub fn applied(&self, topic: &str, partition: i32, offset: i64) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert((topic.to_owned(), partition), offset + 1);
    }

    /// Writes what changed since the last flush.
    pub async fn flush(&self) -> Result<(), ReadModelError> {
        let pending: Vec<_> = self.pending.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        for ((topic, partition), next) in pending {
            self.session
                .query_unpaged(
                    "INSERT INTO projection_offsets (projection, version, topic, partition, next_offset) VALUES (?, ?, ?, ?, ?)",
                    (&self.projection, self.version, &topic, partition, next),
                )
                .await
                .map_err(rm_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memos(rebalances: &Arc<AtomicU64>) -> Memos<&'static str> {
        Memos {
            known: Mutex::default(),
            rebalances: Some(rebalances.clone()),
            learned_under: AtomicU64::new(rebalances.load(Ordering::SeqCst)),
        }
    }

    fn key(k: &str) -> KeyOf {
        ("acme.orders.events".into(), 0, k.as_bytes().to_vec())
    }

    fn have(known: Known<&'static str>) -> Option<Option<&'static str>> {
        match known {
            Known::Have(memo) => Some(memo),
            Known::Ask => None,
        }
    }

    #[test]
    fn a_key_keeps_the_memo_its_last_batch_left_until_one_of_its_records_is_dead_lettered() {
        let count = Arc::new(AtomicU64::new(0));
        let memos = memos(&count);
        let began = memos.check();
        memos.learn(
            began,
            [
                (key("o1"), Learned::Memo(Some("after o1"))),
                (key("o2"), Learned::Nothing),
                (key("o3"), Learned::Memo(None)),
            ]
            .into_iter()
            .collect(),
        );
        assert_eq!(have(memos.get(&key("o1"))), Some(Some("after o1")));
        assert_eq!(have(memos.get(&key("o2"))), None, "nothing learned: read");
        assert_eq!(have(memos.get(&key("o3"))), None, "no memo is kept: read");
        let began = memos.check();
        memos.learn(began, [(key("o1"), Learned::Forget)].into_iter().collect());
        assert_eq!(have(memos.get(&key("o1"))), None, "dead-lettered: read again");
    }

    #[test]
    fn moved_partitions_forget_every_memo_and_a_batch_applied_across_a_move_teaches_nothing() {
        let count = Arc::new(AtomicU64::new(3));
        let memos = memos(&count);
        let began = memos.check();
        memos.learn(began, [(key("o1"), Learned::Memo(Some("mine")))].into_iter().collect());
        // The partitions moved between two batches: another instance may
        // have applied later events of o1.
        count.fetch_add(1, Ordering::SeqCst);
        let began = memos.check();
        assert_eq!(have(memos.get(&key("o1"))), None);
        // They moved while a batch was applied.
        count.fetch_add(1, Ordering::SeqCst);
        memos.learn(began, [(key("o2"), Learned::Memo(Some("stale?")))].into_iter().collect());
        assert_eq!(have(memos.get(&key("o2"))), None);
    }
}
