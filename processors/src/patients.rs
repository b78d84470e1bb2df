//! The demo context `patients`: a patient is enrolled once; an assessment is
//! scheduled for an enrolled patient; reminders and the escalation concern a
//! scheduled assessment that is not completed yet; a completed onboarding
//! takes no more reminders and no escalation.

use serde_json::Value;
use sluice_schemas::patients::{
    self as contract, AssessmentCompleted, AssessmentScheduled, CompleteAssessment, EnrollPatient, EscalateToCareTeam,
    EscalatedToCareTeam, PatientEnrolled, PatientEvent, ReminderSent, ScheduleAssessment, SendReminder,
};

use crate::domain::{Aggregate, DomainEvent, Malformed, Rejection, Stamp};

pub struct Patients;

pub enum PatientCommand {
    Enroll(EnrollPatient),
    Schedule(ScheduleAssessment),
    Complete(CompleteAssessment),
    Remind(SendReminder),
    Escalate(EscalateToCareTeam),
}

/// Where a patient's onboarding stands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum PatientState {
    #[default]
    New,
    Enrolled,
    /// An assessment is pending; `reminders` were sent for it.
    Scheduled {
        assessment_id: String,
        reminders: i32,
        escalated: bool,
    },
    Completed,
}

impl DomainEvent for PatientEvent {
    fn event_type(&self) -> &'static str {
        PatientEvent::event_type(self)
    }
    fn version(&self) -> i64 {
        self.meta().version
    }
    fn event_id(&self) -> &str {
        self.meta().event_id
    }
    fn to_json(&self) -> Value {
        PatientEvent::to_json(self)
    }
    fn from_json(event_type: &str, json: Value) -> Result<Self, Malformed> {
        PatientEvent::from_json(event_type, json).map_err(|e| Malformed(e.0))
    }
    fn to_avro(&self) -> apache_avro::types::Value {
        PatientEvent::to_avro(self)
    }
}

impl Aggregate for Patients {
    const CONTEXT: &'static str = contract::CONTEXT;
    type State = PatientState;
    type Command = PatientCommand;
    type Event = PatientEvent;

    fn parse(ty: &str, data: Value) -> Result<PatientCommand, Malformed> {
        let bad = |e: serde_json::Error| Malformed(format!("{ty}: {e}"));
        match ty {
            contract::ENROLL_PATIENT => serde_json::from_value(data).map(PatientCommand::Enroll).map_err(bad),
            contract::SCHEDULE_ASSESSMENT => serde_json::from_value(data).map(PatientCommand::Schedule).map_err(bad),
            contract::COMPLETE_ASSESSMENT => serde_json::from_value(data).map(PatientCommand::Complete).map_err(bad),
            contract::SEND_REMINDER => serde_json::from_value(data).map(PatientCommand::Remind).map_err(bad),
            contract::ESCALATE_TO_CARE_TEAM => serde_json::from_value(data).map(PatientCommand::Escalate).map_err(bad),
            other => Err(Malformed(format!("patients does not handle {other}"))),
        }
    }

    fn stream_id(command: &PatientCommand) -> &str {
        match command {
            PatientCommand::Enroll(c) => &c.patient_id,
            PatientCommand::Schedule(c) => &c.patient_id,
            PatientCommand::Complete(c) => &c.patient_id,
            PatientCommand::Remind(c) => &c.patient_id,
            PatientCommand::Escalate(c) => &c.patient_id,
        }
    }

