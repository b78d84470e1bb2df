//! The benchmark's findings: one serializable report (written as
//! `report.json`), the ratios and targets of issue 7 computed from it, and
//! the table printed at the end (also written as `report.txt`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

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

/// The servers' own ceilings, measured with the roles' client libraries.
#[derive(Debug, Clone, Serialize)]
pub struct RawReport {
    /// Operations in flight at once in every raw phase (the processors' prefetch).
    pub concurrency: usize,
    /// Persistent, mandatory publishes to a quorum queue declared like the
    /// work queues, each awaited until the broker's confirm.
    pub amqp_publish: Throughput,
    /// Deliveries of that queue, acked one by one, prefetch = concurrency.
    pub amqp_consume: Throughput,
    /// Idempotent produce (acks=all, linger 2 ms, as the processors).
    pub kafka_produce: Throughput,
    /// Prepared INSERTs of the read model's order row (USING TIMESTAMP).
    pub cql_insert: Throughput,
    /// Prepared INSERT … IF NOT EXISTS into a copy of the event store table:
    /// the processors' append. Context for the end-to-end figure, not a ceiling.
    pub cql_lwt_insert: Throughput,
    pub command_bytes: usize,
    pub event_bytes: usize,
}

impl RawReport {
    /// The slowest of the ceilings the pipeline stands on.
    pub fn slowest(&self) -> (&'static str, f64) {
        [
            ("amqp_publish", self.amqp_publish.per_second),
            ("amqp_consume", self.amqp_consume.per_second),
            ("kafka_produce", self.kafka_produce.per_second),
            ("cql_insert", self.cql_insert.per_second),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("four ceilings")
    }
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

#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    pub clients: usize,
    pub batch_size: usize,
    pub single: EdgeMode,
    pub batch: EdgeMode,
}

/// Milliseconds at the percentiles that matter, and the curve for the chart.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// (percentile, ms) pairs from 0 to 100, for the chart.
    pub curve: Vec<(f64, f64)>,
}

/// Percentiles at which the chart's curves are drawn.
const CURVE: [f64; 25] = [
    0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 93.0, 95.0, 97.0, 98.0, 99.0, 99.3, 99.5, 99.7, 99.9,
    99.93, 99.95, 99.97, 99.99, 99.999, 100.0,
];

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
            curve: CURVE.iter().map(|p| (*p, ms(p / 100.0))).collect(),
        }
    }
}

