//! The bare-hops ceiling: the physical limit sluice is measured against.
//!
//! A pipeline written with the roles' client crates (lapin, rdkafka, scylla)
//! and no sluice logic carries commands through the same hops with the least
//! server work a command needs:
//!
//! 1. publish with confirm to a quorum queue (the work queues' arguments);
//! 2. consume and ack (after the steps below, as the processors do);
//! 3. the CQL writes an event append and an operation record need, as plain
//!    inserts into copies of the `events` and `operations` tables;
//! 4. Kafka produce (idempotent, acks=all) of the event's Avro-sized bytes,
//!    awaited before the ack;
//! 5. consume the topic and write the read model's three rows.
//!
//! It pipelines freely: at most `window` commands are anywhere between the
//! publish and the read-model write (a permit is taken at the publish and
//! given back after the last row), swept over `Plan::windows`. The rate of
//! commands through all five hops over the measured span, with every
//! server's CPU time per command, is what the servers can do together; what
//! sluice does beyond it is the cost of its guarantees and logic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlDate, CqlTimestamp};
use sluice_projections::orders::Orders;
use sluice_projections::projection::{create_statements, table_names};
use sluice_schemas::{cql, names};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::raw::{amqp_connect, point, scratch_topic};
use super::report::{BareLatency, BareReport, Ceiling, Percentiles, SweepPoint, Throughput};
use super::Bench;

/// The bounded context name of the bare pipeline's queue and topic.
pub const BARE_CONTEXT: &str = "bare";

/// The longest wait for the commands in flight once publishing stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The bare pipeline's tables: copies of the event store, the operations
/// table and the read model (projection `<projection>_bare`, version 1).
pub fn bare_tables(projection: &str) -> Vec<String> {
    let mut tables = table_names(&format!("{projection}_bare"), 1, Orders::TABLES);
    tables.push(format!("{projection}_bare_events"));
    tables.push(format!("{projection}_bare_operations"));
    tables
}

/// What every window shares: the prepared statements, producer and names.
struct Hops {
    tenant: String,
    queue: String,
    topic: String,
    amqp_url: String,
    brokers: String,
    command: Vec<u8>,
    event: Vec<u8>,
    lines: String,
    append: PreparedStatement,
    operation: PreparedStatement,
    rows: [PreparedStatement; 3],
    producer: FutureProducer,
    session: Arc<scylla::client::session::Session>,
}

pub async fn run(bench: &Bench, step: &dyn Fn(&str)) -> anyhow::Result<BareReport> {
    step("bare: preparing the queue, topic and tables");
    let hops = Arc::new(prepare(bench).await?);
    let mut points = Vec::new();
    for &window in &bench.plan.windows {
        step(&format!("bare: every hop, {window} commands in flight"));
        let p = match measure_window(bench, &hops, window).await {
            Ok(p) => p,
            // A server that refused or dropped one of the window's hops
            // (once, in a CI run on a just-started stack: the cause was not
            // kept then) gets one more try from an empty queue; the report's
            // phases show both tries.
            Err(first) => {
                step(&format!("bare: every hop, {window} commands in flight, again after: {first:#}"));
                purge(&hops).await?;
                measure_window(bench, &hops, window)
                    .await
                    .with_context(|| format!("the bare window of {window} failed twice; the first time: {first:#}"))?
            }
        };
        points.push(p);
    }
    let Ok(hops) = Arc::try_unwrap(hops) else { bail!("a bare run outlived its window") };
    let _ = tokio::task::spawn_blocking(move || drop(hops.producer)).await;
    Ok(BareReport {
        latency: None,
        hops: "publish+confirm → consume → 2 CQL inserts (event, operation) → Kafka produce (idempotent, acks=all) \
               → ack; Kafka consume → 3 CQL inserts (read model)"
            .into(),
        ceiling: Ceiling::new("commands", points),
    })
}

/// Most commands in flight in the open-loop run: a backlog past it holds
/// the publisher back, and its commands' latency still counts from the
/// time they were due.
const OPEN_LOOP_CAP: usize = 4_096;

