//! Poison records of an events consumer (a projection, a process manager):
//! copied to the consumer's dead-letter topic `<topic>.<consumer>.dlt` with
//! the reason in headers, their key "parked" (recorded in
//! `projection_parked_keys`) so the key's later records follow them there and
//! are never applied out of order. Nothing is skipped silently, and a consumer
//! never stalls on one record.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use scylla::client::session::Session;
use tokio::sync::Mutex;
use tracing::warn;

use crate::StreamsError;

fn err(e: impl std::fmt::Display) -> StreamsError {
    StreamsError(e.to_string())
}

/// The dead-letter topic of a consumer for one events topic.
pub fn dead_letter_topic(topic: &str, consumer: &str) -> String {
    format!("{topic}.{consumer}.dlt")
}

/// The error class of a record parked behind an earlier poison record.
pub const PARKED: &str = "parked";

/// What a consumer does with a record of a key, as far as parking goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    /// Apply it.
    Free,
    /// Dead-letter it behind the key's poison record.
    Parked,
    /// Hold it (retry): `sluice dlt replay` is applying the key's
    /// dead-lettered records, after which this one applies.
    Releasing,
}

/// One consumer's dead-letter topics and parked keys.
pub struct DeadLetters {
    consumer: String,
    /// Parked keys are per version of a versioned projection (1 otherwise).
    version: i32,
    session: Arc<Session>,
    producer: FutureProducer,
    /// (topic, key) of poisoned keys.
    parked: Mutex<HashSet<(String, String)>>,
    /// Set when partitions were assigned: read the parked keys again.
    stale: Arc<AtomicBool>,
    /// `sluice dlt replay` applying a parked key's records: none is parked.
    replaying: bool,
    /// Original positions (topic, partition, offset) the dead-letter topics
    /// already hold: a replay of the log parks their keys again but does not
    /// copy them a second time.
    already_sent: HashSet<(String, i32, i64)>,
}

impl DeadLetters {
    /// Loads the consumer's parked keys.
    pub async fn new(brokers: &str, session: Arc<Session>, consumer: &str, version: i32) -> Result<Self, StreamsError> {
        let parked = load_parked(&session, consumer, version).await?;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .create()
            .map_err(err)?;
        Ok(Self {
            consumer: consumer.to_owned(),
            version,
            session,
            producer,
            parked: Mutex::new(parked),
            stale: Arc::new(AtomicBool::new(false)),
            replaying: false,
            already_sent: HashSet::new(),
        })
    }

    /// The dead letters of a replay of `topics`: records the consumer's
    /// dead-letter topics already hold (from the live run, or an earlier
    /// replay) are not copied there again.
    pub async fn replaying_log(mut self, brokers: &str, topics: &[String]) -> Result<Self, StreamsError> {
        for topic in topics {
            for record in read_to_end(brokers, &dead_letter_topic(topic, &self.consumer)).await? {
                let header = |name: &str| header(&record, name);
                let number = |name: &str| header(name).and_then(|v| v.parse::<i64>().ok());
                if let (Some(original), Some(partition), Some(offset)) = (
                    header("sluice_original_topic"),
                    number("sluice_original_partition"),
                    number("sluice_original_offset"),
                ) {
                    self.already_sent.insert((original, partition as i32, offset));
                }
            }
        }
        Ok(self)
    }

    /// The dead letters of `sluice dlt replay`, which applies a parked key's
    /// dead-lettered records itself: to it no key is parked.
    pub fn replaying(mut self) -> Self {
        self.replaying = true;
        self
    }

    /// The flag a consumer's rebalance hook sets to have the parked keys read
    /// again before the next record is checked.
    pub fn stale_flag(&self) -> Arc<AtomicBool> {
        self.stale.clone()
    }

