//! `sluice dlq`: find dead letters, see why they failed, move them back, or
//! remove them with a reason. The work is in `sluice_cli::ops::dlq`; this
//! module parses arguments and prints.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_cli::ops::audit::{ArchivedLetter, AuditEntry, AuditLog};
use sluice_cli::ops::dead_letter::{id_or_dash, DeadLetter, DeadLetterDetail, Filter};
use sluice_cli::ops::dlq::{Dlq, Listing, RemovalReport, Scope, ShovelOptions, ShovelProgress, ShovelReport, Who};
use sluice_cli::ops::management::Management;
use sluice_cli::ops::parse_duration;
use sluice_cli::serve::connect_cql;
use sluice_cli::settings::Settings;

use super::{output, print_json, print_table, IntentArgs, WhoArgs};

#[derive(clap::Args)]
pub struct Args {
    /// RabbitMQ management API, e.g. `http://user:password@host:15672`
    /// (default: the AMQP broker's host on port 15672, same credentials).
    #[arg(long, global = true, env = "SLUICE_MANAGEMENT_URL")]
    management_url: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Clone, clap::Subcommand)]
enum Verb {
    /// List dead letters grouped by failure (command type + error class).
    /// Consumes nothing: the messages stay, in their order.
    ///
    /// RabbitMQ cannot browse a quorum queue, so a listing takes every dead
    /// letter unacked on one channel and then gives them all back: they keep
    /// their order, but each listing counts as one delivery in their
    /// `x-delivery-count`, and other consumers of the DLQ do not see them for
    /// the moment it takes. A DLQ with a delivery limit is therefore refused.
    /// One pass reads at most 65,535 dead letters per queue.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// A substring of the failure reason (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Dead letters shown in the table (`--json` lists all).
        #[arg(long, default_value_t = 50)]
        show: usize,
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter: headers, death history, payload.
    Show {
        /// Its message id (the operation id).
        message_id: String,
        #[command(flatten)]
        scope: ScopeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the work queue they came from (attempt count
    /// reset to 1, reason and class removed), or to `--to`. Each message is
    /// removed from the DLQ only after the broker confirmed its copy. Only to
    /// the tenant's own queues, unless `--to-foreign`; audited.
    Shovel {
        #[command(flatten)]
        filter: FilterArgs,
        /// A substring of the failure reason (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Destination queue for every message (headers kept as they are):
        /// one of the tenant's. Without filters, --limit and --rate this
        /// uses RabbitMQ's shovel.
        #[arg(long, conflicts_with = "to_foreign")]
        to: Option<String>,
        /// Like --to, for a queue that is not the tenant's (another tenant's,
        /// or no tenant's): audited as a foreign shovel.
        #[arg(long)]
        to_foreign: Option<String>,
        #[command(flatten)]
        who: WhoArgs,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Hold messages unacked this long at most (default 60): then give
        /// them back and walk on, so a slow shovel never outlasts the
        /// broker's consumer timeout.
        #[arg(long)]
        window_seconds: Option<f64>,
        /// Show what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove dead letters for good: those matching the filters, or all of a
    /// tenant's with `--all`. Shows what matches and asks before anything
    /// goes (`--yes` answers, `--dry-run` only shows); removes only what it
    /// showed. Each removed message is archived with the audit row.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// A substring of the failure reason (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Every dead letter of the tenant (a purge without filters needs it).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        who: WhoArgs,
        #[command(flatten)]
        intent: IntentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove one dead letter for good (every copy of its message id); shows
    /// it and asks first, like purge. Archived with the audit row.
    Delete {
        /// Its message id (the operation id).
        message_id: String,
        #[command(flatten)]
        scope: ScopeArgs,
        #[command(flatten)]
        who: WhoArgs,
        #[command(flatten)]
        intent: IntentArgs,
        #[arg(long)]
        json: bool,
    },
    /// The audit log of purges, deletes and shovels, newest first.
    Audit {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// The messages one purge or delete removed (its audit id), as they were.
    Archive {
        /// The audit id (`sluice dlq audit`).
        audit_id: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, clap::Args)]
struct ScopeArgs {
    /// Only this tenant's DLQs (default: every configured tenant).
    #[arg(long)]
    tenant: Option<String>,
    /// Only this bounded context's DLQ (default: all).
    #[arg(long)]
    context: Option<String>,
}

#[derive(Clone, clap::Args)]
struct FilterArgs {
    #[command(flatten)]
    scope: ScopeArgs,
    /// The command type: the CloudEvent type or its last segment (`SubmitOrder`).
    #[arg(long = "type")]
    command_type: Option<String>,
    /// A prefix of the CloudEvent source.
    #[arg(long)]
    source: Option<String>,
    /// A substring of the error class (`malformed`, `retries_exhausted`, …).
    #[arg(long)]
    class: Option<String>,
    /// Dead-lettered at least this long ago: `90s`, `15m`, `2h`, `3d`.
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
}

impl FilterArgs {
    fn filter(&self, reason: Option<String>) -> Filter {
        Filter {
            command_type: self.command_type.clone(),
            source: self.source.clone(),
            reason,
            class: self.class.clone(),
            older_than: self.older_than,
            message_ids: None,
        }
    }
}

impl Verb {
    /// The tenants and context the verb is limited to.
    fn scope_args(&self) -> Option<&ScopeArgs> {
        match self {
            Verb::List { filter, .. } | Verb::Shovel { filter, .. } | Verb::Purge { filter, .. } => Some(&filter.scope),
            Verb::Show { scope, .. } | Verb::Delete { scope, .. } => Some(scope),
            Verb::Audit { .. } | Verb::Archive { .. } => None,
        }
    }
}

impl ScopeArgs {
    fn scope(&self, settings: &Settings) -> anyhow::Result<Scope> {
        Ok(Scope::new(&settings.tenant_names(), self.tenant.as_deref(), self.context.as_deref())?)
    }
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    if let Verb::Audit { tenant, limit, json } = &args.verb {
        let log = AuditLog::new(connect_cql(&settings).await?);
        let entries = log.list(tenant.as_deref(), *limit).await?;
        return if *json { print_json(&entries) } else { print_audit(&entries) };
    }
    if let Verb::Archive { audit_id, tenant, json } = &args.verb {
        let log = AuditLog::new(connect_cql(&settings).await?);
        let letters = log.archived(tenant, audit_id).await?;
        return output(*json, &letters, |letters| print_archive(letters));
    }
    // Each tenant's dead letters are on its own connection: the verb runs on
    // every connection its scope reaches, over that connection's tenants.
    let scope = args.verb.scope_args();
    if let Some(scope) = scope {
        scope.scope(&settings)?; // an unknown tenant or context is refused here
    }
    let scoped = scope.and_then(|s| s.tenant.clone());
    let connections: Vec<_> = settings
        .amqp_connections()
        .into_iter()
        .filter(|c| scoped.as_ref().is_none_or(|t| c.tenants.contains(t)))
        .collect();
    let many = connections.len() > 1;
    for connection in connections {
        if many {
            eprintln!(
                "RabbitMQ at {} (tenants {}):",
                sluice_telemetry::url_without_credentials(&connection.url),
                connection.tenants.join(", ")
            );
        }
        let mut on_this = settings.clone();
        on_this.tenants.retain(|t| connection.tenants.contains(&t.name));
        let management = Management::new(&connection.url, args.management_url.as_deref())?;
        let dlq = Dlq::connect(&connection.url, management).await?;
        let result = run_verb(&on_this, &dlq, args.verb.clone()).await;
        dlq.close().await;
        result?;
    }
    Ok(())
}

async fn run_verb(settings: &Settings, dlq: &Dlq, verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::List { filter, reason, show, json } => {
            let listing = dlq.list(&filter.scope.scope(settings)?, &filter.filter(reason)).await?;
            output(json, &listing, |l| print_listing(l, show))
        }
        Verb::Show { message_id, scope, json } => {
            let found = dlq.show(&scope.scope(settings)?, &message_id).await?;
            if json {
                print_json(&found)
            } else {
                for (i, detail) in found.iter().enumerate() {
                    if i > 0 {
                        println!("\n(another copy of the same message id)\n");
                    }
                    print_detail(detail)?;
                }
                Ok(())
            }
        }
        Verb::Shovel { filter, reason, to, to_foreign, who, limit, rate, window_seconds, dry_run, json } => {
            let scope = filter.scope.scope(settings)?;
            let foreign = to_foreign.is_some();
            let to = to.or(to_foreign);
            // Ctrl-C stops the shovel (a broker shovel is deleted) and the
            // report says what had moved by then.
            let stop = tokio_util::sync::CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_signal.cancel();
            });
            let partitions = Some(settings.amqp.partitions);
            if window_seconds.is_some_and(|w| !(w > 0.0 && w.is_finite())) {
                anyhow::bail!("--window-seconds must be a positive number");
            }
            let window = window_seconds.map(Duration::from_secs_f64);
            let operation_ids =
                Some(sluice_schemas::operation_id::OperationIds::new(&settings.ingest.operation_secret));
            let options = ShovelOptions {
                to,
                limit,
                rate,
                dry_run,
                partitions,
                foreign,
                stop: stop.clone(),
                window,
                operation_ids,
            };
            let audit = AuditLog::new(connect_cql(settings).await.context("the audit log needs the CQL store")?);
            let who = Who { actor: who.actor(), reason: who.why };
            let bar = (!json).then(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} examined  {msg}",
                    )
                    .expect("valid template"),
                );
                bar
            });
            let mut progress = |p: &ShovelProgress| {
                if let Some(bar) = &bar {
                    bar.set_length(p.to_examine);
                    bar.set_position(p.examined);
                    bar.set_message(format!("{}  moved {}", p.queue, p.moved));
                }
            };
            let report = dlq.shovel(&audit, &who, &scope, &filter.filter(reason), &options, &mut progress).await?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            output(json, &report, print_shovel)?;
            if report.interrupted {
                std::process::exit(130);
            }
            Ok(())
        }
        Verb::Purge { filter, reason, all, who, intent, json } => {
            if filter.scope.tenant.is_none() {
                bail!("purge needs --tenant: a purge of every tenant's dead letters at once is not offered");
            }
            let mut selected = filter.filter(reason);
            if selected.is_empty() && !all {
                bail!(
                    "a purge without a filter removes every dead letter of the tenant: pass --all to mean that, \
                     or narrow it (--type, --source, --class, --reason, --older-than)"
                );
            }
            let scope = filter.scope.scope(settings)?;
            let confirmed = match shown_and_confirmed(dlq, &scope, &selected, &intent, json).await? {
                Shown::Confirmed(ids) => ids,
                // Reported the usual way: removed 0, no audit row.
                Shown::Nothing => BTreeSet::new(),
                Shown::DryRun => return Ok(()),
            };
            selected.message_ids = Some(confirmed);
            let audit = AuditLog::new(connect_cql(settings).await.context("the audit log needs the CQL store")?);
            let who = Who { actor: who.actor(), reason: who.why };
            let report = dlq.purge(&audit, &scope, &selected, &who).await?;
            output(json, &report, print_removal)
        }
        Verb::Delete { message_id, scope, who, intent, json } => {
            let scope = scope.scope(settings)?;
            let one = Filter { message_ids: Some([message_id.clone()].into()), ..Filter::default() };
            match shown_and_confirmed(dlq, &scope, &one, &intent, json).await? {
                Shown::Confirmed(_) => {}
                Shown::DryRun => return Ok(()),
                Shown::Nothing => bail!("no dead letter {message_id} in {}", scope_queues(&scope)),
            }
            let audit = AuditLog::new(connect_cql(settings).await.context("the audit log needs the CQL store")?);
            let who = Who { actor: who.actor(), reason: who.why };
            let report = dlq.delete(&audit, &scope, &message_id, &who).await?;
            output(json, &report, print_removal)
        }
        Verb::Audit { .. } | Verb::Archive { .. } => unreachable!("handled before connecting to RabbitMQ"),
    }
}

