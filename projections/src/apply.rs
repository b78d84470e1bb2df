//! Applying one Kafka record to one version of the read models: decode via
//! the registry, read the order's snapshot if needed, write, and on poison
//! (cannot be decoded or does not fit) hand it to [`DeadLetters`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use rdkafka::message::{Headers, Message, OwnedMessage};
use scylla::client::session::Session;
use sluice_schemas::codec::EventCodec;
use sluice_schemas::orders::OrderEvent;
use sluice_streams::batch::Settle;
use sluice_streams::dead_letter::DeadLetters;
use sluice_streams::settle::{settle_record, Settled};
use sluice_streams::{decode_record, ApplyError};
use tracing::{debug, info_span, Instrument};

use crate::orders;
use crate::store::tables::Tables;
use crate::store::{rm_err, ReadModelError};

/// The tenant a topic belongs to (`<tenant>.<context>.events`).
pub fn tenant_of(topic: &str) -> Option<&str> {
    topic.split('.').next().filter(|t| !t.is_empty())
}

/// The bounded context a topic belongs to (`<tenant>.<context>.events`).
pub fn context_of(topic: &str) -> Option<&str> {
    topic.split('.').nth(1)
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Written {
        event_type: String,
    },
    DeadLettered {
        reason: String,
    },
    /// The record belongs to another context's topic: not for this
    /// projection, and not poison either.
    Skipped,
}

pub struct Applier {
    projection: String,
    version: i32,
    tables: Arc<Tables>,
    codec: EventCodec,
    dead_letters: DeadLetters,
}

impl Applier {
    pub async fn new(
        brokers: &str,
        registry_url: &str,
        projection: &str,
        tables: Arc<Tables>,
    ) -> Result<Self, ReadModelError> {
        let dead_letters = DeadLetters::new(brokers, tables.session.clone(), projection, tables.version).await?;
        Self::with_dead_letters(registry_url, projection, tables, dead_letters)
    }

    /// An applier for `sluice dlt replay`: it applies the records of parked
    /// keys (it parks nothing itself).
    pub async fn replaying(
        brokers: &str,
        registry_url: &str,
        projection: &str,
        tables: Arc<Tables>,
    ) -> Result<Self, ReadModelError> {
        let dead_letters = DeadLetters::new(brokers, tables.session.clone(), projection, tables.version).await?;
        Self::with_dead_letters(registry_url, projection, tables, dead_letters.replaying())
    }

    fn with_dead_letters(
        registry_url: &str,
        projection: &str,
        tables: Arc<Tables>,
        dead_letters: DeadLetters,
    ) -> Result<Self, ReadModelError> {
        Ok(Self {
            projection: projection.to_owned(),
            version: tables.version,
            tables,
            codec: EventCodec::new(registry_url).map_err(rm_err)?,
            dead_letters,
        })
    }

    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn dead_letters(&self) -> &DeadLetters {
        &self.dead_letters
    }

    /// Applies a record, retrying transient failures until `stop` says so.
    /// Returns `None` only when stopped before the record was settled. Its
    /// span continues the trace of the command that produced the event.
    pub async fn apply_settled(
        &self,
        message: &impl Message,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<Applied> {
        let span = info_span!("sluice.project", projection = %self.projection, topic = message.topic(), offset = message.offset());
        let traceparent = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "traceparent"))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok());
        sluice_telemetry::set_parent(&span, traceparent);
        self.apply_with_retries(message, stop).instrument(span).await
    }

    async fn apply_with_retries(
        &self,
        message: &impl Message,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<Applied> {
        let started = std::time::Instant::now();
        let settled = settle_record(&self.dead_letters, message, stop, || self.apply(message)).await?;
        let (applied, outcome) = match settled {
            Settled::Applied(applied) => (applied, "applied"),
            Settled::DeadLettered { reason, .. } => (Applied::DeadLettered { reason }, "dead_lettered"),
        };
        metrics::histogram!("sluice_projection_apply_seconds", "projection" => self.projection.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("sluice_projection_events_total", "projection" => self.projection.clone(), "outcome" => outcome)
            .increment(1);
        Some(applied)
    }

    /// Applies a record once: written, skipped, or why not.
    pub async fn apply(&self, message: &impl Message) -> Result<Applied, ApplyError> {
        let poison = |class, reason: String| ApplyError::Poison { class, reason };
        let topic = message.topic();
        if context_of(topic) != Some(sluice_schemas::orders::CONTEXT) {
            return Ok(Applied::Skipped);
        }
        let tenant = tenant_of(topic).ok_or_else(|| poison("bad_topic", format!("topic {topic} names no tenant")))?;
        let (name, value) = decode_record(&self.codec, &self.dead_letters, message).await?;
        let event = OrderEvent::from_avro(&name, &value).map_err(|e| poison("unknown_event", e.0))?;
        let snapshot = if orders::needs_snapshot(&event) {
            self.tables
                .snapshot(tenant, event.meta().order_id)
                .await
                .map_err(|e| ApplyError::Transient(e.to_string()))?
        } else {
            None
        };
        // An event's rows are in different tables and all carry the event's
        // version as their write timestamp: written at once, order does not matter.
        let writes = orders::apply(&event, snapshot.as_ref());
        futures::future::try_join_all(writes.iter().map(|write| self.tables.write(tenant, write)))
            .await
            .map_err(|e| ApplyError::Transient(e.to_string()))?;
        debug!(tenant, event_type = name, offset = message.offset(), "applied");
        Ok(Applied::Written { event_type: name })
    }
}

/// Records of a batch applied to one version (each retried while
/// transient, dead-lettered when poison) until `stop`, counted.
pub struct Settling<'x> {
    applier: &'x Applier,
    stop: &'x tokio_util::sync::CancellationToken,
    pub applied: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl<'x> Settling<'x> {
    pub fn new(applier: &'x Applier, stop: &'x tokio_util::sync::CancellationToken) -> Self {
        Self { applier, stop, applied: AtomicU64::new(0), dead_lettered: AtomicU64::new(0) }
    }
}

impl Settle for Settling<'_> {
    fn settle<'a>(&'a self, record: &'a OwnedMessage) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.applier.apply_settled(record, self.stop).await {
                Some(Applied::Written { .. }) => self.applied.fetch_add(1, Ordering::Relaxed),
                Some(Applied::DeadLettered { .. }) => self.dead_lettered.fetch_add(1, Ordering::Relaxed),
                Some(Applied::Skipped) => 0,
                None => return false,
            };
            true
        })
    }
}

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
