//! Records in lanes, one lane per key: for consumers whose work can fail
//! for one key alone (a process manager's instance), so that a key waiting
//! for a retry holds back only its own later records, never other keys.
//!
//! Every record joins the lane of its (topic, partition, key) and lanes run
//! concurrently, each settling its records one after the other in offset
//! order. Unlike [`batch`](crate::batch), polling goes on while a lane
//! waits: at most `max_in_flight` records are held (waiting in a lane or
//! being settled), so a stuck key costs memory up to that bound and then
//! pauses the consumer, never more. A partition's offset is stored up to
//! its first record not yet settled: a crash replays from there, and what
//! the lanes already settled after it is settled again, which the
//! consumers' idempotent steps absorb.

use std::collections::{BTreeSet, HashMap, VecDeque};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::batch::{store_offsets, store_positions, Settle, IDLE};

/// How many records lanes hold at most.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    pub max_in_flight: usize,
}

impl Default for LaneConfig {
    fn default() -> Self {
        Self { max_in_flight: 1_000 }
    }
}

type Partition = (String, i32);
type LaneKey = (String, i32, Vec<u8>);

fn lane_of(record: &OwnedMessage) -> LaneKey {
    (record.topic().to_owned(), record.partition(), record.key().unwrap_or_default().to_vec())
}

/// Offsets received but not settled, per partition: what may be committed.
#[derive(Debug, Default)]
pub struct Unsettled {
    open: HashMap<Partition, BTreeSet<i64>>,
    /// One past the highest offset received.
    next: HashMap<Partition, i64>,
}

impl Unsettled {
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = (topic.to_owned(), partition);
        self.open.entry(p.clone()).or_default().insert(offset);
        let next = self.next.entry(p).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// Marks `offset` settled; answers the partition's next offset to
    /// commit: its first unsettled record, or past everything received.
    pub fn settled(&mut self, topic: &str, partition: i32, offset: i64) -> i64 {
        let p = (topic.to_owned(), partition);
        let open = self.open.entry(p.clone()).or_default();
        open.remove(&offset);
        open.first().copied().unwrap_or_else(|| self.next.get(&p).copied().unwrap_or(offset + 1))
    }
}

/// Consumes until `stop` (or until `settle_one` answers `false`, stopped),
/// each key in its own lane; offsets are stored as the lanes settle records.
pub async fn consume<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    config: &LaneConfig,
    stop: &CancellationToken,
    settle_one: &impl Settle,
) {
    let records = consumer.stream().filter_map(|message| async move {
        match message {
            Ok(m) => Some(m.detach()),
            Err(e) => {
                warn!(error = %e, "kafka consumer error");
                None
            }
        }
    });
    let commit = |topic: &str, partition, next| {
        if let Err(e) = store_offsets(consumer, &[(topic.to_owned(), partition, next)]) {
            // Revoked meanwhile: the partition's next owner resumes from the
            // last commit.
            debug!(error = %e, topic, partition, "offset not stored");
        }
    };
    run(records, config, stop, settle_one, commit, || drop(store_positions(consumer))).await;
}

