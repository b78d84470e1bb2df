//! The demo process of the `patients` context: once a patient is enrolled,
//! schedule the intake assessment; while it is not completed, remind the
//! patient every `timeout` up to `max_reminders` times, then escalate to the
//! care team. A completed assessment (or an escalation) ends the process and
//! cancels its timer.
//!
//! Timers are computed from event times and earlier due times, never from
//! the clock, so folding the same inputs always gives the same state.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_schemas::codec::{Decoded, EventError};
use sluice_schemas::patients::{self as contract, PatientEvent};

use super::{CommandIntent, Decision, ProcessManager, Timer};

/// The assessment every onboarding schedules.
pub const INTAKE: &str = "intake";

pub struct Onboarding {
    /// How long to wait for the assessment before each reminder, and after
    /// the last one before escalating.
    pub timeout_ms: i64,
    pub max_reminders: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    New,
    /// ScheduleAssessment sent, AssessmentScheduled not seen yet.
    Scheduling,
    /// Waiting for AssessmentCompleted, with a timer running.
    AwaitingAssessment,
    Completed,
    Escalated,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnboardingState {
    pub stage: Stage,
    pub patient_id: String,
    pub reminders: u32,
    /// The one running timer, to cancel when the assessment is completed.
    pub timer: Option<Timer>,
}

/// Timer `timeout-n` fires when the n-th wait is over.
fn timeout_timer(n: u32, due_at_ms: i64) -> Timer {
    Timer { id: format!("timeout-{n}"), due_at_ms }
}

fn timeout_number(timer: &Timer) -> Option<u32> {
    timer.id.strip_prefix("timeout-")?.parse().ok()
}

fn command(step: String, ty: &str, data: serde_json::Value) -> CommandIntent {
    CommandIntent { step, context: contract::CONTEXT.into(), ty: ty.into(), data }
}

impl ProcessManager for Onboarding {
    const NAME: &'static str = "onboarding";
    const CONTEXT: &'static str = contract::CONTEXT;
    type State = OnboardingState;
    type Event = PatientEvent;

