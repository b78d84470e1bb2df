//! The command side: processors sharing the partitions of the work queues.
//!
//! - [`domain`]: the handler API (pure `decide` / `evolve`).
//! - [`orders`]: the demo context's rules.
//! - [`patients`]: the patient onboarding context's rules.
//! - [`process`]: process managers (pure `react` / `on_timer`), their
//!   durable timers and their runtime.
//! - [`owner`]: a partition's owner, deciding its commands in rounds.
//! - [`journal`]: the owners' decisions, fenced by ownership epochs.
//! - [`event_store`]: streams in the CQL store.
//! - [`operations`]: operation records the edge serves.
//! - [`kafka`]: transactional producers (exactly once), Avro via the
//!   registry, topics.
//! - [`amqp`]: topology, the partition consumer, retries and dead letters.
//! - [`ownership`]: which processor consumes which partition.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod domain;
pub mod event_store;
pub mod hanging;
pub mod journal;
pub mod kafka;
pub mod operations;
pub mod orders;
pub mod owner;
pub mod ownership;
pub mod patients;
pub mod process;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use scylla::client::session::Session;
use serde::{Deserialize, Serialize};
use sluice_schemas::operation_id::OperationIds;
use sluice_schemas::{catalog, names};
use sluice_streams::clusters::{Cluster, Clusters};
use sluice_streams::dead_letter::{dead_letter_topic, DeadLetters};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::consumer::PartitionRef;
use crate::amqp::ConsumerSettings;
use crate::domain::Aggregate;
use crate::event_store::CqlEventStore;
use crate::journal::CqlJournal;
use crate::kafka::KafkaRelays;
use crate::operations::CqlOperationStore;
use crate::owner::Backends;
use crate::ownership::{CqlMembership, Membership};
use crate::process::onboarding::Onboarding;
use crate::process::ProcessManager;

/// Settings of the processor role.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Unacked deliveries per partition queue, processed concurrently
    /// when they belong to different streams (default 128). A partition
    /// takes at most this many commands per round trip of its pipeline
    /// (a round deciding, one in the relay, the acks): under load a round
    /// takes 100-200 ms on a busy 2-core machine, and 32 capped one
    /// processor at about 2,400 commands/s with its CPUs not all busy.
    pub prefetch: u16,
    /// Processing attempts before a transiently failing command is
    /// dead-lettered as `retries_exhausted` (default 6).
    pub max_attempts: u32,
    /// Backoff before each in-place retry, in ms: attempt n waits tier n
    /// (the last repeats). Default 1 s, 5 s, 15 s, 30 s.
    pub retry_delays_ms: Vec<u64>,
    /// How long a processor that stopped renewing its membership keeps its
    /// partitions, in ms (default 5000; whole seconds).
    pub membership_ttl_ms: u64,
    /// How often membership is renewed and the partitions re-shared, in ms
    /// (default 1000).
    pub rebalance_interval_ms: u64,
    /// AMQP heartbeat in seconds when the URL names none (default 5): a
    /// frozen processor's connection, and with it its partitions, is given
    /// up by the broker after about two missed heartbeats.
    pub amqp_heartbeat_s: u16,
    /// How often each consumed partition's Kafka relay is looked at for a
    /// transaction its coordinator forgot (default 30 s; see
    /// `sluice_processors::hanging`).
    pub hanging_sweep_interval_ms: u64,
    /// How often dead letters are looked at for re-drive (default 60 s).
    pub redrive_interval_ms: u64,
    /// Re-drives of one dead letter at most (default 3; 0 turns it off).
    pub max_redrives: u32,
    /// Partitions of a newly created events topic (default 3).
    pub topic_partitions: i32,
    /// Delay before reconnecting to RabbitMQ after the connection dropped (default 1000).
    pub reconnect_delay_ms: u64,
    /// Name of this processor in operation records (default `<hostname>-<pid>`).
    pub instance: String,
    /// The process managers this role runs.
    pub processes: ProcessConfig,
}