/// What the operator was shown before a removal.
enum Shown {
    /// `--dry-run`: shown, nothing is to go.
    DryRun,
    /// Nothing matched.
    Nothing,
    /// Confirmed: the message ids that may go.
    Confirmed(BTreeSet<String>),
}

/// Shows what `selected` matches (on stderr, or as the `--json` document of
/// a dry run) and asks; a refusal is an error.
async fn shown_and_confirmed(
    dlq: &Dlq,
    scope: &Scope,
    selected: &Filter,
    intent: &IntentArgs,
    json: bool,
) -> anyhow::Result<Shown> {
    let listing = dlq.list(scope, selected).await?;
    if intent.dry_run {
        output(json, &listing, |l| {
            println!("dry run: would remove {} dead letter(s); nothing removed", l.matching);
            print_listing(l, 50);
        })?;
        return Ok(Shown::DryRun);
    }
    if listing.matching == 0 {
        return Ok(Shown::Nothing);
    }
    for group in &listing.groups {
        eprintln!("  {} × {} ({})", group.count, group.command_type, group.error_class);
    }
    let ids: BTreeSet<String> = listing.messages.iter().map(|dl| id_or_dash(dl).to_owned()).collect();
    let shown: Vec<&str> = ids.iter().take(20).map(String::as_str).collect();
    let more = if ids.len() > shown.len() { format!(" and {} more", ids.len() - shown.len()) } else { String::new() };
    eprintln!("  message ids: {}{more}", shown.join(" "));
    if !intent.confirm(&format!("remove these {} dead letter(s) for good", listing.matching))? {
        bail!("not confirmed: nothing removed");
    }
    Ok(Shown::Confirmed(ids))
}

