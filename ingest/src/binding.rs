//! The CloudEvents 1.0 HTTP binding: structured, binary and batch modes read
//! from a request into events, or a problem naming what is wrong.

use axum::http::HeaderMap;
use base64::Engine;
use serde_json::{json, Value};
use sluice_schemas::cloudevent::{is_attribute_name, CloudEvent};

use crate::problem::Problem;

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

/// The media type without parameters, lower-cased.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(axum::http::header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

fn is_json_media(media: &str) -> bool {
    media == "application/json" || media.ends_with("+json") || media == "text/json"
}

fn parse_json(body: &[u8]) -> Result<Value, Problem> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Problem::malformed(format!("body is not valid UTF-8 (bad byte at offset {})", e.valid_up_to())))?;
    // serde_json refuses nesting deeper than 128 levels, so a deeply nested
    // body is a 400 here, not a stack overflow.
    serde_json::from_str(text).map_err(|e| {
        Problem::malformed(format!("body is not valid JSON: {e}"))
            .with_errors(vec![json!({"line": e.line(), "column": e.column(), "problem": e.to_string()})])
    })
}

fn attribute_problem(errors: Vec<sluice_schemas::cloudevent::AttributeError>, index: Option<usize>) -> Problem {
    let list: Vec<Value> = errors
        .iter()
        .map(|e| match index {
            Some(i) => json!({"index": i, "attribute": e.attribute, "problem": e.problem}),
            None => json!({"attribute": e.attribute, "problem": e.problem}),
        })
        .collect();
    let names: Vec<&str> = errors.iter().map(|e| e.attribute.as_str()).collect();
    Problem::malformed(format!("invalid CloudEvent attributes: {}", names.join(", "))).with_errors(list)
}

/// Reads every event of a request. A batch is all or nothing.
pub fn read_events(headers: &HeaderMap, body: &[u8]) -> Result<Vec<CloudEvent>, Problem> {
    let media = media_type(headers);
    match media.as_deref() {
        Some(STRUCTURED) => {
            let event = CloudEvent::from_json(parse_json(body)?).map_err(|e| attribute_problem(e, None))?;
            Ok(vec![event])
        }
        Some(BATCH) => {
            let Value::Array(items) = parse_json(body)? else {
                return Err(Problem::malformed("a batch must be a JSON array of CloudEvents"));
            };
            if items.is_empty() {
                return Err(Problem::malformed("a batch must hold at least one event"));
            }
            let mut events = Vec::with_capacity(items.len());
            let mut errors = Vec::new();
            let mut invalid = 0;
            for (i, item) in items.into_iter().enumerate() {
                match CloudEvent::from_json(item) {
                    Ok(event) => events.push(event),
                    Err(errs) => {
                        invalid += 1;
                        errors.extend(
                            errs.into_iter()
                                .map(|e| json!({"index": i, "attribute": e.attribute, "problem": e.problem})),
                        )
                    }
                }
            }
            if errors.is_empty() {
                Ok(events)
            } else {
                Err(Problem::malformed(format!("{invalid} event(s) of the batch are invalid; none was accepted"))
                    .with_errors(errors))
            }
        }
        _ if headers.contains_key("ce-specversion") || headers.contains_key("ce-id") => binary(headers, body, media),
        Some(other) => Err(Problem::unsupported_media_type(format!(
            "{other} without ce-* headers; send {STRUCTURED}, {BATCH}, or binary mode (ce-* headers)"
        ))
        .at_header("content-type")),
        None => Err(Problem::unsupported_media_type(format!(
            "missing Content-Type; send {STRUCTURED}, {BATCH}, or binary mode (ce-* headers)"
        ))
        .at_header("content-type")),
    }
}

