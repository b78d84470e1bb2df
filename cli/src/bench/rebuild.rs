//! The rebuild rate: a blue/green rebuild of the bench projection from the
//! earliest offset of the bench tenant's topic into a fresh version, with the
//! code `sluice replay --rebuild` runs, in this process, after the roles have
//! stopped (so it has the machine to itself, as the raw phases had).
//!
//! Its rows per second compare with the raw batched insert's rows per
//! second: the rows are counted by the projection (every row it writes, in
//! whatever batch); the store's own count of mutations on the new version's
//! tables (a batch of one partition's rows is one) is reported beside them.

use anyhow::Context;
use sluice_projections::replay::{self, ReplayCtx, StartAt};
use tokio_util::sync::CancellationToken;

use super::probe;
use super::report::RebuildReport;
use super::Bench;

pub async fn run(bench: &Bench) -> anyhow::Result<RebuildReport> {
    let ctx = ReplayCtx {
        config: bench.settings.projector.clone(),
        brokers: bench.settings.kafka.brokers.clone(),
        registry_url: bench.settings.registry.url.clone(),
        topics: vec![bench.events_topic()],
        store: bench.store.clone(),
    };
    let keyspace = &bench.settings.cql.keyspace;
    let before = probe::cql_counts(&bench.session, keyspace).await;
    let orders = ctx.orders();
    let report = replay::rebuild(&ctx, orders.clone(), StartAt::Earliest, false, &CancellationToken::new(), |_| {})
        .await
        .context("rebuilding the bench projection")?;
    let after = probe::cql_counts(&bench.session, keyspace).await;
    let events = report.applied + report.dead_lettered;
    let tables = replay::version_tables(&*orders, report.version);
    let mutations = probe::writes_between(before, after, &tables);
    let seconds = report.seconds.max(1e-9);
    Ok(RebuildReport {
        events,
        rows: report.rows,
        store_mutations: mutations,
        seconds: report.seconds,
        events_per_second: report.events_per_second,
        rows_per_second: report.rows as f64 / seconds,
        version: report.version,
    })
}
