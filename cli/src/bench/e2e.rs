//! End to end, with every role running.
//!
//! **Maximum.** The edge phase leaves a backlog in the work queue. The
//! projector starts first (its group joined, nothing to read yet), then the
//! processor, which drains the backlog as fast as it can. Over a window that
//! starts once events reach the read model, the processors' rate is the
//! growth of the topic's end offsets and the projector's the growth of its
//! applied offsets; the pipeline's maximum is the smaller of the two (a
//! stage faster than the one before it can only follow). Any higher arrival
//! rate grows the backlog. Then more processor processes join on the same
//! backlog (`--processors`, default 3 in all) and the processors' rate is
//! measured again the same way: competing consumers, scaled out on one
//! machine. The rest of the backlog is then purged.
//!
//! **Latency.** An open-loop generator sends single commands at fixed rates
//! (fractions of the maximum) on a schedule that does not wait for answers,
//! and each request's latency counts from its *scheduled* time, so a stalled
//! generator or edge shows up as latency instead of hiding (coordinated
//! omission); the generator's own lag is reported beside it. Each accepted
//! order is then watched with `GET /orders/{id}` until it answers 200.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use lapin::options::QueuePurgeOptions;
use tokio::task::JoinSet;

use super::probe::{self, queue_state, CqlTableCounts};
use super::report::{E2eReport, Percentiles, Scaling, Step, TableOps};
use super::roles::RoleProcess;
use super::Bench;

/// How often the pipeline is looked at while it drains.
const SAMPLE: Duration = Duration::from_millis(250);

/// The longest wait between two reads of an order not yet visible.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Requests of one step allowed to be outstanding (sent, not yet visible);
/// beyond it the generator skips sends and counts them as errors.
const MAX_OUTSTANDING: usize = 20_000;

/// `more_processor` starts one more processor process for the scaling step.
pub async fn run(
    bench: &Bench,
    roles: &mut [&mut RoleProcess],
    more_processor: &dyn Fn() -> anyhow::Result<RoleProcess>,
    step: &dyn Fn(&str),
) -> anyhow::Result<E2eReport> {
    step("e2e: draining the backlog (maximum rate)");
    let mut report = drain(bench, roles).await?;
    report.scaling.push(Scaling { processes: 1, commands_per_second: report.processor_per_second });
    let processes = bench.plan.processors;
    if processes > 1 {
        step(&format!("e2e: {processes} processor processes on the same backlog"));
        let mut extra = Vec::new();
        for _ in 1..processes {
            let processor = more_processor()?;
            bench.role_started(&processor);
            extra.push(processor);
        }
        let rate = scaled_drain(bench, roles, &mut extra, processes).await;
        for processor in extra {
            processor.stop(Duration::from_secs(30)).await?;
        }
        report.scaling.push(Scaling { processes, commands_per_second: rate? });
    }
    step("e2e: purging the rest of the backlog");
    quiesce(bench, roles).await?;

    // A short, slow run first: warms every path and measures the shortest
    // time from 202 to readable, so later polls need not start at once.
    step("e2e: warm-up");
    let warm_rate = (report.max_per_second * 0.1).clamp(1.0, 20.0);
    let (_, floor) = fixed_rate(bench, 0.0, warm_rate, bench.plan.warmup, Duration::ZERO).await?;
    let first_poll = floor.mul_f64(0.8);

    for fraction in bench.plan.fractions.clone() {
        let rate = report.max_per_second * fraction;
        step(&format!("e2e: {:.0}% of the maximum, {rate:.0}/s open loop", fraction * 100.0));
        for role in roles.iter_mut() {
            role.check_alive()?;
        }
        let (s, _) = fixed_rate(bench, fraction, rate, bench.plan.step_duration, first_poll).await?;
        report.steps.push(s);
    }
    let p = &bench.plan;
    report.poll_interval_ms = p.poll_interval.as_secs_f64() * 1000.0;
    report.first_poll_ms = first_poll.as_secs_f64() * 1000.0;
    report.visibility = format!(
        "each accepted order is read with GET /orders/{{id}} over keep-alive, first {:.0} ms after its 202 \
         (0.8 × the shortest 202→readable time of the warm-up), then again after max({:.0} ms, a tenth of the time \
         waited so far, at most {} ms), for at most {:.0} s; it counts as visible when a 200 arrives, so it is late \
         by at most one wait plus one GET (≤ about 10 % of its latency beyond {:.0} ms)",
        report.first_poll_ms,
        report.poll_interval_ms,
        MAX_POLL_INTERVAL.as_millis(),
        p.visible_timeout.as_secs_f64(),
        report.poll_interval_ms * 10.0,
    );
    Ok(report)
}

