//! The patients projection: each patient event becomes one step of the
//! patient's onboarding history (table `patient_onboarding_steps`, keyed by
//! the event's stream version, so a repeated or replayed event rewrites its
//! own row). The onboarding status is folded from the steps on read.
//!
//! - [`step_of`] / [`view_of`]: pure, event → row and rows → view.
//! - [`PatientsProjector`]: its consumer group (offsets committed only after
//!   the row is written).
//! - [`read_onboarding`]: the query the edge serves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::apply::OffsetTracker;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use serde::Serialize;
use sluice_schemas::codec::EventCodec;
use sluice_schemas::patients::PatientEvent;
use sluice_streams::batch::{self, BatchConfig};
use sluice_streams::consumer::subscribe;
use sluice_streams::dead_letter::DeadLetters;
use sluice_streams::settle::{settle_record, Settled};
use sluice_streams::{decode_record, ApplyError};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::store::{rm_err, ReadModelError};

/// One step of an onboarding, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub version: i64,
    #[serde(skip)]
    pub event_id: String,
    /// `enrolled`, `assessment_scheduled`, `reminder_sent`, `escalated`, `assessment_completed`.
    pub step: String,
    pub detail: String,
    #[serde(skip)]
    pub occurred_at_ms: i64,
    /// RFC 3339.
    pub at: String,
}

/// A patient's onboarding as clients read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnboardingView {
    pub patient_id: String,
    /// `enrolled`, `awaiting_assessment`, `escalated` or `completed`.
    pub status: String,
    pub reminders_sent: i64,
    pub escalated: bool,
    pub version: i64,
    pub steps: Vec<Step>,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_default()
}

/// The history row of one event.
pub fn step_of(event: &PatientEvent) -> Step {
    let (step, detail) = match event {
        PatientEvent::Enrolled(e) => ("enrolled", e.name.clone()),
        PatientEvent::AssessmentScheduled(e) => ("assessment_scheduled", e.assessment_id.clone()),
        PatientEvent::ReminderSent(e) => ("reminder_sent", format!("reminder {} for {}", e.reminder, e.assessment_id)),
        PatientEvent::Escalated(e) => ("escalated", e.reason.clone()),
        PatientEvent::AssessmentCompleted(e) => {
            ("assessment_completed", format!("{} scored {}", e.assessment_id, e.score))
        }
    };
    let meta = event.meta();
    Step {
        version: meta.version,
        event_id: meta.event_id.to_owned(),
        step: step.into(),
        detail,
        occurred_at_ms: meta.occurred_at,
        at: rfc3339(meta.occurred_at),
    }
}

/// The onboarding of `patient_id` from its steps (any order); `None` before
/// its enrolment was projected.
pub fn view_of(patient_id: &str, mut steps: Vec<Step>) -> Option<OnboardingView> {
    steps.sort_by_key(|s| s.version);
    if !steps.iter().any(|s| s.step == "enrolled") {
        return None;
    }
    let has = |name: &str| steps.iter().any(|s| s.step == name);
    let escalated = has("escalated");
    let status = if has("assessment_completed") {
        "completed"
    } else if escalated {
        "escalated"
    } else if has("assessment_scheduled") {
        "awaiting_assessment"
    } else {
        "enrolled"
    };
    Some(OnboardingView {
        patient_id: patient_id.to_owned(),
        status: status.into(),
        reminders_sent: steps.iter().filter(|s| s.step == "reminder_sent").count() as i64,
        escalated,
        version: steps.last().map_or(0, |s| s.version),
        steps,
    })
}

