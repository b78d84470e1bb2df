//! The consumer of one partition queue: deliveries → one lane per stream →
//! pipeline → ack, or dead letter.
//!
//! The queue has a single active consumer, so while this processor holds the
//! partition no other takes its commands. Within it, commands of different
//! streams run concurrently (up to the prefetch), and each stream's commands
//! run one after another in the order the queue handed them out: the order
//! the edge accepted them. A transient failure is retried in place, after a
//! backoff: only the failing command's stream waits, and nothing overtakes it.
//!
//! Whatever the outcome, a dead letter is first published to the DLQ and
//! confirmed by the broker, and only then is the original acked: a crash in
//! between duplicates, never loses. On stop (shutdown, or the partition moves
//! to another processor) each stream finishes the command it is on and starts
//! no other; closing the channel hands every unstarted delivery back to the
//! queue, in order, for the next owner.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use super::headers::{self, string};
use super::topology::stream_key_of;
use crate::domain::Aggregate;
use crate::event_store::EventStore;
use crate::kafka::EventPublisher;
use crate::operations::OperationStore;
use crate::pipeline::{IncomingCommand, Outcome, Pipeline};

/// Consumer settings (see `ProcessorConfig`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Unacked deliveries of one partition at once.
    pub prefetch: u16,
    pub max_attempts: u32,
    /// Backoff before each in-place retry; attempt n waits
    /// `retry_delays[n-1]` (the last tier repeats).
    pub retry_delays_ms: Vec<u64>,
    /// This processor's name: the consumer tag, so the broker (and
    /// `sluice status`) says who holds each partition.
    pub instance: String,
}

/// One partition of one tenant's context.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionRef {
    pub tenant: String,
    pub context: &'static str,
    pub partition: u16,
}

impl PartitionRef {
    pub fn queue(&self) -> String {
        names::command_queue(&self.tenant, self.context, self.partition)
    }
}

