//! End to end, with every role running.
//!
//! **Drain maximum.** The edge phase leaves a backlog of the workload's mix
//! in the work queue. The projector starts first (its group joined, nothing
//! to read yet), then the processor, which drains the backlog as fast as it
//! can. Over a window that starts once events reach the read model, the
//! processors' rate is the commands they settled (their
//! `sluice_command_seconds` count: what the queue's shrinking would miss
//! while a partition works through the deliveries it already holds) and the
//! projector's the growth of its applied offsets, turned into commands by the
//! window's events per command (rejections and retries make none); the drain
//! maximum is the smaller of the two. Then more processor processes join on
//! the same backlog (`--processors`, default 3 in all) and the processors'
//! rate is measured again, summed over every process: competing consumers,
//! scaled out on one machine.
//! The rest of the backlog is then purged.
//!
//! **Sustained maximum.** A drain is not a rate that can be held. Open-loop
//! steps offer fixed rates (fractions of the drain maximum) on a schedule
//! that does not wait for answers (over at most `MAX_CONNECTIONS`
//! connections); while each runs, the backlog (commands
//! accepted and not yet settled, queued or in a processor's hands, plus
//! events not yet applied) is sampled. A step holds when the
//! generator sent its rate, every command got its 202, every sampled
//! command became visible, and the backlog stayed under a second's worth
//! without growing. The sustained maximum is the highest rate that held;
//! one more step at half of it gives the latency figure of the ratios.
//!
//! **Latency** counts from each request's *scheduled* time (coordinated
//! omission: a stalled generator or edge shows up as latency). Following
//! every command would itself load the servers, so one command in N (at
//! most `MAX_SAMPLED_PER_SECOND` a second) is followed as a client would:
//! `GET /operations/{id}` until it is terminal, then, if it changed an order,
//! `GET /orders/{id}` until the read model shows the change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use lapin::options::QueuePurgeOptions;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use sluice_processors::ownership::Membership;

use super::probe::{self, queues_state, CqlTableCounts, Scrape};
use super::report::{E2eReport, Percentiles, ProcessorTimes, Scaling, SlowCommand, Step, TableOps, Timing};
use super::roles::RoleProcess;
use super::workload::{Command, Kind};
use super::Bench;

/// How often the pipeline is looked at.
const SAMPLE: Duration = Duration::from_millis(250);

/// The longest wait between two reads of a command not yet visible.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The longest wait before a followed command's first read. Every sample
/// is at least that wait, so a warm-up slowed by something it does not
/// share with the steps (a queue still holding the drain's backlog: seen
/// once, 1.1 s) must not set it: such a run reported a p50 and p99 of
/// ~890 ms at every rate.
const MAX_FIRST_POLL: Duration = Duration::from_millis(20);

/// The wait before a followed command's first read: 0.8 × the shortest time
/// from a 202 to a visible command in the warm-up, so that commands that
/// cannot be visible yet are not read for nothing, at most
/// [`MAX_FIRST_POLL`].
fn first_poll_after(warm_up_shortest: Duration) -> Duration {
    warm_up_shortest.mul_f64(0.8).min(MAX_FIRST_POLL)
}

/// Commands followed to the read model per second, at most: about 400 a
/// 20 s step. Each is read ten to twenty times before it is visible (every
/// 5 ms at first), and those reads load the servers being measured: at 50 a
/// second they were 500 requests a second, a third of the CQL store's
/// requests in a 400 commands/s step.
const MAX_SAMPLED_PER_SECOND: f64 = 20.0;

/// The slowest followed commands a step keeps, with when they were sent:
/// a tail of a few hundred samples is a handful of commands, and their
/// times line up with what the servers logged then (collections, flushes,
/// compactions).
const SLOWEST: usize = 5;

/// Requests of one step waiting for their 202 at once; beyond it the
/// generator skips sends and counts them as errors (the step fails) rather
/// than opening ever more connections.
const MAX_OUTSTANDING: usize = 5_000;

/// Requests of one step on the wire at once; the others wait here for a
/// connection, their latency still counted from their scheduled time (as
/// load generators with a fixed set of connections do). The edge holds at
/// most `ingest.max_connections` (1,024 by default) and leaves the rest in
/// the kernel's backlog: a generator that opened a connection per waiting
/// request measured TCP's SYN retransmissions (1, 3, 7 s) once a brief
/// slowdown pushed it past that, and fell further behind each time.
const MAX_CONNECTIONS: usize = 512;

