//! The benchmark's findings: one serializable report (`report.json`), the
//! ratios of issue 12 computed from it, the same report as Markdown
//! (`report.md`, also what a run prints), and `--compare`: the change of
//! every figure between two reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

use super::cpu::PhaseCpu;
use super::workload::Mix;

/// A count over a time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub count: u64,
    pub seconds: f64,
    pub per_second: f64,
}

impl Throughput {
    pub fn new(count: u64, seconds: f64) -> Self {
        Self { count, seconds, per_second: if seconds > 0.0 { count as f64 / seconds } else { 0.0 } }
    }
}

/// One in-flight window of a ceiling's sweep.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepPoint {
    /// Operations in flight at once.
    pub window: usize,
    pub rate: Throughput,
    /// CPU µs per operation of each process group (servers, the bench's
    /// clients, `other`), largest first.
    pub cpu_us_per_op: Vec<(String, f64)>,
    /// Busy CPU µs of the whole machine per operation.
    pub busy_us_per_op: f64,
}

/// A ceiling: the best window of a sweep.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ceiling {
    /// What one operation is (publishes, rows, commands…).
    pub unit: &'static str,
    pub best_window: usize,
    pub per_second: f64,
    pub sweep: Vec<SweepPoint>,
}

impl Ceiling {
    pub fn new(unit: &'static str, sweep: Vec<SweepPoint>) -> Self {
        let best = sweep.iter().max_by(|a, b| a.rate.per_second.total_cmp(&b.rate.per_second));
        Self {
            unit,
            best_window: best.map_or(0, |p| p.window),
            per_second: best.map_or(0.0, |p| p.rate.per_second),
            sweep,
        }
    }

    fn best(&self) -> Option<&SweepPoint> {
        self.sweep.iter().find(|p| p.window == self.best_window)
    }
}

/// The servers' own ceilings, measured with the roles' client libraries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RawReport {
    /// The in-flight windows every ceiling was swept over.
    pub windows: Vec<usize>,
    /// Persistent, mandatory publishes to a quorum queue declared like the
    /// work queues, each awaited until the broker's confirm.
    pub amqp_publish: Ceiling,
    /// Deliveries of that queue, acked one by one, prefetch = window.
    pub amqp_consume: Ceiling,
    /// Idempotent produce (acks=all, linger 2 ms).
    pub kafka_produce: Ceiling,
    /// Prepared INSERTs of the read model's order row (USING TIMESTAMP).
    pub cql_insert: Ceiling,
    /// Unlogged batches of `rows_per_batch` rows of one partition, in rows.
    pub cql_batch_insert: Ceiling,
    /// `rows_per_batch` rows of as many partitions, in unlogged batches by
    /// the replicas that hold them: the shape of a projector's batch (one
    /// order per event), in rows.
    pub cql_spread_batch_insert: Ceiling,
    /// The rows new orders make in the read model (an order row with its
    /// lines, a customer row), `rows_per_order_rows_batch` rows of as many
    /// partitions at a time as the live projector batches them: the same
    /// rows it writes on a backlog, with no projector, in rows.
    pub cql_order_rows_insert: Ceiling,
    pub rows_per_order_rows_batch: usize,
    /// INSERT … IF NOT EXISTS into a copy of the event store table (a Paxos
    /// round): context for what an LWT per append costs, not a ceiling.
    pub cql_lwt_insert: Ceiling,
    pub rows_per_batch: usize,
    pub command_bytes: usize,
    pub event_bytes: usize,
}

/// The bare-hops pipeline: every hop a command needs, no sluice logic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BareReport {
    pub hops: String,
    /// Commands through every hop per second, swept over the window.
    pub ceiling: Ceiling,
    /// The same hops open loop at the end-to-end latency step's rate (none
    /// when no step held).
    pub latency: Option<BareLatency>,
}

/// The bare hops open loop at one rate: the latency the servers alone give.
#[derive(Debug, Clone, Serialize)]
pub struct BareLatency {
    /// The offered rate (the end-to-end latency step's).
    pub per_second: f64,
    pub seconds: f64,
    /// From each command's scheduled publish to its read-model rows written.
    pub latency_ms: Percentiles,
    /// The rate through every hop and the CPU it cost.
    pub point: SweepPoint,
}

/// Closed-loop clients against the edge alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeMode {
    pub requests: u64,
    /// Commands answered 202 (a batch counts its events).
    pub commands: u64,
    /// Answers other than 202 (none expected: the bench key has no rate limit).
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub commands_per_second: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeReport {
    pub clients: usize,
    pub batch_size: usize,
    pub single: EdgeMode,
    pub batch: EdgeMode,
}

/// Closed-loop clients reading one route.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadMode {
    pub requests: u64,
    /// Answers other than 200 (none expected: the orders exist, the bench
    /// key has no rate limit).
    pub errors: u64,
    /// The first of them: request, status and body.
    pub first_error: Option<String>,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub latency_ms: Percentiles,
}

/// The read routes under load, after the end-to-end phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadsReport {
    pub clients: usize,
    /// Orders the day's sales counted when the phase began.
    pub orders_in_day: i64,
    pub by_id: ReadMode,
    pub daily_sales: ReadMode,
}

