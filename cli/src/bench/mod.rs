//! `sluice bench`: the pipeline measured against the physical limit of its
//! own servers, on the same machine, in one run (issues 7 and 12).
//!
//! - [`workload`]: the commands sent (a mix that looks like use), and the
//!   sizes of what they become.
//! - [`roles`]: the roles as child processes of this executable; peak RSS.
//! - [`probe`]: queue depth, produced and applied events, group state.
//! - [`raw`]: RabbitMQ, Kafka and CQL on their own, each swept over its
//!   in-flight window (no role running).
//! - [`bare`]: the bare-hops ceiling: every hop a command needs, with the
//!   same client crates and no sluice logic: what sluice is measured against.
//! - [`edge`]: accepted commands per second, the ingest role alone.
//! - [`e2e`]: the drain maximum, the sustained maximum (open-loop steps) and
//!   latency, every role running.
//! - [`rebuild`]: replay rate of a blue/green rebuild, in events and rows.
//! - [`report`]: the report, its ratios, Markdown, and `--compare`.
//! - [`chart`]: latency against offered load, and each stage's rate (SVG).
//! - [`cpu`]: CPU time per process group, noise and peak RSS in each phase.
//!
//! Every run has a tenant of its own (`bench<hex>`, with a random key), a
//! projection of its own and a CQL keyspace of its own (both `bench_<hex>`):
//! its queues, topics, consumer groups, tables and rows are new, so a run
//! never touches demo or test data, and each run's CQL store starts from the
//! same empty state rather than from every earlier run's rows. They are
//! removed at the end unless `keep` is set. Load goes only to the configured
//! servers and the roles' loopback edge, and every phase is bounded in time.

pub mod bare;
pub mod chart;
pub mod cpu;
pub mod e2e;
pub mod edge;
pub mod probe;
pub mod projector;
pub mod raw;
pub mod reads;
pub mod rebuild;
pub mod report;
pub mod roles;
pub mod workload;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Connection};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use scylla::client::session::Session;
use sluice_ingest::auth::{hash_key, KeyConfig, TenantConfig};
use sluice_projections::runner::group_id;
use sluice_projections::store::ReadModels;
use sluice_schemas::{catalog, names};

use self::probe::KafkaProbe;
use self::report::{Machine, MemoryReport, Report};
use self::roles::{ConfigFile, RoleProcess};
use self::workload::{Mix, Workload};
use crate::serve::{apply_schema, connect_cql};
use crate::settings::Settings;

/// A machine whose CPUs are less busy than this is quiet (the stack idling
/// with the roles running costs 10–25 % here).
const QUIET_SHARE: f64 = 0.35;

/// The context the bench's commands belong to (the demo's).
const CONTEXT: &str = sluice_schemas::orders::CONTEXT;

/// How long each phase runs, and the knobs shared by all of them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `full` or `quick`.
    pub mode: &'static str,
    /// Closed-loop edge clients (default 32).
    pub concurrency: usize,
    /// In-flight windows every ceiling (raw and bare) is swept over.
    pub windows: Vec<usize>,
    /// The workload's mix of commands, and the seed of its draws.
    pub mix: Mix,
    pub seed: u64,
    /// Events per request in the edge's batch mode.
    pub batch_size: usize,
    /// Length of each window of a ceiling's sweep.
    pub raw_duration: Duration,
    /// Per mode; single mode's backlog is also what the pipeline drains.
    pub edge_duration: Duration,
    /// Longest drain measurement (shorter if the backlog runs out).
    pub drain_window: Duration,
    /// Wait after the first readable event before the drain window opens
    /// (the edge phase's backlog lasts minutes at the drain rate).
    pub drain_settle: Duration,
    /// Processor processes in the drain's scaling step (1: no such step).
    pub processors: usize,
    pub warmup: Duration,
    /// Length of each open-loop run.
    pub step_duration: Duration,
    /// New orders the projector drains alone, produced while it is stopped.
    pub backlog_events: usize,
    /// Open-loop rates, as fractions of the measured maximum.
    pub fractions: Vec<f64>,
    /// Runs of the latency step at half the sustained maximum; the run with
    /// the median p99 gives the figure (one run's tail moves with the
    /// servers' pauses that happen to fall in it).
    pub latency_runs: usize,
    /// Steps after those, each halving the gap between the highest rate
    /// that held and the lowest above it that did not (the fractions are a
    /// quarter of the maximum apart, too coarse to compare runs by).
    pub refinements: usize,
    /// Shortest wait between two reads of an order not yet visible.
    pub poll_interval: Duration,
    /// An order not readable this long after its 202 counts as timed out.
    pub visible_timeout: Duration,
    /// Longest wait for roles to start.
    pub start_timeout: Duration,
    /// Longest wait for the pipeline to go idle after a step.
    pub settle_timeout: Duration,
    /// Longest wait for a quiet machine before a measured phase (the
    /// store compacting what the phase before wrote, for one).
    pub quiet_timeout: Duration,
    /// Keep the run's queues, topics and tables for inspection (not the
    /// ceilings' scratch tables, dropped once measured).
    pub keep: bool,
}

