//! Looking at the pipeline from outside while it runs: the work queue's depth
//! (straight from the broker, not the management API's periodic figures),
//! how many events the processors produced (the topic's end offsets) and how
//! many the projection applied (the offsets it keeps beside its rows),
//! whether the projector's consumer group has joined, and how many CQL reads
//! and writes each table has seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use scylla::client::session::Session;
use sluice_projections::store::ReadModels;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages ready in `queue`, and its consumers (passive declare).
pub async fn queue_state(channel: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let q = channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .with_context(|| format!("looking at queue {queue}"))?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Ready messages and consumers summed over `queues` (a context's partitions).
pub async fn queues_state(channel: &Channel, queues: &[String]) -> anyhow::Result<(u32, u32)> {
    let mut total = (0, 0);
    for queue in queues {
        let (ready, consumers) = queue_state(channel, queue).await?;
        total = (total.0 + ready, total.1 + consumers);
    }
    Ok(total)
}

/// A Kafka client for metadata, end offsets and group states (clones share it).
#[derive(Clone)]
pub struct KafkaProbe {
    consumer: Arc<BaseConsumer>,
}

impl KafkaProbe {
    pub fn new(brokers: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("sluice.bench.probe.{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            // Warnings and worse: its metadata of topics the cleanup deletes
            // would otherwise be reported at info.
            .set_log_level(RDKafkaLogLevel::Warning)
            .create()
            .context("creating a Kafka client")?;
        Ok(Self { consumer: Arc::new(consumer) })
    }

    /// Records in `topic` (the sum of its partitions' end offsets; the bench
    /// topics start at 0 and are never compacted).
    pub async fn end_offsets(&self, topic: &str) -> anyhow::Result<i64> {
        let (consumer, name) = (self.consumer.clone(), topic.to_owned());
        // Metadata and watermark calls block: keep them off the executor.
        tokio::task::spawn_blocking(move || {
            let metadata = consumer.fetch_metadata(Some(&name), KAFKA_TIMEOUT)?;
            let mut total = 0;
            for t in metadata.topics() {
                for p in t.partitions() {
                    total += consumer.fetch_watermarks(t.name(), p.id(), KAFKA_TIMEOUT)?.1;
                }
            }
            Ok::<_, rdkafka::error::KafkaError>(total)
        })
        .await?
        .with_context(|| format!("reading the end offsets of {topic}"))
    }

    /// Whether `group` is a stable group with at least one member.
    pub async fn group_stable(&self, group: &str) -> anyhow::Result<bool> {
        let (consumer, name) = (self.consumer.clone(), group.to_owned());
        tokio::task::spawn_blocking(move || {
            let list = consumer.fetch_group_list(Some(&name), KAFKA_TIMEOUT)?;
            Ok::<_, rdkafka::error::KafkaError>(
                list.groups().iter().any(|g| g.state() == "Stable" && !g.members().is_empty()),
            )
        })
        .await?
        .with_context(|| format!("looking at consumer group {group}"))
    }

    /// Closes the client off the executor (dropping one can block).
    pub async fn close(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// Events of `topic` the projection has applied in `version` (the next
/// offsets it wrote beside its rows, summed over partitions; flushed every
/// `projector.offset_flush_ms`).
pub async fn applied(store: &ReadModels, version: i32, topic: &str) -> anyhow::Result<i64> {
    let offsets = store.offsets_of(version).await.context("reading the projection's applied offsets")?;
    Ok(offsets.iter().filter(|((t, _), _)| t == topic).map(|(_, next)| *next).sum())
}

/// Reads and writes coordinated so far per table of `keyspace`, from the
/// CQL store's own metrics (`system_views`, Cassandra 4 and later). `None`
/// where the store has no such tables (ScyllaDB): the figure is optional.
pub async fn cql_counts(session: &Session, keyspace: &str) -> Option<HashMap<String, CqlTableCounts>> {
    let mut counts: HashMap<String, CqlTableCounts> = HashMap::new();
    for (view, write) in [("coordinator_read_latency", false), ("coordinator_write_latency", true)] {
        let rows = session
            .query_unpaged(
                format!("SELECT table_name, count FROM system_views.{view} WHERE keyspace_name = ?"),
                (keyspace,),
            )
            .await
            .ok()?
            .into_rows_result()
            .ok()?;
        for row in rows.rows::<(String, i64)>().ok()? {
            let (table, count) = row.ok()?;
            let entry = counts.entry(table).or_default();
            let count = u64::try_from(count).unwrap_or(0);
            if write {
                entry.writes = count;
            } else {
                entry.reads = count;
            }
        }
    }
    Some(counts)
}

/// Writes the store coordinated on `tables` between two [`cql_counts`]
/// (a batch of one partition's rows is one); `None` if either is missing.
pub fn writes_between(
    before: Option<HashMap<String, CqlTableCounts>>,
    after: Option<HashMap<String, CqlTableCounts>>,
    tables: &[String],
) -> Option<u64> {
    let (before, after) = (before?, after?);
    let writes = |counts: &HashMap<String, CqlTableCounts>, table: &String| counts.get(table).map_or(0, |c| c.writes);
    Some(tables.iter().map(|t| writes(&after, t).saturating_sub(writes(&before, t))).sum())
}

/// One table's coordinator counts (an LWT counts as a write and reads).
#[derive(Debug, Clone, Copy, Default)]
pub struct CqlTableCounts {
    pub reads: u64,
    pub writes: u64,
}

/// Whether `name` is `<prefix><10 lowercase hex digits><rest>`, the shape of
/// the tenants and projections tests and the bench make; the rest if so.
pub fn generated_name<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let (id, rest) = name.strip_prefix(prefix)?.split_at_checked(10)?;
    id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)).then_some(rest)
}

/// Whether a table of the keyspace belongs to a projection a test or a
/// bench run made (`orders_<hex>_…`, `patients_<hex>_…`, `bench_<hex>_…`).
pub fn generated_table(table: &str) -> bool {
    ["orders_", "patients_", "bench_"].iter().any(|p| generated_name(table, p).is_some_and(|r| r.starts_with('_')))
}

/// Whether a keyspace is one a bench run made for itself (`bench_<hex>`).
pub fn generated_keyspace(keyspace: &str) -> bool {
    generated_name(keyspace, "bench_") == Some("")
}

/// Tables that tests or other bench runs left in the CQL store (outside
/// the run's own keyspace `own`): each one's metrics take the store's heap
/// (~0.6 MiB a table on Cassandra 5; 753 of them filled a 512 MiB heap).
pub async fn leftover_tables(session: &Session, own: &str) -> anyhow::Result<usize> {
    let rows = session
        .query_unpaged("SELECT keyspace_name, table_name FROM system_schema.tables", ())
        .await
        .context("listing the CQL store's tables")?
        .into_rows_result()?;
    let mut count = 0;
    for row in rows.rows::<(String, String)>()? {
        let (keyspace, table) = row?;
        count += usize::from(keyspace != own && (generated_keyspace(&keyspace) || generated_table(&table)));
    }
    Ok(count)
}

/// One read of a role's Prometheus metrics (`/metrics` at its admin
/// address).
pub struct Scrape(String);

impl Scrape {
    pub async fn read(http: &reqwest::Client, url: &str) -> anyhow::Result<Self> {
        let text = http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("reading a role's metrics at {url}"))?
            .text()
            .await?;
        Ok(Self(text))
    }

    /// The lines of series `series` (a counter's name, or a histogram's
    /// with `_bucket`, `_sum` or `_count`) whose labels include `label`
    /// (`""`: any), with their values.
    fn series<'a>(&'a self, series: String, label: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(series.as_str())?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) || !line.contains(label) {
                return None;
            }
            let value = line.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((line, value))
        })
    }

    /// The buckets of histogram `name` on the series labelled `label`:
    /// cumulative counts by upper bound in seconds, `+Inf` last.
    pub fn buckets(&self, name: &str, label: &str) -> Vec<(f64, u64)> {
        let mut buckets: Vec<(f64, u64)> = self
            .series(format!("{name}_bucket"), label)
            .filter_map(|(line, count)| {
                let le = line.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, count as u64))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    /// Counter `name` summed over its series labelled `label`.
    pub fn counter(&self, name: &str, label: &str) -> f64 {
        self.series(name.to_owned(), label).map(|(_, v)| v).sum()
    }

    /// Sum and count of histogram `name` on the series labelled `label`.
    fn sum_count(&self, name: &str, label: &str) -> (f64, f64) {
        let total = |part| self.series(format!("{name}_{part}"), label).map(|(_, v)| v).sum::<f64>();
        (total("sum"), total("count"))
    }
}

