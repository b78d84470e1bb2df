//! `sluice status`: one look at every tenant's queues, events topic,
//! projection and schemas, and a verdict.
//!
//! Unhealthy — `critical` problems, which make `sluice status` exit 1:
//!
//! | problem | when |
//! |---|---|
//! | `server_unreachable` | RabbitMQ (AMQP or management API), Kafka, the registry or the CQL store does not answer |
//! | `work_queue_missing` | a tenant's work queue does not exist (no edge or processor ever started for it) |
//! | `no_consumers` | a work queue has no consumer: nothing processes the tenant's commands |
//! | `dead_letters` | a DLQ holds more than `--max-dlq` messages (default 0) |
//! | `events_topic_missing` | a tenant's events topic does not exist |
//! | `projection_lag` | a context's projection (the active version of `projector.name` for orders, the patients projection) is more than `--max-lag` events behind on a partition |
//!
//! `warning` problems are reported and do not change the exit code: a retry
//! queue or DLQ missing, a DLQ that cannot be read safely (delivery limit),
//! a DLQ deeper than the sample looked at, a topic with events but no schema
//! subject in the registry, process timers overdue by more than
//! `--max-timer-delay` seconds (no processor fires them).
//!
//! Reading a non-empty DLQ to count its messages by error class is a walk
//! (see `ops::walk`): it adds one to each message's `x-delivery-count` and
//! hides the messages from other consumers for the moment it takes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use scylla::client::session::Session;
use serde::Serialize;
use serde_json::Value;
use sluice_processors::process::onboarding::Onboarding;
use sluice_processors::process::timers::{summary, ProcessSummary};
use sluice_processors::process::ProcessManager;
use sluice_projections::runner::{group_id, group_of};
use sluice_projections::store::versions::Versions;
use sluice_schemas::{catalog, names};
use sluice_streams::lag::{group_lag, PartitionLag};

use super::dead_letter;
use super::management::{encode, Management};
use super::walk::{self, Walk};
use super::OpsError;
use crate::settings::Settings;

/// Thresholds and limits of one status run.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// Events the active projection may be behind on one partition.
    pub max_lag: i64,
    /// Dead letters a DLQ may hold.
    pub max_dlq: u64,
    /// Dead letters read per DLQ to count them by class.
    pub dlq_sample: u32,
    /// The management API, when not beside the AMQP broker on port 15672.
    pub management_url: Option<String>,
    /// How long a process timer may stay due before it is reported.
    pub max_timer_delay: Duration,
}

