//! The edge's CloudEvents reader (`sluice_ingest::binding::read_events`) in
//! all three modes: the input picks the mode (its first byte), a few
//! headers and the body. Whatever comes in, it answers events or a problem
//! document, never panics; every event it accepts satisfies the spec, and
//! reading the same request twice gives the same answer.
#![no_main]

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sluice_ingest::binding::read_events;

const MEDIA: &[Option<&str>] = &[
    Some("application/cloudevents+json"),
    Some("application/cloudevents-batch+json"),
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
    None,
];
const ATTRIBUTES: &[&str] =
    &["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-dataschema", "ce-subject"];

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let mut headers = HeaderMap::new();
    if let Some(media) = MEDIA[usize::from(mode) % MEDIA.len()] {
        headers.insert("content-type", HeaderValue::from_static(media));
    }
    // Binary-mode attributes: `name=value` lines up to a blank line, then the body.
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) if mode & 0x80 != 0 => (&rest[..at], &rest[at + 2..]),
        _ => (&[][..], rest),
    };
    for line in head.split(|b| *b == b'\n') {
        let Some(eq) = line.iter().position(|b| *b == b'=') else { continue };
        let name = ATTRIBUTES[usize::from(line[0]) % ATTRIBUTES.len()];
        if let Ok(value) = HeaderValue::from_bytes(&line[eq + 1..]) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    let first = read_events(&headers, body);
    if let Ok(events) = &first {
        assert!(!events.is_empty(), "accepted with no event");
        for event in events {
            assert!(event.violations().is_empty(), "accepted an event that breaks the spec: {event:?}");
        }
    }
    let second = read_events(&headers, body);
    assert_eq!(first.is_ok(), second.is_ok(), "the same request read twice, answered two ways");
});