/// The bare hops at `per_second` (the latency step's rate) for `span`, open
/// loop: how long a command takes through every hop when the servers do
/// nothing else, the floor under the end-to-end latency at that rate.
pub async fn latency(
    bench: &Bench,
    per_second: f64,
    span: Duration,
    step: &dyn Fn(&str),
) -> anyhow::Result<BareLatency> {
    step(&format!("bare: every hop at {per_second:.0}/s, open loop"));
    let hops = Arc::new(prepare(bench).await?);
    let run = Run::start(hops.clone(), OPEN_LOOP_CAP, Some(per_second)).await?;
    let latency = run.latency.clone();
    let p = point(OPEN_LOOP_CAP, run.measure(span)).await;
    let drained = run.stop().await;
    let p = p?;
    drained?;
    let Ok(hops) = Arc::try_unwrap(hops) else { bail!("a bare run outlived its window") };
    let _ = tokio::task::spawn_blocking(move || drop(hops.producer)).await;
    let latency = latency.lock().unwrap_or_else(|e| e.into_inner());
    Ok(BareLatency {
        per_second,
        seconds: span.as_secs_f64(),
        latency_ms: Percentiles::from_micros(&latency),
        point: p,
    })
}

/// One window's pipeline: filled, measured, drained.
async fn measure_window(bench: &Bench, hops: &Arc<Hops>, window: usize) -> anyhow::Result<SweepPoint> {
    let settle = bench.plan.raw_duration / 5;
    let measured = bench.plan.raw_duration;
    // The CPU snapshot spans the measured part only (`point`), after the
    // pipeline has filled; the drain at the end is outside it.
    let run = Run::start(hops.clone(), window, None).await?;
    tokio::time::sleep(settle).await;
    let p = point(window, run.measure(measured)).await;
    let drained = run.stop().await;
    let p = p?;
    drained?;
    Ok(p)
}