/// Commands the processors at `urls` (their `/metrics`) have settled since
/// they started: the count of `sluice_command_seconds`, which each
/// delivery records once it is acked, retried or dead-lettered.
pub async fn settled(http: &reqwest::Client, urls: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for url in urls {
        total += Scrape::read(http, url).await?.sum_count("sluice_command_seconds", "").1 as u64;
    }
    Ok(total)
}

/// The mean of what histogram `name` (series labelled `label`) recorded
/// between two scrapes, in its own unit; `None` if nothing was.
pub fn mean_between(before: &Scrape, after: &Scrape, name: &str, label: &str) -> Option<f64> {
    let (sum0, count0) = before.sum_count(name, label);
    let (sum1, count1) = after.sum_count(name, label);
    let count = count1 - count0;
    (count > 0.0).then(|| (sum1 - sum0) / count)
}

/// How many values histogram `name` (series labelled `label`) recorded
/// between two scrapes.
pub fn count_between(before: &Scrape, after: &Scrape, name: &str, label: &str) -> f64 {
    (after.sum_count(name, label).1 - before.sum_count(name, label).1).max(0.0)
}

/// The upper bound (ms) of the bucket that holds quantile `q` of what was
/// recorded between two snapshots of one histogram; `None` if nothing was.
pub fn bucket_quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let then = |le: f64| before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
    let deltas: Vec<(f64, u64)> = after.iter().map(|&(le, n)| (le, n.saturating_sub(then(le)))).collect();
    let total = deltas.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    deltas.iter().find(|b| b.1 >= rank).map(|b| b.0 * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_tests_and_bench_runs_make_count_as_theirs() {
        assert!(generated_table("orders_0a1b2c3d4e_by_id_v1"));
        assert!(generated_table("patients_0a1b2c3d4e_onboarding_steps_v2"));
        assert!(generated_table("bench_9985f7c25a_sales_by_day_v1"));
        assert!(!generated_table("orders_by_id_v1"), "the demo projection");
        assert!(!generated_table("orders_0A1B2C3D4E_by_id_v1"), "upper case is not ours");
        assert!(!generated_table("orders_0a1b2c3d4ex_by_id_v1"), "eleven characters");
        assert!(!generated_table("command_journal"));
        assert_eq!(generated_name("t0a1b2c3d4e", "t"), Some(""));
        assert_eq!(generated_name("bench0a1b2c3d4e.raw.commands.0", "bench"), Some(".raw.commands.0"));
        assert_eq!(generated_name("tenant", "t"), None);
        assert!(generated_keyspace("bench_0a1b2c3d4e"));
        assert!(!generated_keyspace("bench_0a1b2c3d4e_by_id_v1"), "a table's name, not a run's keyspace");
        assert!(!generated_keyspace("sluice"));
    }

    #[test]
    fn a_counter_is_summed_over_its_labelled_series_only() {
        let scrape = Scrape(
            "# TYPE sluice_projection_rows_total counter\n\
             sluice_projection_rows_total{projection=\"p\"} 200\n\
             sluice_projection_rows_total{projection=\"other\"} 7\n\
             sluice_projection_rows_total_extra{projection=\"p\"} 9\n\
             sluice_projection_events_total{projection=\"p\",outcome=\"applied\"} 90\n\
             sluice_projection_events_total{projection=\"p\",outcome=\"dead_lettered\"} 10\n"
                .to_owned(),
        );
        assert_eq!(scrape.counter("sluice_projection_rows_total", "projection=\"p\""), 200.0);
        assert_eq!(scrape.counter("sluice_projection_events_total", "projection=\"p\""), 100.0);
        assert_eq!(scrape.counter("sluice_missing_total", ""), 0.0);
    }

    #[test]
    fn an_apply_quantile_is_the_upper_bound_of_its_bucket_between_two_snapshots() {
        let text = |fast: u64, slow: u64| {
            format!(
                "# TYPE sluice_projection_apply_seconds histogram\n\
                 sluice_projection_apply_seconds_bucket{{projection=\"other\",le=\"0.01\"}} 999\n\
                 sluice_projection_apply_seconds_bucket{{projection=\"p\",le=\"0.02\"}} {slow}\n\
                 sluice_projection_apply_seconds_bucket{{projection=\"p\",le=\"0.01\"}} {fast}\n\
                 sluice_projection_apply_seconds_bucket{{projection=\"p\",le=\"+Inf\"}} {slow}\n\
                 sluice_projection_apply_seconds_sum{{projection=\"p\"}} 1.5\n"
            )
        };
        let name = "sluice_projection_apply_seconds";
        let label = "projection=\"p\"";
        let before = Scrape(text(50, 50)).buckets(name, label);
        assert_eq!(before, [(0.01, 50), (0.02, 50), (f64::INFINITY, 50)]);
        // Between the snapshots: 98 within 10 ms, 2 within 20 ms.
        let after = Scrape(text(148, 150)).buckets(name, label);
        assert_eq!(bucket_quantile_ms(&before, &after, 0.5), Some(10.0));
        assert_eq!(bucket_quantile_ms(&before, &after, 0.95), Some(10.0));
        assert_eq!(bucket_quantile_ms(&before, &after, 0.99), Some(20.0));
        assert_eq!(bucket_quantile_ms(&before, &before, 0.99), None, "nothing recorded in between");
        assert_eq!(bucket_quantile_ms(&[], &after, 0.5), Some(10.0), "no earlier snapshot: everything counts");
    }

    #[test]
    fn a_mean_is_taken_between_two_scrapes_of_the_series_asked_for() {
        let text = |journal: (f64, u64), round: (f64, u64)| {
            format!(
                "sluice_round_stage_seconds_sum{{stage=\"journal\"}} {}\n\
                 sluice_round_stage_seconds_count{{stage=\"journal\"}} {}\n\
                 sluice_round_stage_seconds_sum{{stage=\"commit\"}} 9\n\
                 sluice_round_stage_seconds_count{{stage=\"commit\"}} 1\n\
                 sluice_round_seconds_sum {}\n\
                 sluice_round_seconds_count {}\n",
                journal.0, journal.1, round.0, round.1
            )
        };
        let before = Scrape(text((1.0, 100), (2.0, 100)));
        let after = Scrape(text((1.5, 200), (3.0, 150)));
        let journal = mean_between(&before, &after, "sluice_round_stage_seconds", "stage=\"journal\"");
        assert!((journal.unwrap() - 0.005).abs() < 1e-9, "{journal:?}");
        let round = mean_between(&before, &after, "sluice_round_seconds", "");
        assert!((round.unwrap() - 0.02).abs() < 1e-9, "{round:?}: the stage series are another histogram");
        assert_eq!(mean_between(&before, &before, "sluice_round_seconds", ""), None, "nothing recorded in between");
        assert_eq!(mean_between(&before, &after, "sluice_missing_seconds", ""), None);
        assert_eq!(count_between(&before, &after, "sluice_round_seconds", ""), 50.0);
        assert_eq!(count_between(&before, &after, "sluice_round_stage_seconds", "stage=\"journal\""), 100.0);
        assert_eq!(count_between(&before, &after, "sluice_missing_seconds", ""), 0.0);
    }
}