/// `more_processor` starts one more processor process for the scaling step.
pub async fn run(
    bench: &Bench,
    roles: &mut [&mut RoleProcess],
    more_processor: &dyn Fn() -> anyhow::Result<(RoleProcess, String)>,
    step: &dyn Fn(&str),
) -> anyhow::Result<E2eReport> {
    step("e2e: draining the backlog (drain maximum)");
    let mut report = drain(bench, roles).await?;
    report.scaling.push(Scaling { processes: 1, commands_per_second: report.processor_per_second });
    let processes = bench.plan.processors;
    if processes > 1 {
        step(&format!("e2e: {processes} processor processes on the same backlog"));
        let (mut extra, mut metrics) = (Vec::new(), vec![bench.processor_metrics()]);
        for _ in 1..processes {
            let (processor, url) = more_processor()?;
            bench.role_started(&processor);
            extra.push(processor);
            metrics.push(url);
        }
        let rate = scaled_drain(bench, roles, &mut extra, &metrics, report.processor_per_second, step).await;
        for processor in extra {
            processor.stop(Duration::from_secs(30)).await?;
        }
        report.scaling.push(Scaling { processes, commands_per_second: rate? });
    }
    step("e2e: purging the rest of the backlog");
    purge(bench).await?;
    settle(bench, roles).await?;

    // A short, slow run first: warms every path and measures the shortest
    // time from 202 to visible, so later polls need not start at once.
    step("e2e: warm-up");
    let warm_rate = (report.max_per_second * 0.1).clamp(1.0, 20.0);
    let warm = Pace { fraction: 0.0, rate: warm_rate, duration: bench.plan.warmup, first_poll: Duration::ZERO };
    let (_, floor) = fixed_rate(bench, roles, &warm).await?;
    let first_poll = first_poll_after(floor);

    for fraction in bench.plan.fractions.clone() {
        let rate = report.max_per_second * fraction;
        bench.quiet(step, &format!("the {:.0}% step", fraction * 100.0)).await;
        step(&format!("e2e: {:.0}% of the drain maximum, {rate:.0}/s open loop", fraction * 100.0));
        let pace = Pace { fraction, rate, duration: bench.plan.step_duration, first_poll };
        let (s, _) = fixed_rate(bench, roles, &pace).await?;
        report.steps.push(s);
    }
    for _ in 0..bench.plan.refinements {
        let Some(rate) = between(&report.steps) else { break };
        let fraction = rate / report.max_per_second;
        bench.quiet(step, &format!("the {:.0}% step", fraction * 100.0)).await;
        step(&format!("e2e: {rate:.0}/s open loop, between the highest rate that held and the lowest that did not"));
        let pace = Pace { fraction, rate, duration: bench.plan.step_duration, first_poll };
        report.steps.push(fixed_rate(bench, roles, &pace).await?.0);
    }
    report.sustained_per_second =
        report.steps.iter().filter(|s| s.holds).map(|s| s.sent_per_second).fold(0.0, f64::max);
    if report.sustained_per_second > 0.0 {
        let rate = report.sustained_per_second * 0.5;
        let runs = bench.plan.latency_runs.max(1);
        for run in 1..=runs {
            bench.quiet(step, "the latency step").await;
            step(&format!("e2e: half the sustained maximum, {rate:.0}/s open loop (latency, run {run} of {runs})"));
            let pace = Pace { fraction: 0.5, rate, duration: bench.plan.step_duration, first_poll };
            report.latency_runs.push(fixed_rate(bench, roles, &pace).await?.0);
        }
        report.half_sustained = median_by_p99(&report.latency_runs);
    }
    report.visibility = format!(
        "scheduled send → visible, for one command in N (at most {MAX_SAMPLED_PER_SECOND:.0} a second): GET \
         /operations/{{id}} until terminal, then for a change that succeeded GET /orders/{{id}} until it shows it \
         (submitted, shipped, cancelled); first read {:.0} ms after the 202 (0.8 × the warm-up's shortest, at most {} ms), then \
         after max({} ms, a tenth of the time waited, at most {} ms); late by at most one wait plus one GET",
        first_poll.as_secs_f64() * 1000.0,
        MAX_FIRST_POLL.as_millis(),
        bench.plan.poll_interval.as_millis(),
        MAX_POLL_INTERVAL.as_millis(),
    );
    Ok(report)
}

/// The run with the median p99 (of an even number, the higher of the two
/// middle ones).
fn median_by_p99(runs: &[Step]) -> Option<Step> {
    let mut sorted: Vec<&Step> = runs.iter().collect();
    sorted.sort_by(|a, b| a.latency_ms.p99.total_cmp(&b.latency_ms.p99));
    sorted.get(sorted.len() / 2).map(|s| (*s).clone())
}

/// One look at the pipeline.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Commands ready in the work queue.
    depth: u32,
    /// Events produced to the topic.
    produced: i64,
    /// Events the projection applied.
    applied: i64,
    /// Commands the processors settled since they started.
    settled: u64,
}

/// A look at the pipeline, with the commands settled by the processors
/// whose metrics are at `processors`.
async fn sample(bench: &Bench, processors: &[String]) -> anyhow::Result<Sample> {
    let (depth, _) = queues_state(&bench.channel, &bench.work_queues()).await?;
    let produced = bench.kafka.end_offsets(&bench.events_topic()).await?;
    let applied = probe::applied(&bench.store, 1, &bench.events_topic()).await?;
    let settled = probe::settled(&bench.http, processors).await?;
    Ok(Sample { at: Instant::now(), depth, produced, applied, settled })
}

