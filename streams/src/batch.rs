//! Records in batches: what lets a consumer run at the speed of its store
//! instead of one round trip per record.
//!
//! A batch is what the consumer has buffered once a record arrives (up to
//! `max_records`, waiting at most `max_wait` for more). Its records are
//! grouped by key, in the order they arrived; the groups run concurrently
//! (at most `max_keys_in_flight` at once) and each group's records one
//! after the other, so each key's events are applied in offset order, as a
//! one-at-a-time consumer would apply them. The batch's offsets are stored
//! only after every record of the batch is settled (applied or
//! dead-lettered): a crash mid-batch replays the whole batch, which the
//! idempotent writes absorb.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How records are batched.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Records in one batch at most.
    pub max_records: usize,
    /// After the first record, how long to wait for more; zero takes only
    /// what the consumer has already buffered (no added latency: records
    /// that arrive while a batch is applied form the next one).
    pub max_wait: Duration,
    /// Keys applied at once.
    pub max_keys_in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_records: 500, max_wait: Duration::ZERO, max_keys_in_flight: 64 }
    }
}

/// What a consumer does with one record: settle it (apply it, or
/// dead-letter it) and answer `true`, or answer `false` when it was stopped
/// before the record was settled.
pub trait Settle: Sync {
    fn settle<'a>(&'a self, record: &'a OwnedMessage) -> BoxFuture<'a, bool>;
}

/// What a consumer does with a whole batch, in two steps: make its effects
/// (every record settled: applied or dead-lettered, each key's in order),
/// then write them. [`consume`] makes the next batch while one is written
/// when records are waiting, so the store and the consumer work at once; a
/// batch made then sees what the batch being written made (`previous`).
/// A consumer that settles record by record implements [`Settle`] and
/// answers with [`settle`]; one that writes a batch's effects together (a
/// projection grouping rows by partition) implements this. The records are
/// any [`Message`]: [`consume`] hands over the consumer's own (borrowed, not
/// copied), tests build owned ones.
pub trait SettleBatch: Sync {
    /// A batch's effects, made and not written yet.
    type Made: Send + Sync;

    /// `None` when stopped before the batch was made.
    fn make<'a, M: Message + Sync>(
        &'a self,
        batch: &'a [M],
        max_keys_in_flight: usize,
        previous: Option<&'a Self::Made>,
    ) -> BoxFuture<'a, Option<Self::Made>>;

    /// `false` when stopped before the batch was written.
    fn write<'a>(&'a self, made: &'a Self::Made) -> BoxFuture<'a, bool>;

    /// Hears each made batch once it is written, in order.
    fn written(&self, made: Self::Made);
}

/// Consumes in batches until `stop`: each batch made, then written with
/// `settle_all` (the next one made meanwhile, from records already
/// buffered), then `on_batch` hears the next offsets of its partitions,
/// then they are stored for commit; when nothing arrives for [`IDLE`], the
/// positions (past transaction markers) are stored and heard the same way.
/// Returns when stopped (also mid-batch: that batch's offsets are not
/// stored). Offsets that cannot be stored (a partition revoked meanwhile)
/// are logged: the partition's next owner resumes from the last commit, and
/// the writes are idempotent.
pub async fn consume<C: ConsumerContext + 'static, S: SettleBatch>(
    consumer: &StreamConsumer<C>,
    config: &BatchConfig,
    stop: &CancellationToken,
    settle_all: &S,
    mut on_batch: impl FnMut(&[(String, i32, i64)]),
) {
    let keys = config.max_keys_in_flight;
    // The batch made and not written yet, with its partitions' next offsets.
    let mut made: Option<(S::Made, NextOffsets)> = None;
    loop {
        let Some((batch, next)) = made.take() else {
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                message = consumer.recv() => match message {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "kafka consumer error");
                        continue;
                    }
                },
                // Every record received is settled: move past what follows
                // them that is no record (transaction markers).
                _ = tokio::time::sleep(IDLE) => {
                    let positions = store_positions(consumer);
                    if !positions.is_empty() {
                        on_batch(&positions);
                    }
                    continue;
                }
            };
            let records = fill(consumer, first, config).await;
            let Some(batch) = settle_all.make(&records, keys, None).await else { return };
            made = Some((batch, next_offsets(&records)));
            continue;
        };
        // While the batch is written, the records already buffered are made
        // into the next one; none buffered, none waited for. Once stopped,
        // the batch is written and nothing more is taken.
        let following = async {
            if stop.is_cancelled() {
                return None;
            }
            let first = match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(first)) => first,
                Ok(Err(e)) => {
                    warn!(error = %e, "kafka consumer error");
                    return None;
                }
                Err(_) => return None,
            };
            let records = fill(consumer, first, config).await;
            let following = settle_all.make(&records, keys, Some(&batch)).await;
            Some(following.map(|following| (following, next_offsets(&records))))
        };
        let (written, following) = futures::join!(settle_all.write(&batch), following);
        if !written {
            return;
        }
        settle_all.written(batch);
        on_batch(&next);
        if let Err(e) = store_offsets(consumer, &next) {
            warn!(error = %e, "could not store the batch's offsets");
        }
        match following {
            Some(Some(following)) => made = Some(following),
            // Stopped while the next batch was made.
            Some(None) => return,
            None => {}
        }
    }
}

