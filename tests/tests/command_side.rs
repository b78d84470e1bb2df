//! The command side against the real stack: business rules end to end,
//! idempotency under redelivery, and dead letters with reasons.

use std::time::Duration;

use lapin::types::FieldTable;
use serde_json::json;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn business_rules_end_in_succeeded_or_rejected_with_a_reason() {
    let tenant = TestTenant::new();
    let platform = Platform::start(test_settings(&[&tenant]), Role::All).await;

    let submit = platform.post_event(&tenant, &submit_order(&tenant, "s1", "o1", "c1")).await;
    let op = platform.await_operation(&tenant, submit.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "succeeded");

    let ship = command(
        &tenant,
        "ship1",
        "com.example.orders.ShipOrder",
        json!({"order_id": "o1", "carrier": "ups", "tracking_number": "1Z9"}),
    );
    let response = platform.post_event(&tenant, &ship).await;
    let op = platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "succeeded");
    assert_eq!(op["events"][0]["type"], "com.example.orders.OrderShipped");

    let cancel =
        command(&tenant, "cancel1", "com.example.orders.CancelOrder", json!({"order_id": "o1", "reason": "too late"}));
    let response = platform.post_event(&tenant, &cancel).await;
    let op = platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "rejected");
    assert_eq!(op["error"], "a shipped order cannot be cancelled");

    let again = platform.post_event(&tenant, &submit_order(&tenant, "s2", "o1", "c1")).await;
    let op = platform.await_operation(&tenant, again.headers()["location"].to_str().unwrap(), WAIT).await;
    assert_eq!(op["status"], "rejected");
    assert_eq!(op["error"], "order was already submitted");

    let events = stored_events(&tenant.name, "o1").await;
    let types: Vec<&str> = events.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(types, ["com.example.orders.OrderSubmitted", "com.example.orders.OrderShipped"]);
    assert_eq!(events.iter().map(|(v, _, _)| *v).collect::<Vec<_>>(), [1, 2]);
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_delivered_twice_produces_its_events_once() {
    let tenant = TestTenant::new();
    // Only the edge first: the command is queued, nobody consumes it yet.
    let edge = Platform::start(test_settings(&[&tenant]), Role::Ingest).await;
    let event = submit_order(&tenant, "dup-1", "o-dup", "c1");
    let first = edge.post_event(&tenant, &event).await;
    assert_eq!(first.status(), 202);
    // The client retries the same CloudEvent: same operation, queued again.
    let second = edge.post_event(&tenant, &event).await;
    assert_eq!(second.status(), 202);
    assert_eq!(first.headers()["location"], second.headers()["location"]);
    let queue = sluice_tests::orders_queue(&tenant);
    assert_eq!(queue_depth(&queue).await, 2, "both deliveries are queued");
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let (_, op) = edge.get_json(&tenant, &location).await;
    assert_eq!(op["status"], "accepted", "known to the edge before any processor ran");
    edge.stop().await.unwrap();

    let platform = Platform::start(test_settings(&[&tenant]), Role::All).await;
    let op = platform.await_operation(&tenant, &location, WAIT).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    // The duplicate is decided in a round of its own after the first
    // delivery's (one stream), which may still be running when the
    // operation already says succeeded: wait until nothing is left unacked.
    eventually(WAIT, "both deliveries taken and acked", || async {
        (queue_info(&queue).await?["messages"] == 0).then_some(())
    })
    .await;
    // Stopped: a delivery still unacked would be back in the queue now.
    platform.stop().await.unwrap();
    assert_eq!(queue_depth(&queue).await, 0, "both deliveries consumed and acked");
    let events = stored_events(&tenant.name, "o-dup").await;
    assert_eq!(events.len(), 1, "one event for one command: {events:?}");
    let edge = Platform::start(test_settings(&[&tenant]), Role::Ingest).await;
    let (_, op) = edge.get_json(&tenant, &location).await;
    assert_eq!(op["status"], "succeeded", "the duplicate did not change the outcome");
    edge.stop().await.unwrap();
}

