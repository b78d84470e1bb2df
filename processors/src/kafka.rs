//! Domain events to Kafka, exactly once. A processor produces the events
//! of the partitions it owns through transactional producers it shares per
//! tenant and context ([`Mux`], two lanes, `transactional.id`s
//! [`producer_names`]): the rounds of several
//! partitions that come together share a transaction, which also commits
//! each partition's journal position up to which it relayed, as a
//! consumer-group offset: the context's group `sluice.relay.<tenant>.<context>`,
//! partition p of [`RELAY_TOPIC`] for command partition p ([`Positions`]).
//! A `read_committed` consumer sees a transaction's events together or not
//! at all, and the next owner of a partition starts from the committed
//! position: no event is produced twice, none is skipped. A new owner first
//! fences the producers of the partition's earlier owners
//! ([`RelayFactory::fence`]: their open transactions are aborted, their
//! next calls fail), and ends what their coordinators forgot to
//! ([`crate::hanging`]).
//!
//! Records: key = aggregate id, value = Avro in Confluent wire format,
//! CloudEvents Kafka-binding headers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_schemas::codec::EventCodec;
use sluice_schemas::{catalog, names};
use sluice_streams::clusters::Clusters;

use crate::amqp::consumer::PartitionRef;
use crate::hanging;
use crate::operations::EventPosition;

/// The topic whose offsets hold the relay positions: partition p in a
/// context's group is command partition p's. It holds no records, and has at
/// least as many partitions as a context has command partitions
/// ([`ensure_relay_topic`]).
pub const RELAY_TOPIC: &str = "sluice.relay";

/// One event ready to publish.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub topic: String,
    /// The aggregate id: all events of one aggregate land in one partition.
    pub key: String,
    pub event_id: String,
    pub event_type: String,
    pub source: String,
    pub time_ms: i64,
    pub avro: apache_avro::types::Value,
    pub traceparent: Option<String>,
    /// The journal seq of the entry it comes from. With the relay's name it
    /// goes into the record's headers (`sluice-relay`, `sluice-seq`): a
    /// hanging transaction's records then tell whether the relay position
    /// counts them as relayed.
    pub seq: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Kafka or the registry failed for now (or refused an event): the
    /// transaction was aborted; try again with backoff.
    #[error("kafka: {0}")]
    Transient(String),
    /// The processor's producer was fenced: a newer owner took one of its
    /// partitions over (maybe this one; the journal says which), or a
    /// newer process of the same name started. The transaction is aborted.
    #[error("fenced by a newer owner: {0}")]
    Fenced(String),
}

/// The transactional side of one command partition: [`Relay::produce`]
/// joins a transaction (which other partitions of the processor may share),
/// then [`Relay::commit`] or [`Relay::abort`] gives this partition's vote.
pub trait Relay: Send + Sync {
    /// Joins a transaction and produces `events` in it; resolves once every
    /// event is acknowledged, with their positions. On an error the
    /// transaction is aborted.
    fn produce(
        &self,
        events: Vec<OutgoingEvent>,
    ) -> impl Future<Output = Result<Vec<EventPosition>, RelayError>> + Send;
    /// Commits the transaction with `next` (the first journal seq it does
    /// not cover) as the relay position, once every partition in it voted
    /// to commit; fails if another one made it abort.
    fn commit(&self, next: i64) -> impl Future<Output = Result<(), RelayError>> + Send;
    /// Aborts the transaction: none of its events becomes visible, nor those
    /// of the other partitions in it.
    fn abort(&self) -> impl Future<Output = Result<(), RelayError>> + Send;
    /// The relay position as Kafka holds it now, once no commit of it is
    /// pending (`None`: never committed). Answers within a few seconds.
    fn position(&self) -> impl Future<Output = Result<Option<i64>, RelayError>> + Send;
    /// One past the highest journal seq among this relay's records that a
    /// `read_committed` consumer of the events topic sees (`None`: none),
    /// once every transaction open when it asked has ended. The events
    /// themselves: the position committed beside them can disagree after a
    /// Kafka restart (a commit to the relay's group never marked, or lost,
    /// while the same transaction's events stand).
    fn relayed_on_topic(&self) -> impl Future<Output = Result<Option<i64>, RelayError>> + Send;
}

/// The relay position a new owner reads from Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPosition {
    /// `None`: never committed.
    pub committed: Option<i64>,
    /// Read past a commit left pending, which may be one whose transaction
    /// went through on the events (seen after a Kafka restart: the events
    /// committed, the commit to the relay's group never marked), so the
    /// position may lag what Kafka holds.
    pub may_lag: bool,
}

/// Opens relays: one per owned partition, over a producer per context that
/// the processor's partitions share.
pub trait RelayFactory: Send + Sync {
    type Relay: Relay + 'static;
    /// Fences the producers of the partition's earlier owners (`owners`, by
    /// processor name; a producer of the partition's own from before
    /// producers were shared too): none of their transactions can commit
    /// from then on. A new owner calls it after its claim and before
    /// [`RelayFactory::open`].
    fn fence(&self, partition: &PartitionRef, owners: &[String])
        -> impl Future<Output = Result<(), RelayError>> + Send;
    /// The relay of `owner`, the processor, for the partition, with the
    /// committed relay position.
    fn open(
        &self,
        partition: &PartitionRef,
        owner: &str,
    ) -> impl Future<Output = Result<(Self::Relay, RelayPosition), RelayError>> + Send;
    /// Ends what the partition's relay left hanging ([`crate::hanging`]),
    /// whoever owns the partition now, or nobody: a partition can come to
    /// hang after its owner last looked. Best effort (logged); safe beside
    /// a live owner.
    fn sweep(&self, partition: &PartitionRef) -> impl Future<Output = ()> + Send;
}

