//! What happens to one command, from delivery to the decision to ack.
//!
//! The order is the guarantee: load the stream → decide → append (LWT) →
//! produce to Kafka and await the delivery report → record the operation →
//! only then return an [`Outcome`] that lets the consumer ack. A crash at any
//! step leaves the message unacked, so it is redelivered and finds its own
//! events in the stream (by command key) instead of deciding twice.

use std::marker::PhantomData;
use std::time::Duration;

use sluice_schemas::cloudevent::CloudEvent;
use sluice_schemas::names;
use tracing::{debug, warn};

use crate::domain::{Aggregate, DomainEvent, Malformed, Stamp};
use crate::event_store::{Append, EventStore, StoredEvent, StreamRef};
use crate::kafka::{EventPublisher, OutgoingEvent, PublishError};
use crate::operations::{OperationRef, OperationStore, Status};

/// A command as it arrives from the work queue.
#[derive(Debug, Clone)]
pub struct IncomingCommand {
    pub tenant: String,
    pub operation_id: String,
    pub event: CloudEvent,
}

/// What the consumer does with the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Events stored and produced, operation recorded: ack.
    Succeeded,
    /// A business rule said no, operation recorded: ack.
    Rejected(String),
    /// Already in a terminal state (redelivery): ack.
    AlreadyDone,
    /// Cannot ever succeed: dead-letter with the reason, then ack.
    DeadLetter { class: &'static str, reason: String },
    /// A dependency failed: try again later with backoff.
    Retry(String),
}

/// How many times a conflicting append reloads and decides again.
const MAX_CONFLICT_RETRIES: usize = 5;

pub struct Pipeline<A, S, P, O> {
    store: S,
    publisher: P,
    operations: O,
    _context: PhantomData<A>,
}

