//! The projector alone at half of its own drain maximum: what issue 13's
//! latency target names ("projector apply latency p99 ≤ 20 ms at half of its
//! maximum rate"). New orders are produced straight to the tenant's events
//! topic on a fixed schedule, Avro through the registry as a processor
//! writes them (encoded before the schedule starts, so the bench's own work
//! stays out of the step), while the other roles sit idle; the step ends once
//! the projection applied all of them. Its figure is the projector's apply
//! histogram (`sluice_projection_apply_seconds`) over the step. The end to
//! end latency step's apply figure stays in the report beside it: there the
//! processors and the edge share the machine with the projector.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schemas::catalog;
use sluice_schemas::codec::EventCodec;
use sluice_schemas::orders::{OrderEvent, OrderLine, OrderSubmitted};

use super::probe::{self, Scrape};
use super::report::{ProjectorBacklog, ProjectorStep};
use super::roles::RoleProcess;
use super::Bench;

/// How often the step looks whether the projection caught up.
const LOOK: Duration = Duration::from_millis(100);

/// How often the backlog step looks: it lasts a few seconds.
const LOOK_OFTEN: Duration = Duration::from_millis(20);

/// Produces `rate` new orders a second for `duration` and measures the
/// projector's apply latency over them.
pub async fn run(bench: &Bench, rate: f64, duration: Duration) -> anyhow::Result<ProjectorStep> {
    let topic = bench.events_topic();
    let rate = rate.max(1.0);
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let payloads = encode(bench, &topic, total).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bench.settings.kafka.brokers)
        .set("linger.ms", "1")
        .create()
        .context("creating the step's producer")?;

    let metrics = format!("http://{}/metrics", bench.projector_metrics_addr);
    let before = Scrape::read(&bench.http, &metrics).await?;
    let start = Instant::now() + Duration::from_millis(20);
    let event_type = sluice_schemas::orders::ORDER_SUBMITTED;
    let mut deliveries = Vec::with_capacity(total);
    for (i, (key, payload)) in payloads.iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: "ce_type", value: Some(event_type) })
            .insert(Header { key: "ce_id", value: Some(key.as_str()) });
        let record = FutureRecord::to(&topic).key(key).payload(payload).headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?);
    }
    let sending = start.elapsed().as_secs_f64().max(1e-3);
    let mut failed = 0;
    for delivery in deliveries {
        if !matches!(delivery.await, Ok(Ok(_))) {
            failed += 1;
        }
    }
    let produced = bench.kafka.end_offsets(&topic).await?;
    let deadline = Instant::now() + bench.plan.settle_timeout;
    let caught_up = loop {
        let applied = probe::applied(&bench.store, 1, &topic).await?;
        if applied >= produced {
            break start.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projection did not catch up within {:?}: {applied} of {produced} offsets applied",
            bench.plan.settle_timeout
        );
        tokio::time::sleep(LOOK).await;
    };
    let after = Scrape::read(&bench.http, &metrics).await?;
    let label = format!("projection=\"{}\"", bench.settings.projector.name);
    let (from, to) = (
        before.buckets("sluice_projection_apply_seconds", &label),
        after.buckets("sluice_projection_apply_seconds", &label),
    );
    Ok(ProjectorStep {
        target_per_second: rate,
        events: total,
        failed,
        sent_per_second: total as f64 / sending,
        caught_up_after_s: caught_up,
        apply_p50_ms: probe::bucket_quantile_ms(&from, &to, 0.5),
        apply_p99_ms: probe::bucket_quantile_ms(&from, &to, 0.99),
    })
}

/// The live projector role (`projector`) draining a backlog by itself:
/// `total` new orders are produced to its topic while its process is
/// stopped (SIGSTOP: it fetches nothing meanwhile, and its group session
/// outlasts the few seconds), then it goes on and is timed until it applied
/// them all. Where the rebuild replays a topic with the replay's code, this
/// is the role's consumer, batches and commits, as it runs after an outage
/// or a deploy. Its pace is rows written from the first the projector
/// counted to the last, sampled as it goes: the wait before its first write
/// (the consumer fetching again after the stop) is reported beside it.
pub async fn backlog(bench: &Bench, projector: &RoleProcess, total: usize) -> anyhow::Result<ProjectorBacklog> {
    let topic = bench.events_topic();
    let payloads = encode(bench, &topic, total).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bench.settings.kafka.brokers)
        .set("linger.ms", "5")
        // Every record of the backlog is in flight at once.
        .set("queue.buffering.max.messages", (total + 1000).to_string())
        .create()
        .context("creating the step's producer")?;
    let metrics = format!("http://{}/metrics", bench.projector_metrics_addr);
    let label = format!("projection=\"{}\"", bench.settings.projector.name);
    let before = Scrape::read(&bench.http, &metrics).await?;
    let tables = sluice_projections::projection::table_names(
        &bench.settings.projector.name,
        1,
        sluice_projections::orders::Orders::TABLES,
    );
    let keyspace = &bench.settings.cql.keyspace;
    let mutations_before = probe::cql_counts(&bench.session, keyspace).await;
    projector.freeze()?;
    let produced = produce_all(&producer, &topic, &payloads).await;
    let produced = match produced {
        Ok(()) => bench.kafka.end_offsets(&topic).await,
        Err(e) => Err(e),
    };
    projector.thaw()?;
    let produced = produced?;
    let resumed = Instant::now();
    let deadline = resumed + bench.plan.settle_timeout;
    let rows_before = before.counter("sluice_projection_rows_total", &label);
    let mut pace = Pace::default();
    loop {
        let rows = Scrape::read(&bench.http, &metrics).await?.counter("sluice_projection_rows_total", &label);
        pace.saw(resumed.elapsed().as_secs_f64(), rows - rows_before);
        let applied = probe::applied(&bench.store, 1, &topic).await?;
        if applied >= produced {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projection did not catch up within {:?}: {applied} of {produced} offsets applied",
            bench.plan.settle_timeout
        );
        tokio::time::sleep(LOOK_OFTEN).await;
    }
    let seconds = resumed.elapsed().as_secs_f64();
    let after = Scrape::read(&bench.http, &metrics).await?;
    pace.saw(seconds, after.counter("sluice_projection_rows_total", &label) - rows_before);
    let mutations_after = probe::cql_counts(&bench.session, keyspace).await;
    let store_mutations = probe::writes_between(mutations_before, mutations_after, &tables);
    let counted = |name| (after.counter(name, &label) - before.counter(name, &label)).max(0.0) as u64;
    let (events, rows) = (counted("sluice_projection_events_total"), counted("sluice_projection_rows_total"));
    anyhow::ensure!(events as usize >= total, "the projector counted {events} events applied of the {total} produced");
    let rows_per_second = pace.rows_per_second().unwrap_or(rows as f64 / seconds);
    Ok(ProjectorBacklog {
        events,
        rows,
        store_mutations,
        seconds,
        first_write_after_s: pace.first.map_or(seconds, |(at, _)| at),
        writing_seconds: pace.seconds(),
        events_per_second: rows_per_second * events as f64 / rows.max(1) as f64,
        rows_per_second,
    })
}

