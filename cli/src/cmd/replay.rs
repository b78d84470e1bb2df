//! `sluice replay`: re-apply a projection from any point, or rebuild it
//! blue/green into a new version of its tables and switch reads atomically.

use std::sync::Arc;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::serve::{connect_cql, context_topics, ensure_projection_topics, events_topics};
use sluice_cli::settings::Settings;
use sluice_projections::replay::{self, ReplayCtx, StartAt};
use sluice_projections::store::ReadModels;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct Args {
    /// The projection: the orders projection's configured name (the demo's
    /// is `orders`) or `patients`.
    projection: String,
    /// Where to start: `earliest`, an RFC 3339 time, or `[topic:]partition:offset[,…]` (the
    /// partitions not listed are not replayed; with several tenants each position names its topic).
    #[arg(long, default_value = "earliest")]
    from: String,
    /// Build a new version of the tables while the current one keeps serving,
    /// then switch reads to it once caught up. Resumes a rebuild that crashed.
    #[arg(long)]
    rebuild: bool,
    /// With --rebuild: drop the previous version's tables after the switch.
    #[arg(long, requires = "rebuild")]
    drop_old: bool,
    /// Drop the tables of this (inactive, older) version and exit.
    #[arg(long, conflicts_with_all = ["rebuild", "from"])]
    drop_version: Option<i32>,
    /// Print progress and the report as JSON lines instead of a progress bar.
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let patients = args.projection == sluice_projections::patients::PROJECTION;
    if args.projection != settings.projector.name && !patients {
        bail!(
            "unknown projection {:?}: this configuration has {:?} and {:?}",
            args.projection,
            settings.projector.name,
            sluice_projections::patients::PROJECTION
        );
    }
    if patients && (args.rebuild || args.drop_version.is_some()) {
        bail!("the patients projection has one version of its table: it replays (idempotent) but has no blue/green rebuild");
    }
    let session = connect_cql(&settings).await?;
    let store = Arc::new(ReadModels::new(session, &settings.projector.name).await?);
    if let Some(version) = args.drop_version {
        replay::drop_version(&store, &settings.projector.name, version).await?;
        return super::print_json(&serde_json::json!({"projection": args.projection, "dropped_version": version}));
    }
    let start: StartAt = args.from.parse().map_err(anyhow::Error::msg)?;
    if start.has_positions_without_topic() && settings.tenants.len() > 1 {
        bail!(
            "--from {}: with several tenants a position names its topic, `<topic>:<partition>:<offset>` \
             (a bare `<partition>:<offset>` would apply to that partition of every tenant's topic)",
            args.from
        );
    }
    let topics_of = |tenants: &[String]| {
        if patients {
            context_topics(tenants, sluice_schemas::patients::CONTEXT)
        } else {
            events_topics(tenants)
        }
    };
    ensure_projection_topics(&settings, &topics_of(&settings.tenant_names()), &args.projection).await?;
    // Each Kafka cluster's topics are replayed in turn. A rebuild switches
    // reads once for every tenant, so it reads all of them in one pass: one
    // cluster only.
    let clusters = settings.kafka_clusters().of(&settings.tenant_names());
    if args.rebuild && clusters.len() > 1 {
        bail!(
            "a rebuild switches every tenant's reads at once and reads its topics in one pass, but the tenants are on \
             {} Kafka clusters: replay without --rebuild instead (it rebuilds nothing blue/green)",
            clusters.len()
        );
    }
    let contexts: Vec<ReplayCtx> = clusters
        .iter()
        .map(|cluster| ReplayCtx {
            config: settings.projector.clone(),
            brokers: cluster.brokers.clone(),
            registry_url: settings.registry.url.clone(),
            topics: topics_of(&cluster.tenants),
            store: store.clone(),
        })
        .collect();
    // Ctrl-C stops cleanly; a rebuild resumes where it stopped.
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });

    let bar = (!args.json).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events  {msg}  ETA {eta}",
            )
            .expect("valid template"),
        );
        bar
    });
    let json = args.json;
    let progress = |p: &replay::Progress| {
        let done = p.applied + p.dead_lettered;
        match &bar {
            Some(bar) => {
                bar.set_length(done + p.remaining.max(0) as u64);
                bar.set_position(done);
                bar.set_message(format!(
                    "lag {}  {:.0}/s  dead-lettered {}",
                    p.remaining, p.events_per_second, p.dead_lettered
                ));
            }
            None if json => {
                let _ = super::print_json(&serde_json::json!({"progress": p}));
            }
            None => {}
        }
    };
    let mut reports = Vec::new();
    for ctx in &contexts {
        let report = if args.rebuild {
            replay::rebuild(ctx, start.clone(), args.drop_old, &stop, progress).await
        } else if patients {
            replay::replay_patients(ctx, start.clone(), &stop, progress).await
        } else {
            replay::replay(ctx, start.clone(), &stop, progress).await
        }
        .with_context(|| format!("replay failed (Kafka at {})", ctx.brokers))?;
        reports.push(report);
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    for report in reports {
        print_report(&report, args.json, &stop)?;
    }
    Ok(())
}

fn print_report(report: &replay::ReplayReport, json: bool, stop: &CancellationToken) -> anyhow::Result<()> {
    if json {
        super::print_json(&serde_json::json!({"report": report}))
    } else {
        println!(
            "projection {} version {}: {} events applied, {} dead-lettered in {:.1}s ({:.0} events/s){}",
            report.projection,
            report.version,
            report.applied,
            report.dead_lettered,
            report.seconds,
            report.events_per_second,
            match report.previous_version {
                Some(v) if stop.is_cancelled() =>
                    format!("; stopped before switching from version {v} (run again to resume)"),
                Some(v) => format!("; reads switched from version {v}"),
                None if stop.is_cancelled() => "; stopped early".into(),
                None => String::new(),
            }
        );
        Ok(())
    }
}
