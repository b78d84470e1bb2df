//! `sluice dlq shovel` against the real broker: a filtered shovel of one
//! failure group out of 1,000 dead letters while producers keep
//! dead-lettering, accounted message by message; dry runs, limits, rates, and
//! whole-queue moves through RabbitMQ's own shovel; every shovel audited, and
//! none across tenants unless named as foreign.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_cli::ops::audit::AuditLog;
use sluice_cli::ops::dead_letter::Filter;
use sluice_cli::ops::dlq::{ShovelMethod, ShovelOptions, Who};
use sluice_tests::*;

const SUBMIT: &str = "com.example.orders.SubmitOrder";
const CANCEL: &str = "com.example.orders.CancelOrder";
const SHIP: &str = "com.example.orders.ShipOrder";

/// The four failure groups of the seeded DLQ: (type, class, reason).
fn group_of(i: usize) -> (Option<&'static str>, Option<&'static str>, &'static str) {
    match i % 10 {
        0..=3 => (Some(SUBMIT), Some("malformed_command"), "data /lines/0/quantity: -1 is less than the minimum of 1"),
        4..=6 => (Some(CANCEL), Some("retries_exhausted"), "gave up after 6 attempts: event store: timeout"),
        7 | 8 => (None, Some("malformed_message"), "body is not JSON: expected value at line 1 column 1"),
        _ => (Some(SHIP), None, "delivery_limit"),
    }
}

fn seed(prefix: &str, range: std::ops::Range<usize>) -> Vec<SeedLetter> {
    range
        .map(|i| {
            let (ty, class, reason) = group_of(i);
            SeedLetter::new(&format!("{prefix}-{i:05}"), ty, class, reason)
        })
        .collect()
}

/// Group key as `dlq list` reports it.
fn key(ty: Option<&str>, class: Option<&str>) -> (String, String) {
    (
        ty.unwrap_or(sluice_cli::ops::dead_letter::UNREADABLE).to_owned(),
        class.map(str::to_owned).unwrap_or_else(|| "broker_delivery_limit".into()),
    )
}

/// The audit log, and who shovels in these tests.
async fn audit_for(settings: &sluice_cli::settings::Settings) -> (AuditLog, Who) {
    let session = sluice_cli::serve::connect_cql(settings).await.expect("CQL store (make up)");
    (AuditLog::new(session), Who { actor: "test-ops".into(), reason: "the outage is over".into() })
}

