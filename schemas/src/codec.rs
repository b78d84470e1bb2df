//! Domain events as Avro in the Confluent wire format (magic byte 0, 4-byte
//! big-endian schema id, Avro binary body), schemas held in the registry under
//! TopicRecordNameStrategy so any Confluent deserializer can read the topics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::avro_common::AvroSchema;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use serde::Serialize;

use crate::avro_body::Body;
use crate::catalog::EventSpec;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The registry did not answer or refused: retry with backoff.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The bytes are not a record we can read: never retried, dead-lettered.
    #[error("undecodable event: {0}")]
    Undecodable(String),
}

impl CodecError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }
}

/// By what the registry answered, never by guess: a record is poison only
/// when the registry itself says the schema does not exist (404: the decoder
/// asked afresh, failures are never cached) or that a schema is invalid or
/// incompatible (409, 422), or when the bytes cannot be read with the schema
/// it gave. Any other answer (401/403 while credentials rotate, 429 while it
/// sheds load, 5xx), a timeout or a refused connection is the registry's
/// trouble and heals: retried with backoff, never dead-lettered.
fn classify(e: SRCError) -> CodecError {
    match http_status(&e.error) {
        Some(404 | 409 | 422) => CodecError::Undecodable(e.to_string()),
        Some(_) => CodecError::Registry(e.to_string()),
        None if e.retriable => CodecError::Registry(e.to_string()),
        None => CodecError::Undecodable(e.to_string()),
    }
}

/// The status of a failed registry call, from the converter's message
/// ("HTTP request to schema registry failed with status 429 Too Many Requests").
fn http_status(message: &str) -> Option<u16> {
    let rest = &message[message.find("failed with status ")? + "failed with status ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Encodes and decodes events through the registry; schemas are fetched or
/// registered once per subject and cached by the underlying converter.
pub struct EventCodec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Writer schemas by id, as [`EventCodec::decode`] found them.
    writers: RwLock<HashMap<u32, Writer>>,
}

/// A writer schema, and the event type whose compiled-in schema it is, if
/// it is one (the same Parsing Canonical Form).
#[derive(Clone)]
struct Writer {
    schema: Arc<AvroSchema>,
    compiled_in: Option<&'static str>,
}

/// Why a decoded record is no event of a context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Its bytes cannot be read with its own writer schema.
    #[error("undecodable event: {0}")]
    Undecodable(String),
    /// It is none of the context's events, or its fields do not fit one.
    #[error("{0}")]
    Unknown(String),
}

impl EventError {
    /// Its class on a dead letter.
    pub fn class(&self) -> &'static str {
        match self {
            EventError::Undecodable(_) => "undecodable",
            EventError::Unknown(_) => "unknown_event",
        }
    }
}

/// A decoded record: the writer schema's full name and the record.
pub enum Decoded<'a> {
    /// Written with the schema compiled in for `name`: its body, for a
    /// typed reader ([`crate::avro_body::FromBody`]) or [`Decoded::into_value`].
    Body { name: &'static str, body: Body<'a>, schema: Arc<AvroSchema> },
    /// Written with another schema (an older or newer version): the value.
    Value { name: String, value: Value },
}

impl Decoded<'_> {
    /// The writer schema's full name (the event type).
    pub fn name(&self) -> &str {
        match self {
            Decoded::Body { name, .. } => name,
            Decoded::Value { name, .. } => name,
        }
    }

    /// The record as an Avro value, for code without a typed reader.
    pub fn into_value(self) -> Result<Value, EventError> {
        match self {
            Decoded::Value { value, .. } => Ok(value),
            Decoded::Body { name, body, schema } => {
                let mut bytes = body.rest();
                let value = GenericDatumReader::builder(&schema.parsed).build().and_then(|r| r.read_value(&mut bytes));
                value.map_err(|e| EventError::Undecodable(format!("{name}: {e}")))
            }
        }
    }
}

