//! Reading a quorum queue without taking anything from it.
//!
//! RabbitMQ 3.10 offers no browse for quorum queues over AMQP or HTTP.
//! `basic.get` with requeue — and the management API's "get messages", which
//! is the same thing with `ackmode: ack_requeue_true` — puts each message
//! back as soon as it was read, so reading a queue that way returns the same
//! message again, and every read counts as a delivery. (The broker has an
//! internal peek for quorum queues, reachable only through `rabbitmqctl eval`
//! on a broker node: not something an ops tool may rely on.)
//!
//! A walk therefore takes the messages that are in the queue when it starts,
//! on **one** channel whose prefetch covers them, acks only those the caller
//! removes, and then closes the channel: the broker gives every unacked
//! message back. Measured on RabbitMQ 3.10.8 (`tests/tests/dlq_list.rs`
//! checks the first three on every run):
//!
//! - **Order is kept**: the returned messages go back in their old order and
//!   ahead of anything published meanwhile. This holds for one channel only:
//!   holding 5,000 messages on three channels of 2,000 and closing them got
//!   them back reordered in blocks. Hence one channel, and at most 65,535
//!   messages held at once (the largest AMQP prefetch); a walk of a deeper
//!   queue sees the first 65,535 unless the caller removes messages as it
//!   goes, which frees room for more. (`basic.qos 0` is no way out: a quorum
//!   queue then hands out only 2,000.)
//! - **Each walk is a delivery**: every returned message comes back with
//!   `redelivered` set and its `x-delivery-count` header one higher. The DLQ
//!   has no delivery limit (see `processors::amqp::topology`), so nothing
//!   follows from the count there; a queue that has one, by argument or by
//!   policy, is refused by [`ensure_walkable`], because every listing would
//!   bring its messages closer to being dropped or dead-lettered.
//! - **Going back is asynchronous**: the broker returns the messages a few
//!   milliseconds after the channel closed; [`Walk::finish`] waits until the
//!   queue's depth shows them again, so a walk right after a walk sees them.
//! - **While a walk runs, the messages it holds are invisible** to every
//!   other consumer (the processors' re-drive, another walk, a shovel).
//!   Nothing is lost: if this process dies, the connection drops and the
//!   broker returns everything unacked, as on a normal finish.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use serde_json::Value;

use super::{amqp_err, OpsError};

/// The most messages one channel can hold unacked (AMQP prefetch is a u16).
pub const MAX_HELD: u32 = u16::MAX as u32;

/// How long a walk waits for the next delivery before it concludes that
/// someone else took the rest of the messages it expected.
const IDLE: Duration = Duration::from_secs(3);

/// How long [`Walk::finish`] waits for the returned messages to show.
const RETURN_WAIT: Duration = Duration::from_secs(5);

/// One pass over the messages a queue holds when the pass starts.
pub struct Walk {
    queue: String,
    channel: Channel,
    /// `None` when the queue was empty: nothing to consume.
    consumer: Option<Consumer>,
    /// Messages ready when the walk started: it stops after this many, so a
    /// producer that keeps publishing cannot make it run forever.
    depth_at_start: u32,
    /// The channel's prefetch: how many it can hold unacked at once.
    prefetch: u32,
    seen: u32,
    removed: u32,
    /// Set when a delivery did not come within [`IDLE`]: someone else
    /// consumed what this walk expected.
    ran_dry: bool,
}

/// Checks the management API's view of a queue: it must exist and have no
/// delivery limit, since every walk counts as a delivery of every message it
/// gives back. RabbitMQ 4 gives quorum queues a default limit of 20, shown as
/// `delivery_limit`; 3.10 has none unless an argument or policy sets one.
pub fn ensure_walkable(queue: &str, info: &Value) -> Result<(), OpsError> {
    if let Some(limit) = delivery_limit(info) {
        return Err(OpsError::Refused(format!(
            "{queue} has a delivery limit of {limit}: reading it would count as a delivery of every message and \
             could make the broker drop or dead-letter them; remove the limit (argument or policy) first"
        )));
    }
    if info["type"] == "stream" {
        return Err(OpsError::Refused(format!("{queue} is a stream: read it with a stream offset instead")));
    }
    Ok(())
}

/// The delivery limit that applies to a queue, from its arguments, its
/// (operator) policy, or the queue-type default the broker reports.
pub fn delivery_limit(info: &Value) -> Option<i64> {
    [
        &info["arguments"]["x-delivery-limit"],
        &info["effective_policy_definition"]["delivery-limit"],
        &info["delivery_limit"],
    ]
    .into_iter()
    .filter_map(Value::as_i64)
    .find(|limit| *limit >= 0)
}

impl Walk {
    /// Starts a walk over `queue`, holding at most `max_held` messages at
    /// once (capped at [`MAX_HELD`]).
    pub async fn start(connection: &Connection, queue: &str, max_held: u32) -> Result<Walk, OpsError> {
        Self::start_at_most(connection, queue, max_held, u32::MAX).await
    }