impl Plan {
    /// The full run: about eleven minutes.
    pub fn full(concurrency: usize) -> Self {
        Self {
            mode: "full",
            concurrency,
            windows: vec![32, 128, 512],
            mix: Mix::default(),
            seed: 12,
            batch_size: 20,
            raw_duration: Duration::from_secs(5),
            edge_duration: Duration::from_secs(10),
            drain_window: Duration::from_secs(20),
            // The JVM servers compile the pipeline's paths in its first
            // seconds (a window opened at 3 s measured 880 to 1,590/s on
            // the same code, by how warm the servers were).
            drain_settle: Duration::from_secs(15),
            processors: 3,
            warmup: Duration::from_secs(5),
            step_duration: Duration::from_secs(20),
            backlog_events: 100_000,
            fractions: vec![0.25, 0.5, 0.75, 0.9, 1.0, 1.1],
            latency_runs: 3,
            refinements: 2,
            poll_interval: Duration::from_millis(5),
            visible_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(90),
            settle_timeout: Duration::from_secs(120),
            quiet_timeout: Duration::from_secs(120),
            keep: false,
        }
    }

    /// A smoke run of every phase in about a minute; its figures are too
    /// short-lived to quote.
    pub fn quick(concurrency: usize) -> Self {
        Self {
            mode: "quick",
            windows: vec![32, 128],
            raw_duration: Duration::from_millis(600),
            edge_duration: Duration::from_millis(1_500),
            drain_window: Duration::from_secs(2),
            drain_settle: Duration::from_millis(500),
            processors: 2,
            warmup: Duration::from_secs(1),
            step_duration: Duration::from_millis(1_500),
            backlog_events: 10_000,
            fractions: vec![0.25, 0.5],
            latency_runs: 1,
            refinements: 1,
            visible_timeout: Duration::from_secs(15),
            start_timeout: Duration::from_secs(60),
            settle_timeout: Duration::from_secs(60),
            quiet_timeout: Duration::from_secs(3),
            ..Self::full(concurrency)
        }
    }
}

/// What every phase shares: the roles' settings and clients of the stack.
pub struct Bench {
    pub plan: Plan,
    /// The caller's settings with the bench tenant only, its own projection,
    /// a free edge port and no rate limit: what the roles run with.
    pub settings: Settings,
    pub workload: Arc<Workload>,
    /// The bench tenant's API key (random, per run).
    pub key: String,
    pub http: reqwest::Client,
    pub session: Arc<Session>,
    /// The bench projection's read models.
    pub store: Arc<ReadModels>,
    /// For the probes (queue depths, purges, cleanup).
    pub channel: Channel,
    /// The bench processors' membership (who shares the partitions).
    pub membership: sluice_processors::ownership::CqlMembership,
    amqp: Connection,
    pub kafka: KafkaProbe,
    /// Where the projector role serves its metrics (it and the first
    /// processor role are the only roles that serve them: one address can
    /// be bound once).
    pub projector_metrics_addr: String,
    /// Where the first processor role serves its metrics.
    pub processor_metrics_addr: String,
    cpu: std::sync::Mutex<CpuLog>,
}

