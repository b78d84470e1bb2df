//! What the benchmark sends, and the byte sizes of what the pipeline makes of
//! it (the command on RabbitMQ, the Avro event on Kafka), so the raw
//! ceilings move messages of the same size as the pipeline does.
//!
//! The commands look like use (issue 12): a [`Mix`] of SubmitOrder for new
//! orders, ShipOrder and CancelOrder of orders already submitted (some
//! rejected by the rules: an order ships or cancels once), and client
//! retries that send an earlier CloudEvent again byte for byte. Orders to
//! ship or cancel are drawn with skew from a working set of recent orders, so
//! streams have history and a few keys are hot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Value};
use sluice_schemas::catalog;
use sluice_schemas::orders::{
    OrderEvent, OrderLine, OrderSubmitted, CANCEL_ORDER, ORDER_SUBMITTED, SHIP_ORDER, SUBMIT_ORDER,
};

/// Customers the orders are spread over: enough partitions of the
/// by-customer table that no single one is hot.
const CUSTOMERS: u64 = 1_000;

/// Recent orders that ShipOrder and CancelOrder choose from.
const WORKING_SET: usize = 5_000;

/// Recent commands that a client retry chooses from.
const RETRY_WINDOW: usize = 1_000;

/// The share of each kind of command; the four add up to 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mix {
    pub submit: f64,
    pub ship: f64,
    pub cancel: f64,
    /// An earlier CloudEvent sent again unchanged (same source and id).
    pub retry: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self { submit: 0.60, ship: 0.20, cancel: 0.15, retry: 0.05 }
    }
}

impl Mix {
    /// Submissions only: every command a new order (the raw phases' shape).
    pub const SUBMIT_ONLY: Mix = Mix { submit: 1.0, ship: 0.0, cancel: 0.0, retry: 0.0 };

    /// `submit,ship,cancel,retry` as percentages or fractions, e.g. `60,20,15,5`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<f64> = text
            .split(',')
            .map(|p| p.trim().parse::<f64>().map_err(|_| format!("not a number: {p:?}")))
            .collect::<Result<_, _>>()?;
        let [submit, ship, cancel, retry] = parts[..] else {
            return Err(format!("the mix takes four shares (submit,ship,cancel,retry), got {}", parts.len()));
        };
        let total = submit + ship + cancel + retry;
        if parts.iter().any(|p| *p < 0.0) || total <= 0.0 || submit <= 0.0 {
            return Err("shares are ≥ 0 and submissions > 0 (the others act on submitted orders)".into());
        }
        Ok(Self { submit: submit / total, ship: ship / total, cancel: cancel / total, retry: retry / total })
    }
}

/// What a command does to its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Submit,
    Ship,
    Cancel,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Submit => "submit",
            Kind::Ship => "ship",
            Kind::Cancel => "cancel",
        }
    }
}

/// One command to send.
#[derive(Debug, Clone)]
pub struct Command {
    pub kind: Kind,
    /// Sent before: the same bytes again.
    pub retry: bool,
    pub order_id: String,
    /// The structured-mode CloudEvent.
    pub body: Arc<[u8]>,
}

/// Makes commands with ids unique within a run (the tenant is unique per run).
pub struct Workload {
    tenant: String,
    source: String,
    mix: Mix,
    next_order: AtomicU64,
    next_command: AtomicU64,
    state: Mutex<State>,
}

struct State {
    rng: SplitMix64,
    /// Orders submitted so far, newest last.
    orders: VecDeque<String>,
    /// Commands sent so far, newest last.
    sent: VecDeque<Command>,
}

