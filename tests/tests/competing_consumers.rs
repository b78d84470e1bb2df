//! Processor processes competing on one queue: all of them get work, and one
//! killed with SIGKILL mid-stream loses nothing and appends nothing twice.

use std::collections::HashSet;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processor_processes_all_receive_work_from_one_queue() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // Small prefetch, so no process grabs the whole backlog.
    settings.processor.prefetch = 2;
    let queue = format!("{}.orders.commands", tenant.name);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processes: Vec<SluiceProcess> = (0..3).map(|_| SluiceProcess::spawn(&settings, "processor")).collect();
    eventually(WAIT, "three consumers on the queue", || async { (queue_consumers(&queue).await == 3).then_some(()) })
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
    assert_eq!(handlers.len(), 3, "every process handled some commands: {handlers:?}");
    drop(processes);
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processor_killed_mid_stream_leaves_every_command_settled_once() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.processor.prefetch = 8;
    let queue = format!("{}.orders.commands", tenant.name);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let mut victim = SluiceProcess::spawn(&settings, "processor");
    let mut survivor = SluiceProcess::spawn(&settings, "processor");
    eventually(WAIT, "two consumers on the queue", || async { (queue_consumers(&queue).await == 2).then_some(()) })
        .await;

    let count = 150;
    let locations = post_orders(&edge, &tenant, "k", count).await;
    // Kill one while it holds unacked deliveries.
    eventually(WAIT, "some commands processed", || async {
        let (_, op) = edge.get_json(&tenant, &locations[20]).await;
        (op["status"] == "succeeded").then_some(())
    })
    .await;
    victim.kill();
    let mut replacement = SluiceProcess::spawn(&settings, "processor");

    for (i, location) in locations.iter().enumerate() {
        let op = edge.await_operation(&tenant, location, WAIT).await;
        assert_eq!(op["status"], "succeeded", "command {i}: {op}");
    }
    for i in 0..count {
        let events = stored_events(&tenant.name, &format!("k-o{i}")).await;
        assert_eq!(events.len(), 1, "order k-o{i} has exactly one event: {events:?}");
    }
    // The kill landed mid-work: deliveries it held came back to the queue.
    eventually(WAIT, "deliveries of the killed processor redelivered", || async {
        (redeliveries(&queue).await > 0).then_some(())
    })
    .await;
    // With every consumer gone, nothing left unacked can hide: an empty
    // queue now means every delivery was acked.
    survivor.terminate();
    replacement.terminate();
    assert_eq!(queue_depth(&queue).await, 0, "every delivery acked");
    assert_eq!(queue_depth(&format!("{queue}.dlq")).await, 0, "nothing dead-lettered");
    edge.stop().await.unwrap();
}