/// Settings of the process managers (today: patient onboarding).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Run the process managers in this processor role (default true).
    pub enabled: bool,
    /// Consumer group of the onboarding process (default `sluice.process.onboarding`).
    pub consumer_group: String,
    /// How often due timers are looked for, in ms (default 500).
    pub timer_poll_ms: u64,
    /// How long a claimed timer is left to the instance that claimed it
    /// before another may fire it, in ms (default 30 000).
    pub timer_lease_ms: u64,
    /// Wait for the intake assessment before each reminder and before the
    /// escalation, in ms (default 86 400 000: a day; seconds in the demo).
    pub assessment_timeout_ms: u64,
    /// Reminders before escalating to the care team (default 3).
    pub max_reminders: u32,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consumer_group: "sluice.process.onboarding".into(),
            timer_poll_ms: 500,
            timer_lease_ms: 30_000,
            assessment_timeout_ms: 86_400_000,
            max_reminders: 3,
        }
    }
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            prefetch: 128,
            max_attempts: 6,
            retry_delays_ms: vec![1_000, 5_000, 15_000, 30_000],
            membership_ttl_ms: 5_000,
            rebalance_interval_ms: 1_000,
            amqp_heartbeat_s: 5,
            hanging_sweep_interval_ms: 30_000,
            redrive_interval_ms: 60_000,
            max_redrives: 3,
            topic_partitions: 3,
            reconnect_delay_ms: 1_000,
            instance: String::new(),
            processes: ProcessConfig::default(),
        }
    }
}

/// What the role needs: server addresses and the shared CQL session.
pub struct Infra {
    /// Each tenant's RabbitMQ connection.
    pub amqp: amqp::Brokers,
    /// Partitions of every context's commands (`amqp.partitions`).
    pub partitions: u16,
    /// Signs the operation ids of the commands process managers send, as
    /// the edge signs clients' (so `GET /operations/{id}` serves both).
    pub operation_ids: OperationIds,
    /// Each tenant's Kafka cluster.
    pub kafka: Clusters,
    /// Replication of the topics the role creates.
    pub replication: kafka::Replication,
    pub registry_url: String,
    pub session: Arc<Session>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Setup(String),
}

/// Consumes its share of every tenant's context partitions until
/// `shutdown`; reconnects to RabbitMQ when the connection drops (unacked
/// deliveries come back to the partition's next owner, which finds their
/// effects in the event store).
pub async fn run(
    config: &ProcessorConfig,
    infra: &Infra,
    tenants: &[String],
    shutdown: CancellationToken,
) -> Result<(), ProcessorError> {
    if config.retry_delays_ms.is_empty() {
        return Err(ProcessorError::Setup("processor.retry_delays_ms needs at least one tier".into()));
    }
    if infra.partitions == 0 {
        return Err(ProcessorError::Setup("amqp.partitions must be at least 1".into()));
    }
    // Each cluster gets its tenants' topics and a relay topic of its own.
    // Kafka may be restarting while this processor starts: wait for it.
    let ensure = || async {
        for cluster in infra.kafka.of(tenants) {
            let mut topics: Vec<String> = cluster
                .tenants
                .iter()
                .flat_map(|t| catalog::CONTEXTS.iter().map(move |c| names::events_topic(t, c.name)))
                .collect();
            if config.processes.enabled {
                topics.extend(cluster.tenants.iter().map(|t| {
                    dead_letter_topic(&names::events_topic(t, sluice_schemas::patients::CONTEXT), Onboarding::NAME)
                }));
            }
            kafka::ensure_topics(&cluster.brokers, &topics, config.topic_partitions, infra.replication).await?;
            kafka::ensure_relay_topic(&cluster.brokers, infra.partitions, infra.replication).await?;
        }
        Ok::<_, kafka::RelayError>(())
    };
    while let Err(e) = ensure().await {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        warn!(error = %e, "Kafka unavailable at startup; retrying");
        tokio::time::sleep(Duration::from_millis(config.reconnect_delay_ms)).await;
    }
    let instance = if config.instance.is_empty() { default_instance() } else { config.instance.clone() };
    // The CQL store may be restarting too: its statements are prepared once
    // it answers.
    let prepare = || async {
        let pipelines = Pipelines {
            orders: Arc::new(backends_for(infra, &instance, config).await?),
            patients: Arc::new(backends_for(infra, &instance, config).await?),
        };
        let operations = Arc::new(
            CqlOperationStore::new(infra.session.clone(), &instance)
                .await
                .map_err(|e| ProcessorError::Setup(e.to_string()))?,
        );
        let membership = CqlMembership::new(infra.session.clone(), &ownership::group_for(tenants))
            .await
            .map_err(ProcessorError::Setup)?;
        Ok::<_, ProcessorError>((pipelines, operations, membership))
    };
    let Some((pipelines, operations, membership)) = at_startup("the CQL store", config, &shutdown, prepare).await?
    else {
        return Ok(());
    };
    // One process manager per Kafka cluster, over that cluster's tenants.
    let mut process_managers = Vec::new();
    if config.processes.enabled {
        for cluster in infra.kafka.of(tenants) {
            let start =
                || run_onboarding(config.processes.clone(), infra, &cluster, instance.clone(), shutdown.clone());
            let Some(run) = at_startup("the CQL store", config, &shutdown, start).await? else { return Ok(()) };
            process_managers.push(tokio::spawn(run));
        }
    }

    // Each tenant's partitions are consumed on its own connection; a
    // connection that is down holds back only its own tenants.
    let share = Share { membership: &membership, instance: &instance };
    let connections =
        infra.amqp.connections().iter().filter(|broker| broker.tenants.iter().any(|t| tenants.contains(t)));
    futures::future::join_all(connections.map(|broker| {
        let tenants: Vec<String> = broker.tenants.iter().filter(|t| tenants.contains(t)).cloned().collect();
        let on = Connected { config, infra, broker, tenants, pipelines: &pipelines, operations: &operations };
        keep_connected(on, &share, &shutdown)
    }))
    .await;
    if let Err(e) = membership.leave(&instance).await {
        warn!(error = %e, "could not leave the membership; the partitions move when its row expires");
    }
    for task in process_managers {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "process manager ended with an error"),
            Err(e) => warn!(error = %e, "process manager task failed"),
        }
    }
    Ok(())
}

