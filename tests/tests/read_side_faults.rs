//! The read side under faults: a projector killed with SIGKILL mid-stream,
//! twice, neither loses nor double-counts (daily sales add up, every order's
//! row matches its stream in the event store); poison records go to the projection's
//! dead-letter topic with their reason, later events of their key follow them,
//! and everything else keeps flowing.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use sluice_cli::serve::{events_topics, Role};
use sluice_projections::store::ReadModels;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_stream_leaves_daily_sales_equal_to_the_accepted_orders() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processor = Platform::start(settings.clone(), Role::Processor).await;
    let mut projector = SluiceProcess::spawn(&settings, "projector");

    // Orders with known totals; every third one cancelled.
    let count = 90;
    let mut expected_orders = 0i64;
    let mut expected_total = 0i64;
    let mut locations = Vec::new();
    for i in 0..count {
        let quantity = (i % 5) + 1;
        let event = json!({"specversion": "1.0", "id": format!("s{i}"), "source": tenant.source, "type": "com.example.orders.SubmitOrder",
            "data": {"order_id": format!("o{i}"), "customer_id": "c1", "currency": "EUR",
                     "lines": [{"sku": "x", "quantity": quantity, "unit_price_cents": 100}]}});
        let response = edge.post_event(&tenant, &event).await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
        expected_orders += 1;
        expected_total += i64::from(quantity) * 100;
        if i == count / 3 {
            // Mid-stream: no goodbye, no commit.
            projector.kill();
            projector = SluiceProcess::spawn(&settings, "projector");
        }
    }
    for (i, location) in locations.iter().enumerate() {
        assert_eq!(edge.await_operation(&tenant, location, WAIT).await["status"], "succeeded", "order {i}");
    }
    let mut cancels = Vec::new();
    for i in (0..count).step_by(3) {
        let event = command(
            &tenant,
            &format!("c{i}"),
            "com.example.orders.CancelOrder",
            json!({"order_id": format!("o{i}"), "reason": "r"}),
        );
        cancels.push(edge.post_event(&tenant, &event).await.headers()["location"].to_str().unwrap().to_owned());
        expected_orders -= 1;
        expected_total -= i64::from((i % 5) + 1) * 100;
        if i == 30 {
            projector.kill();
            projector = SluiceProcess::spawn(&settings, "projector");
        }
    }
    for location in &cancels {
        assert_eq!(edge.await_operation(&tenant, location, WAIT).await["status"], "succeeded");
    }

    let store = ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap();
    let today = chrono::Utc::now().timestamp_millis();
    let totals = eventually(WAIT, "daily sales to add up", || async {
        let days = store.daily_sales(&tenant.name, today - 86_400_000, today).await.ok()?;
        let (orders, total) = days.iter().fold((0, 0), |(o, t), d| (o + d.orders, t + d.total_cents));
        (orders == expected_orders && total == expected_total).then_some((orders, total))
    })
    .await;
    assert_eq!(totals, (expected_orders, expected_total));
    // And it stays there: the restarted projector re-applied what the killed
    // one had not committed without counting it twice.
    let group = sluice_projections::runner::group_id(&settings.projector, 1);
    let topics = events_topics(std::slice::from_ref(&tenant.name));
    eventually(WAIT, "projector caught up", || async {
        sluice_tests::caught_up(&settings.kafka.brokers, &group, &topics).await.then_some(())
    })
    .await;
    let days = store.daily_sales(&tenant.name, today - 86_400_000, today).await.unwrap();
    let (orders, total) = days.iter().fold((0, 0), |(o, t), d| (o + d.orders, t + d.total_cents));
    assert_eq!((orders, total), (expected_orders, expected_total));
    // Pre-aggregated: the sales of a day are one running total per events
    // partition (the day's slots), whatever the day's volume.
    let partitions: std::collections::BTreeSet<String> =
        read_committed_topic(&topics[0]).await.iter().map(|r| format!("partition {}", r.partition())).collect();
    let slots: Vec<String> = cql_sluice()
        .await
        .query_unpaged(
            format!("SELECT slot FROM {}_sales_by_day_v1 WHERE tenant = ? ALLOW FILTERING", settings.projector.name),
            (&tenant.name,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows::<(String,)>()
        .unwrap()
        .map(|row| row.unwrap().0)
        .collect();
    assert!(slots.iter().all(|s| partitions.contains(s)), "slots {slots:?}, partitions {partitions:?}");
    assert!(slots.len() <= 2 * partitions.len(), "at most one slot per partition and day (two days at midnight)");
    // Row by row: each order's read-model row says what its stream in the
    // event store says, after two kills.
    for i in 0..count {
        let id = format!("o{i}");
        let events = stored_events(&tenant.name, &id).await;
        let (version, last, _) = events.iter().max_by_key(|e| e.0).expect("the order's events");
        let status = if last.ends_with("OrderCancelled") { "cancelled" } else { "submitted" };
        let row = store.order(&tenant.name, &id).await.unwrap().expect("the order's row");
        assert_eq!((row.status.as_deref(), row.version), (Some(status), Some(*version)), "{id}");
    }
    drop(projector);
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}

/// A backlog drained in hundreds of small batches, each made while the one
/// before is written and each counting its sales into the same running
/// totals (a total is read, then written back): SIGKILLed mid-way and
/// restarted, the projector counts every sale once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_while_draining_a_backlog_counts_every_sale_once() {
    use sluice_schemas::orders::{OrderEvent, OrderLine, OrderSubmitted};

    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // Small batches: hundreds of them, each counting into the same few
    // totals as the one before it.
    settings.projector.batch_max_records = 25;
    let topic = format!("{}.orders.events", tenant.name);
    sluice_processors::kafka::ensure_topics(
        &settings.kafka.brokers,
        std::slice::from_ref(&topic),
        settings.processor.topic_partitions,
        settings.kafka.replication(),
    )
    .await
    .unwrap();

    let count = 6_000usize;
    let codec = sluice_schemas::codec::EventCodec::new(&settings.registry.url).unwrap();
    let spec = sluice_schemas::catalog::event_spec(sluice_schemas::orders::ORDER_SUBMITTED).unwrap();
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &settings.kafka.brokers).create().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut expected_total = 0i64;
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        let order_id = format!("b{i}");
        let cents = (i as i64 % 7 + 1) * 100;
        expected_total += cents;
        let event = OrderEvent::Submitted(OrderSubmitted {
            event_id: format!("e{i}"),
            order_id: order_id.clone(),
            version: 1,
            occurred_at: now,
            customer_id: format!("c{}", i % 50),
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "x".into(), quantity: 1, unit_price_cents: cents }],
            total_cents: cents,
        });
        let payload = codec.encode_value(&topic, spec, event.to_avro()).await.unwrap();
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "ce_type", value: Some(sluice_schemas::orders::ORDER_SUBMITTED) })
            .insert(rdkafka::message::Header { key: "ce_id", value: Some(&format!("e{i}")) });
        let record = FutureRecord::to(&topic).key(&order_id).payload(&payload).headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in deliveries {
        assert!(matches!(delivery.await, Ok(Ok(_))), "Kafka took the record");
    }

    // The projector finds the whole backlog; it is killed once it counted
    // some of it, and started again.
    let store = ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap();
    let today = chrono::Utc::now().timestamp_millis();
    let counted = || async {
        let days = store.daily_sales(&tenant.name, today - 86_400_000, today).await.ok()?;
        Some(days.iter().fold((0i64, 0i64), |(o, t), d| (o + d.orders, t + d.total_cents)))
    };
    let mut projector = SluiceProcess::spawn(&settings, "projector");
    let at_kill =
        eventually(WAIT, "the first sales counted", || async { counted().await.filter(|(o, _)| *o > 0) }).await;
    projector.kill();
    projector = SluiceProcess::spawn(&settings, "projector");
    let expected = (count as i64, expected_total);
    let totals = eventually(WAIT, "every sale counted", || async { counted().await.filter(|c| *c == expected) }).await;
    assert_eq!(totals, expected, "killed after {at_kill:?} were counted");
    let group = sluice_projections::runner::group_id(&settings.projector, 1);
    eventually(WAIT, "projector caught up", || async {
        sluice_tests::caught_up(&settings.kafka.brokers, &group, std::slice::from_ref(&topic)).await.then_some(())
    })
    .await;
    assert_eq!(counted().await, Some(expected), "and none twice once caught up");
    drop(projector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_go_to_the_dead_letter_topic_and_their_key_waits_behind_them() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::All).await;
    let topic = format!("{}.orders.events", tenant.name);
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for (key, payload) in [("o-poison", vec![1u8, 2, 3]), ("o-unknown-schema", vec![0, 0x7f, 0xff, 0xff, 0xff, 2, 4])] {
        producer.send(FutureRecord::to(&topic).key(key).payload(&payload), Duration::from_secs(10)).await.unwrap();
    }
    // A real order for the poisoned key, and one for a healthy key.
    for (id, order) in [("p1", "o-poison"), ("f1", "o-fine")] {
        let response = platform.post_event(&tenant, &submit_order(&tenant, id, order, "c1")).await;
        assert_eq!(
            platform.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await["status"],
            "succeeded"
        );
    }
    eventually(WAIT, "the healthy order in the read model", || async {
        (platform.get_json(&tenant, "/orders/o-fine").await.0 == 200).then_some(())
    })
    .await;

    let dlt = sluice_streams::dead_letter::dead_letter_topic(&topic, &settings.projector.name);
    let records = eventually(WAIT, "three dead-lettered records", || async {
        let records = read_topic(&dlt).await;
        (records.len() >= 3).then_some(records)
    })
    .await;
    let by_class: HashMap<String, (String, String)> = records
        .iter()
        .map(|m| {
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|x| x.key == name))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            (
                format!("{}:{}", String::from_utf8_lossy(m.key().unwrap_or_default()), header("sluice_error_class")),
                (header("sluice_reason"), header("sluice_original_topic")),
            )
        })
        .collect();
    assert!(by_class.contains_key("o-poison:undecodable"), "{by_class:?}");
    assert!(by_class.contains_key("o-unknown-schema:undecodable"), "{by_class:?}");
    assert!(by_class.contains_key("o-poison:parked"), "the later event of the poisoned key followed it: {by_class:?}");
    assert!(by_class.values().all(|(reason, original)| !reason.is_empty() && original == &topic));
    let (status, _) = platform.get_json(&tenant, "/orders/o-poison").await;
    assert_eq!(status, 404, "not applied out of order behind its poison");
    platform.stop().await.unwrap();

    // A replay and a rebuild of the log meet the same poison: it counts as
    // dead-lettered, its key is parked (in the new version too), and the
    // dead-letter topic does not get a second copy.
    use sluice_projections::replay::{self, ReplayCtx, StartAt};
    use sluice_streams::dead_letter::{key_state, read_to_end, Parking};
    let in_dlt = read_to_end(&settings.kafka.brokers, &dlt).await.expect("the DLT").len();
    let store = std::sync::Arc::new(ReadModels::new(cql_sluice().await, &settings.projector).await.unwrap());
    let ctx = ReplayCtx {
        config: settings.projector.clone(),
        brokers: settings.kafka.brokers.clone(),
        registry_url: settings.registry.url.clone(),
        topics: vec![topic.clone()],
        store: store.clone(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let replayed = replay::replay(&ctx, ctx.orders(), StartAt::Earliest, &stop, |_| {}).await.expect("replay");
    assert_eq!(replayed.dead_lettered, 3, "{replayed:?}");
    let rebuilt = replay::rebuild(&ctx, ctx.orders(), StartAt::Earliest, false, &stop, |_| {}).await.expect("rebuild");
    assert_eq!((rebuilt.version, rebuilt.dead_lettered), (2, 3), "{rebuilt:?}");
    let after = read_to_end(&settings.kafka.brokers, &dlt).await.expect("the DLT");
    assert_eq!(after.len(), in_dlt, "no record dead-lettered twice");
    let parked = key_state(store.session(), &settings.projector.name, 2, &topic, "o-poison").await.unwrap();
    assert_eq!(parked, Parking::Parked, "the rebuilt version parks the key too");
    let applied = store.order(&tenant.name, "o-poison").await.unwrap();
    assert!(applied.is_none(), "not applied out of order in the rebuilt version either: {applied:?}");
}

/// Members of consumer group `group`.
async fn group_members(group: &str) -> usize {
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().expect("kafka client");
        let groups = rdkafka::consumer::Consumer::fetch_group_list(&consumer, Some(&group), Duration::from_secs(5));
        groups.map(|list| list.groups().first().map_or(0, |g| g.members().len())).unwrap_or(0)
    })
    .await
    .expect("group lookup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_moved_to_another_projector_keeps_the_keys_its_former_owner_parked_parked() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processor = Platform::start(settings.clone(), Role::Processor).await;
    let group = sluice_projections::runner::group_id(&settings.projector, 1);
    // Two projectors share the topic's partitions, each with the parked keys
    // it read at its start (none).
    let mut first = SluiceProcess::spawn(&settings, "projector");
    let _second = SluiceProcess::spawn(&settings, "projector");
    eventually(WAIT, "both projectors in the group", || async { (group_members(&group).await == 2).then_some(()) })
        .await;

    // Poison for keys on every partition: each projector parks the keys of
    // its own partitions.
    let topic = format!("{}.orders.events", tenant.name);
    let keys: Vec<String> = (0..24).map(|i| format!("o-moved-{i}")).collect();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    for key in &keys {
        producer
            .send(FutureRecord::to(&topic).key(key).payload(&b"\x01not avro"[..]), Duration::from_secs(10))
            .await
            .unwrap();
    }
    let dlt = sluice_streams::dead_letter::dead_letter_topic(&topic, &settings.projector.name);
    eventually(WAIT, "every poison record dead-lettered", || async {
        (read_topic(&dlt).await.len() >= keys.len()).then_some(())
    })
    .await;

    // The first projector leaves: the second takes its partitions over, with
    // the keys the first one parked.
    first.terminate();
    eventually(WAIT, "one projector left in the group", || async { (group_members(&group).await == 1).then_some(()) })
        .await;
    for (i, key) in keys.iter().enumerate() {
        let response = edge.post_event(&tenant, &submit_order(&tenant, &format!("m{i}"), key, "c1")).await;
        let op = edge.await_operation(&tenant, response.headers()["location"].to_str().unwrap(), WAIT).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    let response = edge.post_event(&tenant, &submit_order(&tenant, "m-fine", "o-fine", "c1")).await;
    assert_eq!(response.status(), 202);
    eventually(WAIT, "a healthy order applied by the remaining projector", || async {
        (edge.get_json(&tenant, "/orders/o-fine").await.0 == 200).then_some(())
    })
    .await;
    let records = eventually(WAIT, "every later event dead-lettered behind its poison", || async {
        let records = read_topic(&dlt).await;
        (records.len() >= 2 * keys.len()).then_some(records)
    })
    .await;
    let parked = records
        .iter()
        .filter(|m| {
            m.headers()
                .is_some_and(|h| h.iter().any(|x| x.key == "sluice_error_class" && x.value == Some(&b"parked"[..])))
        })
        .count();
    assert_eq!(parked, keys.len(), "each key's submit followed its poison");
    for key in &keys {
        assert_eq!(edge.get_json(&tenant, &format!("/orders/{key}")).await.0, 404, "{key} not applied out of order");
    }
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}
