//! Replays and blue/green rebuilds.
//!
//! - **Replay** (`replay`): re-applies a range of the log to the active tables,
//!   from the earliest offset, a time, or given offsets, up to the ends seen at
//!   its start. Writes are idempotent, so running beside the live projector is
//!   safe and leaves the same rows.
//! - **Rebuild** (`rebuild`): fills the next version's tables from the chosen
//!   point while the current version keeps serving, commits its progress under
//!   the next version's consumer group (a crashed rebuild resumes there), tails
//!   the log until caught up, then switches reads with one conditional update.
//!   The live projector follows the switch and continues from the rebuild's
//!   offsets; the old version's tables are dropped on request.
//!
//! Every [`Projection`] replays and rebuilds through the same code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sluice_streams::batch;
use tokio_util::sync::CancellationToken;

use crate::apply::{Applier, MadeBatch, OffsetTracker, Settling};
use crate::projection::{table_name, table_names, Projection};
use crate::runner::group_of;
use crate::store::{Offsets, ReadModels};
use crate::ProjectorConfig;

/// How many times the live projector's batch a replay takes at once.
const REPLAY_BATCH_FACTOR: usize = 4;

/// How long a replay waits for a record before it looks whether its
/// positions passed the markers that end the partitions (the live
/// projector waits [`batch::IDLE`]): a replay that read every record up to
/// the ends is done but for those markers.
const REPLAY_IDLE: Duration = Duration::from_millis(100);

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    /// Milliseconds since the epoch: the first record at or after it.
    Time(i64),
    /// Where to start in given partitions (`[topic:]partition:offset`); the
    /// partitions not listed are not replayed. A position without a topic
    /// applies to every topic replayed.
    Offsets(Vec<StartOffset>),
}

/// One listed start position of [`StartAt::Offsets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOffset {
    pub topic: Option<String>,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for StartAt {
    /// As `--from` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartAt::Earliest => write!(f, "earliest"),
            StartAt::Time(ms) => match chrono::DateTime::from_timestamp_millis(*ms) {
                Some(t) => write!(f, "{}", t.to_rfc3339()),
                None => write!(f, "{ms} ms"),
            },
            StartAt::Offsets(list) => {
                let items: Vec<String> = list
                    .iter()
                    .map(|o| match &o.topic {
                        Some(t) => format!("{t}:{}:{}", o.partition, o.offset),
                        None => format!("{}:{}", o.partition, o.offset),
                    })
                    .collect();
                write!(f, "{}", items.join(","))
            }
        }
    }
}

impl StartAt {
    /// Whether a listed position names no topic (it then means that
    /// partition of every topic, which is ambiguous with several).
    pub fn has_positions_without_topic(&self) -> bool {
        matches!(self, StartAt::Offsets(list) if list.iter().any(|o| o.topic.is_none()))
    }
}

impl std::str::FromStr for StartAt {
    type Err = String;

    /// `earliest`, an RFC 3339 time, or `[topic:]partition:offset[,…]`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "earliest" {
            return Ok(StartAt::Earliest);
        }
        if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
            return Ok(StartAt::Time(t.timestamp_millis()));
        }
        let positions = s
            .split(',')
            .map(|item| {
                let parts: Vec<&str> = item.trim().split(':').collect();
                let (topic, partition, offset) = match parts[..] {
                    [p, o] => (None, p, o),
                    [t, p, o] if !t.is_empty() => (Some(t.to_owned()), p, o),
                    _ => return Err(()),
                };
                Ok(StartOffset {
                    topic,
                    partition: partition.parse().map_err(drop)?,
                    offset: offset.parse().map_err(drop)?,
                })
            })
            .collect::<Result<Vec<StartOffset>, ()>>()
            .map_err(|()| format!("{s:?} is not `earliest`, an RFC 3339 time, or [topic:]partition:offset[,…]"))?;
        Ok(StartAt::Offsets(positions))
    }
}

/// Progress of a replay, reported as it goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub applied: u64,
    pub dead_lettered: u64,
    /// Records between the current positions and the target ends.
    pub remaining: i64,
    pub events_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub projection: String,
    pub version: i32,
    pub applied: u64,
    pub dead_lettered: u64,
    /// Read-model rows written.
    pub rows: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Set by a rebuild: the version that served before the switch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_previous: Option<bool>,
}