/// The journal notes a partition's relay position (a fallback for Kafka's):
/// a round's journal write carries the position of the round before, and
/// once the partition stays idle its owner notes the last one with a write
/// of its own, while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_partitions_journal_notes_its_last_relay_position() {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::journal::{CqlJournal, Journal};

    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::All).await;
    for (id, order) in [("note-1", "o-note-1"), ("note-2", "o-note-2")] {
        let accepted = platform.post_event(&tenant, &submit_order(&tenant, id, order, "c1")).await;
        assert_eq!(accepted.status(), 202);
        let location = accepted.headers()["location"].to_str().unwrap().to_owned();
        let op = platform.await_operation(&tenant, &location, WAIT).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    let session = sluice_cli::serve::connect_cql(&settings).await.expect("CQL store (make up)");
    let journal = CqlJournal::new(session).await.expect("journal");
    let partition = PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: 0 };
    eventually(WAIT, "the idle partition's note at seq 2", || async {
        (journal.relay_note(&partition).await.ok()? == Some(2)).then_some(())
    })
    .await;
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_journaled_but_not_yet_in_kafka_is_finished_by_the_next_owner() {
    let tenant = TestTenant::new();
    let edge = Platform::start(test_settings(&[&tenant]), Role::Ingest).await;
    let event = submit_order(&tenant, "crash-1", "o-crash", "c9");
    let response = edge.post_event(&tenant, &event).await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let operation_id = location.trim_start_matches("/operations/").to_owned();
    edge.stop().await.unwrap();

    // The partition's owner journaled its decision (epoch 1) and crashed
    // before writing the stream or producing: the journal holds the entry,
    // the stream and Kafka have nothing, the command is still queued.
    let session = cql().await;
    let command_key = format!("{}\u{1f}{}", event["source"].as_str().unwrap(), "crash-1");
    let payload = json!({"event_id": "pre-0", "order_id": "o-crash", "version": 1, "occurred_at": 1_700_000_000_000_i64,
                         "customer_id": "c9", "currency": "EUR", "lines": [{"sku": "tea", "quantity": 1, "unit_price_cents": 5}], "total_cents": 5});
    let journaled = json!([{"version": 1, "event_id": "pre-0", "event_type": "com.example.orders.OrderSubmitted",
                            "payload": payload, "recorded_at_ms": 1_700_000_000_000_i64}]);
    session
        .query_unpaged(
            "INSERT INTO sluice.command_journal (tenant, context, partition, seq, epoch, owner, stream_id, command_key, \
             operation_id, command_type, source, command_id, events) \
             VALUES (?, 'orders', 0, 0, 1, 'crashed', 'o-crash', ?, ?, 'com.example.orders.SubmitOrder', ?, 'crash-1', ?)",
            (&tenant.name, &command_key, &operation_id, event["source"].as_str().unwrap(), journaled.to_string()),
        )
        .await
        .unwrap();
    assert!(stored_events(&tenant.name, "o-crash").await.is_empty());

    let platform = Platform::start(test_settings(&[&tenant]), Role::All).await;
    let op = platform.await_operation(&tenant, &location, WAIT).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    assert_eq!(stored_events(&tenant.name, "o-crash").await.len(), 1, "decided once, not again");
    let queue = sluice_tests::orders_queue(&tenant);
    eventually(WAIT, "the queued command answered as already done", || async {
        (queue_depth(&queue).await == 0).then_some(())
    })
    .await;
    let position = &op["events"][0];
    let record = read_record(
        position["topic"].as_str().unwrap(),
        position["partition"].as_i64().unwrap() as i32,
        position["offset"].as_i64().unwrap(),
    )
    .await;
    use rdkafka::message::{Headers, Message};
    let ce_id = record.headers().unwrap().iter().find(|h| h.key == "ce_id").and_then(|h| h.value).unwrap().to_vec();
    assert_eq!(ce_id, b"pre-0", "the journaled event itself was produced");
    // And the read model shows it.
    let (status, order) = eventually(WAIT, "order read model", || async {
        let (s, b) = platform.get_json(&tenant, "/orders/o-crash").await;
        (s == 200).then_some((s, b))
    })
    .await;
    assert_eq!((status, order["total_cents"].as_i64()), (200, Some(5)));
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_and_malformed_commands_land_in_the_dlq_with_their_reason() {
    let tenant = TestTenant::new();
    let platform = Platform::start(test_settings(&[&tenant]), Role::Processor).await;
    let queue = sluice_tests::orders_queue(&tenant);
    let dlq = orders_dlq(&tenant);
    eventually(WAIT, "the processor consuming", || async { (queue_consumers(&queue).await >= 1).then_some(()) }).await;

    // Not JSON at all.
    publish_raw(&queue, b"\x00\x01 not json", Some("op-garbage"), FieldTable::default()).await;
    // A CloudEvent whose data does not fit its type (bypassing the edge).
    let bad = json!({"specversion": "1.0", "id": "m1", "source": tenant.source, "type": "com.example.orders.SubmitOrder",
                     "data": {"order_id": 42}});
    publish_raw(&queue, bad.to_string().as_bytes(), Some("op-malformed"), FieldTable::default()).await;
    // No operation id.
    publish_raw(&queue, submit_order(&tenant, "x", "o-x", "c").to_string().as_bytes(), None, FieldTable::default())
        .await;

    eventually(WAIT, "three dead letters", || async { (queue_depth(&dlq).await == 3).then_some(()) }).await;
    let dead = drain_queue(&dlq).await;
    let mut classes: Vec<(String, String)> = dead
        .iter()
        .map(|(p, _)| (amqp_header(p, "x-sluice-error-class").unwrap(), amqp_header(p, "x-sluice-reason").unwrap()))
        .collect();
    classes.sort();
    assert_eq!(classes[0].0, "malformed_command");
    assert!(classes[0].1.contains("order_id"), "{classes:?}");
    assert_eq!(classes[1].0, "malformed_message");
    assert!(classes[1].1.contains("not JSON"), "{classes:?}");
    assert_eq!(classes[2].0, "malformed_message");
    assert!(classes[2].1.contains("message_id"), "{classes:?}");
    for (properties, _) in &dead {
        assert_eq!(amqp_header(properties, "x-sluice-original-queue").as_deref(), Some(queue.as_str()));
    }
    assert_eq!(queue_depth(&queue).await, 0);
    platform.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ship_delivered_twice_beside_its_submit_ends_one_way_everywhere() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.amqp.partitions = 4;
    // Queued first, so the processors find all three at once: the Submit,
    // the Ship, and the client's retry of the same Ship.
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let submit = edge.post_event(&tenant, &submit_order(&tenant, "race-submit", "o-race", "c1")).await;
    assert_eq!(submit.status(), 202);
    let ship = command(
        &tenant,
        "race-ship",
        "com.example.orders.ShipOrder",
        json!({"order_id": "o-race", "carrier": "ups", "tracking_number": "1Z"}),
    );
    let first = edge.post_event(&tenant, &ship).await;
    let again = edge.post_event(&tenant, &ship).await;
    assert_eq!((first.status().as_u16(), again.status().as_u16()), (202, 202));
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let partition = sluice_schemas::names::command_partition(&tenant.name, "o-race", 4);
    let queue = sluice_schemas::names::command_queue(&tenant.name, "orders", partition);
    assert_eq!(queue_depth(&queue).await, 3, "one stream, one partition");

    // Two processors start together: both take every partition at first,
    // then share them (the partition moves while its commands are in flight).
    let processors = [SluiceProcess::spawn(&settings, "processor"), SluiceProcess::spawn(&settings, "processor")];
    let op = edge.await_operation(&tenant, &location, WAIT).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let queues = partition_queues(&settings, &tenant, "orders");
    eventually(WAIT, "the partitions shared", || async {
        let owners = settled_owners(&queues).await?;
        (owners.iter().collect::<std::collections::HashSet<_>>().len() == 2).then_some(())
    })
    .await;
    drop(processors);
    assert_eq!(queue_depth(&queue).await, 0, "all three deliveries settled");

    let events = stored_events(&tenant.name, "o-race").await;
    let types: Vec<&str> = events.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(types, ["com.example.orders.OrderSubmitted", "com.example.orders.OrderShipped"]);
    let topic = format!("{}.orders.events", tenant.name);
    let records: Vec<_> =
        read_topic(&topic).await.into_iter().filter(|m| m.key() == Some(b"o-race".as_slice())).collect();
    use rdkafka::message::Message;
    assert_eq!(records.len(), 2, "each event in Kafka once");
    let shipped = &op["events"][0];
    assert_eq!(shipped["type"], "com.example.orders.OrderShipped");
    assert_eq!(
        (shipped["partition"].as_i64().unwrap() as i32, shipped["offset"].as_i64().unwrap()),
        (records[1].partition(), records[1].offset()),
        "the operation points at the one record"
    );
    let (_, op_after) = edge.get_json(&tenant, &location).await;
    assert_eq!(op_after["status"], "succeeded", "the duplicate did not change the answer");
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operation_settled_once_stays_settled_whatever_writes_arrive_late() {
    use sluice_processors::operations::{CqlOperationStore, OperationRef, OperationStore, Order, Status};
    let session = cql_sluice().await;
    let store = CqlOperationStore::new(session.clone(), "late-writer").await.unwrap();
    let tenant = TestTenant::new();
    let op = OperationRef {
        tenant: &tenant.name,
        operation_id: "op-late",
        command_type: "com.example.orders.ShipOrder",
        source: &tenant.source,
        command_id: "late-1",
    };
    let none = Order::default();
    let (fenced, owner) = (Order { epoch: 6, attempt: 9 }, Order { epoch: 7, attempt: 1 });
    let position = |offset| sluice_processors::operations::EventPosition {
        event_type: "com.example.orders.OrderShipped".into(),
        topic: "t".into(),
        partition: 0,
        offset,
    };
    store.record(op, &Status::Processing { attempt: 1 }, none).await.unwrap();
    store.record(op, &Status::Succeeded(vec![position(42)]), owner).await.unwrap();
    // What a slow delivery, dead-letter bookkeeping and a fenced owner (an
    // older epoch, with positions of a transaction that was aborted) would
    // write afterwards.
    store.record(op, &Status::Processing { attempt: 2 }, none).await.unwrap();
    store.record(op, &Status::DeadLettered("late bookkeeping".into()), none).await.unwrap();
    store.record(op, &Status::Succeeded(vec![position(7)]), fenced).await.unwrap();
    let row = session
        .query_unpaged(
            "SELECT status, error, attempts, events FROM operations WHERE tenant = ? AND operation_id = ?",
            (&tenant.name, "op-late"),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(String, Option<String>, Option<i32>, Option<String>)>()
        .unwrap();
    assert_eq!(row.0, "succeeded");
    assert_eq!((row.1, row.2), (None, None), "the whole record is the succeeded one");
    assert!(row.3.unwrap().contains("\"offset\":42"), "the newest owner's positions");

    // A late `processing` does not undo a dead letter either.
    let dead = OperationRef { operation_id: "op-dead", command_id: "late-2", ..op };
    store.record(dead, &Status::DeadLettered("malformed".into()), none).await.unwrap();
    store.record(dead, &Status::Processing { attempt: 1 }, none).await.unwrap();
    assert_eq!(store.status(&tenant.name, "op-dead").await.unwrap().as_deref(), Some("dead_lettered"));
    // The owner reads a round's records in one go: those that exist.
    let many: Vec<String> = (0..150).map(|i| format!("op-none-{i}")).collect();
    let mut ids: Vec<&str> = many.iter().map(String::as_str).collect();
    ids.extend(["op-late", "op-dead"]);
    let found = store.statuses(&tenant.name, &ids).await.unwrap();
    let expected = [("op-dead", "dead_lettered"), ("op-late", "succeeded")];
    assert_eq!(found, expected.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_left_in_the_unpartitioned_queues_reach_their_partitions_after_an_upgrade() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.amqp.partitions = 4;
    // The queues of the version before partitions, each holding a command
    // it had accepted: one waiting in the work queue, one in a delay queue.
    let legacy = format!("{}.orders.commands", tenant.name);
    let delayed = format!("{legacy}.retry.{}", settings.processor.retry_delays_ms[0]);
    let connection =
        lapin::Connection::connect(&settings.amqp.url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    for queue in [&legacy, &delayed] {
        let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), durable, quorum.clone()).await.unwrap();
    }
    let _ = connection.close(200, "declared".into()).await;
    let ids = sluice_schemas::operation_id::OperationIds::new(&settings.ingest.operation_secret);
    let mut locations = Vec::new();
    for (queue, id, order) in [(&legacy, "up-1", "o-up-1"), (&delayed, "up-2", "o-up-2")] {
        let event = submit_order(&tenant, id, order, "c1");
        let op = ids.issue(&tenant.name, &tenant.source, id);
        publish_raw(queue, event.to_string().as_bytes(), Some(&op), FieldTable::default()).await;
        locations.push(format!("/operations/{op}"));
    }

    let platform = Platform::start(settings.clone(), Role::All).await;
    for location in &locations {
        let op = platform.await_operation(&tenant, location, WAIT).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    for order in ["o-up-1", "o-up-2"] {
        assert_eq!(stored_events(&tenant.name, order).await.len(), 1, "{order} decided once");
    }
    assert!(queue_info(&legacy).await.and_then(|q| q["name"].as_str().map(str::to_owned)).is_none(), "deleted");
    assert!(queue_info(&delayed).await.and_then(|q| q["name"].as_str().map(str::to_owned)).is_none(), "deleted");
    platform.stop().await.unwrap();
}

/// A claim names the earlier owners whose Kafka producers the claimant
/// fences before it reads the relay position: the previous owner, and those
/// named by claims that never began (a claimant that died before it fenced
/// anyone). Its begin forgets them; an owner's own name is never on it (its
/// producer ends its own transactions), nor that of an owner that released
/// the partition with nothing in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_names_the_earlier_owners_to_fence_until_the_claimant_begins() {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::journal::{Appended, CqlJournal, Journal};

    let tenant = TestTenant::new();
    let session = sluice_cli::serve::connect_cql(&test_settings(&[&tenant])).await.expect("CQL store (make up)");
    let journal = CqlJournal::new(session).await.expect("journal");
    let partition = PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: 1 };
    let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    let a = journal.claim(&partition, "a").await.unwrap();
    assert_eq!(a.fence, names(&[]), "a first claim fences nobody");
    assert_eq!(journal.begin(&partition, a.epoch, 0, 0).await.unwrap(), Appended::Applied);
    let b = journal.claim(&partition, "b").await.unwrap();
    assert_eq!(b.fence, names(&["a"]));
    // b dies before it begins.
    let c = journal.claim(&partition, "c").await.unwrap();
    assert_eq!(c.fence, names(&["a", "b"]), "b may have died before it fenced a");
    let again = journal.claim(&partition, "c").await.unwrap();
    assert!(again.epoch > c.epoch);
    assert_eq!(again.fence, names(&["a", "b"]), "still to fence, never c itself");
    assert_eq!(
        journal.begin(&partition, c.epoch, 0, 0).await.unwrap(),
        Appended::Fenced,
        "an older epoch forgets nothing"
    );
    assert_eq!(journal.begin(&partition, again.epoch, 0, 0).await.unwrap(), Appended::Applied);
    assert_eq!(journal.epoch(&partition).await.unwrap(), Some(again.epoch));
    let d = journal.claim(&partition, "d").await.unwrap();
    assert_eq!(d.fence, names(&["c"]), "begun: only the last owner is left to fence");
    assert_eq!(journal.begin(&partition, d.epoch, 0, 0).await.unwrap(), Appended::Applied);

    // An owner that let the partition go with nothing in flight is not
    // fenced by the next; a release of an older epoch changes nothing.
    assert_eq!(journal.release(&partition, again.epoch).await.unwrap(), Appended::Fenced);
    assert_eq!(journal.release(&partition, d.epoch).await.unwrap(), Appended::Applied);
    let e = journal.claim(&partition, "e").await.unwrap();
    assert_eq!(e.fence, names(&[]), "d released");
    let f = journal.claim(&partition, "f").await.unwrap();
    assert_eq!(f.fence, names(&["e"]), "e claimed and did not release");
}

/// The journal in the real store, raced the way a paused owner races its
/// successor: what a fenced owner journals after its successor began never
/// stands, even where it writes the same seq again later; what it journaled
/// before the successor read the journal stands, and the successor finishes
/// it. Either way the fenced owner is told, before it writes anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owners_journal_entries_stand_only_if_its_successor_saw_them() {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::journal::{Appended, CqlJournal, Entry, Journal, Verdict};

    let tenant = TestTenant::new();
    let session = sluice_cli::serve::connect_cql(&test_settings(&[&tenant])).await.expect("CQL store (make up)");
    let journal = CqlJournal::new(session).await.expect("journal");
    let partition = PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: 3 };
    let entry = |seq: i64, key: &str| Entry {
        seq,
        stream_id: format!("o-{seq}"),
        command_key: key.to_owned(),
        operation_id: format!("op-{key}"),
        command_type: "com.example.orders.CancelOrder".into(),
        source: format!("/{}/shop", tenant.name),
        command_id: key.to_owned(),
        verdict: Verdict::Rejected("order does not exist".into()),
    };
    let standing = || async {
        let entries = journal.entries_from(&partition, 0).await.expect("journal read");
        entries.into_iter().map(|e| (e.seq, e.command_key)).collect::<Vec<_>>()
    };
    let pairs = |list: &[(i64, &str)]| list.iter().map(|(s, k)| (*s, (*k).to_owned())).collect::<Vec<_>>();

    let old = journal.claim(&partition, "old").await.unwrap().epoch;
    assert_eq!(journal.begin(&partition, old, 0, 0).await.unwrap(), Appended::Applied);
    assert_eq!(journal.append(&partition, old, &[entry(0, "a"), entry(1, "b")], 0).await.unwrap(), Appended::Applied);

    // A successor claims; before it reads the journal, the old owner (not
    // yet aware) journals seq 2 and is told it is fenced.
    let new = journal.claim(&partition, "new").await.unwrap().epoch;
    assert!(new > old);
    assert_eq!(journal.append(&partition, old, &[entry(2, "c")], 0).await.unwrap(), Appended::Fenced);
    // The successor reads seqs 0–2 (2 is its predecessor's to finish) and
    // begins at 3.
    assert_eq!(standing().await, pairs(&[(0, "a"), (1, "b"), (2, "c")]));
    assert_eq!(journal.begin(&partition, new, 3, 0).await.unwrap(), Appended::Applied);
    assert_eq!(journal.begin(&partition, old, 3, 0).await.unwrap(), Appended::Fenced, "only the epoch's holder begins");

    // After the successor began, the old owner's entries never stand.
    assert_eq!(journal.append(&partition, old, &[entry(3, "x"), entry(4, "y")], 0).await.unwrap(), Appended::Fenced);
    assert_eq!(standing().await, pairs(&[(0, "a"), (1, "b"), (2, "c")]));
    assert_eq!(journal.append(&partition, new, &[entry(3, "d")], 3).await.unwrap(), Appended::Applied);
    // The old owner writes seq 3 again after the successor did: the
    // successor's entry stays (its epoch is the newer write timestamp).
    assert_eq!(journal.append(&partition, old, &[entry(3, "x2")], 1).await.unwrap(), Appended::Fenced);
    assert_eq!(standing().await, pairs(&[(0, "a"), (1, "b"), (2, "c"), (3, "d")]));
    // A journal write carries the relay position; an older one noted later
    // never hides it.
    assert_eq!(journal.relay_note(&partition).await.unwrap(), Some(3));

    // A third owner claims; the successor, not yet aware, journals seq 4
    // over the first owner's discarded entry: the third owner reads it
    // before it begins, so it stands (the third owner finishes it).
    let third = journal.claim(&partition, "third").await.unwrap().epoch;
    assert_eq!(journal.append(&partition, new, &[entry(4, "late")], 0).await.unwrap(), Appended::Fenced);
    let seen = standing().await;
    assert_eq!(journal.begin(&partition, third, 5, 0).await.unwrap(), Appended::Applied);
    assert_eq!(seen, pairs(&[(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "late")]));

    // The epoch is read back at the first entry written: past trimmed rows
    // it still reads the partition's epoch, and a fenced owner writing
    // below the trim (its rows hidden at once) is told it is fenced.
    journal.relayed(&partition, 5, Some(5)).await.unwrap();
    assert_eq!(journal.append(&partition, third, &[entry(5, "e")], 5).await.unwrap(), Appended::Applied);
    assert_eq!(journal.append(&partition, new, &[entry(2, "z")], 0).await.unwrap(), Appended::Fenced);
    assert_eq!(standing().await, pairs(&[(5, "e")]));
}

