//! `sluice bench`: measures the pipeline against the raw ceilings of its own
//! servers and writes a report (the work is in `sluice_cli::bench`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::bench::{self, Plan};
use sluice_cli::settings::Settings;

#[derive(clap::Args)]
pub struct Args {
    /// A smoke run of every phase in under a minute (figures not worth quoting).
    #[arg(long)]
    quick: bool,
    /// Results folder: report.json, report.txt, latency.svg, the roles' logs.
    /// Default `bench-results/<UTC timestamp>/`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Operations in flight in the raw phases, and edge clients (default:
    /// `processor.prefetch`, the pipeline's own concurrency).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Processor processes in the end-to-end scaling step (1 skips it).
    #[arg(long)]
    processors: Option<usize>,
    /// Events per request in the edge's batch mode.
    #[arg(long, default_value_t = 20)]
    batch_size: usize,
    /// Seconds of each open-loop latency run (default 30, or 2 with --quick).
    #[arg(long)]
    step_seconds: Option<u64>,
    /// Open-loop rates as fractions of the measured maximum.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    rates: Vec<f64>,
    /// Shortest wait, in ms, between two reads of an order not yet visible
    /// (waits grow to a tenth of the time waited, at most 100 ms).
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Keep the run's queues, topics and tables instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Print the report as one line of JSON instead of the table.
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let concurrency = args.concurrency.unwrap_or(usize::from(settings.processor.prefetch)).max(1);
    let mut plan = if args.quick { Plan::quick(concurrency) } else { Plan::full(concurrency) };
    plan.batch_size = args.batch_size.clamp(1, settings.ingest.max_batch.max(1));
    if let Some(seconds) = args.step_seconds {
        plan.step_duration = Duration::from_secs(seconds.max(1));
    }
    if args.rates.iter().any(|r| !(*r > 0.0 && *r <= 1.0)) {
        anyhow::bail!("--rates takes fractions of the maximum in (0, 1], e.g. 0.25,0.5,0.75");
    }
    plan.fractions = args.rates;
    if let Some(processors) = args.processors {
        plan.processors = processors.max(1);
    }
    plan.poll_interval = Duration::from_millis(args.poll_ms.max(1));
    plan.keep = args.keep;
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from("bench-results").join(chrono::Utc::now().format("%Y-%m-%dT%H-%M-%SZ").to_string())
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
        super::print_json(&report)
    } else {
        print!("{}", report.table());
        println!("\nreport: {}/report.json, chart: {}/latency.svg", out.display(), out.display());
        Ok(())
    }
}
