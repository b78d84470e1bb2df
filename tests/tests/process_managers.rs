//! Process managers against the real stack: the patient onboarding process
//! reacts to `patients` events with commands on the normal command path,
//! keeps durable timers in the CQL store, and is rebuilt from its own stream.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sluice_cli::serve::Role;
use sluice_cli::settings::Settings;
use sluice_processors::process::commands::{AmqpCommandSender, CommandSender, OutgoingCommand};
use sluice_processors::process::onboarding::Onboarding;
use sluice_processors::process::{record, CommandIntent, ProcessManager, PROCESS_CONTEXT};
use sluice_schemas::operation_id::OperationIds;
use sluice_tests::{command, cql, eventually, test_settings, Platform, SluiceProcess, TestTenant};

const ENROLL: &str = "com.example.patients.EnrollPatient";
const COMPLETE: &str = "com.example.patients.CompleteAssessment";

fn settings_with(tenant: &TestTenant, timeout_ms: u64, max_reminders: u32) -> Settings {
    let mut settings = test_settings(&[tenant]);
    settings.processor.processes.assessment_timeout_ms = timeout_ms;
    settings.processor.processes.max_reminders = max_reminders;
    settings.processor.processes.timer_poll_ms = 100;
    settings.processor.processes.timer_lease_ms = 2_000;
    settings
}

async fn enroll(platform: &Platform, tenant: &TestTenant, patient: &str) {
    let event = command(tenant, &format!("enroll-{patient}"), ENROLL, json!({"patient_id": patient, "name": "Ada"}));
    let response = platform.post_event(tenant, &event).await;
    assert_eq!(response.status().as_u16(), 202, "{}", response.text().await.unwrap_or_default());
}

async fn complete(platform: &Platform, tenant: &TestTenant, patient: &str) {
    let data = json!({"patient_id": patient, "assessment_id": "intake", "score": 80});
    let response = platform.post_event(tenant, &command(tenant, &format!("complete-{patient}"), COMPLETE, data)).await;
    assert_eq!(response.status().as_u16(), 202);
}

/// The onboarding read model once `done` holds for it.
async fn onboarding_when(
    platform: &Platform,
    tenant: &TestTenant,
    patient: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/patients/{patient}/onboarding");
    eventually(timeout, what, || async {
        let (status, body) = platform.get_json(tenant, &path).await;
        (status == 200 && done(&body)).then_some(body)
    })
    .await
}