/// The journal writes of a processor's partitions that come together share
/// requests (their rows in a few unlogged batches, their epochs read back
/// together), yet each partition's rows are written whole and each owner is
/// answered for its own epoch: the one partition among them whose epoch a
/// newer owner raised is told it is fenced, the others are not. The rows
/// outweigh one request, so the group is split.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_journaling_together_are_each_answered_for_their_own_epoch() {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::journal::{Appended, CqlJournal, Entry, Journal, Verdict};

    let tenant = TestTenant::new();
    let session = sluice_cli::serve::connect_cql(&test_settings(&[&tenant])).await.expect("CQL store (make up)");
    let journal = CqlJournal::new(session).await.expect("journal");
    let partitions: Vec<PartitionRef> =
        (0..12).map(|p| PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: p }).collect();
    let mut epochs = Vec::new();
    for partition in &partitions {
        let epoch = journal.claim(partition, "owner").await.unwrap().epoch;
        assert_eq!(journal.begin(partition, epoch, 0, 0).await.unwrap(), Appended::Applied);
        epochs.push(epoch);
    }
    let fenced = 5;
    journal.claim(&partitions[fenced], "newer").await.unwrap();
    // 16 entries of about 1 KiB a partition: 12 partitions' writes are
    // several requests' worth.
    let entries = |p: u16| -> Vec<Entry> {
        (0..16)
            .map(|seq| Entry {
                seq,
                stream_id: format!("o-{p}-{seq}"),
                command_key: format!("k-{p}-{seq}"),
                operation_id: format!("op-{p}-{seq}"),
                command_type: "com.example.orders.CancelOrder".into(),
                source: format!("/{}/shop", tenant.name),
                command_id: format!("c-{p}-{seq}"),
                verdict: Verdict::Rejected("x".repeat(1_000)),
            })
            .collect()
    };
    let written: Vec<Vec<Entry>> = partitions.iter().map(|p| entries(p.partition)).collect();
    let answers = futures::future::join_all(
        partitions.iter().zip(&epochs).zip(&written).map(|((p, epoch), entries)| journal.append(p, *epoch, entries, 0)),
    )
    .await;
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = if i == fenced { Appended::Fenced } else { Appended::Applied };
        assert_eq!(answer.expect("journal write"), expected, "partition {i}");
        if i != fenced {
            assert_eq!(journal.entries_from(&partitions[i], 0).await.unwrap(), written[i], "partition {i}'s rows");
        }
    }
}