/// CPU snapshots at phase boundaries.
#[derive(Default)]
struct CpuLog {
    roles: cpu::Roles,
    /// The phase under way and the snapshot at its start.
    current: Option<(String, cpu::Snapshot)>,
    phases: Vec<cpu::PhaseCpu>,
}

impl Bench {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.settings.ingest.http_addr)
    }

    /// The partition queues of the driven context.
    pub fn work_queues(&self) -> Vec<String> {
        (0..self.settings.amqp.partitions).map(|p| names::command_queue(self.workload.tenant(), CONTEXT, p)).collect()
    }

    pub fn events_topic(&self) -> String {
        names::events_topic(self.workload.tenant(), CONTEXT)
    }

    /// Ends the phase under way (recording its CPU use and each process's
    /// peak RSS within it) and starts `next`.
    fn phase(&self, next: Option<&str>) {
        let mut log = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let now = cpu::Snapshot::take(&log.roles);
        let mut processes: Vec<(u32, &str)> = log.roles.clone();
        processes.push((std::process::id(), "bench"));
        // Peaks since the last reset, then a reset: the next phase's peak
        // is its own. A role that has exited is simply not listed.
        let mut peaks: Vec<(String, f64)> = Vec::new();
        for (pid, name) in processes {
            if let Ok(kib) = roles::peak_rss_kib(pid) {
                let mib = kib as f64 / 1024.0;
                match peaks.iter_mut().find(|(n, _)| n == name) {
                    Some((_, peak)) => *peak = peak.max(mib),
                    None => peaks.push((name.to_owned(), mib)),
                }
                roles::reset_peak_rss(pid);
            }
        }
        if let Some((name, start)) = log.current.take() {
            let mut spent = start.until(&now, &name);
            spent.peak_rss_mib = peaks;
            log.phases.push(spent);
        }
        log.current = next.map(|n| (n.to_owned(), now));
    }

    /// Waits (at most `quiet_timeout`) until the machine's CPUs are less
    /// than `QUIET_SHARE` busy over two seconds, so each measured phase
    /// starts from the same state: not while the store still compacts what
    /// the phase before wrote. The wait is a phase of its own in the CPU
    /// figures, so what kept the machine busy shows there.
    pub async fn quiet(&self, step: &dyn Fn(&str), before: &str) {
        step(&format!("quiet: waiting for a quiet machine before {before}"));
        let deadline = Instant::now() + self.plan.quiet_timeout;
        while cpu::busy_share(Duration::from_secs(2)).await > QUIET_SHARE && Instant::now() < deadline {}
    }

    /// The first processor process's metrics (`http://<admin>/metrics`).
    fn processor_metrics(&self) -> String {
        format!("http://{}/metrics", self.processor_metrics_addr)
    }

    /// Names a role's process in the CPU figures.
    fn role_started(&self, role: &RoleProcess) {
        self.cpu.lock().unwrap_or_else(|e| e.into_inner()).roles.push((role.pid(), role.role));
    }
}

/// The roles' settings: `base` (the caller's file and environment: server
/// addresses and tuning) with a bench tenant, a projection and a keyspace
/// of its own (named as the projection), the edge on a free loopback port,
/// and no rate limit on the bench key.
fn bench_settings(base: &Settings, tenant: &str, key: &str, projection: &str, port: u16) -> Settings {
    let mut settings = base.clone();
    settings.cql.keyspace = projection.to_owned();
    settings.tenants = vec![TenantConfig {
        name: tenant.to_owned(),
        sources: vec![format!("/{tenant}/")],
        keys: vec![KeyConfig { sha256: hex::encode(hash_key(key)), commands: vec![], name: format!("{tenant}-bench") }],
        amqp_url: None,
        kafka_brokers: None,
    }];
    settings.projector.name = projection.to_owned();
    settings.ingest.http_addr = format!("127.0.0.1:{port}");
    settings.ingest.rate_limit_per_second = 0.0;
    settings.ingest.read_rate_limit_per_second = 0.0;
    // The bench runs several role processes at once (and maybe `make run`
    // beside them): only the projector and the first processor serve the
    // admin address, each on a port of its own (`phases`), since one
    // address can be bound once.
    settings.metrics.addr = None;
    settings
}