/// Milliseconds at the percentiles that matter, and the curve for charts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// One open-loop run at a fixed offered rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Step {
    /// Of the drain maximum (or, for the latency step, of the sustained maximum).
    pub fraction: f64,
    pub target_per_second: f64,
    pub seconds: f64,
    /// Requests sent, and the rate at which they went out.
    pub sent: u64,
    pub sent_per_second: f64,
    pub accepted: u64,
    /// Answers other than 202, and transport errors.
    pub errors: u64,
    /// Every `sample_every`-th command is followed to the read model.
    pub sample_every: u64,
    /// Sampled commands not visible within the visibility timeout.
    pub timeouts: u64,
    /// Sampled commands: from the scheduled send to the command being
    /// visible (its operation terminal and, if it changed the order, the
    /// read model showing the change). Coordinated omission included.
    pub latency_ms: Percentiles,
    /// Followed commands: from the 202 to their operation seen terminal,
    /// and from there to the read model showing the change (zero for a
    /// rejection), each as late as the reads that saw it.
    pub to_terminal_ms: Percentiles,
    pub to_read_model_ms: Percentiles,
    /// The slowest followed commands, slowest first.
    pub slowest: Vec<SlowCommand>,
    /// From the actual send to the 202 (every command).
    pub accept_latency_ms: Percentiles,
    /// How late the generator sent each request against its schedule.
    pub generator_lag_ms: Percentiles,
    /// Commands queued plus events not yet applied, sampled while sending:
    /// at the end of sending, the largest seen, and its growth per second
    /// over the second half (least squares).
    pub backlog_after_sending: i64,
    pub backlog_max: i64,
    pub backlog_growth_per_second: f64,
    /// The pipeline kept up: the generator sent the rate, nothing failed,
    /// the backlog ended under a second's worth and, if more than a quarter
    /// second's worth was waiting, did not grow (by 2 % of the rate a second).
    pub holds: bool,
    /// Seconds from the end of sending until the pipeline was idle again.
    pub settle_seconds: f64,
    /// Visibility reads (operation and order GETs) per second.
    pub polls_per_second: f64,
    /// CQL statements per accepted command during the step, by table, from
    /// the store's own metrics (empty where it has none).
    pub cql_per_command: Vec<TableOps>,
    /// Offsets the events topic advanced per accepted command during the
    /// step: its events, and a transaction marker per partition a Kafka
    /// transaction wrote to (so the fewer commands a round holds, the more).
    pub kafka_offsets_per_command: f64,
    /// The projector's apply latency during the step (each record's wait
    /// for its batch to be written), from its own histogram: the upper bound
    /// of the bucket holding the median and the 99th percentile.
    pub apply_p50_ms: Option<f64>,
    pub apply_p99_ms: Option<f64>,
    /// The processor's time per command during the step, from taking the
    /// delivery to settling it (`sluice_command_seconds`): bucket bounds as
    /// for the apply latency.
    pub processor_p50_ms: Option<f64>,
    pub processor_p99_ms: Option<f64>,
    /// Where that time went; `None` when no round finished in the step.
    pub processor_times: Option<ProcessorTimes>,
}

/// One of a step's slowest followed commands: when it was scheduled, and
/// where its time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowCommand {
    /// The scheduled send, UTC (to line up with the servers' logs).
    pub at: String,
    /// Seconds into the step.
    pub offset_s: f64,
    pub kind: String,
    pub total_ms: f64,
    /// Scheduled send to 202 (the wait for a connection included).
    pub accept_ms: f64,
    /// 202 to the operation seen terminal.
    pub terminal_ms: f64,
    /// Terminal to the read model showing the change.
    pub read_model_ms: f64,
}

/// Where the processor's time went in a step, from its own histograms
/// between the step's start and end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessorTimes {
    /// From taking a delivery to the start of the round that decides it
    /// (`sluice_command_wait_seconds`): waiting for a round in the relay,
    /// and for a retried delivery its backoff too.
    pub wait: Timing,
    /// From a round's start to its relay finishing it
    /// (`sluice_round_seconds`).
    pub round: Timing,
    pub commands_per_round: f64,
    /// The requests that went out together in one group commit, on
    /// average, by what they read or write (`sluice_group_commit_requests`):
    /// the rounds of several partitions that came together.
    pub requests_per_group: Vec<(String, f64)>,
    /// Each stage of a round (`sluice_round_stage_seconds`), in the order
    /// they start; stream rows, rejections and the produce run together.
    pub stages: Vec<(String, Timing)>,
    /// Commands the rounds that finished decided per Kafka transaction the
    /// relay ended, and the partitions whose rounds shared one on average
    /// (`sluice_relay_transaction_partitions`): each transaction costs
    /// Kafka the same requests whatever it carries.
    pub commands_per_transaction: Option<f64>,
    pub partitions_per_transaction: Option<f64>,
}

/// One histogram's figures between two scrapes: the mean, and the upper
/// bound of the bucket holding the 99th percentile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub mean_ms: f64,
    pub p99_ms: Option<f64>,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} (p99 {})", self.mean_ms, bound(self.p99_ms))
    }
}

