//! `sluice serve`: runs one role or all of them in this process, sharing one
//! shutdown token; SIGTERM/Ctrl-C cancel it, and each role drains what it has
//! in flight before returning.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use lapin::{Connection, ConnectionProperties};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use sluice_ingest::queue::{AmqpCommandQueue, AmqpQueueSettings, TenantConnection, TenantQueues};
use sluice_ingest::AppState;
use sluice_projections::orders::Orders;
use sluice_projections::runner::Projector;
use sluice_projections::store::ReadModels;
use sluice_schemas::catalog;
use sluice_schemas::operation_id::OperationIds;
use sluice_schemas::{cql, names};
use sluice_streams::dead_letter::dead_letter_topic;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::settings::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Ingest,
    Processor,
    Projector,
    All,
}

impl Role {
    fn includes(self, other: Role) -> bool {
        self == Role::All || self == other
    }
}

/// The keyspace, a table or a column the code needs is not in the CQL store:
/// `sluice schemas apply` creates them. Nothing else does, so a mistyped
/// keyspace name fails here rather than start an empty store of its own.
#[derive(Debug, thiserror::Error)]
#[error("the CQL store lacks {0}: create the schema with `sluice schemas apply` (make schema)")]
pub struct SchemaMissing(pub String);

async fn session(settings: &Settings) -> anyhow::Result<Session> {
    SessionBuilder::new()
        .known_nodes(&settings.cql.nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .with_context(|| format!("connecting to the CQL store at {:?}", settings.cql.nodes))
}

/// Connects to the CQL store, on the configured keyspace, once it holds
/// every table and column the code uses ([`SchemaMissing`] otherwise).
pub async fn connect_cql(settings: &Settings) -> anyhow::Result<Arc<Session>> {
    let session = session(settings).await?;
    let keyspace = &settings.cql.keyspace;
    let tables = table_names(&session, keyspace).await?;
    if tables.is_empty() {
        return Err(SchemaMissing(format!("keyspace {keyspace}")).into());
    }
    if let Some(table) = cql::table_names().into_iter().find(|t| !tables.contains(t)) {
        return Err(SchemaMissing(format!("table {keyspace}.{table}")).into());
    }
    for (table, column, _) in cql::ADDED_COLUMNS {
        if !has_column(&session, keyspace, table, column).await? {
            return Err(SchemaMissing(format!("column {column} of {keyspace}.{table}")).into());
        }
    }
    session.use_keyspace(keyspace, false).await.context("using the keyspace")?;
    Ok(Arc::new(session))
}

/// What `sluice schemas apply` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SchemaReport {
    pub keyspace: String,
    pub tables_created: Vec<String>,
    pub columns_added: Vec<String>,
}

/// Creates the keyspace, the tables and the columns the code needs where
/// missing (idempotent; safe while roles run). Read-model tables of a
/// projection version are the projector's, created with their version.
pub async fn apply_schema(settings: &Settings) -> anyhow::Result<SchemaReport> {
    let session = session(settings).await?;
    let keyspace = &settings.cql.keyspace;
    session
        .query_unpaged(cql::create_keyspace(keyspace, settings.cql.replication_factor), ())
        .await
        .context("creating the keyspace")?;
    let before = table_names(&session, keyspace).await?;
    session.use_keyspace(keyspace, false).await.context("using the keyspace")?;
    for statement in cql::create_tables() {
        session.query_unpaged(statement, ()).await.context("creating tables")?;
    }
    let tables_created = cql::table_names().into_iter().filter(|t| !before.contains(t)).collect();
    let mut columns_added = Vec::new();
    for (table, column, cql_type) in cql::ADDED_COLUMNS {
        if has_column(&session, keyspace, table, column).await? {
            continue;
        }
        // Two applies at once may both add it: the second's ALTER fails,
        // and the schema, read again, says whether the column is there.
        if let Err(e) = session.query_unpaged(cql::add_column(table, column, cql_type), ()).await {
            if !has_column(&session, keyspace, table, column).await? {
                return Err(e).with_context(|| format!("adding column {column} to {table}"));
            }
        }
        info!(table, column, "added a column the table lacked");
        columns_added.push(format!("{table}.{column}"));
    }
    Ok(SchemaReport { keyspace: keyspace.clone(), tables_created, columns_added })
}