/// What a replay needs to reach Kafka, the registry and the store.
pub struct ReplayCtx {
    pub config: ProjectorConfig,
    pub brokers: String,
    pub registry_url: String,
    pub topics: Vec<String>,
    pub store: Arc<ReadModels>,
}

impl ReplayCtx {
    /// The orders projection of the store's configuration.
    pub fn orders(&self) -> Arc<crate::orders::Orders> {
        Arc::new(self.store.orders().clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Store(#[from] crate::store::ReadModelError),
    #[error("{0}")]
    Other(String),
}

/// Re-applies the log from `start` to the ends seen now, into the active
/// version of `projection`.
pub async fn replay<P: Projection>(
    ctx: &ReplayCtx,
    projection: Arc<P>,
    start: StartAt,
    stop: &CancellationToken,
    progress: impl Fn(&Progress),
) -> Result<ReplayReport, ReplayError> {
    let version = ctx.store.versions().get(projection.name()).await?.active;
    run_version(ctx, projection, version, start, None, false, stop, &progress).await
}

/// Builds the next version from `start`, switches reads to it once caught up,
/// and drops the previous version's tables if `drop_previous`.
pub async fn rebuild<P: Projection>(
    ctx: &ReplayCtx,
    projection: Arc<P>,
    start: StartAt,
    drop_previous: bool,
    stop: &CancellationToken,
    progress: impl Fn(&Progress),
) -> Result<ReplayReport, ReplayError> {
    let name = projection.name().to_owned();
    let name = &name;
    // A version built from a later point lacks the events before it: the
    // version it replaces is the only complete one, and stays.
    let partial_from = (start != StartAt::Earliest).then(|| start.to_string());
    if drop_previous && partial_from.is_some() {
        return Err(ReplayError::Other(format!(
            "a rebuild from {start} builds a partial version: it never drops the complete one it replaces"
        )));
    }
    let state = ctx.store.versions().get(name).await?;
    // A rebuild that crashed left `building` set: resume it.
    let target = state.building.filter(|b| *b > state.active).unwrap_or(state.active + 1);
    ctx.store.versions().start_building(name, target).await?;
    let group = group_of(&ctx.config, name, target);
    let mut report = run_version(ctx, projection.clone(), target, start, Some(group), true, stop, &progress).await?;
    if stop.is_cancelled() {
        return Ok(report);
    }
    if !ctx.store.versions().switch(name, state.active, target, partial_from.as_deref()).await? {
        return Err(ReplayError::Other(format!(
            "version {} is no longer active: another rebuild switched first",
            state.active
        )));
    }
    report.previous_version = Some(state.active);
    if drop_previous {
        // Let the live projector notice the switch and leave the old tables.
        tokio::time::sleep(Duration::from_millis(ctx.config.version_poll_ms * 3)).await;
        drop_version(&ctx.store, &*projection, state.active).await?;
        report.dropped_previous = Some(true);
    }
    Ok(report)
}

/// The tables of one version of a projection.
pub fn version_tables(projection: &impl Projection, version: i32) -> Vec<String> {
    table_names(projection.name(), version, projection.tables())
}

/// Drops the tables of a version that no longer serves.
pub async fn drop_version(store: &ReadModels, projection: &impl Projection, version: i32) -> Result<(), ReplayError> {
    let name = projection.name();
    let state = store.versions().get(name).await?;
    let active = state.active;
    if version >= active {
        return Err(ReplayError::Other(format!("version {version} is not older than the active version {active}")));
    }
    if let Some(from) = &state.active_partial_from {
        return Err(ReplayError::Other(format!(
            "the active version {active} was rebuilt from {from} only: the older versions hold what it lacks \
             (rebuild from earliest before dropping them)"
        )));
    }
    // A version never built, or dropped before, is an error, not a success.
    let keyspace = store.session().get_keyspace().ok_or_else(|| ReplayError::Other("no keyspace in use".into()))?;
    let existing: Vec<String> = store
        .session()
        .query_unpaged("SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?", (keyspace.as_str(),))
        .await
        .map_err(|e| ReplayError::Other(e.to_string()))?
        .into_rows_result()
        .map_err(|e| ReplayError::Other(e.to_string()))?
        .rows::<(String,)>()
        .map_err(|e| ReplayError::Other(e.to_string()))?
        .filter_map(|row| row.ok().map(|(table,)| table))
        .collect();
    let tables = version_tables(projection, version);
    if !tables.iter().any(|t| existing.iter().any(|e| e == t)) {
        return Err(ReplayError::Other(format!(
            "version {version} of projection {name} has no tables (never built, or dropped before): nothing dropped"
        )));
    }
    let former = projection.former_tables().iter().map(|t| table_name(name, t, version));
    for table in tables.into_iter().chain(former) {
        store
            .session()
            .query_unpaged(format!("DROP TABLE IF EXISTS {table}"), ())
            .await
            .map_err(|e| ReplayError::Other(e.to_string()))?;
    }
    Ok(())
}

/// A replay or rebuild of `version` of `projection`.
///
/// The partitions are shared among [`REPLAY_LOOPS`] loops, each with a
/// consumer of its own that takes batches of its partitions and settles them
/// one after the other, as the live projector does: every key, memo and
/// running total belongs to one events partition, so the loops need no
/// order among themselves, and while one waits for its writes another
/// decodes (one loop alone left the store idle while it decoded, and the
/// decoder idle while the store wrote).
#[allow(clippy::too_many_arguments)]
async fn run_version<P: Projection>(
    ctx: &ReplayCtx,
    projection: Arc<P>,
    version: i32,
    start: StartAt,
    commit_group: Option<String>,
    tail_until_caught_up: bool,
    stop: &CancellationToken,
    progress: &impl Fn(&Progress),
) -> Result<ReplayReport, ReplayError> {
    let session = ctx.store.session().clone();
    let name = projection.name().to_owned();
    let applier = Applier::new(&ctx.brokers, &ctx.registry_url, projection, session, version)
        .await?
        .replaying_log(&ctx.brokers, &ctx.topics)
        .await?;
    let settling = Settling::new(&applier, stop);
    // A rebuild records how far its version has applied; a plain replay
    // re-applies into the live version, whose applied offsets are the live
    // projector's: writing its own positions there (behind the live ones, or
    // ending where the log ended when it began) would make the edge say
    // applied operations are not readable yet.
    let offsets = commit_group.as_ref().map(|_| OffsetTracker::new(ctx.store.session().clone(), &name, version));
    let group = commit_group.clone().unwrap_or_else(|| format!("{}.replay.{}", ctx.config.group_prefix, uuid_like()));
    let consumer = || -> Result<Arc<StreamConsumer>, ReplayError> {
        Ok(Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &ctx.brokers)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .create()?,
        ))
    };
    let first = consumer()?;
    let ends_client: Arc<BaseConsumer> = Arc::new(ClientConfig::new().set("bootstrap.servers", &ctx.brokers).create()?);
    // Asked before any consumer fetches anything: the answers come at once.
    let (starts, ends) = blocking_positions(first.clone(), ctx.topics.clone(), start, commit_group.is_some()).await?;
    let mut partitions: Vec<&(String, i32)> = starts.keys().collect();
    partitions.sort();
    // A loop for every share of the partitions, none without one.
    let loops = REPLAY_LOOPS.min(partitions.len()).max(1);
    let mut consumers = vec![first];
    for _ in 1..loops {
        consumers.push(consumer()?);
    }

    // A replay has the whole backlog before it: batches larger than the
    // live projector's keep more writes in flight per round trip of reads.
    let batching = {
        let live = ctx.config.batching();
        batch::BatchConfig {
            max_records: live.max_records * REPLAY_BATCH_FACTOR,
            max_keys_in_flight: live.max_keys_in_flight * REPLAY_BATCH_FACTOR,
            ..live
        }
    };
    let shared = Shared {
        settling: &settling,
        offsets: offsets.as_ref(),
        commit: commit_group.is_some(),
        tail_until_caught_up,
        batching: &batching,
        ends_client: &ends_client,
        topics: &ctx.topics,
        stop,
        remaining: (0..loops).map(|_| AtomicI64::new(0)).collect(),
    };
    let began = Instant::now();
    let report_now = || {
        let (applied, dead_lettered) = settling.counts();
        progress(&Progress {
            applied,
            dead_lettered,
            remaining: shared.remaining.iter().map(|r| r.load(Ordering::Relaxed)).sum(),
            events_per_second: (applied + dead_lettered) as f64 / began.elapsed().as_secs_f64().max(1e-6),
        });
    };
    let loops = consumers.into_iter().enumerate().map(|(i, consumer)| {
        // Partition i, i + loops, …: each loop a share of them.
        let own: Offsets = partitions.iter().skip(i).step_by(loops).map(|&key| (key.clone(), starts[key])).collect();
        let own_ends: Offsets = own.keys().map(|key| (key.clone(), ends[key])).collect();
        replay_loop(&shared, i, consumer, own, own_ends)
    });
    let finished = CancellationToken::new();
    let all_loops = async {
        let done = futures::future::try_join_all(loops).await;
        finished.cancel();
        done
    };
    // Progress and the applied offsets every half second, apart from the
    // loops: one writer of the offsets, so a slow write never lands after
    // a later one.
    let reporting = async {
        report_now();
        loop {
            tokio::select! {
                _ = finished.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            report_now();
            if let Some(offsets) = &offsets {
                offsets.flush().await?;
            }
        }
        Ok::<(), ReplayError>(())
    };
    let (consumers, ()) = tokio::try_join!(all_loops, reporting)?;
    if let Some(offsets) = &offsets {
        offsets.flush().await?;
    }
    let seconds = began.elapsed().as_secs_f64();
    report_now();
    let (applied, dead_lettered) = settling.counts();
    let report = ReplayReport {
        projection: name,
        version,
        applied,
        dead_lettered,
        rows: settling.rows.load(Ordering::Relaxed),
        seconds,
        events_per_second: (applied + dead_lettered) as f64 / seconds.max(1e-6),
        previous_version: None,
        dropped_previous: None,
    };
    tokio::task::spawn_blocking(move || drop(consumers)).await.map_err(|e| ReplayError::Other(e.to_string()))?;
    Ok(report)
}

/// The next offsets of a batch's partitions (`batch::next_offsets`).
type NextOffsets = Vec<(String, i32, i64)>;

/// What a replay loop read and made while it wrote the batch before.
enum Next<M> {
    Made(MadeBatch<M>, NextOffsets),
    /// Nothing arrived for [`REPLAY_IDLE`], or nothing was left to read
    /// up to the ends.
    Idle,
    Stopped,
    Failed(rdkafka::error::KafkaError),
}

/// Loops of one replay that run at once (at most one per partition), each
/// over a share of the partitions.
const REPLAY_LOOPS: usize = 4;

/// What the loops of one replay share.
struct Shared<'a, P: Projection> {
    settling: &'a Settling<'a, P>,
    offsets: Option<&'a OffsetTracker>,
    /// Store and commit the positions under the consumer group (a rebuild).
    commit: bool,
    tail_until_caught_up: bool,
    batching: &'a batch::BatchConfig,
    ends_client: &'a Arc<BaseConsumer>,
    topics: &'a [String],
    stop: &'a CancellationToken,
    /// Records each loop has yet to read up to the ends it last saw.
    remaining: Vec<AtomicI64>,
}

/// One loop of a replay: its partitions from `positions` to the ends (and,
/// when tailing, to the ends seen as it gets there), in batches. Answers its
/// consumer once every position is committed (a rebuild).
async fn replay_loop<P: Projection>(
    shared: &Shared<'_, P>,
    index: usize,
    consumer: Arc<StreamConsumer>,
    mut positions: Offsets,
    mut ends: Offsets,
) -> Result<Arc<StreamConsumer>, ReplayError> {
    let mut assignment = TopicPartitionList::new();
    for ((topic, partition), offset) in &positions {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.assign(&assignment)?;
    let remaining = |positions: &Offsets, ends: &Offsets| -> i64 {
        ends.iter().map(|(k, end)| (end - positions.get(k).copied().unwrap_or(0)).max(0)).sum()
    };
    let mut left = remaining(&positions, &ends);
    shared.remaining[index].store(left, Ordering::Relaxed);
    let mut last_commit = Instant::now();
    // The batch made last, with the next offsets of its partitions: written
    // while the next one is made.
    let mut pending: Option<(MadeBatch<P::Memo>, NextOffsets)> = None;
    loop {
        if left == 0 && pending.is_none() {
            if !shared.tail_until_caught_up {
                break;
            }
            // Caught up with the ends seen before: look again. Under steady
            // load something always arrived meanwhile: stop once that is at
            // most one batch (the live projector goes on from the positions
            // committed with the rebuild).
            let now = blocking_ends(shared.ends_client.clone(), shared.topics.to_vec()).await?;
            ends = ends.keys().map(|key| (key.clone(), now.get(key).copied().unwrap_or(ends[key]))).collect();
            left = remaining(&positions, &ends);
            shared.remaining[index].store(left, Ordering::Relaxed);
            if left <= shared.batching.max_records as i64 {
                break;
            }
        }
        // In batches, like the live projector: different orders at once,
        // each order's events in order. The next batch is read and made
        // while the one before is written; positions move once it is.
        let previous = pending.take();
        // The batch before took the last records up to the ends: nothing
        // to wait for.
        let read_to_the_ends = previous.as_ref().is_some_and(|(_, to)| {
            let mut after = positions.clone();
            after.extend(to.iter().map(|(topic, partition, offset)| ((topic.clone(), *partition), *offset)));
            remaining(&after, &ends) == 0
        });
        let next = async {
            if read_to_the_ends {
                return Next::Idle;
            }
            let first = tokio::select! {
                biased;
                _ = shared.stop.cancelled() => return Next::Stopped,
                m = consumer.recv() => match m {
                    Ok(m) => m,
                    Err(e) => return Next::Failed(e),
                },
                _ = tokio::time::sleep(REPLAY_IDLE) => return Next::Idle,
            };
            let records = batch::fill(&consumer, first, shared.batching).await;
            let made = shared.settling.make_batch(
                &records,
                shared.batching.max_keys_in_flight,
                previous.as_ref().map(|(made, _)| made),
            );
            match made.await {
                Some(made) => Next::Made(made, batch::next_offsets(&records)),
                None => Next::Stopped,
            }
        };
        let written = async {
            match &previous {
                Some((made, _)) => shared.settling.write_batch(made).await,
                None => true,
            }
        };
        let (next, written) = tokio::join!(next, written);
        if let Some((made, written_to)) = previous {
            if !written {
                break;
            }
            shared.settling.keep(made);
            for (topic, partition, offset) in &written_to {
                if let Some(offsets) = shared.offsets {
                    offsets.applied(topic, *partition, offset - 1);
                }
                positions.insert((topic.clone(), *partition), *offset);
            }
            if shared.commit {
                batch::store_offsets(&*consumer, &written_to)?;
            }
        }
        match next {
            Next::Made(made, next_offsets) => pending = Some((made, next_offsets)),
            // Everything received is applied: the positions move past the
            // transaction markers that end the partitions. The replay knows
            // where the log ends, so it looks soon.
            Next::Idle => {
                if let Ok(now) = consumer.position() {
                    for e in now.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            let at = positions.entry((e.topic().to_owned(), e.partition())).or_insert(o);
                            *at = (*at).max(o);
                        }
                    }
                }
            }
            Next::Stopped => break,
            Next::Failed(e) => return Err(e.into()),
        }
        left = remaining(&positions, &ends);
        shared.remaining[index].store(left, Ordering::Relaxed);
        if shared.commit && last_commit.elapsed() > Duration::from_millis(500) {
            consumer.commit_consumer_state(CommitMode::Async)?;
            last_commit = Instant::now();
        }
    }
    if shared.commit && !positions.is_empty() {
        let c = consumer.clone();
        // Offsets of partitions that had nothing to read are committed too,
        // so the live projector starts where the rebuild ended.
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in &positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| ReplayError::Other(e.to_string()))??;
    }
    Ok(consumer)
}

