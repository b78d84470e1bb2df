//! The raw ceilings: what RabbitMQ, Kafka and the CQL store do on their own
//! on this machine, driven with the client libraries the roles use, messages
//! of the size the pipeline moves, and as many operations in flight as the
//! processors have (their prefetch). No sluice role runs meanwhile.
//!
//! Each phase runs for a fixed time; every operation is awaited to its
//! durable end (confirm, delivery report, write), as the pipeline awaits it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use scylla::client::session::Session;
use scylla::value::CqlTimestamp;
use sluice_schemas::{cql, names};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::report::{RawReport, Throughput};
use super::Bench;

/// The bounded context name of the raw phase's queue and topic
/// (`<tenant>.raw.commands`, `<tenant>.raw.events`).
pub const RAW_CONTEXT: &str = "raw";

/// Names of what the raw phases create, for the cleanup.
pub fn raw_queue(tenant: &str) -> String {
    names::command_queue(tenant, RAW_CONTEXT)
}

pub fn raw_topic(tenant: &str) -> String {
    names::events_topic(tenant, RAW_CONTEXT)
}

/// The copy of the read model's order table the raw inserts go to.
pub fn raw_orders_table(projection: &str) -> String {
    format!("{projection}_raw_by_id_v1")
}

/// The copy of the event store table the raw LWT inserts go to.
pub fn raw_events_table(projection: &str) -> String {
    format!("{projection}_raw_events")
}

pub async fn run(bench: &Bench, step: &dyn Fn(&str)) -> anyhow::Result<RawReport> {
    let duration = bench.plan.raw_duration;
    step("raw: RabbitMQ publish with confirms");
    let (amqp_publish, published) = amqp_publish(bench, duration).await?;
    step("raw: RabbitMQ consume with acks");
    let amqp_consume = amqp_consume(bench, duration, published).await?;
    step("raw: Kafka idempotent produce");
    let kafka_produce = kafka_produce(bench, duration).await?;
    step("raw: CQL prepared inserts");
    let cql_insert = cql_insert(bench, duration).await?;
    step("raw: CQL inserts IF NOT EXISTS");
    let cql_lwt_insert = cql_lwt_insert(bench, duration).await?;
    Ok(RawReport {
        concurrency: bench.plan.concurrency,
        amqp_publish,
        amqp_consume,
        kafka_produce,
        cql_insert,
        cql_lwt_insert,
        command_bytes: bench.workload.command_bytes().len(),
        event_bytes: bench.workload.event_bytes()?.len(),
    })
}

/// Runs `concurrency` copies of `worker` until `duration` has passed; each
/// returns how many operations it completed. The time counts until the last
/// one finished its last operation.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, worker: F) -> anyhow::Result<Throughput>
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        workers.spawn(worker(deadline));
    }
    let mut count = 0;
    while let Some(done) = workers.join_next().await {
        count += done.context("a raw worker panicked")??;
    }
    Ok(Throughput::new(count, started.elapsed().as_secs_f64()))
}

/// Longest any single raw operation may take: a stalled server fails the
/// run instead of hanging it.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to RabbitMQ within `OPERATION_TIMEOUT`.
pub async fn amqp_connect(url: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name("sluice-bench".into());
    tokio::time::timeout(OPERATION_TIMEOUT, Connection::connect(url, properties))
        .await
        .context("RabbitMQ did not complete the connection handshake within 30 s")?
        .context("connecting to RabbitMQ")
}

