//! The demo context `orders`: an order is submitted once; a shipped order
//! cannot be cancelled; a cancelled order cannot be shipped.

use serde_json::Value;
use sluice_schemas::orders::{
    self as contract, CancelOrder, OrderCancelled, OrderEvent, OrderShipped, OrderSubmitted, ShipOrder, SubmitOrder,
};

use crate::domain::{Aggregate, DomainEvent, Malformed, Rejection, Stamp};

pub struct Orders;

pub enum OrderCommand {
    Submit(SubmitOrder),
    Cancel(CancelOrder),
    Ship(ShipOrder),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    #[default]
    New,
    Submitted,
    Cancelled,
    Shipped,
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        OrderEvent::event_type(self)
    }
    fn version(&self) -> i64 {
        self.meta().version
    }
    fn event_id(&self) -> &str {
        self.meta().event_id
    }
    fn to_json(&self) -> Value {
        OrderEvent::to_json(self)
    }
    fn from_json(event_type: &str, json: Value) -> Result<Self, Malformed> {
        OrderEvent::from_json(event_type, json).map_err(|e| Malformed(e.0))
    }
    fn to_avro(&self) -> apache_avro::types::Value {
        OrderEvent::to_avro(self)
    }
}

impl Aggregate for Orders {
    const CONTEXT: &'static str = contract::CONTEXT;
    type State = OrderState;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn parse(ty: &str, data: Value) -> Result<OrderCommand, Malformed> {
        let bad = |e: serde_json::Error| Malformed(format!("{ty}: {e}"));
        match ty {
            contract::SUBMIT_ORDER => serde_json::from_value(data).map(OrderCommand::Submit).map_err(bad),
            contract::CANCEL_ORDER => serde_json::from_value(data).map(OrderCommand::Cancel).map_err(bad),
            contract::SHIP_ORDER => serde_json::from_value(data).map(OrderCommand::Ship).map_err(bad),
            other => Err(Malformed(format!("orders does not handle {other}"))),
        }
    }

    fn stream_id(command: &OrderCommand) -> &str {
        match command {
            OrderCommand::Submit(c) => &c.order_id,
            OrderCommand::Cancel(c) => &c.order_id,
            OrderCommand::Ship(c) => &c.order_id,
        }
    }

    fn decide(state: &OrderState, command: OrderCommand, stamp: &Stamp) -> Result<Vec<OrderEvent>, Rejection> {
        let reject = |why: &str| Err(Rejection(why.to_owned()));
        let event_id = stamp.event_id(0);
        let version = stamp.version(0);
        let occurred_at = stamp.now_ms;
        let event = match (state, command) {
            (OrderState::New, OrderCommand::Submit(c)) => OrderEvent::Submitted(OrderSubmitted {
                total_cents: c.lines.iter().map(|l| i64::from(l.quantity) * l.unit_price_cents).sum(),
                event_id,
                order_id: c.order_id,
                version,
                occurred_at,
                customer_id: c.customer_id,
                currency: c.currency,
                lines: c.lines,
            }),
            (_, OrderCommand::Submit(_)) => return reject("order was already submitted"),
            (OrderState::New, _) => return reject("order does not exist"),
            (OrderState::Shipped, OrderCommand::Cancel(_)) => return reject("a shipped order cannot be cancelled"),
            (OrderState::Cancelled, OrderCommand::Cancel(_)) => return reject("order is already cancelled"),
            (OrderState::Cancelled, OrderCommand::Ship(_)) => return reject("a cancelled order cannot be shipped"),
            (OrderState::Shipped, OrderCommand::Ship(_)) => return reject("order is already shipped"),
            (OrderState::Submitted, OrderCommand::Cancel(c)) => OrderEvent::Cancelled(OrderCancelled {
                event_id,
                order_id: c.order_id,
                version,
                occurred_at,
                reason: c.reason,
            }),
            (OrderState::Submitted, OrderCommand::Ship(c)) => OrderEvent::Shipped(OrderShipped {
                event_id,
                order_id: c.order_id,
                version,
                occurred_at,
                carrier: c.carrier,
                tracking_number: c.tracking_number,
            }),
        };
        Ok(vec![event])
    }

    fn evolve(_state: OrderState, event: &OrderEvent) -> OrderState {
        match event {
            OrderEvent::Submitted(_) => OrderState::Submitted,
            OrderEvent::Cancelled(_) => OrderState::Cancelled,
            OrderEvent::Shipped(_) => OrderState::Shipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamp(history: &[OrderEvent]) -> Stamp {
        Stamp { next_version: history.len() as i64 + 1, now_ms: 1_000, id_seed: "cmd".into() }
    }

    /// Given the events, when the command arrives, then these events or this rejection.
    fn given_when(history: &[OrderEvent], ty: &str, data: Value) -> Result<Vec<OrderEvent>, Rejection> {
        let state = history.iter().fold(OrderState::default(), Orders::evolve);
        Orders::decide(&state, Orders::parse(ty, data).unwrap(), &stamp(history))
    }

    fn submit() -> Value {
        json!({"order_id": "o1", "customer_id": "c1", "currency": "EUR",
               "lines": [{"sku": "a", "quantity": 2, "unit_price_cents": 150},
                         {"sku": "b", "quantity": 1, "unit_price_cents": 99}]})
    }

    fn submitted() -> Vec<OrderEvent> {
        given_when(&[], contract::SUBMIT_ORDER, submit()).unwrap()
    }

    #[test]
    fn submitting_a_new_order_totals_its_lines() {
        let events = submitted();
        let OrderEvent::Submitted(e) = &events[0] else { panic!("expected OrderSubmitted") };
        assert_eq!((e.total_cents, e.version, e.event_id.as_str()), (399, 1, "cmd-0"));
    }

    #[test]
    fn an_order_is_submitted_once() {
        let rejection = given_when(&submitted(), contract::SUBMIT_ORDER, submit()).unwrap_err();
        assert_eq!(rejection.0, "order was already submitted");
    }

    #[test]
    fn a_shipped_order_cannot_be_cancelled() {
        let mut history = submitted();
        history.extend(
            given_when(
                &history,
                contract::SHIP_ORDER,
                json!({"order_id": "o1", "carrier": "ups", "tracking_number": "1Z"}),
            )
            .unwrap(),
        );
        assert_eq!(history[1].version(), 2);
        let rejection =
            given_when(&history, contract::CANCEL_ORDER, json!({"order_id": "o1", "reason": "late"})).unwrap_err();
        assert_eq!(rejection.0, "a shipped order cannot be cancelled");
    }

    #[test]
    fn a_cancelled_order_cannot_be_shipped() {
        let mut history = submitted();
        history.extend(
            given_when(&history, contract::CANCEL_ORDER, json!({"order_id": "o1", "reason": "changed mind"})).unwrap(),
        );
        let rejection = given_when(
            &history,
            contract::SHIP_ORDER,
            json!({"order_id": "o1", "carrier": "ups", "tracking_number": "1Z"}),
        )
        .unwrap_err();
        assert_eq!(rejection.0, "a cancelled order cannot be shipped");
    }

    #[test]
    fn unknown_orders_cannot_be_cancelled() {
        let rejection = given_when(&[], contract::CANCEL_ORDER, json!({"order_id": "o9", "reason": "x"})).unwrap_err();
        assert_eq!(rejection.0, "order does not exist");
    }
}
