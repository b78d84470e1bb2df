//! The projection runtime: a Kafka consumer group per projection. Each record
//! is decoded through the registry, applied to the CQL store, and only then is
//! its offset stored for commit (`enable.auto.offset.store=false`), so a crash
//! replays from the last applied record instead of skipping any.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use sluice_schemas::codec::EventCodec;
use sluice_schemas::orders::OrderEvent;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::orders;
use crate::store::ReadModels;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Setup(String),
}

/// The tenant a topic belongs to (`<tenant>.<context>.events`).
fn tenant_of(topic: &str) -> Option<&str> {
    topic.split('.').next().filter(|t| !t.is_empty())
}

pub struct OrdersProjection {
    consumer: StreamConsumer,
    codec: EventCodec,
    store: Arc<ReadModels>,
    retry_delay: Duration,
}

impl OrdersProjection {
    pub fn new(brokers: &str, group: &str, registry_url: &str, topics: &[String], store: Arc<ReadModels>) -> Result<Self, ProjectionError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let codec = EventCodec::new(registry_url).map_err(|e| ProjectionError::Setup(e.to_string()))?;
        Ok(Self { consumer, codec, store, retry_delay: Duration::from_millis(500) })
    }

    /// Applies records until `shutdown`. A record whose write fails is retried
    /// in place (later records of its partition wait behind it).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ProjectionError> {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = self.consumer.recv() => message?,
            };
            loop {
                match self.apply(&message).await {
                    Ok(()) => break,
                    Err(e) if e.is_transient() => {
                        warn!(error = %e, topic = message.topic(), offset = message.offset(), "apply failed, retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(self.retry_delay) => {}
                        }
                    }
                    Err(e) => {
                        // TODO(issue 5): projection dead-letter topic. Until
                        // then an undecodable record is logged and passed.
                        warn!(error = %e, topic = message.topic(), offset = message.offset(), "skipping undecodable record");
                        break;
                    }
                }
            }
            self.consumer.store_offset_from_message(&message)?;
        }
        Ok(())
    }

    async fn apply(&self, message: &BorrowedMessage<'_>) -> Result<(), ApplyError> {
        let tenant = tenant_of(message.topic()).ok_or_else(|| ApplyError::Permanent("topic has no tenant".into()))?;
        let payload = message.payload().ok_or_else(|| ApplyError::Permanent("record has no value".into()))?;
        let (name, value) = self.codec.decode(payload).await.map_err(|e| {
            if e.is_transient() {
                ApplyError::Transient(e.to_string())
            } else {
                ApplyError::Permanent(e.to_string())
            }
        })?;
        let event = OrderEvent::from_avro(&name, &value).map_err(|e| ApplyError::Permanent(e.0))?;
        for write in orders::apply(&event) {
            self.store.write_order(tenant, &write).await.map_err(|e| ApplyError::Transient(e.to_string()))?;
        }
        debug!(tenant, event_type = name, offset = message.offset(), "applied");
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl ApplyError {
    fn is_transient(&self) -> bool {
        matches!(self, ApplyError::Transient(_))
    }
}
