//! The read side: projections from Kafka into CQL read models, and the
//! queries the edge serves from them.
//!
//! - [`projection`]: the [`projection::Projection`] trait a read model
//!   implements in pure code (its tables, and the writes of each event).
//! - [`orders`], [`patients`]: the demo's projections.
//! - [`store`]: the CQL read models (versions, tables and the CQL of their
//!   writes, the queries the edge serves).
//! - [`apply`]: records into one version of a projection: decode, rows,
//!   dead-letter poison (decoding and dead-lettering are the
//!   `sluice_streams` runtime's).
//! - [`runner`]: the live consumer group of a projection on the streams
//!   runtime's batches (offsets stored only after a batch's writes).
//! - [`replay`]: replays and blue/green rebuilds from any offset or time.
#![forbid(unsafe_code)]

pub mod apply;
pub mod orders;
pub mod patients;
pub mod projection;
pub mod replay;
pub mod runner;
pub mod store;

use serde::{Deserialize, Serialize};

/// Settings of the projector role.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// The projection's name: its version row, table prefix and consumer
    /// group (letters, digits, underscores; default `orders`).
    pub name: String,
    /// The patients projection's name (default `patients`), as `name` is the
    /// orders projection's.
    pub patients_name: String,
    /// Consumer groups are `<group_prefix>.<projection>.v<version>`.
    pub group_prefix: String,
    /// How often applied offsets are written beside the rows (default 200 ms).
    pub offset_flush_ms: u64,
    /// How often the projector checks which version is active (default 1000 ms).
    pub version_poll_ms: u64,
    /// Records applied as one batch at most (default 2,000); 1 applies one
    /// record at a time. Batches only fill on a backlog (a batch is what the
    /// consumer holds, no waiting for more); there, 2,000 took less of the
    /// projector's CPU per row than 500 (3.9 against 4.7 µs in a pair of
    /// full bench runs) and wrote more rows a second.
    pub batch_max_records: usize,
    /// Keys (orders) of a batch applied at once (default 64); each key's
    /// records always one after the other.
    pub max_keys_in_flight: usize,
}

impl ProjectorConfig {
    /// How the streams runtime batches this projection's records.
    pub fn batching(&self) -> sluice_streams::batch::BatchConfig {
        sluice_streams::batch::BatchConfig {
            max_records: self.batch_max_records.max(1),
            max_keys_in_flight: self.max_keys_in_flight.max(1),
            ..Default::default()
        }
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            name: "orders".into(),
            patients_name: "patients".into(),
            group_prefix: "sluice.projection".into(),
            offset_flush_ms: 200,
            version_poll_ms: 1_000,
            batch_max_records: 2_000,
            max_keys_in_flight: 64,
        }
    }
}
