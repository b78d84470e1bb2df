//! A record's event through the registry, or why it cannot be applied.
//! Every consumer of events decodes the same way: a parked key waits, a
//! record without a value or with bytes the registry's schemas cannot read is
//! poison, and the registry being unavailable is transient.

use rdkafka::message::Message;
use sluice_schemas::codec::{Decoded, EventCodec, EventError};

use crate::dead_letter::{DeadLetters, Parking, PARKED};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The store, registry or Kafka is unavailable: retry, the record waits.
    #[error("{0}")]
    Transient(String),
    /// The record can never be applied: dead-letter it.
    #[error("{class}: {reason}")]
    Poison { class: &'static str, reason: String },
}

/// The decoded record (its event type and body or Avro value), or why it
/// cannot be applied: its key is parked, it has no value or cannot be
/// decoded (poison), or the registry is unavailable (transient).
pub async fn decode_record<'m>(
    codec: &EventCodec,
    dead_letters: &DeadLetters,
    message: &'m impl Message,
) -> Result<Decoded<'m>, ApplyError> {
    let poison = |class, reason: String| ApplyError::Poison { class, reason };
    match dead_letters.parking(message).await.map_err(|e| ApplyError::Transient(e.0))? {
        Parking::Free => {}
        Parking::Parked => {
            let key = message.key().map(String::from_utf8_lossy).unwrap_or_default();
            return Err(poison(PARKED, format!("key {key} waits behind an earlier poison event")));
        }
        Parking::Releasing => return Err(ApplyError::Transient("the key's dead letters are being replayed".into())),
    }
    let payload = message.payload().ok_or_else(|| poison("no_value", "record has no value".into()))?;
    codec.decode(payload).await.map_err(|e| {
        if e.is_transient() {
            ApplyError::Transient(e.to_string())
        } else {
            poison("undecodable", e.to_string())
        }
    })
}

impl From<EventError> for ApplyError {
    /// A record that is no event of the context is poison.
    fn from(e: EventError) -> Self {
        ApplyError::Poison { class: e.class(), reason: e.to_string() }
    }
}
