//! RabbitMQ side of the processors, split by role:
//!
//! - [`topology`]: partition queues and dead-letter queue of each tenant's
//!   context, declared idempotently.
//! - [`consumer`]: the consumer of one partition: rounds of its owner,
//!   retries after a backoff, and ack or dead letter — always publishing
//!   (with confirm) before acking, so no step can lose the message.
//! - [`redrive`]: periodic re-drive of dead letters whose cause was
//!   transient, and bookkeeping of broker-side (delivery limit) dead letters.
//! - [`headers`]: the `x-sluice-*` headers those steps read and write.

pub mod consumer;
pub mod headers;
pub mod redrive;
pub mod topology;

pub use consumer::{consume_partition, ConsumerSettings};
pub use topology::declare_topology;

/// Where each tenant's commands live: the AMQP URL of every connection (a
/// broker, or a vhost with its own user) and the tenants on it. Each tenant
/// is on exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers {
    connections: Vec<Broker>,
}

/// One connection and its tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Holds credentials: never logged (see [`Broker::label`]).
    pub url: String,
    pub tenants: Vec<String>,
}

impl Broker {
    /// The URL without credentials, for logs.
    pub fn label(&self) -> String {
        sluice_telemetry::url_without_credentials(&self.url)
    }
}

impl Brokers {
    pub fn new(connections: Vec<Broker>) -> Self {
        Self { connections }
    }

    pub fn connections(&self) -> &[Broker] {
        &self.connections
    }
}

impl IntoIterator for Brokers {
    type Item = Broker;
    type IntoIter = std::vec::IntoIter<Broker>;

    fn into_iter(self) -> Self::IntoIter {
        self.connections.into_iter()
    }
}

/// Connects to RabbitMQ as `name` (the connection name the management UI
/// shows), with `heartbeat_s` when the URL sets no heartbeat of its own.
pub async fn connect(url: &str, name: &str, heartbeat_s: u16) -> lapin::Result<lapin::Connection> {
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat_s);
    }
    let properties = lapin::ConnectionProperties::default().with_connection_name(name.into());
    lapin::Connection::connect_uri(uri, properties).await
}

/// Closes a channel or connection without waiting long: a close on a
/// connection the broker already dropped can wait forever in lapin, and a
/// close only says goodbye (everything was acked or confirmed before).
pub(crate) async fn close_quietly<T>(close: impl std::future::Future<Output = T>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
}
