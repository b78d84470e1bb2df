//! A Kafka record's value as the projections and process managers decode it:
//! Confluent wire format (magic byte, schema id), then the Avro datum under
//! the schema the id stands for (here each event schema of the catalog, as
//! the registry would answer), then the typed event (an order event also by
//! its hand-written reader, which must agree). Never panics; a value
//! that breaks its schema never becomes an event; one that fits it
//! re-encodes to a value that decodes to the same.
#![no_main]

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_schemas::avro_body::Body;
use sluice_schemas::catalog::CONTEXTS;
use sluice_schemas::codec::schema_id;
use sluice_schemas::orders::OrderEvent;
use sluice_schemas::patients::PatientEvent;

/// Each event schema of the catalog, parsed once: (event type, schema).
fn schemas() -> &'static [(&'static str, Schema)] {
    static SCHEMAS: OnceLock<Vec<(&'static str, Schema)>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let events = CONTEXTS.iter().flat_map(|c| c.events);
        events.map(|e| (e.ty, Schema::parse_str(e.avro).expect("the catalog's schemas parse"))).collect()
    })
}

fuzz_target!(|input: &[u8]| {
    let Some(id) = schema_id(input) else { return };
    let (ty, schema) = &schemas()[id as usize % schemas().len()];
    let reader = GenericDatumReader::builder(schema).build().expect("a reader for the schema");
    let Ok(value) = reader.read_value(&mut &input[5..]) else { return };
    let typed = OrderEvent::from_avro(ty, &value).is_ok() || PatientEvent::from_avro(ty, &value).is_ok();
    // The hand-written readers of order events read what apache-avro reads.
    if let Ok(event) = OrderEvent::from_body(ty, Body::new(&input[5..])) {
        assert_eq!(OrderEvent::from_avro(ty, &value).ok(), Some(event), "{ty}: the readers disagree");
    }
    // apache-avro 0.22 reads a record cut short inside a string as that
    // field being null (found by this target): such a value must never
    // become an event.
    if !value.validate(schema) {
        assert!(!typed, "{}: {value:?} breaks its schema and still became an event", ty);
        return;
    }
    let writer = GenericDatumWriter::builder(schema).build().expect("a writer for the schema");
    let bytes = writer
        .write_value_to_vec(value.clone())
        .unwrap_or_else(|e| panic!("{}: decoded {value:?}, which does not encode: {e}", ty));
    let again = reader.read_value(&mut &bytes[..]).expect("what was encoded decodes");
    assert_eq!(again, value, "a round trip changed the value");
});
