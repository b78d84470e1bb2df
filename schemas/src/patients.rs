//! Contracts of the demo bounded context `patients` (patient onboarding):
//! command payloads (JSON, validated by the JSON Schemas in
//! `commands/patients/`) and domain events (Avro, schemas in
//! `avro/patients/`). The onboarding process manager reacts to these events
//! and sends these commands.

use serde::{Deserialize, Serialize};

use crate::catalog::{CommandSpec, ContextSpec, EventSpec};
use crate::codec::{Decoded, EventError};
use crate::orders::UnknownEvent;

pub const CONTEXT: &str = "patients";

pub const ENROLL_PATIENT: &str = "com.example.patients.EnrollPatient";
pub const SCHEDULE_ASSESSMENT: &str = "com.example.patients.ScheduleAssessment";
pub const COMPLETE_ASSESSMENT: &str = "com.example.patients.CompleteAssessment";
pub const SEND_REMINDER: &str = "com.example.patients.SendReminder";
pub const ESCALATE_TO_CARE_TEAM: &str = "com.example.patients.EscalateToCareTeam";

pub const PATIENT_ENROLLED: &str = "com.example.patients.PatientEnrolled";
pub const ASSESSMENT_SCHEDULED: &str = "com.example.patients.AssessmentScheduled";
pub const ASSESSMENT_COMPLETED: &str = "com.example.patients.AssessmentCompleted";
pub const REMINDER_SENT: &str = "com.example.patients.ReminderSent";
pub const ESCALATED_TO_CARE_TEAM: &str = "com.example.patients.EscalatedToCareTeam";

