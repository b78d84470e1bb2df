//! RabbitMQ side of the processors, split by role:
//!
//! - [`topology`]: work queue, delay (retry) queues and dead-letter queue of
//!   each tenant's context, declared idempotently.
//! - [`consumer`]: the consumer loop that turns a pipeline outcome into ack,
//!   delayed retry or dead letter — always publishing (with confirm) before
//!   acking, so no step can lose the message.
//! - [`redrive`]: periodic re-drive of dead letters whose cause was
//!   transient, and bookkeeping of broker-side (delivery limit) dead letters.
//! - [`headers`]: the `x-sluice-*` headers those steps read and write.

pub mod consumer;
pub mod headers;
pub mod redrive;
pub mod topology;

pub use consumer::{consume, ConsumerSettings};
pub use topology::declare_topology;