fn steps(view: &Value) -> Vec<String> {
    view["steps"].as_array().into_iter().flatten().map(|s| s["step"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Event types of a patient's stream in the event store, in order.
async fn patient_events(tenant: &str, patient: &str) -> Vec<String> {
    let session = cql().await;
    let rows = session
        .query_unpaged(
            "SELECT version, event_type FROM sluice.events WHERE tenant = ? AND context = 'patients' AND stream_id = ?",
            (tenant, patient),
        )
        .await
        .expect("events query")
        .into_rows_result()
        .expect("rows");
    rows.rows::<(i64, String)>()
        .expect("typed")
        .map(|r| r.expect("row").1.rsplit('.').next().unwrap_or_default().to_owned())
        .collect()
}

/// The process's own stream, as the store keeps it.
async fn process_records(tenant: &str, patient: &str) -> Vec<sluice_processors::event_store::StoredEvent> {
    use sluice_processors::event_store::{CqlEventStore, EventStore, StreamRef};
    let store = CqlEventStore::new(sluice_tests::cql_sluice().await).await.expect("event store");
    let stream_id = format!("{}:{patient}", Onboarding::NAME);
    store.load(StreamRef { tenant, context: PROCESS_CONTEXT, stream_id: &stream_id }).await.expect("process stream")
}

/// Steps (command steps) the process decided, in order.
fn decided_steps(records: &[sluice_processors::event_store::StoredEvent]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.event_type == record::HANDLED)
        .flat_map(|r| r.payload["commands"].as_array().cloned().unwrap_or_default())
        .map(|c| c["step"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Timers left for a tenant's onboardings (due, or due within the hour), as
/// `sluice status` counts them.
async fn timers_of(tenant: &str) -> i64 {
    let session = sluice_tests::cql_sluice().await;
    let now = chrono::Utc::now().timestamp_millis();
    let summary = sluice_processors::process::timers::summary(&session, tenant, Onboarding::NAME, now)
        .await
        .expect("timer summary");
    summary.timers_due + summary.timers_pending
}

#[tokio::test]
async fn an_onboarding_runs_to_completion() {
    let tenant = TestTenant::new();
    let settings = settings_with(&tenant, 60_000, 3);
    let platform = Platform::start(settings.clone(), Role::All).await;

    enroll(&platform, &tenant, "p1").await;
    let view = onboarding_when(
        &platform,
        &tenant,
        "p1",
        Duration::from_secs(60),
        "the process to schedule the assessment",
        |v| v["status"] == "awaiting_assessment",
    )
    .await;
    assert_eq!(steps(&view), ["enrolled", "assessment_scheduled"]);
    assert_eq!(timers_of(&tenant.name).await, 1, "the reminder timer is set");

    complete(&platform, &tenant, "p1").await;
    let view = onboarding_when(&platform, &tenant, "p1", Duration::from_secs(60), "the onboarding to complete", |v| {
        v["status"] == "completed"
    })
    .await;
    assert_eq!(steps(&view), ["enrolled", "assessment_scheduled", "assessment_completed"]);
    eventually(Duration::from_secs(10), "the timer to be cancelled", || async {
        (timers_of(&tenant.name).await == 0).then_some(())
    })
    .await;

    assert_eq!(
        patient_events(&tenant.name, "p1").await,
        ["PatientEnrolled", "AssessmentScheduled", "AssessmentCompleted"]
    );
    let records = process_records(&tenant.name, "p1").await;
    assert_eq!(decided_steps(&records), ["schedule-assessment"]);
    let rebuilt = record::rebuild(&Onboarding { timeout_ms: 60_000, max_reminders: 3 }, &records).unwrap();
    assert_eq!(Onboarding::stage(&rebuilt.state), "completed");
    assert!(rebuilt.undispatched.is_empty(), "every decision was carried out");

    // The command the process sent has an operation the tenant can read,
    // signed like the ones the edge hands out.
    let ids = OperationIds::new(&settings.ingest.operation_secret);
    let source = format!("/{}/processes/onboarding", tenant.name);
    let operation = ids.issue(&tenant.name, &source, "onboarding:p1:schedule-assessment");
    let (status, body) = platform.get_json(&tenant, &format!("/operations/{operation}")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("succeeded")), "{body}");
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn records_that_cannot_be_decoded_go_to_the_dead_letter_topics_and_their_patient_waits_behind_them() {
    let tenant = TestTenant::new();
    let settings = settings_with(&tenant, 60_000, 3);
    let platform = Platform::start(settings.clone(), Role::All).await;
    let topic = format!("{}.patients.events", tenant.name);
    // A foreign producer writes garbage for patient p-bad.
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for value in [&b"\xff not avro"[..], &[0, 0, 0][..]] {
        producer.send(FutureRecord::to(&topic).key("p-bad").payload(value), Duration::from_secs(10)).await.unwrap();
    }
    // Then p-bad enrols for real: its events wait behind the poison (parked),
    // while another patient goes through untouched.
    enroll(&platform, &tenant, "p-bad").await;
    enroll(&platform, &tenant, "p-good").await;
    onboarding_when(&platform, &tenant, "p-good", Duration::from_secs(60), "p-good's assessment scheduled", |v| {
        v["status"] == "awaiting_assessment"
    })
    .await;

    // The projection and the process manager each dead-letter what they read:
    // the first poison record with its reason, then everything later of
    // p-bad (the second poison record and the enrolment) as parked.
    for consumer in [settings.projector.patients_name.as_str(), Onboarding::NAME] {
        let dlt = sluice_streams::dead_letter::dead_letter_topic(&topic, consumer);
        let records = eventually(Duration::from_secs(60), "three records dead-lettered", || async {
            let records = sluice_tests::read_topic(&dlt).await;
            (records.len() >= 3).then_some(records)
        })
        .await;
        let classes: Vec<String> = records.iter().map(|m| header(m, "sluice_error_class")).collect();
        assert_eq!(classes, ["undecodable", "parked", "parked"], "{consumer}");
        assert!(records.iter().all(|m| m.key() == Some(&b"p-bad"[..]) && !header(m, "sluice_reason").is_empty()));
    }
    assert_eq!(platform.get_json(&tenant, "/patients/p-bad/onboarding").await.0, 404, "p-bad was not applied");
    assert_eq!(process_records(&tenant.name, "p-bad").await.len(), 0, "nor reacted to");
    platform.stop().await.unwrap();
}

/// A record's header as text.
fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == name))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn an_instance_whose_stream_is_corrupt_is_dead_lettered_once_and_holds_back_no_other_instance_nor_timer() {
    use sluice_processors::event_store::{CqlEventStore, EventStore, StoredEvent, StreamRef};
    let tenant = TestTenant::new();
    let timeout = Duration::from_millis(1_500);
    let platform = Platform::start(settings_with(&tenant, timeout.as_millis() as u64, 10), Role::All).await;
    // A foreign write the process cannot fold: every step of p-corrupt
    // fails, and retrying cannot help.
    let store = CqlEventStore::new(sluice_tests::cql_sluice().await).await.expect("event store");
    let stream_id = format!("{}:p-corrupt", Onboarding::NAME);
    let garbage = StoredEvent {
        version: 1,
        event_id: "garbage".into(),
        event_type: "not.a.process.Record".into(),
        payload: json!({}),
        command_key: String::new(),
        operation_id: String::new(),
        recorded_at_ms: 0,
    };
    let stream = StreamRef { tenant: &tenant.name, context: PROCESS_CONTEXT, stream_id: &stream_id };
    store.append(stream, &[garbage]).await.expect("garbage appended");

    enroll(&platform, &tenant, "p-corrupt").await;
    enroll(&platform, &tenant, "p-good").await;
    // p-good goes through, timers included, while p-corrupt's step failed.
    onboarding_when(&platform, &tenant, "p-good", Duration::from_secs(60), "p-good's first reminder", |v| {
        v["reminders_sent"] == 1
    })
    .await;
    let topic = format!("{}.patients.events", tenant.name);
    let dlt = sluice_streams::dead_letter::dead_letter_topic(&topic, Onboarding::NAME);
    let first = eventually(Duration::from_secs(30), "p-corrupt's enrolment dead-lettered", || async {
        let records = sluice_tests::read_topic(&dlt).await;
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(header(&first[0], "sluice_error_class"), "corrupt_stream");
    assert_eq!(first[0].key(), Some(&b"p-corrupt"[..]));
    // Another reminder of p-good later, p-corrupt's record is still there once.
    let (_, view) = platform.get_json(&tenant, "/patients/p-good/onboarding").await;
    let reminded = view["reminders_sent"].as_i64().unwrap_or_default();
    onboarding_when(&platform, &tenant, "p-good", Duration::from_secs(30), "a later reminder of p-good", |v| {
        v["reminders_sent"].as_i64().unwrap_or_default() > reminded
    })
    .await;
    let records = sluice_tests::read_topic(&dlt).await;
    assert_eq!(
        records.len(),
        1,
        "dead-lettered once, never retried: {:?}",
        records.iter().map(|m| m.offset()).collect::<Vec<_>>()
    );
    assert_eq!(decided_steps(&process_records(&tenant.name, "p-corrupt").await), Vec::<String>::new());

    // The foreign write is removed; `sluice dlt replay` hands the enrolment
    // to the process again, and p-corrupt's onboarding goes on.
    sluice_tests::cql_sluice()
        .await
        .query_unpaged(
            "DELETE FROM events WHERE tenant = ? AND context = ? AND stream_id = ? AND version = 1",
            (&tenant.name, PROCESS_CONTEXT, &stream_id),
        )
        .await
        .expect("garbage removed");
    let settings = settings_with(&tenant, timeout.as_millis() as u64, 10);
    let dlt = sluice_cli::ops::dlt::Dlt::new(settings, sluice_tests::cql_sluice().await);
    let outcome = dlt
        .replay(
            Onboarding::NAME,
            &tenant.name,
            "p-corrupt",
            ("test", "stream repaired"),
            Duration::from_secs(1),
            |_, _| {},
        )
        .await
        .expect("replay");
    assert_eq!((outcome.applied, outcome.unparked), (1, true), "{outcome:?}");
    assert_eq!(decided_steps(&process_records(&tenant.name, "p-corrupt").await), ["schedule-assessment"]);
    onboarding_when(
        &platform,
        &tenant,
        "p-corrupt",
        Duration::from_secs(60),
        "p-corrupt's assessment scheduled",
        |v| v["status"] == "awaiting_assessment",
    )
    .await;
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_lettered_process_step_is_listed_by_sluice_dlq_like_any_other() {
    let tenant = TestTenant::new();
    let settings = settings_with(&tenant, 60_000, 3);
    let platform = Platform::start(settings.clone(), Role::All).await;
    // A step whose command cannot pass its schema (a process with a bug),
    // sent the way the process runtime sends its commands.
    let ids = OperationIds::new(&settings.ingest.operation_secret);
    let sender = AmqpCommandSender::new(settings.amqp_connections(), ids.clone(), settings.amqp.partitions);
    let intent = CommandIntent {
        step: "schedule-assessment".into(),
        context: "patients".into(),
        ty: "com.example.patients.ScheduleAssessment".into(),
        data: json!({"patient_id": 7}),
    };
    let command =
        OutgoingCommand { tenant: &tenant.name, process: Onboarding::NAME, correlation: "p-bug", intent: &intent };
    sender.send(command.clone()).await.expect("queued");

    let operation = command.operation_id(&ids);
    let (status, body) = eventually(Duration::from_secs(60), "the step dead-lettered", || async {
        let (status, body) = platform.get_json(&tenant, &format!("/operations/{operation}")).await;
        (body["status"] == "dead_lettered").then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("patient_id")), "{body}");

    let scope = sluice_cli::ops::dlq::Scope::new(&[], Some(&tenant.name), Some("patients")).expect("scope");
    let listing = sluice_tests::dlq_ops().await.list(&scope, &Default::default()).await.expect("dlq list");
    assert_eq!(listing.matching, 1);
    let letter = &listing.messages[0];
    assert_eq!(letter.message_id.as_deref(), Some(operation.as_str()));
    assert_eq!(letter.source.as_deref(), Some(format!("/{}/processes/onboarding", tenant.name).as_str()));
    assert_eq!(letter.command_id.as_deref(), Some("onboarding:p-bug:schedule-assessment"));
    assert_eq!(letter.error_class, "malformed_command");
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn a_reminder_fires_after_the_timeout_and_stops_once_the_assessment_completes() {
    let tenant = TestTenant::new();
    let timeout = Duration::from_millis(1_500);
    let platform = Platform::start(settings_with(&tenant, timeout.as_millis() as u64, 10), Role::All).await;

    enroll(&platform, &tenant, "p1").await;
    let scheduled =
        onboarding_when(&platform, &tenant, "p1", Duration::from_secs(60), "the assessment to be scheduled", |v| {
            v["status"] == "awaiting_assessment"
        })
        .await;
    let view = onboarding_when(&platform, &tenant, "p1", Duration::from_secs(30), "a first reminder", |v| {
        v["reminders_sent"] == 1
    })
    .await;
    let at = |v: &Value, step: &str| {
        let s = v["steps"].as_array().unwrap().iter().find(|s| s["step"] == step).unwrap()["at"]
            .as_str()
            .unwrap()
            .to_owned();
        chrono::DateTime::parse_from_rfc3339(&s).unwrap()
    };
    let waited = at(&view, "reminder_sent") - at(&scheduled, "assessment_scheduled");
    assert!(waited.num_milliseconds() >= timeout.as_millis() as i64, "reminded after {waited}, before the timeout");

    complete(&platform, &tenant, "p1").await;
    let done = onboarding_when(&platform, &tenant, "p1", Duration::from_secs(30), "the onboarding to complete", |v| {
        v["status"] == "completed"
    })
    .await;
    let reminders = done["reminders_sent"].as_i64().unwrap();
    // Three more timeouts: no reminder may follow the completion.
    tokio::time::sleep(timeout * 3).await;
    let (_, after) = platform.get_json(&tenant, "/patients/p1/onboarding").await;
    assert_eq!(after["reminders_sent"].as_i64().unwrap(), reminders, "reminders stopped: {after}");
    assert_eq!(after["escalated"], false);
    assert_eq!(timers_of(&tenant.name).await, 0, "no timer left");
    let events = patient_events(&tenant.name, "p1").await;
    assert_eq!(events.last().map(String::as_str), Some("AssessmentCompleted"));
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn reminders_run_out_and_the_care_team_is_called() {
    let tenant = TestTenant::new();
    let platform = Platform::start(settings_with(&tenant, 700, 2), Role::All).await;
    enroll(&platform, &tenant, "p1").await;
    let view = onboarding_when(&platform, &tenant, "p1", Duration::from_secs(60), "the escalation", |v| {
        v["status"] == "escalated"
    })
    .await;
    assert_eq!(steps(&view), ["enrolled", "assessment_scheduled", "reminder_sent", "reminder_sent", "escalated"]);
    let records = process_records(&tenant.name, "p1").await;
    assert_eq!(decided_steps(&records), ["schedule-assessment", "reminder-1", "reminder-2", "escalate"]);
    eventually(Duration::from_secs(10), "no timer left", || async {
        (timers_of(&tenant.name).await == 0).then_some(())
    })
    .await;
    platform.stop().await.unwrap();
}

#[tokio::test]
async fn a_process_manager_killed_mid_way_resumes_with_no_step_lost_or_doubled() {
    let tenant = TestTenant::new();
    let settings = settings_with(&tenant, 1_000, 3);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let projector = Platform::start(settings.clone(), Role::Projector).await;
    let mut first = SluiceProcess::spawn(&settings, "processor");

    let patients: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    for p in &patients {
        enroll(&edge, &tenant, p).await;
    }
    // Kill it while the processes are between their first and last steps.
    onboarding_when(&edge, &tenant, "p0", Duration::from_secs(60), "a first reminder", |v| v["reminders_sent"] == 1)
        .await;
    first.kill();
    let started = Instant::now();
    let _second = SluiceProcess::spawn(&settings, "processor");

    for p in &patients {
        let view = onboarding_when(&edge, &tenant, p, Duration::from_secs(90), &format!("{p} to be escalated"), |v| {
            v["status"] == "escalated"
        })
        .await;
        assert_eq!(
            steps(&view),
            ["enrolled", "assessment_scheduled", "reminder_sent", "reminder_sent", "reminder_sent", "escalated"],
            "{p}"
        );
        assert_eq!(
            patient_events(&tenant.name, p).await,
            [
                "PatientEnrolled",
                "AssessmentScheduled",
                "ReminderSent",
                "ReminderSent",
                "ReminderSent",
                "EscalatedToCareTeam"
            ],
            "{p}: every step once in the event store"
        );
        let records = process_records(&tenant.name, p).await;
        assert_eq!(
            decided_steps(&records),
            ["schedule-assessment", "reminder-1", "reminder-2", "reminder-3", "escalate"],
            "{p}"
        );
        let rebuilt = record::rebuild(&Onboarding { timeout_ms: 1_000, max_reminders: 3 }, &records).unwrap();
        assert!(rebuilt.undispatched.is_empty(), "{p}: every decision carried out");
    }
    eprintln!("resumed and finished {:?} after the kill", started.elapsed());
    eventually(Duration::from_secs(10), "no timer left", || async {
        (timers_of(&tenant.name).await == 0).then_some(())
    })
    .await;
    projector.stop().await.unwrap();
    edge.stop().await.unwrap();
}

/// Whether `group` has committed the end of every partition of `topic`.
async fn caught_up(group: String, topic: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("kafka consumer");
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)).expect("metadata");
        let mut list = TopicPartitionList::new();
        for p in metadata.topics()[0].partitions() {
            list.add_partition(&topic, p.id());
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(5)).expect("committed offsets");
        committed.elements().iter().all(|e| {
            let (_, high) =
                consumer.fetch_watermarks(&topic, e.partition(), Duration::from_secs(5)).expect("watermarks");
            match e.offset() {
                Offset::Offset(o) => o >= high,
                _ => high == 0,
            }
        })
    })
    .await
    .expect("lag thread")
}

#[tokio::test]
async fn a_replay_of_the_topics_rebuilds_the_same_process_states_without_sending_any_command_again() {
    let tenant = TestTenant::new();
    let settings = settings_with(&tenant, 800, 1);
    let platform = Platform::start(settings.clone(), Role::All).await;
    let patients = ["p1", "p2"];
    for p in patients {
        enroll(&platform, &tenant, p).await;
    }
    for p in patients {
        onboarding_when(&platform, &tenant, p, Duration::from_secs(60), "the escalation", |v| {
            v["status"] == "escalated"
        })
        .await;
    }
    eventually(Duration::from_secs(10), "no timer left", || async {
        (timers_of(&tenant.name).await == 0).then_some(())
    })
    .await;
    platform.stop().await.unwrap();

    let mut before = Vec::new();
    for p in patients {
        before.push((process_records(&tenant.name, p).await, patient_events(&tenant.name, p).await));
    }

    // A spy queue bound like the tenant's patients queue gets a copy of
    // every command sent from now on.
    let spy = format!("{}.patients.spy", tenant.name);
    let connection =
        lapin::Connection::connect(&settings.amqp.url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            spy.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let routing_key = sluice_schemas::names::routing_key(&tenant.name, "patients", 0);
    channel
        .queue_bind(
            spy.as_str().into(),
            sluice_schemas::names::COMMAND_EXCHANGE.into(),
            routing_key.as_str().into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    // A fresh consumer group reads the patients topic from the beginning.
    let mut replay = settings.clone();
    replay.processor.processes.consumer_group = format!("{}.replay", settings.processor.processes.consumer_group);
    let replayer = Platform::start(replay.clone(), Role::Processor).await;
    let topic = sluice_schemas::names::events_topic(&tenant.name, "patients");
    eventually(Duration::from_secs(60), "the replay to reach the end of the topic", || {
        let (group, topic) = (replay.processor.processes.consumer_group.clone(), topic.clone());
        async move { caught_up(group, topic).await.then_some(()) }
    })
    .await;
    replayer.stop().await.unwrap();

    let pm = Onboarding { timeout_ms: 800, max_reminders: 1 };
    for (p, (records, events)) in patients.iter().zip(before) {
        let again = process_records(&tenant.name, p).await;
        assert_eq!(again, records, "{p}: the replay appended nothing to the process's stream");
        assert_eq!(patient_events(&tenant.name, p).await, events, "{p}: no command was sent again");
        let rebuilt = record::rebuild(&pm, &again).unwrap();
        assert_eq!(Onboarding::stage(&rebuilt.state), "escalated", "{p}");
        assert_eq!(rebuilt.state.reminders, 1);
    }
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let spied = channel.queue_declare(spy.as_str().into(), passive, lapin::types::FieldTable::default()).await.unwrap();
    assert_eq!(spied.message_count(), 0, "the replay sent no command");
    channel.queue_delete(spy.as_str().into(), lapin::options::QueueDeleteOptions::default()).await.unwrap();
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test]
async fn a_due_timer_is_claimed_by_one_instance_and_a_cancelled_one_by_none() {
    use sluice_processors::process::timers::{CqlTimers, TimerRef, TimerStore};
    use sluice_processors::process::Timer;
    let session = sluice_tests::cql_sluice().await;
    for statement in sluice_schemas::cql::create_tables() {
        session.query_unpaged(statement, ()).await.expect("create tables");
    }
    let timers = CqlTimers::new(session).await.expect("timer store");
    let tenant = TestTenant::new().name;
    let now = chrono::Utc::now().timestamp_millis();
    let timer = |id: &str, due_at_ms| TimerRef {
        tenant: tenant.clone(),
        process: "onboarding".into(),
        correlation: "p1".into(),
        timer: Timer { id: id.into(), due_at_ms },
    };
    timers.set(&timer("due", now - 1_000), now).await.unwrap();
    timers.set(&timer("later", now + 60_000), now).await.unwrap();
    timers.set(&timer("cancelled", now - 500), now).await.unwrap();

    let due = timers.due(&tenant, now, 100).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.timer.timer.id.as_str()).collect::<Vec<_>>(),
        ["due", "cancelled"],
        "due ones only, oldest first"
    );
    timers.cancel(&due[1].timer).await.unwrap();

    // Two instances race for the same due timer: one wins.
    let (a, b) = tokio::join!(timers.claim(&due[0], "a", now + 30_000), timers.claim(&due[0], "b", now + 30_000));
    assert_eq!([a.unwrap(), b.unwrap()].iter().filter(|won| **won).count(), 1, "exactly one claim wins");
    assert!(
        !timers.claim(&due[1], "a", now + 30_000).await.unwrap(),
        "a cancelled timer cannot be claimed (nor resurrected)"
    );
    assert!(timers.due(&tenant, now, 100).await.unwrap().is_empty(), "leased, and the cancelled row stays gone");

    // Once the lease has run out, another instance may take the timer over.
    let later = now + 30_001;
    let leased = timers.due(&tenant, later, 100).await.unwrap().remove(0);
    assert_eq!((leased.timer.timer.id.as_str(), leased.claimed_until_ms), ("due", now + 30_000));
    assert!(timers.claim(&leased, "c", later + 30_000).await.unwrap());
    assert!(!timers.claim(&leased, "d", later + 30_000).await.unwrap(), "a stale view of the lease loses");
}

#[tokio::test]
async fn a_hundred_thousand_fired_timers_leave_a_due_timer_firing_within_its_delay() {
    use futures::StreamExt;
    use sluice_processors::process::timers::{CqlTimers, TimerRef, TimerStore};
    use sluice_processors::process::Timer;
    const FIRED: i64 = 100_000;
    let tenant = TestTenant::new();
    let timeout = Duration::from_millis(1_500);
    let settings = settings_with(&tenant, timeout.as_millis() as u64, 10);
    let session = sluice_tests::cql_sluice().await;
    for statement in sluice_schemas::cql::create_tables() {
        session.query_unpaged(statement, ()).await.expect("create tables");
    }
    // Two hours of a busy tenant: 100,000 timers set at their time and
    // fired (removed), as the runtime does, leaving their tombstones.
    let timers = CqlTimers::new(session).await.expect("timer store");
    let now = chrono::Utc::now().timestamp_millis();
    let start = now - 2 * 3_600_000;
    let started = Instant::now();
    futures::stream::iter(0..FIRED)
        .for_each_concurrent(256, |i| {
            let timers = &timers;
            let tenant = &tenant.name;
            async move {
                let due_at = start + i * (2 * 3_600_000 - 60_000) / FIRED;
                let t = TimerRef {
                    tenant: tenant.clone(),
                    process: Onboarding::NAME.into(),
                    correlation: format!("old-{}", i % 5_000),
                    timer: Timer { id: format!("timeout-{i}"), due_at_ms: due_at },
                };
                timers.set(&t, due_at - 1_500).await.expect("set");
                timers.cancel(&t).await.expect("fired");
            }
        })
        .await;
    eprintln!("{FIRED} timers set and fired in {:?}", started.elapsed());
    assert_eq!(timers_of(&tenant.name).await, 0);

    let platform = Platform::start(settings, Role::All).await;
    enroll(&platform, &tenant, "p1").await;
    let view = onboarding_when(&platform, &tenant, "p1", Duration::from_secs(60), "a first reminder", |v| {
        v["reminders_sent"] == 1
    })
    .await;
    let at = |step: &str| {
        let s = view["steps"].as_array().unwrap().iter().find(|s| s["step"] == step).unwrap()["at"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(s).unwrap()
    };
    let waited = (at("reminder_sent") - at("assessment_scheduled")).num_milliseconds();
    eprintln!("the reminder came {waited} ms after the schedule (timeout {} ms)", timeout.as_millis());
    // The timeout, a timer poll, and the reminder's way through the command
    // side: seconds, not the minutes a scan of 100,000 tombstones costs (or
    // its failure).
    assert!(waited >= timeout.as_millis() as i64 && waited < 5_000 + timeout.as_millis() as i64, "{waited} ms");
    platform.stop().await.unwrap();
}
