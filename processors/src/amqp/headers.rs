//! The `x-sluice-*` message headers: how a command's history travels with it
//! through in-place retries, requeues and the DLQ, readable by ops tools.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

/// Processing attempts so far (1 on the first delivery from the edge).
pub const ATTEMPT: &str = "x-sluice-attempt";
/// One line per failed attempt: `<rfc3339> <reason>`.
pub const HISTORY: &str = "x-sluice-attempt-history";
/// Why the message is in the DLQ, in words.
pub const REASON: &str = "x-sluice-reason";
/// The class of that reason (`malformed_command`, `retries_exhausted`, …): ops group by it.
pub const ERROR_CLASS: &str = "x-sluice-error-class";
/// The work queue the message came from (where a shovel returns it).
pub const ORIGINAL_QUEUE: &str = "x-sluice-original-queue";
pub const DEAD_LETTERED_AT: &str = "x-sluice-dead-lettered-at";
/// How many times the message was re-driven from the DLQ.
pub const REDRIVES: &str = "x-sluice-redrives";

/// Error classes whose cause may have gone away: eligible for re-drive.
/// `broker_delivery_limit`: RabbitMQ moved it after its delivery limit (a
/// settle that kept failing, consumers that kept crashing); bounded like the
/// others by `max_redrives`.
pub const TRANSIENT_CLASSES: &[&str] = &["retries_exhausted", "broker_delivery_limit"];

/// RabbitMQ's count of earlier deliveries of a message from a quorum queue
/// (set by the broker, per queue).
pub const DELIVERY_COUNT: &str = "x-delivery-count";

pub fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub fn get<'a>(headers: &'a FieldTable, name: &str) -> Option<&'a AMQPValue> {
    headers.inner().get(name)
}

pub fn get_int(headers: &FieldTable, name: &str) -> Option<i64> {
    match get(headers, name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

pub fn get_str(headers: &FieldTable, name: &str) -> Option<String> {
    match get(headers, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn headers_of(delivery: &Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

/// The attempt this delivery starts at: our own counter (1, or more for a
/// command requeued after its in-place attempts).
pub fn attempt(headers: &FieldTable) -> u32 {
    get_int(headers, ATTEMPT).and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1)
}

/// Appends one line to the attempt history.
pub fn push_history(headers: &mut FieldTable, line: String) {
    let mut history = match get(headers, HISTORY) {
        Some(AMQPValue::FieldArray(items)) => items.clone(),
        _ => FieldArray::default(),
    };
    history.push(string(&line));
    headers.insert(HISTORY.into(), AMQPValue::FieldArray(history));
}

/// The headers of a dead letter going back to its work queue for a fresh try,
/// by the periodic re-drive or by `sluice dlq shovel`: the attempt count
/// starts again at 1 (so the retry tiers apply again instead of the message
/// being dead-lettered on its first transient failure), the DLQ's reason and
/// class go (a new failure writes its own), and so does the broker's delivery
/// counter of the DLQ, which says nothing about the work queue. The attempt
/// history, the original queue and the trace context stay.
pub fn for_fresh_attempt(headers: &FieldTable) -> FieldTable {
    let mut inner = headers.inner().clone();
    inner.retain(|name, _| ![REASON, ERROR_CLASS, DELIVERY_COUNT].contains(&name.as_str()));
    let mut fresh = FieldTable::from(inner);
    fresh.insert(ATTEMPT.into(), AMQPValue::LongLongInt(1));
    fresh
}

pub fn history(headers: &FieldTable) -> Vec<String> {
    match get(headers, HISTORY) {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_attempt_starts_at_one_without_the_dead_letter_verdict() {
        let mut headers = FieldTable::default();
        headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(6));
        headers.insert(REASON.into(), string("gave up after 6 attempts: store down"));
        headers.insert(ERROR_CLASS.into(), string("retries_exhausted"));
        headers.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        headers.insert(ORIGINAL_QUEUE.into(), string("acme.orders.commands"));
        headers.insert("traceparent".into(), string("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        push_history(&mut headers, "t attempt 1: store down".into());

        let fresh = for_fresh_attempt(&headers);
        assert_eq!(attempt(&fresh), 1);
        assert_eq!(get_int(&fresh, ATTEMPT), Some(1));
        for gone in [REASON, ERROR_CLASS, DELIVERY_COUNT] {
            assert!(get(&fresh, gone).is_none(), "{gone} is dropped");
        }
        assert_eq!(get_str(&fresh, ORIGINAL_QUEUE).as_deref(), Some("acme.orders.commands"));
        assert!(get_str(&fresh, "traceparent").is_some());
        assert_eq!(history(&fresh), ["t attempt 1: store down"]);
    }
}
