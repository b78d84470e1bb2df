//! The command side: competing consumers of the work queues.
//!
//! - [`domain`]: the handler API (pure `decide` / `evolve`).
//! - [`orders`]: the demo context's rules.
//! - [`pipeline`]: one command from delivery to the decision to ack.
//! - [`event_store`]: streams in the CQL store, LWT appends.
//! - [`operations`]: operation records the edge serves.
//! - [`kafka`]: idempotent producer, Avro via the registry, topics.
//! - [`amqp`]: topology, consumer loop, retries and dead letters.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod domain;
pub mod event_store;
pub mod kafka;
pub mod operations;
pub mod orders;
pub mod pipeline;

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use scylla::client::session::Session;
use serde::Deserialize;
use sluice_schemas::{catalog, names};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::ConsumerSettings;
use crate::domain::Aggregate;
use crate::event_store::CqlEventStore;
use crate::kafka::KafkaPublisher;
use crate::operations::CqlOperationStore;
use crate::pipeline::Pipeline;

/// Settings of the processor role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Unacked deliveries per queue, processed concurrently (default 32).
    pub prefetch: u16,
    /// Attempts before a transiently failing command is dead-lettered (default 5).
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `retry_max_ms` (default 200).
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Partitions of a newly created events topic (default 3).
    pub topic_partitions: i32,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self { prefetch: 32, max_attempts: 5, retry_base_ms: 200, retry_max_ms: 5_000, topic_partitions: 3 }
    }
}

/// Connections the role needs, opened once by the binary.
pub struct Infra {
    pub amqp: Arc<Connection>,
    pub kafka_brokers: String,
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

/// Declares the topology and topics of every tenant's contexts, then consumes
/// all their queues until `shutdown`.
pub async fn run(
    config: &ProcessorConfig,
    infra: &Infra,
    tenants: &[String],
    shutdown: CancellationToken,
) -> Result<(), ProcessorError> {
    let channel = infra.amqp.create_channel().await?;
    let mut topics = Vec::new();
    for tenant in tenants {
        for context in catalog::CONTEXTS {
            amqp::declare_topology(&channel, tenant, context.name).await?;
            topics.push(names::events_topic(tenant, context.name));
        }
    }
    kafka::ensure_topics(&infra.kafka_brokers, &topics, config.topic_partitions)
        .await
        .map_err(|e| ProcessorError::Setup(e.to_string()))?;

    let settings = ConsumerSettings {
        prefetch: config.prefetch,
        max_attempts: config.max_attempts,
        retry_base: Duration::from_millis(config.retry_base_ms),
        retry_max: Duration::from_millis(config.retry_max_ms),
    };
    let mut consumers = JoinSet::new();
    for tenant in tenants {
        for context in catalog::CONTEXTS {
            match context.name {
                orders::Orders::CONTEXT => {
                    let pipeline = Arc::new(pipeline_for::<orders::Orders>(infra).await?);
                    let (amqp, tenant, settings, shutdown) =
                        (infra.amqp.clone(), tenant.clone(), settings.clone(), shutdown.clone());
                    consumers.spawn(async move { amqp::consume(&amqp, tenant, pipeline, settings, shutdown).await });
                }
                other => return Err(ProcessorError::Setup(format!("no aggregate registered for context {other}"))),
            }
        }
    }
    while let Some(result) = consumers.join_next().await {
        result.map_err(|e| ProcessorError::Setup(e.to_string()))??;
    }
    Ok(())
}

type CqlPipeline<A> = Pipeline<A, CqlEventStore, KafkaPublisher, CqlOperationStore>;

async fn pipeline_for<A: Aggregate>(infra: &Infra) -> Result<CqlPipeline<A>, ProcessorError> {
    let setup = |e: &dyn std::fmt::Display| ProcessorError::Setup(e.to_string());
    let store = CqlEventStore::new(infra.session.clone()).await.map_err(|e| setup(&e))?;
    let operations = CqlOperationStore::new(infra.session.clone()).await.map_err(|e| setup(&e))?;
    let publisher = KafkaPublisher::new(&infra.kafka_brokers, &infra.registry_url).map_err(|e| setup(&e))?;
    Ok(Pipeline::new(store, publisher, operations))
}
