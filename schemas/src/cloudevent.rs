//! The CloudEvents 1.0 envelope: parsing and the spec's attribute rules.
//!
//! Parsing is pure and reports every broken attribute at once, so the edge
//! can name each of them in one problem document.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A CloudEvent as sluice carries it: attributes plus JSON `data` (or
/// `data_base64` for binary payloads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    pub specversion: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Extension attributes (lower-case alphanumeric names, at most 20 chars).
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

/// One broken attribute: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttributeError {
    pub attribute: String,
    pub problem: String,
}

impl AttributeError {
    fn new(attribute: &str, problem: impl Into<String>) -> Self {
        Self { attribute: attribute.to_owned(), problem: problem.into() }
    }
}

const REQUIRED: [&str; 4] = ["id", "source", "specversion", "type"];
const OPTIONAL_STRINGS: [&str; 4] = ["datacontenttype", "dataschema", "subject", "time"];

impl CloudEvent {
    /// Parses a structured-mode event (one JSON object), checking every
    /// attribute rule of the spec; returns all violations, not just the first.
    pub fn from_json(value: Value) -> Result<Self, Vec<AttributeError>> {
        let Value::Object(mut map) = value else {
            return Err(vec![AttributeError::new("", "a CloudEvent must be a JSON object")]);
        };
        let mut errors = Vec::new();
        let mut take_string = |map: &mut Map<String, Value>, name: &str, required: bool| match map.remove(name) {
            Some(Value::String(s)) if s.is_empty() => {
                errors.push(AttributeError::new(name, "must not be empty"));
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                errors.push(AttributeError::new(name, "must be a string"));
                None
            }
            None if required => {
                errors.push(AttributeError::new(name, "is required"));
                None
            }
            None => None,
        };
        let [id, source, specversion, ty] = REQUIRED.map(|name| take_string(&mut map, name, true));
        let [datacontenttype, dataschema, subject, time] =
            OPTIONAL_STRINGS.map(|name| take_string(&mut map, name, false));
        let data = map.remove("data");
        let data_base64 = match map.remove("data_base64") {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                errors.push(AttributeError::new("data_base64", "must be a base64 string"));
                None
            }
        };
        let event = CloudEvent {
            id: id.unwrap_or_default(),
            source: source.unwrap_or_default(),
            specversion: specversion.unwrap_or_default(),
            ty: ty.unwrap_or_default(),
            datacontenttype,
            dataschema,
            subject,
            time,
            data,
            data_base64,
            extensions: map.into_iter().collect(),
        };
        errors.extend(event.violations());
        if errors.is_empty() {
            Ok(event)
        } else {
            errors.sort_by(|a, b| a.attribute.cmp(&b.attribute));
            errors.dedup_by(|a, b| a.attribute == b.attribute);
            Err(errors)
        }
    }

    /// The spec's rules on attribute values, for events built any way.
    pub fn violations(&self) -> Vec<AttributeError> {
        let mut errors = Vec::new();
        if !self.specversion.is_empty() && self.specversion != "1.0" {
            errors.push(AttributeError::new("specversion", "must be \"1.0\""));
        }
        if !self.source.is_empty() && !is_uri_reference(&self.source) {
            errors.push(AttributeError::new("source", "must be a URI-reference"));
        }
        if let Some(time) = &self.time {
            if DateTime::<FixedOffset>::parse_from_rfc3339(time).is_err() {
                errors.push(AttributeError::new("time", "must be an RFC 3339 timestamp"));
            }
        }
        if let Some(schema) = &self.dataschema {
            if !is_absolute_uri(schema) {
                errors.push(AttributeError::new("dataschema", "must be an absolute URI"));
            }
        }
        if self.data.is_some() && self.data_base64.is_some() {
            errors.push(AttributeError::new("data_base64", "data and data_base64 are mutually exclusive"));
        }
        for (name, value) in &self.extensions {
            if !is_attribute_name(name) {
                errors.push(AttributeError::new(
                    name,
                    "extension attribute names are 1 to 20 lower-case letters or digits",
                ));
            } else if !matches!(value, Value::String(_) | Value::Bool(_) | Value::Number(_)) {
                errors.push(AttributeError::new(name, "extension values must be strings, numbers or booleans"));
            }
        }
        errors
    }

    /// The command key: a command takes effect at most once per (source, id).
    pub fn command_key(&self) -> String {
        format!("{}\u{1f}{}", self.source, self.id)
    }
}

/// CloudEvents attribute names: `[a-z0-9]{1,20}`.
pub fn is_attribute_name(name: &str) -> bool {
    (1..=20).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// RFC 3986 URI-reference, checked for the characters it allows (no spaces,
/// controls or non-ASCII) and a well-formed scheme when one is present.
pub fn is_uri_reference(s: &str) -> bool {
    const ALLOWED: &[u8] = b"-._~:/?#[]@!$&'()*+,;=%";
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || ALLOWED.contains(&b)) {
        return false;
    }
    // `%` only as the start of a `%XX` escape.
    let bytes = s.as_bytes();
    let escapes_whole = bytes.iter().enumerate().filter(|(_, &b)| b == b'%').all(|(i, _)| {
        bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    });
    if !escapes_whole {
        return false;
    }
    match s.find(':') {
        Some(colon) if !s[..colon].contains(['/', '?', '#']) => is_scheme(&s[..colon]),
        _ => true,
    }
}

/// An absolute URI: a scheme, a colon and something after it.
pub fn is_absolute_uri(s: &str) -> bool {
    is_uri_reference(s) && s.find(':').is_some_and(|colon| is_scheme(&s[..colon]) && colon + 1 < s.len())
}

fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"id": "1", "source": "/acme/shop", "specversion": "1.0",
               "type": "com.example.orders.SubmitOrder", "data": {"a": 1}})
    }

    #[test]
    fn parses_a_valid_event_with_extensions() {
        let mut v = valid();
        v["traceparent"] = json!("00-abc");
        v["time"] = json!("2026-11-26T10:00:00Z");
        let e = CloudEvent::from_json(v).unwrap();
        assert_eq!(e.ty, "com.example.orders.SubmitOrder");
        assert_eq!(e.extensions["traceparent"], json!("00-abc"));
    }

    #[test]
    fn reports_every_missing_attribute() {
        let errors = CloudEvent::from_json(json!({"data": 1})).unwrap_err();
        let names: Vec<_> = errors.iter().map(|e| e.attribute.as_str()).collect();
        assert_eq!(names, ["id", "source", "specversion", "type"]);
    }

    #[test]
    fn rejects_bad_values() {
        for (attr, bad) in [
            ("specversion", json!("0.3")),
            ("time", json!("yesterday")),
            ("source", json!("has space")),
            ("id", json!("")),
            ("id", json!(7)),
            ("dataschema", json!("relative/path")),
            ("Bad_Name", json!("x")),
        ] {
            let mut v = valid();
            v[attr] = bad.clone();
            let errors = CloudEvent::from_json(v).unwrap_err();
            assert_eq!(errors[0].attribute, attr, "{attr} = {bad}");
        }
    }

    #[test]
    fn uri_rules() {
        assert!(is_uri_reference("/acme/shop"));
        assert!(is_uri_reference("urn:acme:shop"));
        assert!(is_uri_reference("https://acme.example/shop?x=1"));
        assert!(!is_uri_reference("1abc:x"));
        assert!(!is_uri_reference("ä"));
        assert!(is_absolute_uri("https://x/y"));
        assert!(!is_absolute_uri("/x"));
    }
}