fn scope_queues(scope: &Scope) -> String {
    scope.dlqs.iter().map(|d| d.queue.as_str()).collect::<Vec<_>>().join(", ")
}

fn print_archive(letters: &[ArchivedLetter]) {
    if letters.is_empty() {
        println!("nothing archived under this audit id");
    }
    for letter in letters {
        println!("{}", letter.message_id);
        let payload = &letter.detail["payload"];
        println!(
            "  {}",
            if payload.is_string() { payload.as_str().unwrap_or_default().to_owned() } else { payload.to_string() }
        );
    }
}

fn print_listing(listing: &Listing, show: usize) {
    for q in &listing.queues {
        let state = match (q.exists, q.complete) {
            (false, _) => "does not exist".to_owned(),
            (true, true) => format!("{} dead letter(s)", q.depth),
            (true, false) => {
                format!("{} dead letter(s), {} examined (the rest could not be read in one pass)", q.depth, q.examined)
            }
        };
        println!("{}  {state}", q.queue);
    }
    println!();
    if listing.matching == 0 {
        println!("no dead letters match");
        return;
    }
    println!("{} matching, by failure:", listing.matching);
    let rows: Vec<Vec<String>> = listing
        .groups
        .iter()
        .map(|g| {
            vec![
                g.count.to_string(),
                g.command_type.clone(),
                g.error_class.clone(),
                g.oldest.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into()),
                clip(g.reasons.first().map(String::as_str).unwrap_or("-"), 70),
            ]
        })
        .collect();
    print_table(&["COUNT", "TYPE", "ERROR CLASS", "OLDEST (UTC)", "FOR EXAMPLE"], &rows);
    println!();
    let rows: Vec<Vec<String>> = listing.messages.iter().take(show).map(message_row).collect();
    print_table(&["MESSAGE ID", "TENANT", "TYPE", "ERROR CLASS", "ATTEMPTS", "AGE", "REASON"], &rows);
    if listing.messages.len() > show {
        println!("… and {} more (--show N, or --json)", listing.messages.len() - show);
    }
}