/// Kafka and the registry.
pub struct KafkaRelays {
    /// Each tenant's cluster: a partition's relay writes there.
    clusters: Clusters,
    codec: Arc<EventCodec>,
    /// The shared producers, by transactional id.
    muxes: std::sync::Mutex<HashMap<String, Arc<Mux>>>,
    /// A `read_committed` client of each context's relay group, by group.
    groups: std::sync::Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

impl KafkaRelays {
    pub fn new(clusters: Clusters, registry_url: &str) -> Result<Self, RelayError> {
        let codec = EventCodec::new(registry_url).map_err(|e| RelayError::Transient(e.to_string()))?;
        Ok(Self { clusters, codec: Arc::new(codec), muxes: Default::default(), groups: Default::default() })
    }

    fn brokers(&self, tenant: &str) -> Result<&str, RelayError> {
        self.clusters
            .brokers_for(tenant)
            .ok_or_else(|| RelayError::Transient(format!("no Kafka cluster is configured for tenant {tenant}")))
    }

    /// `owner`'s producers for the partition's tenant and context.
    fn mux(&self, partition: &PartitionRef, owner: &str) -> Result<Arc<Mux>, RelayError> {
        let ids = producer_names(partition, owner);
        let mut muxes = self.muxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mux) = muxes.get(&ids[0]) {
            return Ok(mux.clone());
        }
        let brokers = self.brokers(&partition.tenant)?;
        let metadata = self.positions(partition)?.group_metadata().ok_or_else(|| {
            RelayError::Transient(format!(
                "no group metadata for {}",
                relay_group(&partition.tenant, partition.context)
            ))
        })?;
        let key = ids[0].clone();
        let mux = Arc::new(Mux::new(brokers, ids, metadata));
        muxes.insert(key, mux.clone());
        Ok(mux)
    }
}

impl KafkaRelays {
    /// The `read_committed` client of the partition's context's relay group.
    fn positions(&self, partition: &PartitionRef) -> Result<Arc<BaseConsumer>, RelayError> {
        let group = relay_group(&partition.tenant, partition.context);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = groups.get(&group) {
            return Ok(client.clone());
        }
        let client =
            Arc::new(group_client(self.brokers(&partition.tenant)?, &group, "read_committed").map_err(kafka_err)?);
        groups.insert(group, client.clone());
        Ok(client)
    }
}

/// The transactional ids of `owner`'s producers for the partition's tenant
/// and context, one per lane of its [`Mux`]: `<relay group>.<owner>`, then
/// `<relay group>~<lane>.<owner>` (no owner name makes one lane's id
/// another's: the relay group is followed by `.` in the first only).
pub fn producer_names(partition: &PartitionRef, owner: &str) -> [String; LANES] {
    let group = relay_group(&partition.tenant, partition.context);
    std::array::from_fn(|lane| match lane {
        0 => format!("{group}.{owner}"),
        lane => format!("{group}~{lane}.{owner}"),
    })
}

/// The name of a partition's relay: its transactional id, and the name its
/// records carry (`sluice-relay`).
pub fn relay_name(partition: &PartitionRef) -> String {
    format!("sluice.relay.{}.{}.{}", partition.tenant, partition.context, partition.partition)
}

/// The consumer group holding the relay positions of a context's partitions.
pub fn relay_group(tenant: &str, context: &str) -> String {
    format!("sluice.relay.{tenant}.{context}")
}

/// How long a transaction call may take before it counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Relay::position`] waits for Kafka's answer: it is only a
/// check before each try, which goes ahead without it.
const POSITION_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a relay's transaction may stay open before its coordinator
/// aborts it (`transaction.timeout.ms`).
const TXN_LIFETIME: Duration = Duration::from_secs(60);

/// A transaction whose producer last wrote to a partition longer ago than
/// this is not live, whatever its coordinator says (clocks may differ a
/// little: the time is the producer's).
const STALE_AFTER: Duration = Duration::from_secs(90);

fn kafka_err(e: KafkaError) -> RelayError {
    let fenced = match &e {
        KafkaError::Transaction(t) => t.is_fatal(),
        other => matches!(
            other.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch | RDKafkaErrorCode::Fatal)
        ),
    };
    if fenced {
        RelayError::Fenced(e.to_string())
    } else {
        RelayError::Transient(e.to_string())
    }
}

/// Runs a blocking librdkafka call off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| RelayError::Transient(e.to_string()))?.map_err(kafka_err)
}

impl RelayFactory for KafkaRelays {
    type Relay = KafkaRelay;

    async fn fence(&self, partition: &PartitionRef, owners: &[String]) -> Result<(), RelayError> {
        let brokers = self.brokers(&partition.tenant)?;
        let ids = owners.iter().flat_map(|owner| producer_names(partition, owner)).chain([relay_name(partition)]);
        let fenced = ids.map(|id| {
            let brokers = brokers.to_owned();
            blocking(move || {
                // A producer of the same transactional id: its
                // initialisation aborts the earlier one's open transaction
                // and moves the id to a newer epoch, which fails the earlier
                // producer's every later call.
                let producer: BaseProducer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("transactional.id", &id)
                    .set("transaction.timeout.ms", TXN_LIFETIME.as_millis().to_string())
                    .create()?;
                producer.init_transactions(TXN_TIMEOUT)
            })
        });
        futures::future::try_join_all(fenced).await.map(drop)
    }

