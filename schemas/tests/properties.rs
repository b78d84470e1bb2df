//! Property-based tests of the contracts: the CloudEvents parser never panics
//! and round-trips what it accepts; order events survive Avro and JSON.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::orders::{OrderCancelled, OrderEvent, OrderLine, OrderShipped, OrderSubmitted};
use sluice_schemas::{catalog, codec};

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An envelope built from plausible and implausible attribute values.
fn envelope() -> impl Strategy<Value = Value> {
    let attr = prop_oneof![Just(None), ".{0,10}".prop_map(|s| Some(json!(s))), any_json().prop_map(Some)];
    (attr.clone(), attr.clone(), prop_oneof![Just(Some(json!("1.0"))), attr.clone()], attr.clone(), attr, any_json())
        .prop_map(|(id, source, specversion, ty, time, data)| {
            let mut m = Map::new();
            for (k, v) in [("id", id), ("source", source), ("specversion", specversion), ("type", ty), ("time", time)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            m.insert("data".into(), data);
            Value::Object(m)
        })
}

proptest! {
    #[test]
    fn the_parser_never_panics_and_accepts_only_valid_events(value in prop_oneof![any_json(), envelope()]) {
        match CloudEvent::from_json(value) {
            Ok(event) => {
                prop_assert!(event.violations().is_empty());
                prop_assert!(!event.id.is_empty() && !event.source.is_empty() && !event.ty.is_empty());
                prop_assert_eq!(event.specversion.as_str(), "1.0");
                // What it accepts survives a round trip.
                let again = CloudEvent::from_json(serde_json::to_value(&event).unwrap()).unwrap();
                prop_assert_eq!(again, event);
            }
            Err(errors) => prop_assert!(!errors.is_empty()),
        }
    }

    #[test]
    fn valid_events_round_trip(id in "[a-zA-Z0-9-]{1,20}", path in "[a-z]{1,8}", ty in "[a-z]{1,5}\\.[A-Z][a-z]{1,8}", ext in "[a-z0-9]{1,20}", data in any_json()) {
        let value = json!({"id": id, "source": format!("/{path}"), "specversion": "1.0", "type": ty, "time": "2026-11-26T10:00:00Z", ext.clone(): "x", "data": data});
        let event = CloudEvent::from_json(value).unwrap();
        prop_assert_eq!(event.extensions.get(&ext), Some(&json!("x")));
        prop_assert_eq!(CloudEvent::from_json(serde_json::to_value(&event).unwrap()).unwrap(), event);
    }

    #[test]
    #[allow(deprecated)] // the plain datum writer/reader: the codec's wire body
    fn order_events_survive_avro_and_json(
        id in ".{0,16}", order in ".{1,16}", version in 1i64..1_000_000, at in 0i64..4_000_000_000_000,
        customer in ".{0,16}", lines in prop::collection::vec((".{0,8}", 1i32..10_000, 0i64..100_000_000), 0..5),
        kind in 0u8..3, text in ".{0,30}",
    ) {
        let event = match kind {
            0 => OrderEvent::Submitted(OrderSubmitted {
                event_id: id, order_id: order, version, occurred_at: at, customer_id: customer, currency: "EUR".into(),
                total_cents: lines.iter().map(|(_, q, p)| i64::from(*q) * p).sum(),
                lines: lines.into_iter().map(|(sku, quantity, unit_price_cents)| OrderLine { sku, quantity, unit_price_cents }).collect(),
            }),
            1 => OrderEvent::Cancelled(OrderCancelled { event_id: id, order_id: order, version, occurred_at: at, reason: text }),
            _ => OrderEvent::Shipped(OrderShipped { event_id: id, order_id: order, version, occurred_at: at, carrier: customer, tracking_number: text }),
        };
        let spec = catalog::event_spec(event.event_type()).unwrap();
        let schema = apache_avro::Schema::parse_str(spec.avro).unwrap();
        let bytes = apache_avro::to_avro_datum(&schema, event.to_avro()).unwrap();
        let back = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
        prop_assert_eq!(OrderEvent::from_avro(event.event_type(), &back).unwrap(), event.clone());
        prop_assert_eq!(OrderEvent::from_json(event.event_type(), event.to_json()).unwrap(), event);
    }

    #[test]
    fn reading_the_wire_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        let id = codec::schema_id(&bytes);
        prop_assert_eq!(id.is_some(), bytes.len() >= 5 && bytes[0] == 0);
    }
}