async fn table_names(session: &Session, keyspace: &str) -> anyhow::Result<Vec<String>> {
    let rows = session
        .query_unpaged("SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?", (keyspace,))
        .await
        .context("reading the schema")?
        .into_rows_result()
        .context("reading the schema")?;
    let names = rows.rows::<(String,)>().context("reading the schema")?;
    names.map(|r| r.map(|(name,)| name).context("reading the schema")).collect()
}

async fn has_column(session: &Session, keyspace: &str, table: &str, column: &str) -> anyhow::Result<bool> {
    let rows = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
            (keyspace, table, column),
        )
        .await
        .context("reading the schema")?
        .into_rows_result()
        .context("reading the schema")?
        .rows_num();
    Ok(rows > 0)
}

/// Connects to the RabbitMQ at `url` (a tenant's, or `amqp.url`).
pub async fn connect_amqp(url: &str) -> anyhow::Result<Arc<Connection>> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", sluice_telemetry::url_without_credentials(url)))?;
    Ok(Arc::new(connection))
}

/// Declares the queues of every tenant's contexts (idempotent), each on its
/// tenant's connection.
pub async fn declare_topology(settings: &Settings, tenants: &[String]) -> anyhow::Result<()> {
    for connection in settings.amqp_connections() {
        let on_this: Vec<&String> = connection.tenants.iter().filter(|t| tenants.contains(t)).collect();
        if on_this.is_empty() {
            continue;
        }
        let names = connection.tenants.join(", ");
        let amqp = connect_amqp(&connection.url).await.with_context(|| format!("the connection of tenants {names}"))?;
        let channel = amqp.create_channel().await?;
        for tenant in on_this {
            for context in catalog::CONTEXTS {
                sluice_processors::amqp::declare_topology(&channel, tenant, context.name, settings.amqp.partitions)
                    .await?;
            }
        }
        amqp.close(200, "declared".into()).await?;
    }
    Ok(())
}

/// Moves commands left in the queues of the topology before partitions (an
/// upgrade) to their partition queues, and deletes those queues. Found
/// through the management API of each tenant's connection, so an
/// up-to-date broker sees no probe.
async fn move_unpartitioned(settings: &Settings, tenants: &[String]) -> anyhow::Result<()> {
    for broker in settings.amqp_connections() {
        let management = crate::ops::management::Management::new(&broker.url, None)?;
        let existing = management.queue_names().await?;
        let mut connection = None;
        for tenant in broker.tenants.iter().filter(|t| tenants.contains(t)) {
            for context in catalog::CONTEXTS {
                let queues = sluice_processors::amqp::topology::unpartitioned_queues(&existing, tenant, context.name);
                if queues.is_empty() {
                    continue;
                }
                if connection.is_none() {
                    connection = Some(connect_amqp(&broker.url).await?);
                }
                let connection = connection.as_ref().expect("connected above");
                let partitions = settings.amqp.partitions;
                let moved = sluice_processors::amqp::topology::migrate_unpartitioned(
                    connection,
                    tenant,
                    context.name,
                    partitions,
                    &queues,
                )
                .await
                .map_err(anyhow::Error::msg)?;
                info!(tenant, context = context.name, moved, "commands moved from the unpartitioned queues");
            }
        }
        if let Some(connection) = connection {
            let _ = connection.close(200, "moved".into()).await;
        }
    }
    Ok(())
}

/// The events topics the orders projection reads (its live group, replays
/// and rebuilds, lag): the `orders` topic of every tenant. Other contexts'
/// topics have projections of their own ([`context_topics`]).
pub fn events_topics(tenants: &[String]) -> Vec<String> {
    context_topics(tenants, sluice_schemas::orders::CONTEXT)
}

/// The events topics of one context of every tenant.
pub fn context_topics(tenants: &[String], context: &str) -> Vec<String> {
    tenants.iter().map(|t| names::events_topic(t, context)).collect()
}