/// Topic, partition and next offset of each partition of a batch.
type NextOffsets = Vec<(String, i32, i64)>;

/// `first` and whatever else the consumer has buffered, up to the limits.
/// The records stay the consumer's (librdkafka's buffers, freed once they
/// are dropped), held only until their batch is settled (in a replay: its
/// rows made): copying each record's payload, key and headers out was a
/// visible share of a rebuild's CPU.
pub async fn fill<'c, C: ConsumerContext + 'static>(
    consumer: &'c StreamConsumer<C>,
    first: BorrowedMessage<'c>,
    config: &BatchConfig,
) -> Vec<BorrowedMessage<'c>> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + config.max_wait;
    while batch.len() < config.max_records {
        // A ready record is taken even at a zero wait: the future is polled
        // before the deadline is looked at.
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message),
            Ok(Err(e)) => {
                warn!(error = %e, "kafka consumer error");
                break;
            }
            Err(_) => break,
        }
    }
    batch
}

/// Settles every record of `batch` with `settle_one`: different keys
/// concurrently, each key's records in order. When `settle_one` answers
/// `false` (stopped before settling), the key's later records are not tried
/// and `settle` answers `false` (store no offset).
pub async fn settle(batch: &[OwnedMessage], max_keys_in_flight: usize, settle_one: &impl Settle) -> bool {
    // Boxed with their lifetime named: a spawned consumer needs the futures
    // to be Send for the batch's borrow, which closures in the stream
    // combinators cannot state.
    let keys: Vec<BoxFuture<'_, bool>> = by_key(batch)
        .into_iter()
        .map(|records| -> BoxFuture<'_, bool> {
            Box::pin(async move {
                for record in records {
                    if !settle_one.settle(record).await {
                        return false;
                    }
                }
                true
            })
        })
        .collect();
    futures::stream::iter(keys)
        .buffer_unordered(max_keys_in_flight.max(1))
        .fold(true, |all, settled| async move { all && settled })
        .await
}

/// The batch's records grouped by (topic, partition, key), each group in
/// offset order, groups in order of their first record.
pub fn by_key<M: Message>(batch: &[M]) -> Vec<Vec<&M>> {
    let mut groups: Vec<Vec<&M>> = Vec::new();
    // Sized for a key per record (a rebuild's batches mostly are), hashed
    // with foldhash: growing and SipHash were a visible share of a replay.
    let mut index: HashMap<RecordKey<'_>, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(batch.len(), Default::default());
    for record in batch {
        let at = *index.entry((record.topic(), record.partition(), record.key())).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[at].push(record);
    }
    groups
}

/// A record's topic, partition and key.
type RecordKey<'a> = (&'a str, i32, Option<&'a [u8]>);

/// The next offset to read of each (topic, partition) in the batch.
pub fn next_offsets<M: Message>(batch: &[M]) -> Vec<(String, i32, i64)> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for record in batch {
        let entry = next.entry((record.topic(), record.partition())).or_insert(0);
        *entry = (*entry).max(record.offset() + 1);
    }
    next.into_iter().map(|((topic, partition), offset)| (topic.to_owned(), partition, offset)).collect()
}

/// How long a consumer waits for a record before it stores its positions.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Stores the consumer's positions for commit. Call it only when every
/// record received has been settled: the positions are then past them and
/// past the transaction markers that follow them (a `read_committed`
/// consumer never receives those, and a partition whose last record is
/// followed by a commit marker would otherwise lag by one forever).
/// Answers the positions stored.
pub fn store_positions<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Vec<(String, i32, i64)> {
    let Ok(positions) = consumer.position() else { return Vec::new() };
    let next: Vec<(String, i32, i64)> = positions
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.topic().to_owned(), e.partition(), o)),
            _ => None,
        })
        .collect();
    if let Err(e) = store_offsets(consumer, &next) {
        tracing::debug!(error = %e, "positions not stored");
        return Vec::new();
    }
    next
}