/// Start positions and end offsets of every partition of `topics`.
async fn blocking_positions(
    consumer: Arc<StreamConsumer>,
    topics: Vec<String>,
    start: StartAt,
    resume: bool,
) -> Result<(Offsets, Offsets), ReplayError> {
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let (mut starts, ends) = watermarks(&*consumer, &topics, timeout)?;
        let mut all = TopicPartitionList::new();
        for (topic, partition) in starts.keys() {
            all.add_partition(topic, *partition);
        }
        match &start {
            StartAt::Earliest => {}
            StartAt::Offsets(listed) => {
                for ((topic, partition), offset) in starts.iter_mut() {
                    let position = listed
                        .iter()
                        .find(|o| o.partition == *partition && o.topic.as_ref().is_none_or(|t| t == topic));
                    // A partition not listed is not replayed: it starts at its end.
                    *offset = match position {
                        Some(o) => o.offset.max(*offset),
                        None => ends[&(topic.clone(), *partition)],
                    };
                }
            }
            StartAt::Time(ms) => {
                let mut query = TopicPartitionList::new();
                for (topic, partition) in starts.keys() {
                    query.add_partition_offset(topic, *partition, Offset::Offset(*ms))?;
                }
                let found = consumer.offsets_for_times(query, timeout)?;
                for e in found.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    match e.offset() {
                        Offset::Offset(o) => {
                            starts.insert(key, o);
                        }
                        // No record at or after the time: nothing to replay there.
                        _ => {
                            let end = ends[&key];
                            starts.insert(key, end);
                        }
                    }
                }
            }
        }
        if resume {
            let committed = consumer.committed_offsets(all, timeout)?;
            for e in committed.elements() {
                if let Offset::Offset(o) = e.offset() {
                    starts.insert((e.topic().to_owned(), e.partition()), o);
                }
            }
        }
        Ok((starts, ends))
    })
    .await
    .map_err(|e| ReplayError::Other(e.to_string()))?
}