/// Empties the bare queue of what a failed window left in it.
async fn purge(hops: &Hops) -> anyhow::Result<()> {
    let connection = amqp_connect(&hops.amqp_url).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(hops.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .context("purging the bare queue")?;
    let _ = connection.close(200, "bare queue purged".into()).await;
    Ok(())
}

async fn prepare(bench: &Bench) -> anyhow::Result<Hops> {
    let tenant = bench.workload.tenant().to_owned();
    let queue = names::command_queue(&tenant, BARE_CONTEXT, 0);
    let connection = amqp_connect(&bench.settings.amqp.url).await?;
    let channel = connection.create_channel().await?;
    sluice_processors::amqp::declare_topology(&channel, &tenant, BARE_CONTEXT, 1)
        .await
        .context("declaring the bare queue")?;
    let _ = connection.close(200, "bare topology declared".into()).await;
    let (topic, producer) = scratch_topic(bench, BARE_CONTEXT).await?;

    let session = &bench.session;
    let projection = &bench.settings.projector.name;
    let bare = format!("{projection}_bare");
    for create in create_statements(&bare, 1, Orders::TABLES) {
        session.query_unpaged(create, ()).await.context("creating the bare read-model tables")?;
    }
    for original in ["events", "operations"] {
        let create = cql::create_tables()
            .into_iter()
            .find(|s| s.contains(&format!("EXISTS {original} (")))
            .with_context(|| format!("no CREATE TABLE for {original}"))?
            .replacen(&format!("EXISTS {original} ("), &format!("EXISTS {bare}_{original} ("), 1);
        session.query_unpaged(create, ()).await.with_context(|| format!("creating {bare}_{original}"))?;
    }
    let prepare = |cql: String| async move { session.prepare(cql).await.context("preparing a bare statement") };
    let append = prepare(format!(
        "INSERT INTO {bare}_events (tenant, context, stream_id, version, event_id, event_type, payload, command_key, \
         operation_id, recorded_at) VALUES (?, 'bare', ?, 1, ?, 'OrderSubmitted', ?, ?, ?, ?)"
    ))
    .await?;
    let operation = prepare(format!(
        "INSERT INTO {bare}_operations (tenant, operation_id, status, command_type, source, command_id, events, \
         updated_at) VALUES (?, ?, 'succeeded', 'SubmitOrder', ?, ?, ?, ?)"
    ))
    .await?;
    let rows = [
        prepare(format!(
            "INSERT INTO {bare}_by_id_v1 (tenant, order_id, customer_id, status, currency, lines, total_cents, \
             version, submitted_at, updated_at) VALUES (?, ?, ?, 'submitted', 'EUR', ?, 2100, 1, ?, ?) \
             USING TIMESTAMP 1"
        ))
        .await?,
        prepare(format!(
            "INSERT INTO {bare}_by_customer_v1 (tenant, customer_id, submitted_at, order_id, status, currency, \
             total_cents, version) VALUES (?, ?, ?, ?, 'submitted', 'EUR', 2100, 1) USING TIMESTAMP 1"
        ))
        .await?,
        prepare(format!(
            "INSERT INTO {bare}_sales_by_day_v1 (tenant, day, slot, orders, total_cents) \
             VALUES (?, ?, ?, 1, 2100) USING TIMESTAMP 1"
        ))
        .await?,
    ];
    Ok(Hops {
        tenant,
        queue,
        topic,
        amqp_url: bench.settings.amqp.url.clone(),
        brokers: bench.settings.kafka.brokers.clone(),
        command: bench.workload.command_bytes(),
        event: bench.workload.event_bytes()?,
        lines: bench.workload.lines_json(),
        append,
        operation,
        rows,
        producer,
        session: bench.session.clone(),
    })
}

/// One window's pipeline, running.
struct Run {
    window: usize,
    /// From each command's scheduled publish to its read-model rows, µs.
    latency: Arc<std::sync::Mutex<Histogram<u64>>>,
    /// Commands allowed in flight; taken at the publish, given back after
    /// the read-model rows.
    permits: Arc<Semaphore>,
    /// Commands through every hop.
    done: Arc<AtomicU64>,
    /// Ends the publisher; the consumers end once everything drained.
    stop_publishing: CancellationToken,
    stop_consuming: CancellationToken,
    /// Cancelled at the first failed hop: its permit never comes back, so
    /// the run ends at once rather than waiting out the drain.
    failed: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    connection: lapin::Connection,
}

impl Run {
    /// At most `window` commands in flight; `per_second`: published on a
    /// schedule at that rate (open loop) rather than as soon as one is done.
    async fn start(hops: Arc<Hops>, window: usize, per_second: Option<f64>) -> anyhow::Result<Self> {
        let permits = Arc::new(Semaphore::new(window));
        let done = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(std::sync::Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
        ));
        // Each command's scheduled publish, as µs since `base`, rides in its
        // message id and from there in its event's key.
        let base = Instant::now();
        let (stop_publishing, stop_consuming) = (CancellationToken::new(), CancellationToken::new());
        let failed = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let connection = amqp_connect(&hops.amqp_url).await?;

        // Hop 5: read the topic from its current end.
        let reader = read_from_end(&hops.brokers, &hops.topic).await?;
        {
            let (hops, permits, done, stop) = (hops.clone(), permits.clone(), done.clone(), stop_consuming.clone());
            let latency = latency.clone();
            let failures = Failures::new(failed.clone());
            tasks.spawn(async move {
                reader
                    .stream()
                    .take_until(stop.cancelled_owned())
                    .map(|m| m.map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()))
                    .for_each_concurrent(window, |order_id| {
                        let (hops, permits, done, failures, latency) = (&hops, &permits, &done, &failures, &latency);
                        async move {
                            let written = match &order_id {
                                Ok(order_id) => write_rows(hops, order_id).await,
                                Err(e) => Err(anyhow::Error::new(e.clone()).context("bare Kafka consume")),
                            };
                            match written {
                                Ok(()) => {
                                    if let Some(scheduled) = order_id.ok().as_deref().and_then(scheduled_micros) {
                                        let took = base.elapsed().as_micros() as u64;
                                        let mut latency = latency.lock().unwrap_or_else(|e| e.into_inner());
                                        let _ = latency.record(took.saturating_sub(scheduled).max(1));
                                    }
                                    done.fetch_add(1, Ordering::Relaxed);
                                    permits.add_permits(1);
                                }
                                Err(e) => failures.record(e),
                            }
                        }
                    })
                    .await;
                let _ = tokio::task::spawn_blocking(move || drop(reader)).await;
                failures.into_result("bare read-model writes")
            });
        }

        // Hops 2–4: consume, two inserts, produce, ack.
        let channel = connection.create_channel().await?;
        channel.basic_qos(u16::try_from(window).unwrap_or(u16::MAX), BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(hops.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .context("consuming the bare queue")?;
        {
            let (hops, stop) = (hops.clone(), stop_consuming.clone());
            let failures = Failures::new(failed.clone());
            tasks.spawn(async move {
                consumer
                    .take_until(stop.clone().cancelled_owned())
                    .for_each_concurrent(window, |delivery| {
                        let (hops, failures) = (&hops, &failures);
                        async move {
                            let handled = match delivery {
                                Ok(delivery) => handle(hops, delivery).await,
                                Err(e) => Err(anyhow::Error::new(e).context("bare delivery")),
                            };
                            if let Err(e) = handled {
                                failures.record(e);
                            }
                        }
                    })
                    .await;
                if !stop.is_cancelled() {
                    failures.record(anyhow::anyhow!("the broker ended the bare consumer before the run did"));
                }
                // Held until here: lapin closes a channel with its last
                // handle, and the consumer, dropped as soon as its stream
                // ended, would otherwise take the channel with it while the
                // deliveries in flight still had their acks to send.
                drop(channel);
                failures.into_result("bare deliveries")
            });
        }

        // Hop 1: publish with confirms while permits last (and, open loop,
        // as each command's time comes).
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        {
            let (hops, permits, stop) = (hops.clone(), permits.clone(), stop_publishing.clone());
            tasks.spawn(async move {
                let routing_key = names::routing_key(&hops.tenant, BARE_CONTEXT, 0);
                let mut confirms = futures::stream::FuturesUnordered::new();
                let mut n = 0u64;
                loop {
                    // Open loop: the n-th tick of the rate.
                    let due = per_second.map(|rate| base + Duration::from_secs_f64(n as f64 / rate));
                    let permit = tokio::select! {
                        _ = stop.cancelled() => break,
                        Some(confirm) = confirms.next(), if !confirms.is_empty() => {
                            check_confirm(confirm)?;
                            continue;
                        }
                        permit = async {
                            if let Some(due) = due {
                                tokio::time::sleep_until(due.into()).await;
                            }
                            permits.acquire().await
                        } => permit?,
                    };
                    permit.forget();
                    n += 1;
                    let scheduled = due.unwrap_or_else(Instant::now);
                    let id = format!("o-{n}-{}", scheduled.duration_since(base).as_micros());
                    let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
                    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                    let confirm = channel
                        .basic_publish(
                            names::COMMAND_EXCHANGE.into(),
                            routing_key.as_str().into(),
                            options,
                            &hops.command,
                            properties,
                        )
                        .await?;
                    confirms.push(confirm);
                }
                while let Some(confirm) = confirms.next().await {
                    check_confirm(confirm)?;
                }
                Ok(())
            });
        }
        Ok(Self { window, latency, permits, done, stop_publishing, stop_consuming, failed, tasks, connection })
    }

    /// Commands through every hop per second over the next `span`.
    async fn measure(&self, span: Duration) -> anyhow::Result<Throughput> {
        let (start, from) = (Instant::now(), self.done.load(Ordering::Relaxed));
        tokio::time::sleep(span).await;
        Ok(Throughput::new(self.done.load(Ordering::Relaxed) - from, start.elapsed().as_secs_f64()))
    }

    /// Stops publishing, waits until every command in flight went through
    /// (all permits back), then stops the consumers.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_publishing.cancel();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let drained = loop {
            if self.permits.available_permits() >= self.window {
                break true;
            }
            if self.failed.is_cancelled() {
                // The failed task's error comes from the join below.
                break true;
            }
            if let Some(Ok(Err(e))) = self.tasks.try_join_next() {
                self.stop_consuming.cancel();
                return Err(e);
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.stop_consuming.cancel();
        while let Some(task) = self.tasks.join_next().await {
            task.context("a bare task panicked")??;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.connection.close(200, "bare done".into())).await;
        if !drained {
            bail!("the bare pipeline did not drain within {DRAIN_TIMEOUT:?}");
        }
        Ok(())
    }
}

/// The scheduled publish (µs since the run's start) in an event's key,
/// `o-<n>-<µs>-<delivery tag>`.
fn scheduled_micros(key: &str) -> Option<u64> {
    key.split('-').nth(2)?.parse().ok()
}

/// The failures of one hop's concurrent work: how many, and the first one's
/// cause, which the bench prints.
struct Failures {
    count: AtomicU64,
    first: std::sync::Mutex<Option<anyhow::Error>>,
    /// Told of the first one.
    tripped: CancellationToken,
}

impl Failures {
    fn new(tripped: CancellationToken) -> Self {
        Self { count: AtomicU64::new(0), first: std::sync::Mutex::new(None), tripped }
    }

    fn record(&self, error: anyhow::Error) {
        self.tripped.cancel();
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        first.get_or_insert(error);
    }

    fn into_result(self, what: &str) -> anyhow::Result<()> {
        match (self.count.into_inner(), self.first.into_inner().unwrap_or_else(|p| p.into_inner())) {
            (0, _) | (_, None) => Ok(()),
            (n, Some(first)) => Err(first.context(format!("{n} {what} failed; the first one's cause follows"))),
        }
    }
}

fn check_confirm(confirm: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match confirm? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("RabbitMQ did not take a bare publish: {other:?}"),
    }
}