/// Stores `next` for commit (the consumer commits stored offsets itself).
pub fn store_offsets<C: ConsumerContext>(consumer: &impl Consumer<C>, next: &[(String, i32, i64)]) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in next {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.store_offsets(&list)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;
    use rdkafka::message::{OwnedHeaders, Timestamp};

    use super::*;

    /// Records what it settles, after yielding `pause(offset)` times: keys
    /// finish in an interleaving the pauses choose.
    struct Recorder {
        applied: Mutex<Vec<(Vec<u8>, i64)>>,
        pauses: Vec<u8>,
        /// Answers `false` (stopped) for this offset.
        stop_at: Option<i64>,
    }

    impl Settle for Recorder {
        fn settle<'a>(&'a self, m: &'a OwnedMessage) -> BoxFuture<'a, bool> {
            Box::pin(async move {
                if self.stop_at == Some(m.offset()) {
                    self.applied.lock().unwrap().push((m.key().unwrap().to_vec(), m.offset()));
                    return false;
                }
                for _ in 0..self.pauses[m.offset() as usize % self.pauses.len()] {
                    tokio::task::yield_now().await;
                }
                self.applied.lock().unwrap().push((m.key().unwrap().to_vec(), m.offset()));
                true
            })
        }
    }

    fn record(partition: i32, offset: i64, key: &str) -> OwnedMessage {
        OwnedMessage::new(
            None,
            Some(key.as_bytes().to_vec()),
            "acme.orders.events".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            Some(OwnedHeaders::new()),
        )
    }

    /// One partition's records: keys drawn from a few, offsets ascending.
    fn partition_log() -> impl Strategy<Value = Vec<OwnedMessage>> {
        prop::collection::vec(0..6u8, 1..80).prop_map(|keys| {
            keys.iter().enumerate().map(|(offset, k)| record(0, offset as i64, &format!("k{k}"))).collect()
        })
    }

    proptest! {
        /// Any batching of a partition's records, with keys settled in any
        /// interleaving, settles every record once and each key's records in
        /// offset order: what applying them one by one would do per key.
        #[test]
        fn batches_keep_each_keys_order(log in partition_log(), cuts in prop::collection::vec(1..20usize, 1..10), delays in prop::collection::vec(0..3u8, 80)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let recorder = Recorder { applied: Mutex::new(Vec::new()), pauses: delays, stop_at: None };
            runtime.block_on(async {
                let mut rest = &log[..];
                let mut cut = cuts.iter().cycle();
                while !rest.is_empty() {
                    let n = (*cut.next().unwrap()).min(rest.len());
                    let (batch, later) = rest.split_at(n);
                    prop_assert!(settle(batch, 4, &recorder).await);
                    prop_assert_eq!(next_offsets(batch), vec![("acme.orders.events".to_owned(), 0, batch.last().unwrap().offset() + 1)]);
                    rest = later;
                }
                Ok(())
            })?;
            let applied = recorder.applied.into_inner().unwrap();
            prop_assert_eq!(applied.len(), log.len());
            for key in 0..6u8 {
                let key = format!("k{key}").into_bytes();
                let order: Vec<i64> = applied.iter().filter(|(k, _)| *k == key).map(|(_, o)| *o).collect();
                let expected: Vec<i64> = log.iter().filter(|m| m.key() == Some(&key[..])).map(|m| m.offset()).collect();
                prop_assert_eq!(order, expected);
            }
        }
    }

    #[tokio::test]
    async fn a_stopped_record_holds_back_its_key_and_the_batch() {
        let batch = vec![record(0, 0, "a"), record(0, 1, "b"), record(0, 2, "a"), record(0, 3, "b")];
        let recorder = Recorder { applied: Mutex::new(Vec::new()), pauses: vec![0], stop_at: Some(0) };
        let settled = settle(&batch, 8, &recorder).await;
        assert!(!settled, "a batch with an unsettled record stores no offset");
        let mut tried: Vec<i64> = recorder.applied.into_inner().unwrap().iter().map(|(_, o)| *o).collect();
        tried.sort();
        assert_eq!(tried, [0, 1, 3], "key a stops at its first record; key b goes on");
    }

    #[test]
    fn groups_by_partition_and_key_in_arrival_order() {
        let batch = vec![record(0, 5, "a"), record(1, 9, "a"), record(0, 6, "b"), record(0, 7, "a")];
        let groups: Vec<Vec<i64>> = by_key(&batch).iter().map(|g| g.iter().map(|m| m.offset()).collect()).collect();
        assert_eq!(groups, [vec![5, 7], vec![9], vec![6]]);
        let mut next = next_offsets(&batch);
        next.sort();
        assert_eq!(next, [("acme.orders.events".to_owned(), 0, 8), ("acme.orders.events".to_owned(), 1, 10)]);
    }
}
