//! Processor processes sharing the partitions of a context: every partition
//! has one owner at a time, the partitions spread evenly, a killed or frozen
//! processor's partitions move to the others within seconds, and the
//! commands of one stream are decided in the order the edge accepted them,
//! whatever happens to the processors meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(180);

/// Posts `count` orders and returns their operation URLs.
async fn post_orders(edge: &Platform, tenant: &TestTenant, prefix: &str, count: usize) -> Vec<String> {
    let mut locations = Vec::with_capacity(count);
    for i in 0..count {
        let response = edge
            .post_event(tenant, &submit_order(tenant, &format!("{prefix}{i}"), &format!("{prefix}-o{i}"), "c1"))
            .await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
    }
    locations
}

/// How many partitions each owner holds.
fn shares(owners: &[String]) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for owner in owners {
        *shares.entry(owner.clone()).or_default() += 1;
    }
    shares
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processor_processes_share_the_partitions_evenly_and_all_get_work() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.amqp.partitions = 6;
    let queues = partition_queues(&settings, &tenant, "orders");
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processes: Vec<SluiceProcess> = (0..3).map(|_| SluiceProcess::spawn(&settings, "processor")).collect();
    let owners = eventually(WAIT, "six partitions held two by two by three processors", || async {
        settled_owners(&queues)
            .await
            .filter(|owners| shares(owners).values().all(|&n| n == 2) && shares(owners).len() == 3)
    })
    .await;

    let count = 60;
    let started = Instant::now();
    let locations = post_orders(&edge, &tenant, "cc", count).await;
    let mut handlers = HashSet::new();
    for location in &locations {
        let op = edge.await_operation(&tenant, location, WAIT).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        handlers.insert(op["handled_by"].as_str().unwrap().to_owned());
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{count} commands through 3 processor processes (debug build) in {seconds:.2}s: {:.0}/s",
        count as f64 / seconds
    );
    let owners: HashSet<String> = owners.into_iter().collect();
    assert_eq!(handlers, owners, "each command handled by its partition's owner, and every owner had some");
    drop(processes);
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processors_killed_mid_stream_hand_their_partitions_over_and_every_event_reaches_kafka_once() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.amqp.partitions = 4;
    settings.processor.prefetch = 8;
    let queues = partition_queues(&settings, &tenant, "orders");
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let mut survivor = SluiceProcess::spawn(&settings, "processor");
    let mut locations = Vec::new();
    let per_kill = 300;
    // Three times: a processor joins, takes its share, and is killed while
    // it works through a load (between journal, produce, commit and ack).
    for kill in 0..3 {
        let mut victim = SluiceProcess::spawn(&settings, "processor");
        eventually(WAIT, "the partitions shared by the two processors", || async {
            settled_owners(&queues).await.filter(|owners| shares(owners).len() == 2)
        })
        .await;
        let batch = post_orders(&edge, &tenant, &format!("k{kill}"), per_kill).await;
        let probe = batch[per_kill / 10].clone();
        locations.extend(batch);
        eventually(WAIT, "some commands processed", || async {
            let (_, op) = edge.get_json(&tenant, &probe).await;
            (op["status"] == "succeeded").then_some(())
        })
        .await;
        victim.kill();
        let killed_at = Instant::now();
        // The survivor takes every partition over.
        eventually(WAIT, "every partition held by the survivor", || async {
            settled_owners(&queues).await.filter(|owners| shares(owners).len() == 1)
        })
        .await;
        let moved_in = killed_at.elapsed();
        println!("partitions of a killed processor moved in {moved_in:?}");
        assert!(moved_in < Duration::from_secs(30), "moved within seconds, took {moved_in:?}");
    }

    for (i, location) in locations.iter().enumerate() {
        let op = edge.await_operation(&tenant, location, WAIT).await;
        assert_eq!(op["status"], "succeeded", "command {i}: {op}");
    }
    let orders: Vec<String> = (0..3).flat_map(|kill| (0..per_kill).map(move |i| format!("k{kill}-o{i}"))).collect();
    for order in &orders {
        let events = stored_events(&tenant.name, order).await;
        assert_eq!(events.len(), 1, "order {order} has exactly one event: {events:?}");
    }
    // The kills landed mid-work: deliveries they held came back to the queues.
    eventually(WAIT, "deliveries of the killed processors redelivered", || async {
        (redeliveries_of(&queues).await > 0).then_some(())
    })
    .await;
    // With every consumer gone, nothing left unacked can hide: empty queues
    // now mean every delivery was acked.
    survivor.terminate();
    for queue in &queues {
        assert_eq!(queue_depth(queue).await, 0, "every delivery of {queue} acked");
    }
    let dlq = sluice_schemas::names::dead_letter_queue(&tenant.name, "orders");
    assert_eq!(queue_depth(&dlq).await, 0, "nothing dead-lettered");
    // What a data team reads: each event once, in order, none missing.
    assert_orders_in_kafka_exactly_once(&tenant, &orders).await;
    edge.stop().await.unwrap();
}

