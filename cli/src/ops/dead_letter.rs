//! One dead letter as ops see it: who sent it, why it failed, how often it
//! was tried, when it died — read from its `x-sluice-*` headers, RabbitMQ's
//! `x-death` history and its CloudEvent body. Plus the filters of the DLQ
//! verbs and the grouping by failure fingerprint (command type + error class).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sluice_schemas::names;

use super::headers;

/// The class of a dead letter without `x-sluice-error-class` and without a
/// broker death reason.
pub const UNCLASSIFIED: &str = "unclassified";
/// The type of a dead letter whose body is not a CloudEvent.
pub const UNREADABLE: &str = "(unreadable body)";

/// A dead letter in a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The AMQP `message_id`: the operation id the edge handed out.
    pub message_id: Option<String>,
    pub tenant: String,
    pub context: String,
    /// The DLQ it sits in.
    pub queue: String,
    /// The CloudEvent `type` (the command), [`UNREADABLE`] if the body is not one.
    #[serde(rename = "type")]
    pub command_type: String,
    pub source: Option<String>,
    /// The CloudEvent `id`.
    pub command_id: Option<String>,
    /// `x-sluice-error-class`; for messages the broker dead-lettered before
    /// the processors' upkeep annotated them, `broker_<x-first-death-reason>`.
    pub error_class: String,
    pub reason: Option<String>,
    /// Processing attempts before it was dead-lettered (`x-sluice-attempt`).
    pub attempts: Option<i64>,
    /// Where a shovel returns it (`x-sluice-original-queue`, else the queue
    /// of its first `x-death` entry).
    pub original_queue: Option<String>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    pub age_seconds: Option<i64>,
    /// Automatic re-drives so far (`x-sluice-redrives`).
    pub redrives: i64,
    /// Deliveries of this copy from the DLQ so far (`x-delivery-count`):
    /// every listing counts one, see `ops::walk`.
    pub dlq_deliveries: i64,
}

/// Everything about one dead letter (`sluice dlq show`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub summary: DeadLetter,
    /// `x-sluice-attempt-history`: one line per failed attempt.
    pub attempt_history: Vec<String>,
    /// RabbitMQ's `x-death` entries (queue, reason, count, time, …).
    pub deaths: Vec<Value>,
    /// Every header, as JSON.
    pub headers: Map<String, Value>,
    /// The AMQP properties other than headers.
    pub properties: Map<String, Value>,
    pub redelivered: bool,
    /// The body: JSON when it parses, else its text (invalid UTF-8 replaced).
    pub payload: Value,
    pub payload_is_json: bool,
    pub payload_bytes: usize,
}

/// Reads a delivery from the DLQ of `tenant`'s `context`.
pub fn summarize(tenant: &str, context: &str, queue: &str, delivery: &Delivery, now: DateTime<Utc>) -> DeadLetter {
    let h = headers::headers_of(delivery);
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str).map(str::to_owned);
    let first_death = headers::get_str(&h, "x-first-death-reason");
    let error_class = headers::get_str(&h, headers::ERROR_CLASS)
        .or_else(|| first_death.map(|r| format!("broker_{r}")))
        .unwrap_or_else(|| UNCLASSIFIED.to_owned());
    let deaths = deaths(&h);
    let original_queue = headers::get_str(&h, headers::ORIGINAL_QUEUE)
        .or_else(|| deaths.first().and_then(|d| d["queue"].as_str()).map(str::to_owned));
    let dead_lettered_at = headers::get_str(&h, headers::DEAD_LETTERED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok().map(|t| t.with_timezone(&Utc)))
        .or_else(|| {
            deaths
                .first()
                .and_then(|d| d["time"].as_str())
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
        })
        .or_else(|| delivery.properties.timestamp().and_then(|t| Utc.timestamp_opt(t as i64, 0).single()));
    DeadLetter {
        message_id: delivery.properties.message_id().as_ref().map(|s| s.to_string()),
        tenant: tenant.to_owned(),
        context: context.to_owned(),
        queue: queue.to_owned(),
        command_type: field("type").unwrap_or_else(|| UNREADABLE.to_owned()),
        source: field("source"),
        command_id: field("id"),
        error_class,
        reason: headers::get_str(&h, headers::REASON),
        attempts: headers::get_int(&h, headers::ATTEMPT),
        original_queue,
        age_seconds: dead_lettered_at.map(|t| (now - t).num_seconds().max(0)),
        dead_lettered_at,
        redrives: headers::get_int(&h, headers::REDRIVES).unwrap_or(0),
        dlq_deliveries: headers::get_int(&h, headers::DELIVERY_COUNT).unwrap_or(0),
    }
}

