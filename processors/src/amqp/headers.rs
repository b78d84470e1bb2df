//! The `x-sluice-*` message headers: how a command's history travels with it
//! through delay queues and the DLQ, readable by ops tools.

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
pub const TRANSIENT_CLASSES: &[&str] = &["retries_exhausted"];

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

/// The attempt this delivery is: our own counter (delay-queue retries).
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