/// What the owners of each context's partitions share.
struct Pipelines {
    orders: Arc<CqlBackends>,
    patients: Arc<CqlBackends>,
}

/// The onboarding process manager on the CQL store and RabbitMQ.
pub type OnboardingRuntime = process::runtime::ProcessRuntime<
    Onboarding,
    CqlEventStore,
    process::timers::CqlTimers,
    process::commands::AmqpCommandSender,
>;

/// The onboarding process manager's runtime (also what `sluice dlt replay`
/// applies its dead letters with).
pub async fn onboarding_runtime(config: &ProcessConfig, infra: &Infra) -> Result<OnboardingRuntime, ProcessorError> {
    let setup = |e: &dyn std::fmt::Display| ProcessorError::Setup(e.to_string());
    let pm = Onboarding {
        timeout_ms: i64::try_from(config.assessment_timeout_ms).unwrap_or(i64::MAX / 4),
        max_reminders: config.max_reminders,
    };
    Ok(process::runtime::ProcessRuntime {
        pm,
        store: CqlEventStore::new(infra.session.clone()).await.map_err(|e| setup(&e))?,
        timers: process::timers::CqlTimers::new(infra.session.clone()).await.map_err(|e| setup(&e))?,
        sender: process::commands::AmqpCommandSender::new(
            infra.amqp.clone(),
            infra.operation_ids.clone(),
            infra.partitions,
        ),
    })
}

/// The onboarding process manager of one Kafka cluster's tenants, ready to
/// run until `shutdown`.
async fn run_onboarding(
    config: ProcessConfig,
    infra: &Infra,
    cluster: &Cluster,
    instance: String,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = Result<(), process::runtime::StepError>>, ProcessorError> {
    let setup = |e: &dyn std::fmt::Display| ProcessorError::Setup(e.to_string());
    let runtime = Arc::new(onboarding_runtime(&config, infra).await?);
    let settings = process::runtime::RunSettings {
        brokers: cluster.brokers.clone(),
        registry_url: infra.registry_url.clone(),
        group: config.consumer_group.clone(),
        topics: cluster.tenants.iter().map(|t| names::events_topic(t, sluice_schemas::patients::CONTEXT)).collect(),
        tenants: cluster.tenants.clone(),
        timer_poll: Duration::from_millis(config.timer_poll_ms.max(10)),
        timer_lease: Duration::from_millis(config.timer_lease_ms),
        instance,
        lanes: sluice_streams::lanes::LaneConfig::default(),
    };
    let dead_letters =
        DeadLetters::new(&cluster.brokers, infra.session.clone(), Onboarding::NAME, 1).await.map_err(|e| setup(&e))?;
    Ok(process::runtime::run(runtime, settings, dead_letters, shutdown))
}

/// How long a connection's tasks get to stop before they are abandoned.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How this processor takes its share of the partitions.
struct Share<'a> {
    membership: &'a CqlMembership,
    instance: &'a str,
}