    async fn open(&self, partition: &PartitionRef, owner: &str) -> Result<(KafkaRelay, RelayPosition), RelayError> {
        let name = relay_name(partition);
        let brokers = self.brokers(&partition.tenant)?;
        let mux = self.mux(partition, owner)?;
        // Initialised before the position is read: that fences a process
        // of the same name from before. The claim came before: the
        // partition was this owner's when the producer was set up (or a
        // later producer would have been fenced), and its begin checks the
        // claim again.
        let generation = mux.ready().await?;
        let positions = Arc::new(Positions::new(brokers, partition, self.positions(partition)?, "read_committed"));
        let (position, may_lag) = match positions.clone().read(TXN_TIMEOUT).await {
            Ok(position) => (position, false),
            // A stable read waits while a transactional commit of the
            // partition's position is pending. Once the earlier owners'
            // producers are fenced, none of their transactions is open any
            // more: a commit still pending is one Kafka
            // never marked (seen after broker restarts), and this owner's
            // first commit settles it. Its transaction may have committed
            // the events all the same (seen once: the events marked
            // committed, the commit to the group never), so the position
            // read past it may lag; the owner weighs it against the
            // journal's note.
            Err(RelayError::Transient(stable)) => {
                let plain =
                    group_client(brokers, &relay_group(&partition.tenant, partition.context), "read_uncommitted")
                        .map_err(kafka_err)?;
                let plain = Arc::new(Positions::new(brokers, partition, Arc::new(plain), "read_uncommitted"));
                let position = plain.read(TXN_TIMEOUT).await?;
                tracing::warn!(relay = %name, ?position, %stable, "relay position read past a pending commit of an ended transaction");
                (position, true)
            }
            Err(fenced) => return Err(fenced),
        };
        let topic = names::events_topic(&partition.tenant, partition.context);
        end_hanging(brokers, &name, &topic, async { Ok(position) }).await;
        let relay = KafkaRelay {
            mux,
            positions,
            brokers: brokers.to_owned(),
            name,
            topic,
            codec: self.codec.clone(),
            ticket: std::sync::Mutex::new(None),
            checked: AtomicU64::new(generation),
        };
        Ok((relay, RelayPosition { committed: position, may_lag }))
    }

    async fn sweep(&self, partition: &PartitionRef) {
        let Some(brokers) = self.clusters.brokers_for(&partition.tenant) else { return };
        let name = relay_name(partition);
        let topic = names::events_topic(&partition.tenant, partition.context);
        // Read only if something hangs; a commit in flight makes the stable
        // read fail, and the next sweep looks again.
        let relayed = async {
            Arc::new(Positions::new(brokers, partition, self.positions(partition)?, "read_committed"))
                .read(TXN_TIMEOUT)
                .await
        };
        end_hanging(brokers, &name, &topic, relayed).await;
    }
}

/// Ends what a producer of relay `name` left open on a partition of
/// `topic` that its coordinator forgot ([`crate::hanging`]): those whose
/// first record is the relay's (a shared producer's transaction whose first
/// record is another relay's is that relay's to judge), or found by the
/// epoch of the relay's own producer from before producers were shared
/// (records from before the `sluice-relay` header). `relayed` reads
/// the relay position committed so far (only when something hangs). A
/// hanging transaction is committed when the coordinator committed it on
/// its other partitions: the position counts its records as relayed and no
/// later transaction produced them again. Any other is aborted: its
/// entries lie past the position, or a later transaction carries them. Best
/// effort: a failure is logged and looked at again at the next open, abort
/// or sweep; meanwhile the relay works as before, and the hanging
/// transaction shows as a projection lag that does not shrink.
async fn end_hanging(
    brokers: &str,
    name: &str,
    topic: &str,
    relayed: impl Future<Output = Result<Option<i64>, RelayError>>,
) {
    let ended = async {
        let found = hanging::find_hanging(brokers, topic, STALE_AFTER).await?;
        let mut ours = Vec::new();
        for hanging in found {
            let first = first_record(brokers, name, topic, &hanging).await.map_err(|e| e.to_string())?;
            // One found by its age alone may be another relay's.
            if first.ours || (hanging.by_epoch && hanging.transactional_id.as_deref() == Some(name)) {
                ours.push((hanging, first));
            }
        }
        if ours.is_empty() {
            return Ok(Vec::new());
        }
        let relayed = relayed.await.map_err(|e| e.to_string())?;
        let mut ended = Vec::new();
        for (hanging, first) in ours {
            let counted = matches!((first.seq, relayed), (Some(seq), Some(relayed)) if seq < relayed);
            let commit = counted && !first.produced_again;
            hanging::end(topic, &hanging, commit).await?;
            ended.push((hanging, commit, first));
        }
        Ok::<_, String>(ended)
    };
    match ended.await {
        Ok(ended) => {
            for (h, commit, first) in ended {
                let outcome = if commit { "committed" } else { "aborted" };
                metrics::counter!("sluice_kafka_hanging_transactions_ended_total", "outcome" => outcome).increment(1);
                tracing::warn!(
                    relay = %name, %topic, partition = h.partition, producer_id = h.producer_id,
                    producer_epoch = h.producer_epoch, first_offset = h.first_offset, seq = ?first.seq,
                    produced_again = first.produced_again, outcome,
                    "ended a transaction its coordinator had forgotten (the partition's readers were stuck at its first offset)"
                );
            }
        }
        Err(reason) => tracing::warn!(relay = %name, %topic, %reason, "could not look for hanging transactions"),
    }
}

/// What a hanging transaction's first record says.
#[derive(Debug)]
struct FirstRecord {
    /// It names the relay (`sluice-relay`).
    ours: bool,
    /// The journal seq it carries (`None`: a record from before the
    /// `sluice-seq` header, or another relay's). One transaction carries the
    /// entries of one round or catch-up, all relayed or none, so its first
    /// record speaks for all of them.
    seq: Option<i64>,
    /// A later record of the partition carries the same entry of the same
    /// relay: a later transaction produced it again, so this one's
    /// coordinator did not commit it.
    produced_again: bool,
}