/// One open-loop run at a fixed rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Step {
    /// Of the end-to-end maximum.
    pub fraction: f64,
    pub target_per_second: f64,
    pub seconds: f64,
    /// Requests sent, and the rate at which they went out.
    pub sent: u64,
    pub sent_per_second: f64,
    pub accepted: u64,
    /// Answers other than 202, and transport errors.
    pub errors: u64,
    /// Orders not readable within the visibility timeout.
    pub timeouts: u64,
    /// From the request's scheduled send time to the order being readable:
    /// what a client that wanted to send then waits, coordinated omission
    /// included.
    pub latency_ms: Percentiles,
    /// From the actual send to the order being readable.
    pub service_latency_ms: Percentiles,
    /// From the actual send to the 202.
    pub accept_latency_ms: Percentiles,
    /// How late the generator sent each request against its schedule.
    pub generator_lag_ms: Percentiles,
    /// Commands waiting in the work queue when the step's last request was
    /// sent (a backlog that grows with the step's length means the rate is
    /// above what the pipeline sustains)…
    pub backlog_after_sending: u32,
    /// …and once every request of the step was readable or timed out.
    pub backlog_at_end: u32,
    /// Read-model GETs per second spent on watching for visibility.
    pub polls_per_second: f64,
    /// CQL statements per accepted command during the step, by table, from
    /// the store's own metrics (empty where it has none). The reads of the
    /// projection's `by_id` table include the visibility polls.
    pub cql_per_command: Vec<TableOps>,
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
    /// The highest rate the pipeline sustains: min(processor, projector)
    /// while draining a backlog.
    pub max_per_second: f64,
    /// Events produced to Kafka per second while draining.
    pub processor_per_second: f64,
    /// Events applied to the read model per second while draining.
    pub projector_per_second: f64,
    pub bottleneck: String,
    pub window_seconds: f64,
    pub backlog_at_start: u32,
    pub method: String,
    /// How "read-model-visible" was measured.
    pub visibility: String,
    pub poll_interval_ms: f64,
    pub first_poll_ms: f64,
    pub steps: Vec<Step>,
    /// The processors' rate on the same backlog with 1, then N processor
    /// processes (competing consumers of one queue).
    pub scaling: Vec<Scaling>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scaling {
    pub processes: usize,
    /// Events produced per second (one per command in the bench workload).
    pub commands_per_second: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// CQL writes one OrderSubmitted costs the projection.
    pub writes_per_event: usize,
    pub version: i32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// Peak RSS (VmHWM) of each role process over the whole run, MiB.
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
    fn new(numerator: f64, denominator: f64, target: f64, of: String) -> Self {
        let value = if denominator > 0.0 { numerator / denominator } else { 0.0 };
        Self { value, target, met: value >= target, of }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub e2e_vs_slowest_raw: Ratio,
    /// Single mode: one publish per request, `concurrency` clients, as the raw phase.
    pub edge_vs_amqp_publish: Ratio,
    /// Batch mode, for comparison (more publishes in flight than the raw phase).
    pub edge_batch_vs_amqp_publish: Ratio,
    pub rebuild_vs_cql_insert: Ratio,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyTarget {
    pub fraction: f64,
    pub p99_ms: f64,
    pub target_ms: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_mib: u64,
    /// `release` or `debug`: a debug build's figures say little.
    pub build: &'static str,
    /// 1-minute load average when the run started and when it ended: other
    /// work on the machine competes with the stack and the bench for CPUs.
    pub load_average_start: f64,
    pub load_average_end: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub started_at: String,
    pub seconds: f64,
    pub machine: Machine,
    pub tenant: String,
    pub projection: String,
    pub raw: RawReport,
    pub edge: EdgeReport,
    pub e2e: E2eReport,
    pub rebuild: RebuildReport,
    pub memory: MemoryReport,
    /// CPU seconds per process group in each phase.
    pub cpu: Vec<super::cpu::PhaseCpu>,
    pub ratios: Ratios,
    pub latency_target: LatencyTarget,
}

impl Report {
    /// The ratios and targets of the issue, from the measured figures.
    pub fn ratios(
        raw: &RawReport,
        edge: &EdgeReport,
        e2e: &E2eReport,
        rebuild: &RebuildReport,
    ) -> (Ratios, LatencyTarget) {
        let (slowest, slowest_rate) = raw.slowest();
        let ratios = Ratios {
            e2e_vs_slowest_raw: Ratio::new(e2e.max_per_second, slowest_rate, 0.8, format!("e2e max / raw {slowest}")),
            edge_vs_amqp_publish: Ratio::new(
                edge.single.commands_per_second,
                raw.amqp_publish.per_second,
                0.8,
                "edge single / raw amqp_publish".into(),
            ),
            edge_batch_vs_amqp_publish: Ratio::new(
                edge.batch.commands_per_second,
                raw.amqp_publish.per_second,
                0.8,
                "edge batch / raw amqp_publish".into(),
            ),
            rebuild_vs_cql_insert: Ratio::new(
                rebuild.events_per_second,
                raw.cql_insert.per_second,
                0.8,
                "rebuild events / raw cql_insert".into(),
            ),
        };
        let half = e2e.steps.iter().min_by(|a, b| (a.fraction - 0.5).abs().total_cmp(&(b.fraction - 0.5).abs()));
        let (fraction, p99) = half.map_or((0.5, 0.0), |s| (s.fraction, s.latency_ms.p99));
        let latency = LatencyTarget { fraction, p99_ms: p99, target_ms: 50.0, met: p99 > 0.0 && p99 <= 50.0 };
        (ratios, latency)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "sluice bench ({} mode, {} build, {} CPUs, {} MiB, load average {:.1} → {:.1}) — tenant {}, {:.0} s",
            self.mode,
            m.build,
            m.cpus,
            m.memory_mib,
            m.load_average_start,
            m.load_average_end,
            self.tenant,
            self.seconds
        );
        let r = &self.raw;
        let _ = writeln!(
            t,
            "\nRAW CEILINGS ({} in flight; command {} B JSON, event {} B Avro)",
            r.concurrency, r.command_bytes, r.event_bytes
        );
        let raw_line = |t: &mut String, name: &str, x: &Throughput, note: &str| {
            let _ = writeln!(t, "  {name:<34} {:>10.0} /s  ({} in {:.1} s){note}", x.per_second, x.count, x.seconds);
        };
        raw_line(&mut t, "RabbitMQ publish, confirms", &r.amqp_publish, "");
        raw_line(&mut t, "RabbitMQ consume, acks", &r.amqp_consume, "");
        raw_line(&mut t, "Kafka produce, idempotent acks=all", &r.kafka_produce, "");
        raw_line(&mut t, "CQL prepared insert", &r.cql_insert, "");
        raw_line(&mut t, "CQL insert IF NOT EXISTS (LWT)", &r.cql_lwt_insert, "  [context]");

        let e = &self.edge;
        let _ = writeln!(t, "\nEDGE (ingest role only, {} keep-alive clients)", e.clients);
        let _ = writeln!(
            t,
            "  {:<34} {:>10.0} /s  ({} accepted, {} errors)",
            "single (structured)", e.single.commands_per_second, e.single.commands, e.single.errors
        );
        let _ = writeln!(
            t,
            "  {:<34} {:>10.0} /s  ({} requests/s, {} errors)",
            format!("batch of {}", e.batch_size),
            e.batch.commands_per_second,
            e.batch.requests_per_second.round(),
            e.batch.errors
        );

        let x = &self.e2e;
        let _ = writeln!(t, "\nEND TO END (POST → read model)");
        let _ = writeln!(
            t,
            "  {:<34} {:>10.0} /s  (processor {:.0}/s, projector {:.0}/s; bottleneck {}; {:.1} s window from a backlog of {})",
            "max sustained", x.max_per_second, x.processor_per_second, x.projector_per_second, x.bottleneck, x.window_seconds, x.backlog_at_start
        );
        for (i, scaled) in x.scaling.iter().enumerate() {
            let relative = x.scaling.first().filter(|_| i > 0).map(|one| {
                format!(" ({:.2} × one process)", scaled.commands_per_second / one.commands_per_second.max(1e-9))
            });
            let _ = writeln!(
                t,
                "  {:<34} {:>10.0} /s{}",
                format!("processors, {} process(es)", scaled.processes),
                scaled.commands_per_second,
                relative.unwrap_or_default()
            );
        }
        let _ = writeln!(
            t,
            "  {:>6} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7} {:>7}",
            "rate",
            "target/s",
            "sent/s",
            "p50 ms",
            "p99",
            "p99.9",
            "max",
            "lag p99",
            "lag max",
            "errors",
            "timeout",
            "queued"
        );
        for s in &x.steps {
            let l = &s.latency_ms;
            let _ = writeln!(
                t,
                "  {:>5.0}% {:>8.0} {:>8.0} | {:>8.1} {:>8.1} {:>8.1} {:>8.1} | {:>8.1} {:>8.1} | {:>7} {:>7} {:>7}",
                s.fraction * 100.0,
                s.target_per_second,
                s.sent_per_second,
                l.p50,
                l.p99,
                l.p999,
                l.max,
                s.generator_lag_ms.p99,
                s.generator_lag_ms.max,
                s.errors,
                s.timeouts,
                s.backlog_after_sending
            );
        }
        let _ = writeln!(t, "  latency = scheduled send → order readable; {}", x.visibility);
        let polls: Vec<String> = x.steps.iter().map(|s| format!("{:.0}", s.polls_per_second)).collect();
        let _ = writeln!(t, "  visibility polls: {} GET/s per step", polls.join(", "));
        if let Some(s) = x.steps.iter().find(|s| !s.cql_per_command.is_empty()) {
            let sum = |f: fn(&TableOps) -> f64| s.cql_per_command.iter().map(f).sum::<f64>();
            let each: Vec<String> =
                s.cql_per_command.iter().map(|o| format!("{} {:.1}w/{:.1}r", o.table, o.writes, o.reads)).collect();
            let _ = writeln!(
                t,
                "  CQL per command at {:.0}%: {:.1} writes, {:.1} reads ({})",
                s.fraction * 100.0,
                sum(|o| o.writes),
                sum(|o| o.reads),
                each.join(", ")
            );
        }

        let b = &self.rebuild;
        let _ = writeln!(t, "\nREBUILD (blue/green into version {})", b.version);
        let _ = writeln!(
            t,
            "  {:<34} {:>10.0} /s  ({} events in {:.1} s; {} CQL writes per event)",
            "replay from earliest", b.events_per_second, b.events, b.seconds, b.writes_per_event
        );

        let mem = &self.memory;
        let _ = writeln!(t, "\nPEAK RSS (VmHWM)");
        let _ = writeln!(
            t,
            "  ingest {:.0} MiB, processor {:.0} MiB, projector {:.0} MiB (bench itself {:.0} MiB)",
            mem.ingest_mib, mem.processor_mib, mem.projector_mib, mem.bench_mib
        );

        let _ = writeln!(t, "\nCPU BY PHASE (% of one core; {} cores = {}%)", m.cpus, m.cpus * 100);
        for phase in self.cpu.iter().filter(|p| p.seconds >= 0.5) {
            let pct = |s: f64| s / phase.seconds * 100.0;
            let top: Vec<String> = phase.by.iter().take(6).map(|(who, s)| format!("{who} {:.0}", pct(*s))).collect();
            let _ = writeln!(
                t,
                "  {:<48} {:>5.1} s  busy {:>3.0}%: {}",
                phase.phase,
                phase.seconds,
                pct(phase.busy),
                top.join(", ")
            );
        }

        let _ = writeln!(t, "\nRATIOS (target ≥ 0.8)");
        let ratio = |t: &mut String, r: &Ratio| {
            let _ = writeln!(t, "  {:<40} {:>6.2}  {}", r.of, r.value, if r.met { "met" } else { "MISSED" });
        };
        ratio(&mut t, &self.ratios.e2e_vs_slowest_raw);
        ratio(&mut t, &self.ratios.edge_vs_amqp_publish);
        ratio(&mut t, &self.ratios.edge_batch_vs_amqp_publish);
        ratio(&mut t, &self.ratios.rebuild_vs_cql_insert);
        let lt = &self.latency_target;
        let _ = writeln!(
            t,
            "  {:<40} {:>6.1}  {} (target ≤ {:.0} ms)",
            format!("e2e p99 ms at {:.0}% of max", lt.fraction * 100.0),
            lt.p99_ms,
            if lt.met { "met" } else { "MISSED" },
            lt.target_ms
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(p.curve.len(), CURVE.len());
        assert_eq!(Percentiles::from_micros(&Histogram::new_with_bounds(1, 10, 2).unwrap()).count, 0);
    }

    #[test]
    fn ratios_name_the_slowest_ceiling() {
        let raw = RawReport {
            concurrency: 32,
            amqp_publish: Throughput::new(1000, 1.0),
            amqp_consume: Throughput::new(2000, 1.0),
            kafka_produce: Throughput::new(500, 1.0),
            cql_insert: Throughput::new(800, 1.0),
            cql_lwt_insert: Throughput::new(100, 1.0),
            command_bytes: 300,
            event_bytes: 100,
        };
        let edge = EdgeReport {
            clients: 32,
            batch_size: 20,
            single: EdgeMode { commands_per_second: 900.0, ..Default::default() },
            batch: EdgeMode { commands_per_second: 700.0, ..Default::default() },
        };
        let e2e = E2eReport {
            max_per_second: 300.0,
            steps: vec![Step {
                fraction: 0.5,
                latency_ms: Percentiles { p99: 40.0, ..Default::default() },
                ..Default::default()
            }],
            ..Default::default()
        };
        let rebuild = RebuildReport { events_per_second: 400.0, ..Default::default() };
        let (ratios, latency) = Report::ratios(&raw, &edge, &e2e, &rebuild);
        assert_eq!(ratios.e2e_vs_slowest_raw.of, "e2e max / raw kafka_produce");
        assert!((ratios.e2e_vs_slowest_raw.value - 0.6).abs() < 1e-9);
        assert!(!ratios.e2e_vs_slowest_raw.met);
        assert!(ratios.edge_vs_amqp_publish.met);
        assert!((ratios.rebuild_vs_cql_insert.value - 0.5).abs() < 1e-9);
        assert!(latency.met);
    }
}