impl Workload {
    pub fn new(tenant: &str, mix: Mix, seed: u64) -> Self {
        Self {
            tenant: tenant.to_owned(),
            source: format!("/{tenant}/bench"),
            mix,
            next_order: AtomicU64::new(0),
            next_command: AtomicU64::new(0),
            state: Mutex::new(State {
                rng: SplitMix64(seed),
                orders: VecDeque::with_capacity(WORKING_SET),
                sent: VecDeque::with_capacity(RETRY_WINDOW),
            }),
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The tenant's CloudEvent source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn mix(&self) -> Mix {
        self.mix
    }

    /// The next order's id; every call gives a new one.
    pub fn next_order(&self) -> String {
        format!("o-{}", self.next_order.fetch_add(1, Ordering::Relaxed))
    }

    /// The next command of the mix.
    pub fn next(&self) -> Command {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let roll = state.rng.unit();
        let m = self.mix;
        if roll < m.retry && !state.sent.is_empty() {
            let len = state.sent.len();
            let i = state.rng.below(len);
            return Command { retry: true, ..state.sent[i].clone() };
        }
        // The rest of the roll picks among the three kinds by their shares.
        let roll = (roll - m.retry).max(0.0) / (1.0 - m.retry).max(f64::EPSILON);
        let (ship, cancel) = (m.ship / (1.0 - m.retry).max(f64::EPSILON), m.cancel / (1.0 - m.retry).max(f64::EPSILON));
        let kind = if state.orders.is_empty() || roll >= ship + cancel {
            Kind::Submit
        } else if roll < ship {
            Kind::Ship
        } else {
            Kind::Cancel
        };
        let order_id = match kind {
            Kind::Submit => self.next_order(),
            Kind::Ship | Kind::Cancel => {
                // Skewed towards the newest orders: u³ puts a tenth of the
                // picks on the newest 0.1 % of the working set (hot keys).
                let (u, len) = (state.rng.unit(), state.orders.len());
                let back = ((u * u * u) * len as f64) as usize;
                state.orders[len - 1 - back.min(len - 1)].clone()
            }
        };
        let id = format!("cmd-{}", self.next_command.fetch_add(1, Ordering::Relaxed));
        let event = match kind {
            Kind::Submit => self.submit_order(&order_id, &id),
            Kind::Ship => self.envelope(
                &id,
                SHIP_ORDER,
                json!({"order_id": order_id, "carrier": "ups", "tracking_number": format!("1Z{id}")}),
            ),
            Kind::Cancel => {
                self.envelope(&id, CANCEL_ORDER, json!({"order_id": order_id, "reason": "changed my mind"}))
            }
        };
        let body: Arc<[u8]> = serde_json::to_vec(&event).expect("JSON values serialize").into();
        let command = Command { kind, retry: false, order_id, body };
        if kind == Kind::Submit {
            if state.orders.len() == WORKING_SET {
                state.orders.pop_front();
            }
            state.orders.push_back(command.order_id.clone());
        }
        if m.retry > 0.0 {
            if state.sent.len() == RETRY_WINDOW {
                state.sent.pop_front();
            }
            state.sent.push_back(command.clone());
        }
        command
    }

    /// The body of one batch-mode request: `size` commands of the mix.
    pub fn batch_body(&self, size: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(size * 360);
        body.push(b'[');
        for i in 0..size {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&self.next().body);
        }
        body.push(b']');
        body
    }

    fn envelope(&self, id: &str, ty: &str, data: Value) -> Value {
        json!({
            "specversion": "1.0",
            "id": id,
            "source": self.source,
            "type": ty,
            "datacontenttype": "application/json",
            "data": data,
        })
    }

    /// A SubmitOrder CloudEvent (structured mode) for `order_id`.
    fn submit_order(&self, order_id: &str, id: &str) -> Value {
        let n: u64 = order_id.trim_start_matches("o-").parse().unwrap_or(0);
        self.envelope(
            id,
            SUBMIT_ORDER,
            json!({
                "order_id": order_id,
                "customer_id": format!("c-{}", n % CUSTOMERS),
                "currency": "EUR",
                "lines": [
                    {"sku": "tea", "quantity": 2, "unit_price_cents": 450},
                    {"sku": "cup", "quantity": 1, "unit_price_cents": 1200}
                ]
            }),
        )
    }

    /// The lines of a typical order, as the read model stores them.
    pub fn lines_json(&self) -> String {
        serde_json::to_string(&self.submit_order("o-0", "x")["data"]["lines"]).expect("JSON values serialize")
    }

    /// A typical command as the edge puts it on the queue (a structured-mode
    /// SubmitOrder), for the raw and bare RabbitMQ hops.
    pub fn command_bytes(&self) -> Vec<u8> {
        let order_id = self.next_order();
        serde_json::to_vec(&self.submit_order(&order_id, &format!("raw-{order_id}"))).expect("JSON values serialize")
    }