/// Runs every phase against the stack `base` points at; `step` hears the
/// name of each phase as it starts. The roles' logs go to `<out>/logs/`.
pub async fn run(base: &Settings, plan: Plan, out: &Path, step: &dyn Fn(&str)) -> anyhow::Result<Report> {
    step("noise guard: how busy is the machine before the run");
    let busy_share_before = cpu::busy_share(Duration::from_secs(2)).await;
    let began = Instant::now();
    let load_average_start = cpu::load_average();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (tenant, projection) = (format!("bench{id}"), format!("bench_{id}"));
    let key = format!("{tenant}-key-{}", uuid::Uuid::new_v4().simple());
    let settings = bench_settings(base, &tenant, &key, &projection, roles::free_port()?);

    step("creating the run's keyspace");
    apply_schema(&settings).await.context("creating the run's keyspace")?;
    step("connecting to the stack");
    let session = connect_cql(&settings).await?;
    let leftover_tables = probe::leftover_tables(&session, &settings.cql.keyspace).await?;
    let store = Arc::new(ReadModels::new(session.clone(), &settings.projector).await?);
    let amqp = raw::amqp_connect(&settings.amqp.url).await?;
    let channel = amqp.create_channel().await?;
    let kafka = KafkaProbe::new(&settings.kafka.brokers)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let workload = Workload::new(&tenant, plan.mix, plan.seed);
    let group = sluice_processors::ownership::group_for(std::slice::from_ref(&tenant));
    let membership =
        sluice_processors::ownership::CqlMembership::new(session.clone(), &group).await.map_err(anyhow::Error::msg)?;
    let bench = Bench {
        plan,
        settings,
        workload: Arc::new(workload),
        key,
        http,
        session,
        store,
        channel,
        membership,
        amqp,
        kafka,
        projector_metrics_addr: format!("127.0.0.1:{}", roles::free_port()?),
        processor_metrics_addr: format!("127.0.0.1:{}", roles::free_port()?),
        cpu: Default::default(),
    };

    let tracked = |name: &str| {
        bench.phase(Some(name));
        step(name);
    };
    let result = phases(&bench, out, &tracked).await;
    bench.phase(None);
    let load_average_end = cpu::load_average();
    if !bench.plan.keep {
        step("removing the run's queues, topics and keyspace");
        for problem in cleanup(&bench).await {
            eprintln!("warning: cleanup: {problem}");
        }
    }
    let _ = bench.amqp.close(200, "bench done".into()).await;
    let Bench { plan, kafka, cpu, settings, .. } = bench;
    kafka.close().await;
    let cpu = cpu.into_inner().unwrap_or_else(|e| e.into_inner()).phases;
    let Phases { raw, bare, edge, e2e, reads, projector_alone, projector_backlog, rebuild, mut memory } = result?;
    memory.bench_mib = peak_over_run(&cpu, "bench");
    let (ratios, latency_target) = Report::ratios(&raw, &bare, &edge, &e2e, &rebuild, &projector_backlog);
    let apply_latency_target = Report::apply_latency_target(&projector_alone);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let busy = (busy_share_before > 0.25 || load_average_start > cpus as f64).then(|| {
        format!(
            "the machine was busy when the run started ({:.0} % of its CPUs in the two seconds before, load average \
             {load_average_start:.1} on {cpus} CPUs)",
            busy_share_before * 100.0
        )
    });
    let left = (leftover_tables > 0).then(|| {
        format!(
            "the CQL store held {leftover_tables} tables of earlier test or bench runs, whose metrics weigh on its heap \
             (`make sweep` removes them)"
        )
    });
    let warning = match (busy, left) {
        (None, None) => None,
        (a, b) => Some(format!(
            "{}: these figures are not comparable with a quiet run's",
            a.into_iter().chain(b).collect::<Vec<_>>().join("; ")
        )),
    };
    Ok(Report {
        mode: plan.mode,
        started_at,
        seconds: began.elapsed().as_secs_f64(),
        machine: Machine {
            load_average_start,
            load_average_end,
            busy_share_before,
            leftover_tables,
            warning,
            ..machine()
        },
        tenant,
        projection,
        keyspace: settings.cql.keyspace,
        mix: plan.mix,
        raw,
        bare,
        edge,
        e2e,
        reads,
        rebuild,
        memory,
        cpu,
        ratios,
        latency_target,
        projector_alone,
        projector_backlog,
        apply_latency_target,
    })
}

