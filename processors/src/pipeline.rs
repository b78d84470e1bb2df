//! What happens to one command, from delivery to the decision to ack.
//!
//! The order is the guarantee: load the stream → decide → append (LWT) →
//! produce to Kafka and await the delivery report → record the operation →
//! only then return an [`Outcome`] that lets the consumer ack. A crash at any
//! step leaves the message unacked, so it is redelivered and finds its own
//! events in the stream (by command key) instead of deciding twice.

use std::marker::PhantomData;
use std::time::Duration;

use sluice_schemas::catalog::CommandSchemas;
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
    /// 1 on the first delivery; counts delayed retries.
    pub attempt: u32,
    /// W3C trace context, carried on to the Kafka headers.
    pub traceparent: Option<String>,
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
    /// The command's events are stored but not all in Kafka yet (or its
    /// operation is not recorded): try again later, for as long as it takes,
    /// never dead-lettered, so a stored event is never stranded.
    RetryAppended(String),
}

/// How many times a conflicting append reloads and decides again.
const MAX_CONFLICT_RETRIES: usize = 5;

pub struct Pipeline<A, S, P, O> {
    /// Commands can reach the queue without the edge (ops tools, other
    /// producers), so their data is checked against its schema here too.
    schemas: CommandSchemas,
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
        Self { schemas: CommandSchemas::load(), store, publisher, operations, _context: PhantomData }
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
        self.operations.record(op_ref(cmd), &Status::DeadLettered(reason.to_owned())).await.map_err(|e| e.to_string())
    }

    async fn try_handle(&self, cmd: &IncomingCommand) -> Result<Outcome, Failure> {
        let op = op_ref(cmd);
        if let Some(status) = self.operations.status(&cmd.tenant, &cmd.operation_id).await? {
            // `dead_lettered` is final only until ops (or the re-drive) send
            // the command back: then it is processed again.
            if Status::is_settled(&status) {
                debug!(%status, "operation already settled");
                return Ok(Outcome::AlreadyDone);
            }
        }
        self.operations.record(op, &Status::Processing { attempt: cmd.attempt }).await?;
        let data = cmd.event.data.clone().unwrap_or_default();
        if let Err(errors) = self.schemas.validate(&cmd.event.ty, &data) {
            let list: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", if e.pointer.is_empty() { "/" } else { &e.pointer }, e.problem))
                .collect();
            return Err(Failure::Permanent {
                class: "malformed_command",
                reason: format!("data fails its schema: {}", list.join("; ")),
            });
        }
        let command = A::parse(&cmd.event.ty, data)?;
        let stream_id = A::stream_id(&command).to_owned();
        let stream = StreamRef { tenant: &cmd.tenant, context: A::CONTEXT, stream_id: &stream_id };
        let command_key = cmd.event.command_key();

        let mut command = Some(command);
        let mut mine = None;
        let mut earlier_unproduced = Vec::new();
        for _ in 0..=MAX_CONFLICT_RETRIES {
            let history = self.store.load(stream).await?;
            // Events of other commands that Kafka has not confirmed yet (their
            // command is still retrying): they go out before this command's,
            // so the stream reaches Kafka in version order.
            earlier_unproduced =
                history.iter().filter(|e| !e.produced && e.command_key != command_key).cloned().collect();
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
                    produced: false,
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
            return Err(Failure::Transient(format!(
                "stream {stream_id} kept changing; gave up after {MAX_CONFLICT_RETRIES} conflicts"
            )));
        };

        // Only events before this command's own: later ones wait for it.
        let first_own = mine.first().map_or(i64::MAX, |e| e.version);
        earlier_unproduced.retain(|e| e.version < first_own);
        let topic = names::events_topic(&cmd.tenant, A::CONTEXT);
        let source = format!("/sluice/{}/{}", cmd.tenant, A::CONTEXT);
        // This processing's span when traces are exported, else the received one.
        let traceparent = sluice_telemetry::onward(&tracing::Span::current(), cmd.traceparent.as_deref());
        let traceparent = traceparent.as_deref();
        let published = async {
            for stored in &earlier_unproduced {
                self.produce(cmd, &topic, &source, &stream_id, stored, traceparent).await?;
            }
            let mut positions = Vec::with_capacity(mine.len());
            for stored in &mine {
                positions.push(self.produce(cmd, &topic, &source, &stream_id, stored, traceparent).await?);
            }
            self.operations.record(op, &Status::Succeeded(positions)).await?;
            Ok::<_, Failure>(())
        };
        // Once stored, the events go to Kafka whatever it takes: a failure
        // from here on (Kafka or the registry down, even refusing) is retried,
        // never dead-lettered.
        match published.await {
            Ok(()) => Ok(Outcome::Succeeded),
            Err(Failure::Transient(reason) | Failure::Permanent { reason, .. }) => Ok(Outcome::RetryAppended(reason)),
        }
    }
}