    fn from_decoded(decoded: Decoded<'_>) -> Result<Option<PatientEvent>, EventError> {
        match PatientEvent::from_decoded(decoded) {
            Ok(event) => Ok(Some(event)),
            Err(EventError::Unknown(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn correlation(event: &PatientEvent) -> &str {
        event.meta().patient_id
    }

    fn react(&self, state: &OnboardingState, event: &PatientEvent) -> Decision<OnboardingState> {
        let mut next = state.clone();
        match (state.stage, event) {
            (Stage::New, PatientEvent::Enrolled(e)) => {
                next.stage = Stage::Scheduling;
                next.patient_id = e.patient_id.clone();
                let data = json!({"patient_id": e.patient_id, "assessment_id": INTAKE});
                Decision {
                    commands: vec![command("schedule-assessment".into(), contract::SCHEDULE_ASSESSMENT, data)],
                    ..Decision::state(next)
                }
            }
            (Stage::New | Stage::Scheduling, PatientEvent::AssessmentScheduled(e)) => {
                let timer = timeout_timer(1, e.occurred_at + self.timeout_ms);
                next.stage = Stage::AwaitingAssessment;
                next.patient_id = e.patient_id.clone();
                next.timer = Some(timer.clone());
                Decision { set_timers: vec![timer], ..Decision::state(next) }
            }
            (stage, PatientEvent::AssessmentCompleted(_)) if stage != Stage::Completed => {
                next.stage = Stage::Completed;
                let cancel: Vec<Timer> = next.timer.take().into_iter().collect();
                Decision { cancel_timers: cancel, ..Decision::state(next) }
            }
            (Stage::AwaitingAssessment | Stage::Scheduling, PatientEvent::Escalated(_)) => {
                // Someone escalated by hand: the process has nothing left to do.
                next.stage = Stage::Escalated;
                let cancel: Vec<Timer> = next.timer.take().into_iter().collect();
                Decision { cancel_timers: cancel, ..Decision::state(next) }
            }
            // Reminders are the process's own doing; enrolments and schedules
            // seen twice change nothing.
            _ => Decision::state(next),
        }
    }

    fn on_timer(&self, state: &OnboardingState, timer: &Timer) -> Decision<OnboardingState> {
        let mut next = state.clone();
        // A timer that is not the running one was cancelled: ignore it.
        if state.stage != Stage::AwaitingAssessment || state.timer.as_ref() != Some(timer) {
            return Decision::state(next);
        }
        let Some(n) = timeout_number(timer) else { return Decision::state(next) };
        let patient_id = state.patient_id.clone();
        if n <= self.max_reminders {
            let following = timeout_timer(n + 1, timer.due_at_ms + self.timeout_ms);
            next.reminders = n;
            next.timer = Some(following.clone());
            let data = json!({"patient_id": patient_id, "assessment_id": INTAKE, "reminder": n});
            Decision {
                commands: vec![command(format!("reminder-{n}"), contract::SEND_REMINDER, data)],
                set_timers: vec![following],
                ..Decision::state(next)
            }
        } else {
            next.stage = Stage::Escalated;
            next.timer = None;
            let reason = format!("assessment {INTAKE} not completed after {} reminders", self.max_reminders);
            let data = json!({"patient_id": patient_id, "reason": reason});
            Decision {
                commands: vec![command("escalate".into(), contract::ESCALATE_TO_CARE_TEAM, data)],
                ..Decision::state(next)
            }
        }
    }

    fn stage(state: &OnboardingState) -> &'static str {
        match state.stage {
            Stage::New => "new",
            Stage::Scheduling => "scheduling",
            Stage::AwaitingAssessment => "awaiting_assessment",
            Stage::Completed => "completed",
            Stage::Escalated => "escalated",
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_schemas::patients::{AssessmentCompleted, AssessmentScheduled, PatientEnrolled};

    use super::*;

    const PM: Onboarding = Onboarding { timeout_ms: 1_000, max_reminders: 2 };

    fn enrolled() -> PatientEvent {
        PatientEvent::Enrolled(PatientEnrolled {
            event_id: "e1".into(),
            patient_id: "p1".into(),
            version: 1,
            occurred_at: 10,
            name: "Ada".into(),
        })
    }

    fn scheduled() -> PatientEvent {
        PatientEvent::AssessmentScheduled(AssessmentScheduled {
            event_id: "e2".into(),
            patient_id: "p1".into(),
            version: 2,
            occurred_at: 100,
            assessment_id: INTAKE.into(),
        })
    }

    fn completed() -> PatientEvent {
        PatientEvent::AssessmentCompleted(AssessmentCompleted {
            event_id: "e9".into(),
            patient_id: "p1".into(),
            version: 9,
            occurred_at: 5_000,
            assessment_id: INTAKE.into(),
            score: 90,
        })
    }

    /// Given these events, the state the process is in.
    fn given(events: &[PatientEvent]) -> OnboardingState {
        events.iter().fold(OnboardingState::default(), |s, e| PM.react(&s, e).state)
    }

    #[test]
    fn an_enrolment_schedules_the_assessment_once() {
        let d = PM.react(&OnboardingState::default(), &enrolled());
        assert_eq!(d.commands.len(), 1);
        assert_eq!(
            (d.commands[0].step.as_str(), d.commands[0].ty.as_str()),
            ("schedule-assessment", contract::SCHEDULE_ASSESSMENT)
        );
        assert_eq!(d.state.stage, Stage::Scheduling);
        assert!(PM.react(&d.state, &enrolled()).is_noop(&d.state), "a second enrolment event changes nothing");
    }

    #[test]
    fn a_scheduled_assessment_starts_the_first_timeout_from_the_event_time() {
        let d = PM.react(&given(&[enrolled()]), &scheduled());
        assert_eq!(d.set_timers, vec![timeout_timer(1, 1_100)]);
        assert_eq!(d.state.stage, Stage::AwaitingAssessment);
    }

    #[test]
    fn timeouts_remind_up_to_the_limit_then_escalate() {
        let mut state = given(&[enrolled(), scheduled()]);
        let mut steps = Vec::new();
        while let Some(timer) = state.timer.clone() {
            let d = PM.on_timer(&state, &timer);
            steps.extend(d.commands.iter().map(|c| c.step.clone()));
            state = d.state;
        }
        assert_eq!(steps, ["reminder-1", "reminder-2", "escalate"]);
        assert_eq!((state.stage, state.reminders), (Stage::Escalated, 2));
    }

    #[test]
    fn the_next_timeout_counts_from_the_previous_due_time_not_the_clock() {
        let state = given(&[enrolled(), scheduled()]);
        let d = PM.on_timer(&state, &timeout_timer(1, 1_100));
        assert_eq!(d.set_timers, vec![timeout_timer(2, 2_100)]);
    }

    #[test]
    fn completing_the_assessment_cancels_the_running_timer_and_stale_timers_do_nothing() {
        let state = given(&[enrolled(), scheduled()]);
        let reminded = PM.on_timer(&state, &timeout_timer(1, 1_100)).state;
        let d = PM.react(&reminded, &completed());
        assert_eq!(d.cancel_timers, vec![timeout_timer(2, 2_100)]);
        assert_eq!(d.state.stage, Stage::Completed);
        let late = PM.on_timer(&d.state, &timeout_timer(2, 2_100));
        assert!(late.is_noop(&d.state), "a timer that fires after its cancellation sends nothing");
    }

    #[test]
    fn a_timer_that_is_not_the_running_one_is_ignored() {
        let state = given(&[enrolled(), scheduled()]);
        assert!(PM.on_timer(&state, &timeout_timer(1, 999)).is_noop(&state));
        assert!(PM.on_timer(&state, &timeout_timer(2, 1_100)).is_noop(&state));
    }
}