/// Reads a patient's onboarding.
pub async fn read_onboarding(
    session: &Session,
    tenant: &str,
    patient_id: &str,
) -> Result<Option<OnboardingView>, ReadModelError> {
    let rows = session
        .query_unpaged(
            "SELECT version, event_id, step, detail, occurred_at FROM patient_onboarding_steps WHERE tenant = ? AND patient_id = ?",
            (tenant, patient_id),
        )
        .await
        .map_err(rm_err)?
        .into_rows_result()
        .map_err(rm_err)?;
    let steps = rows
        .rows::<(i64, Option<String>, Option<String>, Option<String>, Option<CqlTimestamp>)>()
        .map_err(rm_err)?
        .map(|r| {
            r.map(|(version, event_id, step, detail, at)| {
                let ms = at.map_or(0, |t| t.0);
                Step {
                    version,
                    event_id: event_id.unwrap_or_default(),
                    step: step.unwrap_or_default(),
                    detail: detail.unwrap_or_default(),
                    occurred_at_ms: ms,
                    at: rfc3339(ms),
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(rm_err)?;
    Ok(view_of(patient_id, steps))
}

/// The projection's name: its dead-letter topics, parked keys and applied
/// offsets.
pub const PROJECTION: &str = "patients";

/// How often applied offsets are written beside the rows.
const OFFSET_FLUSH_MS: u64 = 200;

/// The patients projection's consumer group, beside the orders projection's.
pub fn group_id(config: &crate::ProjectorConfig) -> String {
    format!("{}.{}.{PROJECTION}", config.group_prefix, config.name)
}

/// The live patients projection.
pub struct PatientsProjector {
    pub brokers: String,
    pub registry_url: String,
    /// Its consumer group.
    pub group: String,
    /// The `patients` events topics of every tenant.
    pub topics: Vec<String>,
    pub session: Arc<Session>,
}

impl PatientsProjector {
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ReadModelError> {
        let writer = self.writer(false).await?;
        let consumer = subscribe(&self.brokers, &self.group, &self.topics, &writer.dead_letters)?;
        info!(group = %self.group, "patients projection running");
        let settle = StepSettling::new(&writer, &shutdown);
        // Applied offsets beside the rows, for read-your-writes
        // (`GET /operations/{id}` says when the patients read model caught up).
        let offsets = Arc::new(OffsetTracker::new(self.session.clone(), PROJECTION, 1));
        let stop = shutdown.child_token();
        let flusher = tokio::spawn(crate::runner::flush_offsets(offsets.clone(), OFFSET_FLUSH_MS, stop.clone()));
        let lag = tokio::spawn(sluice_streams::lag::report_until(
            self.brokers.clone(),
            self.group.clone(),
            self.topics.clone(),
            PROJECTION.into(),
            stop.clone(),
        ));
        let note = |next: &[(String, i32, i64)]| {
            for (topic, partition, offset) in next {
                offsets.applied(topic, *partition, offset - 1);
            }
        };
        batch::consume(&consumer, &BatchConfig::default(), &shutdown, &settle, note).await;
        stop.cancel();
        let _ = flusher.await;
        lag.abort();
        let _ = offsets.flush().await;
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        Ok(())
    }

    async fn prepare_insert(&self) -> Result<PreparedStatement, ReadModelError> {
        self.session
            .prepare(
                "INSERT INTO patient_onboarding_steps (tenant, patient_id, version, event_id, step, detail, occurred_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .await
            .map_err(rm_err)
    }

    /// The projection's writes: live and replays with parking, `sluice dlt
    /// replay` (`replaying`) without (it applies the parked keys' records).
    pub async fn writer(&self, replaying: bool) -> Result<StepWriter<'_>, ReadModelError> {
        let dead_letters = DeadLetters::new(&self.brokers, self.session.clone(), PROJECTION, 1).await?;
        Ok(StepWriter {
            projector: self,
            codec: EventCodec::new(&self.registry_url).map_err(rm_err)?,
            dead_letters: if replaying { dead_letters.replaying() } else { dead_letters },
            insert: self.prepare_insert().await?,
        })
    }

    /// Writes the step of one record; poison (undecodable, not a patient
    /// event, a key parked behind one) is for the dead-letter topic.
    async fn write(
        &self,
        codec: &EventCodec,
        dead_letters: &DeadLetters,
        insert: &PreparedStatement,
        tenant: &str,
        message: &OwnedMessage,
    ) -> Result<(), ApplyError> {
        let poison = |class, reason: String| ApplyError::Poison { class, reason };
        let (name, value) = decode_record(codec, dead_letters, message).await?;
        let event = PatientEvent::from_avro(&name, &value).map_err(|e| poison("unknown_event", e.0))?;
        let step = step_of(&event);
        let values = (
            tenant,
            event.meta().patient_id,
            step.version,
            step.event_id.as_str(),
            step.step.as_str(),
            step.detail.as_str(),
            CqlTimestamp(step.occurred_at_ms),
        );
        self.session.execute_unpaged(insert, values).await.map(drop).map_err(|e| ApplyError::Transient(e.to_string()))
    }
}

/// One record's step written to the patients read model.
pub struct StepWriter<'p> {
    projector: &'p PatientsProjector,
    codec: EventCodec,
    dead_letters: DeadLetters,
    insert: PreparedStatement,
}

impl StepWriter<'_> {
    /// The writer of a replay of `topics`: what the dead-letter topics
    /// already hold is not copied there again.
    pub async fn replaying_log(self, brokers: &str, topics: &[String]) -> Result<Self, ReadModelError> {
        let dead_letters = self.dead_letters.replaying_log(brokers, topics).await?;
        Ok(Self { dead_letters, ..self })
    }

    pub async fn apply(&self, message: &OwnedMessage) -> Result<(), ApplyError> {
        let tenant = crate::apply::tenant_of(message.topic()).unwrap_or_default();
        self.projector.write(&self.codec, &self.dead_letters, &self.insert, tenant, message).await
    }
}

/// Records written as steps (retried while transient, dead-lettered when
/// poison) until `stop`, counted.
pub struct StepSettling<'w> {
    writer: &'w StepWriter<'w>,
    stop: &'w CancellationToken,
    pub applied: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl<'w> StepSettling<'w> {
    pub fn new(writer: &'w StepWriter<'w>, stop: &'w CancellationToken) -> Self {
        Self { writer, stop, applied: AtomicU64::new(0), dead_lettered: AtomicU64::new(0) }
    }
}

impl batch::Settle for StepSettling<'_> {
    fn settle<'a>(&'a self, message: &'a OwnedMessage) -> futures::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            match settle_record(&self.writer.dead_letters, message, self.stop, || self.writer.apply(message)).await {
                Some(Settled::Applied(())) => self.applied.fetch_add(1, Ordering::Relaxed),
                Some(Settled::DeadLettered { .. }) => self.dead_lettered.fetch_add(1, Ordering::Relaxed),
                None => return false,
            };
            true
        })
    }
}