impl Default for StatusOptions {
    fn default() -> Self {
        Self {
            max_lag: 1_000,
            max_dlq: 0,
            dlq_sample: 10_000,
            management_url: None,
            max_timer_delay: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// A stable key for scripts (see the table in this module's docs).
    pub kind: &'static str,
    /// The server, queue, topic or partition concerned.
    pub subject: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// No critical problem.
    pub healthy: bool,
    pub problems: Vec<Problem>,
    pub servers: Vec<ServerStatus>,
    pub projection: Option<ProjectionStatus>,
    pub tenants: Vec<TenantStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub name: &'static str,
    pub address: String,
    pub reachable: bool,
    /// The version, or why it is unreachable.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    /// The version serving reads, and its consumer group.
    pub active: i32,
    pub group: String,
    /// A version a rebuild is filling, and its group.
    pub building: Option<i32>,
    pub building_group: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantStatus {
    pub tenant: String,
    pub contexts: Vec<ContextStatus>,
    /// Process managers: instances by stage, timers due (`None` while the
    /// CQL store is unreachable).
    pub processes: Option<Vec<ProcessSummary>>,
    /// Keys parked by each Kafka consumer (`sluice dlt`; `None` while the
    /// CQL store is unreachable).
    pub parked_keys: Option<Vec<ParkedCount>>,
}

/// How many keys one consumer has parked for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedCount {
    pub consumer: String,
    pub keys: usize,
    /// Of them, being replayed right now.
    pub replaying: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContextStatus {
    pub context: String,
    /// The partition queues, in partition order.
    pub partitions: Vec<CommandPartitionStatus>,
    pub dlq: DlqStatus,
    pub events: Option<TopicStatus>,
    pub subjects: Option<Vec<SubjectStatus>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStatus {
    pub name: String,
    pub exists: bool,
    /// Ready messages (exact, from the broker).
    pub ready: u32,
    /// Delivered, not yet acked (management API statistics, a few seconds old).
    pub unacked: Option<u64>,
    pub consumers: u32,
}

/// One partition queue of a context's commands and the processor that holds it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommandPartitionStatus {
    pub partition: u16,
    #[serde(flatten)]
    pub queue: QueueStatus,
    /// The processor whose consumer is the queue's single active one
    /// (management API; `None` when nobody holds it or the API is not
    /// reachable).
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DlqStatus {
    #[serde(flatten)]
    pub queue: QueueStatus,
    /// Dead letters per error class, of those examined.
    pub by_class: BTreeMap<String, u64>,
    pub examined: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicStatus {
    pub topic: String,
    pub partitions: Vec<PartitionStatus>,
    /// Sum of the end offsets: events ever written.
    pub end_offsets_total: i64,
    /// Sum of the context projection's lag (`None` while the active version
    /// of the versioned projection is unknown).
    pub lag_total: Option<i64>,
    /// Sum of the building version's lag, during a rebuild.
    pub building_lag_total: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub end_offset: i64,
    /// Next offset the context's projection (its active version) will read.
    pub committed: Option<i64>,
    pub lag: Option<i64>,
    pub building_lag: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubjectStatus {
    pub subject: String,
    pub versions: Vec<i64>,
}

/// Looks at everything; fails only on bad usage (no tenants), never because
/// a server is down — that is a problem in the report.
pub async fn status(settings: &Settings, options: &StatusOptions) -> Result<StatusReport, OpsError> {
    let tenants = settings.tenant_names();
    if tenants.is_empty() {
        return Err(OpsError::Usage("no tenants configured: give a config file with [[tenants]] (--config)".into()));
    }
    let mut problems = Vec::new();
    let mut servers = Vec::new();

    // RabbitMQ, over AMQP and the management API: each connection tenants
    // use (their own broker or vhost, or the shared one).
    let mut brokers = Vec::new();
    for connection in settings.amqp_connections() {
        let tenants_here = connection.tenants.join(", ");
        let amqp = match Connection::connect(&connection.url, ConnectionProperties::default()).await {
            Ok(c) => {
                servers.push(ServerStatus {
                    name: "rabbitmq",
                    address: redact(&connection.url),
                    reachable: true,
                    detail: format!("amqp ok; tenants {tenants_here}"),
                });
                Some(c)
            }
            Err(e) => {
                let error = format!("{e} (tenants {tenants_here})");
                servers.push(down("rabbitmq", redact(&connection.url), &error, &mut problems));
                None
            }
        };
        let management = Management::new(&connection.url, options.management_url.as_deref())?;
        let management_up = match management.overview().await {
            Ok(overview) => {
                let version = format!("RabbitMQ {}", overview["rabbitmq_version"].as_str().unwrap_or("?"));
                servers.push(ServerStatus {
                    name: "rabbitmq_management",
                    address: format!("{} (vhost {})", management.base_url(), management.vhost()),
                    reachable: true,
                    detail: version,
                });
                true
            }
            Err(e) => {
                servers.push(down("rabbitmq_management", management.base_url().into(), &e, &mut problems));
                false
            }
        };
        brokers.push((connection.tenants, amqp, management_up.then_some(management)));
    }
    let broker_of = |tenant: &str| brokers.iter().find(|(tenants, _, _)| tenants.iter().any(|t| t == tenant));

    // Kafka, each cluster tenants use: a plain TCP check first, so a dead
    // broker costs seconds, not librdkafka's metadata timeouts.
    let mut clusters_up = Vec::new();
    for cluster in settings.kafka_clusters().iter() {
        let tenants_here = cluster.tenants.join(", ");
        match reachable_any(&cluster.brokers).await {
            Ok(()) => {
                servers.push(ServerStatus {
                    name: "kafka",
                    address: cluster.brokers.clone(),
                    reachable: true,
                    detail: format!("tcp ok; tenants {tenants_here}"),
                });
                clusters_up.push(cluster.clone());
            }
            Err(e) => {
                let error = format!("{e} (tenants {tenants_here})");
                servers.push(down("kafka", cluster.brokers.clone(), &error, &mut problems));
            }
        }
    }
    let kafka_up = !clusters_up.is_empty();

    // The registry's subjects.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| OpsError::Usage(e.to_string()))?;
    let subjects = match registry_get(&http, &format!("{}/subjects", settings.registry.url)).await {
        Ok(Value::Array(items)) => {
            servers.push(ServerStatus {
                name: "registry",
                address: settings.registry.url.clone(),
                reachable: true,
                detail: format!("{} subjects", items.len()),
            });
            Some(items.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect::<Vec<_>>())
        }
        Ok(other) => {
            servers.push(down(
                "registry",
                settings.registry.url.clone(),
                &format!("unexpected answer {other}"),
                &mut problems,
            ));
            None
        }
        Err(e) => {
            servers.push(down("registry", settings.registry.url.clone(), &e, &mut problems));
            None
        }
    };

    // The CQL store: which projection version is active.
    let session = crate::serve::connect_cql(settings).await;
    let mut patients_version = 1;
    let projection = match &session {
        Ok(session) => {
            servers.push(ServerStatus {
                name: "cql",
                address: settings.cql.nodes.join(","),
                reachable: true,
                detail: format!("keyspace {}", settings.cql.keyspace),
            });
            if let Ok(state) = Versions::new(session.clone()).get(&settings.projector.patients_name).await {
                patients_version = state.active;
            }
            match Versions::new(session.clone()).get(&settings.projector.name).await {
                Ok(state) => Some(ProjectionStatus {
                    name: settings.projector.name.clone(),
                    active: state.active,
                    group: group_id(&settings.projector, state.active),
                    building: state.building,
                    building_group: state.building.map(|v| group_id(&settings.projector, v)),
                }),
                Err(e) => {
                    problem(
                        &mut problems,
                        Severity::Critical,
                        "server_unreachable",
                        "cql",
                        format!("projection versions: {e}"),
                    );
                    None
                }
            }
        }
        Err(e) => {
            servers.push(down("cql", settings.cql.nodes.join(","), &format!("{e:#}"), &mut problems));
            None
        }
    };

    // Kafka end offsets of every events topic, and the lag of each context's
    // projection: the orders projection's active (and building) version,
    // the patients projection's group.
    let (mut active_lag, mut building_lag) = (None, None);
    if kafka_up {
        let orders_group =
            projection.as_ref().map(|p| p.group.clone()).unwrap_or_else(|| group_id(&settings.projector, 1));
        let (mut lags, mut building) = (Vec::new(), Vec::new());
        for cluster in &clusters_up {
            let on_cluster: Vec<String> = tenants.iter().filter(|t| cluster.tenants.contains(t)).cloned().collect();
            let groups = [
                (orders_group.clone(), crate::serve::events_topics(&on_cluster)),
                (
                    group_of(&settings.projector, &settings.projector.patients_name, patients_version),
                    crate::serve::context_topics(&on_cluster, sluice_schemas::patients::CONTEXT),
                ),
            ];
            for (group, topics) in &groups {
                match group_lag(&cluster.brokers, group, topics).await {
                    Ok(lag) => lags.extend(lag),
                    Err(e) => problem(
                        &mut problems,
                        Severity::Critical,
                        "server_unreachable",
                        "kafka",
                        format!("offsets at {}: {e}", cluster.brokers),
                    ),
                }
            }
            if let Some(group) = projection.as_ref().and_then(|p| p.building_group.clone()) {
                building.extend(group_lag(&cluster.brokers, &group, &groups[0].1).await.unwrap_or_default());
            }
        }
        active_lag = Some(lags);
        if projection.as_ref().is_some_and(|p| p.building_group.is_some()) {
            building_lag = Some(building);
        }
    }

    let parked = match &session {
        Ok(session) => parked_keys(settings, session, &mut problems).await,
        Err(_) => None,
    };
    let mut report_tenants = Vec::new();
    for tenant in &tenants {
        let mut contexts = Vec::new();
        for context in catalog::CONTEXTS {
            let ctx = context_status(
                settings,
                options,
                tenant,
                context.name,
                broker_of(tenant).and_then(|(_, amqp, _)| amqp.as_ref()),
                broker_of(tenant).and_then(|(_, _, management)| management.as_ref()),
                (active_lag.as_deref(), building_lag.as_deref()),
                // The orders projection's group depends on its active version.
                projection.is_some() || context.name != sluice_schemas::orders::CONTEXT,
                subjects.as_deref(),
                &mut problems,
            )
            .await?;
            contexts.push(ctx);
        }
        let processes = match &session {
            Ok(session) => Some(process_status(session, tenant, options, &mut problems).await),
            Err(_) => None,
        };
        let parked_keys = parked.as_ref().map(|all| {
            let mut counts: Vec<ParkedCount> = Vec::new();
            for p in all.iter().filter(|p| sluice_projections::apply::tenant_of(&p.topic) == Some(tenant.as_str())) {
                match counts.iter_mut().find(|c| c.consumer == p.consumer) {
                    Some(c) => {
                        c.keys += 1;
                        c.replaying += usize::from(p.releasing);
                    }
                    None => counts.push(ParkedCount {
                        consumer: p.consumer.clone(),
                        keys: 1,
                        replaying: usize::from(p.releasing),
                    }),
                }
            }
            for c in &counts {
                let detail = format!("{} key(s) parked behind poison records (`sluice dlt list`)", c.keys);
                problem(&mut problems, Severity::Warning, "keys_parked", &format!("{tenant}/{}", c.consumer), detail);
            }
            counts
        });
        report_tenants.push(TenantStatus { tenant: tenant.clone(), contexts, processes, parked_keys });
    }
    for (_, amqp, _) in brokers {
        if let Some(c) = amqp {
            let _ = c.close(200, "status done".into()).await;
        }
    }
    problems.sort_by_key(|p| std::cmp::Reverse(p.severity));
    Ok(StatusReport {
        healthy: !problems.iter().any(|p| p.severity == Severity::Critical),
        problems,
        servers,
        projection,
        tenants: report_tenants,
    })
}

#[allow(clippy::too_many_arguments)]
async fn context_status(
    settings: &Settings,
    options: &StatusOptions,
    tenant: &str,
    context: &str,
    amqp: Option<&Connection>,
    management: Option<&Management>,
    (active_lag, building_lag): (Option<&[PartitionLag]>, Option<&[PartitionLag]>),
    // Whether the context's projection group is known: only then is there a
    // lag to show.
    projected: bool,
    subjects: Option<&[String]>,
    problems: &mut Vec<Problem>,
) -> Result<ContextStatus, OpsError> {
    let dlq_name = names::dead_letter_queue(tenant, context);
    let mut status = ContextStatus {
        context: context.to_owned(),
        partitions: Vec::new(),
        dlq: DlqStatus { queue: QueueStatus { name: dlq_name.clone(), ..Default::default() }, ..Default::default() },
        events: None,
        subjects: None,
    };

    if let Some(amqp) = amqp {
        for partition in 0..settings.amqp.partitions {
            let name = names::command_queue(tenant, context, partition);
            let queue = queue_status(amqp, management, &name).await?;
            if !queue.exists {
                problem(
                    problems,
                    Severity::Critical,
                    "work_queue_missing",
                    &name,
                    "the queue does not exist: no edge or processor has started for this tenant".into(),
                );
            } else if queue.consumers == 0 {
                problem(
                    problems,
                    Severity::Critical,
                    "no_consumers",
                    &name,
                    "no processor consumes this partition".into(),
                );
            }
            let owner = match (management, queue.exists) {
                (Some(m), true) => m.queue(&name).await.ok().flatten().and_then(|q| owner_of(&q, &name)),
                _ => None,
            };
            status.partitions.push(CommandPartitionStatus { partition, queue, owner });
        }
        status.dlq.queue = queue_status(amqp, management, &dlq_name).await?;
        let depth = u64::from(status.dlq.queue.ready);
        if !status.dlq.queue.exists {
            problem(
                problems,
                Severity::Warning,
                "dlq_missing",
                &dlq_name,
                "the dead-letter queue does not exist".into(),
            );
        } else if depth > 0 {
            if depth > options.max_dlq {
                problem(
                    problems,
                    Severity::Critical,
                    "dead_letters",
                    &dlq_name,
                    format!("{depth} dead letter(s), at most {} allowed (--max-dlq)", options.max_dlq),
                );
            }
            count_by_class(amqp, management, tenant, context, options.dlq_sample, &mut status.dlq, problems).await?;
        }
    }

    let topic = names::events_topic(tenant, context);
    if let Some(lag) = active_lag {
        let building: Vec<&PartitionLag> = building_lag.into_iter().flatten().filter(|p| p.topic == topic).collect();
        let mut partitions: Vec<PartitionStatus> = lag
            .iter()
            .filter(|p| p.topic == topic)
            .map(|p| PartitionStatus {
                partition: p.partition,
                end_offset: p.end,
                committed: p.committed.filter(|_| projected),
                lag: projected.then_some(p.lag),
                building_lag: building.iter().find(|b| b.partition == p.partition).map(|b| b.lag).filter(|_| projected),
            })
            .collect();
        partitions.sort_by_key(|p| p.partition);
        if partitions.is_empty() {
            problem(
                problems,
                Severity::Critical,
                "events_topic_missing",
                &topic,
                "the events topic does not exist: no processor has started for this tenant".into(),
            );
        } else {
            for p in partitions.iter().filter(|p| p.lag.is_some_and(|lag| lag > options.max_lag)) {
                let lag = p.lag.unwrap_or_default();
                problem(
                    problems,
                    Severity::Critical,
                    "projection_lag",
                    &format!("{topic}/{}", p.partition),
                    format!("{lag} events behind, at most {} allowed (--max-lag)", options.max_lag),
                );
            }
        }
        status.events = Some(TopicStatus {
            topic: topic.clone(),
            end_offsets_total: partitions.iter().map(|p| p.end_offset).sum(),
            lag_total: projected.then(|| partitions.iter().filter_map(|p| p.lag).sum()),
            building_lag_total: building_lag
                .filter(|_| projected)
                .map(|_| partitions.iter().filter_map(|p| p.building_lag).sum()),
            partitions,
        });
    }

    if let Some(subjects) = subjects {
        let prefix = format!("{topic}-");
        let mut mine = Vec::new();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OpsError::Usage(e.to_string()))?;
        for subject in subjects.iter().filter(|s| s.starts_with(&prefix)) {
            let versions =
                match registry_get(&http, &format!("{}/subjects/{}/versions", settings.registry.url, encode(subject)))
                    .await
                {
                    Ok(Value::Array(v)) => v.iter().filter_map(Value::as_i64).collect(),
                    _ => Vec::new(),
                };
            mine.push(SubjectStatus { subject: subject.clone(), versions });
        }
        mine.sort_by(|a, b| a.subject.cmp(&b.subject));
        // Subjects are registered with the first event of each type: a topic
        // with events but none is the odd one.
        let has_events = status.events.as_ref().is_some_and(|e| e.end_offsets_total > 0);
        if mine.is_empty() && has_events {
            let detail = "the topic has events but no schema subject is registered for it".into();
            problem(problems, Severity::Warning, "no_subjects", &topic, detail);
        }
        status.subjects = Some(mine);
    }
    Ok(status)
}

/// Every parked key of every consumer with dead-letter topics.
async fn parked_keys(
    settings: &Settings,
    session: &Arc<Session>,
    problems: &mut Vec<Problem>,
) -> Option<Vec<super::dlt::ParkedKey>> {
    let dlt = super::dlt::Dlt::new(settings.clone(), session.clone());
    let mut all = Vec::new();
    let consumers = match dlt.consumers().await {
        Ok(consumers) => consumers,
        Err(e) => {
            problem(problems, Severity::Warning, "parked_keys", "cql", e.to_string());
            return None;
        }
    };
    for consumer in &consumers {
        match dlt.parked(consumer).await {
            Ok(parked) => all.extend(parked),
            Err(e) => {
                problem(problems, Severity::Warning, "parked_keys", &consumer.name, e.to_string());
                return None;
            }
        }
    }
    Some(all)
}

/// The tenant's process managers by stage, and their timers; timers due for
/// longer than `max_timer_delay` are a warning (no processor fires them).
async fn process_status(
    session: &Session,
    tenant: &str,
    options: &StatusOptions,
    problems: &mut Vec<Problem>,
) -> Vec<ProcessSummary> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for process in [Onboarding::NAME] {
        match summary(session, tenant, process, now_ms).await {
            Ok(s) => {
                let overdue_ms = s.oldest_due_ms.map_or(0, |due| now_ms - due);
                if overdue_ms > options.max_timer_delay.as_millis() as i64 {
                    let detail = format!("{} timer(s) due, the oldest for {} s", s.timers_due, overdue_ms / 1_000);
                    problem(problems, Severity::Warning, "timers_overdue", &format!("{tenant}/{process}"), detail);
                }
                out.push(s);
            }
            Err(e) => {
                problem(problems, Severity::Warning, "process_status", &format!("{tenant}/{process}"), e.to_string())
            }
        }
    }
    out
}

/// Reads up to `sample` dead letters of a DLQ (a walk: nothing consumed).
async fn count_by_class(
    amqp: &Connection,
    management: Option<&Management>,
    tenant: &str,
    context: &str,
    sample: u32,
    dlq: &mut DlqStatus,
    problems: &mut Vec<Problem>,
) -> Result<(), OpsError> {
    let name = dlq.queue.name.clone();
    let Some(management) = management else {
        problem(
            problems,
            Severity::Warning,
            "dlq_unread",
            &name,
            "without the management API the DLQ is not read (its delivery limit is unknown)".into(),
        );
        return Ok(());
    };
    let Some(info) = management.queue(&name).await? else { return Ok(()) };
    if let Err(e) = walk::ensure_walkable(&name, &info) {
        problem(problems, Severity::Warning, "dlq_unread", &name, e.to_string());
        return Ok(());
    }
    let mut walk = Walk::start(amqp, &name, sample.max(1)).await?;
    let now = chrono::Utc::now();
    while let Some(delivery) = walk.next().await? {
        let dl = dead_letter::summarize(tenant, context, &name, &delivery, now);
        *dlq.by_class.entry(dl.error_class).or_default() += 1;
    }
    dlq.examined = walk.seen();
    if !walk.complete() {
        problem(
            problems,
            Severity::Warning,
            "dlq_sampled",
            &name,
            format!("classes counted on {} of {} dead letters", walk.seen(), walk.depth_at_start()),
        );
    }
    walk.finish(amqp).await
}

async fn queue_status(amqp: &Connection, management: Option<&Management>, name: &str) -> Result<QueueStatus, OpsError> {
    let Some((ready, consumers)) = walk::queue_counts(amqp, name).await? else {
        return Ok(QueueStatus { name: name.to_owned(), ..Default::default() });
    };
    let unacked = match management {
        Some(m) => m.queue(name).await.ok().flatten().and_then(|q| q["messages_unacknowledged"].as_u64()),
        None => None,
    };
    Ok(QueueStatus { name: name.to_owned(), exists: true, ready, unacked, consumers })
}

/// The processor holding a partition queue: its consumer tag is
/// `<instance>/<queue>` (see `sluice_processors::amqp::consumer`).
fn owner_of(queue_info: &serde_json::Value, queue: &str) -> Option<String> {
    let tag = queue_info["single_active_consumer_ctag"].as_str()?;
    Some(tag.strip_suffix(&format!("/{queue}")).unwrap_or(tag).to_owned())
}

fn problem(problems: &mut Vec<Problem>, severity: Severity, kind: &'static str, subject: &str, detail: String) {
    problems.push(Problem { severity, kind, subject: subject.to_owned(), detail });
}

fn down(
    name: &'static str,
    address: String,
    error: &dyn std::fmt::Display,
    problems: &mut Vec<Problem>,
) -> ServerStatus {
    let detail = error.to_string();
    problem(problems, Severity::Critical, "server_unreachable", name, format!("{address}: {detail}"));
    ServerStatus { name, address, reachable: false, detail }
}

/// The AMQP URL without its password.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

async fn reachable_any(brokers: &str) -> Result<(), String> {
    let mut errors = Vec::new();
    for broker in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(broker)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => errors.push(format!("{broker}: {e}")),
            Err(_) => errors.push(format!("{broker}: no answer within 3s")),
        }
    }
    Err(errors.join("; "))
}

async fn registry_get(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url}: {status}"));
    }
    response.json().await.map_err(|e| e.to_string())
}