/// Consumes one partition queue until `stop` or until the channel fails.
/// The consumer registers at once; while another processor's consumer is
/// active on the queue, it waits (single active consumer) and takes over
/// when that one goes.
pub async fn consume_partition<A, S, P, O>(
    connection: &Connection,
    partition: PartitionRef,
    pipeline: Arc<Pipeline<A, S, P, O>>,
    settings: ConsumerSettings,
    stop: CancellationToken,
) -> lapin::Result<()>
where
    A: Aggregate,
    S: EventStore + 'static,
    P: EventPublisher + 'static,
    O: OperationStore + 'static,
{
    let queue = partition.queue();
    let channel = connection.create_channel().await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let tag = format!("{}/{}", settings.instance, queue);
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(%queue, "consuming partition");
    let ctx = Arc::new(ConsumerCtx { tenant: partition.tenant.clone(), queue, pipeline, settings, publisher, stop });
    let lanes = Arc::new(Lanes::default());
    let tracker = TaskTracker::new();
    let mut deliveries = std::pin::pin!(consumer.take_until(ctx.stop.clone().cancelled_owned()));
    let mut failure = None;
    while let Some(delivery) = deliveries.next().await {
        match delivery {
            Ok(delivery) => {
                // A message whose stream cannot be read fails on its own.
                let key = stream_key_of(&delivery.data).unwrap_or_else(|| format!("#{}", delivery.delivery_tag));
                if let Some(first) = lanes.enqueue(&key, delivery) {
                    tracker.spawn(run_lane(ctx.clone(), lanes.clone(), key, first));
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // Each stream finishes the command it is on; what was not started goes
    // back to the queue with the channel.
    ctx.stop.cancel();
    tracker.close();
    tracker.wait().await;
    super::close_quietly(channel.close(200, "partition released".into())).await;
    super::close_quietly(ctx.publisher.close(200, "partition released".into())).await;
    info!(queue = %ctx.queue, "released partition");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Deliveries waiting behind the one each stream is on.
struct Lanes<T = Delivery> {
    waiting: Mutex<HashMap<String, VecDeque<T>>>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self { waiting: Mutex::new(HashMap::new()) }
    }
}

impl<T> Lanes<T> {
    /// Queues `delivery` behind its stream's; returns it when its stream
    /// had none running (the caller starts the lane).
    fn enqueue(&self, key: &str, delivery: T) -> Option<T> {
        let mut waiting = self.waiting.lock().expect("lanes lock");
        match waiting.get_mut(key) {
            Some(queue) => {
                queue.push_back(delivery);
                None
            }
            None => {
                waiting.insert(key.to_owned(), VecDeque::new());
                Some(delivery)
            }
        }
    }

    /// The stream's next delivery, or `None` (and the lane ends).
    fn next(&self, key: &str) -> Option<T> {
        let mut waiting = self.waiting.lock().expect("lanes lock");
        let next = waiting.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            waiting.remove(key);
        }
        next
    }
}

async fn run_lane<A, S, P, O>(ctx: Arc<ConsumerCtx<A, S, P, O>>, lanes: Arc<Lanes>, key: String, first: Delivery)
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    let mut next = Some(first);
    while let Some(delivery) = next {
        if ctx.stop.is_cancelled() {
            // Unacked: it returns to the queue when the channel closes.
            return;
        }
        ctx.process(delivery).await;
        next = lanes.next(&key);
    }
}

struct ConsumerCtx<A, S, P, O> {
    tenant: String,
    queue: String,
    pipeline: Arc<Pipeline<A, S, P, O>>,
    settings: ConsumerSettings,
    /// A confirm channel for DLQ copies and requeued copies.
    publisher: Channel,
    /// The partition is being released: finish the command, start no other.
    stop: CancellationToken,
}

/// How long a delivery that could not be settled waits before the settle is
/// tried again, and how many times it is tried in place before the delivery
/// is handed back to its queue.
const SETTLE_RETRY_PAUSE: Duration = Duration::from_secs(1);
const SETTLE_TRIES: u32 = 3;

impl<A, S, P, O> ConsumerCtx<A, S, P, O>
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    async fn process(&self, delivery: Delivery) {
        let mut headers = headers::headers_of(&delivery);
        let mut attempt = headers::attempt(&headers);
        let operation_id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
        let span = info_span!("command", tenant = %self.tenant, operation = operation_id.as_deref().unwrap_or("-"));
        sluice_telemetry::set_parent(&span, headers::get_str(&headers, "traceparent").as_deref());
        async {
            let decoded = self.decode(&delivery, &headers, operation_id);
            let outcome = loop {
                let outcome = match &decoded {
                    Ok(cmd) => self.pipeline.handle(&IncomingCommand { attempt, ..cmd.clone() }).await,
                    Err(reason) => Outcome::DeadLetter { class: "malformed_message", reason: reason.clone() },
                };
                let (reason, appended) = match outcome {
                    Outcome::Retry(reason) => (reason, false),
                    Outcome::RetryAppended(reason) => (reason, true),
                    settled => break settled,
                };
                let note = if appended { " (events stored)" } else { "" };
                headers::push_history(
                    &mut headers,
                    format!("{} attempt {attempt}{note}: {reason}", chrono::Utc::now().to_rfc3339()),
                );
                metrics::counter!("sluice_commands_processed_total", "tenant" => self.tenant.clone(), "outcome" => "retried")
                    .increment(1);
                if attempt >= self.settings.max_attempts && !appended {
                    break Outcome::DeadLetter {
                        class: "retries_exhausted",
                        reason: format!("gave up after {attempt} attempts: {reason}"),
                    };
                }
                let tiers = &self.settings.retry_delays_ms;
                let delay = tiers[(attempt as usize - 1).min(tiers.len() - 1)];
                warn!(%reason, delay_ms = delay, attempt, "transient failure, retrying after a delay");
                tokio::select! {
                    // Released meanwhile: the next owner retries it.
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                }
                if attempt >= self.settings.max_attempts {
                    // Its events are stored: never dead-lettered, retried for
                    // as long as it takes. It goes to the back of its
                    // partition rather than holding its delivery for hours
                    // (later commands of its stream see its events, so none
                    // is decided as if it had not happened).
                    break Outcome::RetryAppended(reason);
                }
                attempt += 1;
            };
            let mut tries = 0;
            loop {
                tries += 1;
                match self.settle(&delivery, headers.clone(), decoded.as_ref().ok(), outcome.clone(), attempt).await {
                    Ok(()) => return,
                    Err(e) if tries < SETTLE_TRIES && !self.stop.is_cancelled() => {
                        warn!(error = %e, "could not settle the delivery; trying again after a pause");
                        tokio::time::sleep(SETTLE_RETRY_PAUSE).await;
                    }
                    Err(e) => {
                        // Never held: the delivery goes back to the queue and
                        // is tried again; RabbitMQ's delivery limit bounds
                        // the loop. A copy published before the failure is
                        // found settled by its operation record.
                        warn!(error = %e, "could not settle the delivery; handing it back");
                        if let Err(e) = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await {
                            // The channel is gone: its unacked deliveries go
                            // back by themselves, and the consumer reconnects.
                            warn!(error = %e, "could not hand the delivery back");
                        }
                        return;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn decode(
        &self,
        delivery: &Delivery,
        headers: &FieldTable,
        operation_id: Option<String>,
    ) -> Result<IncomingCommand, String> {
        let operation_id = operation_id.ok_or("message has no message_id (operation id)")?;
        let json: serde_json::Value =
            serde_json::from_slice(&delivery.data).map_err(|e| format!("body is not JSON: {e}"))?;
        let event = CloudEvent::from_json(json).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(|e| format!("{} {}", e.attribute, e.problem)).collect();
            format!("not a valid CloudEvent: {}", list.join("; "))
        })?;
        let traceparent = headers::get_str(headers, "traceparent")
            .or_else(|| event.extensions.get("traceparent").and_then(|v| v.as_str()).map(str::to_owned));
        Ok(IncomingCommand { tenant: self.tenant.clone(), operation_id, event, attempt: 1, traceparent })
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        mut headers: FieldTable,
        cmd: Option<&IncomingCommand>,
        outcome: Outcome,
        attempt: u32,
    ) -> Result<(), String> {
        let label = match &outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::AlreadyDone => "duplicate",
            Outcome::Rejected(_) => "rejected",
            Outcome::Retry(_) | Outcome::RetryAppended(_) => "requeued",
            Outcome::DeadLetter { .. } => "dead_lettered",
        };
        metrics::counter!("sluice_commands_processed_total", "tenant" => self.tenant.clone(), "outcome" => label)
            .increment(1);
        match outcome {
            Outcome::Succeeded | Outcome::AlreadyDone => {}
            Outcome::Rejected(reason) => info!(%reason, "rejected"),
            Outcome::Retry(reason) | Outcome::RetryAppended(reason) => {
                warn!(%reason, "events stored but not yet in Kafka; back to the end of the partition");
                headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt) + 1));
                self.publish_copy(delivery, headers, &self.queue).await?;
            }
            Outcome::DeadLetter { class, reason } => {
                warn!(class, %reason, "dead-lettering");
                metrics::counter!("sluice_dead_letters_total", "tenant" => self.tenant.clone(), "class" => class)
                    .increment(1);
                if let Some(cmd) = cmd {
                    // Without the record the operation would say `processing`
                    // forever: the settle is tried again.
                    self.pipeline
                        .record_dead_letter(cmd, &reason)
                        .await
                        .map_err(|e| format!("cannot record the dead letter yet: {e}"))?;
                }
                headers.insert(headers::REASON.into(), string(&reason));
                headers.insert(headers::ERROR_CLASS.into(), string(class));
                headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
                headers.insert(headers::ORIGINAL_QUEUE.into(), string(&self.queue));
                headers.insert(headers::DEAD_LETTERED_AT.into(), string(&chrono::Utc::now().to_rfc3339()));
                self.publish_copy(delivery, headers, &names::dead_letter_queue(&self.tenant, A::CONTEXT)).await?;
            }
        }
        delivery.ack(BasicAckOptions::default()).await.map(drop).map_err(|e| e.to_string())
    }

    /// Publishes a copy of the delivery to `queue` with new headers and waits
    /// for the broker's confirm.
    async fn publish_copy(&self, delivery: &Delivery, headers: FieldTable, queue: &str) -> Result<(), String> {
        let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        publish_confirmed(&self.publisher, queue, &delivery.data, properties).await
    }
}

/// Publishes to a queue through the default exchange and waits for the
/// confirm; a return (no such queue) or a nack is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            properties,
        )
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(30), confirm).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(other)) => Err(format!("publish to {queue} not confirmed: {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no confirm from {queue} within 30s")),
    }
}

#[cfg(test)]
mod tests {
    use super::Lanes;

    #[test]
    fn a_stream_runs_one_delivery_at_a_time_in_arrival_order_and_others_are_not_held() {
        let lanes = Lanes::default();
        assert_eq!(lanes.enqueue("o1", 1), Some(1), "o1 idle: its lane starts with it");
        assert_eq!(lanes.enqueue("o1", 2), None, "behind 1");
        assert_eq!(lanes.enqueue("o2", 3), Some(3), "another stream is not held by o1");
        assert_eq!(lanes.enqueue("o1", 4), None);
        assert_eq!(lanes.next("o1"), Some(2));
        assert_eq!(lanes.next("o1"), Some(4));
        assert_eq!(lanes.next("o1"), None, "the lane ends");
        assert_eq!(lanes.enqueue("o1", 5), Some(5), "and the next delivery starts a new one");
        assert_eq!(lanes.next("o2"), None);
    }
}
