//! The edge alone: closed-loop clients over HTTP/1.1 keep-alive (one pooled
//! connection each) POST commands to the ingest role, which is the only role
//! running, so the figure is what the edge accepts (202 = confirmed by
//! RabbitMQ), not what the pipeline processes. Single mode sends one
//! structured CloudEvent of the workload's mix per request, batch mode
//! `batch_size` per request. What it queues is the backlog the end-to-end
//! phase drains.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use super::report::{EdgeMode, EdgeReport};
use super::Bench;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    Batch(usize),
}

pub async fn run(bench: &Bench, step: &dyn Fn(&str)) -> anyhow::Result<EdgeReport> {
    step("edge: single mode");
    let single = drive(bench, Mode::Single, bench.plan.edge_duration).await?;
    step("edge: batch mode");
    let batch = drive(bench, Mode::Batch(bench.plan.batch_size), bench.plan.edge_duration).await?;
    Ok(EdgeReport { clients: bench.plan.concurrency, batch_size: bench.plan.batch_size, single, batch })
}

/// Sends batches of the workload's mix through the edge for `duration`, as
/// the batch mode does: more backlog for a drain that needs it.
pub async fn send_batches(bench: &Bench, duration: Duration) -> anyhow::Result<()> {
    drive(bench, Mode::Batch(bench.plan.batch_size), duration).await.map(|_| ())
}

async fn drive(bench: &Bench, mode: Mode, duration: Duration) -> anyhow::Result<EdgeMode> {
    let url = bench.url("/events");
    let content_type = match mode {
        Mode::Single => "application/cloudevents+json",
        Mode::Batch(_) => "application/cloudevents-batch+json",
    };
    let per_request = match mode {
        Mode::Single => 1,
        Mode::Batch(n) => n as u64,
    };
    let (requests, commands, errors) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let deadline = started + duration;
    let mut clients = JoinSet::new();
    for _ in 0..bench.plan.concurrency {
        let (http, key, url, workload) = (bench.http.clone(), bench.key.clone(), url.clone(), bench.workload.clone());
        let (requests, commands, errors) = (requests.clone(), commands.clone(), errors.clone());
        clients.spawn(async move {
            while Instant::now() < deadline {
                let body = match mode {
                    Mode::Single => workload.next().body.to_vec(),
                    Mode::Batch(n) => workload.batch_body(n),
                };
                let answer =
                    http.post(&url).bearer_auth(&key).header("content-type", content_type).body(body).send().await;
                requests.fetch_add(1, Ordering::Relaxed);
                match answer {
                    Ok(response) => {
                        let accepted = response.status().as_u16() == 202;
                        // Read the body whole, so the connection goes back to the pool.
                        let _ = response.bytes().await;
                        if accepted {
                            commands.fetch_add(per_request, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.context("an edge client panicked")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (requests, commands) = (requests.load(Ordering::Relaxed), commands.load(Ordering::Relaxed));
    Ok(EdgeMode {
        requests,
        commands,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        requests_per_second: requests as f64 / seconds,
        commands_per_second: commands as f64 / seconds,
    })
}