/// One look at the pipeline.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    depth: u32,
    produced: i64,
    applied: i64,
}

async fn sample(bench: &Bench) -> anyhow::Result<Sample> {
    let (depth, _) = queue_state(&bench.channel, &bench.work_queue()).await?;
    let produced = bench.kafka.end_offsets(&bench.events_topic()).await?;
    let applied = probe::applied(&bench.store, 1, &bench.events_topic()).await?;
    Ok(Sample { at: Instant::now(), depth, produced, applied })
}

/// Measures how fast the pipeline drains the backlog the edge phase left.
async fn drain(bench: &Bench, roles: &mut [&mut RoleProcess]) -> anyhow::Result<E2eReport> {
    let backlog = queue_state(&bench.channel, &bench.work_queue()).await?.0;
    if backlog == 0 {
        bail!("the edge phase left no backlog to drain");
    }
    let began = Instant::now();
    // Wait for the first events in the read model: the roles are up.
    let first = loop {
        for role in roles.iter_mut() {
            role.check_alive()?;
        }
        let s = sample(bench).await?;
        if s.applied > 0 {
            break s;
        }
        if began.elapsed() > bench.plan.start_timeout {
            bail!("no event reached the read model within {:?} of starting the processor", bench.plan.start_timeout);
        }
        tokio::time::sleep(SAMPLE).await;
    };
    tokio::time::sleep_until((first.at + bench.plan.drain_settle).into()).await;
    let (start, end) = window(bench).await?;
    let seconds = end.at.duration_since(start.at).as_secs_f64();
    let processor = (end.produced - start.produced) as f64 / seconds;
    let projector = (end.applied - start.applied) as f64 / seconds;
    Ok(E2eReport {
        max_per_second: processor.min(projector),
        processor_per_second: processor,
        projector_per_second: projector,
        bottleneck: if processor <= projector { "processor" } else { "projector" }.into(),
        window_seconds: seconds,
        backlog_at_start: backlog,
        method: format!(
            "drain of a {backlog}-command backlog left by the edge phase, processor and projector running; \
             over a {seconds:.1} s window from {:.1} s after the first event was readable: min(Δ topic end offsets, \
             Δ projection applied offsets) / Δt, sampled every {} ms",
            bench.plan.drain_settle.as_secs_f64(),
            SAMPLE.as_millis()
        ),
        ..Default::default()
    })
}

/// Samples the pipeline over the drain window, or until the backlog runs out
/// (the last sample that still had one ends the window).
async fn window(bench: &Bench) -> anyhow::Result<(Sample, Sample)> {
    let start = sample(bench).await?;
    let mut end = start;
    while end.at.duration_since(start.at) < bench.plan.drain_window {
        tokio::time::sleep(SAMPLE).await;
        let s = sample(bench).await?;
        if s.depth == 0 {
            break;
        }
        end = s;
    }
    if end.at.duration_since(start.at) < Duration::from_millis(500) {
        bail!("the backlog ran out before a measurement window: make the edge phase longer");
    }
    Ok((start, end))
}