fn counts(listing: &sluice_cli::ops::dlq::Listing) -> BTreeMap<(String, String), u64> {
    listing.groups.iter().map(|g| ((g.command_type.clone(), g.error_class.clone()), g.count)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_shovel_under_load_moves_one_group_and_loses_or_duplicates_nothing() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let work = orders_queue(&tenant);
    let dlq_name = orders_dlq(&tenant);
    let seeded = seed("dl", 0..1_000);
    seed_dead_letters(&tenant, &seeded).await;

    let dlq = dlq_ops().await;
    let scope = tenant_scope(&tenant);
    let before = dlq.list(&scope, &Filter::default()).await.expect("list before");
    assert_eq!(before.matching, 1_000);
    assert_eq!((before.queues[0].depth, before.queues[0].complete), (1_000, true));
    let expected: BTreeMap<(String, String), u64> = [
        (key(Some(SUBMIT), Some("malformed_command")), 400),
        (key(Some(CANCEL), Some("retries_exhausted")), 300),
        (key(None, Some("malformed_message")), 200),
        (key(Some(SHIP), None), 100),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts(&before), expected, "groups listed before");

    // Producers keep dead-lettering, every group included, while the shovel runs.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (tenant, stop) = (tenant.clone(), stop.clone());
        tokio::spawn(async move {
            let mut produced = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let batch = seed("new", i..i + 10);
                seed_dead_letters(&tenant, &batch).await;
                produced.extend(batch);
                i += 10;
            }
            produced
        })
    };
    // Let the producers get going before the shovel starts.
    eventually(Duration::from_secs(30), "the producer's first dead letters", || async {
        (queue_depth(&dlq_name).await > 1_000).then_some(())
    })
    .await;

    let group = Filter {
        command_type: Some("CancelOrder".into()),
        class: Some("retries_exhausted".into()),
        ..Default::default()
    };
    let mut progress_calls = 0;
    let (audit, who) = audit_for(&settings).await;
    let report = dlq
        .shovel(&audit, &who, &scope, &group, &ShovelOptions::default(), &mut |_| progress_calls += 1)
        .await
        .expect("shovel");
    stop.store(true, Ordering::SeqCst);
    let produced = producer.await.expect("producer");
    assert!(!produced.is_empty(), "producers published during the shovel");
    assert_eq!(report.method, ShovelMethod::Client);
    assert!(progress_calls > 0, "the progress callback was driven");

    // Every original message of the group moved, and nothing of another group.
    let group_ids: HashSet<String> = seeded
        .iter()
        .chain(&produced)
        .filter(|l| l.command_type.as_deref() == Some(CANCEL))
        .map(|l| l.message_id.clone())
        .collect();
    let moved: HashSet<String> = report.ids.iter().cloned().collect();
    assert_eq!(moved.len(), report.ids.len(), "each message moved once");
    assert_eq!(report.moved as usize, report.ids.len());
    for letter in seeded.iter().filter(|l| l.command_type.as_deref() == Some(CANCEL)) {
        assert!(
            moved.contains(&letter.message_id),
            "{} of the group was present at the start and must have moved",
            letter.message_id
        );
    }
    assert!(moved.is_subset(&group_ids), "only the group moved");
    assert_eq!(report.destinations.get(&work), Some(&report.moved), "all went back to the work queue");

    // Listed after: the other groups grew by what the producers added; the
    // shovelled group holds only what arrived after the shovel looked.
    let after = dlq.list(&scope, &Filter::default()).await.expect("list after");
    let all: Vec<&SeedLetter> = seeded.iter().chain(&produced).collect();
    let mut expected_after: BTreeMap<(String, String), u64> = BTreeMap::new();
    for letter in all.iter().filter(|l| !moved.contains(&l.message_id)) {
        *expected_after.entry(key(letter.command_type.as_deref(), letter.class.as_deref())).or_default() += 1;
    }
    assert_eq!(counts(&after), expected_after, "groups listed after");
    assert_eq!(after.matching as usize, all.len() - moved.len());

    // Every message is in exactly one place.
    let in_work = drain_ids(&work).await;
    let in_dlq = drain_ids(&dlq_name).await;
    let work_set: HashSet<String> = in_work.iter().cloned().collect();
    let dlq_set: HashSet<String> = in_dlq.iter().cloned().collect();
    assert_eq!(work_set.len(), in_work.len(), "no duplicate in the work queue");
    assert_eq!(dlq_set.len(), in_dlq.len(), "no duplicate in the DLQ");
    assert!(work_set.is_disjoint(&dlq_set), "no message in both places");
    assert_eq!(work_set, moved, "the work queue holds exactly what was moved");
    let everything: HashSet<String> = all.iter().map(|l| l.message_id.clone()).collect();
    assert_eq!(work_set.union(&dlq_set).cloned().collect::<HashSet<_>>(), everything, "nothing lost");
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shovelled_messages_go_home_for_a_fresh_try_and_a_dry_run_moves_nothing() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let work = orders_queue(&tenant);
    let dlq_name = orders_dlq(&tenant);
    let seeded = seed("dr", 0..40);
    seed_dead_letters(&tenant, &seeded).await;
    let dlq = dlq_ops().await;
    let scope = tenant_scope(&tenant);
    let retries = Filter { class: Some("retries_exhausted".into()), ..Default::default() };

    let (audit, who) = audit_for(&settings).await;
    let dry = ShovelOptions { dry_run: true, ..Default::default() };
    let report = dlq.shovel(&audit, &who, &scope, &retries, &dry, &mut |_| {}).await.expect("dry run");
    assert!(audit.list(Some(&tenant.name), 10).await.unwrap().is_empty(), "a dry run moves nothing to audit");
    assert_eq!((report.dry_run, report.selected, report.moved), (true, 12, 0));
    assert_eq!(report.destinations.get(&work), Some(&12));
    eventually(Duration::from_secs(10), "the DLQ whole again", || async {
        (queue_depth(&dlq_name).await == 40).then_some(())
    })
    .await;
    assert_eq!(queue_depth(&work).await, 0, "a dry run moves nothing");

    // Limit and rate: 5 messages at 20/s take at least 4 intervals.
    let paced = ShovelOptions { limit: Some(5), rate: Some(20.0), ..Default::default() };
    let started = Instant::now();
    let report = dlq.shovel(&audit, &who, &scope, &retries, &paced, &mut |_| {}).await.expect("limited shovel");
    assert_eq!(report.moved, 5);
    assert!(started.elapsed() >= Duration::from_millis(190), "--rate 20 paced 5 moves: {:?}", started.elapsed());
    let first_five: Vec<String> = seeded
        .iter()
        .filter(|l| l.class.as_deref() == Some("retries_exhausted"))
        .take(5)
        .map(|l| l.message_id.clone())
        .collect();
    assert_eq!(report.ids, first_five, "the oldest of the group go first");
    let entries = audit.list(Some(&tenant.name), 10).await.unwrap();
    assert_eq!(entries.len(), 1, "one row per DLQ moved from");
    assert_eq!((entries[0].action.as_deref(), entries[0].count), (Some("shovel"), 5));
    assert_eq!(entries[0].message_ids, first_five);
    assert_eq!(entries[0].reason.as_deref(), Some("the outage is over"));
    assert_eq!(Some(&entries[0].id), report.audit_ids.first());

    // Back home: attempt 1, no verdict, history and origin kept.
    let moved = drain_queue(&work).await;
    assert_eq!(moved.len(), 5);
    for (properties, _) in &moved {
        assert_eq!(amqp_header(properties, "x-sluice-attempt").as_deref(), Some("LongLongInt(1)"));
        assert_eq!(amqp_header(properties, "x-sluice-reason"), None);
        assert_eq!(amqp_header(properties, "x-sluice-error-class"), None);
        // The DLQ's count was dropped; the work queue (delivery limit) sets its own, from 0.
        let count = amqp_header(properties, "x-delivery-count");
        assert!(matches!(count.as_deref(), None | Some("LongLongInt(0)")), "{count:?}");
        assert_eq!(amqp_header(properties, "x-sluice-original-queue").as_deref(), Some(work.as_str()));
        assert!(amqp_header(properties, "x-sluice-attempt-history").is_some());
        assert!(amqp_header(properties, "traceparent").is_some());
    }
    let listed = dlq.list(&scope, &Filter::default()).await.expect("list");
    assert_eq!(listed.matching, 35);
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_queue_move_to_another_queue_uses_the_broker_shovel_and_keeps_the_verdict() {
    require_stack().await;
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let parking = parking_queue(&tenant).await;
    let seeded = seed("bs", 0..300);
    seed_dead_letters(&tenant, &seeded).await;
    let dlq = dlq_ops().await;
    let options = ShovelOptions { to: Some(parking.clone()), ..Default::default() };
    let (audit, who) = audit_for(&settings).await;
    let report = dlq
        .shovel(&audit, &who, &tenant_scope(&tenant), &Filter::default(), &options, &mut |_| {})
        .await
        .expect("broker shovel");
    assert_eq!(report.method, ShovelMethod::BrokerShovel);
    assert_eq!(report.moved, 300);
    let entries = audit.list(Some(&tenant.name), 10).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (entries[0].action.as_deref(), entries[0].count, entries[0].status.as_deref()),
        (Some("shovel"), 300, Some("done"))
    );
    assert!(entries[0].filter.as_deref().unwrap().ends_with(&format!("to {parking}")), "{:?}", entries[0].filter);
    assert_eq!(queue_depth(&dlq_name).await, 0);
    let parked = drain_queue(&parking).await;
    let ids: Vec<String> = parked.iter().map(|(p, _)| p.message_id().as_ref().unwrap().to_string()).collect();
    let expected: Vec<String> = seeded.iter().map(|l| l.message_id.clone()).collect();
    assert_eq!(ids, expected, "all moved, in order, once");
    let with_verdict = parked.iter().filter(|(p, _)| amqp_header(p, "x-sluice-error-class").is_some()).count();
    assert_eq!(with_verdict, 270, "headers kept as they were (the 30 broker dead letters never had a class)");
    delete_queue(&parking).await;
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shovel_never_crosses_tenants_unless_named_foreign_and_then_says_so() {
    let (ours, theirs) = (TestTenant::new(), TestTenant::new());
    let settings = test_settings(&[&ours, &theirs]);
    declare_tenant_queues(&settings, &ours).await;
    declare_tenant_queues(&settings, &theirs).await;
    let (our_dlq, their_work) = (orders_dlq(&ours), orders_queue(&theirs));
    // First in the DLQ: a dead letter whose header says it came from the
    // other tenant's queue (forged, or misrouted); then four of our own.
    let forged = [SeedLetter::new("forged-0", Some(CANCEL), Some("retries_exhausted"), "timeout")];
    seed_dead_letters_claiming(&ours, &theirs, &forged).await;
    let letters: Vec<SeedLetter> = (0..4)
        .map(|i| SeedLetter::new(&format!("x-{i}"), Some(CANCEL), Some("retries_exhausted"), "timeout"))
        .collect();
    seed_dead_letters(&ours, &letters).await;
    let dlq = dlq_ops().await;
    let (audit, who) = audit_for(&settings).await;
    let scope = tenant_scope(&ours);
    let everything = Filter::default();

    // --to another tenant's queue: refused before anything moves, both ways
    // (the broker's shovel and the client's).
    for limit in [None, Some(2)] {
        let to_theirs = ShovelOptions { to: Some(their_work.clone()), limit, ..Default::default() };
        let refused = dlq.shovel(&audit, &who, &scope, &everything, &to_theirs, &mut |_| {}).await;
        assert!(
            matches!(&refused, Err(sluice_cli::ops::OpsError::Usage(m)) if m.contains("--to-foreign")),
            "{refused:?}"
        );
    }
    // The forged one is not sent "home" to the other tenant either.
    let home = dlq.shovel(&audit, &who, &scope, &everything, &ShovelOptions::default(), &mut |_| {}).await;
    assert!(matches!(&home, Err(sluice_cli::ops::OpsError::Usage(m)) if m.contains(&their_work)), "{home:?}");
    eventually(Duration::from_secs(10), "the DLQ whole again", || async {
        (queue_depth(&our_dlq).await == 5).then_some(())
    })
    .await;
    assert_eq!(queue_depth(&their_work).await, 0, "nothing crossed");
    let before = audit.list(Some(&ours.name), 10).await.unwrap();
    assert!(before.iter().all(|e| e.count == 0), "nothing moved, nothing counted: {before:?}");

    // Named on purpose: it moves, and the audit log says it was foreign.
    let forged_only = Filter { message_ids: Some(["forged-0".to_owned()].into()), ..Default::default() };
    let foreign = ShovelOptions { to: Some(their_work.clone()), foreign: true, limit: Some(1), ..Default::default() };
    let report = dlq.shovel(&audit, &who, &scope, &forged_only, &foreign, &mut |_| {}).await.expect("foreign shovel");
    assert_eq!(report.moved, 1);
    assert_eq!(drain_ids(&their_work).await, ["forged-0"]);
    let entries = audit.list(Some(&ours.name), 10).await.unwrap();
    let row = entries.iter().find(|e| e.count == 1).expect("the foreign shovel's row");
    assert_eq!(
        (row.action.as_deref(), row.message_ids.as_slice()),
        (Some("shovel-foreign"), ["forged-0".to_owned()].as_slice())
    );
    assert!(row.filter.as_deref().unwrap().contains(&their_work), "{:?}", row.filter);

    // Without a justification nothing moves.
    let nobody = Who { actor: "test-ops".into(), reason: " ".into() };
    let unjustified = dlq.shovel(&audit, &nobody, &scope, &everything, &ShovelOptions::default(), &mut |_| {}).await;
    assert!(matches!(unjustified, Err(sluice_cli::ops::OpsError::Usage(_))));
    assert_eq!(queue_depth(&our_dlq).await, 4);
    delete_tenant_queues(&settings, &ours).await;
    delete_tenant_queues(&settings, &theirs).await;
    dlq.close().await;
}

