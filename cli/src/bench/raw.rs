//! The raw ceilings: what RabbitMQ, Kafka and the CQL store do on their own
//! on this machine, driven with the client libraries the roles use and
//! messages of the size the pipeline moves. No sluice role runs meanwhile.
//!
//! Each ceiling is swept over its in-flight window (`Plan::windows`, e.g.
//! 32, 128, 512 operations at once): a closed loop at one window measures a
//! round trip, not capacity; the best window of the sweep is the ceiling.
//! Every operation is awaited to its durable end (confirm, delivery report,
//! write), as the pipeline awaits it, and each window reports the CPU time
//! per operation of every server process.

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
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use sluice_projections::orders::Orders;
use sluice_projections::projection::{create_statements, table_names};
use sluice_projections::store::tables::ROWS_PER_BATCH as PROJECTOR_ROWS_PER_BATCH;
use sluice_schemas::{cql, names};
use sluice_streams::replicas;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::cpu;
use super::report::{Ceiling, RawReport, SweepPoint, Throughput};
use super::Bench;

/// The bounded context name of the raw phase's queue and topic
/// (`<tenant>.raw.commands`, `<tenant>.raw.events`).
pub const RAW_CONTEXT: &str = "raw";

/// Rows per unlogged batch in the batched-insert ceilings.
pub const ROWS_PER_BATCH: usize = 16;

/// The raw phases' tables: copies of the read model's tables (projection
/// `<projection>_raw`, version 1) and of the event store table.
pub fn raw_tables(projection: &str) -> Vec<String> {
    let mut tables = table_names(&format!("{projection}_raw"), 1, Orders::TABLES);
    tables.push(raw_events_table(projection));
    tables
}

/// The copy of the read model's order table the raw inserts go to.
fn raw_orders_table(projection: &str) -> String {
    format!("{projection}_raw_by_id_v1")
}

/// The copy of the by-customer table the batched inserts go to.
fn raw_customer_table(projection: &str) -> String {
    format!("{projection}_raw_by_customer_v1")
}

/// The copy of the event store table the raw LWT inserts go to.
fn raw_events_table(projection: &str) -> String {
    format!("{projection}_raw_events")
}

