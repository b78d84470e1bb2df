//! Property-based tests of the contracts: the CloudEvents parser never panics,
//! accepts exactly what the specifications call valid (judged here on their
//! own terms, not by the parser) and round-trips it; order events survive
//! Avro and JSON.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sluice_schemas::avro_body::Body;
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

/// The context attributes CloudEvents 1.0 defines.
const CONTEXT: [&str; 8] = ["id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time"];

/// Whether `value` is a valid CloudEvent in the JSON format, judged from
/// the specifications alone (CloudEvents 1.0 and its JSON format, RFC 3986,
/// RFC 3339), not by the parser under test.
fn valid_by_the_spec(value: &Value) -> bool {
    let Some(event) = value.as_object() else { return false };
    let non_empty = |name: &str| event.get(name).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    non_empty("id")
        && non_empty("type")
        && event.get("specversion").and_then(Value::as_str) == Some("1.0")
        && event.get("source").and_then(Value::as_str).is_some_and(|s| !s.is_empty() && uri_reference(s))
        && event.get("time").is_none_or(|t| t.as_str().is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()))
        && event.get("subject").is_none_or(|_| non_empty("subject"))
        && !(event.contains_key("data") && event.contains_key("data_base64"))
        && event
            .iter()
            .filter(|(name, _)| !CONTEXT.contains(&name.as_str()) && !["data", "data_base64"].contains(&name.as_str()))
            .all(|(name, value)| {
                (1..=20).contains(&name.len())
                    && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    && matches!(value, Value::String(_) | Value::Bool(_) | Value::Number(_))
            })
}

/// RFC 3986 `URI-reference`, as far as its characters go: unreserved,
/// reserved, and `%` only as the start of a `%XX` escape; a colon before the
/// first `/`, `?` or `#` ends a scheme (`ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`).
fn uri_reference(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=".contains(&b) => {}
            _ => return false,
        }
        i += 1;
    }
    let first = s.split(['/', '?', '#']).next().unwrap_or("");
    match first.split_once(':') {
        None => true,
        Some((scheme, _)) => {
            scheme.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        }
    }
}

proptest! {
    #[test]
    fn the_parser_never_panics_and_accepts_exactly_the_valid_events(value in prop_oneof![any_json(), envelope()]) {
        let valid = valid_by_the_spec(&value);
        match CloudEvent::from_json(value.clone()) {
            Ok(event) => {
                prop_assert!(valid, "accepted, but not valid by the spec: {}", value);
                // What it accepts survives a round trip.
                let again = CloudEvent::from_json(serde_json::to_value(&event).unwrap()).unwrap();
                prop_assert_eq!(again, event);
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                prop_assert!(!valid, "refused ({errors:?}), but valid by the spec: {}", value);
            }
        }
    }

    #[test]
    fn valid_events_round_trip(
        id in "[a-zA-Z0-9-]{1,20}",
        path in "[a-z]{1,8}",
        ty in "[a-z]{1,5}\\.[A-Z][a-z]{1,8}",
        // An extension's name, never a context attribute's or `data`: "id"
        // would replace the event's id, not add an extension.
        ext in "[a-z0-9]{1,20}".prop_filter("an extension's name", |e| !CONTEXT.contains(&e.as_str()) && e != "data"),
        data in any_json(),
    ) {
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
        // The hand-written readers take what apache_avro wrote, field by field.
        prop_assert_eq!(OrderEvent::from_body(event.event_type(), Body::new(&bytes)).unwrap(), event.clone());
        prop_assert_eq!(OrderEvent::from_json(event.event_type(), event.to_json()).unwrap(), event);
    }

    #[test]
    fn reading_the_wire_header_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
        let id = codec::schema_id(&bytes);
        prop_assert_eq!(id.is_some(), bytes.len() >= 5 && bytes[0] == 0);
    }
}

/// Cases the random values seldom reach, judged the same two ways.
#[test]
fn the_parser_and_the_spec_agree_on_the_edges_of_a_source() {
    for source in
        ["/shop", "/shop%20x", "/shop%zz", "/shop%2", "urn:acme:shop", "1a:shop", "./a:b", "/a b", "/café", "#x"]
    {
        let event = json!({"id": "1", "source": source, "specversion": "1.0", "type": "t.T"});
        let accepted = CloudEvent::from_json(event.clone()).is_ok();
        assert_eq!(accepted, valid_by_the_spec(&event), "source {source:?}: parser accepts = {accepted}");
    }
}