/// Creates the events topics a projection reads and its dead-letter topics,
/// each on its tenant's Kafka cluster.
pub async fn ensure_projection_topics(settings: &Settings, topics: &[String], projection: &str) -> anyhow::Result<()> {
    for cluster in settings.kafka_clusters().iter() {
        let on_cluster: Vec<&String> = topics
            .iter()
            .filter(|t| {
                sluice_projections::apply::tenant_of(t)
                    .is_some_and(|tenant| cluster.tenants.iter().any(|c| c == tenant))
            })
            .collect();
        if on_cluster.is_empty() {
            continue;
        }
        let mut all: Vec<String> = on_cluster.iter().map(|t| t.to_string()).collect();
        all.extend(on_cluster.iter().map(|t| dead_letter_topic(t, projection)));
        let partitions = settings.processor.topic_partitions;
        sluice_processors::kafka::ensure_topics(&cluster.brokers, &all, partitions, settings.kafka.replication())
            .await
            .with_context(|| format!("creating topics at {}", cluster.brokers))?;
    }
    Ok(())
}

/// Retries a startup step while a server is briefly unavailable (a role
/// restarted during a broker or database restart must come up, not exit),
/// for at most two minutes or until shutdown.
async fn until_available<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut step: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut delay = Duration::from_millis(250);
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            // A missing schema is not a server starting up: say so now.
            Err(e) if e.is::<SchemaMissing>() => return Err(e),
            Err(e) if tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() => {
                warn!(error = %e, "{what} unavailable at startup; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The dev operation secret and the demo keys are published with sluice: an
/// edge other machines can reach must not take them (anyone could send as
/// the tenant, or forge operation ids), unless `ingest.demo` says this is
/// the demo stack.
fn refuse_published_secrets_in_public(settings: &Settings) -> anyhow::Result<()> {
    let Ok(addr) = settings.ingest.http_addr.parse::<std::net::SocketAddr>() else {
        return Ok(()); // not an address: binding it fails with its own message
    };
    if addr.ip().is_loopback() || settings.ingest.demo {
        return Ok(());
    }
    let mut published = Vec::new();
    if settings.ingest.operation_secret == sluice_ingest::DEV_OPERATION_SECRET {
        published.push("the dev operation secret (ingest.operation_secret)".to_owned());
    }
    for tenant in &settings.tenants {
        for key in tenant.keys.iter().filter(|k| sluice_ingest::DEMO_KEY_SHA256.contains(&k.sha256.as_str())) {
            published.push(format!("the demo key {:?} of tenant {}", key.name, tenant.name));
        }
    }
    if !published.is_empty() {
        bail!(
            "refusing to serve on {addr}, which other machines can reach, with {}: they are published with sluice. \
             Set SLUICE_INGEST__OPERATION_SECRET and keys of your own, or listen on 127.0.0.1; \
             for the demo stack only, set SLUICE_INGEST__DEMO=true",
            published.join(" and ")
        );
    }
    Ok(())
}

/// Runs `role` until `shutdown` is cancelled. `ready` receives the address
/// the edge listens on (tests bind port 0).
pub async fn serve(
    settings: Settings,
    role: Role,
    shutdown: CancellationToken,
    mut ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> anyhow::Result<()> {
    if settings.tenants.is_empty() {
        bail!("no tenants configured: add [[tenants]] to the config file");
    }
    let problems = sluice_ingest::auth::validate_tenants(&settings.tenants);
    if !problems.is_empty() {
        bail!("invalid tenants: {}", problems.join("; "));
    }
    if role.includes(Role::Ingest) {
        refuse_published_secrets_in_public(&settings)?;
    }
    let session = until_available("the CQL store", &shutdown, || connect_cql(&settings)).await?;
    let tenants = settings.tenant_names();
    let mut roles = JoinSet::new();

    if role.includes(Role::Ingest) {
        // The edge declares the topology too, so its first 202 does not wait
        // for a processor to have started once.
        until_available("RabbitMQ", &shutdown, || declare_topology(&settings, &tenants)).await?;
    }

    if role.includes(Role::Processor) {
        if let Err(e) = move_unpartitioned(&settings, &tenants).await {
            warn!(error = %e, "could not look for commands left in queues of the unpartitioned topology");
        }
        let infra = sluice_processors::Infra {
            amqp: settings.amqp_connections(),
            partitions: settings.amqp.partitions,
            operation_ids: OperationIds::new(&settings.ingest.operation_secret),
            kafka: settings.kafka_clusters(),
            replication: settings.kafka.replication(),
            registry_url: settings.registry.url.clone(),
            session: session.clone(),
        };
        let (config, tenants, shutdown) = (settings.processor.clone(), tenants.clone(), shutdown.clone());
        roles.spawn(async move {
            sluice_processors::run(&config, &infra, &tenants, shutdown).await.context("processor role")
        });
    }

    // Every role records metrics, served on the admin address
    // (`metrics.addr`) when set, never on the public edge.
    let _ = sluice_ingest::metrics::handle();
    if let Some(addr) = &settings.metrics.addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics address {addr}"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                ([("content-type", "text/plain; version=0.0.4")], sluice_ingest::metrics::render())
            }),
        );
        let shutdown = shutdown.clone();
        roles.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .context("metrics listener")
        });
    }
    if !role.includes(Role::Ingest) {
        // Nothing else listens: tell the caller the roles are started.
        drop(ready.take());
    }

    if role.includes(Role::Projector) {
        let name = &settings.projector.name;
        let topics = events_topics(&tenants);
        until_available("Kafka", &shutdown, || ensure_projection_topics(&settings, &topics, name)).await?;
        let patient_topics = context_topics(&tenants, sluice_schemas::patients::CONTEXT);
        until_available("Kafka", &shutdown, || {
            ensure_projection_topics(&settings, &patient_topics, &settings.projector.patients_name)
        })
        .await?;
        let store = Arc::new(ReadModels::new(session.clone(), &settings.projector).await?);
        // Each projection runs once per Kafka cluster, over its tenants' topics.
        for cluster in settings.kafka_clusters().of(&tenants) {
            let projector = Projector {
                projection: Arc::new(Orders { name: settings.projector.name.clone() }),
                config: settings.projector.clone(),
                brokers: cluster.brokers.clone(),
                registry_url: settings.registry.url.clone(),
                topics: events_topics(&cluster.tenants),
                store: store.clone(),
            };
            let stop = shutdown.clone();
            roles.spawn(async move { projector.run(stop).await.context("projector role") });

            let patients_projection = Projector {
                projection: Arc::new(store.patients().clone()),
                config: settings.projector.clone(),
                brokers: cluster.brokers.clone(),
                registry_url: settings.registry.url.clone(),
                topics: context_topics(&cluster.tenants, sluice_schemas::patients::CONTEXT),
                store: store.clone(),
            };
            let stop = shutdown.clone();
            roles.spawn(async move { patients_projection.run(stop).await.context("patients projection") });
        }
    }

    if role.includes(Role::Ingest) {
        // One queue per connection; each holds its URL and reconnects by
        // itself. A connection missing at startup still fails startup,
        // naming its tenants.
        let mut connections = Vec::new();
        for connection in settings.amqp_connections() {
            let label = sluice_telemetry::url_without_credentials(&connection.url);
            let queue = AmqpCommandQueue::connect(AmqpQueueSettings::for_edge(&connection.url, &settings.ingest))
                .await
                .with_context(|| {
                    format!("connecting the edge to RabbitMQ at {label} (tenants {})", connection.tenants.join(", "))
                })?;
            connections.push(TenantConnection { label, tenants: connection.tenants, queue: Arc::new(queue) });
        }
        let queue = TenantQueues::new(connections);
        let reads = Arc::new(ReadModels::new(session.clone(), &settings.projector).await?);
        let state = Arc::new(
            AppState::new(settings.ingest.clone(), &settings.tenants, settings.amqp.partitions, Arc::new(queue), reads)
                .map_err(anyhow::Error::msg)?,
        );
        let listener = tokio::net::TcpListener::bind(&settings.ingest.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.ingest.http_addr))?;
        let addr = listener.local_addr()?;
        info!(%addr, "edge listening");
        if let Some(ready) = ready {
            let _ = ready.send(addr);
        }
        let request_timeout = std::time::Duration::from_millis(settings.ingest.request_timeout_ms.max(1));
        let listener =
            sluice_ingest::limits::CappedListener::new(listener, settings.ingest.max_connections, request_timeout * 2);
        let app = sluice_ingest::routes::router(state);
        let shutdown = shutdown.clone();
        roles.spawn(async move {
            sluice_ingest::limits::serve(listener, app, request_timeout, shutdown).await;
            Ok(())
        });
    }

    // The first role to fail stops the others.
    let mut result = Ok(());
    while let Some(joined) = roles.join_next().await {
        let outcome = joined.context("role task panicked").and_then(|r| r);
        if let Err(e) = outcome {
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}
