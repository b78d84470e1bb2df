//! Running a process manager: one Kafka consumer group over the followed
//! context's topics, and a poller of due timers, feeding inputs one at a
//! time into [`ProcessRuntime::handle`]:
//!
//! 1. load the process's stream and fold it ([`rebuild`]);
//! 2. carry out any decision recorded but not marked done (a crash
//!    happened between the two), then mark it;
//! 3. an input already in the stream is done: nothing more (replays and
//!    redeliveries send nothing);
//! 4. decide (`react` / `on_timer`, pure), append the decision (LWT on the
//!    next version: a concurrent instance makes us reload and decide again),
//!    carry it out (send commands with confirms, set and cancel timers),
//!    append the `Dispatched` marker.
//!
//! Events come through the streams runtime's lanes (`sluice_streams::lanes`):
//! each process instance's key is a lane of its own, so an instance whose
//! step keeps failing (a command broker down for it, a store error) waits
//! with backoff and holds back only its own later events, never other
//! instances nor the timers, which fire from a loop of their own. A Kafka
//! offset is committed only up to the first event not yet handled; a timer
//! row is deleted only by carrying out the decision that consumed it. A
//! record that cannot be decoded, or whose instance's stream cannot be read
//! (corrupt), goes once to the process's dead-letter topic
//! (`<topic>.<process>.dlt`), and its key's later records follow it there.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use sluice_schemas::codec::EventCodec;
use sluice_streams::batch::Settle;
use sluice_streams::consumer::subscribe;
use sluice_streams::dead_letter::DeadLetters;
use sluice_streams::lanes::{self, LaneConfig};
use sluice_streams::settle::settle_record;
use sluice_streams::{decode_record, ApplyError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::commands::{CommandSender, OutgoingCommand};
use super::record::{rebuild, CorruptStream, Dispatched, Handled, InputRecord, Rebuilt, DISPATCHED, HANDLED};
use super::timers::{TimerRef, TimerStore};
use super::{ProcessManager, Timer, PROCESS_CONTEXT};
use crate::domain::DomainEvent;
use crate::event_store::{Append, EventStore, StoredEvent, StreamRef};

/// Reloads after a conflicting append before giving up for now.
const MAX_CONFLICTS: usize = 10;

/// One input of a process instance.
#[derive(Debug, Clone)]
pub enum Input<E> {
    Event(E),
    Timer(Timer),
}

/// What became of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Decided, recorded and carried out.
    Applied,
    /// Already in the stream: nothing done again.
    AlreadyHandled,
    /// Changes nothing (an event the process ignores, a cancelled timer).
    Ignored,
}

/// Why handling stopped.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A store or broker failed: the input is tried again later (its offset
    /// is not committed, its timer's lease runs out).
    #[error("process step: {0}")]
    Transient(String),
    /// The instance's stream cannot be read: trying again cannot help.
    #[error(transparent)]
    Corrupt(#[from] CorruptStream),
}

fn step_err(e: impl std::fmt::Display) -> StepError {
    StepError::Transient(e.to_string())
}

pub struct ProcessRuntime<M, S, T, C> {
    pub pm: M,
    pub store: S,
    pub timers: T,
    pub sender: C,
}

