//! The demo read models of `orders`, as pure functions from an event to the
//! writes it causes. Every write carries the event's stream version as its
//! CQL write timestamp, so applying an event twice, or replaying the topic,
//! leaves exactly the same rows.

use sluice_schemas::orders::{OrderEvent, OrderLine};

/// One write to the `orders_by_id` read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderWrite {
    Submitted {
        order_id: String,
        customer_id: String,
        currency: String,
        lines: Vec<OrderLine>,
        total_cents: i64,
        at_ms: i64,
        version: i64,
    },
    StatusChanged {
        order_id: String,
        status: &'static str,
        at_ms: i64,
        version: i64,
        cancel_reason: Option<String>,
        shipment: Option<(String, String)>,
    },
}

impl OrderWrite {
    pub fn version(&self) -> i64 {
        match self {
            OrderWrite::Submitted { version, .. } | OrderWrite::StatusChanged { version, .. } => *version,
        }
    }
}

pub fn apply(event: &OrderEvent) -> Vec<OrderWrite> {
    let write = match event {
        OrderEvent::Submitted(e) => OrderWrite::Submitted {
            order_id: e.order_id.clone(),
            customer_id: e.customer_id.clone(),
            currency: e.currency.clone(),
            lines: e.lines.clone(),
            total_cents: e.total_cents,
            at_ms: e.occurred_at,
            version: e.version,
        },
        OrderEvent::Cancelled(e) => OrderWrite::StatusChanged {
            order_id: e.order_id.clone(),
            status: "cancelled",
            at_ms: e.occurred_at,
            version: e.version,
            cancel_reason: Some(e.reason.clone()),
            shipment: None,
        },
        OrderEvent::Shipped(e) => OrderWrite::StatusChanged {
            order_id: e.order_id.clone(),
            status: "shipped",
            at_ms: e.occurred_at,
            version: e.version,
            cancel_reason: None,
            shipment: Some((e.carrier.clone(), e.tracking_number.clone())),
        },
    };
    vec![write]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schemas::orders::OrderCancelled;

    #[test]
    fn a_cancellation_changes_status_at_its_version() {
        let event = OrderEvent::Cancelled(OrderCancelled {
            event_id: "e2".into(),
            order_id: "o1".into(),
            version: 2,
            occurred_at: 5,
            reason: "late".into(),
        });
        let writes = apply(&event);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].version(), 2);
        assert!(matches!(&writes[0], OrderWrite::StatusChanged { status: "cancelled", cancel_reason: Some(r), .. } if r == "late"));
    }
}