/// Persistent, mandatory publishes through the command exchange into a
/// quorum queue declared with the work queues' own arguments, with the edge's
/// properties and headers. Returns the rate and how many were published.
async fn amqp_publish(bench: &Bench, duration: Duration) -> anyhow::Result<(Throughput, u64)> {
    let tenant = bench.workload.tenant();
    let connection = amqp_connect(&bench.settings.amqp.url).await?;
    let channel = connection.create_channel().await?;
    sluice_processors::amqp::declare_topology(&channel, tenant, RAW_CONTEXT, &[])
        .await
        .context("declaring the raw queue")?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = Arc::new(bench.workload.command_bytes());
    let routing_key = names::routing_key(tenant, RAW_CONTEXT);
    let (source, tenant) = (bench.workload.source().to_owned(), tenant.to_owned());
    let rate = closed_loop(bench.plan.concurrency, duration, |deadline| {
        let (channel, body, routing_key, source, tenant) =
            (channel.clone(), body.clone(), routing_key.clone(), source.clone(), tenant.clone());
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let mut headers = FieldTable::default();
                for (name, value) in [
                    ("cloudEvents:specversion", "1.0"),
                    ("cloudEvents:id", id.as_str()),
                    ("cloudEvents:source", source.as_str()),
                    ("cloudEvents:type", sluice_schemas::orders::SUBMIT_ORDER),
                    ("sluice-tenant", tenant.as_str()),
                ] {
                    headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
                }
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/cloudevents+json".into())
                    .with_message_id(id.as_str().into())
                    .with_app_id("sluice-bench".into())
                    .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
                    .with_headers(headers);
                let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                let publish = async {
                    channel
                        .basic_publish(
                            names::COMMAND_EXCHANGE.into(),
                            routing_key.as_str().into(),
                            options,
                            &body,
                            properties,
                        )
                        .await?
                        .await
                };
                let confirm =
                    tokio::time::timeout(OPERATION_TIMEOUT, publish).await.context("no confirm within 30 s")??;
                if !matches!(confirm, Confirmation::Ack(None)) {
                    bail!("RabbitMQ did not take a raw publish: {confirm:?}");
                }
                n += 1;
            }
            Ok(n)
        }
    })
    .await?;
    let _ = connection.close(200, "raw publish done".into()).await;
    let published = rate.count;
    Ok((rate, published))
}

/// Consumes what the publish phase left, acking each delivery on its own
/// (as the processors do), prefetch = concurrency, until all are taken or
/// `duration` has passed.
async fn amqp_consume(bench: &Bench, duration: Duration, available: u64) -> anyhow::Result<Throughput> {
    let queue = raw_queue(bench.workload.tenant());
    let connection = amqp_connect(&bench.settings.amqp.url).await?;
    let channel = connection.create_channel().await?;
    let prefetch = u16::try_from(bench.plan.concurrency).unwrap_or(u16::MAX);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let started = Instant::now();
    let consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .context("consuming the raw queue")?;
    let done = CancellationToken::new();
    let acked = Arc::new(AtomicU64::new(0));
    let last_ack = Arc::new(std::sync::Mutex::new(started));
    let timer = {
        let done = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            done.cancel();
        })
    };
    consumer
        .take_until(done.clone().cancelled_owned())
        .for_each_concurrent(bench.plan.concurrency, |delivery| {
            let (acked, last_ack, done) = (acked.clone(), last_ack.clone(), done.clone());
            async move {
                let Ok(delivery) = delivery else { return };
                if delivery.ack(BasicAckOptions::default()).await.is_ok() {
                    *last_ack.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    if acked.fetch_add(1, Ordering::Relaxed) + 1 >= available {
                        done.cancel();
                    }
                }
            }
        })
        .await;
    timer.abort();
    let _ = connection.close(200, "raw consume done".into()).await;
    let count = acked.load(Ordering::Relaxed);
    let seconds = last_ack.lock().unwrap_or_else(|e| e.into_inner()).duration_since(started).as_secs_f64();
    Ok(Throughput::new(count, seconds))
}

/// The processors' producer settings, the event's size and its headers.
async fn kafka_produce(bench: &Bench, duration: Duration) -> anyhow::Result<Throughput> {
    let topic = raw_topic(bench.workload.tenant());
    sluice_processors::kafka::ensure_topics(
        &bench.settings.kafka.brokers,
        std::slice::from_ref(&topic),
        bench.settings.processor.topic_partitions,
    )
    .await
    .context("creating the raw topic")?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bench.settings.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "10000")
        .create()
        .context("creating a Kafka producer")?;
    let payload = Arc::new(bench.workload.event_bytes()?);
    let (workload, source) = (bench.workload.clone(), bench.workload.source().to_owned());
    let rate = closed_loop(bench.plan.concurrency, duration, |deadline| {
        let (producer, payload, topic, workload, source) =
            (producer.clone(), payload.clone(), topic.clone(), workload.clone(), source.clone());
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let key = workload.next_order();
                let id = uuid::Uuid::new_v4().to_string();
                let time = chrono::Utc::now().to_rfc3339();
                let headers = OwnedHeaders::new_with_capacity(8)
                    .insert(Header { key: "ce_specversion", value: Some("1.0") })
                    .insert(Header { key: "ce_id", value: Some(id.as_str()) })
                    .insert(Header { key: "ce_source", value: Some(source.as_str()) })
                    .insert(Header { key: "ce_type", value: Some(sluice_schemas::orders::ORDER_SUBMITTED) })
                    .insert(Header { key: "ce_time", value: Some(time.as_str()) })
                    .insert(Header { key: "ce_subject", value: Some(key.as_str()) })
                    .insert(Header { key: "content-type", value: Some("application/avro") });
                let record = FutureRecord::to(&topic).key(&key).payload(payload.as_slice()).headers(headers);
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("raw produce: {e}"))?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await?;
    let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    Ok(rate)
}