pub const SPEC: ContextSpec = ContextSpec {
    name: CONTEXT,
    commands: &[
        CommandSpec {
            ty: ENROLL_PATIENT,
            schema: include_str!("../commands/patients/EnrollPatient.json"),
            stream_key: "/patient_id",
        },
        CommandSpec {
            ty: SCHEDULE_ASSESSMENT,
            schema: include_str!("../commands/patients/ScheduleAssessment.json"),
            stream_key: "/patient_id",
        },
        CommandSpec {
            ty: COMPLETE_ASSESSMENT,
            schema: include_str!("../commands/patients/CompleteAssessment.json"),
            stream_key: "/patient_id",
        },
        CommandSpec {
            ty: SEND_REMINDER,
            schema: include_str!("../commands/patients/SendReminder.json"),
            stream_key: "/patient_id",
        },
        CommandSpec {
            ty: ESCALATE_TO_CARE_TEAM,
            schema: include_str!("../commands/patients/EscalateToCareTeam.json"),
            stream_key: "/patient_id",
        },
    ],
    events: &[
        EventSpec { ty: PATIENT_ENROLLED, avro: include_str!("../avro/patients/PatientEnrolled.avsc") },
        EventSpec { ty: ASSESSMENT_SCHEDULED, avro: include_str!("../avro/patients/AssessmentScheduled.avsc") },
        EventSpec { ty: ASSESSMENT_COMPLETED, avro: include_str!("../avro/patients/AssessmentCompleted.avsc") },
        EventSpec { ty: REMINDER_SENT, avro: include_str!("../avro/patients/ReminderSent.avsc") },
        EventSpec { ty: ESCALATED_TO_CARE_TEAM, avro: include_str!("../avro/patients/EscalatedToCareTeam.avsc") },
    ],
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollPatient {
    pub patient_id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleAssessment {
    pub patient_id: String,
    pub assessment_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteAssessment {
    pub patient_id: String,
    pub assessment_id: String,
    pub score: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReminder {
    pub patient_id: String,
    pub assessment_id: String,
    pub reminder: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalateToCareTeam {
    pub patient_id: String,
    pub reason: String,
}

// Every event starts with the same four fields as the orders events:
// `event_id`, `patient_id` (the stream), `version` (1-based position in the
// patient's stream) and `occurred_at` (ms since the Unix epoch).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientEnrolled {
    pub event_id: String,
    pub patient_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssessmentScheduled {
    pub event_id: String,
    pub patient_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub assessment_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssessmentCompleted {
    pub event_id: String,
    pub patient_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub assessment_id: String,
    pub score: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderSent {
    pub event_id: String,
    pub patient_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub assessment_id: String,
    pub reminder: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalatedToCareTeam {
    pub event_id: String,
    pub patient_id: String,
    pub version: i64,
    pub occurred_at: i64,
    pub reason: String,
}

/// The fields every patient event carries, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventMeta<'a> {
    pub event_id: &'a str,
    pub patient_id: &'a str,
    pub version: i64,
    pub occurred_at: i64,
}

/// Every event of the patients context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientEvent {
    Enrolled(PatientEnrolled),
    AssessmentScheduled(AssessmentScheduled),
    AssessmentCompleted(AssessmentCompleted),
    ReminderSent(ReminderSent),
    Escalated(EscalatedToCareTeam),
}

/// Runs `$body` with `$e` bound to the inner event, whatever the variant.
macro_rules! each {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            PatientEvent::Enrolled($e) => $body,
            PatientEvent::AssessmentScheduled($e) => $body,
            PatientEvent::AssessmentCompleted($e) => $body,
            PatientEvent::ReminderSent($e) => $body,
            PatientEvent::Escalated($e) => $body,
        }
    };
}

/// Parses an event of type `$ty` with `$parse` (serde_json or Avro).
macro_rules! parse {
    ($ty:expr, $parse:expr) => {{
        let parsed = match $ty {
            PATIENT_ENROLLED => $parse.map(PatientEvent::Enrolled),
            ASSESSMENT_SCHEDULED => $parse.map(PatientEvent::AssessmentScheduled),
            ASSESSMENT_COMPLETED => $parse.map(PatientEvent::AssessmentCompleted),
            REMINDER_SENT => $parse.map(PatientEvent::ReminderSent),
            ESCALATED_TO_CARE_TEAM => $parse.map(PatientEvent::Escalated),
            other => return Err(UnknownEvent(format!("unknown event type {other}"))),
        };
        parsed.map_err(|e| UnknownEvent(format!("{}: {e}", $ty)))
    }};
}

impl PatientEvent {
    pub fn meta(&self) -> EventMeta<'_> {
        each!(self, e => EventMeta { event_id: &e.event_id, patient_id: &e.patient_id, version: e.version, occurred_at: e.occurred_at })
    }

    /// The CloudEvent / Avro full name of the event.
    pub fn event_type(&self) -> &'static str {
        match self {
            PatientEvent::Enrolled(_) => PATIENT_ENROLLED,
            PatientEvent::AssessmentScheduled(_) => ASSESSMENT_SCHEDULED,
            PatientEvent::AssessmentCompleted(_) => ASSESSMENT_COMPLETED,
            PatientEvent::ReminderSent(_) => REMINDER_SENT,
            PatientEvent::Escalated(_) => ESCALATED_TO_CARE_TEAM,
        }
    }

    /// The event as JSON (its Avro record's fields), for the event store.
    pub fn to_json(&self) -> serde_json::Value {
        each!(self, e => serde_json::to_value(e)).expect("patient events always serialize")
    }

    /// Rebuilds an event from its type and JSON fields.
    pub fn from_json(event_type: &str, value: serde_json::Value) -> Result<Self, UnknownEvent> {
        parse!(event_type, serde_json::from_value(value.clone()))
    }

    /// The event as an Avro value of its record schema.
    pub fn to_avro(&self) -> apache_avro::types::Value {
        each!(self, e => apache_avro::to_value(e)).expect("patient events always convert to Avro")
    }

    /// Rebuilds an event from a decoded Avro record and its full name.
    pub fn from_avro(event_type: &str, value: &apache_avro::types::Value) -> Result<Self, UnknownEvent> {
        parse!(event_type, apache_avro::from_value(value))
    }

    /// Rebuilds an event from a record as the codec decoded it (through an
    /// Avro value: patients' events are few, no reader of their own).
    pub fn from_decoded(decoded: Decoded<'_>) -> Result<Self, EventError> {
        let name = decoded.name().to_owned();
        let value = decoded.into_value()?;
        Self::from_avro(&name, &value).map_err(|e| EventError::Unknown(e.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // to/from_avro_datum: the simplest raw round trip, fine in a test
    fn every_event_round_trips_through_avro_and_json() {
        let meta = |n: i64| (format!("e{n}"), "p1".to_owned(), n, 1_700_000_000_000 + n);
        let events = {
            let (event_id, patient_id, version, occurred_at) = meta(1);
            let mut all = vec![PatientEvent::Enrolled(PatientEnrolled {
                event_id,
                patient_id,
                version,
                occurred_at,
                name: "Ada".into(),
            })];
            let (event_id, patient_id, version, occurred_at) = meta(2);
            all.push(PatientEvent::AssessmentScheduled(AssessmentScheduled {
                event_id,
                patient_id,
                version,
                occurred_at,
                assessment_id: "intake".into(),
            }));
            let (event_id, patient_id, version, occurred_at) = meta(3);
            all.push(PatientEvent::ReminderSent(ReminderSent {
                event_id,
                patient_id,
                version,
                occurred_at,
                assessment_id: "intake".into(),
                reminder: 1,
            }));
            let (event_id, patient_id, version, occurred_at) = meta(4);
            all.push(PatientEvent::AssessmentCompleted(AssessmentCompleted {
                event_id,
                patient_id,
                version,
                occurred_at,
                assessment_id: "intake".into(),
                score: 7,
            }));
            let (event_id, patient_id, version, occurred_at) = meta(5);
            all.push(PatientEvent::Escalated(EscalatedToCareTeam {
                event_id,
                patient_id,
                version,
                occurred_at,
                reason: "no answer".into(),
            }));
            all
        };
        for event in events {
            let spec = crate::catalog::event_spec(event.event_type()).unwrap();
            let schema = apache_avro::Schema::parse_str(spec.avro).unwrap();
            let avro = event.to_avro();
            assert!(avro.validate(&schema), "{} fits its schema", event.event_type());
            let bytes = apache_avro::to_avro_datum(&schema, avro).unwrap();
            let back = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
            assert_eq!(PatientEvent::from_avro(event.event_type(), &back).unwrap(), event);
            assert_eq!(PatientEvent::from_json(event.event_type(), event.to_json()).unwrap(), event);
        }
    }
}
