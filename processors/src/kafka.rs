//! Domain events to Kafka: idempotent producer (acks=all), key = aggregate id,
//! value = Avro in Confluent wire format, CloudEvents Kafka-binding headers.

use std::future::Future;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schemas::catalog;
use sluice_schemas::codec::EventCodec;

use crate::operations::EventPosition;

/// One event ready to publish.
#[derive(Debug, Clone)]
pub struct OutgoingEvent<'a> {
    pub topic: &'a str,
    /// The aggregate id: all events of one aggregate land in one partition.
    pub key: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub source: &'a str,
    pub time_ms: i64,
    pub avro: apache_avro::types::Value,
    pub traceparent: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Kafka or the registry failed for now: retry with backoff.
    #[error("kafka: {0}")]
    Transient(String),
    /// The event cannot be encoded (schema mismatch): dead-letter.
    #[error("cannot encode event: {0}")]
    Permanent(String),
}

pub trait EventPublisher: Send + Sync {
    /// Resolves once Kafka's delivery report says the event is stored.
    fn publish(&self, event: OutgoingEvent<'_>) -> impl Future<Output = Result<EventPosition, PublishError>> + Send;
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    codec: EventCodec,
    delivery_timeout: Duration,
}

impl KafkaPublisher {
    pub fn new(brokers: &str, registry_url: &str) -> Result<Self, PublishError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(|e| PublishError::Transient(e.to_string()))?;
        let codec = EventCodec::new(registry_url).map_err(|e| PublishError::Transient(e.to_string()))?;
        Ok(Self { producer, codec, delivery_timeout: Duration::from_secs(10) })
    }
}

impl EventPublisher for KafkaPublisher {
    async fn publish(&self, event: OutgoingEvent<'_>) -> Result<EventPosition, PublishError> {
        let spec = catalog::event_spec(event.event_type)
            .ok_or_else(|| PublishError::Permanent(format!("no Avro schema for {}", event.event_type)))?;
        let payload = self.codec.encode_value(event.topic, spec, event.avro).await.map_err(|e| {
            if e.is_transient() {
                PublishError::Transient(e.to_string())
            } else {
                PublishError::Permanent(e.to_string())
            }
        })?;
        let time = chrono::DateTime::from_timestamp_millis(event.time_ms).unwrap_or_default().to_rfc3339();
        let mut headers = OwnedHeaders::new_with_capacity(8)
            .insert(Header { key: "ce_specversion", value: Some("1.0") })
            .insert(Header { key: "ce_id", value: Some(event.event_id) })
            .insert(Header { key: "ce_source", value: Some(event.source) })
            .insert(Header { key: "ce_type", value: Some(event.event_type) })
            .insert(Header { key: "ce_time", value: Some(time.as_str()) })
            .insert(Header { key: "ce_subject", value: Some(event.key) })
            .insert(Header { key: "content-type", value: Some("application/avro") });
        if let Some(traceparent) = event.traceparent {
            headers = headers.insert(Header { key: "traceparent", value: Some(traceparent) });
        }
        let record = FutureRecord::to(event.topic).key(event.key).payload(&payload).headers(headers);
        let started = std::time::Instant::now();
        let delivery = self
            .producer
            .send(record, self.delivery_timeout)
            .await
            .map_err(|(e, _)| PublishError::Transient(e.to_string()))?;
        metrics::histogram!("sluice_kafka_produce_seconds").record(started.elapsed().as_secs_f64());
        Ok(EventPosition {
            event_type: event.event_type.to_owned(),
            topic: event.topic.to_owned(),
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
}

/// Creates the events topics (unlimited retention) if they do not exist.
pub async fn ensure_topics(brokers: &str, topics: &[String], partitions: i32) -> Result<(), PublishError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| PublishError::Transient(e.to_string()))?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, partitions, TopicReplication::Fixed(1))
                .set("retention.ms", "-1")
                .set("retention.bytes", "-1")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results =
        admin.create_topics(&new_topics, &options).await.map_err(|e| PublishError::Transient(e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(PublishError::Transient(format!("creating topic {topic}: {code}"))),
        }
    }
    Ok(())
}