struct Phases {
    raw: report::RawReport,
    bare: report::BareReport,
    edge: report::EdgeReport,
    e2e: report::E2eReport,
    reads: report::ReadsReport,
    projector_alone: report::ProjectorStep,
    projector_backlog: report::ProjectorBacklog,
    rebuild: report::RebuildReport,
    memory: MemoryReport,
}

/// Drops those of `tables` that exist (a dropped table's pending
/// compactions are cancelled with it); every table is tried, and the
/// error is the first table that could not be dropped.
async fn drop_tables(bench: &Bench, tables: &[String]) -> anyhow::Result<()> {
    let mut first = Ok(());
    for table in tables {
        let dropped = bench.session.query_unpaged(format!("DROP TABLE IF EXISTS {table}"), ()).await;
        if let (Err(e), Ok(())) = (dropped, &first) {
            first = Err(anyhow::anyhow!("dropping {table}: {e}"));
        }
    }
    first
}

/// The largest per-phase peak RSS of `who`, MiB.
fn peak_over_run(phases: &[cpu::PhaseCpu], who: &str) -> f64 {
    phases.iter().flat_map(|p| &p.peak_rss_mib).filter(|(n, _)| n == who).map(|(_, mib)| *mib).fold(0.0, f64::max)
}

async fn phases(bench: &Bench, out: &Path, step: &dyn Fn(&str)) -> anyhow::Result<Phases> {
    // Each ceiling's tables go as soon as it is measured: compacting the
    // rows it wrote would otherwise take a core away from the later phases.
    let raw = raw::run(bench, step).await?;
    drop_tables(bench, &raw::raw_tables(&bench.settings.projector.name)).await?;
    bench.quiet(step, "the bare hops").await;
    let mut bare = bare::run(bench, step).await?;
    drop_tables(bench, &bare::bare_tables(&bench.settings.projector.name)).await?;

    let config = ConfigFile::write(&bench.settings)?;
    let logs = out.join("logs");
    step("starting the ingest role");
    let mut ingest = RoleProcess::spawn(&config, "ingest", &logs)?;
    bench.role_started(&ingest);
    wait_for_edge(bench, &mut ingest).await?;
    bench.quiet(step, "the edge").await;
    let edge = edge::run(bench, step).await?;

    step("starting the projector and processor roles");
    // Every role shares the generated configuration; a role the bench reads
    // metrics from gets an admin address of its own on top of it.
    let spawn_with_metrics = |role: &'static str, name: &str, addr: &str| {
        RoleProcess::spawn_as(&config, role, name, &logs, &[("SLUICE_METRICS__ADDR", addr)])
    };
    let mut projector = spawn_with_metrics("projector", "projector", &bench.projector_metrics_addr)?;
    bench.role_started(&projector);
    wait_for_group(bench, &mut projector).await?;
    bench.quiet(step, "the drain").await;
    let mut processor = spawn_with_metrics("processor", "processor", &bench.processor_metrics_addr)?;
    bench.role_started(&processor);
    // Each further processor process gets an admin address of its own too:
    // the scaled drain counts the commands every process settled.
    let extra = std::cell::Cell::new(1);
    let more_processor = || -> anyhow::Result<(RoleProcess, String)> {
        extra.set(extra.get() + 1);
        let addr = format!("127.0.0.1:{}", roles::free_port()?);
        let process = spawn_with_metrics("processor", &format!("processor-{}", extra.get()), &addr)?;
        Ok((process, format!("http://{addr}/metrics")))
    };
    let e2e = e2e::run(bench, &mut [&mut ingest, &mut processor, &mut projector], &more_processor, step).await?;
    bench.quiet(step, "the reads").await;
    let reads = reads::run(bench, step).await?;
    // Half of the projector's drain maximum in offsets a second (transaction
    // markers included: a little more than half of its events a second).
    let alone = e2e.projector_per_second * e2e.offsets_per_command * 0.5;
    bench.quiet(step, "the projector alone").await;
    step(&format!("projector alone: {alone:.0} new orders/s produced straight to its topic (half its drain maximum)"));
    let projector_alone = projector::run(bench, alone, bench.plan.step_duration).await?;
    bench.quiet(step, "the projector on a backlog").await;
    let n = bench.plan.backlog_events;
    step(&format!("projector alone on a backlog: {n} new orders produced while it is stopped, then drained"));
    let projector_backlog = projector::backlog(bench, &projector, n).await?;

    // A new phase: the last e2e phase's peaks are recorded while the roles live.
    step("stopping the roles");
    let memory = {
        let log = bench.cpu.lock().unwrap_or_else(|e| e.into_inner());
        MemoryReport {
            ingest_mib: peak_over_run(&log.phases, "ingest"),
            processor_mib: peak_over_run(&log.phases, "processor"),
            projector_mib: peak_over_run(&log.phases, "projector"),
            bench_mib: 0.0,
        }
    };
    let grace = Duration::from_secs(30);
    let stopped = [ingest.stop(grace).await, processor.stop(grace).await, projector.stop(grace).await];
    for outcome in stopped {
        outcome?;
    }

    // The servers alone at the latency step's rate, once the roles are
    // gone: the floor under its end-to-end latency.
    if let Some(half) = &e2e.half_sustained {
        bench.quiet(step, "the bare hops at the latency step's rate").await;
        bare.latency = Some(bare::latency(bench, half.target_per_second, bench.plan.step_duration, step).await?);
        drop_tables(bench, &bare::bare_tables(&bench.settings.projector.name)).await?;
    }

    // Like every measured phase: the store compacts what the end-to-end
    // phases wrote before the rebuild has the machine.
    bench.quiet(step, "the rebuild").await;
    step("rebuild: replaying the topic into a new version");
    let rebuild = rebuild::run(bench).await?;
    Ok(Phases { raw, bare, edge, e2e, reads, projector_alone, projector_backlog, rebuild, memory })
}