/// A new owner reads the relay position its predecessors committed even
/// while a transactional commit of it is pending and never ends (after a
/// broker restart, a commit request can reach the broker after its
/// transaction ended: it stays pending for good, and a stable read of the
/// position waits for it forever). Emulated here by another producer's
/// transaction left open with a commit of the position.
///
/// The positions of a context's partitions share one group (partition p of
/// the relay topic is command partition p's): a commit pending for another
/// partition does not hold up a stable read of this one's. A position
/// committed in the layout before (a group per partition, at partition 0)
/// is read until the new layout holds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_owner_reads_its_relay_position_past_a_commit_left_pending() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, Producer};
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::kafka::{self, Relay, RelayFactory};

    require_stack().await;
    let tenant = TestTenant::new();
    kafka::ensure_relay_topic(KAFKA, 2, Default::default()).await.unwrap();
    let relays = relays_of(&tenant);
    let partition = PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: 1 };
    let neighbour = PartitionRef { partition: 0, ..partition.clone() };

    // A transaction left open with a commit of `offset` for `relay_partition`
    // of `group`.
    let left_pending = |group: String, relay_partition: i32, offset: i64| {
        tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", KAFKA)
                .set("transactional.id", format!("pending-{}", uuid::Uuid::new_v4()))
                .set("transaction.timeout.ms", "600000")
                .create()
                .unwrap();
            producer.init_transactions(WAIT).unwrap();
            producer.begin_transaction().unwrap();
            let client: BaseConsumer =
                ClientConfig::new().set("bootstrap.servers", KAFKA).set("group.id", &group).create().unwrap();
            let mut offsets = rdkafka::TopicPartitionList::new();
            offsets.add_partition_offset(kafka::RELAY_TOPIC, relay_partition, rdkafka::Offset::Offset(offset)).unwrap();
            producer.send_offsets_to_transaction(&offsets, &client.group_metadata().unwrap(), WAIT).unwrap();
            producer
        })
    };
    let group = kafka::relay_group(&tenant.name, "orders");

    // A position of the layout before: the partition's own group.
    let legacy = left_pending(kafka::relay_name(&partition), 0, 5).await.unwrap();
    tokio::task::spawn_blocking(move || legacy.commit_transaction(WAIT).unwrap()).await.unwrap();
    let (relay, position) = relays.open(&partition, "first").await.unwrap();
    assert_eq!(position.committed, Some(5), "the position committed in the layout before");
    assert!(!position.may_lag);

    // An owner relays up to journal seq 7, while a commit of the neighbour's
    // position stays pending.
    let neighbours = left_pending(group.clone(), i32::from(neighbour.partition), 3).await.unwrap();
    relay.produce(vec![]).await.unwrap();
    relay.commit(7).await.unwrap();
    let (relay, position) =
        tokio::time::timeout(WAIT, relays.open(&partition, "second")).await.expect("open returns").unwrap();
    assert_eq!(
        position,
        kafka::RelayPosition { committed: Some(7), may_lag: false },
        "read stable, past the neighbour's pending commit"
    );
    drop(relay);
    tokio::task::spawn_blocking(move || neighbours.abort_transaction(WAIT).unwrap()).await.unwrap();
    let (_, position) = relays.open(&neighbour, "first").await.unwrap();
    assert_eq!(position.committed, None, "the neighbour's aborted commit never counted");

    // A commit of this partition's position that stays pending.
    let pending = left_pending(group, i32::from(partition.partition), 99).await.unwrap();

    // The next owner takes over meanwhile: it gets the committed position.
    let (relay, position) =
        tokio::time::timeout(WAIT, relays.open(&partition, "third")).await.expect("open returns").unwrap();
    assert_eq!(position.committed, Some(7), "the position the second owner committed");
    assert!(position.may_lag, "read past the pending commit: the owner weighs it against the journal");
    relay.produce(vec![]).await.unwrap();
    relay.commit(9).await.unwrap();
    drop(relay);

    // The pending commit ends (aborted); the third owner's position stands.
    tokio::task::spawn_blocking(move || pending.abort_transaction(WAIT).unwrap()).await.unwrap();
    let (_, position) = relays.open(&partition, "fourth").await.unwrap();
    assert_eq!(position.committed, Some(9));
    assert!(!position.may_lag);
}

/// A processor's partitions of one context share its producers: rounds that
/// come together go into one transaction, which commits once each of them
/// voted to commit, with each one's position. One that aborts, or whose
/// round is dropped (its relay gone), takes the others' records with it: no
/// partition's records are ever visible without its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processors_partitions_share_a_transaction_that_commits_only_with_every_vote() {
    use sluice_processors::kafka::{Relay, RelayError, RelayFactory};

    require_stack().await;
    let tenant = TestTenant::new();
    let (relays, [zero_ref, one_ref], topic) = relay_partitions(&tenant).await;
    let (zero, _) = relays.open(&zero_ref, "proc").await.unwrap();
    let (one, _) = relays.open(&one_ref, "proc").await.unwrap();

    // Both join one transaction; the first vote waits for the second.
    zero.produce(vec![test_event(&topic, "a", 0)]).await.unwrap();
    one.produce(vec![test_event(&topic, "b", 0)]).await.unwrap();
    let mut first = tokio::spawn(async move { zero.commit(1).await.map(|()| zero) });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut first).await.is_err(),
        "committed before every partition in the transaction voted"
    );
    one.commit(1).await.unwrap();
    let zero = first.await.unwrap().unwrap();
    assert_eq!(committed_keys(&topic, 0).await, ["a", "b"]);
    assert_eq!(zero.position().await.unwrap(), Some(1));
    assert_eq!(one.position().await.unwrap(), Some(1));

    // One aborts: the other's records go too, and its commit fails.
    zero.produce(vec![test_event(&topic, "c", 1)]).await.unwrap();
    one.produce(vec![test_event(&topic, "d", 1)]).await.unwrap();
    let (committed, aborted) = tokio::join!(zero.commit(2), one.abort());
    aborted.unwrap();
    assert!(matches!(committed, Err(RelayError::Transient(_))), "{committed:?}");

    // A round dropped between its produce and its vote aborts it too.
    zero.produce(vec![test_event(&topic, "e", 1)]).await.unwrap();
    one.produce(vec![test_event(&topic, "f", 1)]).await.unwrap();
    drop(one);
    let committed = zero.commit(2).await;
    assert!(matches!(committed, Err(RelayError::Transient(_))), "{committed:?}");
    assert_eq!(zero.position().await.unwrap(), Some(1), "no position of an aborted transaction");

    // The producer goes on.
    zero.produce(vec![test_event(&topic, "g", 1)]).await.unwrap();
    zero.commit(2).await.unwrap();
    assert_eq!(committed_keys(&topic, 0).await, ["a", "b", "g"], "nothing of the aborted transactions");
    assert_eq!(zero.position().await.unwrap(), Some(2));
}

