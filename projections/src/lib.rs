//! The read side: projections from Kafka into CQL read models, and the
//! queries the edge serves from them.
//!
//! - [`orders`]: pure functions from an order event to read-model writes.
//! - [`store`]: the CQL read models (writes and queries).
//! - [`runner`]: the Kafka consumer loop (commit only after the writes).
#![forbid(unsafe_code)]

pub mod orders;
pub mod runner;
pub mod store;

use serde::Deserialize;

/// Settings of the projector role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Kafka consumer group of the orders projection.
    pub group: String,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self { group: "sluice.projection.orders".into() }
    }
}