/// The projector's rows counter as the backlog step samples it: when it
/// first moved and when it last did, with its count then.
#[derive(Debug, Default)]
struct Pace {
    first: Option<(f64, f64)>,
    last: Option<(f64, f64)>,
}

impl Pace {
    /// `rows` counted `at` seconds after the projector went on.
    fn saw(&mut self, at: f64, rows: f64) {
        if rows <= 0.0 {
            return;
        }
        if self.first.is_none() {
            self.first = Some((at, rows));
        }
        if self.last.is_none_or(|(_, last)| rows > last) {
            self.last = Some((at, rows));
        }
    }

    /// Between the first sample that saw rows and the last that saw more.
    fn seconds(&self) -> f64 {
        match (self.first, self.last) {
            (Some((from, _)), Some((to, _))) => to - from,
            _ => 0.0,
        }
    }

    /// Rows written between those two samples, per second; `None` when
    /// one sample saw them all.
    fn rows_per_second(&self) -> Option<f64> {
        let ((from, first), (to, last)) = (self.first?, self.last?);
        (to > from).then(|| (last - first) / (to - from))
    }
}

/// Produces every payload, all in flight at once, and waits until Kafka
/// took each.
async fn produce_all(producer: &FutureProducer, topic: &str, payloads: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let event_type = sluice_schemas::orders::ORDER_SUBMITTED;
    let mut deliveries = Vec::with_capacity(payloads.len());
    for (key, payload) in payloads {
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: "ce_type", value: Some(event_type) })
            .insert(Header { key: "ce_id", value: Some(key.as_str()) });
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| anyhow::anyhow!("producing: {e}"))?);
    }
    for delivery in deliveries {
        anyhow::ensure!(matches!(delivery.await, Ok(Ok(_))), "Kafka did not take a backlog record");
    }
    Ok(())
}

/// `total` new orders for `topic`: each its key and its Confluent
/// wire-format value.
async fn encode(bench: &Bench, topic: &str, total: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let codec = EventCodec::new(&bench.settings.registry.url)?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let now = chrono::Utc::now().timestamp_millis();
    let mut payloads = Vec::with_capacity(total);
    for i in 0..total {
        let order_id = format!("alone-{}-{i}", &run[..8]);
        let event = OrderEvent::Submitted(OrderSubmitted {
            event_id: uuid::Uuid::new_v4().to_string(),
            order_id: order_id.clone(),
            version: 1,
            occurred_at: now,
            customer_id: format!("c-{}", i % 500),
            currency: "EUR".into(),
            lines: vec![OrderLine { sku: "sku-1".into(), quantity: 1, unit_price_cents: 1_000 }],
            total_cents: 1_000,
        });
        let spec = catalog::event_spec(event.event_type()).context("the catalog names OrderSubmitted")?;
        payloads.push((order_id, codec.encode_value(topic, spec, event.to_avro()).await?));
    }
    Ok(payloads)
}

#[cfg(test)]
mod tests {
    use super::Pace;

    #[test]
    fn the_pace_runs_from_the_first_rows_seen_to_the_last_change() {
        let mut pace = Pace::default();
        // Nothing written for 0.6 s, then 1000 rows every 0.1 s, then the
        // offsets are recorded a while later.
        for (at, rows) in
            [(0.0, 0.0), (0.3, 0.0), (0.6, 500.0), (0.7, 1500.0), (0.8, 2500.0), (0.9, 2500.0), (1.1, 2500.0)]
        {
            pace.saw(at, rows);
        }
        assert_eq!(pace.first, Some((0.6, 500.0)));
        assert!((pace.seconds() - 0.2).abs() < 1e-9);
        assert!((pace.rows_per_second().unwrap() - 10_000.0).abs() < 1e-6);
    }

    #[test]
    fn one_sample_that_saw_every_row_gives_no_pace() {
        let mut pace = Pace::default();
        pace.saw(0.2, 0.0);
        pace.saw(0.4, 2000.0);
        pace.saw(0.6, 2000.0);
        assert_eq!(pace.rows_per_second(), None);
        assert_eq!(pace.seconds(), 0.0);
    }
}
