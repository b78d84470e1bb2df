//! `sluice status`: the health of every configured tenant's queues, events
//! topic, projections, process managers and schemas. Exit code 0 when healthy, 1 when any
//! critical problem was found (the rules are in `sluice_cli::ops::status`).

use sluice_cli::ops::status::{status, Severity, StatusOptions, StatusReport};
use sluice_cli::settings::Settings;

use super::{print_json, print_table};

#[derive(clap::Args)]
pub struct Args {
    /// Events the active projection may be behind on one partition before
    /// the status is unhealthy.
    #[arg(long, default_value_t = 1_000)]
    max_lag: i64,
    /// Dead letters a DLQ may hold before the status is unhealthy.
    #[arg(long, default_value_t = 0)]
    max_dlq: u64,
    /// Dead letters read per DLQ to count them by error class (reading does
    /// not consume them; see `sluice dlq list --help`).
    #[arg(long, default_value_t = 10_000)]
    dlq_sample: u32,
    /// Seconds a process timer may stay due (unfired) before it is reported.
    #[arg(long, default_value_t = 60)]
    max_timer_delay: u64,
    /// RabbitMQ management API (default: the AMQP broker's host, port 15672).
    #[arg(long, env = "SLUICE_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// One JSON document instead of tables (the exit code still tells).
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<()> {
    let options = StatusOptions {
        max_lag: args.max_lag,
        max_dlq: args.max_dlq,
        dlq_sample: args.dlq_sample,
        management_url: args.management_url,
        max_timer_delay: std::time::Duration::from_secs(args.max_timer_delay),
    };
    let report = status(&settings, &options).await?;
    if args.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    if !report.healthy {
        // The report is out; the exit code is for scripts and probes.
        std::process::exit(1);
    }
    Ok(())
}

fn print_report(r: &StatusReport) {
    let rows: Vec<Vec<String>> = r
        .servers
        .iter()
        .map(|s| {
            vec![
                s.name.to_owned(),
                s.address.clone(),
                if s.reachable { "ok".into() } else { "DOWN".into() },
                s.detail.clone(),
            ]
        })
        .collect();
    print_table(&["SERVER", "ADDRESS", "STATE", "DETAIL"], &rows);
    if let Some(p) = &r.projection {
        let building = match (p.building, &p.building_group) {
            (Some(v), Some(g)) => format!(", building v{v} (group {g})"),
            _ => String::new(),
        };
        println!("\nprojection {}: active v{} (group {}){building}", p.name, p.active, p.group);
    }
    for t in &r.tenants {
        for c in &t.contexts {
            println!("\n{} / {}", t.tenant, c.context);
            let mut rows = Vec::new();
            let mut queue_row = |kind: &str, q: &sluice_cli::ops::status::QueueStatus, extra: String| {
                rows.push(vec![
                    kind.to_owned(),
                    q.name.clone(),
                    if q.exists { q.ready.to_string() } else { "missing".into() },
                    q.unacked.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
                    q.consumers.to_string(),
                    extra,
                ]);
            };
            for p in &c.partitions {
                let owner = format!("owned by {}", p.owner.as_deref().unwrap_or("nobody"));
                queue_row(&format!("partition {}", p.partition), &p.queue, owner);
            }
            let classes: Vec<String> = c.dlq.by_class.iter().map(|(class, n)| format!("{class} {n}")).collect();
            queue_row("dead letters", &c.dlq.queue, classes.join(", "));
            print_table(&["QUEUE", "NAME", "READY", "UNACKED", "CONSUMERS", "OWNER / ERROR CLASSES"], &rows);
            if let Some(events) = &c.events {
                let rows: Vec<Vec<String>> = events
                    .partitions
                    .iter()
                    .map(|p| {
                        vec![
                            format!("{}/{}", events.topic, p.partition),
                            p.end_offset.to_string(),
                            p.committed.map(|o| o.to_string()).unwrap_or_else(|| "-".into()),
                            p.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                            p.building_lag.map(|l| l.to_string()).unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(&["PARTITION", "END OFFSET", "PROJECTED TO", "LAG", "REBUILD LAG"], &rows);
            }
            if let Some(subjects) = &c.subjects {
                for s in subjects {
                    let versions: Vec<String> = s.versions.iter().map(|v| format!("v{v}")).collect();
                    println!("schema  {}  {}", s.subject, versions.join(" "));
                }
            }
        }
        for p in t.processes.iter().flatten() {
            println!("\n{} / process {}", t.tenant, p.process);
            let stages: Vec<String> = p.by_stage.iter().map(|(stage, n)| format!("{stage} {n}")).collect();
            let oldest = p.oldest_due_ms.and_then(chrono::DateTime::from_timestamp_millis).map(|t| t.to_rfc3339());
            let rows = vec![vec![
                if stages.is_empty() { "-".into() } else { stages.join(", ") },
                p.timers_due.to_string(),
                p.timers_pending.to_string(),
                oldest.unwrap_or_else(|| "-".into()),
            ]];
            print_table(&["INSTANCES BY STAGE", "TIMERS DUE", "DUE WITHIN 1 H", "OLDEST DUE"], &rows);
        }
        for p in t.parked_keys.iter().flatten() {
            println!(
                "\n{} / consumer {}: {} parked key(s), {} being replayed (`sluice dlt list`)",
                t.tenant, p.consumer, p.keys, p.replaying
            );
        }
    }
    println!();
    for p in &r.problems {
        let level = match p.severity {
            Severity::Critical => "CRITICAL",
            Severity::Warning => "warning ",
        };
        println!("{level} {} {}: {}", p.kind, p.subject, p.detail);
    }
    let critical = r.problems.iter().filter(|p| p.severity == Severity::Critical).count();
    let warnings = r.problems.len() - critical;
    println!(
        "status: {} ({critical} critical, {warnings} warning(s))",
        if r.healthy { "healthy" } else { "UNHEALTHY" }
    );
}