/// Creates `table` with the columns of the schema's table `original` (the
/// first statement of `statements` that creates it).
async fn create_copy(session: &Session, statements: &[String], original: &str, table: &str) -> anyhow::Result<()> {
    let create = statements
        .iter()
        .find(|s| s.contains(&format!("EXISTS {original} (")))
        .with_context(|| format!("no CREATE TABLE for {original} in the schema"))?
        .replacen(&format!("EXISTS {original} ("), &format!("EXISTS {table} ("), 1);
    session.query_unpaged(create, ()).await.with_context(|| format!("creating {table}"))?;
    Ok(())
}

/// The projection's OrderSubmitted write: the same statement and values as
/// the read model's order row, into a copy of its table.
async fn cql_insert(bench: &Bench, duration: Duration) -> anyhow::Result<Throughput> {
    let session = bench.session.clone();
    let projection = &bench.settings.projector.name;
    let table = raw_orders_table(projection);
    // The read-model statements of a projection named `<p>_raw`, version 1.
    let statements = cql::create_read_model_tables(&format!("{projection}_raw"), 1);
    create_copy(&session, &statements, &table, &table).await?;
    let insert = session
        .prepare(format!(
            "INSERT INTO {table} (tenant, order_id, customer_id, status, currency, lines, total_cents, \
             version, submitted_at, updated_at) VALUES (?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await
        .context("preparing the raw insert")?;
    let lines = serde_json::to_string(&bench.workload.submit_order("o-0")["data"]["lines"])?;
    let tenant = bench.workload.tenant().to_owned();
    let workload = bench.workload.clone();
    closed_loop(bench.plan.concurrency, duration, |deadline| {
        let (session, insert, lines, tenant, workload) =
            (session.clone(), insert.clone(), lines.clone(), tenant.clone(), workload.clone());
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let order_id = workload.next_order();
                let at = CqlTimestamp(chrono::Utc::now().timestamp_millis());
                session
                    .execute_unpaged(&insert, (&tenant, &order_id, "c-1", "EUR", &lines, 2100i64, 1i64, at, at, 1i64))
                    .await
                    .context("raw insert")?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await
}

/// The event store's append: INSERT … IF NOT EXISTS (a Paxos round on
/// Cassandra), into a copy of the `events` table.
async fn cql_lwt_insert(bench: &Bench, duration: Duration) -> anyhow::Result<Throughput> {
    let session = bench.session.clone();
    let table = raw_events_table(&bench.settings.projector.name);
    create_copy(&session, &cql::create_tables(), "events", &table).await?;
    let insert = session
        .prepare(format!(
            "INSERT INTO {table} (tenant, context, stream_id, version, event_id, event_type, payload, \
             command_key, operation_id, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        ))
        .await
        .context("preparing the raw LWT insert")?;
    let payload = serde_json::to_string(&bench.workload.submit_order("o-0")["data"])?;
    let tenant = bench.workload.tenant().to_owned();
    let workload = bench.workload.clone();
    closed_loop(bench.plan.concurrency, duration, |deadline| {
        let (session, insert, payload, tenant, workload) =
            (session.clone(), insert.clone(), payload.clone(), tenant.clone(), workload.clone());
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let stream = workload.next_order();
                let id = uuid::Uuid::new_v4().to_string();
                let at = CqlTimestamp(chrono::Utc::now().timestamp_millis());
                let values = (
                    &tenant,
                    RAW_CONTEXT,
                    &stream,
                    1i64,
                    &id,
                    sluice_schemas::orders::ORDER_SUBMITTED,
                    &payload,
                    &id,
                    &id,
                    at,
                );
                session.execute_unpaged(&insert, values).await.context("raw LWT insert")?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await
}
