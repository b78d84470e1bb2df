//! `sluice bench`: measures the pipeline against the physical limit of its
//! own servers and writes a report (the work is in `sluice_cli::bench`);
//! `--compare` prints the change of every figure against an earlier report.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::bench::workload::Mix;
use sluice_cli::bench::{self, Plan};
use sluice_cli::settings::Settings;

/// Closed-loop edge clients unless `--concurrency` says otherwise: the reports
/// of earlier runs were measured with 32.
const EDGE_CLIENTS: usize = 32;

#[derive(clap::Args)]
pub struct Args {
    /// A smoke run of every phase in about a minute (figures not worth quoting).
    #[arg(long)]
    quick: bool,
    /// Results folder: report.json, report.md, latency.svg, stages.svg, the
    /// roles' logs. Default `target/bench/<UTC timestamp>/`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Closed-loop edge clients (default 32).
    #[arg(long)]
    concurrency: Option<usize>,
    /// In-flight windows every ceiling is swept over (default 32,128,512;
    /// 32,128 with --quick).
    #[arg(long, value_delimiter = ',')]
    windows: Vec<usize>,
    /// The workload's shares of SubmitOrder, ShipOrder, CancelOrder and
    /// client retries, e.g. 60,20,15,5 (the default).
    #[arg(long, default_value = "60,20,15,5")]
    mix: String,
    /// Seed of the workload's draws (which orders, which retries).
    #[arg(long, default_value_t = 12)]
    seed: u64,
    /// An earlier report.json: after the run, print the change of every
    /// figure against it.
    #[arg(long, value_name = "OLD.json")]
    compare: Option<PathBuf>,
    /// With --compare: compare this report instead of running the bench.
    #[arg(long, value_name = "NEW.json", requires = "compare")]
    against: Option<PathBuf>,
    /// Processor processes in the end-to-end scaling step (1 skips it).
    #[arg(long)]
    processors: Option<usize>,
    /// Events per request in the edge's batch mode.
    #[arg(long, default_value_t = 20)]
    batch_size: usize,
    /// Seconds of each open-loop run, the bare hops' at the latency step's
    /// rate too (default 20, or 1.5 with --quick).
    #[arg(long)]
    step_seconds: Option<u64>,
    /// Open-loop rates as fractions of the drain maximum (default
    /// 0.25,0.5,0.75,0.9,1,1.1; 0.25,0.5 with --quick).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// New orders the projector drains alone on a backlog (default 100000,
    /// or 10000 with --quick).
    #[arg(long)]
    backlog_events: Option<usize>,
    /// Shortest wait, in ms, between two reads of an order not yet visible
    /// (waits grow to a tenth of the time waited, at most 100 ms).
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Keep the run's queues, topics and tables instead of removing them (the
    /// ceilings' scratch tables go as soon as each ceiling is measured).
    #[arg(long)]
    keep: bool,
    /// Print the report as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let old = match &args.compare {
        Some(path) => Some(read_report(path)?),
        None => None,
    };
    if let (Some(old), Some(new)) = (&old, &args.against) {
        // A reader that stops early (`| head`) is not an error.
        let _ = std::io::stdout().write_all(bench::report::compare(old, &read_report(new)?).as_bytes());
        return Ok(());
    }
    let concurrency = args.concurrency.unwrap_or(EDGE_CLIENTS).max(1);
    let mut plan = if args.quick { Plan::quick(concurrency) } else { Plan::full(concurrency) };
    plan.batch_size = args.batch_size.clamp(1, settings.ingest.max_batch.max(1));
    if let Some(seconds) = args.step_seconds {
        plan.step_duration = Duration::from_secs(seconds.max(1));
    }
    if args.rates.iter().any(|r| !(*r > 0.0 && *r <= 2.0)) {
        anyhow::bail!("--rates takes fractions of the drain maximum in (0, 2], e.g. 0.25,0.5,0.75,0.9,1,1.1");
    }
    if !args.rates.is_empty() {
        plan.fractions = args.rates;
    }
    if args.windows.contains(&0) {
        anyhow::bail!("--windows takes operations in flight, each ≥ 1");
    }
    if !args.windows.is_empty() {
        plan.windows = args.windows;
    }
    plan.mix = Mix::parse(&args.mix).map_err(|e| anyhow::anyhow!("--mix: {e}"))?;
    plan.seed = args.seed;
    if let Some(processors) = args.processors {
        plan.processors = processors.max(1);
    }
    if let Some(events) = args.backlog_events {
        plan.backlog_events = events.max(1);
    }
    plan.poll_interval = Duration::from_millis(args.poll_ms.max(1));
    plan.keep = args.keep;
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("target/bench").join(chrono::Utc::now().format("%Y-%m-%dT%H-%M-%SZ").to_string())
    });

    // A spinner on a terminal; plain lines (with times) anywhere else.
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"));
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let started = std::time::Instant::now();
    let step = |name: &str| {
        let line = format!("[{:>6.1} s] {name}", started.elapsed().as_secs_f64());
        match &bar {
            Some(bar) => {
                bar.println(&line);
                bar.set_message(name.to_owned());
            }
            None => eprintln!("{line}"),
        }
    };
    let report = bench::run(&settings, plan, &out, &step).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    bench::write(&report, &out)?;
    if args.json {
        super::print_json(&report)?;
    } else {
        print!("{}", report.markdown());
        println!("\nreport: {0}/report.json and report.md; charts: {0}/latency.svg, {0}/stages.svg", out.display());
    }
    if let Some(old) = old {
        eprintln!("\nChange against {}:", args.compare.as_deref().unwrap_or(std::path::Path::new("")).display());
        eprint!("{}", bench::report::compare(&old, &serde_json::to_value(&report)?));
    }
    Ok(())
}

fn read_report(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON report", path.display()))
}