/// The processors' rate once `processes` processor processes consume the
/// backlog: events produced per second over a window that opens once they
/// all consume, plus the settle time.
async fn scaled_drain(
    bench: &Bench,
    roles: &mut [&mut RoleProcess],
    extra: &mut [RoleProcess],
    processes: usize,
) -> anyhow::Result<f64> {
    let began = Instant::now();
    loop {
        for role in roles.iter_mut().map(|r| &mut **r).chain(extra.iter_mut()) {
            role.check_alive()?;
        }
        let (_, consumers) = queue_state(&bench.channel, &bench.work_queue()).await?;
        if consumers as usize >= processes {
            break;
        }
        if began.elapsed() > bench.plan.start_timeout {
            bail!("{processes} processors were not all consuming within {:?}", bench.plan.start_timeout);
        }
        tokio::time::sleep(SAMPLE).await;
    }
    tokio::time::sleep(bench.plan.drain_settle).await;
    let (start, end) = window(bench).await?;
    Ok((end.produced - start.produced) as f64 / end.at.duration_since(start.at).as_secs_f64())
}

/// Purges what is left of the backlog and waits until every produced event
/// is applied, so the latency runs start on an idle pipeline.
async fn quiesce(bench: &Bench, roles: &mut [&mut RoleProcess]) -> anyhow::Result<()> {
    bench
        .channel
        .queue_purge(bench.work_queue().as_str().into(), QueuePurgeOptions::default())
        .await
        .context("purging the work queue")?;
    let deadline = Instant::now() + bench.plan.start_timeout;
    let mut previous: Option<Sample> = None;
    loop {
        for role in roles.iter_mut() {
            role.check_alive()?;
        }
        let s = sample(bench).await?;
        // Idle: nothing queued, everything produced is applied, and nothing
        // new was produced since the last look (deliveries in flight).
        if s.depth == 0 && s.applied >= s.produced && previous.is_some_and(|p| p.produced == s.produced) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pipeline did not go idle: {} queued, {} produced, {} applied", s.depth, s.produced, s.applied);
        }
        previous = Some(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What the requests of one run record.
struct Recorder {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    accept: Histogram<u64>,
    lag: Histogram<u64>,
    /// 202 to readable, for the warm-up's floor.
    after_accept: Histogram<u64>,
    accepted: u64,
    errors: u64,
    timeouts: u64,
}

/// Sends `rate` commands per second for `duration` on a fixed schedule and
/// follows each to the read model. Returns the step and the shortest time
/// from a 202 to a readable order.
async fn fixed_rate(
    bench: &Bench,
    fraction: f64,
    rate: f64,
    duration: Duration,
    first_poll: Duration,
) -> anyhow::Result<(Step, Duration)> {
    let recorder = Arc::new(Mutex::new(Recorder {
        latency: histogram(),
        service: histogram(),
        accept: histogram(),
        lag: histogram(),
        after_accept: histogram(),
        accepted: 0,
        errors: 0,
        timeouts: 0,
    }));
    let polls = Arc::new(AtomicU64::new(0));
    let keyspace = &bench.settings.cql.keyspace;
    let cql_before = probe::cql_counts(&bench.session, keyspace).await;
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let mut requests = JoinSet::new();
    let mut skipped = 0;
    for i in 0..total {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled.into()).await;
        while requests.try_join_next().is_some() {}
        if requests.len() >= MAX_OUTSTANDING {
            skipped += 1;
            continue;
        }
        let (bench_http, key, workload) = (bench.http.clone(), bench.key.clone(), bench.workload.clone());
        let (events_url, orders_url) = (bench.url("/events"), bench.url("/orders/"));
        let (recorder, polls) = (recorder.clone(), polls.clone());
        let (interval, timeout) = (bench.plan.poll_interval, bench.plan.visible_timeout);
        requests.spawn(async move {
            let sent = Instant::now();
            let (order_id, body) = workload.single_body();
            let answer = bench_http
                .post(&events_url)
                .bearer_auth(&key)
                .header("content-type", "application/cloudevents+json")
                .body(body)
                .send()
                .await;
            let accepted = match answer {
                Ok(response) => {
                    let ok = response.status().as_u16() == 202;
                    let _ = response.bytes().await;
                    ok
                }
                Err(_) => false,
            };
            let acked = Instant::now();
            let lag = micros(sent.saturating_duration_since(scheduled));
            if !accepted {
                let mut r = recorder.lock().unwrap_or_else(|e| e.into_inner());
                r.lag.saturating_record(lag);
                r.errors += 1;
                return;
            }
            let url = format!("{orders_url}{order_id}");
            let mut next = acked + first_poll;
            let visible = loop {
                tokio::time::sleep_until(next.into()).await;
                polls.fetch_add(1, Ordering::Relaxed);
                let found = match bench_http.get(&url).bearer_auth(&key).send().await {
                    Ok(response) => {
                        let ok = response.status().as_u16() == 200;
                        let _ = response.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                let now = Instant::now();
                if found {
                    break Some(now);
                }
                let waited = now.duration_since(acked);
                if waited > timeout {
                    break None;
                }
                // The wait grows with the time already waited (a tenth of
                // it, at least `interval`, at most MAX_POLL_INTERVAL): a
                // slow order costs a few dozen reads instead of hundreds,
                // which would load the store the pipeline needs, and the
                // error stays within about a tenth of its latency.
                let wait = interval.max(waited / 10).min(MAX_POLL_INTERVAL);
                next = (next + wait).max(now);
            };
            let mut r = recorder.lock().unwrap_or_else(|e| e.into_inner());
            r.accepted += 1;
            r.lag.saturating_record(lag);
            r.accept.saturating_record(micros(acked - sent));
            match visible {
                Some(visible) => {
                    r.latency.saturating_record(micros(visible - scheduled.min(sent)));
                    r.service.saturating_record(micros(visible - sent));
                    r.after_accept.saturating_record(micros(visible - acked));
                }
                None => r.timeouts += 1,
            }
        });
    }
    let sending = start.elapsed().as_secs_f64().max(1e-3);
    let sent = total - skipped;
    let backlog_after_sending = queue_state(&bench.channel, &bench.work_queue()).await?.0;
    while let Some(done) = requests.join_next().await {
        done.context("a request task panicked")?;
    }
    let finished = start.elapsed().as_secs_f64();
    let cql_after = probe::cql_counts(&bench.session, keyspace).await;
    let backlog_at_end = queue_state(&bench.channel, &bench.work_queue()).await?.0;
    let r = recorder.lock().unwrap_or_else(|e| e.into_inner());
    let floor = Duration::from_micros(if r.after_accept.is_empty() { 0 } else { r.after_accept.min() });
    let step = Step {
        fraction,
        target_per_second: rate,
        seconds: duration.as_secs_f64(),
        sent,
        sent_per_second: sent as f64 / sending,
        accepted: r.accepted,
        errors: r.errors + skipped,
        timeouts: r.timeouts,
        latency_ms: Percentiles::from_micros(&r.latency),
        service_latency_ms: Percentiles::from_micros(&r.service),
        accept_latency_ms: Percentiles::from_micros(&r.accept),
        generator_lag_ms: Percentiles::from_micros(&r.lag),
        backlog_after_sending,
        backlog_at_end,
        polls_per_second: polls.load(Ordering::Relaxed) as f64 / finished,
        cql_per_command: per_command(cql_before, cql_after, r.accepted, &bench.settings.projector.name),
    };
    Ok((step, floor))
}

/// CQL statements per command between two metric snapshots, by table; the
/// bench projection's tables are named `<projection>_…`.
fn per_command(
    before: Option<HashMap<String, CqlTableCounts>>,
    after: Option<HashMap<String, CqlTableCounts>>,
    commands: u64,
    projection: &str,
) -> Vec<TableOps> {
    let (Some(before), Some(after)) = (before, after) else { return Vec::new() };
    if commands == 0 {
        return Vec::new();
    }
    let mut ops: Vec<TableOps> = after
        .iter()
        .map(|(table, now)| {
            let then = before.get(table).copied().unwrap_or_default();
            TableOps {
                table: table.replacen(projection, "<projection>", 1),
                reads: now.reads.saturating_sub(then.reads) as f64 / commands as f64,
                writes: now.writes.saturating_sub(then.writes) as f64 / commands as f64,
            }
        })
        .filter(|o| o.reads >= 0.01 || o.writes >= 0.01)
        .collect();
    ops.sort_by(|a, b| a.table.cmp(&b.table));
    ops
}