/// A new owner of a partition fences the previous owner's producer, which
/// that processor shares among its partitions: the transaction it had open
/// aborts for all of them, and the new owner reads the position committed
/// before it. The previous owner's producer, set up again, serves each of
/// its relays once the relay has said so (its owner asks the journal
/// whether the partition is still its own, then tries again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_fences_the_previous_owners_shared_producer() {
    use sluice_processors::kafka::{Relay, RelayError, RelayFactory};

    require_stack().await;
    let tenant = TestTenant::new();
    let (a, [zero_ref, one_ref, two_ref], topic) = relay_partitions(&tenant).await;
    // Another processor: relays of its own.
    let b = relays_of(&tenant);

    let (a_zero, _) = a.open(&zero_ref, "a").await.unwrap();
    let (a_one, _) = a.open(&one_ref, "a").await.unwrap();
    // Partition 2 has nothing in the transaction.
    let (a_two, _) = a.open(&two_ref, "a").await.unwrap();
    a_zero.produce(vec![test_event(&topic, "x", 0)]).await.unwrap();
    a_one.produce(vec![test_event(&topic, "y", 0)]).await.unwrap();

    // b takes partition 0 over while a's transaction is open.
    b.fence(&zero_ref, &["a".to_owned()]).await.unwrap();
    let (b_zero, position) = b.open(&zero_ref, "b").await.unwrap();
    assert_eq!(position.committed, None);
    let (zero_voted, one_voted) = tokio::join!(a_zero.commit(1), a_one.commit(1));
    assert!(matches!(zero_voted, Err(RelayError::Fenced(_))), "{zero_voted:?}");
    assert!(matches!(one_voted, Err(RelayError::Fenced(_))), "{one_voted:?}");

    // a's producer is set up again; partition 1's relay says so once, so
    // that its owner checks the journal before anything of the partition
    // goes into a transaction of the new producer. Then a goes on with
    // partition 1, b with partition 0.
    let unchecked = a_one.produce(vec![test_event(&topic, "y2", 0)]).await;
    assert!(matches!(unchecked, Err(RelayError::Fenced(_))), "{unchecked:?}");
    a_one.produce(vec![test_event(&topic, "y2", 0)]).await.unwrap();
    a_one.commit(1).await.unwrap();
    // So does a relay that had nothing in the fenced transaction: its
    // partition too may have been taken over before the fence.
    let unchecked = a_two.produce(vec![test_event(&topic, "w", 0)]).await;
    assert!(matches!(unchecked, Err(RelayError::Fenced(_))), "{unchecked:?}");
    b_zero.produce(vec![test_event(&topic, "z", 0)]).await.unwrap();
    b_zero.commit(1).await.unwrap();
    assert_eq!(committed_keys(&topic, 0).await, ["y2", "z"], "nothing of the fenced transaction");
    assert_eq!(b_zero.position().await.unwrap(), Some(1));
}

/// A processor's partitions share two producers (lanes): once a lane's
/// transaction is sealed, the next begins on the other lane, the one idle
/// the longest. A takeover fences both lanes of the previous owner: what
/// it had open on either commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_fences_every_lane_of_the_previous_owner() {
    use sluice_processors::kafka::{Relay, RelayError, RelayFactory};

    require_stack().await;
    let tenant = TestTenant::new();
    let (a, [zero_ref, one_ref], topic) = relay_partitions(&tenant).await;
    let b = relays_of(&tenant);
    let (a_zero, _) = a.open(&zero_ref, "a").await.unwrap();
    let (a_one, _) = a.open(&one_ref, "a").await.unwrap();
    let [first_lane, second_lane] = sluice_processors::kafka::producer_names(&one_ref, "a");

    // The first transaction goes on the first lane; the next, begun after
    // it, on the second.
    a_zero.produce(vec![test_event(&topic, "x", 0)]).await.unwrap();
    a_zero.commit(1).await.unwrap();
    a_one.produce(vec![test_event(&topic, "y", 0)]).await.unwrap();
    let state = |id| async move { sluice_processors::hanging::describe_transaction(KAFKA, id).await.unwrap().state };
    let first = state(&first_lane).await;
    assert!(["PrepareCommit", "CompleteCommit"].contains(&first.as_str()), "first lane: {first}");
    assert_eq!(state(&second_lane).await, "Ongoing", "second lane");

    // b takes partition 1 over while a's transaction on the second lane is open.
    b.fence(&one_ref, &["a".to_owned()]).await.unwrap();
    let (_b_one, position) = b.open(&one_ref, "b").await.unwrap();
    assert_eq!(position.committed, None);
    let voted = a_one.commit(1).await;
    assert!(matches!(voted, Err(RelayError::Fenced(_))), "{voted:?}");
    assert_eq!(committed_keys(&topic, 0).await, ["x"], "nothing of the fenced lane's transaction");
}

/// An event of order `key` carrying journal seq `seq`, for `topic`.
fn test_event(topic: &str, key: &str, seq: i64) -> sluice_processors::kafka::OutgoingEvent {
    use sluice_schemas::orders::{OrderCancelled, OrderEvent};
    let cancelled = OrderEvent::Cancelled(OrderCancelled {
        event_id: uuid::Uuid::new_v4().to_string(),
        order_id: key.into(),
        version: 1,
        occurred_at: chrono::Utc::now().timestamp_millis(),
        reason: "a test".into(),
    });
    sluice_processors::kafka::OutgoingEvent {
        topic: topic.to_owned(),
        key: key.into(),
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type: cancelled.event_type().into(),
        source: "/sluice/test".into(),
        time_ms: chrono::Utc::now().timestamp_millis(),
        avro: cancelled.to_avro(),
        traceparent: None,
        seq,
    }
}

/// The events topic tells how far a relay went, whatever its group's
/// position says: the highest journal seq among the relay's records a
/// `read_committed` reader sees, read back from each partition's end past
/// other relays' records, never counting an aborted transaction's, and only
/// once a transaction open when asked has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_topic_tells_how_far_a_relay_went() {
    use rdkafka::producer::Producer;
    use sluice_processors::kafka::{relay_name, Relay, RelayFactory};

    require_stack().await;
    let tenant = TestTenant::new();
    let (relays, partition, topic) = hanging_setup(&tenant, 3).await;
    let name = relay_name(&partition);
    let (relay, _) = relays.open(&partition, "first").await.unwrap();
    assert_eq!(relay.relayed_on_topic().await.unwrap(), None, "nothing relayed yet");

    let transaction = |records, commit| in_transaction(&topic, records, commit);
    let ours = |p: i32, seq: i64| (p, name.clone(), seq);
    transaction(vec![ours(0, 0), ours(2, 1), ours(1, 2), ours(0, 3), ours(1, 4)], true).await;
    // Aborted: never counted.
    let aborted = transaction(vec![ours(2, 9)], false).await;
    tokio::task::spawn_blocking(move || aborted.abort_transaction(WAIT).unwrap()).await.unwrap();
    // Another relay's records after ours: more than one look back reads.
    let others = (0..2_500).map(|seq| (1, format!("{name}-other"), 100 + seq)).collect();
    transaction(others, true).await;
    assert_eq!(relay.relayed_on_topic().await.unwrap(), Some(5));

    // A transaction open when asked: the answer waits for its end.
    let open = transaction(vec![ours(0, 7)], false).await;
    let asked = tokio::time::timeout(Duration::from_secs(2), relay.relayed_on_topic()).await;
    assert!(asked.is_err(), "answered while a transaction was open: {asked:?}");
    tokio::task::spawn_blocking(move || open.commit_transaction(WAIT).unwrap()).await.unwrap();
    assert_eq!(relay.relayed_on_topic().await.unwrap(), Some(8));
}