/// What one connection's consumers work with: the broker and the tenants
/// on it, and what every connection shares.
struct Connected<'a> {
    config: &'a ProcessorConfig,
    infra: &'a Infra,
    broker: &'a amqp::Broker,
    /// The tenants of this processor on `broker`.
    tenants: Vec<String>,
    pipelines: &'a Pipelines,
    operations: &'a Arc<CqlOperationStore>,
}

/// Runs one connection's consumers until `shutdown`, connecting again after
/// the connection ends or cannot be made.
async fn keep_connected(on: Connected<'_>, share: &Share<'_>, shutdown: &CancellationToken) {
    let (label, tenants) = (on.broker.label(), on.tenants.join(","));
    while !shutdown.is_cancelled() {
        match run_connected(&on, share, shutdown).await {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => warn!(connection = %label, %tenants, "RabbitMQ connection ended; reconnecting"),
            Err(e) => warn!(connection = %label, %tenants, error = %e, "RabbitMQ unavailable; reconnecting"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(on.config.reconnect_delay_ms)) => {}
        }
    }
}

/// One connection's life: declare, consume the partitions this processor
/// owns (following the membership), re-drive, until it ends.
async fn run_connected(
    on: &Connected<'_>,
    share: &Share<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ProcessorError> {
    let Connected { config, infra, broker, tenants, pipelines, operations } = on;
    let connection = Arc::new(amqp::connect(&broker.url, share.instance, config.amqp_heartbeat_s).await?);
    // Whether this processor is connected, per connection (no credentials).
    let up = metrics::gauge!("sluice_amqp_connected", "connection" => broker.label(), "role" => "processor");
    up.set(1.0);
    let _down = DownOnDrop(up);
    let channel = connection.create_channel().await?;
    for tenant in tenants {
        for context in catalog::CONTEXTS {
            amqp::declare_topology(&channel, tenant, context.name, infra.partitions).await?;
        }
    }
    amqp::close_quietly(channel.close(200, "declared".into())).await;
    let settings = ConsumerSettings {
        prefetch: config.prefetch,
        max_attempts: config.max_attempts,
        retry_delays_ms: config.retry_delays_ms.clone(),
        max_redrives: config.max_redrives,
        hanging_sweep: Duration::from_millis(config.hanging_sweep_interval_ms.max(100)),
        instance: share.instance.to_owned(),
    };
    // Stops this connection's tasks when the role stops or one task ends.
    let local = shutdown.child_token();
    let mut upkeep = JoinSet::new();
    if config.max_redrives > 0 {
        for tenant in tenants {
            for context in catalog::CONTEXTS {
                let (connection, tenant, context, stop, operations) =
                    (connection.clone(), tenant.clone(), context.name, local.clone(), Arc::clone(operations));
                let (interval, max, partitions) =
                    (Duration::from_millis(config.redrive_interval_ms), config.max_redrives, infra.partitions);
                upkeep.spawn(async move {
                    let target = amqp::redrive::Target { tenant: &tenant, context, partitions };
                    amqp::redrive::redrive_loop(&connection, target, interval, max, operations.as_ref(), &stop).await;
                });
            }
        }
    }

    // The partitions consumed now, each with the token that releases it and
    // a generation (a released partition can be taken again before its
    // previous consumer has finished stopping).
    let mut owned: HashMap<PartitionRef, (CancellationToken, u64)> = HashMap::new();
    let mut consumers: JoinSet<(PartitionRef, u64, lapin::Result<()>)> = JoinSet::new();
    let mut generation = 0u64;
    let ttl = Duration::from_millis(config.membership_ttl_ms.max(1_000));
    let mut tick = tokio::time::interval(Duration::from_millis(config.rebalance_interval_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = local.cancelled() => break Ok(()),
            _ = tick.tick() => {
                // Without a fresh view of the members, keep what is owned:
                // the broker keeps each partition exclusive anyway.
                if let Err(e) = share.membership.renew(share.instance, ttl).await {
                    warn!(error = %e, "could not renew the membership");
                    continue;
                }
                let members = match share.membership.members().await {
                    Ok(members) => members,
                    Err(e) => {
                        warn!(error = %e, "could not read the membership");
                        continue;
                    }
                };
                let wanted = ownership::assign(&members, share.instance, tenants, infra.partitions);
                owned.retain(|partition, (token, _)| {
                    let keep = wanted.contains(partition);
                    if !keep {
                        info!(queue = %partition.queue(), "releasing partition");
                        token.cancel();
                    }
                    keep
                });
                for partition in wanted {
                    if owned.contains_key(&partition) {
                        continue;
                    }
                    generation += 1;
                    let token = local.child_token();
                    owned.insert(partition.clone(), (token.clone(), generation));
                    let connection = connection.clone();
                    let consume = consume_partition(pipelines, &connection, partition.clone(), settings.clone(), token)?;
                    let this = generation;
                    consumers.spawn(async move { (partition, this, consume.await) });
                }
                metrics::gauge!("sluice_partitions_owned").set(owned.len() as f64);
            }
            Some(ended) = consumers.join_next() => match ended {
                Ok((partition, this, result)) => {
                    if owned.get(&partition).is_some_and(|(_, g)| *g == this) {
                        // Ended without being released: taken again at the
                        // next tick, unless the connection is gone.
                        owned.remove(&partition);
                    }
                    if let Err(e) = result {
                        break Err(ProcessorError::from(e));
                    }
                }
                Err(e) => break Err(ProcessorError::Setup(e.to_string())),
            },
            Some(_) = upkeep.join_next() => break Ok(()),
        }
    };
    // In-flight commands finish first; unstarted ones go back to their queues.
    // A task stuck on a connection the broker dropped (lapin has no timeouts)
    // is given up after a while: like a crash, which loses nothing (the
    // journal and the next owner finish its work).
    local.cancel();
    let drained = async {
        while consumers.join_next().await.is_some() {}
        while upkeep.join_next().await.is_some() {}
    };
    if tokio::time::timeout(STOP_GRACE, drained).await.is_err() {
        warn!("partition consumers did not stop in time; abandoning them");
        consumers.abort_all();
        upkeep.abort_all();
    }
    amqp::close_quietly(connection.close(200, "bye".into())).await;
    result
}

/// Sets a gauge to 0 when dropped (the connection's life has ended).
struct DownOnDrop(metrics::Gauge);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        self.0.set(0.0);
    }
}