/// Ctrl-C during a whole-queue move: RabbitMQ's shovel is deleted (none is
/// left to keep moving behind the operator's back), what it had not moved
/// stays in the DLQ, nothing is lost, and the report and the audit row say
/// how many moved and how many of those are back in the DLQ too (the shovel
/// acks its source in batches after the copies were confirmed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_shovel_stopped_midway_is_deleted_and_reports_what_moved() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let dlq_name = orders_dlq(&tenant);
    let parking = parking_queue(&tenant).await;
    let seeded = seed("st", 0..3_000);
    seed_dead_letters(&tenant, &seeded).await;
    let dlq = dlq_ops().await;
    let (audit, who) = audit_for(&settings).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let options = ShovelOptions { to: Some(parking.clone()), stop: stop.clone(), ..Default::default() };
    // The operator presses Ctrl-C as soon as the shovel has started.
    let report = dlq
        .shovel(&audit, &who, &tenant_scope(&tenant), &Filter::default(), &options, &mut |_| stop.cancel())
        .await
        .expect("interrupted shovel");
    assert_eq!(report.method, ShovelMethod::BrokerShovel);
    assert!(report.interrupted);

    let shovels = rabbitmq_management(reqwest::Method::GET, "/parameters/shovel/%2f", None).await;
    let shovels: serde_json::Value = shovels.json().await.unwrap();
    let ours: Vec<&serde_json::Value> = shovels
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.contains(&dlq_name)))
        .collect();
    assert!(ours.is_empty(), "no shovel left behind: {ours:?}");
    // Nothing moves any more, and nothing was lost or copied twice.
    let (in_dlq, parked) = (queue_depth(&dlq_name).await, queue_depth(&parking).await);
    assert_eq!(report.moved, u64::from(parked), "the report says what moved");
    assert_eq!(report.copied_twice, u64::from(in_dlq + parked - 3_000), "and what is in both queues");
    let entries = audit.list(Some(&tenant.name), 10).await.unwrap();
    assert_eq!(
        (entries[0].status.as_deref(), entries[0].count),
        (Some("interrupted"), i64::from(parked)),
        "{:?}",
        entries[0]
    );
    let parked_ids = drain_ids(&parking).await;
    let left_ids = drain_ids(&dlq_name).await;
    let unique: HashSet<&String> = parked_ids.iter().collect();
    assert_eq!(unique.len(), parked_ids.len(), "copied once into the destination");
    let mut all: Vec<String> = parked_ids.iter().chain(&left_ids).cloned().collect();
    all.sort();
    all.dedup();
    let mut expected: Vec<String> = seeded.iter().map(|l| l.message_id.clone()).collect();
    expected.sort();
    assert_eq!(all, expected, "nothing lost: every dead letter in one queue or the other");
    delete_queue(&parking).await;
    delete_tenant_queues(&settings, &tenant).await;
    dlq.close().await;
}

