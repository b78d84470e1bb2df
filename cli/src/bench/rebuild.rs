//! The rebuild rate: a blue/green rebuild of the bench projection from the
//! earliest offset of the bench tenant's topic into a fresh version, with the
//! code `sluice replay --rebuild` runs, in this process, after the roles have
//! stopped (so it has the machine to itself, as the raw phases had).
//!
//! Its rows per second compare with the raw batched insert's rows per
//! second: the rows are counted by the CQL store itself (writes on the new
//! version's tables), where it keeps such counts.

use anyhow::Context;
use sluice_projections::replay::{self, ReplayCtx, StartAt};
use sluice_schemas::cql;
use sluice_schemas::orders::{OrderEvent, OrderLine, OrderSubmitted};
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
    let report = replay::rebuild(&ctx, StartAt::Earliest, false, &CancellationToken::new(), |_| {})
        .await
        .context("rebuilding the bench projection")?;
    let after = probe::cql_counts(&bench.session, keyspace).await;
    let events = report.applied + report.dead_lettered;
    let tables = cql::read_model_tables(&bench.settings.projector.name, report.version);
    let counted = before.zip(after).map(|(before, after)| {
        tables
            .iter()
            .map(|t| {
                let then = before.get(t).map_or(0, |c| c.writes);
                after.get(t).map_or(0, |c| c.writes).saturating_sub(then)
            })
            .sum::<u64>()
    });
    let rows = counted.unwrap_or(events * writes_per_submission());
    let seconds = report.seconds.max(1e-9);
    Ok(RebuildReport {
        events,
        rows,
        rows_counted_by_store: counted.is_some(),
        seconds: report.seconds,
        events_per_second: report.events_per_second,
        rows_per_second: rows as f64 / seconds,
        version: report.version,
    })
}

/// CQL rows the projection writes for one OrderSubmitted: the estimate
/// where the store counts no writes.
fn writes_per_submission() -> u64 {
    let event = OrderEvent::Submitted(OrderSubmitted {
        event_id: "e".into(),
        order_id: "o".into(),
        version: 1,
        occurred_at: 0,
        customer_id: "c".into(),
        currency: "EUR".into(),
        lines: vec![OrderLine { sku: "s".into(), quantity: 1, unit_price_cents: 1 }],
        total_cents: 1,
    });
    sluice_projections::orders::apply(&event, None).len() as u64
}
