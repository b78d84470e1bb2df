//! The command queue as the edge sees it, and its RabbitMQ adapter.
//!
//! - [`link`]: keeps one AMQP connection up, reconnecting with bounded
//!   backoff when it drops, and says whether it is up (`/readyz`).
//! - [`publish`]: persistent, mandatory publishes with publisher confirms.
//!
//! `publish` returns `Ok` only once the broker confirmed that its queue holds
//! the message; the edge answers 202 on nothing else. Each error says whether
//! the broker may hold the message anyway (see [`QueueError`]).

mod link;
mod publish;
mod tenants;

use futures::future::BoxFuture;

pub use link::Backoff;
pub use publish::{AmqpCommandQueue, AmqpQueueSettings};
pub use tenants::{TenantConnection, TenantQueues};

/// One command, ready for the wire.
#[derive(Debug, Clone)]
pub struct QueuedCommand {
    pub routing_key: String,
    pub operation_id: String,
    pub tenant: String,
    /// Structured-mode CloudEvent JSON.
    pub body: Vec<u8>,
    /// CloudEvent attributes (and `traceparent`) as AMQP headers.
    pub headers: Vec<(String, String)>,
}

/// Why a publish did not end in a confirm. Every variant becomes `503` with
/// `Retry-After` at the edge; they differ in what the client is told about
/// the command.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// Nothing was sent: not connected (reconnecting), publishers blocked by
    /// a broker alarm, or no channel before the deadline. Nothing is queued.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered and did not keep the message (a nack, or a return
    /// because no queue is bound). Nothing is queued.
    #[error("broker refused the message: {0}")]
    Refused(String),
    /// The message went out but no answer came (timeout, or the connection
    /// died first): the broker may or may not hold it. Retrying the same
    /// CloudEvent is safe, since commands are deduplicated by (source, id).
    #[error("no confirm from the broker: {0}")]
    Unconfirmed(String),
}

impl QueueError {
    /// Whether the command may be queued despite the error.
    pub fn maybe_queued(&self) -> bool {
        matches!(self, Self::Unconfirmed(_))
    }
}

/// The command queue as the edge sees it.
pub trait CommandQueue: Send + Sync {
    /// Publishes one command; `Ok` only after the broker's confirm.
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Whether publishes can succeed right now, for every tenant.
    fn is_ready(&self) -> bool;
    /// Each connection behind this queue and whether it is up (`/readyz`).
    fn connections(&self) -> Vec<ConnectionState> {
        vec![ConnectionState { connection: "rabbitmq".into(), tenants: vec![], ready: self.is_ready() }]
    }
}

/// One connection of the edge, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionState {
    /// The URL without credentials.
    pub connection: String,
    pub tenants: Vec<String>,
    pub ready: bool,
}