    /// Whether the record's key waits behind an earlier poison record. After
    /// an assignment the keys are read again first: the partitions' former
    /// owner may have parked some. A key this consumer knows as parked is
    /// looked up in the store (records of parked keys are few): `sluice dlt`
    /// may have released it, or be replaying it.
    pub async fn parking(&self, message: &impl Message) -> Result<Parking, StreamsError> {
        if self.replaying {
            return Ok(Parking::Free);
        }
        let mut parked = self.parked.lock().await;
        if self.stale.swap(false, Ordering::SeqCst) {
            // Boxed, as the key's state below: rare, and inline they would
            // grow every record's future.
            match Box::pin(load_parked(&self.session, &self.consumer, self.version)).await {
                Ok(fresh) => *parked = fresh,
                Err(e) => {
                    self.stale.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        // Mostly nothing is parked: no key made for each record then.
        if parked.is_empty() {
            return Ok(Parking::Free);
        }
        let key = (message.topic().to_owned(), key_of(message));
        if !parked.contains(&key) {
            return Ok(Parking::Free);
        }
        let state = Box::pin(key_state(&self.session, &self.consumer, self.version, &key.0, &key.1)).await?;
        if state == Parking::Free {
            parked.remove(&key);
        }
        Ok(state)
    }

    /// Copies the record to the dead-letter topic with the reason and parks
    /// its key, before the caller moves past it. An error means nothing was
    /// settled: retry.
    pub async fn send(&self, message: &impl Message, class: &str, reason: &str) -> Result<(), String> {
        let topic = message.topic();
        let key = key_of(message);
        // Created with the events topics at startup (`sluice serve`).
        let dlt = dead_letter_topic(topic, &self.consumer);
        let (partition, offset) = (message.partition().to_string(), message.offset().to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let headers = headers
            .insert(Header { key: "sluice_projection", value: Some(self.consumer.as_str()) })
            .insert(Header { key: "sluice_reason", value: Some(reason) })
            .insert(Header { key: "sluice_error_class", value: Some(class) })
            .insert(Header { key: "sluice_original_topic", value: Some(topic) })
            .insert(Header { key: "sluice_original_partition", value: Some(partition.as_str()) })
            .insert(Header { key: "sluice_original_offset", value: Some(offset.as_str()) });
        let position = (topic.to_owned(), message.partition(), message.offset());
        if !self.already_sent.contains(&position) {
            let mut record = FutureRecord::to(&dlt).key(key.as_bytes()).headers(headers);
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            self.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e.to_string())?;
        }
        if class != PARKED {
            self.session
                .query_unpaged(
                    "INSERT INTO projection_parked_keys (projection, version, topic, key, first_offset, reason) VALUES (?, ?, ?, ?, ?, ?)",
                    (&self.consumer, self.version, topic, &key, message.offset(), reason),
                )
                .await
                .map_err(|e| e.to_string())?;
            self.parked.lock().await.insert((topic.to_owned(), key));
        }
        warn!(topic, offset = message.offset(), class, reason, dlt, "record dead-lettered");
        Ok(())
    }
}

async fn load_parked(
    session: &Session,
    consumer: &str,
    version: i32,
) -> Result<HashSet<(String, String)>, StreamsError> {
    let rows = session
        .query_unpaged(
            "SELECT topic, key FROM projection_parked_keys WHERE projection = ? AND version = ?",
            (consumer, version),
        )
        .await
        .map_err(err)?
        .into_rows_result()
        .map_err(err)?;
    rows.rows::<(String, String)>().map_err(err)?.collect::<Result<HashSet<_>, _>>().map_err(err)
}

/// Where one key of a consumer stands in the store.
pub async fn key_state(
    session: &Session,
    consumer: &str,
    version: i32,
    topic: &str,
    key: &str,
) -> Result<Parking, StreamsError> {
    let has = |table: &'static str| async move {
        let cql = format!("SELECT key FROM {table} WHERE projection = ? AND version = ? AND topic = ? AND key = ?");
        let rows = session.query_unpaged(cql, (consumer, version, topic, key)).await.map_err(err)?;
        Ok::<_, StreamsError>(rows.into_rows_result().map_err(err)?.rows_num() > 0)
    };
    Ok(if has("projection_key_releases").await? {
        Parking::Releasing
    } else if has("projection_parked_keys").await? {
        Parking::Parked
    } else {
        Parking::Free
    })
}

/// A header of a record, as text (`sluice_reason`, `sluice_original_offset`…).
pub fn header(message: &impl Message, name: &str) -> Option<String> {
    message
        .headers()
        .and_then(|h| h.iter().find(|x| x.key == name))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn key_of(message: &impl Message) -> String {
    message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
}

/// Every record of `topic`, from its start to the end it had when asked.
pub async fn read_to_end(brokers: &str, topic: &str) -> Result<Vec<OwnedMessage>, StreamsError> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    let kafka = err;
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "sluice.dlt.reader")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka)?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).map_err(kafka)?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut assignment = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).map_err(kafka)?;
            if high > low {
                assignment.add_partition_offset(&topic, p, Offset::Offset(low)).map_err(kafka)?;
                ends.insert(p, high);
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&assignment).map_err(kafka)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ends.is_empty() {
            if std::time::Instant::now() > deadline {
                return Err(StreamsError(format!("{topic} not read to its end within a minute")));
            }
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let (p, o) = (m.partition(), m.offset());
                    out.push(m.detach());
                    if ends.get(&p).is_some_and(|end| o + 1 >= *end) {
                        ends.remove(&p);
                    }
                }
                Some(Err(e)) => return Err(kafka(e)),
                None => {}
            }
        }
        Ok(out)
    })
    .await
    .map_err(err)?
}