/// One client's order: Submit, then Ship, then Cancel, each sent after the
/// previous one's 202. Returns the three operation URLs.
async fn submit_ship_cancel(edge: &Platform, tenant: &TestTenant, order: &str) -> [String; 3] {
    let commands = [
        submit_order(tenant, &format!("{order}-submit"), order, "c1"),
        command(
            tenant,
            &format!("{order}-ship"),
            "com.example.orders.ShipOrder",
            json!({"order_id": order, "carrier": "ups", "tracking_number": "1Z"}),
        ),
        command(
            tenant,
            &format!("{order}-cancel"),
            "com.example.orders.CancelOrder",
            json!({"order_id": order, "reason": "changed my mind"}),
        ),
    ];
    let mut locations = Vec::new();
    for event in &commands {
        let response = edge.post_event(tenant, event).await;
        assert_eq!(response.status(), 202, "{event}");
        locations.push(response.headers()["location"].to_str().unwrap().to_owned());
    }
    locations.try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_processor_delays_its_streams_but_never_reorders_them() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.amqp.partitions = 6;
    let queues = partition_queues(&settings, &tenant, "orders");
    let edge = Arc::new(Platform::start(settings.clone(), Role::Ingest).await);
    let _projector = SluiceProcess::spawn(&settings, "projector");
    let processes: Vec<SluiceProcess> = (0..3).map(|_| SluiceProcess::spawn(&settings, "processor")).collect();
    eventually(WAIT, "the partitions shared by three processors", || async {
        settled_owners(&queues).await.filter(|owners| shares(owners).len() == 3)
    })
    .await;

    // Clients, each running Submit → Ship → Cancel for its orders; one
    // processor is frozen while they run. Each client sends half of its
    // orders before the freeze and half after it, so the freeze lands
    // mid-work however fast the processors are: commands reach the frozen
    // processor's queues while it still holds them.
    let orders_per_client = 6;
    let clients = 24;
    let (froze, frozen_yet) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (edge, tenant, mut frozen_yet) = (edge.clone(), tenant.clone(), frozen_yet.clone());
        tasks.spawn(async move {
            let mut all = Vec::new();
            for i in 0..orders_per_client {
                if i == orders_per_client / 2 {
                    frozen_yet.wait_for(|frozen| *frozen).await.expect("the test awaits the clients");
                }
                let order = format!("f{c}-{i}");
                let ops = submit_ship_cancel(&edge, &tenant, &order).await;
                all.push((order, ops));
            }
            all
        });
    }
    let frozen = &processes[0];
    eventually(WAIT, "the load under way", || async {
        let (_, page) = edge.get_json(&tenant, "/orders/f0-1").await;
        (page["order_id"] == "f0-1").then_some(())
    })
    .await;
    frozen.freeze();
    froze.send_replace(true);
    let frozen_at = Instant::now();
    let mut orders = Vec::new();
    while let Some(client) = tasks.join_next().await {
        orders.extend(client.unwrap());
    }
    // Every command ends while the processor is still frozen: its
    // partitions moved.
    for (order, ops) in &orders {
        for location in ops {
            let op = edge.await_operation(&tenant, location, WAIT).await;
            assert!(["succeeded", "rejected"].contains(&op["status"].as_str().unwrap()), "{order}: {op}");
        }
    }
    println!("{} orders settled {:?} after the freeze", orders.len(), frozen_at.elapsed());
    // The freeze landed mid-work: deliveries it held went to the next owner
    // (the management API's counters lag a few seconds).
    eventually(Duration::from_secs(30), "the frozen processor's deliveries redelivered", || async {
        (redeliveries_of(&queues).await > 0).then_some(())
    })
    .await;
    // Back to life: whatever it was doing when frozen, it finds done.
    frozen.thaw();
    eventually(WAIT, "the thawed processor back among the owners", || async {
        settled_owners(&queues).await.filter(|owners| shares(owners).len() == 3)
    })
    .await;

    for (order, [submit, ship, cancel]) in &orders {
        let submit = edge.await_operation(&tenant, submit, WAIT).await;
        assert_eq!(submit["status"], "succeeded", "{order}: {submit}");
        let ship = edge.await_operation(&tenant, ship, WAIT).await;
        let cancel = edge.await_operation(&tenant, cancel, WAIT).await;
        let statuses = (ship["status"].as_str().unwrap(), cancel["status"].as_str().unwrap());
        let (expected, refused) = match statuses {
            ("succeeded", "rejected") => ("shipped", &cancel),
            ("rejected", "succeeded") => ("cancelled", &ship),
            other => panic!("{order}: exactly one of Ship and Cancel succeeds, got {other:?}: {ship} {cancel}"),
        };
        let reason = refused["error"].as_str().unwrap_or_default();
        assert!(!reason.contains("does not exist"), "{order}: decided before its Submit: {reason}");
        let events = stored_events(&tenant.name, order).await;
        let types: Vec<&str> = events.iter().map(|(_, ty, _)| ty.as_str()).collect();
        let last =
            if expected == "shipped" { "com.example.orders.OrderShipped" } else { "com.example.orders.OrderCancelled" };
        assert_eq!(types, ["com.example.orders.OrderSubmitted", last], "{order}: the event store agrees");
        let path = format!("/orders/{order}");
        eventually(WAIT, "the read model to agree", || async {
            let (_, page) = edge.get_json(&tenant, &path).await;
            (page["status"] == expected).then_some(())
        })
        .await;
    }
    // The thawed processor's late work shows nowhere: Kafka holds each
    // stored event once, in order.
    let names: Vec<String> = orders.iter().map(|(order, _)| order.clone()).collect();
    assert_orders_in_kafka_exactly_once(&tenant, &names).await;
    drop(processes);
}
