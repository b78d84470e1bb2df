//! The queues of one tenant's context:
//!
//! ```text
//!                  <tenant>.<context>.<p>
//! sluice.commands ───────────────────────▶ <tenant>.<context>.commands.<p>   (p = 0…P-1, single active consumer)
//!                                                  │ delivery limit, or dead-lettered by a processor
//!                                                  ▼
//!                                          <tenant>.<context>.commands.dlq
//! ```
//!
//! A command's partition is its stream key's ([`names::command_partition`]):
//! every command of one stream waits in one queue, in the order the edge
//! accepted them. Each partition queue has a single active consumer, so one
//! processor at a time takes its commands; transient failures are retried by
//! that processor in place (the command never leaves its partition, so later
//! commands of its stream cannot overtake it).
//!
//! Every queue is a quorum queue; every broker-side dead-lettering is
//! at-least-once, which needs `x-overflow: reject-publish` and an explicit
//! dead-letter exchange — without either RabbitMQ silently falls back to
//! at-most-once.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::{catalog, names};
use tracing::{info, warn};

/// Broker-side backstop: after this many deliveries RabbitMQ itself moves a
/// message to the DLQ (`x-first-death-reason: delivery_limit`), even if every
/// consumer crashes on it. Our own retry limit counts separately.
pub const BROKER_DELIVERY_LIMIT: i64 = 20;

fn string_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Arguments that make broker-side dead-lettering into `target` at-least-once.
fn dead_letter_into(args: &mut FieldTable, target: &str) {
    args.insert("x-dead-letter-exchange".into(), string_arg(""));
    args.insert("x-dead-letter-routing-key".into(), string_arg(target));
    args.insert("x-dead-letter-strategy".into(), string_arg("at-least-once"));
    args.insert("x-overflow".into(), string_arg("reject-publish"));
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string_arg("quorum"));
    args
}

/// Declares the exchange, the partition queues and the DLQ of one tenant's
/// context. Idempotent: the same arguments every time.
pub async fn declare_topology(channel: &Channel, tenant: &str, context: &str, partitions: u16) -> lapin::Result<()> {
    channel
        .exchange_declare(
            names::COMMAND_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let dlq = names::dead_letter_queue(tenant, context);
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(dlq.as_str().into(), durable, quorum()).await?;

    for partition in 0..partitions {
        let queue = names::command_queue(tenant, context, partition);
        let mut args = quorum();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT));
        dead_letter_into(&mut args, &dlq);
        channel.queue_declare(queue.as_str().into(), durable, args).await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                names::COMMAND_EXCHANGE.into(),
                names::routing_key(tenant, context, partition).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// The queues of the unpartitioned topology (before partitions) among
/// `existing` queue names, for one tenant's context, in the order they must
/// be emptied: the delay queues `….commands.retry.<ms>` first (they expire
/// into the work queue), then the work queue `<tenant>.<context>.commands`.
pub fn unpartitioned_queues(existing: &[String], tenant: &str, context: &str) -> Vec<String> {
    let legacy = format!("{tenant}.{context}.commands");
    let retry_prefix = format!("{legacy}.retry.");
    let mut queues: Vec<String> = existing
        .iter()
        .filter(|q| {
            q.strip_prefix(&retry_prefix).is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
        })
        .cloned()
        .collect();
    queues.sort();
    if existing.contains(&legacy) {
        queues.push(legacy);
    }
    queues
}

/// Moves the commands still waiting in `queues` (see
/// [`unpartitioned_queues`]) to their streams' partition queues, each copy
/// confirmed before its original is acked, then deletes each queue once
/// empty: accepted commands survive the upgrade. Returns how many moved.
pub async fn migrate_unpartitioned(
    connection: &Connection,
    tenant: &str,
    context: &str,
    partitions: u16,
    queues: &[String],
) -> Result<u64, String> {
    let mut moved = 0;
    for queue in queues {
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        let depth = message_count(&channel, queue).await?;
        let publisher = connection.create_channel().await.map_err(|e| e.to_string())?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
        channel.basic_qos(256, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(|e| e.to_string())?;
        for _ in 0..depth {
            let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else {
                break;
            };
            let home = home_queue(tenant, context, &delivery.data, partitions);
            super::consumer::publish_confirmed(&publisher, &home, &delivery.data, delivery.properties.clone()).await?;
            delivery.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
            moved += 1;
        }
        super::close_quietly(channel.close(200, "moved".into())).await;
        super::close_quietly(publisher.close(200, "moved".into())).await;
        // Only if empty (quorum queues refuse `if-empty`, so looked at
        // first): an edge of the old version may still publish to it.
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        let left = message_count(&channel, queue).await?;
        if left == 0 {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            info!(%queue, "unpartitioned queue moved to the partitions and deleted");
        } else {
            warn!(%queue, left, "unpartitioned queue kept: not empty yet (moved again at the next start)");
        }
        super::close_quietly(channel.close(200, "done".into())).await;
    }
    Ok(moved)
}

/// Messages ready in an existing queue.
async fn message_count(channel: &Channel, queue: &str) -> Result<u32, String> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await;
    declared.map(|q| q.message_count()).map_err(|e| e.to_string())
}

/// The partition queue a command message belongs in: its stream key's. A
/// message whose key cannot be read (not a CloudEvent, unknown type, no key)
/// fails the same way in any partition: it goes to partition 0.
pub fn home_queue(tenant: &str, context: &str, body: &[u8], partitions: u16) -> String {
    names::command_queue(tenant, context, home_partition(tenant, body, partitions).unwrap_or(0))
}

/// The partition of a command message's stream, when its key can be read.
pub fn home_partition(tenant: &str, body: &[u8], partitions: u16) -> Option<u16> {
    stream_key_of(body).map(|key| names::command_partition(tenant, &key, partitions))
}

/// The stream key of a command message, when it can be read.
pub fn stream_key_of(body: &[u8]) -> Option<String> {
    let event = CloudEvent::from_json(serde_json::from_slice(body).ok()?).ok()?;
    catalog::stream_key(&event.ty, event.data.as_ref()?).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unpartitioned_queues_are_found_delay_queues_first() {
        let existing: Vec<String> = [
            "acme.orders.commands",
            "acme.orders.commands.retry.5000",
            "acme.orders.commands.retry.1000",
            "acme.orders.commands.0",
            "acme.orders.commands.dlq",
            "acme.orders.commands.retry.x",
            "acme.patients.commands",
            "acme.eu.orders.commands",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            unpartitioned_queues(&existing, "acme", "orders"),
            ["acme.orders.commands.retry.1000", "acme.orders.commands.retry.5000", "acme.orders.commands"]
        );
        assert!(unpartitioned_queues(&existing, "globex", "orders").is_empty());
    }

    #[test]
    fn a_command_belongs_in_its_stream_keys_partition() {
        let body = serde_json::json!({
            "specversion": "1.0", "id": "1", "source": "/acme/shop", "type": "com.example.orders.ShipOrder",
            "data": {"order_id": "o1", "carrier": "ups", "tracking_number": "1Z"}
        })
        .to_string();
        let p = names::command_partition("acme", "o1", 6);
        assert_eq!(home_queue("acme", "orders", body.as_bytes(), 6), names::command_queue("acme", "orders", p));
        assert_eq!(stream_key_of(body.as_bytes()).as_deref(), Some("o1"));
        assert_eq!(home_queue("acme", "orders", b"not json", 6), "acme.orders.commands.0");
    }
}