/// A transaction its coordinator forgot on a partition (seen after a Kafka
/// restart) holds the partition's last stable offset at its first record
/// for ever, and every `read_committed` reader with it. Made here the way it
/// arises: records of the relay's producer on partitions its coordinator
/// never heard of (the broker's check that refuses such records is switched
/// off for the write). The next owner of the relay ends them: one whose
/// records the relay position counts as relayed (its transaction committed
/// everywhere else) is committed, one past the position is aborted (the
/// journal has its entries produced again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_ends_the_transactions_its_coordinator_forgot() {
    use sluice_processors::hanging::Broker;
    use sluice_processors::kafka::{Relay, RelayFactory};

    require_stack().await;
    let (relays, partition, topic) = hanging_setup(&TestTenant::new(), 3).await;
    let name = sluice_processors::kafka::relay_name(&partition);

    // An owner relays up to journal seq 3; its producer, as the coordinator knows it.
    let (first, producer) = relayed_to_3(&relays, &partition).await;

    // Records of that producer in a transaction on events partitions 1
    // (entry 2: relayed) and 2 (entry 5: not yet), which the coordinator
    // never added to a transaction.
    let mut broker = Broker::connect(KAFKA).await.unwrap();
    let owner = Some((producer.producer_id, producer.producer_epoch));
    produce_unverified(&mut broker, &topic, &name, owner, &[(1, "2"), (2, "5")]).await;
    drop(first);
    // Another relay's transaction after them: the partitions end with its
    // commit marker, as they mostly do.
    let other = format!("{name}-other");
    in_transaction(&topic, vec![(1, other.clone(), 0), (2, other, 0)], true).await;
    for p in [1, 2] {
        // Its markers are written after its commit returns.
        let (stable, end) = eventually(WAIT, "the other transaction's marker", || {
            let topic = &topic;
            async move {
                let mut broker = Broker::connect(KAFKA).await.unwrap();
                let (stable, end) = stable_and_end(&mut broker, topic, p).await;
                (end == stable + 3).then_some((stable, end))
            }
        })
        .await;
        assert_eq!(end, stable + 3, "read_committed readers of partition {p} stop at the forgotten record");
    }

    // The next owner fences the first one's producer and ends both: readers
    // get past them; the relayed entry's record is readable, the other's is
    // not (it is produced again).
    relays.fence(&partition, &["first".to_owned()]).await.unwrap();
    let (second, position) = relays.open(&partition, "second").await.unwrap();
    assert_eq!(position.committed, Some(3));
    for p in [1, 2] {
        let (stable, end) = stable_and_end(&mut broker, &topic, p).await;
        assert_eq!(stable, end, "the forgotten transaction on partition {p} is ended");
    }
    assert_eq!(committed_keys(&topic, 1).await, ["entry-2", "k"], "committed: the relay position counts it");
    assert_eq!(committed_keys(&topic, 2).await, ["k"], "aborted: past the relay position");
    second.produce(vec![]).await.unwrap();
    second.commit(4).await.unwrap();
}

/// A partition can come to hang after its owner last looked (the chaos
/// test saw readers held for good once, a partition's owner unchanged). The
/// sweep every consumer of a partition runs ends such a transaction, beside
/// the owner's live one, which it leaves alone. A forgotten transaction
/// whose entry a later transaction produced again is aborted even though
/// the relay position counts that entry: the later copy is the one that
/// counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_ends_a_transaction_forgotten_after_the_owner_took_over_and_leaves_the_live_one() {
    use sluice_processors::hanging::Broker;
    use sluice_processors::kafka::{Relay, RelayFactory};

    require_stack().await;
    let (relays, partition, topic) = hanging_setup(&TestTenant::new(), 4).await;
    let name = sluice_processors::kafka::relay_name(&partition);
    let (first, older) = relayed_to_3(&relays, &partition).await;
    drop(first);

    // The next owner takes over (nothing hangs yet), relays up to 6, and
    // has a transaction open on one partition when forgotten records of the
    // older epoch turn up on the three others: entry 1 (relayed), entry 2
    // (relayed, but produced again later) and entry 7 (past the position).
    // (On the live transaction's partition they would be one transaction
    // with it: the broker tracks one open transaction per producer id.)
    relays.fence(&partition, &["first".to_owned()]).await.unwrap();
    let (second, _) = relays.open(&partition, "second").await.unwrap();
    second.produce(vec![]).await.unwrap();
    second.commit(6).await.unwrap();
    let live = test_event(&topic, "live", 6);
    let live = second.produce(vec![live]).await.unwrap()[0].partition;
    let others: Vec<i32> = (0..4).filter(|&p| p != live).collect();
    let mut broker = Broker::connect(KAFKA).await.unwrap();
    let owner = Some((older.producer_id, older.producer_epoch));
    let forgotten = [(others[0], "1"), (others[1], "2"), (others[2], "7")];
    produce_unverified(&mut broker, &topic, &name, owner, &forgotten).await;
    produce_unverified(&mut broker, &topic, &name, None, &[(others[1], "2")]).await;
    let mut ends = std::collections::BTreeMap::new();
    for p in 0..4 {
        let (stable, end) = stable_and_end(&mut broker, &topic, p).await;
        assert!(stable < end, "read_committed readers of partition {p} are held");
        ends.insert(p, end);
    }

    relays.sweep(&partition).await;
    let (stable, _) = stable_and_end(&mut broker, &topic, live).await;
    assert!(stable < ends[&live], "the live transaction on partition {live} is left open");
    for &p in &others {
        let (stable, _) = stable_and_end(&mut broker, &topic, p).await;
        assert!(stable >= ends[&p], "the forgotten transaction on partition {p} is ended");
    }
    second.commit(7).await.unwrap();
    // The commit's markers are written after the commit returns.
    for p in 0..4 {
        let topic = &topic;
        eventually(WAIT, &format!("nothing holding partition {p} once the owner committed"), || async move {
            let mut broker = Broker::connect(KAFKA).await.unwrap();
            let (stable, end) = stable_and_end(&mut broker, topic, p).await;
            (stable == end).then_some(())
        })
        .await;
    }
    assert_eq!(committed_keys(&topic, live).await, ["live"], "the live transaction's record is committed");
    assert_eq!(committed_keys(&topic, others[0]).await, ["entry-1"], "committed: the relay position counts it");
    assert_eq!(
        committed_keys(&topic, others[1]).await,
        ["entry-2"],
        "only the later copy: the forgotten one is aborted"
    );
    assert!(committed_keys(&topic, others[2]).await.is_empty(), "aborted: past the relay position");
}

/// A transaction whose producer the coordinator no longer knows at all
/// (another producer id than the relay's now) is not found by its epoch:
/// once its producer has not written for longer than a transaction may
/// live, a sweep ends it if its records are the relay's, and leaves
/// another relay's to that relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_ends_a_stale_transaction_of_a_producer_id_the_coordinator_lost() {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::hanging::Broker;
    use sluice_processors::kafka::{Relay, RelayFactory};

    require_stack().await;
    let (relays, partition, topic) = hanging_setup(&TestTenant::new(), 3).await;
    let name = sluice_processors::kafka::relay_name(&partition);
    let neighbour = PartitionRef { partition: 1, ..partition.clone() };
    let neighbour_name = sluice_processors::kafka::relay_name(&neighbour);
    let (owner, _) = relays.open(&partition, "owner").await.unwrap();
    owner.produce(vec![]).await.unwrap();
    owner.commit(3).await.unwrap();

    // Producer ids no coordinator holds any more, last written ten minutes
    // ago: entry 1 of this relay (relayed) on partition 0, entry 4 of this
    // relay (not yet) on partition 1, and one of the neighbour relay on
    // partition 2.
    let mut broker = Broker::connect(KAFKA).await.unwrap();
    let long_ago = chrono::Utc::now().timestamp_millis() - 600_000;
    let lost = 1_000_000_000 + rand_id();
    produce_unverified_at(&mut broker, &topic, &name, Some((lost, 0)), &[(0, "1"), (1, "4")], long_ago).await;
    produce_unverified_at(&mut broker, &topic, &neighbour_name, Some((lost + 1, 0)), &[(2, "9")], long_ago).await;
    for p in 0..3 {
        let (stable, end) = stable_and_end(&mut broker, &topic, p).await;
        assert_eq!(end, stable + 1, "read_committed readers of partition {p} stop at the lost producer's record");
    }

    relays.sweep(&partition).await;
    for p in 0..2 {
        let (stable, end) = stable_and_end(&mut broker, &topic, p).await;
        assert_eq!(stable, end, "this relay's stale transaction on partition {p} is ended");
    }
    let (stable, end) = stable_and_end(&mut broker, &topic, 2).await;
    assert_eq!(end, stable + 1, "the neighbour relay's is left to it");
    assert_eq!(committed_keys(&topic, 0).await, ["entry-1"], "committed: the relay position counts it");
    assert!(committed_keys(&topic, 1).await.is_empty(), "aborted: past the relay position");

    relays.sweep(&neighbour).await;
    let (stable, end) = stable_and_end(&mut broker, &topic, 2).await;
    assert_eq!(stable, end, "the neighbour relay's sweep ends its own");
}

/// A producer id unlikely to be one Kafka handed out.
fn rand_id() -> i64 {
    i64::from(uuid::Uuid::new_v4().as_fields().0 >> 1)
}