impl batch::SettleBatch for StepSettling<'_> {
    fn settle_batch<'a>(
        &'a self,
        records: &'a [OwnedMessage],
        max_keys_in_flight: usize,
    ) -> futures::future::BoxFuture<'a, bool> {
        Box::pin(batch::settle(records, max_keys_in_flight, self))
    }
}

impl crate::replay::Counted for StepSettling<'_> {
    fn counts(&self) -> (u64, u64) {
        (self.applied.load(Ordering::Relaxed), self.dead_lettered.load(Ordering::Relaxed))
    }

    /// One step row per event applied.
    fn rows(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use sluice_schemas::patients::{AssessmentCompleted, PatientEnrolled, ReminderSent};

    use super::*;

    #[test]
    fn the_status_follows_the_steps_whatever_order_they_are_read_in() {
        let enrolled = PatientEvent::Enrolled(PatientEnrolled {
            event_id: "e1".into(),
            patient_id: "p".into(),
            version: 1,
            occurred_at: 0,
            name: "Ada".into(),
        });
        let reminder = PatientEvent::ReminderSent(ReminderSent {
            event_id: "e3".into(),
            patient_id: "p".into(),
            version: 3,
            occurred_at: 2,
            assessment_id: "intake".into(),
            reminder: 1,
        });
        let done = PatientEvent::AssessmentCompleted(AssessmentCompleted {
            event_id: "e4".into(),
            patient_id: "p".into(),
            version: 4,
            occurred_at: 3,
            assessment_id: "intake".into(),
            score: 5,
        });
        assert_eq!(view_of("p", vec![step_of(&reminder)]), None, "nothing to show before the enrolment");
        let view = view_of("p", vec![step_of(&done), step_of(&enrolled), step_of(&reminder)]).unwrap();
        assert_eq!((view.status.as_str(), view.reminders_sent, view.version), ("completed", 1, 4));
        assert_eq!(
            view.steps.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
            ["enrolled", "reminder_sent", "assessment_completed"]
        );
    }
}