/// The lanes over any source of records: `commit(topic, partition, next)`
/// hears each partition's next offset to commit as records settle; `idle`
/// is called when nothing arrived for a while and everything received is
/// settled.
pub async fn run(
    records: impl Stream<Item = OwnedMessage>,
    config: &LaneConfig,
    stop: &CancellationToken,
    settle_one: &impl Settle,
    mut commit: impl FnMut(&str, i32, i64),
    mut idle: impl FnMut(),
) {
    let mut records = std::pin::pin!(records);
    // Records waiting behind the one their lane is settling; a lane is busy
    // while it has an entry here.
    let mut lanes: HashMap<LaneKey, VecDeque<OwnedMessage>> = HashMap::new();
    let mut running: FuturesUnordered<BoxFuture<'_, (OwnedMessage, bool)>> = FuturesUnordered::new();
    let mut unsettled = Unsettled::default();
    let mut held = 0usize;
    let mut ended = false;
    let start = |record: OwnedMessage| -> BoxFuture<'_, (OwnedMessage, bool)> {
        Box::pin(async move {
            let settled = settle_one.settle(&record).await;
            (record, settled)
        })
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some((record, settled)) = running.next(), if !running.is_empty() => {
                if !settled {
                    return;
                }
                held -= 1;
                commit(record.topic(), record.partition(), unsettled.settled(record.topic(), record.partition(), record.offset()));
                let lane = lane_of(&record);
                match lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                    Some(waiting) => running.push(start(waiting)),
                    None => {
                        lanes.remove(&lane);
                    }
                }
                metrics::gauge!("sluice_stream_records_held").set(held as f64);
                if ended && running.is_empty() {
                    return;
                }
            }
            // Nothing arrived for a while and nothing is held: move past
            // what follows the last record that is no record (markers).
            _ = tokio::time::sleep(IDLE), if held == 0 => idle(),
            record = records.next(), if !ended && held < config.max_in_flight.max(1) => {
                let Some(record) = record else {
                    // The source ended: finish what is held.
                    ended = true;
                    if running.is_empty() {
                        return;
                    }
                    continue;
                };
                held += 1;
                unsettled.received(record.topic(), record.partition(), record.offset());
                match lanes.get_mut(&lane_of(&record)) {
                    Some(waiting) => waiting.push_back(record),
                    None => {
                        lanes.insert(lane_of(&record), VecDeque::new());
                        running.push(start(record));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rdkafka::message::{OwnedHeaders, Timestamp};
    use tokio::sync::Semaphore;

    use super::*;

    fn record(offset: i64, key: &str) -> OwnedMessage {
        let headers = Some(OwnedHeaders::new());
        OwnedMessage::new(None, Some(key.as_bytes().to_vec()), "t".into(), Timestamp::NotAvailable, 0, offset, headers)
    }

    /// Settles every record at once, except offset 0, which waits for `gate`.
    struct Stuck {
        gate: Semaphore,
        settled: Mutex<Vec<i64>>,
    }

    impl Settle for Stuck {
        fn settle<'a>(&'a self, m: &'a OwnedMessage) -> BoxFuture<'a, bool> {
            Box::pin(async move {
                if m.offset() == 0 {
                    let _ = self.gate.acquire().await;
                }
                self.settled.lock().unwrap().push(m.offset());
                true
            })
        }
    }

    #[tokio::test]
    async fn a_waiting_key_holds_back_only_its_own_records() {
        let records = vec![record(0, "a"), record(1, "b"), record(2, "a"), record(3, "b"), record(4, "c")];
        let stuck = Stuck { gate: Semaphore::new(0), settled: Mutex::new(Vec::new()) };
        let commits = Mutex::new(Vec::new());
        let (stop, config) = (CancellationToken::new(), LaneConfig::default());
        let lanes = run(
            futures::stream::iter(records),
            &config,
            &stop,
            &stuck,
            |_, _, next| commits.lock().unwrap().push(next),
            || {},
        );
        let check = async {
            while stuck.settled.lock().unwrap().len() < 3 {
                tokio::task::yield_now().await;
            }
            let mut settled = stuck.settled.lock().unwrap().clone();
            settled.sort();
            assert_eq!(settled, [1, 3, 4], "keys b and c went on while a waited");
            assert!(commits.lock().unwrap().iter().all(|&next| next == 0), "nothing past a's record is committed");
            stuck.gate.add_permits(1);
        };
        tokio::join!(lanes, check);
        let settled = stuck.settled.lock().unwrap().clone();
        assert_eq!(settled.iter().filter(|&&o| o == 0 || o == 2).copied().collect::<Vec<_>>(), [0, 2], "a in order");
        assert_eq!(commits.lock().unwrap().last(), Some(&5), "all settled: commit past the end");
    }

    #[test]
    fn the_offset_to_commit_stops_at_the_first_unsettled_record() {
        let mut u = Unsettled::default();
        for offset in 10..15 {
            u.received("t", 0, offset);
        }
        u.received("t", 1, 3);
        assert_eq!(u.settled("t", 0, 11), 10, "offset 10 is still open");
        assert_eq!(u.settled("t", 0, 12), 10);
        assert_eq!(u.settled("t", 0, 10), 13, "10 to 12 settled; 13 is open");
        assert_eq!(u.settled("t", 0, 14), 13);
        assert_eq!(u.settled("t", 0, 13), 15, "everything received is settled");
        assert_eq!(u.settled("t", 1, 3), 4, "partitions are apart");
    }
}