impl<M, S, T, C> ProcessRuntime<M, S, T, C>
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    /// The process instance's state as folded from its stream.
    pub async fn load(&self, tenant: &str, correlation: &str) -> Result<Rebuilt<M::State>, StepError> {
        let stream_id = format!("{}:{correlation}", M::NAME);
        let stream = StreamRef { tenant, context: PROCESS_CONTEXT, stream_id: &stream_id };
        let records = self.store.load(stream).await.map_err(step_err)?;
        Ok(rebuild(&self.pm, &records)?)
    }

    pub async fn handle(
        &self,
        tenant: &str,
        correlation: &str,
        input: &Input<M::Event>,
    ) -> Result<Handling, StepError> {
        let stream_id = format!("{}:{correlation}", M::NAME);
        let stream = StreamRef { tenant, context: PROCESS_CONTEXT, stream_id: &stream_id };
        let record = match input {
            Input::Event(e) => InputRecord::Event {
                event_id: e.event_id().to_owned(),
                event_type: e.event_type().to_owned(),
                payload: e.to_json(),
            },
            Input::Timer(t) => InputRecord::Timer { timer: t.clone() },
        };
        let key = record.key();
        for _ in 0..MAX_CONFLICTS {
            let records = self.store.load(stream).await.map_err(step_err)?;
            let rebuilt = rebuild(&self.pm, &records)?;
            if let Some((version, handled)) = rebuilt.undispatched.first() {
                info!(tenant, stream_id, version, "carrying out a recorded decision");
                self.carry_out(tenant, correlation, handled).await?;
                self.append(stream, rebuilt.next_version, DISPATCHED, &Dispatched { version: *version }).await?;
                continue;
            }
            if rebuilt.handled.contains(&key) {
                debug!(tenant, stream_id, key, "already handled");
                if let Input::Timer(t) = input {
                    self.timers.cancel(&self.timer_ref(tenant, correlation, t)).await.map_err(step_err)?;
                }
                return Ok(Handling::AlreadyHandled);
            }
            let decision = match input {
                Input::Event(e) => self.pm.react(&rebuilt.state, e),
                Input::Timer(t) => self.pm.on_timer(&rebuilt.state, t),
            };
            if decision.is_noop(&rebuilt.state) {
                if let Input::Timer(t) = input {
                    // A timer the process no longer waits for: just remove it.
                    self.timers.cancel(&self.timer_ref(tenant, correlation, t)).await.map_err(step_err)?;
                }
                return Ok(Handling::Ignored);
            }
            let mut cancel_timers = decision.cancel_timers;
            if let Input::Timer(t) = input {
                // The timer that fired is consumed by this decision.
                cancel_timers.push(t.clone());
            }
            let handled = Handled {
                input: record.clone(),
                commands: decision.commands,
                set_timers: decision.set_timers,
                cancel_timers,
            };
            match self.append(stream, rebuilt.next_version, HANDLED, &handled).await? {
                Append::Conflict => continue,
                Append::Applied => {}
            }
            info!(
                tenant,
                stream_id,
                key,
                commands = handled.commands.len(),
                stage = M::stage(&decision.state),
                "process step"
            );
            self.carry_out(tenant, correlation, &handled).await?;
            // A conflict here means another instance marked it (or moved
            // on): the next input finds whatever is left to do.
            self.append(stream, rebuilt.next_version + 1, DISPATCHED, &Dispatched { version: rebuilt.next_version })
                .await?;
            metrics::counter!("sluice_process_steps_total", "process" => M::NAME).increment(1);
            if let Err(e) = self.timers.record_stage(tenant, M::NAME, correlation, M::stage(&decision.state)).await {
                // Only the ops index: the step itself is done.
                warn!(error = %e, tenant, stream_id, "could not index the process stage");
            }
            return Ok(Handling::Applied);
        }
        Err(StepError::Transient(format!("stream {stream_id} kept changing")))
    }

    fn timer_ref(&self, tenant: &str, correlation: &str, timer: &Timer) -> TimerRef {
        TimerRef {
            tenant: tenant.to_owned(),
            process: M::NAME.to_owned(),
            correlation: correlation.to_owned(),
            timer: timer.clone(),
        }
    }

    /// Sends the commands and sets and cancels the timers of a decision; every
    /// part is idempotent, so doing it again after a crash is safe.
    async fn carry_out(&self, tenant: &str, correlation: &str, handled: &Handled) -> Result<(), StepError> {
        for intent in &handled.commands {
            let command = OutgoingCommand { tenant, process: M::NAME, correlation, intent };
            self.sender.send(command).await.map_err(step_err)?;
        }
        let now = chrono::Utc::now().timestamp_millis();
        for timer in &handled.set_timers {
            self.timers.set(&self.timer_ref(tenant, correlation, timer), now).await.map_err(step_err)?;
        }
        for timer in &handled.cancel_timers {
            self.timers.cancel(&self.timer_ref(tenant, correlation, timer)).await.map_err(step_err)?;
        }
        Ok(())
    }

    async fn append<R: serde::Serialize>(
        &self,
        stream: StreamRef<'_>,
        version: i64,
        ty: &str,
        record: &R,
    ) -> Result<Append, StepError> {
        let now = chrono::Utc::now().timestamp_millis();
        let event = StoredEvent {
            version,
            event_id: format!("{}:{}:{version}", stream.tenant, stream.stream_id),
            event_type: ty.to_owned(),
            payload: serde_json::to_value(record).map_err(step_err)?,
            command_key: String::new(),
            operation_id: String::new(),
            recorded_at_ms: now,
        };
        self.store.append(stream, &[event]).await.map_err(step_err)
    }
}

/// Where and how a process manager runs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub brokers: String,
    pub registry_url: String,
    /// The process's consumer group (its own, beside the projections').
    pub group: String,
    /// The followed context's events topics of every tenant.
    pub topics: Vec<String>,
    pub tenants: Vec<String>,
    pub timer_poll: Duration,
    /// How long a claimed timer is left to its claimer.
    pub timer_lease: Duration,
    /// Name of this instance in timer claims.
    pub instance: String,
    /// Events held at most while instances wait for retries.
    pub lanes: LaneConfig,
}