    /// The OrderSubmitted event of a typical order, Avro-encoded as the
    /// processor sends it (Confluent wire format: 5 header bytes, then the
    /// datum), for the raw Kafka phase.
    pub fn event_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let order_id = self.next_order();
        let event = OrderEvent::Submitted(OrderSubmitted {
            event_id: uuid::Uuid::new_v4().to_string(),
            order_id,
            version: 1,
            occurred_at: chrono::Utc::now().timestamp_millis(),
            customer_id: "c-1".into(),
            currency: "EUR".into(),
            lines: vec![
                OrderLine { sku: "tea".into(), quantity: 2, unit_price_cents: 450 },
                OrderLine { sku: "cup".into(), quantity: 1, unit_price_cents: 1200 },
            ],
            total_cents: 2100,
        });
        let spec = catalog::event_spec(ORDER_SUBMITTED).context("OrderSubmitted has a schema")?;
        let schema = apache_avro::Schema::parse_str(spec.avro).context("OrderSubmitted schema")?;
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().context("Avro writer")?;
        let datum = writer.write_value_to_vec(event.to_avro()).context("encoding OrderSubmitted")?;
        // Magic byte and a schema id: the bytes do not matter, their number does.
        let mut bytes = vec![0, 0, 0, 0, 1];
        bytes.extend_from_slice(&datum);
        Ok(bytes)
    }
}

/// A small, fast, seedable generator (SplitMix64): the workload needs
/// reproducible draws, not cryptographic ones.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_default_mix_has_the_shares_it_names_and_hot_keys() {
        let w = Workload::new("bench1", Mix::default(), 7);
        let mut kinds: HashMap<(bool, &str), usize> = HashMap::new();
        let mut acted_on: HashMap<String, usize> = HashMap::new();
        let n = 20_000;
        for _ in 0..n {
            let c = w.next();
            let event: Value = serde_json::from_slice(&c.body).unwrap();
            assert_eq!(event["data"]["order_id"], c.order_id.as_str());
            assert_eq!(event["source"], "/bench1/bench");
            let ty = event["type"].as_str().unwrap().rsplit('.').next().unwrap().to_owned();
            *kinds.entry((c.retry, if ty == "SubmitOrder" { "submit" } else { "other" })).or_default() += 1;
            if !c.retry && c.kind != Kind::Submit {
                *acted_on.entry(c.order_id).or_default() += 1;
            }
        }
        let share = |k: (bool, &str)| *kinds.get(&k).unwrap_or(&0) as f64 / n as f64;
        assert!((share((false, "submit")) - 0.60).abs() < 0.02, "{kinds:?}");
        assert!((share((false, "other")) - 0.35).abs() < 0.02, "{kinds:?}");
        let retries = share((true, "submit")) + share((true, "other"));
        assert!((retries - 0.05).abs() < 0.01, "{kinds:?}");
        // Skew: the hottest order gets many ships/cancels, most get none.
        let hottest = acted_on.values().max().copied().unwrap_or(0);
        assert!(hottest >= 5, "no hot key: {hottest}");
    }

    #[test]
    fn retries_repeat_an_earlier_command_byte_for_byte() {
        let w = Workload::new("bench1", Mix { submit: 0.5, ship: 0.0, cancel: 0.0, retry: 0.5 }, 1);
        let mut seen = Vec::new();
        for _ in 0..200 {
            let c = w.next();
            if c.retry {
                assert!(seen.iter().any(|b: &Arc<[u8]>| b == &c.body), "a retry repeats a sent body");
            } else {
                assert!(!seen.contains(&c.body), "a new command is new");
                seen.push(c.body.clone());
            }
        }
    }

    #[test]
    fn batches_are_json_arrays_and_mixes_parse() {
        let w = Workload::new("bench1", Mix::SUBMIT_ONLY, 3);
        let batch: Value = serde_json::from_slice(&w.batch_body(3)).unwrap();
        assert_eq!(batch.as_array().unwrap().len(), 3);
        assert_eq!(Mix::parse("60,20,15,5").unwrap(), Mix::default());
        assert!(Mix::parse("0,50,50,0").is_err());
        assert!(Mix::parse("1,2").is_err());
    }

    #[test]
    fn the_event_is_a_plausible_avro_record() {
        let bytes = Workload::new("bench1", Mix::default(), 1).event_bytes().unwrap();
        assert_eq!(bytes[0], 0);
        assert!((60..400).contains(&bytes.len()), "{} bytes", bytes.len());
    }
}
