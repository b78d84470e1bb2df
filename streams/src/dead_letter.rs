//! Poison records of an events consumer (a projection, a process manager):
//! copied to the consumer's dead-letter topic `<topic>.<consumer>.dlt` with
//! the reason in headers, their key "parked" (recorded in
//! `projection_parked_keys`) so the key's later records follow them there and
//! are never applied out of order. Nothing is skipped silently, and a consumer
//! never stalls on one record.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
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
        })
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
            match load_parked(&self.session, &self.consumer, self.version).await {
                Ok(fresh) => *parked = fresh,
                Err(e) => {
                    self.stale.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        let key = (message.topic().to_owned(), key_of(message));
        if !parked.contains(&key) {
            return Ok(Parking::Free);
        }
        let state = key_state(&self.session, &self.consumer, self.version, &key.0, &key.1).await?;
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
        let mut record = FutureRecord::to(&dlt).key(key.as_bytes()).headers(headers);
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e.to_string())?;
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

fn key_of(message: &impl Message) -> String {
    message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
}