/// Reads everything about a delivery.
pub fn detail(tenant: &str, context: &str, queue: &str, delivery: &Delivery, now: DateTime<Utc>) -> DeadLetterDetail {
    let h = headers::headers_of(delivery);
    let (payload, payload_is_json) = match serde_json::from_slice::<Value>(&delivery.data) {
        Ok(v) => (v, true),
        Err(_) => (Value::String(String::from_utf8_lossy(&delivery.data).into_owned()), false),
    };
    let p = &delivery.properties;
    let mut properties = Map::new();
    let mut put = |name: &str, value: Option<Value>| {
        if let Some(v) = value {
            properties.insert(name.to_owned(), v);
        }
    };
    put("content_type", p.content_type().as_ref().map(|s| json!(s.as_str())));
    put("content_encoding", p.content_encoding().as_ref().map(|s| json!(s.as_str())));
    put("delivery_mode", p.delivery_mode().map(|m| json!(m)));
    put("priority", p.priority().map(|m| json!(m)));
    put("correlation_id", p.correlation_id().as_ref().map(|s| json!(s.as_str())));
    put("reply_to", p.reply_to().as_ref().map(|s| json!(s.as_str())));
    put("expiration", p.expiration().as_ref().map(|s| json!(s.as_str())));
    put("timestamp", p.timestamp().map(timestamp_json));
    put("type", p.kind().as_ref().map(|s| json!(s.as_str())));
    put("user_id", p.user_id().as_ref().map(|s| json!(s.as_str())));
    put("app_id", p.app_id().as_ref().map(|s| json!(s.as_str())));
    DeadLetterDetail {
        summary: summarize(tenant, context, queue, delivery, now),
        attempt_history: headers::history(&h),
        deaths: deaths(&h),
        headers: table_json(&h),
        properties,
        redelivered: delivery.redelivered,
        payload,
        payload_is_json,
        payload_bytes: delivery.data.len(),
    }
}

/// The `x-death` entries, newest first (as RabbitMQ keeps them).
fn deaths(h: &FieldTable) -> Vec<Value> {
    match headers::get(h, "x-death") {
        Some(AMQPValue::FieldArray(items)) => items.as_slice().iter().map(value_json).collect(),
        _ => Vec::new(),
    }
}

/// An AMQP header value as JSON: timestamps as RFC 3339, byte arrays as hex.
pub fn value_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => timestamp_json(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_json(t)),
        AMQPValue::ByteArray(b) => json!(b.as_slice().iter().map(|x| format!("{x:02x}")).collect::<String>()),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_json(table: &FieldTable) -> Map<String, Value> {
    table.inner().iter().map(|(k, v)| (k.as_str().to_owned(), value_json(v))).collect()
}

fn timestamp_json(seconds: u64) -> Value {
    match Utc.timestamp_opt(seconds as i64, 0).single() {
        Some(t) => json!(t.to_rfc3339()),
        None => json!(seconds),
    }
}

/// Which dead letters a verb acts on; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Filter {
    /// The command type: the full CloudEvent type, or its last segment
    /// (`SubmitOrder` matches `com.example.orders.SubmitOrder`).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub command_type: Option<String>,
    /// A prefix of the CloudEvent source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A substring of the reason, case-insensitive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A substring of the error class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Dead-lettered at least this long ago (those of unknown age never match).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "seconds")]
    pub older_than: Option<Duration>,
    /// Only these message ids (`-` for a message without one): what an
    /// operator was shown and confirmed, so nothing that arrived since goes.
    #[serde(skip)]
    pub message_ids: Option<BTreeSet<String>>,
}

fn seconds<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}s", d.as_secs())),
        None => s.serialize_none(),
    }
}

impl Filter {
    /// Whether the filter selects every message.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    pub fn matches(&self, dl: &DeadLetter) -> bool {
        let ty = self
            .command_type
            .as_deref()
            .is_none_or(|want| dl.command_type == want || dl.command_type.rsplit('.').next() == Some(want));
        let source =
            self.source.as_deref().is_none_or(|want| dl.source.as_deref().is_some_and(|s| s.starts_with(want)));
        let reason = self
            .reason
            .as_deref()
            .is_none_or(|want| dl.reason.as_deref().is_some_and(|r| r.to_lowercase().contains(&want.to_lowercase())));
        let class = self.class.as_deref().is_none_or(|want| dl.error_class.contains(want));
        let age = self.older_than.is_none_or(|min| dl.age_seconds.is_some_and(|age| age >= min.as_secs() as i64));
        let confirmed = self.message_ids.as_ref().is_none_or(|ids| ids.contains(id_or_dash(dl)));
        ty && source && reason && class && age && confirmed
    }

    /// The filter as one line for people (and the audit log).
    pub fn describe(&self) -> String {
        let criteria = Filter { message_ids: None, ..self.clone() };
        let described =
            if criteria.is_empty() { "all".into() } else { serde_json::to_string(&criteria).unwrap_or_default() };
        match &self.message_ids {
            Some(ids) => format!("{described}, the {} confirmed", ids.len()),
            None => described,
        }
    }
}

/// A dead letter's message id, `-` when it has none.
pub fn id_or_dash(dl: &DeadLetter) -> &str {
    dl.message_id.as_deref().unwrap_or("-")
}

