//! RabbitMQ side of the processors: the topology they own, and the consumer
//! loop that turns a pipeline [`Outcome`] into ack, retry or dead letter.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::domain::Aggregate;
use crate::event_store::EventStore;
use crate::kafka::EventPublisher;
use crate::operations::OperationStore;
use crate::pipeline::{IncomingCommand, Outcome, Pipeline};

/// Broker-side backstop: after this many deliveries RabbitMQ itself moves a
/// message to the DLQ (`x-first-death-reason: delivery_limit`), even if every
/// consumer keeps crashing on it. Our own retry limit is lower.
pub const BROKER_DELIVERY_LIMIT: i64 = 20;

fn string_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares the exchange, the work queue and its dead-letter queue of one
/// tenant's context. Idempotent: the same arguments every time.
pub async fn declare_topology(channel: &Channel, tenant: &str, context: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            names::COMMAND_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let queue = names::command_queue(tenant, context);
    let dlq = names::dead_letter_queue(tenant, context);
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };

    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), string_arg("quorum"));
    channel.queue_declare(dlq.as_str().into(), durable, dlq_args).await?;

    // At-least-once dead-lettering needs reject-publish overflow and an
    // explicit DLX; without either RabbitMQ silently drops to at-most-once.
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string_arg("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT));
    args.insert("x-dead-letter-exchange".into(), string_arg(""));
    args.insert("x-dead-letter-routing-key".into(), string_arg(&dlq));
    args.insert("x-dead-letter-strategy".into(), string_arg("at-least-once"));
    args.insert("x-overflow".into(), string_arg("reject-publish"));
    channel.queue_declare(queue.as_str().into(), durable, args).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names::COMMAND_EXCHANGE.into(),
            names::routing_key(tenant, context).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Consumer settings (see `ProcessorConfig`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub prefetch: u16,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// Consumes one tenant's context queue until `shutdown`, finishing the
/// messages in flight before returning.
pub async fn consume<A, S, P, O>(
    connection: &Connection,
    tenant: String,
    pipeline: Arc<Pipeline<A, S, P, O>>,
    settings: ConsumerSettings,
    shutdown: CancellationToken,
) -> lapin::Result<()>
where
    A: Aggregate,
    S: EventStore + 'static,
    P: EventPublisher + 'static,
    O: OperationStore + 'static,
{
    let queue = names::command_queue(&tenant, A::CONTEXT);
    let channel = connection.create_channel().await?;
    channel.basic_qos(settings.prefetch, BasicQosOptions::default()).await?;
    let dead_letters = connection.create_channel().await?;
    dead_letters.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer = channel
        .basic_consume(queue.as_str().into(), ShortString::from(""), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    info!(%queue, "consuming");
    let ctx = Arc::new(ConsumerCtx { tenant, queue, pipeline, settings, dead_letters });
    consumer
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(usize::from(ctx.settings.prefetch), |delivery| {
            let ctx = ctx.clone();
            async move {
                match delivery {
                    Ok(delivery) => ctx.process(delivery).await,
                    Err(e) => warn!(error = %e, "consumer error"),
                }
            }
        })
        .await;
    Ok(())
}

struct ConsumerCtx<A, S, P, O> {
    tenant: String,
    queue: String,
    pipeline: Arc<Pipeline<A, S, P, O>>,
    settings: ConsumerSettings,
    /// A confirm channel: the DLQ copy must be stored before the original is acked.
    dead_letters: Channel,
}

impl<A, S, P, O> ConsumerCtx<A, S, P, O>
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    async fn process(&self, delivery: Delivery) {
        let attempt = delivery_count(&delivery) + 1;
        let operation_id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
        let span = info_span!("command", tenant = %self.tenant, operation = operation_id.as_deref().unwrap_or("-"), attempt);
        async {
            let outcome = match self.decode(&delivery, operation_id) {
                Ok(cmd) => {
                    let outcome = self.pipeline.handle(&cmd).await;
                    self.finish(&delivery, Some(&cmd), outcome, attempt).await
                }
                Err(reason) => {
                    self.finish(&delivery, None, Outcome::DeadLetter { class: "malformed_message", reason }, attempt).await
                }
            };
            if let Err(e) = outcome {
                // The delivery stays unacked and comes back after a reconnect.
                warn!(error = %e, "could not settle delivery");
            }
        }
        .instrument(span)
        .await
    }

    fn decode(&self, delivery: &Delivery, operation_id: Option<String>) -> Result<IncomingCommand, String> {
        let operation_id = operation_id.ok_or("message has no message_id (operation id)")?;
        let json: serde_json::Value =
            serde_json::from_slice(&delivery.data).map_err(|e| format!("body is not JSON: {e}"))?;
        let event = CloudEvent::from_json(json).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(|e| format!("{} {}", e.attribute, e.problem)).collect();
            format!("not a valid CloudEvent: {}", list.join("; "))
        })?;
        Ok(IncomingCommand { tenant: self.tenant.clone(), operation_id, event })
    }

    async fn finish(&self, delivery: &Delivery, cmd: Option<&IncomingCommand>, outcome: Outcome, attempt: u32) -> Result<(), String> {
        let outcome = match outcome {
            Outcome::Retry(reason) if attempt >= self.settings.max_attempts => Outcome::DeadLetter {
                class: "retries_exhausted",
                reason: format!("gave up after {attempt} attempts: {reason}"),
            },
            other => other,
        };
        match outcome {
            Outcome::Succeeded | Outcome::AlreadyDone => delivery.ack(BasicAckOptions::default()).await.map(drop).map_err(|e| e.to_string()),
            Outcome::Rejected(reason) => {
                info!(%reason, "rejected");
                delivery.ack(BasicAckOptions::default()).await.map(drop).map_err(|e| e.to_string())
            }
            Outcome::Retry(reason) => {
                let backoff = (self.settings.retry_base * 2u32.saturating_pow(attempt - 1)).min(self.settings.retry_max);
                warn!(%reason, ?backoff, "transient failure, will retry");
                tokio::time::sleep(backoff).await;
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.map(drop).map_err(|e| e.to_string())
            }
            Outcome::DeadLetter { class, reason } => {
                warn!(class, %reason, "dead-lettering");
                if let Some(cmd) = cmd {
                    if let Err(e) = self.pipeline.record_dead_letter(cmd, &reason).await {
                        // Without the record the operation would say
                        // `processing` forever: retry later instead.
                        warn!(error = %e, "cannot record dead letter yet");
                        tokio::time::sleep(self.settings.retry_max).await;
                        return delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.map(drop).map_err(|e| e.to_string());
                    }
                }
                self.publish_dead_letter(delivery, class, &reason, attempt).await?;
                delivery.ack(BasicAckOptions::default()).await.map(drop).map_err(|e| e.to_string())
            }
        }
    }

    /// Copies the message to the DLQ with the reason in headers and waits for
    /// the broker's confirm; only then may the original be acked.
    async fn publish_dead_letter(&self, delivery: &Delivery, class: &str, reason: &str, attempt: u32) -> Result<(), String> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert("x-sluice-reason".into(), string_arg(reason));
        headers.insert("x-sluice-error-class".into(), string_arg(class));
        headers.insert("x-sluice-attempts".into(), AMQPValue::LongLongInt(i64::from(attempt)));
        headers.insert("x-sluice-original-queue".into(), string_arg(&self.queue));
        headers.insert(
            "x-sluice-dead-lettered-at".into(),
            AMQPValue::Timestamp(chrono::Utc::now().timestamp().try_into().unwrap_or_default()),
        );
        let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
        let dlq = format!("{}.dlq", self.queue);
        let confirm = self
            .dead_letters
            .basic_publish("".into(), dlq.as_str().into(), BasicPublishOptions { mandatory: true, ..Default::default() }, &delivery.data, properties)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(format!("dead letter not confirmed: {other:?}")),
        }
    }
}

/// Quorum queues count returns in `x-delivery-count`; absent on the first delivery.
fn delivery_count(delivery: &Delivery) -> u32 {
    let count = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    match count {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        Some(AMQPValue::ShortInt(n)) => u32::try_from(n).unwrap_or(u32::MAX),
        _ => 0,
    }
}
