//! Contracts of the demo bounded context `orders`: command payloads (JSON,
//! validated by the JSON Schemas in `commands/orders/`) and domain events
//! (Avro, schemas in `avro/orders/`).

use serde::{Deserialize, Serialize};

use crate::avro_body::{Body, BodyError, FromBody};
use crate::catalog::{CommandSpec, ContextSpec, EventSpec};
use crate::codec::{Decoded, EventError};

pub const CONTEXT: &str = "orders";

pub const SUBMIT_ORDER: &str = "com.example.orders.SubmitOrder";
pub const CANCEL_ORDER: &str = "com.example.orders.CancelOrder";
pub const SHIP_ORDER: &str = "com.example.orders.ShipOrder";

pub const ORDER_SUBMITTED: &str = "com.example.orders.OrderSubmitted";
pub const ORDER_CANCELLED: &str = "com.example.orders.OrderCancelled";
pub const ORDER_SHIPPED: &str = "com.example.orders.OrderShipped";

pub const SPEC: ContextSpec = ContextSpec {
    name: CONTEXT,
    commands: &[
        CommandSpec {
            ty: SUBMIT_ORDER,
            schema: include_str!("../commands/orders/SubmitOrder.json"),
            stream_key: "/order_id",
        },
        CommandSpec {
            ty: CANCEL_ORDER,
            schema: include_str!("../commands/orders/CancelOrder.json"),
            stream_key: "/order_id",
        },
        CommandSpec {
            ty: SHIP_ORDER,
            schema: include_str!("../commands/orders/ShipOrder.json"),
            stream_key: "/order_id",
        },
    ],
    events: &[
        EventSpec { ty: ORDER_SUBMITTED, avro: include_str!("../avro/orders/OrderSubmitted.avsc") },
        EventSpec { ty: ORDER_CANCELLED, avro: include_str!("../avro/orders/OrderCancelled.avsc") },
        EventSpec { ty: ORDER_SHIPPED, avro: include_str!("../avro/orders/OrderShipped.avsc") },
    ],
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitOrder {
    pub order_id: String,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipOrder {
    pub order_id: String,
    pub carrier: String,
    pub tracking_number: String,
}

// Every event starts with the same four fields (kept flat, not
// `#[serde(flatten)]`, because Avro records map to plain structs):
// `event_id` (unique; consumers dedupe on it), `order_id`, `version` (position
// in the order's stream, 1-based; read models apply each version once) and
// `occurred_at` (milliseconds since the Unix epoch).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSubmitted {
    pub event_id: String,
    pub order_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub event_id: String,
    pub order_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderShipped {
    pub event_id: String,
    pub order_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub carrier: String,
    pub tracking_number: String,
}

/// The fields every order event carries, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMeta<'a> {
    pub event_id: &'a str,
    pub order_id: &'a str,
    pub version: i64,
    pub occurred_at: i64,
}

/// Every event of the orders context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Submitted(OrderSubmitted),
    Cancelled(OrderCancelled),
    Shipped(OrderShipped),
}

impl OrderEvent {
    pub fn meta(&self) -> EventMeta<'_> {
        macro_rules! meta {
            ($e:expr) => {
                EventMeta {
                    event_id: &$e.event_id,
                    order_id: &$e.order_id,
                    version: $e.version,
                    occurred_at: $e.occurred_at,
                }
            };
        }
        match self {
            OrderEvent::Submitted(e) => meta!(e),
            OrderEvent::Cancelled(e) => meta!(e),
            OrderEvent::Shipped(e) => meta!(e),
        }
    }

    /// The CloudEvent / Avro full name of the event.
    pub fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::Submitted(_) => ORDER_SUBMITTED,
            OrderEvent::Cancelled(_) => ORDER_CANCELLED,
            OrderEvent::Shipped(_) => ORDER_SHIPPED,
        }
    }

    /// The event as JSON (its Avro record's fields), for the event store.
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            OrderEvent::Submitted(e) => serde_json::to_value(e),
            OrderEvent::Cancelled(e) => serde_json::to_value(e),
            OrderEvent::Shipped(e) => serde_json::to_value(e),
        };
        value.expect("order events always serialize")
    }

    /// Rebuilds an event from its type and JSON fields.
    pub fn from_json(event_type: &str, value: serde_json::Value) -> Result<Self, UnknownEvent> {
        let parsed = match event_type {
            ORDER_SUBMITTED => serde_json::from_value(value).map(OrderEvent::Submitted),
            ORDER_CANCELLED => serde_json::from_value(value).map(OrderEvent::Cancelled),
            ORDER_SHIPPED => serde_json::from_value(value).map(OrderEvent::Shipped),
            other => return Err(UnknownEvent(format!("unknown event type {other}"))),
        };
        parsed.map_err(|e| UnknownEvent(format!("{event_type}: {e}")))
    }
}

/// An event that is not one of this context's, or whose fields do not fit.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnknownEvent(pub String);

impl OrderEvent {
    /// The event as an Avro value of its record schema.
    pub fn to_avro(&self) -> apache_avro::types::Value {
        let value = match self {
            OrderEvent::Submitted(e) => apache_avro::to_value(e),
            OrderEvent::Cancelled(e) => apache_avro::to_value(e),
            OrderEvent::Shipped(e) => apache_avro::to_value(e),
        };
        value.expect("order events always convert to Avro")
    }