/// Reads a hanging transaction's first record, then the partition up to
/// its end for a later copy of the same entry (records of one entry share
/// a key, so a copy lands in the same partition).
async fn first_record(
    brokers: &str,
    name: &str,
    topic: &str,
    hanging: &hanging::Hanging,
) -> Result<FirstRecord, RelayError> {
    let (brokers, name, topic, partition, first) =
        (brokers.to_owned(), name.to_owned(), topic.to_owned(), hanging.partition, hanging.first_offset);
    blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("{name}.hanging"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let (_, end) = reader.fetch_watermarks(&topic, partition, TXN_TIMEOUT)?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, partition, Offset::Offset(first))?;
        reader.assign(&assignment)?;
        let deadline = std::time::Instant::now() + TXN_TIMEOUT;
        let (mut ours, mut seq) = (false, None);
        let mut next = first;
        while next < end {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
            }
            let polled = reader.poll(Duration::from_millis(200));
            // A partition mostly ends with a transaction marker, which no
            // poll returns: the position moves past it.
            next = next.max(position_in(&reader, &topic, partition)?);
            let Some(message) = polled else { continue };
            let message = message?;
            next = next.max(message.offset() + 1);
            let Some(this) = entry_of(&message, &name) else {
                if message.offset() == first {
                    break;
                }
                continue;
            };
            if message.offset() == first {
                ours = true;
                seq = this;
                if seq.is_none() {
                    break;
                }
            } else if this.is_some() && this == seq {
                return Ok(FirstRecord { ours, seq, produced_again: true });
            }
        }
        Ok(FirstRecord { ours, seq, produced_again: false })
    })
    .await
}

/// How many records [`last_relayed`] reads back from a partition's end at
/// first; each further look back reads twice as many.
const SCAN_WINDOW: i64 = 1_000;

/// How long [`last_relayed`] may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Relay::relayed_on_topic`]: reads each partition of `topic` back from
/// its end (as it was when asked), `read_committed`, a window at a time,
/// until a window holds records of relay `name`. A relay produces its
/// entries in seq order, so the highest seq among its latest records on a
/// partition is the highest there. A partition is read up to that end only
/// once every transaction open on it then has ended: an error after
/// [`SCAN_TIMEOUT`] (a hanging one waits for a sweep).
async fn last_relayed(brokers: &str, name: &str, topic: &str) -> Result<Option<i64>, RelayError> {
    let (brokers, name, topic) = (brokers.to_owned(), name.to_owned(), topic.to_owned());
    blocking(move || {
        let client = |isolation: &str| {
            ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("{name}.scan"))
                .set("enable.auto.commit", "false")
                .set("isolation.level", isolation)
                .create::<BaseConsumer>()
        };
        // Ends as written (uncommitted records included) and a reader of
        // what committed.
        let (ends, reader) = (client("read_uncommitted")?, client("read_committed")?);
        let deadline = std::time::Instant::now() + SCAN_TIMEOUT;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        let metadata = ends.fetch_metadata(Some(&topic), left())?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut highest: Option<i64> = None;
        for partition in partitions {
            let (low, high) = ends.fetch_watermarks(&topic, partition, left())?;
            let (mut end, mut window) = (high, SCAN_WINDOW);
            while end > low {
                let start = (end - window).max(low);
                let mut assignment = TopicPartitionList::new();
                assignment.add_partition_offset(&topic, partition, Offset::Offset(start))?;
                reader.assign(&assignment)?;
                let mut found: Option<i64> = None;
                // The position moves past aborted records and transaction
                // markers too, but never past a transaction still open.
                while position_in(&reader, &topic, partition)? < end {
                    if left().is_zero() {
                        return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
                    }
                    let Some(message) = reader.poll(Duration::from_millis(100)) else { continue };
                    let message = message?;
                    if message.offset() >= end {
                        continue;
                    }
                    if let Some(Some(seq)) = entry_of(&message, &name) {
                        found = Some(found.map_or(seq, |f| f.max(seq)));
                    }
                }
                if let Some(seq) = found {
                    highest = Some(highest.map_or(seq + 1, |h| h.max(seq + 1)));
                    break;
                }
                end = start;
                window *= 2;
            }
        }
        Ok(highest)
    })
    .await
}

/// What a record's `sluice-relay` and `sluice-seq` headers say: `None`
/// when relay `name` did not produce it, else the journal seq it carries
/// (`None` in a record from before that header).
fn entry_of(message: &impl Message, name: &str) -> Option<Option<i64>> {
    let header = |key: &str| message.headers()?.iter().find(|h| h.key == key)?.value;
    if header("sluice-relay")? != name.as_bytes() {
        return None;
    }
    Some(header("sluice-seq").and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()))
}

/// The position of `reader` in one partition it is assigned (0 before it
/// fetched), past what no poll returns (transaction markers, aborted
/// records under `read_committed`).
fn position_in(reader: &BaseConsumer, topic: &str, partition: i32) -> Result<i64, KafkaError> {
    let position = reader.position()?;
    Ok(match position.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => o,
        _ => 0,
    })
}

/// Where one command partition's relay position is read: partition p of
/// [`RELAY_TOPIC`] in its context's group ([`relay_group`]), so that one
/// transaction can commit the positions of several partitions. Positions
/// committed before this layout (one group per partition, named as its
/// relay, at partition 0) are read when the context's group has none; the
/// next commit moves the position over.
struct Positions {
    /// A client of the context's group (never joined: it reads positions),
    /// shared by the context's relays.
    group: Arc<BaseConsumer>,
    partition: i32,
    /// Where the earlier layout's group is read: the brokers, the group and
    /// the isolation level of `group`.
    brokers: String,
    legacy: String,
    isolation: &'static str,
}

