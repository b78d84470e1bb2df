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

/// Closes a channel or connection without waiting long: a close on a
/// connection the broker already dropped can wait forever in lapin, and a
/// close only says goodbye (everything was acked or confirmed before).
pub(crate) async fn close_quietly<T>(close: impl std::future::Future<Output = T>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
}