/// Consumes events and fires timers until `shutdown`, each in a loop of its
/// own.
pub async fn run<M, S, T, C>(
    runtime: Arc<ProcessRuntime<M, S, T, C>>,
    settings: RunSettings,
    dead_letters: DeadLetters,
    shutdown: CancellationToken,
) -> Result<(), StepError>
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    let codec = EventCodec::new(&settings.registry_url).map_err(step_err)?;
    let consumer = subscribe(&settings.brokers, &settings.group, &settings.topics, &dead_letters).map_err(step_err)?;
    info!(process = M::NAME, group = %settings.group, "process manager running");
    let events = EventStep { runtime: &runtime, codec: &codec, dead_letters: &dead_letters, stop: &shutdown };
    let lag = sluice_streams::lag::report_until(
        settings.brokers.clone(),
        settings.group.clone(),
        settings.topics.clone(),
        M::NAME.into(),
        shutdown.clone(),
    );
    tokio::join!(
        lanes::consume(&consumer, &settings.lanes, &shutdown, &events),
        fire_timers_until(&runtime, &settings, &shutdown),
        lag,
    );
    sluice_streams::consumer::close(consumer, M::NAME).await;
    Ok(())
}

/// One event record of the followed context, handled for good: applied,
/// ignored, or dead-lettered (undecodable, parked key, corrupt instance
/// stream), transient failures retried until `stop`.
struct EventStep<'r, M, S, T, C> {
    runtime: &'r ProcessRuntime<M, S, T, C>,
    codec: &'r EventCodec,
    dead_letters: &'r DeadLetters,
    stop: &'r CancellationToken,
}

impl<M, S, T, C> Settle for EventStep<'_, M, S, T, C>
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    fn settle<'a>(&'a self, record: &'a OwnedMessage) -> BoxFuture<'a, bool> {
        Box::pin(
            async move { settle_record(self.dead_letters, record, self.stop, || self.step(record)).await.is_some() },
        )
    }
}

impl<M, S, T, C> EventStep<'_, M, S, T, C>
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    async fn step(&self, record: &OwnedMessage) -> Result<Handling, ApplyError> {
        handle_record(self.runtime, self.codec, self.dead_letters, record).await
    }
}

/// Handles one event record once: decoded (a parked key or an undecodable
/// record is poison), the process's event found in it (others are
/// ignored), and handed to its instance; a corrupt instance stream is
/// poison too. Also what `sluice dlt replay` applies dead letters with.
pub async fn handle_record<M, S, T, C>(
    runtime: &ProcessRuntime<M, S, T, C>,
    codec: &EventCodec,
    dead_letters: &DeadLetters,
    record: &impl Message,
) -> Result<Handling, ApplyError>
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    let Some((tenant, _)) = sluice_schemas::names::parse_events_topic(record.topic()) else {
        return Ok(Handling::Ignored);
    };
    let decoded = decode_record(codec, dead_letters, record).await?;
    // Events of the context that the process does not follow pass by.
    let Some(event) = M::from_decoded(decoded)? else { return Ok(Handling::Ignored) };
    let correlation = M::correlation(&event).to_owned();
    runtime.handle(tenant, &correlation, &Input::Event(event)).await.map_err(|e| match e {
        StepError::Transient(reason) => ApplyError::Transient(reason),
        StepError::Corrupt(e) => ApplyError::Poison { class: "corrupt_stream", reason: e.to_string() },
    })
}

/// Timers fired at most at once: a slow step holds back no other timer.
const TIMERS_IN_FLIGHT: usize = 16;

async fn fire_timers_until<M, S, T, C>(
    runtime: &ProcessRuntime<M, S, T, C>,
    settings: &RunSettings,
    stop: &CancellationToken,
) where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    let mut poll = tokio::time::interval(settings.timer_poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = poll.tick() => fire_due_timers(runtime, settings).await,
        }
    }
}

