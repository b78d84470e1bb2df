//! The queues of one tenant's context:
//!
//! ```text
//! sluice.commands ──<tenant>.<context>──▶ <tenant>.<context>.commands ──(delivery limit)──▶ ….commands.dlq
//!                                              ▲          │ transient failure
//!                                              │          ▼
//!                                   TTL expiry └── ….commands.retry.<ms>  (one queue per delay tier)
//! ```
//!
//! Every queue is a quorum queue; every broker-side dead-lettering is
//! at-least-once, which needs `x-overflow: reject-publish` and an explicit
//! dead-letter exchange — without either RabbitMQ silently falls back to
//! at-most-once.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use sluice_schemas::names;

/// Broker-side backstop: after this many deliveries RabbitMQ itself moves a
/// message to the DLQ (`x-first-death-reason: delivery_limit`), even if every
/// consumer crashes on it. Our own retry limit counts separately (headers).
pub const BROKER_DELIVERY_LIMIT: i64 = 20;

fn string_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The delay queue of one retry tier.
pub fn retry_queue(tenant: &str, context: &str, delay_ms: u64) -> String {
    format!("{}.retry.{delay_ms}", names::command_queue(tenant, context))
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

/// Declares exchange, work queue, delay queues and DLQ of one tenant's
/// context. Idempotent: the same arguments every time.
pub async fn declare_topology(
    channel: &Channel,
    tenant: &str,
    context: &str,
    retry_delays_ms: &[u64],
) -> lapin::Result<()> {
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

    channel.queue_declare(dlq.as_str().into(), durable, quorum()).await?;

    let mut args = quorum();
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT));
    dead_letter_into(&mut args, &dlq);
    channel.queue_declare(queue.as_str().into(), durable, args).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names::COMMAND_EXCHANGE.into(),
            names::routing_key(tenant, context).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for &delay in retry_delays_ms {
        // Messages wait out the tier's TTL, then expire back into the work queue.
        let mut args = quorum();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(delay).unwrap_or(i64::MAX)));
        dead_letter_into(&mut args, &queue);
        channel.queue_declare(retry_queue(tenant, context, delay).as_str().into(), durable, args).await?;
    }
    Ok(())
}