impl<A, S, P, O> Pipeline<A, S, P, O>
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    pub fn new(store: S, publisher: P, operations: O) -> Self {
        Self { store, publisher, operations, _context: PhantomData }
    }

    pub async fn handle(&self, cmd: &IncomingCommand) -> Outcome {
        match self.try_handle(cmd).await {
            Ok(outcome) => outcome,
            Err(Failure::Transient(reason)) => Outcome::Retry(reason),
            Err(Failure::Permanent { class, reason }) => Outcome::DeadLetter { class, reason },
        }
    }

    /// Records the terminal state of a command the consumer dead-lettered.
    pub async fn record_dead_letter(&self, cmd: &IncomingCommand, reason: &str) -> Result<(), String> {
        self.operations
            .record(op_ref(cmd), &Status::DeadLettered(reason.to_owned()))
            .await
            .map_err(|e| e.to_string())
    }

    async fn try_handle(&self, cmd: &IncomingCommand) -> Result<Outcome, Failure> {
        let op = op_ref(cmd);
        if let Some(status) = self.operations.status(&cmd.tenant, &cmd.operation_id).await? {
            if Status::is_terminal(&status) {
                debug!(%status, "operation already terminal");
                return Ok(Outcome::AlreadyDone);
            }
        }
        self.operations.record(op, &Status::Processing).await?;
        let data = cmd.event.data.clone().unwrap_or_default();
        let command = A::parse(&cmd.event.ty, data)?;
        let stream_id = A::stream_id(&command).to_owned();
        let stream = StreamRef { tenant: &cmd.tenant, context: A::CONTEXT, stream_id: &stream_id };
        let command_key = cmd.event.command_key();

        let mut command = Some(command);
        let mut mine = None;
        for _ in 0..=MAX_CONFLICT_RETRIES {
            let history = self.store.load(stream).await?;
            let already: Vec<StoredEvent> = history.iter().filter(|e| e.command_key == command_key).cloned().collect();
            if !already.is_empty() {
                // A redelivery of a command whose events are stored: publish
                // them again (consumers dedupe) instead of deciding twice.
                mine = Some(already);
                break;
            }
            let events = history
                .iter()
                .map(|e| A::Event::from_json(&e.event_type, e.payload.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let state = events.iter().fold(A::State::default(), A::evolve);
            let stamp = Stamp {
                next_version: history.last().map_or(1, |e| e.version + 1),
                now_ms: chrono::Utc::now().timestamp_millis(),
                id_seed: event_id_seed(&cmd.tenant, &command_key),
            };
            // `decide` consumes the command; a conflict needs it again, so
            // parse it afresh (cheap, and keeps decide's signature by value).
            let this_try = match command.take() {
                Some(c) => c,
                None => A::parse(&cmd.event.ty, cmd.event.data.clone().unwrap_or_default())?,
            };
            let new_events = match A::decide(&state, this_try, &stamp) {
                Ok(events) => events,
                Err(rejection) => {
                    self.operations.record(op, &Status::Rejected(rejection.0.clone())).await?;
                    return Ok(Outcome::Rejected(rejection.0));
                }
            };
            let stored: Vec<StoredEvent> = new_events
                .iter()
                .map(|e| StoredEvent {
                    version: e.version(),
                    event_id: e.event_id().to_owned(),
                    event_type: e.event_type().to_owned(),
                    payload: e.to_json(),
                    command_key: command_key.clone(),
                    operation_id: cmd.operation_id.clone(),
                    recorded_at_ms: stamp.now_ms,
                })
                .collect();
            match self.store.append(stream, &stored).await? {
                Append::Applied => {
                    mine = Some(stored);
                    break;
                }
                Append::Conflict => {
                    debug!(stream_id, "append conflict, deciding again");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let Some(mine) = mine else {
            return Err(Failure::Transient(format!("stream {stream_id} kept changing; gave up after {MAX_CONFLICT_RETRIES} conflicts")));
        };

        let topic = names::events_topic(&cmd.tenant, A::CONTEXT);
        let source = format!("/sluice/{}/{}", cmd.tenant, A::CONTEXT);
        let traceparent = cmd.event.extensions.get("traceparent").and_then(|v| v.as_str());
        let mut positions = Vec::with_capacity(mine.len());
        for stored in &mine {
            let event = A::Event::from_json(&stored.event_type, stored.payload.clone())?;
            let position = self
                .publisher
                .publish(OutgoingEvent {
                    topic: &topic,
                    key: &stream_id,
                    event_id: &stored.event_id,
                    event_type: &stored.event_type,
                    source: &source,
                    time_ms: stored.recorded_at_ms,
                    avro: event.to_avro(),
                    traceparent,
                })
                .await?;
            positions.push(position);
        }
        self.operations.record(op, &Status::Succeeded(positions)).await?;
        Ok(Outcome::Succeeded)
    }
}

fn op_ref(cmd: &IncomingCommand) -> OperationRef<'_> {
    OperationRef {
        tenant: &cmd.tenant,
        operation_id: &cmd.operation_id,
        command_type: &cmd.event.ty,
        source: &cmd.event.source,
        command_id: &cmd.event.id,
    }
}

/// Event ids are a UUID v5 of tenant and command key: the same command always
/// yields the same ids, so consumers can dedupe across redeliveries.
fn event_id_seed(tenant: &str, command_key: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{tenant}\u{1f}{command_key}").as_bytes()).to_string()
}

/// Why handling stopped, and what the consumer should do about it.
#[derive(Debug)]
enum Failure {
    Transient(String),
    Permanent { class: &'static str, reason: String },
}

impl From<crate::event_store::StoreError> for Failure {
    fn from(e: crate::event_store::StoreError) -> Self {
        Failure::Transient(e.to_string())
    }
}

impl From<crate::operations::OperationError> for Failure {
    fn from(e: crate::operations::OperationError) -> Self {
        Failure::Transient(e.to_string())
    }
}

impl From<Malformed> for Failure {
    fn from(e: Malformed) -> Self {
        Failure::Permanent { class: "malformed_command", reason: e.to_string() }
    }
}

impl From<PublishError> for Failure {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Transient(reason) => {
                warn!(%reason, "publish failed");
                Failure::Transient(reason)
            }
            PublishError::Permanent(reason) => Failure::Permanent { class: "unencodable_event", reason },
        }
    }
}