/// The consumer of one partition, on its context's pipeline.
fn consume_partition<'a>(
    pipelines: &Pipelines,
    connection: &Arc<Connection>,
    partition: PartitionRef,
    settings: ConsumerSettings,
    stop: CancellationToken,
) -> Result<futures::future::BoxFuture<'a, lapin::Result<()>>, ProcessorError> {
    let connection = connection.clone();
    Ok(match partition.context {
        orders::Orders::CONTEXT => {
            let backends = pipelines.orders.clone();
            Box::pin(async move {
                amqp::consume_partition::<orders::Orders, _, _, _, _>(&connection, partition, backends, settings, stop)
                    .await
            })
        }
        patients::Patients::CONTEXT => {
            let backends = pipelines.patients.clone();
            Box::pin(async move {
                amqp::consume_partition::<patients::Patients, _, _, _, _>(
                    &connection,
                    partition,
                    backends,
                    settings,
                    stop,
                )
                .await
            })
        }
        other => return Err(ProcessorError::Setup(format!("no aggregate registered for context {other}"))),
    })
}

type CqlBackends = Backends<CqlEventStore, CqlJournal, CqlOperationStore, KafkaRelays>;

/// `<hostname>-<pid>`: tells processes on one machine and across machines apart.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// Retries a startup step while a server is briefly unavailable (a
/// processor restarted during a database restart must come up, not exit),
/// for at most two minutes; `None` once shut down.
async fn at_startup<T, F, Fut>(
    what: &str,
    config: &ProcessorConfig,
    shutdown: &CancellationToken,
    mut step: F,
) -> Result<Option<T>, ProcessorError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProcessorError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match step().await {
            Ok(value) => return Ok(Some(value)),
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(error = %e, "{what} unavailable at startup; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_millis(config.reconnect_delay_ms)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

async fn backends_for(infra: &Infra, instance: &str, config: &ProcessorConfig) -> Result<CqlBackends, ProcessorError> {
    let setup = |e: &dyn std::fmt::Display| ProcessorError::Setup(e.to_string());
    Ok(Backends {
        schemas: sluice_schemas::catalog::CommandSchemas::load(),
        store: CqlEventStore::new(infra.session.clone()).await.map_err(|e| setup(&e))?,
        journal: CqlJournal::new(infra.session.clone()).await.map_err(|e| setup(&e))?,
        operations: CqlOperationStore::new(infra.session.clone(), instance).await.map_err(|e| setup(&e))?,
        relays: KafkaRelays::new(infra.kafka.clone(), &infra.registry_url).map_err(|e| setup(&e))?,
        retry_delays_ms: config.retry_delays_ms.clone(),
    })
}
