//! `sluice replay`: re-apply a projection from any point, or rebuild it
//! blue/green into a new version of its tables and switch reads atomically.

use std::sync::Arc;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::ops::audit::{AuditAction, AuditLog};
use sluice_cli::serve::{connect_cql, context_topics, ensure_projection_topics};
use sluice_cli::settings::Settings;
use sluice_projections::orders::Orders;
use sluice_projections::patients::Patients;
use sluice_projections::projection::Projection;
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
    /// With --rebuild from a point other than `earliest`: yes, build a
    /// version without the events before it (it never drops the complete one).
    #[arg(long, requires = "rebuild", conflicts_with = "drop_old")]
    partial: bool,
    /// With --rebuild: drop the previous version's tables after the switch
    /// (asks first; needs --why; audited).
    #[arg(long, requires = "rebuild")]
    drop_old: bool,
    /// Drop the tables of this (inactive, older) version and exit (asks
    /// first; needs --why; audited).
    #[arg(long, conflicts_with_all = ["rebuild", "from"])]
    drop_version: Option<i32>,
    /// Why tables are dropped: required with --drop-version and --drop-old,
    /// kept in the audit log (`sluice dlq audit`).
    #[arg(long)]
    why: Option<String>,
    /// Who drops them (default: the OS user).
    #[arg(long)]
    actor: Option<String>,
    #[command(flatten)]
    intent: super::IntentArgs,
    /// Print progress and the report as JSON lines instead of a progress bar.
    #[arg(long)]
    json: bool,
}

/// The audit row of a version drop: the tables are every tenant's (`*`).
fn drop_action<'a>(projection: &'a str, tables: &'a str, actor: &'a str, why: &'a str) -> AuditAction<'a> {
    AuditAction {
        tenant: "*",
        context: projection,
        queue: tables,
        action: "drop-version",
        actor,
        reason: why,
        filter: tables,
    }
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let patients = args.projection == settings.projector.patients_name;
    if args.projection != settings.projector.name && !patients {
        bail!(
            "unknown projection {:?}: this configuration has {:?} and {:?}",
            args.projection,
            settings.projector.name,
            settings.projector.patients_name
        );
    }
    if patients {
        let patients = Patients { name: settings.projector.patients_name.clone() };
        run_projection(settings, args, Arc::new(patients)).await
    } else {
        let orders = Orders { name: settings.projector.name.clone() };
        run_projection(settings, args, Arc::new(orders)).await
    }
}

/// Replays, rebuilds or drops a version of `projection`.
async fn run_projection<P: Projection>(settings: Settings, args: Args, projection: Arc<P>) -> anyhow::Result<()> {
    if args.intent.dry_run && args.drop_version.is_none() {
        bail!("--dry-run shows what --drop-version would drop; a replay or rebuild has no dry run");
    }
    let dropping = args.drop_version.is_some() || args.drop_old;
    let why = match &args.why {
        Some(why) if !why.trim().is_empty() => why.clone(),
        _ if dropping => bail!("dropping a version's tables needs --why: it goes to the audit log"),
        _ => String::new(),
    };
    let actor = args.actor.clone().unwrap_or_else(sluice_cli::ops::audit::default_actor);
    let session = connect_cql(&settings).await?;
    let audit = AuditLog::new(session.clone());
    let store = Arc::new(ReadModels::new(session, &settings.projector).await?);
    let name = projection.name();
    if let Some(version) = args.drop_version {
        let tables = replay::version_tables(&*projection, version).join(", ");
        if args.intent.dry_run {
            println!("dry run: would drop version {version} of {name} ({tables}); nothing dropped");
            return Ok(());
        }
        if !args.intent.confirm(&format!("drop version {version} of {name} for good ({tables})"))? {
            bail!("not confirmed: nothing dropped");
        }
        let row = audit.begin(&drop_action(name, &tables, &actor, &why)).await?;
        let dropped = replay::drop_version(&store, &*projection, version).await;
        let (status, detail) = match &dropped {
            Ok(()) => ("done", format!("dropped version {version}")),
            Err(e) => ("failed", e.to_string()),
        };
        audit.finish(&row, status, &detail).await?;
        dropped?;
        return super::print_json(&serde_json::json!({"projection": args.projection, "dropped_version": version}));
    }
    let start: StartAt = args.from.parse().map_err(anyhow::Error::msg)?;
    if args.rebuild && start != StartAt::Earliest && !args.partial {
        bail!(
            "a rebuild from {} builds a version without the events before it: ask for that with --partial \
             (a partial version never drops the complete one it replaces)",
            args.from
        );
    }
    if start.has_positions_without_topic() && settings.tenants.len() > 1 {
        bail!(
            "--from {}: with several tenants a position names its topic, `<topic>:<partition>:<offset>` \
             (a bare `<partition>:<offset>` would apply to that partition of every tenant's topic)",
            args.from
        );
    }
    let topics_of = |tenants: &[String]| context_topics(tenants, projection.context());
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
    // The drop after the switch is asked and recorded before the rebuild.
    let mut drop_row = None;
    if args.drop_old {
        let active = store.versions().get(name).await?.active;
        let tables = replay::version_tables(&*projection, active).join(", ");
        if !args.intent.confirm(&format!("after the switch, drop version {active} of {name} for good ({tables})"))? {
            bail!("not confirmed: nothing rebuilt, nothing dropped");
        }
        drop_row = Some(audit.begin(&drop_action(name, &tables, &actor, &why)).await?);
    }
    let mut reports = Vec::new();
    for ctx in &contexts {
        let report = if args.rebuild {
            replay::rebuild(ctx, projection.clone(), start.clone(), args.drop_old, &stop, progress).await
        } else {
            replay::replay(ctx, projection.clone(), start.clone(), &stop, progress).await
        }
        .with_context(|| format!("replay failed (Kafka at {})", ctx.brokers));
        if let Some(row) = &drop_row {
            let (status, detail) = match &report {
                Ok(r) if r.dropped_previous == Some(true) => ("done", "dropped after the switch".to_owned()),
                Ok(_) => ("not_dropped", "stopped before switching: nothing dropped".to_owned()),
                Err(e) => ("failed", format!("{e:#}")),
            };
            audit.finish(row, status, &detail).await?;
        }
        reports.push(report?);
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    for report in reports {
        print_report(&report, args.json, &stop)?;
    }
    if stop.is_cancelled() {
        // Interrupted (Ctrl-C): not a success, whatever was applied.
        std::process::exit(130);
    }
    Ok(())
}

fn print_report(report: &replay::ReplayReport, json: bool, stop: &CancellationToken) -> anyhow::Result<()> {
    if json {
        super::print_json(&serde_json::json!({"report": report, "interrupted": stop.is_cancelled()}))
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
