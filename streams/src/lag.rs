//! Lag: how far a consumer group (a projection version's, a process
//! manager's) is behind the end of each partition. Used by `sluice status`,
//! the consumers' metrics and replays.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// Next offset the group will read (committed), if it committed any.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: i64,
    pub lag: i64,
}

/// How long a lag lookup may take, the close of its client included.
const LOOKUP_WITHIN: Duration = Duration::from_secs(30);

/// Lag of `group` on `topics`. Blocking calls run off the async executor,
/// for at most [`LOOKUP_WITHIN`] ([`crate::blocking`]: the client's close
/// can wait for the group coordinator for good).
pub async fn group_lag(brokers: &str, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, String> {
    let (brokers, group, topics) = (brokers.to_owned(), group.to_owned(), topics.to_vec());
    crate::blocking::within(LOOKUP_WITHIN, move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| e.to_string())?;
        let timeout = Duration::from_secs(10);
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string())?;
            for t in metadata.topics() {
                for p in t.partitions() {
                    tpl.add_partition(t.name(), p.id());
                }
            }
        }
        let committed = consumer.committed_offsets(tpl.clone(), timeout).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for element in tpl.elements() {
            let (low, high) =
                consumer.fetch_watermarks(element.topic(), element.partition(), timeout).map_err(|e| e.to_string())?;
            let committed =
                committed.find_partition(element.topic(), element.partition()).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let position = committed.unwrap_or(low);
            out.push(PartitionLag {
                topic: element.topic().to_owned(),
                partition: element.partition(),
                committed,
                end: high,
                lag: (high - position).max(0),
            });
        }
        Ok(out)
    })
    .await
    .unwrap_or_else(|| Err(format!("the lag lookup did not end within {LOOKUP_WITHIN:?}")))
}

/// Publishes `group`'s lag on `topics` per partition every five seconds,
/// as `sluice_consumer_lag_records{consumer, topic, partition}`, until `stop`.
pub async fn report_until(
    brokers: String,
    group: String,
    topics: Vec<String>,
    consumer: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lookup = tokio::select! {
            _ = stop.cancelled() => return,
            lookup = group_lag(&brokers, &group, &topics) => lookup,
        };
        if let Ok(partitions) = lookup {
            for p in partitions {
                metrics::gauge!("sluice_consumer_lag_records", "consumer" => consumer.clone(), "topic" => p.topic, "partition" => p.partition.to_string())
                    .set(p.lag as f64);
            }
        }
    }
}