    fn decide(state: &PatientState, command: PatientCommand, stamp: &Stamp) -> Result<Vec<PatientEvent>, Rejection> {
        let reject = |why: &str| Err(Rejection(why.to_owned()));
        let (event_id, version, occurred_at) = (stamp.event_id(0), stamp.version(0), stamp.now_ms);
        let event = match (state, command) {
            (PatientState::New, PatientCommand::Enroll(c)) => PatientEvent::Enrolled(PatientEnrolled {
                event_id,
                patient_id: c.patient_id,
                version,
                occurred_at,
                name: c.name,
            }),
            (_, PatientCommand::Enroll(_)) => return reject("patient is already enrolled"),
            (PatientState::New, _) => return reject("patient is not enrolled"),
            (PatientState::Completed, _) => return reject("onboarding is already completed"),
            (PatientState::Enrolled, PatientCommand::Schedule(c)) => {
                PatientEvent::AssessmentScheduled(AssessmentScheduled {
                    event_id,
                    patient_id: c.patient_id,
                    version,
                    occurred_at,
                    assessment_id: c.assessment_id,
                })
            }
            (PatientState::Enrolled, _) => return reject("no assessment is scheduled"),
            (PatientState::Scheduled { .. }, PatientCommand::Schedule(_)) => {
                return reject("an assessment is already scheduled")
            }
            (PatientState::Scheduled { assessment_id, .. }, PatientCommand::Complete(c))
                if *assessment_id == c.assessment_id =>
            {
                PatientEvent::AssessmentCompleted(AssessmentCompleted {
                    event_id,
                    patient_id: c.patient_id,
                    version,
                    occurred_at,
                    assessment_id: c.assessment_id,
                    score: c.score,
                })
            }
            (PatientState::Scheduled { assessment_id, reminders, .. }, PatientCommand::Remind(c))
                if *assessment_id == c.assessment_id =>
            {
                if c.reminder != reminders + 1 {
                    return reject(&format!("reminder {} is not the next one ({})", c.reminder, reminders + 1));
                }
                PatientEvent::ReminderSent(ReminderSent {
                    event_id,
                    patient_id: c.patient_id,
                    version,
                    occurred_at,
                    assessment_id: c.assessment_id,
                    reminder: c.reminder,
                })
            }
            (PatientState::Scheduled { .. }, PatientCommand::Complete(_) | PatientCommand::Remind(_)) => {
                return reject("not the scheduled assessment")
            }
            (PatientState::Scheduled { escalated: true, .. }, PatientCommand::Escalate(_)) => {
                return reject("already escalated to the care team")
            }
            (PatientState::Scheduled { .. }, PatientCommand::Escalate(c)) => {
                PatientEvent::Escalated(EscalatedToCareTeam {
                    event_id,
                    patient_id: c.patient_id,
                    version,
                    occurred_at,
                    reason: c.reason,
                })
            }
        };
        Ok(vec![event])
    }

