//! `sluice`: the command-line entry point of every role and ops tool.
#![forbid(unsafe_code)]

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_cli::serve::{serve, Role};
use sluice_cli::settings::Settings;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: every role allocates many small,
/// short-lived values (records, rows, headers) on several threads, where
/// glibc's arenas spent about a third of a rebuild's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SLUICE_COMMIT"), ")"),
    about = "An asynchronous command API platform: CloudEvents in, Avro events out, read models served"
)]
struct Cli {
    /// Configuration file (TOML); `SLUICE_*` environment variables override
    /// it. Without one: `./sluice.toml`, else `config/dev.toml` (a checkout).
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one role, or all of them in one process.
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
    },
    /// Replay a projection from any point, or rebuild it blue/green.
    Replay(cmd::replay::Args),
    /// Measure the pipeline against the raw ceilings of its servers; writes a report.
    Bench(cmd::bench::Args),
    /// Dead letters: list, show, shovel back, purge or delete (audited).
    Dlq(cmd::dlq::Args),
    /// Kafka dead-letter topics and parked keys: list, show, replay after a
    /// fix, unpark (audited).
    Dlt(cmd::dlt::Args),
    /// The CQL schema: `schemas apply` creates the keyspace, tables and
    /// columns the code needs (nothing else creates them).
    #[command(alias = "schema")]
    Schemas(cmd::schema::Args),
    /// Health of every tenant's queues, topics, projection and schemas;
    /// exits 1 when unhealthy.
    Status(cmd::status::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    // mimalloc asks for transparent huge pages for its memory, and gives
    // freed pages back to the OS after a while: on a kernel whose THP
    // setting is `madvise` (Debian's), each page it takes back and touches
    // again was then a 2 MiB page zeroed by the kernel, a quarter of a
    // rebuild's CPU. Plain pages cost a 4 KiB zeroing each. The flag holds
    // for the whole process; a kernel without it changes nothing.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (the causes joined), no backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file: the one given, else the first of
/// `./sluice.toml` and `config/dev.toml` that exists.
fn config_file(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| ["sluice.toml", "config/dev.toml"].into_iter().map(PathBuf::from).find(|p| p.is_file()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = config_file(cli.config);
    match &file {
        Some(file) => eprintln!("sluice: config {}", file.display()),
        None => eprintln!("sluice: no config file (defaults and SLUICE_* variables); give --config"),
    }
    let settings = Settings::load(file.as_deref()).map_err(anyhow::Error::msg)?;
    // Spans are exported by the serving roles, one service name per role.
    let (service, otlp) = match &cli.command {
        Command::Serve { role } => {
            let role = role.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
            (format!("sluice-{role}"), settings.traces.otlp_endpoint.as_deref())
        }
        _ => ("sluice".to_owned(), None),
    };
    let telemetry = sluice_telemetry::init(&service, otlp).map_err(anyhow::Error::msg)?;
    let result = match cli.command {
        Command::Serve { role } => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            serve(settings, role, shutdown, None).await
        }
        Command::Replay(args) => cmd::replay::run(settings, args).await,
        Command::Bench(args) => cmd::bench::run(settings, args).await,
        Command::Dlq(args) => cmd::dlq::run(settings, args).await,
        Command::Dlt(args) => cmd::dlt::run(settings, args).await,
        Command::Status(args) => cmd::status::run(settings, args).await,
        Command::Schemas(args) => cmd::schema::run(settings, args).await,
    };
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// SIGTERM or Ctrl-C: stop taking work, finish what is in flight, exit.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