impl<A, S, P, O> Pipeline<A, S, P, O>
where
    A: Aggregate,
    S: EventStore,
    P: EventPublisher,
    O: OperationStore,
{
    /// Produces one stored event, then marks it produced in the store.
    async fn produce(
        &self,
        cmd: &IncomingCommand,
        topic: &str,
        source: &str,
        stream_id: &str,
        stored: &StoredEvent,
        traceparent: Option<&str>,
    ) -> Result<crate::operations::EventPosition, Failure> {
        let event = A::Event::from_json(&stored.event_type, stored.payload.clone())?;
        let position = self
            .publisher
            .publish(OutgoingEvent {
                topic,
                key: stream_id,
                event_id: &stored.event_id,
                event_type: &stored.event_type,
                source,
                time_ms: stored.recorded_at_ms,
                avro: event.to_avro(),
                traceparent,
            })
            .await?;
        let stream = StreamRef { tenant: &cmd.tenant, context: A::CONTEXT, stream_id };
        self.store.mark_produced(stream, stored.version).await?;
        Ok(position)
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

#[cfg(test)]
mod tests {
    //! The pipeline's rules with in-memory doubles of its three boundaries.

    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::event_store::StoreError;
    use crate::operations::{EventPosition, OperationError};
    use crate::orders::Orders;

    #[derive(Default)]
    struct MemoryStore {
        events: Mutex<Vec<StoredEvent>>,
        /// Appends to refuse as conflicts before accepting one.
        conflicts: Mutex<usize>,
    }

    impl EventStore for MemoryStore {
        async fn load(&self, _: StreamRef<'_>) -> Result<Vec<StoredEvent>, StoreError> {
            Ok(self.events.lock().unwrap().clone())
        }
        async fn append(&self, _: StreamRef<'_>, events: &[StoredEvent]) -> Result<Append, StoreError> {
            let mut conflicts = self.conflicts.lock().unwrap();
            if *conflicts > 0 {
                *conflicts -= 1;
                return Ok(Append::Conflict);
            }
            let mut stored = self.events.lock().unwrap();
            if events.iter().any(|e| stored.iter().any(|s| s.version == e.version)) {
                return Ok(Append::Conflict);
            }
            stored.extend_from_slice(events);
            Ok(Append::Applied)
        }
        async fn mark_produced(&self, _: StreamRef<'_>, version: i64) -> Result<(), StoreError> {
            self.events.lock().unwrap().iter_mut().filter(|e| e.version == version).for_each(|e| e.produced = true);
            Ok(())
        }
    }

    #[derive(Default)]
    struct MemoryPublisher {
        published: Mutex<Vec<String>>,
        fail: Mutex<bool>,
    }

    impl EventPublisher for MemoryPublisher {
        async fn publish(&self, event: OutgoingEvent<'_>) -> Result<EventPosition, PublishError> {
            if *self.fail.lock().unwrap() {
                return Err(PublishError::Transient("kafka down".into()));
            }
            let mut published = self.published.lock().unwrap();
            published.push(event.event_id.to_owned());
            Ok(EventPosition {
                event_type: event.event_type.into(),
                topic: event.topic.into(),
                partition: 0,
                offset: published.len() as i64 - 1,
            })
        }
    }

    #[derive(Default)]
    struct MemoryOperations {
        statuses: Mutex<Vec<Status>>,
    }

    impl OperationStore for MemoryOperations {
        async fn status(&self, _: &str, _: &str) -> Result<Option<String>, OperationError> {
            Ok(self.statuses.lock().unwrap().last().map(|s| s.name().to_owned()))
        }
        async fn record(&self, _: OperationRef<'_>, status: &Status) -> Result<(), OperationError> {
            self.statuses.lock().unwrap().push(status.clone());
            Ok(())
        }
    }

    type TestPipeline = Pipeline<Orders, MemoryStore, MemoryPublisher, MemoryOperations>;

    fn pipeline() -> TestPipeline {
        Pipeline::new(MemoryStore::default(), MemoryPublisher::default(), MemoryOperations::default())
    }

    fn submit(id: &str) -> IncomingCommand {
        let event = CloudEvent::from_json(json!({
            "specversion": "1.0", "id": id, "source": "/acme/shop", "type": "com.example.orders.SubmitOrder",
            "data": {"order_id": "o1", "customer_id": "c1", "currency": "EUR", "lines": [{"sku": "a", "quantity": 1, "unit_price_cents": 10}]}
        }))
        .unwrap();
        IncomingCommand {
            tenant: "acme".into(),
            operation_id: format!("op-{id}"),
            event,
            attempt: 1,
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn a_command_is_stored_published_and_recorded_in_that_order() {
        let p = pipeline();
        assert_eq!(p.handle(&submit("1")).await, Outcome::Succeeded);
        assert_eq!(p.store.events.lock().unwrap().len(), 1);
        assert_eq!(p.publisher.published.lock().unwrap().len(), 1);
        let statuses = p.operations.statuses.lock().unwrap();
        assert!(
            matches!(statuses.as_slice(), [Status::Processing { attempt: 1 }, Status::Succeeded(positions)] if positions.len() == 1)
        );
    }

    #[tokio::test]
    async fn a_redelivered_command_is_not_decided_twice() {
        let p = pipeline();
        p.handle(&submit("1")).await;
        // Redelivery after the operation was recorded: nothing happens.
        assert_eq!(p.handle(&submit("1")).await, Outcome::AlreadyDone);
        assert_eq!(p.store.events.lock().unwrap().len(), 1);
        assert_eq!(p.publisher.published.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_kafka_failure_after_the_append_retries_and_republishes_the_stored_events() {
        let p = pipeline();
        *p.publisher.fail.lock().unwrap() = true;
        assert!(matches!(p.handle(&submit("1")).await, Outcome::RetryAppended(_)));
        assert_eq!(p.store.events.lock().unwrap().len(), 1, "appended before the publish failed");
        *p.publisher.fail.lock().unwrap() = false;
        assert_eq!(p.handle(&submit("1")).await, Outcome::Succeeded);
        assert_eq!(p.store.events.lock().unwrap().len(), 1, "found by its command key, not appended again");
        let published = p.publisher.published.lock().unwrap();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0], p.store.events.lock().unwrap()[0].event_id);
    }

    #[tokio::test]
    async fn conflicts_reload_and_decide_again_a_bounded_number_of_times() {
        let p = pipeline();
        *p.store.conflicts.lock().unwrap() = 2;
        assert_eq!(p.handle(&submit("1")).await, Outcome::Succeeded);
        assert_eq!(p.store.events.lock().unwrap().len(), 1);
        let busy = pipeline();
        *busy.store.conflicts.lock().unwrap() = MAX_CONFLICT_RETRIES + 1;
        assert!(matches!(busy.handle(&submit("1")).await, Outcome::Retry(reason) if reason.contains("kept changing")));
        assert!(busy.store.events.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_earlier_event_still_waiting_for_kafka_is_produced_before_a_later_one() {
        let p = pipeline();
        *p.publisher.fail.lock().unwrap() = true;
        assert!(matches!(p.handle(&submit("1")).await, Outcome::RetryAppended(_)), "v1 stored, not produced");
        *p.publisher.fail.lock().unwrap() = false;
        let ship = CloudEvent::from_json(json!({
            "specversion": "1.0", "id": "ship", "source": "/acme/shop", "type": "com.example.orders.ShipOrder",
            "data": {"order_id": "o1", "carrier": "ups", "tracking_number": "1Z"}
        }))
        .unwrap();
        let ship = IncomingCommand {
            tenant: "acme".into(),
            operation_id: "op-ship".into(),
            event: ship,
            attempt: 1,
            traceparent: None,
        };
        assert_eq!(p.handle(&ship).await, Outcome::Succeeded);
        let stored: Vec<String> = p.store.events.lock().unwrap().iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(*p.publisher.published.lock().unwrap(), stored, "Kafka sees the stream in version order");
        assert!(p.store.events.lock().unwrap().iter().all(|e| e.produced));
    }

    #[tokio::test]
    async fn a_business_rejection_is_recorded_and_acked() {
        let p = pipeline();
        p.handle(&submit("1")).await;
        let again = IncomingCommand { operation_id: "op-2".into(), ..submit("2") };
        p.operations.statuses.lock().unwrap().clear();
        assert_eq!(p.handle(&again).await, Outcome::Rejected("order was already submitted".into()));
        assert!(matches!(p.operations.statuses.lock().unwrap().last(), Some(Status::Rejected(_))));
    }

    #[tokio::test]
    async fn a_payload_that_does_not_fit_its_type_is_dead_lettered() {
        let p = pipeline();
        let mut cmd = submit("1");
        cmd.event.data = Some(json!({"order_id": 5}));
        assert!(matches!(p.handle(&cmd).await, Outcome::DeadLetter { class: "malformed_command", .. }));
    }
}
