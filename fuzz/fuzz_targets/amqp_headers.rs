//! What the processors read from an AMQP message: its header table (as the
//! broker frames it) through `processors::amqp::headers` (attempt, reason,
//! history, re-drives, the fresh-attempt rewrite), and its body as a
//! CloudEvent. Never panics; a fresh attempt is attempt 1 with no verdict.
#![no_main]

use amq_protocol_types::parsing::parse_field_table;
use libfuzzer_sys::fuzz_target;
use sluice_processors::amqp::headers;
use sluice_schemas::cloudevent::CloudEvent;

fuzz_target!(|input: &[u8]| {
    let split = input.first().map_or(0, |b| usize::from(*b)).min(input.len());
    let (table, body) = input.split_at(split);
    if let Ok((_, mut table)) = parse_field_table(table) {
        let _ = headers::attempt(&table);
        let _ = headers::history(&table);
        let _ = headers::get_int(&table, headers::REDRIVES);
        let _ = headers::get_str(&table, headers::REASON);
        let _ = headers::get_str(&table, headers::ERROR_CLASS);
        let fresh = headers::for_fresh_attempt(&table);
        assert_eq!(headers::attempt(&fresh), 1);
        assert!(
            headers::get(&fresh, headers::REASON).is_none() && headers::get(&fresh, headers::ERROR_CLASS).is_none()
        );
        headers::push_history(&mut table, "attempt 1: fuzzed".into());
        assert!(headers::history(&table).iter().any(|line| line == "attempt 1: fuzzed"));
    }
    if let Ok(value) = serde_json::from_slice(body) {
        if let Ok(event) = CloudEvent::from_json(value) {
            let _ = event.command_key();
        }
    }
});
