//! Process managers: long-running processes that react to events with
//! commands and durable timers, rebuilt from their own stream.
//!
//! - this module: the pure API ([`ProcessManager`]: `react` and `on_timer`).
//! - [`record`]: what a process appends to its stream (each handled input
//!   with the decision it caused, then a marker once that decision was
//!   carried out) and how the state is folded back from it.
//! - [`onboarding`]: the demo process of the `patients` context.
//! - [`timers`]: durable timers in the CQL store, claimed with an LWT.
//! - [`commands`]: commands onto the normal command path (exchange,
//!   publisher confirms).
//! - [`runtime`]: the consumer group, the timer poller and the per-input
//!   steps: load → decide → append (LWT) → carry out → mark done.
//!
//! A decision is appended to the process's stream *before* it is carried
//! out, and carried out again (idempotently) until a `Dispatched` marker
//! follows it: a crash between the two repeats sending, never loses it. Every
//! command id derives from (process, correlation, step), so a repeat is
//! deduplicated by the processors like any redelivered command.

pub mod commands;
pub mod onboarding;
pub mod record;
pub mod runtime;
pub mod timers;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_schemas::codec::{Decoded, EventError};

use crate::domain::DomainEvent;

/// The context whose streams hold the process managers' records.
pub const PROCESS_CONTEXT: &str = "processes";

/// A durable timer: fires at or after `due_at_ms`, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Unique within one process instance (a step name, e.g. `timeout-2`).
    pub id: String,
    pub due_at_ms: i64,
}

/// A command a process wants sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandIntent {
    /// The step that sends it, unique within one process instance: the
    /// command's id derives from it, so the step is sent once in effect.
    pub step: String,
    /// The bounded context that handles it (routing key `<tenant>.<context>`).
    pub context: String,
    /// The command's CloudEvent type.
    pub ty: String,
    pub data: Value,
}

/// What a process decided about one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<S> {
    pub state: S,
    pub commands: Vec<CommandIntent>,
    pub set_timers: Vec<Timer>,
    pub cancel_timers: Vec<Timer>,
}

impl<S> Decision<S> {
    /// The state changes, nothing else happens.
    pub fn state(state: S) -> Self {
        Self { state, commands: Vec::new(), set_timers: Vec::new(), cancel_timers: Vec::new() }
    }

    /// Whether carrying it out would do nothing.
    pub fn is_noop(&self, before: &S) -> bool
    where
        S: PartialEq,
    {
        self.state == *before && self.commands.is_empty() && self.set_timers.is_empty() && self.cancel_timers.is_empty()
    }
}

/// A process manager: pure functions of its state and an input. Its settings
/// (timeouts, limits) are in `self`; changing them changes what a replay
/// decides for inputs not handled yet, never what was handled.
pub trait ProcessManager: Send + Sync + 'static {
    /// Names the process's streams (`<NAME>:<correlation>`) and timers.
    const NAME: &'static str;
    /// The bounded context whose events it follows.
    const CONTEXT: &'static str;
    type State: Default + Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync;
    type Event: DomainEvent;

    /// Reads an event of the followed context from its decoded record;
    /// `None` for events it does not know, an error for bytes its own
    /// schema cannot read.
    fn from_decoded(decoded: Decoded<'_>) -> Result<Option<Self::Event>, EventError>;
    /// The process instance an event belongs to (the patient id).
    fn correlation(event: &Self::Event) -> &str;
    fn react(&self, state: &Self::State, event: &Self::Event) -> Decision<Self::State>;
    fn on_timer(&self, state: &Self::State, timer: &Timer) -> Decision<Self::State>;
    /// A short name of the state for ops (`sluice status`).
    fn stage(state: &Self::State) -> &'static str;
}