impl Positions {
    /// `group`: a client of the context's group; a `read_committed` one
    /// reads stable positions (it fails while a commit of the position is
    /// pending).
    fn new(brokers: &str, partition: &PartitionRef, group: Arc<BaseConsumer>, isolation: &'static str) -> Self {
        Self {
            group,
            partition: i32::from(partition.partition),
            brokers: brokers.to_owned(),
            legacy: relay_name(partition),
            isolation,
        }
    }

    /// The committed relay position (`None`: never committed), waiting at
    /// most `timeout` per group asked.
    async fn read(self: Arc<Self>, timeout: Duration) -> Result<Option<i64>, RelayError> {
        blocking(move || {
            let committed = |client: &BaseConsumer, partition: i32| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(RELAY_TOPIC, partition);
                let committed = client.committed_offsets(tpl, timeout)?;
                Ok::<_, KafkaError>(committed.find_partition(RELAY_TOPIC, partition).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                }))
            };
            match committed(&self.group, self.partition)? {
                Some(position) => Ok(Some(position)),
                None => committed(&group_client(&self.brokers, &self.legacy, self.isolation)?, 0),
            }
        })
        .await
    }
}

/// A client of consumer group `group` that never joins it: it reads the
/// group's offsets and lends its metadata to transactions.
fn group_client(brokers: &str, group: &str, isolation: &str) -> Result<BaseConsumer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
}

/// Creates [`RELAY_TOPIC`] with a partition per command partition of a
/// context (`partitions`), or adds the partitions it lacks.
pub async fn ensure_relay_topic(brokers: &str, partitions: u16, replication: Replication) -> Result<(), RelayError> {
    let wanted = i32::from(partitions).max(1);
    ensure_topics(brokers, &[RELAY_TOPIC.to_owned()], wanted, replication).await?;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(kafka_err)?;
    let metadata = admin.inner().fetch_metadata(Some(RELAY_TOPIC), Duration::from_secs(10)).map_err(kafka_err)?;
    let has = metadata.topics().first().map_or(0, |t| t.partitions().len());
    if has >= wanted as usize {
        return Ok(());
    }
    let grow = NewPartitions::new(RELAY_TOPIC, wanted as usize);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_partitions(&[grow], &options).await.map_err(kafka_err)?;
    for result in results {
        match result {
            // Another processor grew it meanwhile.
            Ok(_) | Err((_, RDKafkaErrorCode::InvalidPartitions)) => {}
            Err((topic, code)) => return Err(RelayError::Transient(format!("adding partitions to {topic}: {code}"))),
        }
    }
    Ok(())
}

/// One partition's relay: its rounds go through the processor's shared
/// producer for the context.
pub struct KafkaRelay {
    mux: Arc<Mux>,
    /// Where its position is read.
    positions: Arc<Positions>,
    brokers: String,
    /// The relay's name, on its records.
    name: String,
    /// The events topic it produces to.
    topic: String,
    codec: Arc<EventCodec>,
    /// The transaction its round joined, from `produce` to its vote.
    ticket: std::sync::Mutex<Option<Ticket>>,
    /// The newest generation of the shared producers ([`Mux`]) that this
    /// relay may produce through: it was the partition's owner after every
    /// producer up to that one was set up. A newer one (set up after a
    /// fence) fails the next produce with [`RelayError::Fenced`] once, so
    /// the owner asks the journal whether the partition is still its own
    /// before anything of the partition goes into a transaction of that
    /// producer.
    checked: AtomicU64,
}

impl KafkaRelay {
    async fn encode(&self, event: &OutgoingEvent) -> Result<Vec<u8>, RelayError> {
        let spec = catalog::event_spec(&event.event_type)
            .ok_or_else(|| RelayError::Transient(format!("no Avro schema for {}", event.event_type)))?;
        self.codec
            .encode_value(&event.topic, spec, event.avro.clone())
            .await
            .map_err(|e| RelayError::Transient(format!("registry: {e}")))
    }

    /// Sends the encoded events through `producer` and waits for them.
    async fn send_all(
        &self,
        producer: &FutureProducer,
        events: &[OutgoingEvent],
        payloads: &[Vec<u8>],
    ) -> Result<Vec<EventPosition>, RelayError> {
        let started = std::time::Instant::now();
        let sends = events.iter().zip(payloads).map(|(event, payload)| {
            let time = chrono::DateTime::from_timestamp_millis(event.time_ms).unwrap_or_default().to_rfc3339();
            let mut headers = OwnedHeaders::new_with_capacity(10)
                .insert(Header { key: "ce_specversion", value: Some("1.0") })
                .insert(Header { key: "ce_id", value: Some(event.event_id.as_str()) })
                .insert(Header { key: "ce_source", value: Some(event.source.as_str()) })
                .insert(Header { key: "ce_type", value: Some(event.event_type.as_str()) })
                .insert(Header { key: "ce_time", value: Some(time.as_str()) })
                .insert(Header { key: "ce_subject", value: Some(event.key.as_str()) })
                .insert(Header { key: "content-type", value: Some("application/avro") });
            let seq = event.seq.to_string();
            headers = headers
                .insert(Header { key: "sluice-relay", value: Some(self.name.as_str()) })
                .insert(Header { key: "sluice-seq", value: Some(seq.as_str()) });
            if let Some(traceparent) = &event.traceparent {
                headers = headers.insert(Header { key: "traceparent", value: Some(traceparent.as_str()) });
            }
            let record = FutureRecord::to(&event.topic).key(&event.key).payload(payload).headers(headers);
            // Queued in call order: one key's events keep their order.
            producer.send_result(record).map_err(|(e, _)| kafka_err(e))
        });
        let queued = sends.collect::<Result<Vec<_>, _>>()?;
        let mut positions = Vec::with_capacity(events.len());
        for (event, delivery) in events.iter().zip(queued) {
            let delivery = delivery
                .await
                .map_err(|_| RelayError::Transient("producer dropped the delivery".into()))?
                .map_err(|(e, _)| kafka_err(e))?;
            positions.push(EventPosition {
                event_type: event.event_type.clone(),
                topic: event.topic.clone(),
                partition: delivery.partition,
                offset: delivery.offset,
            });
        }
        metrics::histogram!("sluice_kafka_produce_seconds").record(started.elapsed().as_secs_f64());
        Ok(positions)
    }