/// The log's ends now, asked through `client`: not the replaying consumer,
/// whose requests wait behind its fetch in flight (up to
/// `fetch.wait.max.ms`, half a second, per partition asked).
async fn blocking_ends(client: Arc<BaseConsumer>, topics: Vec<String>) -> Result<Offsets, ReplayError> {
    tokio::task::spawn_blocking(move || Ok(watermarks(&*client, &topics, Duration::from_secs(10))?.1))
        .await
        .map_err(|e| ReplayError::Other(e.to_string()))?
}

/// The low and high watermarks of every partition of `topics`.
fn watermarks(
    client: &impl Consumer,
    topics: &[String],
    timeout: Duration,
) -> Result<(Offsets, Offsets), rdkafka::error::KafkaError> {
    let (mut lows, mut highs) = (HashMap::new(), HashMap::new());
    for topic in topics {
        let metadata = client.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = client.fetch_watermarks(t.name(), p.id(), timeout)?;
                lows.insert((t.name().to_owned(), p.id()), low);
                highs.insert((t.name().to_owned(), p.id()), high);
            }
        }
    }
    Ok((lows, highs))
}

fn uuid_like() -> String {
    format!("{:x}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::{StartAt, StartOffset};

    #[test]
    fn parses_start_points() {
        assert_eq!("earliest".parse::<StartAt>().unwrap(), StartAt::Earliest);
        assert_eq!("2026-01-01T00:00:00Z".parse::<StartAt>().unwrap(), StartAt::Time(1_767_225_600_000));
        let at =
            |topic: Option<&str>, partition, offset| StartOffset { topic: topic.map(str::to_owned), partition, offset };
        let bare = "0:15,2:7".parse::<StartAt>().unwrap();
        assert_eq!(bare, StartAt::Offsets(vec![at(None, 0, 15), at(None, 2, 7)]));
        assert!(bare.has_positions_without_topic());
        let named = "acme.orders.events:1:4".parse::<StartAt>().unwrap();
        assert_eq!(named, StartAt::Offsets(vec![at(Some("acme.orders.events"), 1, 4)]));
        assert!(!named.has_positions_without_topic());
        assert!("yesterday".parse::<StartAt>().is_err());
        assert!(":1:4".parse::<StartAt>().is_err());
    }
}
