//! How many commands per second the edge accepts against the real RabbitMQ,
//! single events and batches, with concurrent clients in this process (so
//! client, edge and broker share the machine). Every answer must be a 202
//! and every accepted command must be in the queue; the figures are printed.
//! For numbers worth quoting, run it in release mode:
//!
//! ```sh
//! cargo test --release -p sluice-tests --test edge_throughput -- --nocapture
//! ```
//!
//! `sluice bench` (a later issue) is the tool for real measurements.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_cli::serve::Role;
use sluice_tests::{delete_queue, orders_queue, queue_depth, submit_order, test_settings, Platform, TestTenant};

const CLIENTS: usize = 32;
const RUN_FOR: Duration = Duration::from_secs(5);
const BATCH: usize = 50;

/// Runs `CLIENTS` loops for `RUN_FOR`, each sending what `body` makes;
/// returns how many requests were answered 202.
async fn drive(
    platform: &Arc<Platform>,
    tenant: &TestTenant,
    content_type: &'static str,
    body: fn(&TestTenant, usize, u64) -> String,
) -> usize {
    let accepted = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + RUN_FOR;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (platform, tenant, accepted) = (platform.clone(), tenant.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let response = platform
                    .http
                    .post(platform.url("/events"))
                    .bearer_auth(&tenant.key)
                    .header("content-type", content_type)
                    .body(body(&tenant, client, n))
                    .send()
                    .await
                    .expect("POST /events");
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                assert_eq!(status, 202, "every request is accepted");
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    accepted.load(Ordering::Relaxed)
}

fn single(tenant: &TestTenant, client: usize, n: u64) -> String {
    submit_order(tenant, &format!("s-{client}-{n}"), &format!("o-{client}-{n}"), "c-1").to_string()
}

fn batch(tenant: &TestTenant, client: usize, n: u64) -> String {
    let events: Vec<Value> = (0..BATCH)
        .map(|i| submit_order(tenant, &format!("b-{client}-{n}-{i}"), &format!("o-{client}-{n}-{i}"), "c-1"))
        .collect();
    Value::Array(events).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepted_commands_per_second() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    settings.ingest.rate_limit_per_second = 0.0;
    let platform = Arc::new(Platform::start(settings, Role::Ingest).await);
    let queue = orders_queue(&tenant);

    let started = Instant::now();
    let singles = drive(&platform, &tenant, "application/cloudevents+json", single).await;
    let single_rate = singles as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let batches = drive(&platform, &tenant, "application/cloudevents-batch+json", batch).await;
    let seconds = started.elapsed().as_secs_f64();
    let (batch_rate, batch_events_rate) = (batches as f64 / seconds, (batches * BATCH) as f64 / seconds);

    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    eprintln!(
        "edge throughput ({profile} build, {CLIENTS} clients, {}s each, {} CPUs): single {single_rate:.0} requests/s; \
         batch of {BATCH}: {batch_rate:.0} requests/s = {batch_events_rate:.0} commands/s",
        RUN_FOR.as_secs(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    assert_eq!(queue_depth(&queue).await as usize, singles + batches * BATCH, "every accepted command is queued");
    assert!(single_rate > 20.0 && batch_events_rate > 20.0, "the edge accepts commands at all");
    Arc::into_inner(platform).expect("clients are done").stop().await.unwrap();
    delete_queue(&queue).await;
}
