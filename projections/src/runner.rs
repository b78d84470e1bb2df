//! The live projection: a Kafka consumer group per projection version
//! (`<prefix>.<projection>.v<N>`) applying records to that version's tables,
//! in batches of the streams runtime (`sluice_streams::batch`): records of
//! different keys at once, each key's in offset order, the next batch made
//! while one is written when records are waiting (a backlog drains at the
//! store's pace, not at the store's and the projector's one after the
//! other). Every [`Projection`] runs on it alike. A batch's offsets
//! are stored for commit only after every record of it is settled (applied
//! or dead-lettered), so a crash replays from the last settled batch, and the
//! writes (stamped with the event's version) make the replay harmless. When
//! a rebuild makes another version active, the projector moves to that
//! version's group, which the rebuild left at the end of the log.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use sluice_streams::batch;
use sluice_streams::consumer::subscribe;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::{Applier, OffsetTracker, Settling};
use crate::projection::Projection;
use crate::store::ReadModels;
use crate::ProjectorConfig;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Store(#[from] crate::store::ReadModelError),
}

/// The consumer group of one version of the orders projection (the one the
/// configuration names).
pub fn group_id(config: &ProjectorConfig, version: i32) -> String {
    group_of(config, &config.name, version)
}

/// The consumer group of one version of a projection.
pub fn group_of(config: &ProjectorConfig, projection: &str, version: i32) -> String {
    format!("{}.{projection}.v{version}", config.group_prefix)
}

pub struct Projector<P: Projection> {
    pub projection: Arc<P>,
    /// Group prefix, batching, flush and version-poll settings.
    pub config: ProjectorConfig,
    pub brokers: String,
    pub registry_url: String,
    pub topics: Vec<String>,
    pub store: Arc<ReadModels>,
}

impl<P: Projection> Projector<P> {
    /// Runs until `shutdown`, following the active version.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ProjectionError> {
        while !shutdown.is_cancelled() {
            let version = self.store.versions().get(self.projection.name()).await?.active;
            info!(projection = %self.projection.name(), version, "projecting");
            self.run_version(version, &shutdown).await?;
        }
        Ok(())
    }

    /// Consumes into `version` until shutdown or until another version is active.
    async fn run_version(&self, version: i32, shutdown: &CancellationToken) -> Result<(), ProjectionError> {
        let name = self.projection.name();
        let session = self.store.session().clone();
        let applier =
            Applier::new(&self.brokers, &self.registry_url, self.projection.clone(), session.clone(), version).await?;
        let offsets = Arc::new(OffsetTracker::new(session, name, version));
        let group = group_of(&self.config, name, version);
        let consumer = subscribe(&self.brokers, &group, &self.topics, applier.dead_letters())
            .map_err(crate::store::ReadModelError::from)?;

        // Stops this version's loop: on shutdown, or when the active version
        // changes (watched on its own task, so even a record stuck retrying
        // against a dropped table lets go).
        let stop = shutdown.child_token();
        let watcher = tokio::spawn(watch_version(
            self.store.clone(),
            name.to_owned(),
            version,
            self.config.version_poll_ms,
            stop.clone(),
        ));
        let lag_gauge = tokio::spawn(sluice_streams::lag::report_until(
            self.brokers.clone(),
            group,
            self.topics.clone(),
            name.to_owned(),
            stop.clone(),
        ));
        // Applied offsets go beside the rows every `offset_flush_ms`, on a
        // task of their own so an idle projector still writes its last ones.
        let flusher = tokio::spawn(flush_offsets(offsets.clone(), self.config.offset_flush_ms, stop.clone()));
        let settle = Settling::new(&applier, &stop).in_group(consumer.context().count());
        let note = |next: &[(String, i32, i64)]| {
            for (topic, partition, offset) in next {
                offsets.applied(topic, *partition, offset - 1);
            }
        };
        batch::consume(&consumer, &self.config.batching(), &stop, &settle, note).await;
        stop.cancel();
        let _ = flusher.await;
        watcher.abort();
        lag_gauge.abort();
        let _ = offsets.flush().await;
        sluice_streams::consumer::close(consumer, name).await;
        Ok(())
    }
}

/// Writes the applied offsets every `every_ms` until `stop`.
async fn flush_offsets(offsets: Arc<OffsetTracker>, every_ms: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = offsets.flush().await {
            warn!(error = %e, "could not record applied offsets");
        }
    }
}

/// Cancels `stop` once `version` is no longer the active one.
async fn watch_version(store: Arc<ReadModels>, name: String, version: i32, poll_ms: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(poll_ms));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.versions().get(&name).await {
            Ok(state) if state.active != version => {
                info!(from = version, to = state.active, "active version changed");
                stop.cancel();
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read the active version"),
        }
    }
}
