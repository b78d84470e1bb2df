//! Reads under load: closed-loop clients over HTTP/1.1 keep-alive (one
//! pooled connection each) GET an order by id (orders the read model holds,
//! in turn),
//! then the day's sales, each for `edge_duration`, once the end-to-end phase
//! has left the day holding every order of the run. A day's sales are
//! pre-aggregated (one running total per events partition), so their read
//! stays in the range of the by-id read whatever the day's volume.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use super::report::{Percentiles, ReadMode, ReadsReport};
use super::Bench;

pub async fn run(bench: &Bench, step: &dyn Fn(&str)) -> anyhow::Result<ReadsReport> {
    let orders = Arc::new(orders_held(bench).await?);
    anyhow::ensure!(!orders.is_empty(), "the read model holds no order to read");
    let now = chrono::Utc::now();
    let today = now.date_naive();
    let day = bench.store.daily_sales(bench.workload.tenant(), now.timestamp_millis(), now.timestamp_millis()).await?;
    let orders_in_day = day.first().map_or(0, |d| d.orders);
    step("reads: an order by id");
    let by_id = drive(bench, move |i| format!("/orders/{}", orders[i as usize % orders.len()])).await?;
    step("reads: the day's sales");
    let daily_sales = drive(bench, move |_| format!("/sales/daily?from={today}&to={today}")).await?;
    Ok(ReadsReport { clients: bench.plan.concurrency, orders_in_day, by_id, daily_sales })
}

/// Ids of orders the bench projection's active version holds (up to
/// [`ORDERS_READ`]).
async fn orders_held(bench: &Bench) -> anyhow::Result<Vec<String>> {
    let projection = &bench.settings.projector.name;
    let version = bench.store.versions().get(projection).await?.active;
    let rows = bench
        .session
        .query_unpaged(format!("SELECT order_id FROM {projection}_by_id_v{version} LIMIT {ORDERS_READ}"), ())
        .await?
        .into_rows_result()?;
    Ok(rows.rows::<(String,)>()?.filter_map(|row| row.ok().map(|(id,)| id)).collect())
}

/// Orders the by-id read takes in turn.
const ORDERS_READ: usize = 2_000;

async fn drive(bench: &Bench, path: impl Fn(u64) -> String + Send + Sync + 'static) -> anyhow::Result<ReadMode> {
    let path = Arc::new(path);
    let (requests, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")));
    let started = Instant::now();
    let deadline = started + bench.plan.edge_duration;
    let mut clients = JoinSet::new();
    for _ in 0..bench.plan.concurrency {
        let (http, key, base) = (bench.http.clone(), bench.key.clone(), bench.url(""));
        let (path, requests, errors, latency) = (path.clone(), requests.clone(), errors.clone(), latency.clone());
        let first_error = first_error.clone();
        clients.spawn(async move {
            let mut mine = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            while Instant::now() < deadline {
                let n = requests.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let path = path(n);
                let answer = http.get(format!("{base}{path}")).bearer_auth(&key).send().await;
                // Read the body whole, so the connection goes back to the pool.
                let error = match answer {
                    Ok(response) => {
                        let status = response.status();
                        match response.text().await {
                            Ok(_) if status.as_u16() == 200 => None,
                            Ok(body) => Some(format!("GET {path}: {status} {body}")),
                            Err(e) => Some(format!("GET {path}: {status}, body unread: {e}")),
                        }
                    }
                    Err(e) => Some(format!("GET {path}: {e}")),
                };
                let _ = mine.record(sent.elapsed().as_micros().max(1) as u64);
                if let Some(error) = error {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(error);
                }
            }
            let _ = latency.lock().unwrap_or_else(|e| e.into_inner()).add(&mine);
        });
    }
    while let Some(done) = clients.join_next().await {
        done.context("a read client panicked")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = requests.load(Ordering::Relaxed);
    let latency = Percentiles::from_micros(&latency.lock().unwrap_or_else(|e| e.into_inner()));
    let first_error = first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(ReadMode {
        requests,
        errors: errors.load(Ordering::Relaxed),
        first_error,
        seconds,
        requests_per_second: requests as f64 / seconds,
        latency_ms: latency,
    })
}
