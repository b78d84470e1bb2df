//! The runtime under every Kafka consumer of events (DESIGN: `streams`):
//! what the projections and the process managers share, below both, so that
//! neither imports the other.
//!
//! - [`batch`]: records polled in batches, applied with different keys
//!   concurrently and each key in order, offsets stored only after the whole
//!   batch is settled.
//! - [`decode`]: a record's event through the registry, or why it cannot be
//!   applied ([`ApplyError`]: transient, or poison).
//! - [`dead_letter`]: poison records to `<topic>.<consumer>.dlt`, their keys
//!   parked so later records of the key follow them.
//! - [`lanes`]: records in one lane per key, polling going on while a key
//!   waits for a retry (process managers: one instance never holds back
//!   another).
//! - [`settle`]: one record applied for good, or dead-lettered.
//! - [`backoff`]: the one retry policy for transient failures.
//! - [`consumer`]: the group consumer they all use, whose rebalance hook has
//!   the parked keys read again when partitions are assigned, and its close.
//! - [`blocking`]: librdkafka calls that can block for good, run on a thread
//!   of their own and awaited up to a limit.
//! - [`lag`]: a group's lag per partition, and the gauge every consumer
//!   exports.
//! - [`clusters`]: which Kafka cluster holds each tenant's topics.
//! - [`replicas`]: which nodes hold a CQL write, so writes of many
//!   partitions share a batch (both sides write this way).
//! - [`group_commit`]: small writes that come while one is in flight go
//!   out together in the next.
//! - [`prepared`]: reads answered without their result metadata.
//!
//! The read models' `Projection` trait and the CQL of their writes live in
//! the `projections` crate (`projection`, `store::tables`), on this runtime.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod batch;
pub mod blocking;
pub mod clusters;
pub mod consumer;
pub mod dead_letter;
pub mod decode;
pub mod group_commit;
pub mod lag;
pub mod lanes;
pub mod prepared;
pub mod replicas;
pub mod settle;

pub use decode::{decode_record, ApplyError};

/// An error of the runtime's own storage (parked keys) or Kafka clients.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StreamsError(pub String);