    /// A walk over the first `at_most` messages of `queue` (what an earlier
    /// pass left of the messages it was about, when nothing else consumes
    /// the queue: they come back first, in their order).
    pub async fn start_at_most(
        connection: &Connection,
        queue: &str,
        max_held: u32,
        at_most: u32,
    ) -> Result<Walk, OpsError> {
        let depth_at_start = ready_messages(connection, queue).await?.min(at_most);
        let channel = connection.create_channel().await.map_err(amqp_err)?;
        let prefetch = depth_at_start.min(max_held).min(MAX_HELD);
        let consumer = if prefetch == 0 {
            None
        } else {
            channel.basic_qos(prefetch as u16, BasicQosOptions::default()).await.map_err(amqp_err)?;
            let consumer = channel
                .basic_consume(
                    queue.into(),
                    ShortString::from(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp_err)?;
            Some(consumer)
        };
        Ok(Walk {
            queue: queue.to_owned(),
            channel,
            consumer,
            depth_at_start,
            prefetch,
            seen: 0,
            removed: 0,
            ran_dry: false,
        })
    }

    /// The next message, or `None` when every message present at the start
    /// was seen, when someone else took the rest, or when the channel holds
    /// as many as it can ([`Walk::window_full`]: remove some, then call again).
    pub async fn next(&mut self) -> Result<Option<Delivery>, OpsError> {
        if self.done() || self.window_full() {
            return Ok(None);
        }
        let Some(consumer) = self.consumer.as_mut() else { return Ok(None) };
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.seen += 1;
                Ok(Some(delivery))
            }
            Ok(Some(Err(e))) => Err(amqp_err(e)),
            Ok(None) | Err(_) => {
                self.ran_dry = true;
                Ok(None)
            }
        }
    }

    /// Removes a message this walk holds from the queue (acks it). Call it
    /// only once the message is safe elsewhere, if it must be.
    pub async fn remove(&mut self, delivery: &Delivery) -> Result<(), OpsError> {
        // An ack on a channel the broker closed (its consumer timeout, say)
        // is lost without an error, and the message goes back to the queue.
        if !self.channel.status().connected() {
            return Err(OpsError::Amqp(format!(
                "the broker closed the channel reading {} (consumer timeout?): the message in hand stays in it, beside any copy made of it",
                self.queue
            )));
        }
        delivery.ack(BasicAckOptions::default()).await.map_err(amqp_err)?;
        self.removed += 1;
        Ok(())
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn depth_at_start(&self) -> u32 {
        self.depth_at_start
    }

    /// Messages looked at so far.
    pub fn seen(&self) -> u32 {
        self.seen
    }

    /// Whether the walk has nothing more to look at.
    pub fn done(&self) -> bool {
        self.seen >= self.depth_at_start || self.ran_dry
    }

    /// Messages removed so far.
    pub fn removed(&self) -> u32 {
        self.removed
    }

    /// Whether every message present at the start was looked at.
    pub fn complete(&self) -> bool {
        self.seen >= self.depth_at_start
    }

    /// Whether the channel holds as many unacked messages as it may.
    pub fn window_full(&self) -> bool {
        self.seen - self.removed >= self.prefetch
    }

    /// Gives every message not removed back to the queue (closing the
    /// channel), then waits until the queue shows them again.
    pub async fn finish(self, connection: &Connection) -> Result<(), OpsError> {
        let returned = self.seen - self.removed;
        let _ = self.channel.close(200, "walk finished".into()).await;
        if returned == 0 {
            return Ok(());
        }
        // Others may consume meanwhile, so this is a bounded wait, not a promise.
        let deadline = Instant::now() + RETURN_WAIT;
        while Instant::now() < deadline {
            if ready_messages(connection, &self.queue).await? >= returned {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Drop for Walk {
    /// A walk abandoned on an error still gives its messages back now,
    /// not only when the connection closes.
    fn drop(&mut self) {
        if self.channel.status().connected() {
            let channel = self.channel.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = channel.close(200, "walk abandoned".into()).await;
                });
            }
        }
    }
}

/// Messages ready in a queue, exact (a passive declare, not the management
/// API's periodic statistics). A missing queue is a usage error.
pub async fn ready_messages(connection: &Connection, queue: &str) -> Result<u32, OpsError> {
    Ok(passive_declare(connection, queue).await?.message_count())
}

/// Ready messages and consumers of a queue, exact; `None` if it does not exist.
pub async fn queue_counts(connection: &Connection, queue: &str) -> Result<Option<(u32, u32)>, OpsError> {
    match passive_declare(connection, queue).await {
        Ok(q) => Ok(Some((q.message_count(), q.consumer_count()))),
        Err(OpsError::Usage(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn passive_declare(connection: &Connection, queue: &str) -> Result<lapin::Queue, OpsError> {
    // A failed passive declare closes its channel: use one of its own.
    let channel = connection.create_channel().await.map_err(amqp_err)?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(q) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(q)
        }
        Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => {
            Err(OpsError::Usage(format!("queue {queue} does not exist")))
        }
        Err(e) => Err(amqp_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_delivery_limit_from_argument_policy_or_default_refuses_the_walk() {
        let plain = json!({"arguments": {"x-queue-type": "quorum"}, "effective_policy_definition": {}});
        assert_eq!(delivery_limit(&plain), None);
        assert!(ensure_walkable("q", &plain).is_ok());
        let by_argument = json!({"arguments": {"x-delivery-limit": 20}});
        assert_eq!(delivery_limit(&by_argument), Some(20));
        let by_policy = json!({"arguments": {}, "effective_policy_definition": {"delivery-limit": 5}});
        assert!(matches!(ensure_walkable("q", &by_policy), Err(OpsError::Refused(_))));
        let v4_default = json!({"arguments": {}, "delivery_limit": 20});
        assert_eq!(delivery_limit(&v4_default), Some(20));
        let unlimited = json!({"arguments": {"x-delivery-limit": -1}});
        assert_eq!(delivery_limit(&unlimited), None);
    }
}
