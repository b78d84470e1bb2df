//! What the benchmark sends: SubmitOrder CloudEvents of the bench tenant, each
//! for a new order, and the byte sizes of what the pipeline makes of them
//! (the command on RabbitMQ, the Avro event on Kafka), so the raw ceilings
//! move messages of the same size as the pipeline does.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde_json::{json, Value};
use sluice_schemas::catalog;
use sluice_schemas::orders::{OrderEvent, OrderLine, OrderSubmitted, ORDER_SUBMITTED, SUBMIT_ORDER};

/// Customers the orders are spread over: enough partitions of the
/// by-customer table that no single one is hot.
const CUSTOMERS: u64 = 1_000;

/// Makes commands with ids unique within a run (the tenant is unique per run).
pub struct Workload {
    tenant: String,
    source: String,
    next: AtomicU64,
}

impl Workload {
    pub fn new(tenant: &str) -> Self {
        Self { tenant: tenant.to_owned(), source: format!("/{tenant}/bench"), next: AtomicU64::new(0) }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The next order's id; every call gives a new one.
    pub fn next_order(&self) -> String {
        format!("o-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// A SubmitOrder CloudEvent (structured mode) for `order_id`.
    pub fn submit_order(&self, order_id: &str) -> Value {
        let n: u64 = order_id.trim_start_matches("o-").parse().unwrap_or(0);
        json!({
            "specversion": "1.0",
            "id": format!("cmd-{order_id}"),
            "source": self.source,
            "type": SUBMIT_ORDER,
            "datacontenttype": "application/json",
            "data": {
                "order_id": order_id,
                "customer_id": format!("c-{}", n % CUSTOMERS),
                "currency": "EUR",
                "lines": [
                    {"sku": "tea", "quantity": 2, "unit_price_cents": 450},
                    {"sku": "cup", "quantity": 1, "unit_price_cents": 1200}
                ]
            }
        })
    }

    /// The body of one structured-mode request: a new order.
    pub fn single_body(&self) -> (String, Vec<u8>) {
        let order_id = self.next_order();
        let body = serde_json::to_vec(&self.submit_order(&order_id)).expect("JSON values serialize");
        (order_id, body)
    }

    /// The body of one batch-mode request of `size` new orders.
    pub fn batch_body(&self, size: usize) -> Vec<u8> {
        let events: Vec<Value> = (0..size).map(|_| self.submit_order(&self.next_order())).collect();
        serde_json::to_vec(&events).expect("JSON values serialize")
    }

    /// The command as the edge puts it on the queue (the structured-mode
    /// CloudEvent), for the raw RabbitMQ phase.
    pub fn command_bytes(&self) -> Vec<u8> {
        self.single_body().1
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

    /// The tenant's CloudEvent source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_new_and_valid_json() {
        let w = Workload::new("bench1");
        let (a, body) = w.single_body();
        let (b, _) = w.single_body();
        assert_ne!(a, b);
        let event: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(event["data"]["order_id"], a);
        assert_eq!(event["source"], "/bench1/bench");
        let batch: Value = serde_json::from_slice(&w.batch_body(3)).unwrap();
        assert_eq!(batch.as_array().unwrap().len(), 3);
    }

    #[test]
    fn the_event_is_a_plausible_avro_record() {
        let bytes = Workload::new("bench1").event_bytes().unwrap();
        assert_eq!(bytes[0], 0);
        assert!((60..400).contains(&bytes.len()), "{} bytes", bytes.len());
    }
}