fn message_row(dl: &DeadLetter) -> Vec<String> {
    vec![
        dl.message_id.clone().unwrap_or_else(|| "-".into()),
        dl.tenant.clone(),
        dl.command_type.rsplit('.').next().unwrap_or_default().to_owned(),
        dl.error_class.clone(),
        dl.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        dl.age_seconds.map(age).unwrap_or_else(|| "-".into()),
        clip(dl.reason.as_deref().unwrap_or("-"), 60),
    ]
}

fn print_detail(d: &DeadLetterDetail) -> anyhow::Result<()> {
    let s = &d.summary;
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("message id      {}", or_dash(&s.message_id));
    println!("queue           {} (tenant {}, context {})", s.queue, s.tenant, s.context);
    println!("type            {}", s.command_type);
    println!("source, id      {} {}", or_dash(&s.source), or_dash(&s.command_id));
    println!("error class     {}", s.error_class);
    println!("reason          {}", or_dash(&s.reason));
    println!("attempts        {}", s.attempts.map(|a| a.to_string()).unwrap_or_else(|| "-".into()));
    println!("original queue  {}", or_dash(&s.original_queue));
    match (s.dead_lettered_at, s.age_seconds) {
        (Some(at), Some(a)) => println!("dead-lettered   {} ({} ago)", at.to_rfc3339(), age(a)),
        _ => println!("dead-lettered   -"),
    }
    println!("re-drives       {}", s.redrives);
    println!("dlq deliveries  {} (every listing counts one)", s.dlq_deliveries);
    if !d.attempt_history.is_empty() {
        println!("\nattempt history");
        for line in &d.attempt_history {
            println!("  {line}");
        }
    }
    if !d.deaths.is_empty() {
        println!("\nx-death");
        for death in &d.deaths {
            println!("  {}", serde_json::to_string(death)?);
        }
    }
    println!("\nheaders");
    for (name, value) in &d.headers {
        if name != "x-death" {
            println!("  {name}: {}", serde_json::to_string(value)?);
        }
    }
    println!("\nproperties");
    for (name, value) in &d.properties {
        println!("  {name}: {}", serde_json::to_string(value)?);
    }
    println!("\npayload ({} bytes{})", d.payload_bytes, if d.payload_is_json { ", JSON" } else { ", not JSON" });
    match &d.payload {
        serde_json::Value::String(text) if !d.payload_is_json => println!("{text}"),
        json => println!("{}", serde_json::to_string_pretty(json)?),
    }
    Ok(())
}

