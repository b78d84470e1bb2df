//! The consumer loop: one delivery → pipeline → ack, delayed retry, or dead
//! letter. Whatever the outcome, the message is first published where it must
//! go next (delay queue or DLQ) and confirmed by the broker, and only then is
//! the original acked: a crash in between duplicates, never loses.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::headers::{self, string};
use super::topology::retry_queue;
use crate::domain::Aggregate;
use crate::event_store::EventStore;
use crate::kafka::EventPublisher;
use crate::operations::OperationStore;
use crate::pipeline::{IncomingCommand, Outcome, Pipeline};

/// Consumer settings (see `ProcessorConfig`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub prefetch: u16,
    pub max_attempts: u32,
    /// Delay of each retry tier; attempt n waits `retry_delays[n-1]` (the
    /// last tier repeats).
    pub retry_delays_ms: Vec<u64>,
}

/// Consumes one tenant's context queue until `shutdown` or until the
/// connection fails, finishing the messages in flight before returning.
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
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(%queue, "consuming");
    let ctx = Arc::new(ConsumerCtx { tenant, queue, pipeline, settings, publisher });
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
    /// A confirm channel for delay-queue and DLQ copies.
    publisher: Channel,
}

/// How long a delivery that could not be settled waits before it is handed
/// back to its queue.
const SETTLE_RETRY_PAUSE: Duration = Duration::from_secs(1);

impl<A, S, P, O> ConsumerCtx<A, S, P, O>
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    async fn process(&self, delivery: Delivery) {
        let headers = headers::headers_of(&delivery);
        let attempt = headers::attempt(&headers);
        let operation_id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
        let span =
            info_span!("command", tenant = %self.tenant, operation = operation_id.as_deref().unwrap_or("-"), attempt);
        sluice_telemetry::set_parent(&span, headers::get_str(&headers, "traceparent").as_deref());
        async {
            let settled = match self.decode(&delivery, &headers, operation_id, attempt) {
                Ok(cmd) => {
                    let outcome = self.pipeline.handle(&cmd).await;
                    self.settle(&delivery, headers, Some(&cmd), outcome, attempt).await
                }
                Err(reason) => {
                    let outcome = Outcome::DeadLetter { class: "malformed_message", reason };
                    self.settle(&delivery, headers, None, outcome, attempt).await
                }
            };
            if let Err(e) = settled {
                // Never held: after a pause (no hammering of a failing
                // store or queue) the delivery goes back to the queue and is
                // tried again; RabbitMQ's delivery limit bounds the loop. A
                // copy published before the failure is found settled by its
                // operation record.
                warn!(error = %e, "could not settle the delivery; handing it back after a pause");
                tokio::time::sleep(SETTLE_RETRY_PAUSE).await;
                if let Err(e) = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await {
                    // The channel is gone: its unacked deliveries go back
                    // by themselves, and the consumer reconnects.
                    warn!(error = %e, "could not hand the delivery back");
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
        attempt: u32,
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
        Ok(IncomingCommand { tenant: self.tenant.clone(), operation_id, event, attempt, traceparent })
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        mut headers: FieldTable,
        cmd: Option<&IncomingCommand>,
        outcome: Outcome,
        attempt: u32,
    ) -> Result<(), String> {
        let outcome = match outcome {
            Outcome::RetryAppended(reason) => {
                // Its events are stored: retried past `max_attempts` (at the
                // last tier's delay), never dead-lettered.
                headers::push_history(
                    &mut headers,
                    format!("{} attempt {attempt} (events stored): {reason}", chrono::Utc::now().to_rfc3339()),
                );
                Outcome::Retry(reason)
            }
            Outcome::Retry(reason) => {
                headers::push_history(
                    &mut headers,
                    format!("{} attempt {attempt}: {reason}", chrono::Utc::now().to_rfc3339()),
                );
                if attempt >= self.settings.max_attempts {
                    Outcome::DeadLetter {
                        class: "retries_exhausted",
                        reason: format!("gave up after {attempt} attempts: {reason}"),
                    }
                } else {
                    Outcome::Retry(reason)
                }
            }
            other => other,
        };
        let label = match &outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::AlreadyDone => "duplicate",
            Outcome::Rejected(_) => "rejected",
            Outcome::Retry(_) | Outcome::RetryAppended(_) => "retried",
            Outcome::DeadLetter { .. } => "dead_lettered",
        };
        metrics::counter!("sluice_commands_processed_total", "tenant" => self.tenant.clone(), "outcome" => label)
            .increment(1);
        match outcome {
            Outcome::Succeeded | Outcome::AlreadyDone => {}
            Outcome::Rejected(reason) => info!(%reason, "rejected"),
            Outcome::Retry(reason) | Outcome::RetryAppended(reason) => {
                let tiers = &self.settings.retry_delays_ms;
                let delay = tiers[(attempt as usize - 1).min(tiers.len() - 1)];
                warn!(%reason, delay_ms = delay, "transient failure, retrying after a delay");
                headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt) + 1));
                let (tenant, context) = (&self.tenant, A::CONTEXT);
                self.publish_copy(delivery, headers, &retry_queue(tenant, context, delay)).await?;
            }
            Outcome::DeadLetter { class, reason } => {
                warn!(class, %reason, "dead-lettering");
                metrics::counter!("sluice_dead_letters_total", "tenant" => self.tenant.clone(), "class" => class)
                    .increment(1);
                if let Some(cmd) = cmd {
                    // Without the record the operation would say `processing`
                    // forever: the delivery is handed back and tried again.
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