/// A dead-lettered command's operation has its final answer; sent back by
/// ops, the command is a new attempt under an operation of its own, which
/// the old one links to (`retried_as`), and which gets the new verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_lettered_command_sent_back_is_a_new_attempt_and_its_operation_keeps_its_answer() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use sluice_processors::operations::{CqlOperationStore, OperationRef, OperationStore, Order, Status};
    use sluice_schemas::operation_id::OperationIds;

    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    declare_tenant_queues(&settings, &tenant).await;
    let platform = Platform::start(settings.clone(), sluice_cli::serve::Role::All).await;
    let ids = OperationIds::new(&settings.ingest.operation_secret);
    let event = submit_order(&tenant, "rd-1", "o-rd", "c1");
    let op = ids.issue(&tenant.name, &tenant.source, "rd-1");

    // What a processor does when it gives up on a command for good (its
    // re-drives used up): the operation's answer, then the DLQ copy.
    let (audit, who) = audit_for(&settings).await;
    let operations = CqlOperationStore::new(audit.session().clone(), "test").await.unwrap();
    let op_ref = OperationRef {
        tenant: &tenant.name,
        operation_id: &op,
        command_type: SUBMIT,
        source: &tenant.source,
        command_id: "rd-1",
    };
    operations
        .record(op_ref, &Status::DeadLettered("gave up: event store: timeout".into()), Order::default())
        .await
        .unwrap();
    let partition = sluice_schemas::names::command_partition(&tenant.name, "o-rd", settings.amqp.partitions);
    let home = sluice_schemas::names::command_queue(&tenant.name, "orders", partition);
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let mut headers = FieldTable::default();
    headers.insert("x-sluice-error-class".into(), s("retries_exhausted"));
    headers.insert("x-sluice-reason".into(), s("gave up: event store: timeout"));
    headers.insert("x-sluice-original-queue".into(), s(&home));
    headers.insert("x-sluice-redrives".into(), AMQPValue::LongLongInt(i64::from(settings.processor.max_redrives)));
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let properties = lapin::BasicProperties::default()
        .with_message_id(op.as_str().into())
        .with_content_type("application/cloudevents+json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let body = event.to_string().into_bytes();
    channel
        .basic_publish("".into(), orders_dlq(&tenant).as_str().into(), Default::default(), &body, properties)
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let (_, before) = platform.get_json(&tenant, &format!("/operations/{op}")).await;
    assert_eq!(before["status"], "dead_lettered", "{before}");

    // Sent back home.
    let options = ShovelOptions { operation_ids: Some(ids.clone()), ..Default::default() };
    let report = dlq_ops()
        .await
        .shovel(&audit, &who, &tenant_scope(&tenant), &Filter::default(), &options, &mut |_| {})
        .await
        .expect("shovel");
    assert_eq!(report.moved, 1);
    let retry = ids.issue(&tenant.name, &tenant.source, &format!("rd-1#retry-of-{op}"));
    let done = platform.await_operation(&tenant, &format!("/operations/{retry}"), Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "the new attempt's answer: {done}");
    let (_, original) = platform.get_json(&tenant, &format!("/operations/{op}")).await;
    assert_eq!(original["status"], "dead_lettered", "the first answer stands: {original}");
    assert_eq!(original["retried_as"], format!("/operations/{retry}"), "{original}");
    let order = eventually(Duration::from_secs(60), "the order in the read model", || async {
        let (status, order) = platform.get_json(&tenant, "/orders/o-rd").await;
        (status == 200).then_some(order)
    })
    .await;
    assert_eq!(order["status"], "submitted");
    platform.stop().await.unwrap();
}