fn print_shovel(r: &ShovelReport) {
    let verb = if r.dry_run { "would move" } else { "moved" };
    let count = if r.dry_run { r.selected } else { r.moved };
    let how = match r.method {
        sluice_cli::ops::dlq::ShovelMethod::Client => "",
        sluice_cli::ops::dlq::ShovelMethod::BrokerShovel => " (RabbitMQ shovel)",
    };
    let stopped = if r.interrupted { ", then stopped (interrupted): the rest stays in the DLQ" } else { "" };
    println!("{verb} {count} dead letter(s){how}{stopped}");
    if r.copied_twice > 0 {
        println!(
            "  {} of them are also back in the DLQ (RabbitMQ's shovel was stopped between copy and ack)",
            r.copied_twice
        );
    }
    for (destination, n) in &r.destinations {
        println!("  {n} → {destination}");
    }
    if !r.ids.is_empty() && r.ids.len() <= 20 {
        println!("  message ids: {}", r.ids.join(" "));
    }
    for q in r.queues.iter().filter(|q| q.exists && !q.complete) {
        println!("  {}: {} of {} examined; run again for the rest", q.queue, q.examined, q.depth);
    }
    for id in &r.audit_ids {
        println!("  audit {id}");
    }
}

fn print_removal(r: &RemovalReport) {
    println!("{}: removed {} dead letter(s) as {} — {:?}", r.action, r.removed, r.actor, r.reason);
    for q in r.queues.iter().filter(|q| q.seen.exists && (q.removed > 0 || q.audit_id.is_some())) {
        let audit = q.audit_id.as_deref().map(|id| format!("  audit {id}")).unwrap_or_default();
        let rest = if q.seen.complete {
            String::new()
        } else {
            format!("  ({} of {} examined; run again)", q.seen.examined, q.seen.depth)
        };
        println!("  {}: {}{audit}{rest}", q.seen.queue, q.removed);
    }
}

fn print_audit(entries: &[AuditEntry]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            vec![
                e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                or_dash(&e.actor),
                or_dash(&e.action),
                or_dash(&e.queue),
                e.count.to_string(),
                clip(&e.message_ids.join(" "), 30),
                or_dash(&e.status),
                clip(&or_dash(&e.filter), 30),
                clip(&or_dash(&e.reason), 50),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("nothing recorded (purges, deletes, shovels, version drops)");
    } else {
        print_table(
            &["AT (UTC)", "ACTOR", "ACTION", "QUEUE", "COUNT", "MESSAGE IDS", "STATUS", "SELECTED BY", "REASON"],
            &rows,
        );
    }
    Ok(())
}

/// `45s`, `12m`, `3h`, `2d`.
fn age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

fn clip(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(max - 1).collect::<String>())
    }
}