pub async fn run(bench: &Bench, step: &dyn Fn(&str)) -> anyhow::Result<RawReport> {
    let (duration, windows) = (bench.plan.raw_duration, bench.plan.windows.clone());
    // The servers' first minutes run cold (JIT compilers, caches): a run
    // right after the stack started measured half of what a later one did.
    step("raw: warming the servers up");
    warm_up(bench, duration).await?;
    let mut amqp_publish = Vec::new();
    let mut published = 0;
    for &w in &windows {
        step(&format!("raw: RabbitMQ publish with confirms, {w} in flight"));
        let p = point(w, amqp_publish_at(bench, w, duration)).await?;
        published += p.rate.count;
        amqp_publish.push(p);
    }
    let mut amqp_consume = Vec::new();
    for &w in &windows {
        step(&format!("raw: RabbitMQ consume with acks, prefetch {w}"));
        let available = published.saturating_sub(amqp_consume.iter().map(|p: &SweepPoint| p.rate.count).sum());
        if available == 0 {
            break;
        }
        amqp_consume.push(point(w, amqp_consume_at(bench, w, duration, available)).await?);
    }
    let mut kafka_produce = Vec::new();
    for &w in &windows {
        step(&format!("raw: Kafka idempotent produce, {w} in flight"));
        kafka_produce.push(point(w, kafka_produce_at(bench, w, duration)).await?);
    }
    let mut cql_insert = Vec::new();
    let insert = CqlInsert::prepare(bench).await?;
    for &w in &windows {
        step(&format!("raw: CQL prepared inserts, {w} in flight"));
        cql_insert.push(point(w, insert.run(bench, w, duration)).await?);
    }
    let mut cql_batch_insert = Vec::new();
    let batched = CqlInsert::prepare_batch(bench).await?;
    for &w in &windows {
        step(&format!("raw: CQL unlogged batches of {ROWS_PER_BATCH} rows, {w} in flight"));
        cql_batch_insert.push(point(w, batched.run(bench, w, duration)).await?);
    }
    let mut cql_spread_batch_insert = Vec::new();
    let spread = CqlInsert::prepare_spread(bench).await?;
    for &w in &windows {
        step(&format!("raw: CQL unlogged batches of {ROWS_PER_BATCH} partitions' rows, {w} in flight"));
        cql_spread_batch_insert.push(point(w, spread.run(bench, w, duration)).await?);
    }
    let mut cql_order_rows_insert = Vec::new();
    let order_rows = CqlInsert::prepare_order_rows(bench).await?;
    for &w in &windows {
        step(&format!("raw: CQL unlogged batches of new orders' rows, {} rows, {w} in flight", order_rows.rows()));
        cql_order_rows_insert.push(point(w, order_rows.run(bench, w, duration)).await?);
    }
    let mut cql_lwt_insert = Vec::new();
    for &w in &windows {
        step(&format!("raw: CQL inserts IF NOT EXISTS, {w} in flight"));
        cql_lwt_insert.push(point(w, cql_lwt_insert_at(bench, w, duration)).await?);
    }
    Ok(RawReport {
        windows,
        amqp_publish: Ceiling::new("publishes", amqp_publish),
        amqp_consume: Ceiling::new("deliveries", amqp_consume),
        kafka_produce: Ceiling::new("records", kafka_produce),
        cql_insert: Ceiling::new("rows", cql_insert),
        cql_batch_insert: Ceiling::new("rows", cql_batch_insert),
        cql_spread_batch_insert: Ceiling::new("rows", cql_spread_batch_insert),
        cql_order_rows_insert: Ceiling::new("rows", cql_order_rows_insert),
        rows_per_order_rows_batch: order_rows.rows(),
        cql_lwt_insert: Ceiling::new("rows", cql_lwt_insert),
        rows_per_batch: ROWS_PER_BATCH,
        command_bytes: bench.workload.command_bytes().len(),
        event_bytes: bench.workload.event_bytes()?.len(),
    })
}

/// Runs the ceilings' work at their smallest window for `duration` each,
/// measuring nothing.
async fn warm_up(bench: &Bench, duration: Duration) -> anyhow::Result<()> {
    let window = bench.plan.windows.first().copied().unwrap_or(32);
    amqp_publish_at(bench, window, duration).await?;
    kafka_produce_at(bench, window, duration).await?;
    CqlInsert::prepare(bench).await?.run(bench, window, duration).await?;
    CqlInsert::prepare_spread(bench).await?.run(bench, window, duration).await?;
    Ok(())
}

