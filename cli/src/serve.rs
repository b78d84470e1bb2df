//! `sluice serve`: runs one role or all of them in this process, sharing one
//! shutdown token; SIGTERM/Ctrl-C cancel it, and each role drains what it has
//! in flight before returning.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use lapin::{Connection, ConnectionProperties};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use sluice_ingest::auth::Keys;
use sluice_ingest::operation_id::OperationIds;
use sluice_ingest::queue::AmqpCommandQueue;
use sluice_ingest::AppState;
use sluice_projections::runner::OrdersProjection;
use sluice_projections::store::ReadModels;
use sluice_schemas::catalog::{self, CommandSchemas};
use sluice_schemas::{cql, names};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

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

/// Connects to the CQL store and creates the keyspace and tables if missing.
pub async fn connect_cql(settings: &Settings) -> anyhow::Result<Arc<Session>> {
    let session = SessionBuilder::new()
        .known_nodes(&settings.cql.nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .with_context(|| format!("connecting to the CQL store at {:?}", settings.cql.nodes))?;
    session
        .query_unpaged(cql::create_keyspace(&settings.cql.keyspace, settings.cql.replication_factor), ())
        .await
        .context("creating the keyspace")?;
    session.use_keyspace(&settings.cql.keyspace, false).await.context("using the keyspace")?;
    for statement in cql::create_tables() {
        session.query_unpaged(statement, ()).await.context("creating tables")?;
    }
    Ok(Arc::new(session))
}

pub async fn connect_amqp(settings: &Settings) -> anyhow::Result<Arc<Connection>> {
    let connection = Connection::connect(&settings.amqp.url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    Ok(Arc::new(connection))
}

/// Runs `role` until `shutdown` is cancelled. `ready` receives the address
/// the edge listens on (tests bind port 0).
pub async fn serve(
    settings: Settings,
    role: Role,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> anyhow::Result<()> {
    if settings.tenants.is_empty() {
        bail!("no tenants configured: add [[tenants]] to the config file");
    }
    let session = connect_cql(&settings).await?;
    let tenants = settings.tenant_names();
    let mut roles = JoinSet::new();

    let amqp = if role.includes(Role::Ingest) || role.includes(Role::Processor) {
        let amqp = connect_amqp(&settings).await?;
        // The edge declares the topology too, so its first 202 does not wait
        // for a processor to have started once.
        let channel = amqp.create_channel().await?;
        for tenant in &tenants {
            for context in catalog::CONTEXTS {
                sluice_processors::amqp::declare_topology(&channel, tenant, context.name).await?;
            }
        }
        Some(amqp)
    } else {
        None
    };

    if role.includes(Role::Processor) {
        let infra = sluice_processors::Infra {
            amqp: amqp.clone().expect("connected above"),
            kafka_brokers: settings.kafka.brokers.clone(),
            registry_url: settings.registry.url.clone(),
            session: session.clone(),
        };
        let (config, tenants, shutdown) = (settings.processor.clone(), tenants.clone(), shutdown.clone());
        roles.spawn(async move {
            sluice_processors::run(&config, &infra, &tenants, shutdown).await.context("processor role")
        });
    }

    if role.includes(Role::Projector) {
        let topics: Vec<String> = tenants.iter().map(|t| names::events_topic(t, "orders")).collect();
        sluice_processors::kafka::ensure_topics(&settings.kafka.brokers, &topics, settings.processor.topic_partitions)
            .await
            .context("creating topics")?;
        let store = Arc::new(ReadModels::new(session.clone()).await?);
        let projection =
            OrdersProjection::new(&settings.kafka.brokers, &settings.projector.group, &settings.registry.url, &topics, store)?;
        let shutdown = shutdown.clone();
        roles.spawn(async move { projection.run(shutdown).await.context("projector role") });
    }

    if role.includes(Role::Ingest) {
        let state = Arc::new(AppState {
            keys: Keys::new(&settings.tenants).map_err(anyhow::Error::msg)?,
            schemas: CommandSchemas::load(),
            operation_ids: OperationIds::new(&settings.ingest.operation_secret),
            queue: Arc::new(AmqpCommandQueue::new(
                amqp.clone().expect("connected above"),
                names::COMMAND_EXCHANGE,
                Duration::from_millis(settings.ingest.confirm_timeout_ms),
                settings.ingest.max_in_flight,
            )),
            reads: Arc::new(ReadModels::new(session.clone()).await?),
            config: settings.ingest.clone(),
        });
        let listener = tokio::net::TcpListener::bind(&settings.ingest.http_addr)
            .await
            .with_context(|| format!("binding {}", settings.ingest.http_addr))?;
        let addr = listener.local_addr()?;
        info!(%addr, "edge listening");
        if let Some(ready) = ready {
            let _ = ready.send(addr);
        }
        let app = sluice_ingest::routes::router(state);
        let shutdown = shutdown.clone();
        roles.spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await.context("ingest role")
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
