//! The Kafka consumer every group member of the runtime uses: offsets
//! stored by the runtime once records are settled and committed in the
//! background, reading from the start of a topic it never read,
//! `read_committed`, and a rebalance hook that makes the consumer's parked
//! keys be read again when partitions are assigned (another instance may
//! have parked keys of them meanwhile) and counts the rebalances (what a
//! consumer keeps of its partitions' keys between batches is stale once
//! they moved).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use tracing::{info, warn};

use crate::dead_letter::DeadLetters;
use crate::StreamsError;

/// The rebalance hook: marks the parked keys stale on an assignment, and
/// counts assignments and revocations.
pub struct Rebalances {
    parked_stale: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
}

impl Rebalances {
    /// How many times the consumer's partitions moved so far: a change
    /// between two batches means its partitions may have been applied by
    /// another instance meanwhile.
    pub fn count(&self) -> Arc<AtomicU64> {
        self.count.clone()
    }
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    // Runs inside the consumer's poll, before any record of the new
    // assignment is handed out: the next parked-key check reloads first.
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.count.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(partitions) => {
                info!(partitions = partitions.count(), "partitions assigned");
                self.parked_stale.store(true, Ordering::SeqCst);
            }
            Rebalance::Revoke(partitions) => info!(partitions = partitions.count(), "partitions revoked"),
            Rebalance::Error(e) => info!(error = %e, "rebalance failed"),
        }
    }
}

/// A consumer of `topics` in `group`, for a consumer whose poison records
/// go to `dead_letters`.
pub fn subscribe(
    brokers: &str,
    group: &str,
    topics: &[String],
    dead_letters: &DeadLetters,
) -> Result<StreamConsumer<Rebalances>, StreamsError> {
    let context = Rebalances { parked_stale: dead_letters.stale_flag(), count: Arc::default() };
    let consumer: StreamConsumer<Rebalances> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create_with_context(context)
        .map_err(|e| StreamsError(e.to_string()))?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| StreamsError(e.to_string()))?;
    Ok(consumer)
}

/// How long [`close`] waits for a consumer to commit and leave its group.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

/// Commits what `consumer` stored and closes it (it leaves its group), off
/// the executor and waiting at most [`CLOSE_WITHIN`] ([`crate::blocking`]:
/// a close can wait for its group coordinator for good; seen once, a broker
/// back from an outage as the consumer's session had timed out). A consumer
/// not closed by then is left to finish alone: its stored offsets are
/// committed or not (records read again are settled idempotently), and the
/// group drops it once its session times out.
pub async fn close<C: ConsumerContext + 'static>(consumer: StreamConsumer<C>, what: &str) {
    let closed = crate::blocking::within(CLOSE_WITHIN, move || {
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
        drop(consumer);
    });
    if closed.await.is_none() {
        warn!(consumer = what, within = ?CLOSE_WITHIN, "the Kafka consumer did not close in time; left to close alone");
    }
}