    /// Rebuilds an event from a decoded Avro record and its full name.
    pub fn from_avro(event_type: &str, value: &apache_avro::types::Value) -> Result<Self, UnknownEvent> {
        let parsed = match event_type {
            ORDER_SUBMITTED => apache_avro::from_value(value).map(OrderEvent::Submitted),
            ORDER_CANCELLED => apache_avro::from_value(value).map(OrderEvent::Cancelled),
            ORDER_SHIPPED => apache_avro::from_value(value).map(OrderEvent::Shipped),
            other => return Err(UnknownEvent(format!("unknown event type {other}"))),
        };
        parsed.map_err(|e| UnknownEvent(format!("{event_type}: {e}")))
    }

    /// Reads an event from the body of an Avro record written with its
    /// compiled-in schema.
    pub fn from_body(event_type: &str, body: Body<'_>) -> Result<Self, EventError> {
        let bytes = body.rest();
        let parsed = match event_type {
            ORDER_SUBMITTED => OrderSubmitted::read(bytes).map(OrderEvent::Submitted),
            ORDER_CANCELLED => OrderCancelled::read(bytes).map(OrderEvent::Cancelled),
            ORDER_SHIPPED => OrderShipped::read(bytes).map(OrderEvent::Shipped),
            other => return Err(EventError::Unknown(format!("unknown event type {other}"))),
        };
        parsed.map_err(|e| EventError::Undecodable(format!("{event_type}: {e}")))
    }

    /// Rebuilds an event from a record as the codec decoded it.
    pub fn from_decoded(decoded: Decoded<'_>) -> Result<Self, EventError> {
        match decoded {
            Decoded::Body { name, body, .. } => Self::from_body(name, body),
            Decoded::Value { name, value } => Self::from_avro(&name, &value).map_err(|e| EventError::Unknown(e.0)),
        }
    }
}

// The readers take the fields in the order of `avro/orders/*.avsc`.

impl FromBody for OrderLine {
    fn from_body(body: &mut Body<'_>) -> Result<Self, BodyError> {
        Ok(OrderLine { sku: body.string()?, quantity: body.int()?, unit_price_cents: body.long()? })
    }
}

impl FromBody for OrderSubmitted {
    fn from_body(body: &mut Body<'_>) -> Result<Self, BodyError> {
        Ok(OrderSubmitted {
            event_id: body.string()?,
            order_id: body.string()?,
            version: body.long()?,
            occurred_at: body.long()?,
            customer_id: body.string()?,
            currency: body.string()?,
            lines: body.array(OrderLine::from_body)?,
            total_cents: body.long()?,
        })
    }
}

impl FromBody for OrderCancelled {
    fn from_body(body: &mut Body<'_>) -> Result<Self, BodyError> {
        Ok(OrderCancelled {
            event_id: body.string()?,
            order_id: body.string()?,
            version: body.long()?,
            occurred_at: body.long()?,
            reason: body.string()?,
        })
    }
}

impl FromBody for OrderShipped {
    fn from_body(body: &mut Body<'_>) -> Result<Self, BodyError> {
        Ok(OrderShipped {
            event_id: body.string()?,
            order_id: body.string()?,
            version: body.long()?,
            occurred_at: body.long()?,
            carrier: body.string()?,
            tracking_number: body.string()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // to/from_avro_datum: the simplest raw round trip, fine in a test
    fn events_round_trip_through_avro_and_json() {
        let event = OrderEvent::Submitted(OrderSubmitted {
            event_id: "e1".into(),
            order_id: "o1".into(),
            version: 1,
            occurred_at: 1_700_000_000_000,
            customer_id: "c1".into(),
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "s".into(), quantity: 2, unit_price_cents: 150 }],
            total_cents: 300,
        });
        let spec = crate::catalog::event_spec(ORDER_SUBMITTED).unwrap();
        let schema = apache_avro::Schema::parse_str(spec.avro).unwrap();
        let avro = event.to_avro();
        assert!(avro.validate(&schema), "value fits its schema");
        let bytes = apache_avro::to_avro_datum(&schema, avro).unwrap();
        let back = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
        assert_eq!(OrderEvent::from_avro(ORDER_SUBMITTED, &back).unwrap(), event);
        assert_eq!(OrderEvent::from_body(ORDER_SUBMITTED, Body::new(&bytes)).unwrap(), event);
        // Bytes its own schema cannot read are undecodable; another type's
        // name is no event of the context.
        for cut in [&bytes[..bytes.len() - 1], &[bytes.as_slice(), &[0]].concat()] {
            assert!(matches!(OrderEvent::from_body(ORDER_SUBMITTED, Body::new(cut)), Err(EventError::Undecodable(_))));
        }
        assert!(matches!(OrderEvent::from_body("com.example.Other", Body::new(&bytes)), Err(EventError::Unknown(_))));
        assert_eq!(OrderEvent::from_json(ORDER_SUBMITTED, event.to_json()).unwrap(), event);
    }
}