fn check_alive(roles: &mut [&mut RoleProcess]) -> anyhow::Result<()> {
    roles.iter_mut().try_for_each(|role| role.check_alive())
}

/// Measures how fast the pipeline drains the backlog the edge phase left.
async fn drain(bench: &Bench, roles: &mut [&mut RoleProcess]) -> anyhow::Result<E2eReport> {
    let backlog = queues_state(&bench.channel, &bench.work_queues()).await?.0;
    if backlog == 0 {
        bail!("the edge phase left no backlog to drain");
    }
    let began = Instant::now();
    let processors = [bench.processor_metrics()];
    // Wait for the first events in the read model: the roles are up (the
    // processor's admin address with them).
    let first = loop {
        check_alive(roles)?;
        if probe::applied(&bench.store, 1, &bench.events_topic()).await? > 0 {
            break Instant::now();
        }
        if began.elapsed() > bench.plan.start_timeout {
            bail!("no event reached the read model within {:?} of starting the processor", bench.plan.start_timeout);
        }
        tokio::time::sleep(SAMPLE).await;
    };
    tokio::time::sleep_until((first + bench.plan.drain_settle).into()).await;
    let (start, end) = window(bench, &processors).await?;
    let seconds = end.at.duration_since(start.at).as_secs_f64();
    let taken = (end.settled - start.settled) as f64;
    // Offsets, not events: transaction markers take offsets too.
    let offsets_per_command = (end.produced - start.produced) as f64 / taken.max(1.0);
    let processor = taken / seconds;
    let projector = (end.applied - start.applied) as f64 / seconds / offsets_per_command.max(1e-9);
    Ok(E2eReport {
        max_per_second: processor.min(projector),
        processor_per_second: processor,
        projector_per_second: projector,
        offsets_per_command,
        bottleneck: if processor <= projector { "processor" } else { "projector" }.into(),
        window_seconds: seconds,
        backlog_at_start: backlog,
        method: format!(
            "Drain of a {backlog}-command backlog left by the edge phase; over a {seconds:.1} s window from {:.1} s \
             after the first event was readable: commands the processor settled per second vs events applied per second \
             ÷ events per command, sampled every {} ms.",
            bench.plan.drain_settle.as_secs_f64(),
            SAMPLE.as_millis()
        ),
        ..Default::default()
    })
}