    fn evolve(state: PatientState, event: &PatientEvent) -> PatientState {
        match (state, event) {
            (_, PatientEvent::Enrolled(_)) => PatientState::Enrolled,
            (_, PatientEvent::AssessmentScheduled(e)) => {
                PatientState::Scheduled { assessment_id: e.assessment_id.clone(), reminders: 0, escalated: false }
            }
            (_, PatientEvent::AssessmentCompleted(_)) => PatientState::Completed,
            (PatientState::Scheduled { assessment_id, escalated, .. }, PatientEvent::ReminderSent(e)) => {
                PatientState::Scheduled { assessment_id, reminders: e.reminder, escalated }
            }
            (PatientState::Scheduled { assessment_id, reminders, .. }, PatientEvent::Escalated(_)) => {
                PatientState::Scheduled { assessment_id, reminders, escalated: true }
            }
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamp(history: &[PatientEvent]) -> Stamp {
        Stamp { next_version: history.len() as i64 + 1, now_ms: 1_000, id_seed: "cmd".into() }
    }

    /// Given the events, when the command arrives, then these events or this rejection.
    fn given_when(history: &[PatientEvent], ty: &str, data: Value) -> Result<Vec<PatientEvent>, Rejection> {
        let state = history.iter().fold(PatientState::default(), Patients::evolve);
        Patients::decide(&state, Patients::parse(ty, data).unwrap(), &stamp(history))
    }

    fn then(history: &mut Vec<PatientEvent>, ty: &str, data: Value) {
        let events = given_when(history, ty, data).unwrap();
        history.extend(events);
    }

    fn scheduled() -> Vec<PatientEvent> {
        let mut history = Vec::new();
        then(&mut history, contract::ENROLL_PATIENT, json!({"patient_id": "p1", "name": "Ada"}));
        then(&mut history, contract::SCHEDULE_ASSESSMENT, json!({"patient_id": "p1", "assessment_id": "intake"}));
        history
    }

    fn remind(n: i32) -> Value {
        json!({"patient_id": "p1", "assessment_id": "intake", "reminder": n})
    }

    #[test]
    fn enrolling_starts_the_stream_and_happens_once() {
        let events = given_when(&[], contract::ENROLL_PATIENT, json!({"patient_id": "p1", "name": "Ada"})).unwrap();
        assert!(matches!(&events[0], PatientEvent::Enrolled(e) if e.version == 1 && e.event_id == "cmd-0"));
        let again = given_when(&events, contract::ENROLL_PATIENT, json!({"patient_id": "p1", "name": "Ada"}));
        assert_eq!(again.unwrap_err().0, "patient is already enrolled");
    }

    #[test]
    fn an_assessment_needs_an_enrolled_patient() {
        let rejection =
            given_when(&[], contract::SCHEDULE_ASSESSMENT, json!({"patient_id": "p1", "assessment_id": "a"}))
                .unwrap_err();
        assert_eq!(rejection.0, "patient is not enrolled");
    }

    #[test]
    fn reminders_are_numbered_in_order_and_each_is_sent_once() {
        let mut history = scheduled();
        then(&mut history, contract::SEND_REMINDER, remind(1));
        assert_eq!(
            given_when(&history, contract::SEND_REMINDER, remind(1)).unwrap_err().0,
            "reminder 1 is not the next one (2)"
        );
        assert_eq!(
            given_when(&history, contract::SEND_REMINDER, remind(3)).unwrap_err().0,
            "reminder 3 is not the next one (2)"
        );
        then(&mut history, contract::SEND_REMINDER, remind(2));
        assert_eq!(history.len(), 4);
    }

    #[test]
    fn a_completed_onboarding_takes_no_reminder_nor_escalation() {
        let mut history = scheduled();
        then(
            &mut history,
            contract::COMPLETE_ASSESSMENT,
            json!({"patient_id": "p1", "assessment_id": "intake", "score": 80}),
        );
        assert_eq!(
            given_when(&history, contract::SEND_REMINDER, remind(1)).unwrap_err().0,
            "onboarding is already completed"
        );
        let escalate = json!({"patient_id": "p1", "reason": "no answer"});
        assert_eq!(
            given_when(&history, contract::ESCALATE_TO_CARE_TEAM, escalate).unwrap_err().0,
            "onboarding is already completed"
        );
    }

    #[test]
    fn escalation_happens_once_and_the_patient_may_still_complete() {
        let mut history = scheduled();
        then(&mut history, contract::ESCALATE_TO_CARE_TEAM, json!({"patient_id": "p1", "reason": "no answer"}));
        let again = given_when(&history, contract::ESCALATE_TO_CARE_TEAM, json!({"patient_id": "p1", "reason": "x"}));
        assert_eq!(again.unwrap_err().0, "already escalated to the care team");
        then(
            &mut history,
            contract::COMPLETE_ASSESSMENT,
            json!({"patient_id": "p1", "assessment_id": "intake", "score": 1}),
        );
        assert!(matches!(history.last(), Some(PatientEvent::AssessmentCompleted(_))));
    }

    #[test]
    fn only_the_scheduled_assessment_can_be_completed() {
        let history = scheduled();
        let other = json!({"patient_id": "p1", "assessment_id": "other", "score": 1});
        assert_eq!(
            given_when(&history, contract::COMPLETE_ASSESSMENT, other).unwrap_err().0,
            "not the scheduled assessment"
        );
    }
}
