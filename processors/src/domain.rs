//! The handler API of a bounded context: pure `decide` and `evolve`.
//!
//! A context implements [`Aggregate`]; the platform loads the stream, folds it
//! with `evolve`, asks `decide`, and stores and publishes what it returns.
//! Nothing here touches I/O, so contexts are tested given/when/then.

use serde_json::Value;

/// What `decide` needs to stamp the events it creates. Event ids derive from
/// the command key, so deciding the same command twice yields the same ids.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// Version the first new event gets (stream length + 1).
    pub next_version: i64,
    /// Milliseconds since the Unix epoch, taken once per command.
    pub now_ms: i64,
    /// Seed of the event ids (derived from tenant and command key).
    pub id_seed: String,
}

impl Stamp {
    /// The id of the `index`-th event this command produces.
    pub fn event_id(&self, index: usize) -> String {
        format!("{}-{}", self.id_seed, index)
    }

    pub fn version(&self, index: usize) -> i64 {
        self.next_version + index as i64
    }
}

/// A business rule said no: the operation ends `rejected` with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

/// A command whose payload does not fit its type: never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed command: {0}")]
pub struct Malformed(pub String);

/// The events of a context, convertible to what the store and Kafka carry.
pub trait DomainEvent: Sized + Clone + Send + Sync {
    fn event_type(&self) -> &'static str;
    fn version(&self) -> i64;
    fn event_id(&self) -> &str;
    fn to_json(&self) -> Value;
    fn from_json(event_type: &str, json: Value) -> Result<Self, Malformed>;
    fn to_avro(&self) -> apache_avro::types::Value;
}

/// A bounded context's aggregate.
pub trait Aggregate: Send + Sync + 'static {
    /// The context's name (`orders`): it names queues and topics.
    const CONTEXT: &'static str;
    type State: Default + Send;
    type Command: Send;
    type Event: DomainEvent;

    /// Reads a command of CloudEvent type `ty` from its (schema-valid) data.
    fn parse(ty: &str, data: Value) -> Result<Self::Command, Malformed>;
    /// The id of the stream (aggregate) the command addresses; also the
    /// Kafka key, so one aggregate's events stay in one partition.
    fn stream_id(command: &Self::Command) -> &str;
    /// All business logic: the events a command causes, or why not.
    fn decide(state: &Self::State, command: Self::Command, stamp: &Stamp) -> Result<Vec<Self::Event>, Rejection>;
    /// No logic: how one event changes the state.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;
}