    fn take_ticket(&self) -> Option<Ticket> {
        self.ticket.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Relay for KafkaRelay {
    async fn produce(&self, events: Vec<OutgoingEvent>) -> Result<Vec<EventPosition>, RelayError> {
        // A round given up after its produce left its vote open.
        if let Some(left) = self.take_ticket() {
            let _ = left.abort("the round that joined it was given up").await;
        }
        // Encoded before joining: a slow registry holds no transaction open.
        let mut payloads = Vec::with_capacity(events.len());
        for event in &events {
            payloads.push(self.encode(event).await?);
        }
        let unchecked = |generation: u64| {
            self.checked.store(generation, Ordering::SeqCst);
            RelayError::Fenced(format!(
                "the processor's producer was set up again (generation {generation}) after a takeover fenced it"
            ))
        };
        // A lane set up after the last check: checked first.
        let generation = self.mux.generation.load(Ordering::SeqCst);
        if generation > self.checked.load(Ordering::SeqCst) {
            return Err(unchecked(generation));
        }
        let ticket = self.mux.join().await?;
        if ticket.generation > self.checked.load(Ordering::SeqCst) {
            // Set up again meanwhile: checked first, like above.
            let _ = ticket.abort("a partition's ownership is checked first").await;
            return Err(unchecked(self.mux.generation.load(Ordering::SeqCst)));
        }
        match self.send_all(&ticket.producer, &events, &payloads).await {
            Ok(positions) => {
                *self.ticket.lock().unwrap_or_else(|e| e.into_inner()) = Some(ticket);
                Ok(positions)
            }
            Err(e) => match ticket.abort(&e.to_string()).await {
                Err(fenced @ RelayError::Fenced(_)) => Err(fenced),
                _ => Err(e),
            },
        }
    }

    async fn commit(&self, next: i64) -> Result<(), RelayError> {
        let ticket = self.take_ticket().ok_or_else(|| RelayError::Transient("no transaction to commit".into()))?;
        ticket.commit(self.positions.partition, next).await
    }

    async fn position(&self) -> Result<Option<i64>, RelayError> {
        self.positions.clone().read(POSITION_TIMEOUT).await
    }

    async fn relayed_on_topic(&self) -> Result<Option<i64>, RelayError> {
        last_relayed(&self.brokers, &self.name, &self.topic).await
    }

    async fn abort(&self) -> Result<(), RelayError> {
        let Some(ticket) = self.take_ticket() else { return Ok(()) };
        let aborted = ticket.abort("its partition aborted").await;
        if aborted.is_ok() {
            // Aborts follow Kafka trouble, when librdkafka may have moved
            // the producer to a new epoch on its own (a delivery timed
            // out): what the coordinator forgot is found as at an open.
            // The position as Kafka has it: a commit whose answer was lost
            // may have gone through.
            let relayed = self.positions.clone().read(TXN_TIMEOUT);
            end_hanging(&self.brokers, &self.name, &self.topic, relayed).await;
        }
        aborted
    }
}

/// The transactional producers one processor shares among the partitions
/// of one tenant's context it owns, one per lane ([`producer_names`]). The
/// rounds of several partitions that come together go into one
/// transaction, with each partition's relay position: a busy processor
/// commits a transaction per batch of rounds instead of one per partition
/// and round.
///
/// A transaction takes every partition that joins it until the first of
/// them votes; later ones start the next, on a lane whose transaction
/// ended. Two lanes let the next transaction begin while the one before
/// ends: a producer can hold one transaction at a time, and Kafka refuses
/// to add partitions to a producer's next one until it wrote the markers
/// of the last (`CONCURRENT_TRANSACTIONS`, which librdkafka retries 20 ms
/// later). A transaction commits once every partition in it voted to
/// commit, and aborts if one of them votes to abort or drops out (its task
/// ended): a partition's records never become visible without its
/// position. A partition's rounds are finished one at a time, so its
/// transactions follow each other whatever their lanes. A new owner of a
/// partition fences every lane of the previous owner
/// ([`RelayFactory::fence`]), which ends that processor's open transactions
/// for all its partitions: each of them goes on only once the journal says
/// it still owns it ([`crate::owner`]).
struct Mux {
    brokers: String,
    /// The lanes' transactional ids.
    ids: [String; LANES],
    /// The context's relay group: its metadata goes with every commit.
    group: Arc<ConsumerGroupMetadata>,
    /// Held while a transaction begins, and while votes are counted.
    state: Arc<tokio::sync::Mutex<MuxState>>,
    /// Counts the producers set up on every lane (0: none yet); a lane's
    /// producer is set up again once fenced.
    generation: AtomicU64,
    /// Bumped whenever a transaction ended, freeing its lane.
    freed: tokio::sync::watch::Sender<u64>,
}

/// Transactional producers per [`Mux`].
const LANES: usize = 2;

#[derive(Default)]
struct MuxState {
    lanes: [Lane; LANES],
    /// The transaction partitions join, until one of them votes.
    open: Option<OpenTransaction>,
    /// Transactions that take no more partitions and wait for votes.
    sealed: Vec<OpenTransaction>,
    begun: u64,
}

impl MuxState {
    /// Lane `fenced`'s producer was fenced: a takeover fences every lane
    /// of this processor at once, so the idle lanes' producers go too (a
    /// busy one finds out when its transaction ends).
    fn forget_fenced(&mut self, fenced: usize) {
        for (index, lane) in self.lanes.iter_mut().enumerate() {
            if index == fenced || !lane.busy {
                lane.producer = None;
            }
        }
    }
}

#[derive(Default)]
struct Lane {
    /// `None` until initialised, and once fenced; with its generation.
    producer: Option<(FutureProducer, u64)>,
    /// The last transaction failed and its abort did not go through: it is
    /// aborted before the next begins.
    unaborted: bool,
    /// A transaction of this lane began and has not ended.
    busy: bool,
    /// When its last transaction ended (`None`: never): the lane idle the
    /// longest is taken first, its markers surely written.
    ended_at: Option<std::time::Instant>,
}

struct OpenTransaction {
    id: u64,
    lane: usize,
    producer: FutureProducer,
    /// The lane producer's generation.
    generation: u64,
    /// Partitions that joined and have not voted yet.
    waiting: usize,
    /// The positions of those that voted to commit.
    positions: Vec<(i32, i64)>,
    /// Why it aborts, once one voted so.
    abort: Option<String>,
    ended: tokio::sync::watch::Sender<Option<Ended>>,
}

/// How a shared transaction ended.
#[derive(Debug, Clone)]
enum Ended {
    Committed,
    Aborted(String),
    Fenced(String),
    /// Its commit failed, and so did the abort that followed.
    Failed(String),
}

/// A partition's place in a shared transaction, until it votes; one
/// dropped without a vote votes to abort.
struct Ticket {
    mux: Arc<Mux>,
    id: u64,
    producer: FutureProducer,
    /// The lane producer's generation.
    generation: u64,
    voted: bool,
}

impl Mux {
    fn new(brokers: &str, ids: [String; LANES], group: ConsumerGroupMetadata) -> Self {
        Self {
            brokers: brokers.to_owned(),
            ids,
            group: Arc::new(group),
            state: Default::default(),
            generation: AtomicU64::new(0),
            freed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Initialises every lane's producer that is not; the newest
    /// generation.
    async fn ready(&self) -> Result<u64, RelayError> {
        let mut state = self.state.lock().await;
        for lane in 0..LANES {
            self.producer(&mut state.lanes[lane], lane).await.map(drop)?;
        }
        Ok(self.generation.load(Ordering::SeqCst))
    }

    /// The lane's producer, set up if it is not, and its generation.
    async fn producer(&self, lane: &mut Lane, index: usize) -> Result<(FutureProducer, u64), RelayError> {
        if let Some((producer, generation)) = &lane.producer {
            return Ok((producer.clone(), *generation));
        }
        let id = &self.ids[index];
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", id)
            .set("transactional.id", id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A round's events are queued together, then sent together
            // (with 0 the first went out alone as soon as it was queued).
            .set("linger.ms", "1")
            .set("transaction.timeout.ms", TXN_LIFETIME.as_millis().to_string())
            // A delivery Kafka does not confirm in time fails the
            // transaction, which is aborted and tried again.
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(kafka_err)?;
        let init = producer.clone();
        // Aborts what an earlier producer of this id left open.
        blocking(move || init.init_transactions(TXN_TIMEOUT)).await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        lane.producer = Some((producer.clone(), generation));
        lane.unaborted = false;
        Ok((producer, generation))
    }

    /// A place in the open transaction, or in a new one on a free lane.
    async fn join(self: &Arc<Self>) -> Result<Ticket, RelayError> {
        loop {
            let mut freed = self.freed.subscribe();
            let mut state = self.state.lock().await;
            if let Some(open) = &mut state.open {
                open.waiting += 1;
                let (id, producer, generation) = (open.id, open.producer.clone(), open.generation);
                return Ok(Ticket { mux: self.clone(), id, producer, generation, voted: false });
            }
            let free =
                (0..LANES).filter(|&lane| !state.lanes[lane].busy).min_by_key(|&lane| state.lanes[lane].ended_at);
            let Some(index) = free else {
                // Every lane's transaction is ending: wait for one.
                drop(state);
                let _ = freed.changed().await;
                continue;
            };
            if state.lanes[index].producer.is_none() {
                // Fenced: every idle lane is set up again at once, so that
                // a relay checks its partition's owner once for all.
                for (index, lane) in state.lanes.iter_mut().enumerate() {
                    if !lane.busy {
                        self.producer(lane, index).await.map(drop)?;
                    }
                }
            }
            let lane = &mut state.lanes[index];
            let (producer, generation) = self.producer(lane, index).await?;
            let begun = async {
                if lane.unaborted {
                    let aborting = producer.clone();
                    blocking(move || aborting.abort_transaction(TXN_TIMEOUT)).await?;
                    lane.unaborted = false;
                }
                producer.begin_transaction().map_err(kafka_err)
            };
            if let Err(e) = begun.await {
                if matches!(e, RelayError::Fenced(_)) {
                    state.forget_fenced(index);
                }
                return Err(e);
            }
            let lane = &mut state.lanes[index];
            lane.busy = true;
            state.begun += 1;
            let id = state.begun;
            let (ended, _) = tokio::sync::watch::channel(None);
            state.open = Some(OpenTransaction {
                id,
                lane: index,
                producer: producer.clone(),
                generation,
                waiting: 1,
                positions: Vec::new(),
                abort: None,
                ended,
            });
            return Ok(Ticket { mux: self.clone(), id, producer, generation, voted: false });
        }
    }

    /// Records a vote in transaction `id`; the last vote ends it. Resolves
    /// with how it ended.
    async fn vote(self: &Arc<Self>, id: u64, vote: Result<(i32, i64), String>) -> Ended {
        let mut state = self.state.lock().await;
        // The first vote seals the open transaction: later rounds start
        // the next.
        if state.open.as_ref().is_some_and(|open| open.id == id) {
            let open = state.open.take().expect("checked above");
            state.sealed.push(open);
        }
        let Some(at) = state.sealed.iter().position(|open| open.id == id) else {
            return Ended::Failed("the transaction ended before this partition's vote".into());
        };
        let open = &mut state.sealed[at];
        open.waiting -= 1;
        match vote {
            Ok(position) => open.positions.push(position),
            Err(reason) => {
                open.abort.get_or_insert(reason);
            }
        }
        if open.waiting > 0 {
            let mut ended = open.ended.subscribe();
            drop(state);
            return match ended.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone().unwrap_or(Ended::Failed("no outcome".into())),
                Err(_) => Ended::Failed("the transaction was dropped".into()),
            };
        }
        let open = state.sealed.swap_remove(at);
        drop(state);
        // Ended in a task of its own: a voter whose task ends meanwhile
        // leaves the others an answer, and the lane in a known state.
        let mux = self.clone();
        let ending = tokio::spawn(async move {
            let outcome = mux.end(&open).await;
            {
                let mut state = mux.state.lock().await;
                match &outcome {
                    Ended::Fenced(_) => state.forget_fenced(open.lane),
                    Ended::Failed(_) => state.lanes[open.lane].unaborted = true,
                    Ended::Committed | Ended::Aborted(_) => {}
                }
                let lane = &mut state.lanes[open.lane];
                lane.busy = false;
                lane.ended_at = Some(std::time::Instant::now());
            }
            mux.freed.send_modify(|ends| *ends += 1);
            metrics::histogram!("sluice_relay_transaction_partitions").record(open.positions.len() as f64);
            let _ = open.ended.send(Some(outcome.clone()));
            outcome
        });
        ending.await.unwrap_or_else(|e| Ended::Failed(format!("ending the transaction failed: {e}")))
    }

    /// Commits or aborts `open`, every vote in.
    async fn end(&self, open: &OpenTransaction) -> Ended {
        let reason = match &open.abort {
            None => {
                let (producer, group, positions) = (open.producer.clone(), self.group.clone(), open.positions.clone());
                let committed = blocking(move || {
                    let mut offsets = TopicPartitionList::new();
                    for (partition, next) in positions {
                        offsets.add_partition_offset(RELAY_TOPIC, partition, Offset::Offset(next))?;
                    }
                    producer.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)?;
                    producer.commit_transaction(TXN_TIMEOUT)
                })
                .await;
                match committed {
                    Ok(()) => return Ended::Committed,
                    Err(RelayError::Fenced(reason)) => return Ended::Fenced(reason),
                    Err(RelayError::Transient(reason)) => reason,
                }
            }
            Some(reason) => reason.clone(),
        };
        let producer = open.producer.clone();
        match blocking(move || producer.abort_transaction(TXN_TIMEOUT)).await {
            Ok(()) => Ended::Aborted(reason),
            Err(RelayError::Fenced(fenced)) => Ended::Fenced(fenced),
            Err(RelayError::Transient(e)) => Ended::Failed(format!("{reason}; abort: {e}")),
        }
    }
}

impl Ticket {
    /// Votes to commit with the partition's position `next`.
    async fn commit(mut self, partition: i32, next: i64) -> Result<(), RelayError> {
        self.voted = true;
        match self.mux.vote(self.id, Ok((partition, next))).await {
            Ended::Committed => Ok(()),
            Ended::Aborted(reason) => Err(RelayError::Transient(format!("aborted with another partition: {reason}"))),
            Ended::Fenced(reason) => Err(RelayError::Fenced(reason)),
            Ended::Failed(reason) => Err(RelayError::Transient(reason)),
        }
    }

    /// Votes to abort.
    async fn abort(mut self, reason: &str) -> Result<(), RelayError> {
        self.voted = true;
        match self.mux.vote(self.id, Err(reason.to_owned())).await {
            Ended::Committed | Ended::Aborted(_) => Ok(()),
            Ended::Fenced(reason) => Err(RelayError::Fenced(reason)),
            Ended::Failed(reason) => Err(RelayError::Transient(reason)),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.voted {
            return;
        }
        // Its round's task ended between produce and vote: the others in
        // the transaction must not commit its records without its position.
        let (mux, id) = (self.mux.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { mux.vote(id, Err("a partition's round was dropped".into())).await });
        }
    }
}

/// How topics sluice creates are replicated (`kafka.replication_factor`,
/// `kafka.min_insync_replicas`): 1 and 1 on a single dev broker; 3 and 2 in
/// production, so one lost broker loses no event and stops no producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub factor: i32,
    pub min_insync: i32,
}

impl Default for Replication {
    fn default() -> Self {
        Self { factor: 1, min_insync: 1 }
    }
}

/// Creates topics (unlimited retention) if they do not exist: events
/// topics, dead-letter topics, the relay topic.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
    replication: Replication,
) -> Result<(), RelayError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| RelayError::Transient(e.to_string()))?;
    let min_insync = replication.min_insync.to_string();
    let min_insync = min_insync.as_str();
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, partitions, TopicReplication::Fixed(replication.factor))
                .set("retention.ms", "-1")
                .set("retention.bytes", "-1")
                .set("min.insync.replicas", min_insync)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await.map_err(|e| RelayError::Transient(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(RelayError::Transient(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}