/// Claims and fires the due timers of every tenant; a failure leaves the
/// timer to be claimed again once its lease ran out.
async fn fire_due_timers<M, S, T, C>(runtime: &ProcessRuntime<M, S, T, C>, settings: &RunSettings)
where
    M: ProcessManager,
    S: EventStore,
    T: TimerStore,
    C: CommandSender,
{
    for tenant in &settings.tenants {
        let now = chrono::Utc::now().timestamp_millis();
        let due = match runtime.timers.due(tenant, now, 100).await {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, tenant, "could not read due timers");
                continue;
            }
        };
        let lease_end = now + i64::try_from(settings.timer_lease.as_millis()).unwrap_or(i64::MAX / 2);
        let ours = due.into_iter().filter(|t| t.timer.process == M::NAME);
        futures::stream::iter(ours)
            .for_each_concurrent(TIMERS_IN_FLIGHT, |timer| async move {
                match runtime.timers.claim(&timer, &settings.instance, lease_end).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        warn!(error = %e, "could not claim a timer");
                        return;
                    }
                }
                let t = &timer.timer;
                match runtime.handle(tenant, &t.correlation, &Input::Timer(t.timer.clone())).await {
                    Ok(handling) => {
                        debug!(tenant, correlation = %t.correlation, timer = %t.timer.id, ?handling, "timer fired")
                    }
                    Err(StepError::Corrupt(e)) => {
                        error!(error = %e, tenant, correlation = %t.correlation, timer = %t.timer.id, "timer of a corrupt process stream; tried again after its lease")
                    }
                    Err(e) => {
                        warn!(error = %e, tenant, correlation = %t.correlation, timer = %t.timer.id, "timer step failed; retried after its lease")
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    //! The runtime's rules with in-memory doubles of its three boundaries.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use sluice_schemas::patients::{AssessmentCompleted, AssessmentScheduled, PatientEnrolled, PatientEvent};

    use super::*;
    use crate::event_store::StoreError;
    use crate::process::commands::SendError;
    use crate::process::onboarding::{Onboarding, Stage};
    use crate::process::timers::{DueTimer, TimerError};

    #[derive(Default)]
    struct MemoryStore {
        streams: Mutex<HashMap<String, Vec<StoredEvent>>>,
    }

    impl EventStore for MemoryStore {
        async fn load(&self, s: StreamRef<'_>) -> Result<Vec<StoredEvent>, StoreError> {
            Ok(self
                .streams
                .lock()
                .unwrap()
                .get(&format!("{}/{}/{}", s.tenant, s.context, s.stream_id))
                .cloned()
                .unwrap_or_default())
        }
        async fn append(&self, s: StreamRef<'_>, events: &[StoredEvent]) -> Result<Append, StoreError> {
            let mut streams = self.streams.lock().unwrap();
            let stream = streams.entry(format!("{}/{}/{}", s.tenant, s.context, s.stream_id)).or_default();
            if events.iter().any(|e| stream.iter().any(|s| s.version == e.version)) {
                return Ok(Append::Conflict);
            }
            stream.extend_from_slice(events);
            Ok(Append::Applied)
        }
        async fn write(&self, _: StreamRef<'_>, _: &[StoredEvent]) -> Result<(), StoreError> {
            unreachable!("process managers append")
        }
    }

    #[derive(Default)]
    struct MemoryTimers {
        rows: Mutex<Vec<TimerRef>>,
    }

    impl TimerStore for MemoryTimers {
        async fn set(&self, t: &TimerRef, _: i64) -> Result<(), TimerError> {
            let mut rows = self.rows.lock().unwrap();
            if !rows.contains(t) {
                rows.push(t.clone());
            }
            Ok(())
        }
        async fn cancel(&self, t: &TimerRef) -> Result<(), TimerError> {
            self.rows.lock().unwrap().retain(|r| r != t);
            Ok(())
        }
        async fn due(&self, _: &str, now_ms: i64, _: usize) -> Result<Vec<DueTimer>, TimerError> {
            let rows = self.rows.lock().unwrap();
            Ok(rows
                .iter()
                .filter(|r| r.timer.due_at_ms <= now_ms)
                .map(|r| DueTimer { timer: r.clone(), bucket: 0, claimed_until_ms: 0 })
                .collect())
        }
        async fn claim(&self, _: &DueTimer, _: &str, _: i64) -> Result<bool, TimerError> {
            Ok(true)
        }
        async fn record_stage(&self, _: &str, _: &str, _: &str, _: &str) -> Result<(), TimerError> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct MemorySender {
        /// Command ids sent, in order.
        sent: Mutex<Vec<String>>,
        /// Sends to fail before succeeding again.
        failures: Mutex<usize>,
    }

    impl CommandSender for MemorySender {
        async fn send(&self, command: OutgoingCommand<'_>) -> Result<(), SendError> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(SendError("broker down".into()));
            }
            self.sent.lock().unwrap().push(command.command_id());
            Ok(())
        }
    }

    type Runtime = ProcessRuntime<Onboarding, MemoryStore, MemoryTimers, MemorySender>;

    fn runtime() -> Runtime {
        ProcessRuntime {
            pm: Onboarding { timeout_ms: 1_000, max_reminders: 1 },
            store: MemoryStore::default(),
            timers: MemoryTimers::default(),
            sender: MemorySender::default(),
        }
    }

    fn enrolled() -> Input<PatientEvent> {
        Input::Event(PatientEvent::Enrolled(PatientEnrolled {
            event_id: "e1".into(),
            patient_id: "p1".into(),
            version: 1,
            occurred_at: 0,
            name: "Ada".into(),
        }))
    }

    fn scheduled() -> Input<PatientEvent> {
        Input::Event(PatientEvent::AssessmentScheduled(AssessmentScheduled {
            event_id: "e2".into(),
            patient_id: "p1".into(),
            version: 2,
            occurred_at: 10,
            assessment_id: "intake".into(),
        }))
    }

    fn completed() -> Input<PatientEvent> {
        Input::Event(PatientEvent::AssessmentCompleted(AssessmentCompleted {
            event_id: "e9".into(),
            patient_id: "p1".into(),
            version: 9,
            occurred_at: 20,
            assessment_id: "intake".into(),
            score: 1,
        }))
    }

    fn sent(rt: &Runtime) -> Vec<String> {
        rt.sender.sent.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn an_event_delivered_twice_sends_its_command_once() {
        let rt = runtime();
        assert_eq!(rt.handle("acme", "p1", &enrolled()).await.unwrap(), Handling::Applied);
        assert_eq!(rt.handle("acme", "p1", &enrolled()).await.unwrap(), Handling::AlreadyHandled);
        assert_eq!(sent(&rt), ["onboarding:p1:schedule-assessment"]);
    }

    #[tokio::test]
    async fn a_decision_recorded_but_not_carried_out_is_carried_out_before_anything_else() {
        let rt = runtime();
        *rt.sender.failures.lock().unwrap() = 1;
        assert!(rt.handle("acme", "p1", &enrolled()).await.is_err(), "the send failed after the decision was recorded");
        assert!(sent(&rt).is_empty());
        assert_eq!(rt.load("acme", "p1").await.unwrap().undispatched.len(), 1);
        // The redelivered event finds its decision and carries it out.
        assert_eq!(rt.handle("acme", "p1", &enrolled()).await.unwrap(), Handling::AlreadyHandled);
        assert_eq!(sent(&rt), ["onboarding:p1:schedule-assessment"]);
        assert!(rt.load("acme", "p1").await.unwrap().undispatched.is_empty());
    }

    #[tokio::test]
    async fn timers_fire_once_set_the_next_and_are_cancelled_by_completion() {
        let rt = runtime();
        rt.handle("acme", "p1", &enrolled()).await.unwrap();
        rt.handle("acme", "p1", &scheduled()).await.unwrap();
        let due = rt.timers.due("acme", i64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        let first = Input::Timer(due[0].timer.timer.clone());
        assert_eq!(rt.handle("acme", "p1", &first).await.unwrap(), Handling::Applied);
        assert_eq!(rt.handle("acme", "p1", &first).await.unwrap(), Handling::AlreadyHandled, "a timer fires once");
        let rows = rt.timers.rows.lock().unwrap().clone();
        assert_eq!(
            rows.iter().map(|r| r.timer.id.as_str()).collect::<Vec<_>>(),
            ["timeout-2"],
            "the fired timer went, the next is set"
        );
        rt.handle("acme", "p1", &completed()).await.unwrap();
        assert!(rt.timers.rows.lock().unwrap().is_empty(), "completion cancelled the running timer");
        assert_eq!(sent(&rt), ["onboarding:p1:schedule-assessment", "onboarding:p1:reminder-1"]);
        assert_eq!(rt.load("acme", "p1").await.unwrap().state.stage, Stage::Completed);
    }

    #[tokio::test]
    async fn replaying_every_input_sends_nothing_and_rebuilds_the_same_state() {
        let rt = runtime();
        let inputs = [enrolled(), scheduled(), completed()];
        for input in &inputs {
            rt.handle("acme", "p1", input).await.unwrap();
        }
        let (state, count) = (rt.load("acme", "p1").await.unwrap().state, sent(&rt).len());
        for input in &inputs {
            assert_eq!(rt.handle("acme", "p1", input).await.unwrap(), Handling::AlreadyHandled);
        }
        assert_eq!(sent(&rt).len(), count);
        assert_eq!(rt.load("acme", "p1").await.unwrap().state, state);
    }
}