/// Binary mode: attributes in `ce-*` headers (percent-encoded), data in the body.
fn binary(headers: &HeaderMap, body: &[u8], media: Option<String>) -> Result<Vec<CloudEvent>, Problem> {
    let mut attributes = serde_json::Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let header_problem = |problem: &str| {
            Problem::malformed(format!("header {name}: {problem}"))
                .with_errors(vec![json!({"header": name.as_str(), "attribute": attribute, "problem": problem})])
        };
        if !is_attribute_name(attribute) {
            return Err(header_problem("attribute names are 1 to 20 lower-case letters or digits"));
        }
        if attributes.contains_key(attribute) {
            return Err(header_problem("appears more than once"));
        }
        let raw =
            value.to_str().map_err(|_| header_problem("is not visible ASCII; percent-encode other characters"))?;
        let decoded =
            percent_decode(raw).ok_or_else(|| header_problem("has a bad percent-encoding or is not UTF-8"))?;
        attributes.insert(attribute.to_owned(), Value::String(decoded));
    }
    if let Some(name) = ["data", "datacontenttype", "data_base64"].into_iter().find(|a| attributes.contains_key(*a)) {
        return Err(Problem::malformed("binary mode carries data in the body and its type in Content-Type")
            .with_errors(vec![
                json!({"header": format!("ce-{name}"), "attribute": name, "problem": "not allowed in binary mode"}),
            ]));
    }
    if let Some(media) = &media {
        attributes.insert("datacontenttype".into(), Value::String(media.clone()));
    }
    if !body.is_empty() {
        match media.as_deref() {
            Some(m) if is_json_media(m) => {
                let data = parse_json(body).map_err(|mut p| {
                    for e in &mut p.errors {
                        e["attribute"] = json!("data");
                    }
                    p
                })?;
                attributes.insert("data".into(), data);
            }
            // No Content-Type (the CloudEvents Python SDK's `to_binary` of an
            // event without datacontenttype): JSON data is taken as JSON, as
            // the JSON event format implies for an event without a type.
            None => {
                let data = match serde_json::from_slice::<Value>(body) {
                    Ok(json) => ("data", json),
                    Err(_) => ("data_base64", Value::String(base64::engine::general_purpose::STANDARD.encode(body))),
                };
                attributes.insert(data.0.into(), data.1);
            }
            Some(_) => {
                attributes.insert(
                    "data_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
                );
            }
        }
    }
    let event = CloudEvent::from_json(Value::Object(attributes)).map_err(|e| attribute_problem(e, None))?;
    Ok(vec![event])
}

/// Decodes `%XX` sequences into UTF-8 text; `None` when malformed.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn binary_mode_reads_headers_and_json_body() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("ce-specversion", HeaderValue::from_static("1.0"));
        h.insert("ce-id", HeaderValue::from_static("1"));
        h.insert("ce-source", HeaderValue::from_static("/acme/shop"));
        h.insert("ce-type", HeaderValue::from_static("t.x"));
        h.insert("ce-traceparent", HeaderValue::from_static("00-a%20b"));
        let events = read_events(&h, br#"{"a":1}"#).unwrap();
        assert_eq!(events[0].data, Some(json!({"a": 1})));
        assert_eq!(events[0].extensions["traceparent"], json!("00-a b"));
    }

    #[test]
    fn binary_mode_names_the_header_that_is_wrong() {
        for (header, value) in [("ce-bad_name", "x"), ("ce-source", "%zz"), ("ce-source", "%ff"), ("ce-data", "{}")] {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert("ce-specversion", HeaderValue::from_static("1.0"));
            h.insert("ce-id", HeaderValue::from_static("1"));
            h.insert("ce-type", HeaderValue::from_static("t.x"));
            h.insert(header, HeaderValue::from_static(value));
            let problem = read_events(&h, b"{}").unwrap_err();
            assert_eq!(problem.status, 400, "{header}");
            assert_eq!(problem.errors[0]["header"], header, "{header}");
        }
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", HeaderValue::from_static("1.0"));
        h.append("ce-id", HeaderValue::from_static("1"));
        h.append("ce-id", HeaderValue::from_static("2"));
        let problem = read_events(&h, b"").unwrap_err();
        assert!(problem.detail.contains("more than once"), "{}", problem.detail);
    }

    #[test]
    fn json_errors_say_where() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static(STRUCTURED));
        let problem = read_events(&h, b"{\n  \"id\": }").unwrap_err();
        assert_eq!((problem.errors[0]["line"].as_u64(), problem.errors[0]["column"].as_u64()), (Some(2), Some(9)));
        let deep = "[".repeat(200) + &"]".repeat(200);
        let problem = read_events(&h, deep.as_bytes()).unwrap_err();
        assert!(problem.detail.contains("recursion"), "{}", problem.detail);
    }

    #[test]
    fn a_batch_with_one_bad_event_is_refused_whole() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static(BATCH));
        let body = br#"[{"id":"1","source":"/a","specversion":"1.0","type":"t"},{"id":"2","source":"/a","specversion":"2.0","type":"t"}]"#;
        let problem = read_events(&h, body).unwrap_err();
        assert_eq!(problem.status, 400);
        assert_eq!(problem.errors[0]["index"], 1);
    }
}