/// Dead letters with the same command type and error class: most likely one
/// cause, fixed once and shovelled back together.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    #[serde(rename = "type")]
    pub command_type: String,
    pub error_class: String,
    pub count: u64,
    /// Count per DLQ.
    pub queues: BTreeMap<String, u64>,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// Up to three different reasons, as examples.
    pub reasons: Vec<String>,
}

/// Groups dead letters by fingerprint, largest group first.
pub fn group(letters: &[DeadLetter]) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for dl in letters {
        let g = groups.entry((dl.command_type.clone(), dl.error_class.clone())).or_insert_with(|| Group {
            command_type: dl.command_type.clone(),
            error_class: dl.error_class.clone(),
            count: 0,
            queues: BTreeMap::new(),
            oldest: None,
            newest: None,
            reasons: Vec::new(),
        });
        g.count += 1;
        *g.queues.entry(dl.queue.clone()).or_default() += 1;
        if let Some(at) = dl.dead_lettered_at {
            g.oldest = Some(g.oldest.map_or(at, |o| o.min(at)));
            g.newest = Some(g.newest.map_or(at, |n| n.max(at)));
        }
        if let Some(reason) = &dl.reason {
            if g.reasons.len() < 3 && !g.reasons.contains(reason) {
                g.reasons.push(reason.clone());
            }
        }
    }
    let mut out: Vec<Group> = groups.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.command_type.cmp(&b.command_type)));
    out
}

/// Where a shovel sends a dead letter back to when no `--to` is given: its
/// stream's partition queue among `partitions` (`body`: the message), else
/// the queue it came from, else partition 0 of its DLQ's tenant and context.
pub fn return_queue(dl: &DeadLetter, body: &[u8], partitions: Option<u16>) -> String {
    let home = partitions.and_then(|n| sluice_processors::amqp::topology::home_partition(&dl.tenant, body, n));
    match home {
        Some(partition) => names::command_queue(&dl.tenant, &dl.context, partition),
        None => dl.original_queue.clone().unwrap_or_else(|| names::command_queue(&dl.tenant, &dl.context, 0)),
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration as Age;

    use super::*;

    fn letter(ty: &str, class: &str, reason: &str, age_s: i64) -> DeadLetter {
        let now = Utc::now();
        DeadLetter {
            message_id: Some(format!("{ty}-{class}-{age_s}")),
            tenant: "acme".into(),
            context: "orders".into(),
            queue: "acme.orders.commands.dlq".into(),
            command_type: ty.into(),
            source: Some("/acme/shop".into()),
            command_id: Some("c1".into()),
            error_class: class.into(),
            reason: Some(reason.into()),
            attempts: Some(1),
            original_queue: None,
            dead_lettered_at: Some(now - Age::seconds(age_s)),
            age_seconds: Some(age_s),
            redrives: 0,
            dlq_deliveries: 0,
        }
    }

    #[test]
    fn filters_match_type_by_full_name_or_last_segment_and_the_rest_by_substring() {
        let dl = letter("com.example.orders.SubmitOrder", "malformed_command", "data /order_id: not a string", 600);
        assert!(Filter::default().matches(&dl));
        assert!(Filter { command_type: Some("SubmitOrder".into()), ..Default::default() }.matches(&dl));
        assert!(
            Filter { command_type: Some("com.example.orders.SubmitOrder".into()), ..Default::default() }.matches(&dl)
        );
        assert!(!Filter { command_type: Some("Submit".into()), ..Default::default() }.matches(&dl));
        assert!(Filter { class: Some("malformed".into()), reason: Some("ORDER_ID".into()), ..Default::default() }
            .matches(&dl));
        assert!(Filter { source: Some("/acme/".into()), ..Default::default() }.matches(&dl));
        assert!(!Filter { source: Some("/globex/".into()), ..Default::default() }.matches(&dl));
        assert!(Filter { older_than: Some(Duration::from_secs(300)), ..Default::default() }.matches(&dl));
        assert!(!Filter { older_than: Some(Duration::from_secs(3_600)), ..Default::default() }.matches(&dl));
    }

    #[test]
    fn groups_are_by_type_and_class_largest_first() {
        let letters = vec![
            letter("A", "x", "r1", 1),
            letter("B", "y", "r2", 2),
            letter("B", "y", "r3", 3),
            letter("B", "z", "r4", 4),
        ];
        let groups = group(&letters);
        assert_eq!(groups.len(), 3);
        assert_eq!((groups[0].command_type.as_str(), groups[0].error_class.as_str(), groups[0].count), ("B", "y", 2));
        assert_eq!(groups[0].reasons, ["r2", "r3"]);
        assert!(groups[0].oldest < groups[0].newest);
    }

    #[test]
    fn header_values_become_plain_json() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongLongInt(3));
        t.insert("s".into(), headers::string("x"));
        t.insert("at".into(), AMQPValue::Timestamp(0));
        let json = table_json(&t);
        assert_eq!(json["n"], 3);
        assert_eq!(json["s"], "x");
        assert_eq!(json["at"], "1970-01-01T00:00:00+00:00");
    }
}