/// Waits until the edge answers `/readyz` (connected to RabbitMQ).
async fn wait_for_edge(bench: &Bench, ingest: &mut RoleProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + bench.plan.start_timeout;
    loop {
        ingest.check_alive()?;
        if let Ok(response) = bench.http.get(bench.url("/readyz")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the edge was not ready within {:?}; end of its log:\n{}",
                bench.plan.start_timeout,
                ingest.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the projector's consumer group has joined, so the drain
/// measures processing, not a group forming.
async fn wait_for_group(bench: &Bench, projector: &mut RoleProcess) -> anyhow::Result<()> {
    let group = group_id(&bench.settings.projector, 1);
    let deadline = Instant::now() + bench.plan.start_timeout;
    loop {
        projector.check_alive()?;
        if bench.kafka.group_stable(&group).await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the projector's group {group} did not form within {:?}; end of its log:\n{}",
                bench.plan.start_timeout,
                projector.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes what the run created, as far as it can; returns what failed.
/// Its tables and rows go with its keyspace.
async fn cleanup(bench: &Bench) -> Vec<String> {
    let mut problems = Vec::new();
    let tenant = bench.workload.tenant();
    let projection = &bench.settings.projector.name;

    // The roles declare the queues and topics of every context, not only
    // the one the bench drives.
    let contexts: Vec<&str> = catalog::CONTEXTS.iter().map(|c| c.name).collect();
    let mut queues = Vec::new();
    for context in &contexts {
        queues.extend((0..bench.settings.amqp.partitions).map(|p| names::command_queue(tenant, context, p)));
        queues.push(names::dead_letter_queue(tenant, context));
    }
    // The raw and bare phases' scratch contexts (one partition each).
    let scratch = [raw::RAW_CONTEXT, bare::BARE_CONTEXT];
    queues
        .extend(scratch.iter().flat_map(|c| [names::command_queue(tenant, c, 0), names::dead_letter_queue(tenant, c)]));
    for queue in &queues {
        if let Err(e) = bench.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
            problems.push(format!("deleting queue {queue}: {e}"));
        }
    }

    let topic = bench.events_topic();
    let mut topics: Vec<String> = contexts.iter().map(|c| names::events_topic(tenant, c)).collect();
    topics.push(sluice_streams::dead_letter::dead_letter_topic(&topic, projection));
    topics.extend(scratch.iter().map(|c| names::events_topic(tenant, c)));
    let mut groups: Vec<String> = (1..=2).map(|v| group_id(&bench.settings.projector, v)).collect();
    // The relays' positions: the journal holding the entries they count is
    // keyed by the run's tenant too.
    groups.extend(contexts.iter().map(|c| sluice_processors::kafka::relay_group(tenant, c)));
    match ClientConfig::new()
        .set("bootstrap.servers", &bench.settings.kafka.brokers)
        // Deleting topics makes it report their partitions gone, at info.
        .set_log_level(RDKafkaLogLevel::Warning)
        .create::<AdminClient<DefaultClientContext>>()
    {
        Ok(admin) => {
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            if let Err(e) = admin.delete_topics(&names, &options).await {
                problems.push(format!("deleting topics: {e}"));
            }
            // Groups that never committed do not exist: not a problem.
            let names: Vec<&str> = groups.iter().map(String::as_str).collect();
            let _ = admin.delete_groups(&names, &options).await;
            let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
        }
        Err(e) => problems.push(format!("Kafka admin client: {e}")),
    }

    // The run's tables and rows: the keyspace is the run's own.
    let keyspace = &bench.settings.cql.keyspace;
    if let Err(e) = bench.session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ()).await {
        problems.push(format!("dropping keyspace {keyspace}: {e}"));
    }

    // The schemas the processors registered for the bench topics.
    let registry = bench.settings.registry.url.trim_end_matches('/');
    for (context, spec) in catalog::CONTEXTS.iter().flat_map(|c| c.events.iter().map(move |e| (c.name, e))) {
        let subject = names::event_subject(&names::events_topic(tenant, context), spec.ty);
        for permanent in ["false", "true"] {
            let url = format!("{registry}/subjects/{subject}?permanent={permanent}");
            // A subject never registered answers 404: nothing to remove.
            let _ = bench.http.delete(&url).send().await;
        }
    }
    problems
}

fn machine() -> Machine {
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    Machine {
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory_mib: memory_kib / 1024,
        build: if cfg!(debug_assertions) { "debug" } else { "release" },
        ..Default::default()
    }
}

/// Writes `report.json`, `report.md`, `latency.svg` (latency percentiles
/// against offered load) and `stages.svg` (each stage's rate) into `out`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json).context("writing report.json")?;
    std::fs::write(out.join("report.md"), report.markdown()).context("writing report.md")?;
    std::fs::write(out.join("latency.svg"), chart::latency(report)).context("writing latency.svg")?;
    std::fs::write(out.join("stages.svg"), chart::stages(report)).context("writing stages.svg")?;
    Ok(())
}