/// CQL reads and writes per command on one table, as the store's
/// coordinator counts them (an LWT shows as a write and reads).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableOps {
    pub table: String,
    pub reads: f64,
    pub writes: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct E2eReport {
    /// The drain maximum: min(processor, projector) in commands/s while
    /// draining a backlog; the offered rates are fractions of it.
    pub max_per_second: f64,
    /// Commands taken off the work queue per second while draining.
    pub processor_per_second: f64,
    /// Events applied per second while draining, in commands (÷ offsets per command).
    pub projector_per_second: f64,
    /// Kafka offsets per command: its events, and its share of the
    /// transaction markers (one per processor round).
    pub offsets_per_command: f64,
    pub bottleneck: String,
    pub window_seconds: f64,
    pub backlog_at_start: u32,
    pub method: String,
    /// How visibility was measured.
    pub visibility: String,
    /// The open-loop sweep.
    pub steps: Vec<Step>,
    /// The highest offered rate whose step held (accepted commands/s), 0
    /// when none did.
    pub sustained_per_second: f64,
    /// The latency step at half the sustained maximum: of its runs, the one
    /// with the median p99.
    pub half_sustained: Option<Step>,
    /// Every run of the latency step, in the order they ran.
    pub latency_runs: Vec<Step>,
    /// The processors' rate on the same backlog with 1, then N processor
    /// processes (competing consumers of one queue).
    pub scaling: Vec<Scaling>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scaling {
    pub processes: usize,
    /// Commands taken off the work queue per second.
    pub commands_per_second: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildReport {
    pub events: u64,
    /// Read-model rows written, as the projection counts them.
    pub rows: u64,
    /// Mutations the store counted on the new version's tables (a batch of
    /// rows of one partition is one), where it keeps such counts.
    pub store_mutations: Option<u64>,
    pub seconds: f64,
    pub events_per_second: f64,
    pub rows_per_second: f64,
    pub version: i32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// Peak RSS (VmHWM) of each role process over the whole run, MiB; per
    /// phase in `cpu[].peak_rss_mib`.
    pub ingest_mib: f64,
    pub processor_mib: f64,
    pub projector_mib: f64,
    /// This process (load generator, raw clients, the rebuild).
    pub bench_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub value: f64,
    pub target: f64,
    pub met: bool,
    pub of: String,
}

impl Ratio {
    fn new(numerator: f64, denominator: f64, target: f64, of: &str) -> Self {
        let value = fraction(numerator, denominator);
        Self { value, target, met: value >= target, of: of.to_owned() }
    }
}

/// `numerator / denominator`, 0 when nothing was measured below.
fn fraction(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub sustained_vs_bare: Ratio,
    pub edge_single_vs_amqp_publish: Ratio,
    pub edge_batch_vs_amqp_publish: Ratio,
    pub rebuild_rows_vs_cql_batch_insert: Ratio,
    pub rebuild_rows_vs_cql_spread_batch_insert: Ratio,
    pub backlog_rows_vs_cql_spread_batch_insert: Ratio,
    /// The live projector's rows on a backlog against the same rows
    /// written raw (`RawReport::cql_order_rows_insert`): what its logic
    /// costs on top of the store's work for those rows. No target.
    pub backlog_rows_vs_cql_order_rows_insert: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyTarget {
    /// The offered rate of the latency step (half the sustained maximum).
    pub per_second: f64,
    pub p99_ms: f64,
    pub target_ms: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_mib: u64,
    /// `release` or `debug`: a debug build's figures say little.
    pub build: &'static str,
    /// 1-minute load average when the run started and when it ended.
    pub load_average_start: f64,
    pub load_average_end: f64,
    /// Share of the CPUs busy over the two seconds before the run (the
    /// stack idling costs a few percent).
    pub busy_share_before: f64,
    /// Tables of earlier test or bench runs' projections in the keyspace
    /// when the run started.
    pub leftover_tables: usize,
    /// Set when the machine was busy before the run, or the store held
    /// leftovers: its figures are not comparable with a quiet run's.
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub started_at: String,
    pub seconds: f64,
    pub machine: Machine,
    pub tenant: String,
    pub projection: String,
    /// The CQL keyspace the run made for itself (named as its projection),
    /// dropped at the end unless `--keep`.
    pub keyspace: String,
    pub mix: Mix,
    pub raw: RawReport,
    pub bare: BareReport,
    pub edge: EdgeReport,
    pub e2e: E2eReport,
    pub reads: ReadsReport,
    pub rebuild: RebuildReport,
    pub memory: MemoryReport,
    /// CPU seconds per process group, noise and peak RSS in each phase.
    pub cpu: Vec<PhaseCpu>,
    pub ratios: Ratios,
    pub latency_target: LatencyTarget,
    /// The projector alone at half of its drain maximum (`projector`).
    pub projector_alone: ProjectorStep,
    /// The live projector alone on a backlog (`projector::backlog`).
    pub projector_backlog: ProjectorBacklog,
    /// The projector's apply p99 alone at half of its drain maximum,
    /// against issue 13's 20 ms.
    pub apply_latency_target: LatencyTarget,
}

/// The projector alone at a fixed rate of new orders produced straight to
/// its topic (`projector`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProjectorStep {
    /// Half of the projector's drain maximum, in offsets a second.
    pub target_per_second: f64,
    pub events: usize,
    /// Records Kafka did not take.
    pub failed: usize,
    pub sent_per_second: f64,
    /// From the first record's schedule to the last one applied.
    pub caught_up_after_s: f64,
    /// Bucket bounds of `sluice_projection_apply_seconds` over the step.
    pub apply_p50_ms: Option<f64>,
    pub apply_p99_ms: Option<f64>,
}

/// The live projector role draining a backlog of new orders by itself
/// (`projector::backlog`): its rows a second compare with the batched
/// insert ceiling, as the rebuild's do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProjectorBacklog {
    pub events: u64,
    /// Read-model rows the projector wrote meanwhile
    /// (`sluice_projection_rows_total`).
    pub rows: u64,
    /// The store's count of mutations on the projection's tables meanwhile
    /// (a batch of one partition's rows is one).
    pub store_mutations: Option<u64>,
    /// From the projector's resumption to the last event applied (its
    /// offsets recorded).
    pub seconds: f64,
    /// From its resumption to the first rows it counted written.
    pub first_write_after_s: f64,
    /// From the first rows counted to the last, as the step sampled them
    /// (every 20 ms): the window of the pace below.
    pub writing_seconds: f64,
    /// At the pace of its rows.
    pub events_per_second: f64,
    /// Rows written per second over `writing_seconds`.
    pub rows_per_second: f64,
}

impl Report {
    /// The ratios and the latency target, from the measured figures.
    pub fn ratios(
        raw: &RawReport,
        bare: &BareReport,
        edge: &EdgeReport,
        e2e: &E2eReport,
        rebuild: &RebuildReport,
        backlog: &ProjectorBacklog,
    ) -> (Ratios, LatencyTarget) {
        let ratios = Ratios {
            sustained_vs_bare: Ratio::new(
                e2e.sustained_per_second,
                bare.ceiling.per_second,
                0.8,
                "sustained e2e / bare-hops ceiling",
            ),
            edge_single_vs_amqp_publish: Ratio::new(
                edge.single.commands_per_second,
                raw.amqp_publish.per_second,
                0.8,
                "edge single / raw publish at saturation",
            ),
            edge_batch_vs_amqp_publish: Ratio::new(
                edge.batch.commands_per_second,
                raw.amqp_publish.per_second,
                0.8,
                "edge batch / raw publish at saturation",
            ),
            rebuild_rows_vs_cql_batch_insert: Ratio::new(
                rebuild.rows_per_second,
                raw.cql_batch_insert.per_second,
                0.8,
                "rebuild rows / raw batched insert rows",
            ),
            rebuild_rows_vs_cql_spread_batch_insert: Ratio::new(
                rebuild.rows_per_second,
                raw.cql_spread_batch_insert.per_second,
                0.8,
                "rebuild rows / raw batched insert rows across partitions",
            ),
            backlog_rows_vs_cql_spread_batch_insert: Ratio::new(
                backlog.rows_per_second,
                raw.cql_spread_batch_insert.per_second,
                0.8,
                "live projector rows on a backlog / raw batched insert rows across partitions",
            ),
            backlog_rows_vs_cql_order_rows_insert: fraction(
                backlog.rows_per_second,
                raw.cql_order_rows_insert.per_second,
            ),
        };
        let (per_second, p99) =
            e2e.half_sustained.as_ref().map_or((0.0, 0.0), |s| (s.target_per_second, s.latency_ms.p99));
        let latency = LatencyTarget { per_second, p99_ms: p99, target_ms: 50.0, met: p99 > 0.0 && p99 <= 50.0 };
        (ratios, latency)
    }

    /// The projector's apply p99 alone at half of its maximum against its
    /// target.
    pub fn apply_latency_target(alone: &ProjectorStep) -> LatencyTarget {
        let (per_second, p99) = (alone.target_per_second, alone.apply_p99_ms.unwrap_or(0.0));
        LatencyTarget { per_second, p99_ms: p99, target_ms: 20.0, met: p99 > 0.0 && p99 <= 20.0 }
    }

    /// The report as Markdown: printed at the end of a run, and `report.md`.
    pub fn markdown(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "# sluice bench — {} mode, {} build, {} CPUs, {} MiB",
            self.mode, m.build, m.cpus, m.memory_mib
        );
        let _ = writeln!(
            t,
            "\nStarted {} (tenant `{}`, keyspace `{}`), {:.0} s. Load average {:.2} → {:.2}; CPUs busy before the start: \
             {:.0} %.",
            self.started_at,
            self.tenant,
            self.keyspace,
            self.seconds,
            m.load_average_start,
            m.load_average_end,
            m.busy_share_before * 100.0
        );
        if let Some(warning) = &m.warning {
            let _ = writeln!(t, "\n**Warning: {warning}**");
        }
        let x = &self.mix;
        let _ = writeln!(
            t,
            "\nWorkload: {:.0} % SubmitOrder (new orders), {:.0} % ShipOrder, {:.0} % CancelOrder (orders drawn with skew \
             from the 5,000 newest), {:.0} % client retries of an earlier CloudEvent.",
            x.submit * 100.0,
            x.ship * 100.0,
            x.cancel * 100.0,
            x.retry * 100.0
        );

        let r = &self.raw;
        let windows: Vec<String> = r.windows.iter().map(usize::to_string).collect();
        let _ = writeln!(
            t,
            "\n## Ceilings\n\nEach swept over {} operations in flight; the best window counts. Command {} B JSON, event {} B Avro.\n",
            windows.join(", "),
            r.command_bytes,
            r.event_bytes
        );
        let _ = writeln!(t, "| what | best /s | window | per window (/s) | CPU µs per operation at the best window |");
        let _ = writeln!(t, "|---|---:|---:|---|---|");
        let b = &self.bare;
        for (name, c) in [
            ("RabbitMQ publish, confirms", &r.amqp_publish),
            ("RabbitMQ consume, acks", &r.amqp_consume),
            ("Kafka produce, idempotent acks=all", &r.kafka_produce),
            ("CQL insert (rows)", &r.cql_insert),
            (&*format!("CQL unlogged batch of {} (rows)", r.rows_per_batch), &r.cql_batch_insert),
            (&*format!("CQL unlogged batches, {} partitions (rows)", r.rows_per_batch), &r.cql_spread_batch_insert),
            (
                &*format!(
                    "CQL unlogged batches of new orders' rows, {} rows of as many partitions (rows)",
                    r.rows_per_order_rows_batch
                ),
                &r.cql_order_rows_insert,
            ),
            ("CQL insert IF NOT EXISTS (context)", &r.cql_lwt_insert),
            ("**bare hops** (commands, every hop)", &b.ceiling),
        ] {
            let sweep: Vec<String> =
                c.sweep.iter().map(|p| format!("{}: {:.0}", p.window, p.rate.per_second)).collect();
            let cpu = c.best().map(cpu_line).unwrap_or_default();
            let _ = writeln!(t, "| {name} | {:.0} | {} | {} | {cpu} |", c.per_second, c.best_window, sweep.join(" · "));
        }
        let _ = writeln!(t, "\nBare hops: {}.", b.hops);
        if let Some(l) = &b.latency {
            let _ = writeln!(
                t,
                "\nBare hops open loop at {:.0}/s for {:.0} s (the end-to-end latency step's rate, the roles stopped): \
                 {:.0} commands/s through every hop, scheduled publish → read-model rows written p50 {:.1} ms, \
                 p99 {:.1}, p99.9 {:.1}, max {:.1} ({} commands); CPU µs per command: {}.",
                l.per_second,
                l.seconds,
                l.point.rate.per_second,
                l.latency_ms.p50,
                l.latency_ms.p99,
                l.latency_ms.p999,
                l.latency_ms.max,
                l.latency_ms.count,
                cpu_line(&l.point)
            );
        }

        let e = &self.edge;
        let _ = writeln!(t, "\n## Edge (ingest role alone, {} keep-alive clients)\n", e.clients);
        let _ = writeln!(t, "| mode | commands/s | requests/s | errors |\n|---|---:|---:|---:|");
        for (name, mode) in
            [("single (structured)".to_owned(), &e.single), (format!("batch of {}", e.batch_size), &e.batch)]
        {
            let _ = writeln!(
                t,
                "| {name} | {:.0} | {:.0} | {} |",
                mode.commands_per_second, mode.requests_per_second, mode.errors
            );
        }

        let x = &self.e2e;
        let _ = writeln!(t, "\n## End to end (POST → visible)\n");
        let _ = writeln!(
            t,
            "Drain maximum {:.0} commands/s (processors {:.0}/s, projector {:.0}/s at {:.2} Kafka offsets per command, \
             events and transaction markers; \
             bottleneck: {}). {}",
            x.max_per_second,
            x.processor_per_second,
            x.projector_per_second,
            x.offsets_per_command,
            x.bottleneck,
            x.method
        );
        for (i, s) in x.scaling.iter().enumerate() {
            let relative = x.scaling.first().filter(|_| i > 0).map(|one| {
                format!(" ({:.2} × one process)", s.commands_per_second / one.commands_per_second.max(1e-9))
            });
            let _ = writeln!(
                t,
                "- processors, {} process(es): {:.0} commands/s{}",
                s.processes,
                s.commands_per_second,
                relative.unwrap_or_default()
            );
        }
        let _ = writeln!(
            t,
            "\n| offered /s | of max | sent /s | accepted | p50 ms | p90 | p99 | p99.9 | max | 202 p99 | proc p50 | \
             proc p99 | apply p50 | apply p99 | lag p99 | backlog end | growth /s | settle s | holds |"
        );
        let _ = writeln!(
            t,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let latency_rows: Vec<&Step> =
            if x.latency_runs.is_empty() { x.half_sustained.iter().collect() } else { x.latency_runs.iter().collect() };
        for s in x.steps.iter().chain(latency_rows.iter().copied()) {
            let l = &s.latency_ms;
            let _ = writeln!(
                t,
                "| {:.0} | {:.0} % | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1} | {} | {:.1} | {:.1} | {} |",
                s.target_per_second,
                s.fraction * 100.0,
                s.sent_per_second,
                s.accepted,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                s.accept_latency_ms.p99,
                bound(s.processor_p50_ms),
                bound(s.processor_p99_ms),
                bound(s.apply_p50_ms),
                bound(s.apply_p99_ms),
                s.generator_lag_ms.p99,
                s.backlog_after_sending,
                s.backlog_growth_per_second,
                s.settle_seconds,
                if s.holds { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(
            t,
            "\nSustained maximum: **{:.0} commands/s** (the highest offered rate that held){}.",
            x.sustained_per_second,
            x.half_sustained
                .as_ref()
                .map(|s| match latency_rows.len() {
                    0 | 1 => format!("; the last row is the latency step at half of it ({:.0}/s)", s.target_per_second),
                    n => format!(
                        "; the last {n} rows are runs of the latency step at half of it ({:.0}/s), and the run with \
                         the median p99 ({:.1} ms) gives the latency figures",
                        s.target_per_second, s.latency_ms.p99
                    ),
                })
                .unwrap_or_default()
        );
        let _ = writeln!(t, "Latency: {}", x.visibility);
        let _ = writeln!(
            t,
            "Proc: the processor's time from taking a delivery to settling it (`sluice_command_seconds`); apply: the \
             projector's wait from taking a record to its batch's rows written \
             (`sluice_projection_apply_seconds`); each the upper bound of the histogram bucket that holds the quantile."
        );
        for s in x.steps.first().into_iter().chain(&x.half_sustained) {
            let Some(p) = &s.processor_times else { continue };
            let stages: Vec<String> = p.stages.iter().map(|(name, timing)| format!("{name} {timing}")).collect();
            let grouped: Vec<String> = p.requests_per_group.iter().map(|(name, n)| format!("{name} {n:.1}")).collect();
            let _ = writeln!(
                t,
                "Processor at {:.0}/s (mean ms, p99 as a bucket bound): a delivery waits {} for its round; a round \
                 of {:.1} commands takes {} ({}; stream rows, rejections and produce overlap); rounds' requests per \
                 group commit: {}; {}.",
                s.target_per_second,
                p.wait,
                p.commands_per_round,
                p.round,
                stages.join(" · "),
                if grouped.is_empty() { "–".to_owned() } else { grouped.join(", ") },
                match (p.commands_per_transaction, p.partitions_per_transaction) {
                    (Some(commands), Some(partitions)) => format!(
                        "a Kafka transaction per {commands:.1} commands, the rounds of {partitions:.1} partitions in each"
                    ),
                    _ => "no Kafka transaction ended".to_owned(),
                }
            );
        }
        for (run, s) in latency_rows.iter().enumerate() {
            let slowest: Vec<String> = s
                .slowest
                .iter()
                .map(|c| {
                    format!(
                        "{} (+{:.1} s) {} {:.0} ms = 202 {:.0} + terminal {:.0} + read model {:.0}",
                        c.at, c.offset_s, c.kind, c.total_ms, c.accept_ms, c.terminal_ms, c.read_model_ms
                    )
                })
                .collect();
            let _ = writeln!(
                t,
                "Latency run {} at {:.0}/s, followed commands (p50 / p99 ms): 202 → terminal {:.1} / {:.1}, terminal → \
                 read model {:.1} / {:.1}; the slowest: {}.",
                run + 1,
                s.target_per_second,
                s.to_terminal_ms.p50,
                s.to_terminal_ms.p99,
                s.to_read_model_ms.p50,
                s.to_read_model_ms.p99,
                if slowest.is_empty() { "–".to_owned() } else { slowest.join("; ") }
            );
        }
        if let Some(s) = x.steps.iter().find(|s| !s.cql_per_command.is_empty()) {
            let sum = |f: fn(&TableOps) -> f64| s.cql_per_command.iter().map(f).sum::<f64>();
            let each: Vec<String> =
                s.cql_per_command.iter().map(|o| format!("{} {:.1}w/{:.1}r", o.table, o.writes, o.reads)).collect();
            let _ = writeln!(
                t,
                "CQL per command at {:.0}/s: {:.1} writes, {:.1} reads ({}).",
                s.target_per_second,
                sum(|o| o.writes),
                sum(|o| o.reads),
                each.join(", ")
            );
        }
        let polls: Vec<String> = x
            .steps
            .iter()
            .chain(&x.half_sustained)
            .map(|s| format!("{:.0}/s {:.0}", s.target_per_second, s.polls_per_second))
            .collect();
        let _ = writeln!(
            t,
            "Visibility reads per second by step (the followed commands' operation and order GETs, which the edge and \
             the store serve beside the load): {}.",
            polls.join(" · ")
        );
        let offsets: Vec<String> = x
            .steps
            .iter()
            .map(|s| format!("{:.0}/s {:.2}", s.target_per_second, s.kafka_offsets_per_command))
            .collect();
        let _ = writeln!(
            t,
            "Kafka offsets per command by step (its events, and a transaction marker per partition each round's \
             transaction wrote to): {}.",
            offsets.join(" · ")
        );

        let a = &self.projector_alone;
        let _ = writeln!(
            t,
            "\n## Projector alone (half its drain maximum)\n\n{} new orders produced straight to its topic at \
             {:.0}/s (sent {:.0}/s, {} not taken), the other roles idle: all applied {:.1} s after the first was due; \
             apply p50 {} ms, p99 {} ms (bucket bounds).",
            a.events,
            a.target_per_second,
            a.sent_per_second,
            a.failed,
            a.caught_up_after_s,
            bound(a.apply_p50_ms),
            bound(a.apply_p99_ms)
        );
        let b = &self.projector_backlog;
        let _ = writeln!(
            t,
            "\n## Projector alone on a backlog\n\n{} new orders produced to its topic while it was stopped \
             (SIGSTOP): its first rows written {:.2} s after it went on, then {:.0} rows/s ({:.0} events/s) over \
             {:.2} s, the last applied {:.1} s after it went on ({} rows{}).",
            b.events,
            b.first_write_after_s,
            b.rows_per_second,
            b.events_per_second,
            b.writing_seconds,
            b.seconds,
            b.rows,
            b.store_mutations.map(|m| format!("; the store counted {m} mutations")).unwrap_or_default()
        );

        let r = &self.reads;
        let _ = writeln!(
            t,
            "\n## Reads ({} keep-alive clients; the day's sales counted {} orders)\n",
            r.clients, r.orders_in_day
        );
        let _ =
            writeln!(t, "| route | requests/s | p50 ms | p99 ms | max ms | errors |\n|---|---:|---:|---:|---:|---:|");
        for (name, mode) in [("GET /orders/{id}", &r.by_id), ("GET /sales/daily (one day)", &r.daily_sales)] {
            let l = &mode.latency_ms;
            let _ = writeln!(
                t,
                "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
                mode.requests_per_second, l.p50, l.p99, l.max, mode.errors
            );
        }

        let b = &self.rebuild;
        let _ = writeln!(
            t,
            "\n## Rebuild (blue/green into version {})\n\n{:.0} events/s, {:.0} rows/s ({} events, {} rows in {:.1} s{}).",
            b.version,
            b.events_per_second,
            b.rows_per_second,
            b.events,
            b.rows,
            b.seconds,
            b.store_mutations.map(|m| format!("; the store counted {m} mutations")).unwrap_or_default()
        );

        let mem = &self.memory;
        let _ = writeln!(
            t,
            "\n## Memory and noise by phase\n\nPeak RSS over the run: ingest {:.0} MiB, processor {:.0} MiB, projector {:.0} MiB, \
             bench {:.0} MiB. CPU in % of one core ({} cores = {} %).\n",
            mem.ingest_mib,
            mem.processor_mib,
            mem.projector_mib,
            mem.bench_mib,
            m.cpus,
            m.cpus * 100
        );
        let _ = writeln!(
            t,
            "CPU wait and I/O wait: the share of the phase in which some runnable task waited for a CPU, \
             and in which some task waited for the disk (the kernel's pressure stall information).\n"
        );
        let _ = writeln!(
            t,
            "| phase | s | busy % | CPU wait % | I/O wait % | steal s | load | peak RSS MiB | CPU by process group (%) |"
        );
        let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---|---|---|");
        let share = |p: Option<f64>| p.map_or_else(|| "–".to_owned(), |p| format!("{:.0}", p * 100.0));
        for phase in self.cpu.iter().filter(|p| p.seconds >= 0.5) {
            let pct = |s: f64| s / phase.seconds * 100.0;
            let top: Vec<String> = phase.by.iter().take(6).map(|(who, s)| format!("{who} {:.0}", pct(*s))).collect();
            let rss: Vec<String> = phase.peak_rss_mib.iter().map(|(who, mib)| format!("{who} {mib:.0}")).collect();
            let _ = writeln!(
                t,
                "| {} | {:.1} | {:.0} | {} | {} | {:.1} | {:.1} → {:.1} | {} | {} |",
                phase.phase,
                phase.seconds,
                pct(phase.busy),
                share(phase.cpu_pressure),
                share(phase.io_pressure),
                phase.steal,
                phase.load_average_start,
                phase.load_average_end,
                rss.join(", "),
                top.join(", ")
            );
        }

        let _ = writeln!(t, "\n## Ratios\n\n| ratio | value | target | |\n|---|---:|---:|---|");
        let rs = &self.ratios;
        for r in [
            &rs.sustained_vs_bare,
            &rs.edge_single_vs_amqp_publish,
            &rs.edge_batch_vs_amqp_publish,
            &rs.rebuild_rows_vs_cql_batch_insert,
            &rs.rebuild_rows_vs_cql_spread_batch_insert,
            &rs.backlog_rows_vs_cql_spread_batch_insert,
        ] {
            let _ = writeln!(
                t,
                "| {} | {:.2} | ≥ {:.1} | {} |",
                r.of,
                r.value,
                r.target,
                if r.met { "met" } else { "**missed**" }
            );
        }
        let lt = &self.latency_target;
        let _ = writeln!(
            t,
            "| e2e p99 ms at half the sustained maximum ({:.0}/s) | {:.1} | ≤ {:.0} | {} |",
            lt.per_second,
            lt.p99_ms,
            lt.target_ms,
            if lt.met { "met" } else { "**missed**" }
        );
        if let Some(l) = &self.bare.latency {
            let _ = writeln!(
                t,
                "| bare hops p99 ms at that rate, open loop (the servers alone; no target) | {:.1} | | |",
                l.latency_ms.p99
            );
        }
        let _ = writeln!(
            t,
            "| live projector rows on a backlog / the same rows written raw (new orders' rows; no target) | {:.2} | | |",
            rs.backlog_rows_vs_cql_order_rows_insert
        );
        let in_step = self.e2e.half_sustained.as_ref().and_then(|s| s.apply_p99_ms);
        let _ = writeln!(
            t,
            "| projector apply p99 ms in that step, every role busy (bucket bound; no target) | {} | | |",
            bound(in_step)
        );
        let at = &self.apply_latency_target;
        let _ = writeln!(
            t,
            "| projector apply p99 ms alone at half its drain maximum ({:.0}/s; bucket bound) | {} | ≤ {:.0} | {} |",
            at.per_second,
            bound((at.p99_ms > 0.0).then_some(at.p99_ms)),
            at.target_ms,
            if at.met { "met" } else { "**missed**" }
        );
        t
    }
}

/// "rabbitmq 41, bench 20 (busy 70)": the groups that spent ≥ 1 µs.
fn cpu_line(p: &SweepPoint) -> String {
    let groups: Vec<String> =
        p.cpu_us_per_op.iter().filter(|(_, us)| *us >= 1.0).map(|(who, us)| format!("{who} {us:.0}")).collect();
    format!("{} (machine {:.0})", groups.join(", "), p.busy_us_per_op)
}

/// A histogram bucket bound in ms as the report prints it.
fn bound(ms: Option<f64>) -> String {
    match ms {
        None => "–".to_owned(),
        Some(ms) if ms.is_infinite() => "> 10 s".to_owned(),
        Some(ms) => format!("≤ {ms:.1}"),
    }
}

/// Every number of two reports side by side, with its change: the figures
/// are found by their JSON paths, so the comparison follows any report
/// shape (a figure present in one report only is listed as such).
pub fn compare(old: &Value, new: &Value) -> String {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, String::new(), &mut a);
    flatten(new, String::new(), &mut b);
    let mut t = String::from("| figure | old | new | change |\n|---|---:|---:|---:|\n");
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for path in paths {
        let line = match (a.get(path), b.get(path)) {
            (Some(o), Some(n)) => {
                let change = if *o != 0.0 { format!("{:+.1} %", (n - o) / o.abs() * 100.0) } else { "—".into() };
                format!("| {path} | {} | {} | {change} |", number(*o), number(*n))
            }
            (Some(o), None) => format!("| {path} | {} | (none) | |", number(*o)),
            (None, Some(n)) => format!("| {path} | (none) | {} | |", number(*n)),
            (None, None) => continue,
        };
        let _ = writeln!(t, "{line}");
    }
    t
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Numeric leaves by path. Arrays of objects with a naming field (`window`,
/// `processes`, `phase`, `fraction`) are keyed by it, so a sweep point or a
/// phase is compared with its namesake, not with whatever has its index;
/// `[name, number]` pairs (CPU by group) are keyed by the name.
fn flatten(value: &Value, path: String, out: &mut BTreeMap<String, f64>) {
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.insert(path, v);
            }
        }
        Value::Bool(b) => {
            out.insert(path, if *b { 1.0 } else { 0.0 });
        }
        Value::Object(map) => {
            for (k, v) in map {
                flatten(v, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let key = match item {
                    Value::Array(pair) if pair.len() == 2 && pair[0].is_string() => {
                        pair[0].as_str().unwrap_or_default().to_owned()
                    }
                    Value::Object(map) => ["window", "processes", "phase", "fraction", "table"]
                        .iter()
                        .find_map(|k| {
                            map.get(*k).map(|v| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_owned)))
                        })
                        .unwrap_or_else(|| i.to_string()),
                    _ => i.to_string(),
                };
                let item = match item {
                    Value::Array(pair) if pair.len() == 2 && pair[0].is_string() => &pair[1],
                    other => other,
                };
                flatten(item, format!("{path}[{key}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(window: usize, per_second: u64) -> SweepPoint {
        SweepPoint { window, rate: Throughput::new(per_second, 1.0), ..Default::default() }
    }

    #[test]
    fn percentiles_come_from_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::from_micros(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{}", p.p50);
        assert!((p.p99 - 990.0).abs() < 1.0, "{}", p.p99);
        assert!((p.max - 1000.0).abs() < 1.0);
        assert_eq!(Percentiles::from_micros(&Histogram::new_with_bounds(1, 10, 2).unwrap()).count, 0);
    }

    #[test]
    fn a_timing_reads_as_its_mean_and_the_bound_of_its_p99() {
        let timing = Timing { mean_ms: 4.54, p99_ms: Some(50.0) };
        assert_eq!(timing.to_string(), format!("4.5 (p99 {})", bound(Some(50.0))));
        assert_eq!(Timing::default().to_string(), format!("0.0 (p99 {})", bound(None)));
    }

    #[test]
    fn a_ceiling_is_its_best_window() {
        let c = Ceiling::new("rows", vec![point(32, 900), point(128, 1500), point(512, 1400)]);
        assert_eq!((c.best_window, c.per_second), (128, 1500.0));
        assert_eq!(Ceiling::new("rows", vec![]).per_second, 0.0);
    }

    #[test]
    fn ratios_use_the_bare_ceiling_saturation_and_rows() {
        let raw = RawReport {
            amqp_publish: Ceiling::new("publishes", vec![point(32, 1000), point(128, 2000)]),
            cql_batch_insert: Ceiling::new("rows", vec![point(32, 10_000)]),
            cql_spread_batch_insert: Ceiling::new("rows", vec![point(32, 6_250)]),
            cql_order_rows_insert: Ceiling::new("rows", vec![point(32, 5_000)]),
            ..Default::default()
        };
        let bare = BareReport { ceiling: Ceiling::new("commands", vec![point(32, 500)]), ..Default::default() };
        let edge = EdgeReport {
            single: EdgeMode { commands_per_second: 1800.0, ..Default::default() },
            batch: EdgeMode { commands_per_second: 1000.0, ..Default::default() },
            ..Default::default()
        };
        let half = Step {
            target_per_second: 150.0,
            latency_ms: Percentiles { p99: 40.0, ..Default::default() },
            ..Default::default()
        };
        let e2e = E2eReport { sustained_per_second: 300.0, half_sustained: Some(half), ..Default::default() };
        let rebuild = RebuildReport { rows_per_second: 5000.0, ..Default::default() };
        let backlog = ProjectorBacklog { rows_per_second: 4000.0, ..Default::default() };
        let (ratios, latency) = Report::ratios(&raw, &bare, &edge, &e2e, &rebuild, &backlog);
        assert!((ratios.sustained_vs_bare.value - 0.6).abs() < 1e-9);
        assert!(!ratios.sustained_vs_bare.met);
        assert!((ratios.edge_single_vs_amqp_publish.value - 0.9).abs() < 1e-9, "against the best window");
        assert!(!ratios.edge_batch_vs_amqp_publish.met);
        assert!((ratios.rebuild_rows_vs_cql_batch_insert.value - 0.5).abs() < 1e-9);
        assert!((ratios.rebuild_rows_vs_cql_spread_batch_insert.value - 0.8).abs() < 1e-9);
        assert!(ratios.rebuild_rows_vs_cql_spread_batch_insert.met);
        assert!((ratios.backlog_rows_vs_cql_spread_batch_insert.value - 0.64).abs() < 1e-9);
        assert!(!ratios.backlog_rows_vs_cql_spread_batch_insert.met);
        assert!((ratios.backlog_rows_vs_cql_order_rows_insert - 0.8).abs() < 1e-9);
        assert!(latency.met && latency.per_second == 150.0);
    }

    #[test]
    fn compare_matches_figures_by_name_not_position() {
        let old = serde_json::json!({
            "raw": {"sweep": [{"window": 32, "per_second": 100.0}, {"window": 128, "per_second": 200.0}]},
            "cpu": [["kafka", 2.0]],
            "gone": 1
        });
        let new = serde_json::json!({
            "raw": {"sweep": [{"window": 128, "per_second": 300.0}]},
            "cpu": [["kafka", 1.0]],
            "added": 5
        });
        let table = compare(&old, &new);
        assert!(table.contains("| raw.sweep[window=128].per_second | 200 | 300 | +50.0 % |"), "{table}");
        assert!(table.contains("| raw.sweep[window=32].per_second | 100 | (none) | |"), "{table}");
        assert!(table.contains("| cpu[kafka] | 2 | 1 | -50.0 % |"), "{table}");
        assert!(table.contains("| added | (none) | 5 | |"), "{table}");
        assert!(table.contains("raw.sweep[window=128].window"), "{table}");
    }
}
