//! The rebuild rate: a blue/green rebuild of the bench projection from the
//! earliest offset of the bench tenant's topic into a fresh version, with the
//! code `sluice replay --rebuild` runs, in this process, after the roles have
//! stopped (so it has the machine to itself, as the raw phases had).

use anyhow::Context;
use sluice_projections::replay::{self, ReplayCtx, StartAt};
use sluice_schemas::orders::{OrderEvent, OrderLine, OrderSubmitted};
use tokio_util::sync::CancellationToken;

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
    let report = replay::rebuild(&ctx, StartAt::Earliest, false, &CancellationToken::new(), |_| {})
        .await
        .context("rebuilding the bench projection")?;
    let events = report.applied + report.dead_lettered;
    Ok(RebuildReport {
        events,
        seconds: report.seconds,
        events_per_second: report.events_per_second,
        writes_per_event: writes_per_submission(),
        version: report.version,
    })
}

/// CQL writes the projection makes for one OrderSubmitted (the only event
/// the benchmark produces): the figure that relates the rebuild's events/s
/// to the raw inserts/s.
fn writes_per_submission() -> usize {
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
    sluice_projections::orders::apply(&event, None).len()
}