/// Samples the pipeline over the drain window, or until the backlog runs out
/// (the last sample that still had one ends the window).
async fn window(bench: &Bench, processors: &[String]) -> anyhow::Result<(Sample, Sample)> {
    let start = sample(bench, processors).await?;
    let mut end = start;
    while end.at.duration_since(start.at) < bench.plan.drain_window {
        tokio::time::sleep(SAMPLE).await;
        let s = sample(bench, processors).await?;
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

/// The processors' rate once the processes whose metrics are at `processors`
/// consume the backlog: commands they settled per second over a window that
/// opens once they all consume, plus the settle time. A backlog too short
/// for a window is first topped up through the edge ([`scaled_backlog`]).
/// The settle is cut to what leaves a window: at most half the time the
/// rest of the backlog lasts if the processes scaled linearly from
/// `one_process`'s rate (they do not on two cores, so the window gets more).
async fn scaled_drain(
    bench: &Bench,
    roles: &mut [&mut RoleProcess],
    extra: &mut [RoleProcess],
    processors: &[String],
    one_process: f64,
    step: &dyn Fn(&str),
) -> anyhow::Result<f64> {
    let processes = processors.len();
    let began = Instant::now();
    loop {
        for role in roles.iter_mut().map(|r| &mut **r).chain(extra.iter_mut()) {
            role.check_alive()?;
        }
        // Every process a member, and every partition held by exactly one
        // consumer (none in the middle of a handover).
        let (_, consumers) = queues_state(&bench.channel, &bench.work_queues()).await?;
        let members = bench.membership.members().await.map_err(anyhow::Error::msg)?;
        if members.len() >= processes && consumers == u32::from(bench.settings.amqp.partitions) {
            break;
        }
        if began.elapsed() > bench.plan.start_timeout {
            bail!("{processes} processors were not all consuming within {:?}", bench.plan.start_timeout);
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let (left, _) = queues_state(&bench.channel, &bench.work_queues()).await?;
    let expected = one_process * processes as f64;
    let need = scaled_backlog(expected);
    let left = if u64::from(left) < need {
        step(&format!("e2e: {left} commands left, topping the backlog up to {need} through the edge"));
        top_up(bench, need).await?
    } else {
        u64::from(left)
    };
    tokio::time::sleep(scaled_settle(bench.plan.drain_settle, left, expected)).await;
    let (start, end) = window(bench, processors).await?;
    Ok((end.settled - start.settled) as f64 / end.at.duration_since(start.at).as_secs_f64())
}

/// The shortest window the scaled drain plans for.
const MIN_SCALED_WINDOW: Duration = Duration::from_secs(1);

/// How long the edge may take to refill the backlog for the scaled drain.
const TOP_UP_LIMIT: Duration = Duration::from_secs(30);

/// The backlog the scaled drain needs once every process consumes, when
/// they take `rate` commands a second together: the settle takes at most
/// half of it, and the other half lasts [`MIN_SCALED_WINDOW`]. What the
/// first drain left can be less: the processes take it while they join
/// (a quick run in CI ran out: the debug build's edge phase leaves ~6 s of
/// one process's work).
fn scaled_backlog(rate: f64) -> u64 {
    (2.0 * rate * MIN_SCALED_WINDOW.as_secs_f64()).ceil() as u64
}

/// Sends batches through the edge until the work queues hold `need`
/// commands (the processors drain them meanwhile); returns what they hold.
async fn top_up(bench: &Bench, need: u64) -> anyhow::Result<u64> {
    let began = Instant::now();
    loop {
        let (depth, _) = queues_state(&bench.channel, &bench.work_queues()).await?;
        if u64::from(depth) >= need {
            return Ok(u64::from(depth));
        }
        if began.elapsed() > TOP_UP_LIMIT {
            bail!(
                "the edge did not refill the backlog to {need} commands within {TOP_UP_LIMIT:?} while the \
                 processors drained it ({depth} queued)"
            );
        }
        super::edge::send_batches(bench, Duration::from_millis(500)).await?;
    }
}

/// The scaled drain's settle: `settle`, or half the time `backlog`
/// commands last at `rate` if that is shorter.
fn scaled_settle(settle: Duration, backlog: u64, rate: f64) -> Duration {
    if rate <= 0.0 {
        return settle;
    }
    settle.min(Duration::from_secs_f64(backlog as f64 / rate / 2.0))
}

async fn purge(bench: &Bench) -> anyhow::Result<()> {
    for queue in bench.work_queues() {
        bench
            .channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .context("purging the work queues")?;
    }
    Ok(())
}

/// Waits until the pipeline is idle: nothing queued, everything produced
/// applied, and nothing new produced or settled since the last look
/// (deliveries in flight). Returns how long that took.
async fn settle(bench: &Bench, roles: &mut [&mut RoleProcess]) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let processors = [bench.processor_metrics()];
    let mut previous: Option<Sample> = None;
    loop {
        check_alive(roles)?;
        let s = sample(bench, &processors).await?;
        let still = previous.is_some_and(|p| p.produced == s.produced && p.settled == s.settled);
        if s.depth == 0 && s.applied >= s.produced && still {
            return Ok(began.elapsed());
        }
        if began.elapsed() > bench.plan.settle_timeout {
            bail!("the pipeline did not go idle: {} queued, {} produced, {} applied", s.depth, s.produced, s.applied);
        }
        previous = Some(s);
        tokio::time::sleep(SAMPLE).await;
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What the requests of one step record.
struct Recorder {
    latency: Histogram<u64>,
    accept: Histogram<u64>,
    lag: Histogram<u64>,
    /// 202 to visible, for the warm-up's floor.
    after_accept: Histogram<u64>,
    /// Followed commands: 202 to the operation seen terminal, and from
    /// there to the read model showing the change.
    to_terminal: Histogram<u64>,
    to_read_model: Histogram<u64>,
    /// The slowest followed commands so far, at most `SLOWEST` of them.
    slowest: Vec<SlowCommand>,
    accepted: u64,
    errors: u64,
    timeouts: u64,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            latency: histogram(),
            accept: histogram(),
            lag: histogram(),
            after_accept: histogram(),
            to_terminal: histogram(),
            to_read_model: histogram(),
            slowest: Vec::new(),
            accepted: 0,
            errors: 0,
            timeouts: 0,
        }
    }

    fn keep_if_slow(&mut self, slow: SlowCommand) {
        self.slowest.push(slow);
        self.slowest.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        self.slowest.truncate(SLOWEST);
    }
}

/// One open-loop step: `rate` commands per second for `duration`.
struct Pace {
    fraction: f64,
    rate: f64,
    duration: Duration,
    /// Wait after a sampled command's 202 before its first read.
    first_poll: Duration,
}

/// Sends the workload at `pace.rate` on a fixed schedule, follows sampled
/// commands until visible, samples the backlog meanwhile, then waits for
/// the pipeline to go idle. Returns the step and the shortest time from a
/// 202 to a visible command.
async fn fixed_rate(bench: &Bench, roles: &mut [&mut RoleProcess], pace: &Pace) -> anyhow::Result<(Step, Duration)> {
    check_alive(roles)?;
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let polls = Arc::new(AtomicU64::new(0));
    let keyspace = &bench.settings.cql.keyspace;
    let cql_before = probe::cql_counts(&bench.session, keyspace).await;
    let offsets_before = bench.kafka.end_offsets(&bench.events_topic()).await?;
    let projector_metrics = format!("http://{}/metrics", bench.projector_metrics_addr);
    let processor_metrics = bench.processor_metrics();
    let projector_before = Scrape::read(&bench.http, &projector_metrics).await?;
    let processor_before = Scrape::read(&bench.http, &processor_metrics).await?;
    let rate = pace.rate.max(0.1);
    let total = (rate * pace.duration.as_secs_f64()).round().max(1.0) as u64;
    let sample_every = (rate / MAX_SAMPLED_PER_SECOND).ceil().max(1.0) as u64;
    let backlog = BacklogWatch::start(bench, recorder.clone()).await?;
    let start = Instant::now() + Duration::from_millis(20);
    let wall_start = chrono::Utc::now() + chrono::Duration::milliseconds(20);
    let mut requests = JoinSet::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut skipped = 0;
    for i in 0..total {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled.into()).await;
        while requests.try_join_next().is_some() {}
        if requests.len() >= MAX_OUTSTANDING {
            skipped += 1;
            continue;
        }
        let command = bench.workload.next();
        let follow = (i % sample_every == 0).then(|| Follow {
            http: bench.http.clone(),
            key: bench.key.clone(),
            base: bench.url(""),
            first_poll: pace.first_poll,
            interval: bench.plan.poll_interval,
            timeout: bench.plan.visible_timeout,
            polls: polls.clone(),
        });
        let (http, key, url, recorder, connections) =
            (bench.http.clone(), bench.key.clone(), bench.url("/events"), recorder.clone(), connections.clone());
        requests.spawn(async move {
            // Waiting for a connection is the generator's lag.
            let connection = connections.acquire_owned().await.expect("the semaphore is never closed");
            let sent = Instant::now();
            let answer = http
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/cloudevents+json")
                .body(command.body.to_vec())
                .send()
                .await;
            let operation = match answer {
                Ok(response) if response.status().as_u16() == 202 => {
                    let location = response.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_owned);
                    let _ = response.bytes().await;
                    Some(location.unwrap_or_default())
                }
                Ok(response) => {
                    let _ = response.bytes().await;
                    None
                }
                Err(_) => None,
            };
            let acked = Instant::now();
            drop(connection);
            let lag = micros(sent.saturating_duration_since(scheduled));
            let Some(operation) = operation else {
                let mut r = recorder.lock().unwrap_or_else(|e| e.into_inner());
                r.lag.saturating_record(lag);
                r.errors += 1;
                return;
            };
            {
                let mut r = recorder.lock().unwrap_or_else(|e| e.into_inner());
                r.accepted += 1;
                r.lag.saturating_record(lag);
                r.accept.saturating_record(micros(acked - sent));
            }
            let Some(follow) = follow else { return };
            let seen = follow.until_visible(&command, &operation, acked).await;
            let mut r = recorder.lock().unwrap_or_else(|e| e.into_inner());
            let Some(Seen { terminal, visible }) = seen else {
                r.timeouts += 1;
                return;
            };
            let from = scheduled.min(sent);
            r.latency.saturating_record(micros(visible - from));
            r.after_accept.saturating_record(micros(visible - acked));
            r.to_terminal.saturating_record(micros(terminal - acked));
            r.to_read_model.saturating_record(micros(visible - terminal));
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let offset = from.saturating_duration_since(start);
            r.keep_if_slow(SlowCommand {
                at: (wall_start + chrono::Duration::from_std(offset).unwrap_or_default())
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                offset_s: offset.as_secs_f64(),
                kind: command.kind.name().to_owned(),
                total_ms: ms(visible - from),
                accept_ms: ms(acked - from),
                terminal_ms: ms(terminal - acked),
                read_model_ms: ms(visible - terminal),
            });
        });
    }
    let sending = start.elapsed().as_secs_f64().max(1e-3);
    let sent = total - skipped;
    let watched = backlog.stop().await?;
    // Idle first (how long the backlog takes to clear), then the followed
    // commands, which are visible by then.
    let settle_seconds = settle(bench, roles).await?.as_secs_f64();
    while let Some(done) = requests.join_next().await {
        done.context("a request task panicked")?;
    }
    let finished = start.elapsed().as_secs_f64();
    let cql_after = probe::cql_counts(&bench.session, keyspace).await;
    let offsets_after = bench.kafka.end_offsets(&bench.events_topic()).await?;
    let projector_after = Scrape::read(&bench.http, &projector_metrics).await?;
    let processor_after = Scrape::read(&bench.http, &processor_metrics).await?;
    let projection = format!("projection=\"{}\"", bench.settings.projector.name);
    let apply = |s: &Scrape| s.buckets("sluice_projection_apply_seconds", &projection);
    let (apply_before, apply_after) = (apply(&projector_before), apply(&projector_after));
    let processed = |s: &Scrape| s.buckets("sluice_command_seconds", "");
    let (processed_before, processed_after) = (processed(&processor_before), processed(&processor_after));
    let r = recorder.lock().unwrap_or_else(|e| e.into_inner());
    let floor = Duration::from_micros(if r.after_accept.is_empty() { 0 } else { r.after_accept.min() });
    let sent_per_second = sent as f64 / sending;
    let (after_sending, max, growth) = watched.summary();
    let errors = r.errors + skipped;
    // Growth counts only when it can be told from noise: over at least two
    // seconds of samples, and with more than a quarter second's worth of
    // commands waiting at the end (a few dozen commands come and go).
    let growing =
        watched.0.len() >= 16 && after_sending as f64 > (0.25 * rate).max(50.0) && growth > (0.02 * rate).max(5.0);
    let holds = sent_per_second >= 0.95 * rate
        && errors == 0
        && r.timeouts == 0
        && after_sending as f64 <= rate.max(100.0)
        && !growing;
    let step = Step {
        fraction: pace.fraction,
        target_per_second: rate,
        seconds: pace.duration.as_secs_f64(),
        sent,
        sent_per_second,
        accepted: r.accepted,
        errors,
        sample_every,
        timeouts: r.timeouts,
        latency_ms: Percentiles::from_micros(&r.latency),
        to_terminal_ms: Percentiles::from_micros(&r.to_terminal),
        to_read_model_ms: Percentiles::from_micros(&r.to_read_model),
        slowest: r.slowest.clone(),
        accept_latency_ms: Percentiles::from_micros(&r.accept),
        generator_lag_ms: Percentiles::from_micros(&r.lag),
        backlog_after_sending: after_sending,
        backlog_max: max,
        backlog_growth_per_second: growth,
        holds,
        settle_seconds,
        polls_per_second: polls.load(Ordering::Relaxed) as f64 / finished,
        cql_per_command: per_command(cql_before, cql_after, r.accepted, &bench.settings.projector.name),
        kafka_offsets_per_command: (offsets_after - offsets_before) as f64 / r.accepted.max(1) as f64,
        apply_p50_ms: probe::bucket_quantile_ms(&apply_before, &apply_after, 0.5),
        apply_p99_ms: probe::bucket_quantile_ms(&apply_before, &apply_after, 0.99),
        processor_p50_ms: probe::bucket_quantile_ms(&processed_before, &processed_after, 0.5),
        processor_p99_ms: probe::bucket_quantile_ms(&processed_before, &processed_after, 0.99),
        processor_times: processor_times(&processor_before, &processor_after),
    };
    Ok((step, floor))
}

/// The stages of a round, in the order they start.
const ROUND_STAGES: [&str; 6] = ["read_and_decide", "journal", "stream_rows", "produce", "record", "commit"];

/// The processor's group commits (`sluice_group_commit_requests`'s store
/// label) and how the report names them.
const GROUP_COMMITS: [(&str, &str); 4] = [
    ("event_reads", "stream loads"),
    ("operation_reads", "status reads"),
    ("events", "stream rows"),
    ("operations", "operation records"),
];

/// Where the processor's time went between two scrapes of its metrics;
/// `None` when no round finished in between.
fn processor_times(before: &Scrape, after: &Scrape) -> Option<ProcessorTimes> {
    let mean = |name: &str, label: &str| probe::mean_between(before, after, name, label);
    let timing = |name: &str, label: &str| {
        Some(Timing {
            mean_ms: mean(name, label)? * 1000.0,
            p99_ms: probe::bucket_quantile_ms(&before.buckets(name, label), &after.buckets(name, label), 0.99),
        })
    };
    let transactions = probe::count_between(before, after, "sluice_relay_transaction_partitions", "");
    let commands = probe::count_between(before, after, "sluice_round_commands", "")
        * mean("sluice_round_commands", "").unwrap_or(0.0);
    Some(ProcessorTimes {
        commands_per_transaction: (transactions > 0.0).then(|| commands / transactions),
        partitions_per_transaction: mean("sluice_relay_transaction_partitions", ""),
        round: timing("sluice_round_seconds", "")?,
        wait: timing("sluice_command_wait_seconds", "").unwrap_or_default(),
        commands_per_round: mean("sluice_round_commands", "").unwrap_or(0.0),
        requests_per_group: GROUP_COMMITS
            .iter()
            .filter_map(|&(store, name)| {
                Some((name.to_owned(), mean("sluice_group_commit_requests", &format!("store=\"{store}\""))?))
            })
            .collect(),
        stages: ROUND_STAGES
            .iter()
            .filter_map(|&stage| {
                Some((stage.to_owned(), timing("sluice_round_stage_seconds", &format!("stage=\"{stage}\""))?))
            })
            .collect(),
    })
}

/// How a sampled command is followed until it is visible.
struct Follow {
    http: reqwest::Client,
    key: String,
    /// `http://<edge>`.
    base: String,
    first_poll: Duration,
    interval: Duration,
    timeout: Duration,
    polls: Arc<AtomicU64>,
}

/// When a followed command's operation was seen terminal, and when the
/// command was visible (the same instant for one that changed nothing).
struct Seen {
    terminal: Instant,
    visible: Instant,
}

impl Follow {
    /// When the command became visible: its operation terminal and, for a
    /// change that succeeded, the order showing it. `None` on timeout.
    async fn until_visible(&self, command: &Command, operation: &str, acked: Instant) -> Option<Seen> {
        let mut next = acked + self.first_poll;
        let mut succeeded = None;
        loop {
            tokio::time::sleep_until(next.into()).await;
            if succeeded.is_none() {
                match self.get(operation).await.as_ref().and_then(|o| o["status"].as_str()) {
                    Some("rejected" | "dead_lettered") => {
                        let now = Instant::now();
                        return Some(Seen { terminal: now, visible: now });
                    }
                    Some("succeeded") => succeeded = Some(Instant::now()),
                    _ => {}
                }
            }
            if let Some(terminal) = succeeded {
                let order = self.get(&format!("/orders/{}", command.order_id)).await;
                let status = order.as_ref().and_then(|o| o["status"].as_str());
                let shows = match command.kind {
                    Kind::Submit => order.is_some(),
                    Kind::Ship => status == Some("shipped"),
                    Kind::Cancel => status == Some("cancelled"),
                };
                if shows {
                    return Some(Seen { terminal, visible: Instant::now() });
                }
            }
            let now = Instant::now();
            let waited = now.duration_since(acked);
            if waited > self.timeout {
                return None;
            }
            // The wait grows with the time already waited (a tenth of it,
            // at least `interval`, at most MAX_POLL_INTERVAL): a slow
            // command costs a few dozen reads instead of hundreds, and the
            // error stays within about a tenth of its latency.
            let wait = self.interval.max(waited / 10).min(MAX_POLL_INTERVAL);
            next = (next + wait).max(now);
        }
    }

    /// A 200's JSON body, or `None`.
    async fn get(&self, path: &str) -> Option<Value> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        let response = self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.key).send().await.ok()?;
        if response.status().as_u16() != 200 {
            let _ = response.bytes().await;
            return None;
        }
        response.json().await.ok()
    }
}