/// Measures one window: the work's rate and the CPU each process group
/// spent per operation meanwhile.
pub async fn point(
    window: usize,
    work: impl Future<Output = anyhow::Result<Throughput>>,
) -> anyhow::Result<SweepPoint> {
    let no_roles = cpu::Roles::new();
    let before = cpu::Snapshot::take(&no_roles);
    let rate = work.await?;
    let spent = before.until(&cpu::Snapshot::take(&no_roles), "");
    Ok(SweepPoint {
        window,
        cpu_us_per_op: spent.micros_per(rate.count),
        busy_us_per_op: spent.busy * 1e6 / rate.count.max(1) as f64,
        rate,
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
/// properties and headers, `window` awaiting their confirms at once.
async fn amqp_publish_at(bench: &Bench, window: usize, duration: Duration) -> anyhow::Result<Throughput> {
    let tenant = bench.workload.tenant();
    let connection = amqp_connect(&bench.settings.amqp.url).await?;
    let channel = connection.create_channel().await?;
    sluice_processors::amqp::declare_topology(&channel, tenant, RAW_CONTEXT, 1)
        .await
        .context("declaring the raw queue")?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = Arc::new(bench.workload.command_bytes());
    let routing_key = names::routing_key(tenant, RAW_CONTEXT, 0);
    let (source, tenant) = (bench.workload.source().to_owned(), tenant.to_owned());
    let rate = closed_loop(window, duration, |deadline| {
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
    Ok(rate)
}

/// Consumes what the publish phase left, acking each delivery on its own
/// (as the processors do), prefetch = `window`, until `available` are taken
/// or `duration` has passed.
async fn amqp_consume_at(
    bench: &Bench,
    window: usize,
    duration: Duration,
    available: u64,
) -> anyhow::Result<Throughput> {
    let queue = names::command_queue(bench.workload.tenant(), RAW_CONTEXT, 0);
    let connection = amqp_connect(&bench.settings.amqp.url).await?;
    let channel = connection.create_channel().await?;
    let prefetch = u16::try_from(window).unwrap_or(u16::MAX);
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
        .for_each_concurrent(window, |delivery| {
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

/// The events topic of a scratch context (`raw`, `bare`), created with the
/// events topics' partitions, and an idempotent producer (acks=all, linger 2 ms;
/// the processors' relay producers are transactional, with 1 ms).
pub async fn scratch_topic(bench: &Bench, context: &str) -> anyhow::Result<(String, FutureProducer)> {
    let topic = names::events_topic(bench.workload.tenant(), context);
    sluice_processors::kafka::ensure_topics(
        &bench.settings.kafka.brokers,
        std::slice::from_ref(&topic),
        bench.settings.processor.topic_partitions,
        bench.settings.kafka.replication(),
    )
    .await
    .with_context(|| format!("creating {topic}"))?;
    let producer = ClientConfig::new()
        .set("bootstrap.servers", &bench.settings.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "10000")
        .create()
        .context("creating a Kafka producer")?;
    Ok((topic, producer))
}

/// The event's size and headers, `window` records awaiting their delivery
/// reports at once.
async fn kafka_produce_at(bench: &Bench, window: usize, duration: Duration) -> anyhow::Result<Throughput> {
    let (topic, producer) = scratch_topic(bench, RAW_CONTEXT).await?;
    let payload = Arc::new(bench.workload.event_bytes()?);
    // One record first: a new producer waits for its idempotence id (and a
    // new broker loads its coordinators), which is not what the window measures.
    producer
        .send(FutureRecord::<str, [u8]>::to(&topic).key("warm-up").payload(payload.as_slice()), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("raw produce warm-up: {e}"))?;
    let (workload, source) = (bench.workload.clone(), bench.workload.source().to_owned());
    let rate = closed_loop(window, duration, |deadline| {
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

/// A prepared write of the read model's rows: one row, a batch of
/// `ROWS_PER_BATCH` rows of one partition, or `ROWS_PER_BATCH` rows of as
/// many partitions in batches by the replicas that hold them.
#[derive(Clone)]
enum CqlInsert {
    Single(PreparedStatement),
    Batched(Arc<Batch>),
    Spread(PreparedStatement),
    OrderRows { order: PreparedStatement, customer: PreparedStatement },
}

impl CqlInsert {
    /// The projection's OrderSubmitted write: the same statement and values
    /// as the read model's order row, into a copy of its table.
    async fn prepare(bench: &Bench) -> anyhow::Result<Self> {
        let session = &bench.session;
        let projection = &bench.settings.projector.name;
        let table = raw_orders_table(projection);
        let statements = create_statements(&format!("{projection}_raw"), 1, Orders::TABLES);
        create_copy(session, &statements, &table, &table).await?;
        let insert = session
            .prepare(format!(
                "INSERT INTO {table} (tenant, order_id, customer_id, status, currency, lines, total_cents, \
                 version, submitted_at, updated_at) VALUES (?, ?, ?, 'submitted', ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await
            .context("preparing the raw insert")?;
        Ok(Self::Single(insert))
    }

    /// Unlogged batches of `ROWS_PER_BATCH` rows of one partition of the
    /// by-customer table (one customer's orders): how a projection that
    /// groups its writes by partition key writes rows.
    async fn prepare_batch(bench: &Bench) -> anyhow::Result<Self> {
        let insert = Self::customer_insert(bench).await?;
        Ok(Self::Batched(Arc::new(replicas::batch_of(BatchType::Unlogged, &insert, ROWS_PER_BATCH))))
    }

    /// Rows of `ROWS_PER_BATCH` customers (partitions) at a time, in
    /// unlogged batches by the replicas that hold them (one batch on one
    /// node): how the projector writes a batch of events, one order each.
    async fn prepare_spread(bench: &Bench) -> anyhow::Result<Self> {
        Ok(Self::Spread(Self::customer_insert(bench).await?))
    }

    /// The rows the projection writes for new orders (an order row with
    /// its lines, a customer row) into copies of its tables, as the live
    /// projector writes a batch of them: its batch size, in unlogged
    /// batches by the replicas that hold them. The same rows with no
    /// projector: the ceiling of the live projector on a backlog.
    async fn prepare_order_rows(bench: &Bench) -> anyhow::Result<Self> {
        let session = &bench.session;
        let projection = &bench.settings.projector.name;
        let statements = create_statements(&format!("{projection}_raw"), 1, Orders::TABLES);
        let (orders, customers) = (raw_orders_table(projection), raw_customer_table(projection));
        create_copy(session, &statements, &orders, &orders).await?;
        create_copy(session, &statements, &customers, &customers).await?;
        let order = session
            .prepare(format!(
                "INSERT INTO {orders} (tenant, order_id, customer_id, status, currency, lines, total_cents, \
                 version, submitted_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await
            .context("preparing the raw order row insert")?;
        let customer = session
            .prepare(format!(
                "INSERT INTO {customers} (tenant, customer_id, submitted_at, order_id, status, version, currency, \
                 total_cents) VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await
            .context("preparing the raw customer row insert")?;
        Ok(Self::OrderRows { order, customer })
    }

    /// Rows one execution writes.
    fn rows(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Batched(_) | Self::Spread(_) => ROWS_PER_BATCH,
            Self::OrderRows { .. } => PROJECTOR_ROWS_PER_BATCH,
        }
    }

    /// The insert of a by-customer row, into a copy of the table.
    async fn customer_insert(bench: &Bench) -> anyhow::Result<PreparedStatement> {
        let session = &bench.session;
        let projection = &bench.settings.projector.name;
        let table = raw_customer_table(projection);
        let statements = create_statements(&format!("{projection}_raw"), 1, Orders::TABLES);
        create_copy(session, &statements, &table, &table).await?;
        let insert = session
            .prepare(format!(
                "INSERT INTO {table} (tenant, customer_id, submitted_at, order_id, status, currency, total_cents, \
                 version) VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await
            .context("preparing the raw batched insert")?;
        Ok(insert)
    }

    /// `window` executions in flight for `duration`; counts rows.
    async fn run(&self, bench: &Bench, window: usize, duration: Duration) -> anyhow::Result<Throughput> {
        let rows = self.rows();
        let session = bench.session.clone();
        let lines = bench.workload.lines_json();
        let tenant = bench.workload.tenant().to_owned();
        let workload = bench.workload.clone();
        let executions = closed_loop(window, duration, |deadline| {
            let (session, lines, tenant, workload, insert) =
                (session.clone(), lines.clone(), tenant.clone(), workload.clone(), self.clone());
            async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    let at = CqlTimestamp(chrono::Utc::now().timestamp_millis());
                    match &insert {
                        Self::Single(insert) => {
                            let order_id = workload.next_order();
                            let values = (&tenant, &order_id, "c-1", "EUR", &lines, 2100i64, 1i64, at, at, 1i64);
                            session.execute_unpaged(insert, values).await.context("raw insert")?;
                        }
                        Self::Batched(batch) => {
                            let customer = format!("c-{}", n % 1000);
                            let values: Vec<_> = (0..ROWS_PER_BATCH)
                                .map(|_| {
                                    (&tenant, customer.clone(), at, workload.next_order(), "EUR", 2100i64, 1i64, 1i64)
                                })
                                .collect();
                            session.batch(batch, values).await.context("raw batched insert")?;
                        }
                        Self::Spread(insert) => {
                            let values = (0..ROWS_PER_BATCH).map(|_| {
                                let order = workload.next_order();
                                vec![(&tenant, format!("c-{order}"), at, order, "EUR", 2100i64, 1i64, 1i64)]
                            });
                            let cluster = session.get_cluster_state();
                            let groups =
                                replicas::batches(values, ROWS_PER_BATCH, |row| replicas::of(&cluster, insert, row));
                            let writes = groups.into_iter().map(|rows| {
                                let batch = replicas::batch_of(BatchType::Unlogged, insert, rows.len());
                                let session = &session;
                                async move { session.batch(&batch, rows).await }
                            });
                            futures::future::try_join_all(writes).await.context("raw spread batched insert")?;
                        }
                        Self::OrderRows { order, customer } => {
                            let rows = (0..rows / 2).flat_map(|_| {
                                let order_id = workload.next_order();
                                let customer_id = format!("c-{order_id}");
                                let text = |s: &str| CqlValue::Text(s.to_owned());
                                let (cents, version, at) =
                                    (CqlValue::BigInt(2100), CqlValue::BigInt(1), CqlValue::Timestamp(at));
                                // The write timestamp, as the other raw inserts bind it.
                                let written = CqlValue::BigInt(1);
                                [
                                    vec![(
                                        order,
                                        vec![
                                            text(&tenant),
                                            text(&order_id),
                                            text(&customer_id),
                                            text("submitted"),
                                            text("EUR"),
                                            text(&lines),
                                            cents.clone(),
                                            version.clone(),
                                            at.clone(),
                                            at.clone(),
                                            written.clone(),
                                        ],
                                    )],
                                    vec![(
                                        customer,
                                        vec![
                                            text(&tenant),
                                            text(&customer_id),
                                            at.clone(),
                                            text(&order_id),
                                            text("submitted"),
                                            version,
                                            text("EUR"),
                                            cents,
                                            written,
                                        ],
                                    )],
                                ]
                            });
                            let cluster = session.get_cluster_state();
                            let groups = replicas::batches(rows, PROJECTOR_ROWS_PER_BATCH, |(statement, values)| {
                                replicas::of(&cluster, statement, values)
                            });
                            let writes = groups.into_iter().map(|rows| {
                                let mut batch = Batch::new(BatchType::Unlogged);
                                let values: Vec<Vec<CqlValue>> = rows
                                    .into_iter()
                                    .map(|(statement, values)| {
                                        batch.append_statement((*statement).clone());
                                        values
                                    })
                                    .collect();
                                let session = &session;
                                async move { session.batch(&batch, values).await }
                            });
                            futures::future::try_join_all(writes).await.context("raw batched order rows")?;
                        }
                    }
                    n += 1;
                }
                Ok(n)
            }
        })
        .await?;
        Ok(Throughput::new(executions.count * rows as u64, executions.seconds))
    }
}

/// The event store's append: INSERT … IF NOT EXISTS (a Paxos round on
/// Cassandra), into a copy of the `events` table.
async fn cql_lwt_insert_at(bench: &Bench, window: usize, duration: Duration) -> anyhow::Result<Throughput> {
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
    let payload = String::from_utf8(bench.workload.command_bytes())?;
    let tenant = bench.workload.tenant().to_owned();
    let workload = bench.workload.clone();
    closed_loop(window, duration, |deadline| {
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
