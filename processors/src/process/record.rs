//! What a process appends to its stream `<process>:<correlation>` (context
//! [`PROCESS_CONTEXT`](super::PROCESS_CONTEXT)), and the pure fold that
//! rebuilds its state from it.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CommandIntent, ProcessManager, Timer};
use crate::domain::DomainEvent;
use crate::event_store::StoredEvent;

pub const HANDLED: &str = "sluice.process.Handled";
pub const DISPATCHED: &str = "sluice.process.Dispatched";

/// An input as the stream keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputRecord {
    Event { event_id: String, event_type: String, payload: Value },
    Timer { timer: Timer },
}

impl InputRecord {
    /// Unique per input of one process instance: a handled input is found by it.
    pub fn key(&self) -> String {
        match self {
            InputRecord::Event { event_id, .. } => format!("event:{event_id}"),
            InputRecord::Timer { timer } => format!("timer:{}", timer.id),
        }
    }
}

/// One handled input and the decision it caused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handled {
    pub input: InputRecord,
    pub commands: Vec<CommandIntent>,
    pub set_timers: Vec<Timer>,
    pub cancel_timers: Vec<Timer>,
}

/// The decision recorded at `version` was carried out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatched {
    pub version: i64,
}

/// A process instance as folded from its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt<S> {
    pub state: S,
    /// Keys of the inputs already handled.
    pub handled: HashSet<String>,
    /// Decisions recorded but not yet marked carried out, oldest first.
    pub undispatched: Vec<(i64, Handled)>,
    pub next_version: i64,
}

/// The records could not be read: a bug or a foreign write, never retried.
#[derive(Debug, thiserror::Error)]
#[error("process stream: {0}")]
pub struct CorruptStream(pub String);

/// Folds a process's stream: its state is what `react` and `on_timer` make
/// of the recorded inputs, in order (the recorded outputs are not needed to
/// rebuild it; they are kept to carry them out and for the audit).
pub fn rebuild<M: ProcessManager>(pm: &M, records: &[StoredEvent]) -> Result<Rebuilt<M::State>, CorruptStream> {
    let mut state = M::State::default();
    let mut handled = HashSet::new();
    let mut pending: Vec<(i64, Handled)> = Vec::new();
    for record in records {
        match record.event_type.as_str() {
            HANDLED => {
                let h: Handled =
                    serde_json::from_value(record.payload.clone()).map_err(|e| CorruptStream(e.to_string()))?;
                state = match &h.input {
                    InputRecord::Event { event_type, payload, .. } => {
                        let event = M::Event::from_json(event_type, payload.clone())
                            .map_err(|e| CorruptStream(e.to_string()))?;
                        pm.react(&state, &event).state
                    }
                    InputRecord::Timer { timer } => pm.on_timer(&state, timer).state,
                };
                handled.insert(h.input.key());
                pending.push((record.version, h));
            }
            DISPATCHED => {
                let d: Dispatched =
                    serde_json::from_value(record.payload.clone()).map_err(|e| CorruptStream(e.to_string()))?;
                pending.retain(|(v, _)| *v != d.version);
            }
            other => return Err(CorruptStream(format!("unknown record type {other}"))),
        }
    }
    Ok(Rebuilt { state, handled, undispatched: pending, next_version: records.last().map_or(1, |r| r.version + 1) })
}
