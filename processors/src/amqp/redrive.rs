//! Dead-letter upkeep, run periodically per tenant's context:
//!
//! - **Re-drive**: a dead letter whose cause was transient (its class is in
//!   [`headers::TRANSIENT_CLASSES`]) goes back to the work queue with a fresh
//!   attempt count, at most `max_redrives` times: the outage that exhausted its
//!   retries may be over.
//! - **Bookkeeping**: a message RabbitMQ itself dead-lettered (delivery limit:
//!   consumers kept crashing on it) carries no sluice reason and its operation
//!   still says `processing`; it gets a reason header and its operation is
//!   recorded `dead_lettered`, so every accepted command ends in a terminal state.
//!
//! Each move publishes the new copy with a confirm before acking the old one.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Connection;
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tracing::{info, warn};

use super::consumer::publish_confirmed;
use super::headers::{self, string};
use super::topology::home_queue;
use crate::operations::{OperationRef, OperationStore, Order, Status};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveReport {
    pub redriven: u32,
    pub annotated: u32,
}

/// The context whose DLQ is looked after, and its partition count (a
/// re-driven command goes back to its stream's partition).
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub tenant: &'a str,
    pub context: &'a str,
    pub partitions: u16,
}

/// One pass over the DLQ of a tenant's context.
pub async fn redrive_once<O: OperationStore>(
    connection: &Connection,
    target: Target<'_>,
    max_redrives: u32,
    operations: &O,
) -> Result<RedriveReport, String> {
    let Target { tenant, context, partitions } = target;
    let dlq = names::dead_letter_queue(tenant, context);
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    let depth = channel
        .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
        .await
        .map_err(|e| e.to_string())?
        .message_count();
    let mut report = RedriveReport::default();
    if depth == 0 {
        super::close_quietly(channel.close(200, "done".into())).await;
        return Ok(report);
    }
    let publisher = connection.create_channel().await.map_err(|e| e.to_string())?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    // Hold every message of this pass at once, so one left in place is not
    // fetched again; those not acked return to the DLQ when the channel closes.
    let prefetch = u16::try_from(depth).unwrap_or(u16::MAX);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            dlq.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..prefetch {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await else { break };
        let mut h = headers::headers_of(&delivery);
        let class = headers::get_str(&h, headers::ERROR_CLASS);
        match class.as_deref() {
            None => {
                let why = headers::get_str(&h, "x-first-death-reason").unwrap_or_else(|| "unknown".into());
                let reason = format!("dead-lettered by the broker ({why}): consumers failed on it repeatedly");
                if let Some(op) = delivery.properties.message_id().as_ref() {
                    if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                        .map_err(|e| e.to_string())
                        .and_then(|v| CloudEvent::from_json(v).map_err(|_| "invalid".to_owned()))
                    {
                        let op_ref = OperationRef {
                            tenant,
                            operation_id: op.as_str(),
                            command_type: &event.ty,
                            source: &event.source,
                            command_id: &event.id,
                        };
                        // Re-driven below on a later pass, unless it used up
                        // its re-drives: only then is it the final answer.
                        let class = format!("broker_{why}");
                        let redrives = headers::get_int(&h, headers::REDRIVES).unwrap_or(0);
                        let status = if headers::TRANSIENT_CLASSES.contains(&class.as_str())
                            && redrives < i64::from(max_redrives)
                        {
                            Status::Processing { attempt: 1 }
                        } else {
                            Status::DeadLettered(reason.clone())
                        };
                        operations.record(op_ref, &status, Order::default()).await.map_err(|e| e.to_string())?;
                    }
                }
                h.insert(headers::REASON.into(), string(&reason));
                h.insert(headers::ERROR_CLASS.into(), string(&format!("broker_{why}")));
                let from = headers::get_str(&h, "x-first-death-queue")
                    .unwrap_or_else(|| home_queue(tenant, context, &delivery.data, partitions));
                h.insert(headers::ORIGINAL_QUEUE.into(), string(&from));
                h.insert(headers::DEAD_LETTERED_AT.into(), string(&chrono::Utc::now().to_rfc3339()));
                let properties = delivery.properties.clone().with_headers(h);
                publish_confirmed(&publisher, &dlq, &delivery.data, properties).await?;
                delivery.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
                report.annotated += 1;
            }
            Some(class) if headers::TRANSIENT_CLASSES.contains(&class) => {
                let redrives = headers::get_int(&h, headers::REDRIVES).unwrap_or(0);
                if redrives >= i64::from(max_redrives) {
                    continue;
                }
                let mut fresh = headers::for_fresh_attempt(&h);
                fresh.insert(headers::REDRIVES.into(), AMQPValue::LongLongInt(redrives + 1));
                let properties = delivery.properties.clone().with_headers(fresh);
                // Its stream's partition (as of now, should the count have changed).
                let queue = home_queue(tenant, context, &delivery.data, partitions);
                publish_confirmed(&publisher, &queue, &delivery.data, properties).await?;
                delivery.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
                report.redriven += 1;
            }
            Some(_) => {}
        }
    }
    super::close_quietly(channel.close(200, "done".into())).await;
    super::close_quietly(publisher.close(200, "done".into())).await;
    if report != RedriveReport::default() {
        info!(%dlq, redriven = report.redriven, annotated = report.annotated, "dead-letter upkeep");
    }
    Ok(report)
}

/// Runs [`redrive_once`] every `interval` until `shutdown`.
pub async fn redrive_loop<O: OperationStore>(
    connection: &Connection,
    target: Target<'_>,
    interval: Duration,
    max_redrives: u32,
    operations: &O,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !connection.status().connected() {
            return;
        }
        // lapin has no timeouts: a call on a connection the broker dropped
        // (this process was frozen) may never return, so stopping must not
        // wait for it.
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = redrive_once(connection, target, max_redrives, operations) => result,
        };
        if let Err(e) = result {
            warn!(error = %e, tenant = target.tenant, context = target.context, "dead-letter upkeep failed");
        }
    }
}