/// A processor sweeps the relay of every partition it consumes on a timer,
/// owned or not: a transaction forgotten after the partition's last owner
/// left is ended though no command ever comes to the partition again (a
/// partition is taken over only at its first delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processor_ends_a_forgotten_transaction_of_a_partition_no_command_comes_to() {
    use sluice_processors::hanging::Broker;
    use sluice_processors::kafka::RelayFactory;

    require_stack().await;
    let tenant = TestTenant::new();
    let (relays, partition, topic) = hanging_setup(&tenant, 3).await;
    let name = sluice_processors::kafka::relay_name(&partition);
    let (first, older) = relayed_to_3(&relays, &partition).await;
    drop(first);
    // A later owner came and went; then entry 5 of the first one's epoch
    // turns up on partition 1, in no transaction its coordinator knows.
    relays.fence(&partition, &["first".to_owned()]).await.unwrap();
    drop(relays.open(&partition, "second").await.unwrap());
    let mut broker = Broker::connect(KAFKA).await.unwrap();
    produce_unverified(&mut broker, &topic, &name, Some((older.producer_id, older.producer_epoch)), &[(1, "5")]).await;
    let (stable, end) = stable_and_end(&mut broker, &topic, 1).await;
    assert_eq!(end, stable + 1, "read_committed readers of partition 1 stop at the forgotten record");

    let mut settings = test_settings(&[&tenant]);
    settings.processor.hanging_sweep_interval_ms = 500;
    let platform = Platform::start(settings, Role::Processor).await;
    eventually(WAIT, "the forgotten transaction ended", || {
        let topic = topic.clone();
        async move {
            let mut broker = Broker::connect(KAFKA).await.ok()?;
            let (stable, end) = stable_and_end(&mut broker, &topic, 1).await;
            (stable == end).then_some(())
        }
    })
    .await;
    assert!(committed_keys(&topic, 1).await.is_empty(), "aborted: past the relay position");
    platform.stop().await.unwrap();
}

/// Writes (partition, relay, seq) records to `topic` in a transaction of a
/// producer of its own, committed or left open (the producer is returned).
async fn in_transaction(
    topic: &str,
    records: Vec<(i32, String, i64)>,
    commit: bool,
) -> rdkafka::producer::BaseProducer {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("transactional.id", format!("test-{}", uuid::Uuid::new_v4()))
            .create()
            .unwrap();
        producer.init_transactions(WAIT).unwrap();
        producer.begin_transaction().unwrap();
        for (p, relay, seq) in &records {
            let seq = seq.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "sluice-relay", value: Some(relay.as_str()) })
                .insert(Header { key: "sluice-seq", value: Some(seq.as_str()) });
            let record = BaseRecord::to(&topic).partition(*p).key("k").payload("v").headers(headers);
            producer.send(record).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(WAIT).unwrap();
        if commit {
            producer.commit_transaction(WAIT).unwrap();
        }
        producer
    })
    .await
    .unwrap()
}

/// A first owner of `partition`'s relay that relayed up to journal seq 3,
/// with its producer as the coordinator knows it.
async fn relayed_to_3(
    relays: &sluice_processors::kafka::KafkaRelays,
    partition: &sluice_processors::amqp::consumer::PartitionRef,
) -> (sluice_processors::kafka::KafkaRelay, sluice_processors::hanging::TransactionState) {
    use sluice_processors::kafka::{Relay, RelayFactory};
    let (first, _) = relays.open(partition, "first").await.unwrap();
    first.produce(vec![]).await.unwrap();
    first.commit(3).await.unwrap();
    let [producer, _] = sluice_processors::kafka::producer_names(partition, "first");
    (first, sluice_processors::hanging::describe_transaction(KAFKA, &producer).await.unwrap())
}

/// `tenant`'s orders topic (of `partitions`) and the Kafka relays,
/// with partition 0 of its orders commands.
async fn hanging_setup(
    tenant: &TestTenant,
    partitions: i32,
) -> (sluice_processors::kafka::KafkaRelays, sluice_processors::amqp::consumer::PartitionRef, String) {
    use sluice_processors::amqp::consumer::PartitionRef;
    use sluice_processors::kafka;
    let topic = sluice_schemas::names::events_topic(&tenant.name, "orders");
    kafka::ensure_topics(KAFKA, std::slice::from_ref(&topic), partitions, Default::default()).await.unwrap();
    kafka::ensure_relay_topic(KAFKA, 1, Default::default()).await.unwrap();
    let partition = PartitionRef { tenant: tenant.name.clone(), context: "orders", partition: 0 };
    (relays_of(tenant), partition, topic)
}

/// A processor's relays for `N` command partitions of `tenant`'s orders
/// (the relay topic grown to `N`), whose events share a one-partition topic.
async fn relay_partitions<const N: usize>(
    tenant: &TestTenant,
) -> (sluice_processors::kafka::KafkaRelays, [sluice_processors::amqp::consumer::PartitionRef; N], String) {
    let (relays, zero, topic) = hanging_setup(tenant, 1).await;
    sluice_processors::kafka::ensure_relay_topic(KAFKA, N as u16, Default::default()).await.unwrap();
    let refs = std::array::from_fn(|p| sluice_processors::amqp::consumer::PartitionRef {
        partition: p as u16,
        ..zero.clone()
    });
    (relays, refs, topic)
}

/// A processor's relays for `tenant` (each call another processor's).
fn relays_of(tenant: &TestTenant) -> sluice_processors::kafka::KafkaRelays {
    use sluice_streams::clusters::{Cluster, Clusters};
    let clusters = Clusters::new(vec![Cluster { brokers: KAFKA.into(), tenants: vec![tenant.name.clone()] }]);
    sluice_processors::kafka::KafkaRelays::new(clusters, &test_settings(&[tenant]).registry.url).unwrap()
}

/// Writes one record per (partition, entry seq) of relay `name` to `topic`,
/// keyed `entry-<seq>`, stamped now: as transactional records of `producer`
/// (id, epoch) that no coordinator added to a transaction, with the
/// broker's check that refuses those switched off for the write; or,
/// without a producer, as plain records.
async fn produce_unverified(
    broker: &mut sluice_processors::hanging::Broker,
    topic: &str,
    name: &str,
    producer: Option<(i64, i16)>,
    records: &[(i32, &str)],
) {
    produce_unverified_at(broker, topic, name, producer, records, chrono::Utc::now().timestamp_millis()).await
}

/// [`produce_unverified`] with the records stamped `written_at` (ms).
async fn produce_unverified_at(
    broker: &mut sluice_processors::hanging::Broker,
    topic: &str,
    name: &str,
    producer: Option<(i64, i16)>,
    records: &[(i32, &str)],
    written_at: i64,
) {
    use kafka_protocol::messages::incremental_alter_configs_request::{AlterConfigsResource, AlterableConfig};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{IncrementalAlterConfigsRequest, ProduceRequest, TopicName, TransactionalId};
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    let verification = |value: &'static str| {
        IncrementalAlterConfigsRequest::default().with_resources(vec![AlterConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(StrBytes::from_static_str("1"))
            .with_configs(vec![AlterableConfig::default()
                .with_name(StrBytes::from_static_str("transaction.partition.verification.enable"))
                .with_config_operation(0)
                .with_value(Some(StrBytes::from_static_str(value)))])])
    };
    let batch = |seq: &str| {
        let record = Record {
            transactional: producer.is_some(),
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: producer.map_or(-1, |p| p.0),
            producer_epoch: producer.map_or(-1, |p| p.1),
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: if producer.is_some() { 0 } else { -1 },
            timestamp: written_at,
            key: Some(bytes::Bytes::from(format!("entry-{seq}"))),
            value: Some(bytes::Bytes::from_static(b"a relayed event")),
            headers: [
                (StrBytes::from_static_str("sluice-relay"), Some(bytes::Bytes::from(name.to_owned()))),
                (StrBytes::from_static_str("sluice-seq"), Some(bytes::Bytes::from(seq.to_owned()))),
            ]
            .into_iter()
            .collect(),
        };
        let mut batch = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut batch,
            [&record],
            &RecordEncodeOptions { version: 2, compression: Compression::None },
        )
        .unwrap();
        batch.freeze()
    };
    let produce = ProduceRequest::default()
        .with_transactional_id(producer.map(|_| TransactionalId(StrBytes::from_string(name.to_owned()))))
        .with_acks(-1)
        .with_timeout_ms(10_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
            .with_partition_data(
                records
                    .iter()
                    .map(|(p, seq)| PartitionProduceData::default().with_index(*p).with_records(Some(batch(seq))))
                    .collect(),
            )]);
    if producer.is_none() {
        let produced = broker.send(produce, 9).await.unwrap();
        let written = &produced.responses[0].partition_responses;
        assert!(written.iter().all(|p| p.error_code == 0), "{produced:?}");
        return;
    }
    let altered = broker.send(verification("false"), 0).await.unwrap();
    assert!(altered.responses.iter().all(|r| r.error_code == 0), "{altered:?}");
    // The switch reaches the broker through its metadata log: until then
    // the coordinator's check refuses the records, as "not added to the
    // transaction" (48), at an epoch it has moved past as "invalid producer
    // epoch" (47), of a producer id it does not hold for the transactional
    // id as "invalid producer id mapping" (49).
    let deadline = tokio::time::Instant::now() + WAIT;
    let produced = loop {
        let produced = broker.send(produce.clone(), 9).await.unwrap();
        let refused = produced.responses[0].partition_responses.iter().any(|p| [47, 48, 49].contains(&p.error_code));
        if !refused || tokio::time::Instant::now() > deadline {
            break produced;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the switch propagating
    };
    let restored = broker.send(verification("true"), 0).await.unwrap();
    assert!(restored.responses.iter().all(|r| r.error_code == 0), "{restored:?}");
    let written = &produced.responses[0].partition_responses;
    assert!(written.iter().all(|p| p.error_code == 0), "{produced:?}");
}

