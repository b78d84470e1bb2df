//! The patients projection: each patient event becomes one step of the
//! patient's onboarding history (table `onboarding_steps`, keyed by the
//! event's stream version, so a repeated or replayed event rewrites its own
//! row). The onboarding status is folded from the steps on read.
//!
//! - [`step_of`] / [`view_of`]: pure, event → row and rows → view.
//! - [`Patients`]: the [`Projection`] (the runtime runs, replays and rebuilds
//!   it like any other).

use serde::Serialize;
use sluice_schemas::codec::{Decoded, EventError};
use sluice_schemas::patients::PatientEvent;

use crate::projection::{Cell, Projection, Table, Write};

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

pub(crate) fn rfc3339(ms: i64) -> String {
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

/// `onboarding_steps`: one row per patient event, keyed by its stream version.
pub const STEPS: &str = "onboarding_steps";

const TABLES: &[Table] = &[Table::Rows {
    name: STEPS,
    columns: &[
        ("patient_id", "text"),
        ("version", "bigint"),
        ("event_id", "text"),
        ("step", "text"),
        ("detail", "text"),
        ("occurred_at", "timestamp"),
    ],
    partition: &["patient_id"],
    clustering: &["version"],
    order: None,
}];

/// The patients projection, under its configured name (`patients` by
/// default): its tables, versions, consumer group, dead-letter topics and
/// parked keys.
#[derive(Debug, Clone)]
pub struct Patients {
    pub name: String,
}

impl Projection for Patients {
    type Event = PatientEvent;
    type Memo = ();

    fn name(&self) -> &str {
        &self.name
    }

    fn context(&self) -> &'static str {
        sluice_schemas::patients::CONTEXT
    }

    fn tables(&self) -> &'static [Table] {
        TABLES
    }

    fn decode(&self, decoded: Decoded<'_>) -> Result<PatientEvent, EventError> {
        PatientEvent::from_decoded(decoded)
    }

    fn writes(&self, event: &PatientEvent, _: Option<&()>) -> Vec<Write> {
        let step = step_of(event);
        let cells = vec![
            ("patient_id", Cell::text(event.meta().patient_id)),
            ("version", Cell::BigInt(step.version)),
            ("event_id", Cell::Text(step.event_id)),
            ("step", Cell::Text(step.step)),
            ("detail", Cell::Text(step.detail)),
            ("occurred_at", Cell::Timestamp(step.occurred_at_ms)),
        ];
        vec![Write::Row { table: STEPS, cells, version: step.version }]
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