impl EventCodec {
    /// `registry_url` is the Confluent-compatible base, e.g.
    /// `http://127.0.0.1:8081/apis/ccompat/v7` (no trailing slash).
    pub fn new(registry_url: &str) -> Result<Self, CodecError> {
        let settings = || {
            SrSettings::new_builder(registry_url.trim_end_matches('/').to_owned())
                .set_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| CodecError::Registry(e.to_string()))
        };
        Ok(Self {
            encoder: AvroEncoder::new(settings()?),
            decoder: AvroDecoder::new(settings()?),
            writers: RwLock::new(HashMap::new()),
        })
    }

    fn strategy(topic: &str, spec: &EventSpec) -> SubjectNameStrategy {
        SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
            topic.to_owned(),
            SuppliedSchema::new(Some(spec.ty.to_owned()), SchemaType::Avro, spec.avro.to_owned()),
        )
    }

    /// Registers (or finds) the event's schema under its subject for `topic`
    /// and returns the schema id. An incompatible change fails here.
    pub async fn register(&self, topic: &str, spec: &EventSpec) -> Result<u32, CodecError> {
        let strategy = Self::strategy(topic, spec);
        let subject = crate::names::event_subject(topic, spec.ty);
        let result = self.encoder.get_schema_and_id(&subject, strategy).await;
        self.forget_errors_of(&result);
        result.map(|schema| schema.id).map_err(classify)
    }

    /// Encodes one event for `topic` in Confluent wire format.
    pub async fn encode<T: Serialize>(&self, topic: &str, spec: &EventSpec, event: &T) -> Result<Vec<u8>, CodecError> {
        let result = self.encoder.encode_struct(event, &Self::strategy(topic, spec)).await;
        self.forget_errors_of(&result);
        result.map_err(classify)
    }

    /// Encodes an Avro value of the event's record schema for `topic`.
    pub async fn encode_value(&self, topic: &str, spec: &EventSpec, value: Value) -> Result<Vec<u8>, CodecError> {
        let result = self.encoder.encode_value(value, &Self::strategy(topic, spec)).await;
        self.forget_errors_of(&result);
        result.map_err(classify)
    }

    /// Decodes a record value: the writer schema's full name and the record,
    /// its body as it is when the writer schema is the one compiled in for
    /// that name (a typed reader takes it from there), else as an Avro value.
    pub async fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Decoded<'a>, CodecError> {
        let Some(id) = schema_id(bytes) else {
            return Err(CodecError::Undecodable("not Confluent wire format (magic byte 0 + schema id)".into()));
        };
        let known = self.writers.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        // The rare paths are boxed: inline, their futures (an HTTP request
        // to the registry) would grow the future of every record's decode,
        // which a rebuild moves and allocates per key.
        let writer = match known {
            Some(writer) => writer,
            None => Box::pin(self.writer(id)).await?,
        };
        if let Some(name) = writer.compiled_in {
            return Ok(Decoded::Body { name, body: Body::new(&bytes[5..]), schema: writer.schema });
        }
        let result = Box::pin(self.decoder.decode(Some(bytes))).await;
        if result.is_err() {
            self.decoder.remove_errors_from_cache();
        }
        let decoded = result.map_err(classify)?;
        let name = decoded.name.map(|n| n.fullname(None)).unwrap_or_default();
        Ok(Decoded::Value { name, value: decoded.value })
    }

    /// The writer schema of `id`, asked of the registry once.
    async fn writer(&self, id: u32) -> Result<Writer, CodecError> {
        let result = self.decoder.get_schema(id).await;
        if result.is_err() {
            self.decoder.remove_errors_from_cache();
        }
        let schema = result.map_err(classify)?;
        let name = match &schema.parsed {
            apache_avro::Schema::Record(record) => Some(record.name.fullname(None)),
            _ => None,
        };
        // The same Parsing Canonical Form means the same bytes' layout.
        let compiled_in = name.and_then(|name| {
            let spec = crate::catalog::event_spec(&name)?;
            let ours = apache_avro::Schema::parse_str(spec.avro).ok()?;
            (ours.canonical_form() == schema.parsed.canonical_form()).then_some(spec.ty)
        });
        let writer = Writer { schema, compiled_in };
        self.writers.write().unwrap_or_else(|e| e.into_inner()).insert(id, writer.clone());
        Ok(writer)
    }

    /// The converter caches failures; a registry that was down must be asked
    /// again next time.
    fn forget_errors_of<T>(&self, result: &Result<T, SRCError>) {
        if result.is_err() {
            self.encoder.remove_errors_from_cache();
        }
    }
}

/// The schema id of a Confluent wire-format record, if it is one.
pub fn schema_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: &str, retriable: bool) -> SRCError {
        SRCError::new(&format!("HTTP request to schema registry failed with status {status}"), None, retriable)
    }

    #[test]
    fn only_a_missing_or_rejected_schema_is_poison() {
        for status in ["404 Not Found", "409 Conflict", "422 Unprocessable Entity"] {
            assert!(!classify(failed(status, false)).is_transient(), "{status}");
        }
        for status in ["401 Unauthorized", "403 Forbidden", "429 Too Many Requests", "500 Internal Server Error"] {
            assert!(classify(failed(status, false)).is_transient(), "{status}");
        }
        assert!(classify(failed("503 Service Unavailable", true)).is_transient());
        assert!(classify(SRCError::new("http call to schema registry failed", None, true)).is_transient());
        assert!(!classify(SRCError::new("could not parse to RawRegisteredSchema", None, false)).is_transient());
    }
}