/// The keys a `read_committed` reader finds in a partition.
async fn committed_keys(topic: &str, partition: i32) -> Vec<String> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("group.id", format!("committed-keys-{}", uuid::Uuid::new_v4()))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Beginning).unwrap();
        reader.assign(&assignment).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let mut keys = Vec::new();
        while std::time::Instant::now() < deadline {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => keys.push(String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned()),
                Some(Err(KafkaError::PartitionEOF(_))) => return keys,
                Some(Err(e)) => panic!("reading {topic}/{partition}: {e}"),
                None => {}
            }
        }
        panic!("no end of {topic}/{partition} within {WAIT:?}");
    })
    .await
    .unwrap()
}

/// A partition's last stable offset (what `read_committed` readers reach)
/// and its end.
async fn stable_and_end(broker: &mut sluice_processors::hanging::Broker, topic: &str, partition: i32) -> (i64, i64) {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::{BrokerId, ListOffsetsRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    let mut offsets = [0; 2];
    for (isolation, offset) in offsets.iter_mut().enumerate() {
        let listed = broker
            .send(
                ListOffsetsRequest::default()
                    .with_replica_id(BrokerId(-1))
                    .with_isolation_level(1 - isolation as i8)
                    .with_topics(vec![ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                        .with_partitions(vec![ListOffsetsPartition::default()
                            .with_partition_index(partition)
                            .with_timestamp(-1)])]),
                5,
            )
            .await
            .unwrap();
        let answer = &listed.topics[0].partitions[0];
        assert_eq!(answer.error_code, 0, "{listed:?}");
        *offset = answer.offset;
    }
    (offsets[0], offsets[1])
}

/// A round's stream rows and records go out batched by the replicas that
/// hold them: every stream's events and every record are written, the
/// later order of a record still wins, and no stream's rows are split
/// across batches (its batch is applied whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rounds_streams_and_records_written_in_shared_batches_are_all_there_and_whole() {
    use sluice_processors::event_store::{CqlEventStore, EventStore, StoredEvent, StreamRef};
    use sluice_processors::operations::{CqlOperationStore, OperationRef, OperationStore, Order, Status};
    let session = cql_sluice().await;
    let tenant = TestTenant::new();
    let store = CqlEventStore::new(session.clone()).await.unwrap();
    let event = |stream: usize, version: i64| StoredEvent {
        version,
        event_id: format!("e-{stream}-{version}"),
        event_type: "com.example.orders.OrderSubmitted".into(),
        payload: json!({ "n": version }),
        command_key: format!("k-{stream}-{version}"),
        operation_id: format!("op-{stream}"),
        recorded_at_ms: 1_764_000_000_000,
    };
    // 60 streams of one event and one of 40 (more than a batch holds).
    let ids: Vec<String> = (0..61).map(|i| format!("order-{i}")).collect();
    let events: Vec<Vec<StoredEvent>> =
        (0..61).map(|i| (1..=if i == 60 { 40 } else { 1 }).map(|v| event(i, v)).collect()).collect();
    let streams: Vec<(StreamRef<'_>, &[StoredEvent])> = ids
        .iter()
        .zip(&events)
        .map(|(id, events)| (StreamRef { tenant: &tenant.name, context: "orders", stream_id: id }, events.as_slice()))
        .collect();
    store.write_all(&streams).await.unwrap();
    for (stream, written) in &streams {
        let loaded = store.load(*stream).await.unwrap();
        assert_eq!(loaded.len(), written.len(), "every event of {}", stream.stream_id);
    }
    // Read back in reads of several streams (more than one read holds), in
    // another order and with a stream never written: each history whole,
    // in version order, where it was asked for.
    let never = StreamRef { tenant: &tenant.name, context: "orders", stream_id: "order-never" };
    let mut asked: Vec<StreamRef<'_>> = streams.iter().rev().map(|(stream, _)| *stream).collect();
    asked.insert(7, never);
    asked.push(asked[3]);
    let loaded = store.load_all(&asked).await.unwrap();
    assert_eq!(loaded.len(), asked.len());
    for (stream, history) in asked.iter().zip(&loaded) {
        assert_eq!(history, &store.load(*stream).await.unwrap(), "the history of {}", stream.stream_id);
    }
    assert!(loaded[7].is_empty(), "a stream never written loads empty");
    assert!(!loaded[3].is_empty() && loaded.last() == Some(&loaded[3]), "a stream asked for twice loads twice");
    assert_eq!(loaded[0].iter().map(|e| e.version).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
    // How the store groups them: each stream whole, no batch over 32 rows
    // unless it is one stream alone.
    let upsert = session
        .prepare(
            "INSERT INTO events (tenant, context, stream_id, version, event_id, event_type, payload, command_key, \
             operation_id, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .await
        .unwrap();
    let units: Vec<Vec<(String, String, String, i64)>> = (0..61)
        .map(|i| {
            events[i].iter().map(|e| (tenant.name.clone(), "orders".to_owned(), ids[i].clone(), e.version)).collect()
        })
        .collect();
    type EventRow<'a> =
        (&'a str, &'a str, &'a str, i64, &'a str, &'a str, String, &'a str, &'a str, scylla::value::CqlTimestamp);
    fn values(u: &[(String, String, String, i64)]) -> Vec<EventRow<'_>> {
        u.iter()
            .map(|(t, c, s, v)| {
                (
                    t.as_str(),
                    c.as_str(),
                    s.as_str(),
                    *v,
                    "e",
                    "ty",
                    "{}".to_owned(),
                    "k",
                    "op",
                    scylla::value::CqlTimestamp(0),
                )
            })
            .collect()
    }
    let cluster = session.get_cluster_state();
    let batches = sluice_streams::replicas::batches(units.iter().map(|u| values(u)), 32, |row| {
        sluice_streams::replicas::of(&cluster, &upsert, row)
    });
    assert!(batches.len() < 61, "streams on the same replicas share batches ({} batches)", batches.len());
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 100, "every row once");
    for batch in &batches {
        let streams: std::collections::BTreeSet<&str> = batch.iter().map(|row| row.2).collect();
        assert!(batch.len() <= 32 || streams.len() == 1, "a batch over 32 rows is one stream alone");
        for stream in streams {
            let rows = batch.iter().filter(|row| row.2 == stream).count();
            let whole = units.iter().find(|u| u[0].2 == stream).unwrap().len();
            assert_eq!(rows, whole, "{stream} whole in one batch");
        }
    }

    let operations = CqlOperationStore::new(session.clone(), "batched").await.unwrap();
    let op_ids: Vec<String> = (0..50).map(|i| format!("op-batched-{i}")).collect();
    let refs: Vec<OperationRef<'_>> = op_ids
        .iter()
        .map(|id| OperationRef {
            tenant: &tenant.name,
            operation_id: id,
            command_type: "com.example.orders.SubmitOrder",
            source: &tenant.source,
            command_id: id,
        })
        .collect();
    let (first, next) = (Order { epoch: 3, attempt: 1 }, Order { epoch: 4, attempt: 0 });
    let rejected: Vec<_> = refs.iter().map(|op| (*op, Status::Rejected("no".into()))).collect();
    operations.record_all(&rejected, next).await.unwrap();
    let succeeded: Vec<_> = refs.iter().map(|op| (*op, Status::Succeeded(vec![]))).collect();
    operations.record_all(&succeeded, first).await.unwrap();
    let ids: Vec<&str> = op_ids.iter().map(String::as_str).collect();
    let found = operations.statuses(&tenant.name, &ids).await.unwrap();
    assert_eq!(found.len(), 50, "every record written");
    assert!(found.values().all(|s| s == "rejected"), "the newer owner's answer stands: {found:?}");
}