/// Hops 2–4 for one delivery: the event append and operation record at
/// once, then the produce, then the ack.
async fn handle(hops: &Hops, delivery: lapin::message::Delivery) -> anyhow::Result<()> {
    let session = &hops.session;
    let order_id = delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
    let key = format!("{order_id}-{}", delivery.delivery_tag);
    let now = CqlTimestamp(chrono::Utc::now().timestamp_millis());
    let payload = std::str::from_utf8(&delivery.data).unwrap_or_default();
    let source = format!("/{}/bench", hops.tenant);
    let (append, operation) = futures::join!(
        session.execute_unpaged(&hops.append, (&hops.tenant, &key, &key, payload, &key, &key, now)),
        session.execute_unpaged(&hops.operation, (&hops.tenant, &key, &source, &key, "[]", now)),
    );
    append.context("bare append")?;
    operation.context("bare operation record")?;
    let record = FutureRecord::to(&hops.topic).key(&key).payload(&hops.event);
    hops.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| anyhow::anyhow!("bare produce: {e}"))?;
    delivery.ack(BasicAckOptions::default()).await.context("bare ack")?;
    Ok(())
}

/// Hop 5 for one event: the read model's three rows at once.
async fn write_rows(hops: &Hops, order_id: &str) -> anyhow::Result<()> {
    let session = &hops.session;
    let now = chrono::Utc::now();
    let at = CqlTimestamp(now.timestamp_millis());
    let day = CqlDate((now.timestamp().div_euclid(86_400) + (1 << 31)) as u32);
    let customer = format!("c-{}", order_id.len() % 7);
    let (by_id, by_customer, daily) = futures::join!(
        session.execute_unpaged(&hops.rows[0], (&hops.tenant, order_id, &customer, &hops.lines, at, at)),
        session.execute_unpaged(&hops.rows[1], (&hops.tenant, &customer, at, order_id)),
        session.execute_unpaged(&hops.rows[2], (&hops.tenant, day, order_id)),
    );
    by_id.context("bare by_id row")?;
    by_customer.context("bare by_customer row")?;
    daily.context("bare daily row")?;
    Ok(())
}

/// A consumer of `topic` assigned at every partition's current end.
async fn read_from_end(brokers: &str, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("sluice.bench.bare.{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("creating the bare Kafka consumer")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut assignment = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
                assignment.add_partition_offset(&topic, p.id(), Offset::Offset(high))?;
            }
        }
        consumer.assign(&assignment)?;
        Ok::<_, rdkafka::error::KafkaError>(consumer)
    })
    .await?
    .context("assigning the bare topic")
}