/// The backlog sampled every `SAMPLE` in the background while a step sends:
/// the commands accepted and not yet settled (queued, or taken by a
/// processor and not yet settled: with a deep prefetch the queue's depth
/// alone misses those), plus the events not yet applied.
struct BacklogWatch {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<(f64, i64)>>>,
}

impl BacklogWatch {
    /// `recorder` counts the step's commands accepted so far; the pipeline
    /// is idle when the step starts.
    async fn start(bench: &Bench, recorder: Arc<Mutex<Recorder>>) -> anyhow::Result<Self> {
        let stop = tokio_util::sync::CancellationToken::new();
        // The probes are cheap to clone: a channel, a Kafka client, a store.
        let (channel, kafka, store, http) =
            (bench.channel.clone(), bench.kafka.clone(), bench.store.clone(), bench.http.clone());
        let (queues, topic, processors) = (bench.work_queues(), bench.events_topic(), [bench.processor_metrics()]);
        let settled_before = probe::settled(&http, &processors).await?;
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let began = Instant::now();
            let mut seen = Vec::new();
            loop {
                let (depth, _) = queues_state(&channel, &queues).await?;
                let produced = kafka.end_offsets(&topic).await?;
                let applied = probe::applied(&store, 1, &topic).await?;
                let settled = probe::settled(&http, &processors).await?.saturating_sub(settled_before);
                let accepted = recorder.lock().unwrap_or_else(|e| e.into_inner()).accepted;
                // A command can settle before its 202 is counted here; the
                // queue's depth is the floor.
                let unsettled = (accepted as i64 - settled as i64).max(i64::from(depth));
                seen.push((began.elapsed().as_secs_f64(), unsettled + (produced - applied).max(0)));
                tokio::select! {
                    _ = token.cancelled() => return Ok(seen),
                    _ = tokio::time::sleep(SAMPLE) => {}
                }
            }
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> anyhow::Result<Backlog> {
        self.stop.cancel();
        Ok(Backlog(self.task.await.context("the backlog watch panicked")??))
    }
}

/// (seconds since the step began, backlog) samples.
struct Backlog(Vec<(f64, i64)>);

impl Backlog {
    /// The last backlog, the largest, and the growth per second over the
    /// second half (least-squares slope; 0 with fewer than 3 samples).
    fn summary(&self) -> (i64, i64, f64) {
        let last = self.0.last().map_or(0, |s| s.1);
        let max = self.0.iter().map(|s| s.1).max().unwrap_or(0);
        let half = &self.0[self.0.len() / 2..];
        if half.len() < 3 {
            return (last, max, 0.0);
        }
        let n = half.len() as f64;
        let (mx, my) = (half.iter().map(|s| s.0).sum::<f64>() / n, half.iter().map(|s| s.1 as f64).sum::<f64>() / n);
        let sxy: f64 = half.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
        let sxx: f64 = half.iter().map(|s| (s.0 - mx).powi(2)).sum();
        (last, max, if sxx > 0.0 { sxy / sxx } else { 0.0 })
    }
}

/// The rate halfway between the highest offered rate that held (0 if none
/// did) and the lowest higher one that did not; `None` if every step held.
fn between(steps: &[Step]) -> Option<f64> {
    let held = steps.iter().filter(|s| s.holds).map(|s| s.target_per_second).fold(0.0, f64::max);
    let failed = steps
        .iter()
        .filter(|s| !s.holds && s.target_per_second > held)
        .map(|s| s.target_per_second)
        .reduce(f64::min)?;
    Some((held + failed) / 2.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_warm_up_does_not_floor_every_later_sample() {
        assert_eq!(first_poll_after(Duration::from_millis(5)), Duration::from_millis(4));
        assert_eq!(first_poll_after(Duration::from_millis(1_100)), MAX_FIRST_POLL);
        assert_eq!(first_poll_after(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_scaled_drain_settles_for_at_most_half_of_what_the_backlog_lasts() {
        let settle = Duration::from_secs(15);
        assert_eq!(scaled_settle(settle, 1_000_000, 5_000.0), settle, "a long backlog: the whole settle");
        assert_eq!(scaled_settle(settle, 100_000, 5_000.0), Duration::from_secs(10));
        assert_eq!(scaled_settle(settle, 100, 0.0), settle, "no rate measured");
    }

    #[test]
    fn the_scaled_drain_needs_a_backlog_that_leaves_a_window_after_its_settle() {
        // Two processes at 1,500/s each: 3,000/s, one second for the settle
        // (half the backlog at most) and one for the window.
        assert_eq!(scaled_backlog(3_000.0), 6_000);
        let settle = scaled_settle(Duration::from_secs(15), scaled_backlog(3_000.0), 3_000.0);
        assert_eq!(settle, MIN_SCALED_WINDOW, "the settle takes half of it");
    }

    #[test]
    fn a_step_keeps_its_slowest_followed_commands_slowest_first() {
        let mut r = Recorder::new();
        for total in [30.0, 700.0, 5.0, 90.0, 410.0, 60.0, 12.0, 250.0] {
            r.keep_if_slow(SlowCommand { total_ms: total, ..Default::default() });
        }
        let kept: Vec<f64> = r.slowest.iter().map(|c| c.total_ms).collect();
        assert_eq!(kept, [700.0, 410.0, 250.0, 90.0, 60.0]);
    }

    #[test]
    fn a_refinement_halves_the_gap_between_the_highest_rate_that_held_and_the_next() {
        let step = |rate: f64, holds: bool| Step { target_per_second: rate, holds, ..Default::default() };
        let grid = [step(500.0, true), step(1000.0, false), step(1500.0, false), step(2000.0, false)];
        assert_eq!(between(&grid), Some(750.0));
        let refined = [&grid[..], &[step(750.0, true)]].concat();
        assert_eq!(between(&refined), Some(875.0));
        // A failing step below one that held (noise) does not bound it.
        let noisy = [step(500.0, false), step(1000.0, true), step(1500.0, false)];
        assert_eq!(between(&noisy), Some(1250.0));
        assert_eq!(between(&[step(500.0, false)]), Some(250.0), "none held: halfway from nothing");
        assert_eq!(between(&[step(500.0, true), step(1000.0, true)]), None, "every step held");
    }

    #[test]
    fn the_latency_figure_is_the_run_with_the_median_p99() {
        let run = |rate: f64, p99: f64| Step {
            target_per_second: rate,
            latency_ms: Percentiles { p99, ..Default::default() },
            ..Default::default()
        };
        let median = median_by_p99(&[run(1.0, 300.0), run(2.0, 40.0), run(3.0, 90.0)]).unwrap();
        assert_eq!((median.target_per_second, median.latency_ms.p99), (3.0, 90.0));
        let even = median_by_p99(&[run(1.0, 40.0), run(2.0, 90.0)]).unwrap();
        assert_eq!(even.latency_ms.p99, 90.0, "of two, the higher");
        assert!(median_by_p99(&[]).is_none());
    }

    #[test]
    fn backlog_growth_is_the_slope_of_the_second_half() {
        let steady = Backlog((0..40).map(|i| (f64::from(i) * 0.25, 10 + i64::from(i % 2))).collect());
        let (last, max, growth) = steady.summary();
        assert_eq!((last, max), (11, 11));
        assert!(growth.abs() < 1.0, "{growth}");
        // Flat, then growing by 100 commands a second.
        let growing = Backlog(
            (0..40).map(|i| (f64::from(i) * 0.25, if i < 20 { 5 } else { 5 + 25 * i64::from(i - 20) })).collect(),
        );
        let (_, _, growth) = growing.summary();
        assert!((growth - 100.0).abs() < 1.0, "{growth}");
        assert_eq!(Backlog(vec![]).summary(), (0, 0, 0.0));
    }
}
