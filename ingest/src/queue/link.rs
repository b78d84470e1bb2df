//! The edge's AMQP connection, kept up by a supervisor task.
//!
//! Publishers never connect: they take the current connection, or fail at
//! once with "unavailable" while there is none, so a request during an
//! outage gets its 503 immediately instead of waiting on a dead socket. The
//! supervisor owns connecting: it watches the connection, and when it drops
//! reconnects with exponential backoff up to a bound, forever, until the
//! queue is dropped. lapin's own auto-recovery is not used: the supervisor
//! must know when the link is down (readiness, fast 503s), and a fresh
//! connection with a fresh confirm channel is simpler to reason about than a
//! recovered one.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Waits between reconnection attempts: doubling from `first` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 2 s: a broker back from a restart is used
    /// within 2 s, and a broker that stays down gets a connection attempt
    /// every 2 s from each edge process, which costs it nothing.
    fn default() -> Self {
        Self { first: Duration::from_millis(100), max: Duration::from_secs(2) }
    }
}

impl Backoff {
    pub fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).clamp(self.first, self.max)
    }
}

/// How often the supervisor looks at a connection it has no news about.
/// Publishers that see a failure wake it at once (`suspect`).
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// What the supervisor shares with publishers.
pub(super) struct Link {
    /// The live connection and its generation; `None` while reconnecting.
    /// The generation tells a publisher that a channel it holds belongs to
    /// a connection that has since been replaced.
    current: RwLock<Option<(u64, Arc<Connection>)>>,
    /// Rung by publishers that saw an error, so a dead connection is noticed
    /// before the next health check.
    suspect: Notify,
}

impl Link {
    /// The live connection, if there is one.
    pub(super) fn current(&self) -> Option<(u64, Arc<Connection>)> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|(_, c)| c.status().connected()).cloned()
    }

    pub(super) fn suspect(&self) {
        self.suspect.notify_one();
    }

    fn install(&self, generation: u64, connection: Arc<Connection>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some((generation, connection));
    }

    fn clear(&self) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

pub(super) fn properties() -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name("sluice-ingest".into())
}

/// Connects once, bounded by `timeout`. The URL holds credentials: it is
/// never logged or put in an error.
pub(super) async fn connect(url: &str, timeout: Duration) -> Result<Connection, String> {
    match tokio::time::timeout(timeout, Connection::connect(url, properties())).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {} ms", timeout.as_millis())),
    }
}

/// Starts the supervisor with a first, already open connection. It runs
/// until `stop` is cancelled, then closes the connection.
pub(super) fn supervise(
    url: String,
    first: Connection,
    backoff: Backoff,
    connect_timeout: Duration,
    stop: CancellationToken,
) -> Arc<Link> {
    let link = Arc::new(Link { current: RwLock::new(None), suspect: Notify::new() });
    let shared = link.clone();
    // Whether the edge is connected, per connection (no credentials).
    let up = metrics::gauge!("sluice_amqp_connected", "connection" => sluice_telemetry::url_without_credentials(&url), "role" => "edge");
    tokio::spawn(async move {
        let mut next = Some(first);
        let mut generation = 0u64;
        let mut delay = backoff.first;
        loop {
            if let Some(connection) = next.take() {
                generation += 1;
                let connection = Arc::new(connection);
                shared.install(generation, connection.clone());
                up.set(1.0);
                delay = backoff.first;
                watch(&connection, &shared, &stop).await;
                shared.clear();
                up.set(0.0);
                if stop.is_cancelled() {
                    let _ = connection.close(200, "sluice edge stopping".into()).await;
                    return;
                }
                warn!("lost the connection to RabbitMQ; publishes answer 503 until it is back");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match connect(&url, connect_timeout).await {
                Ok(connection) => {
                    info!("reconnected to RabbitMQ");
                    next = Some(connection);
                }
                Err(error) => {
                    delay = backoff.next(delay);
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot reconnect to RabbitMQ");
                }
            }
        }
    });
    link
}

/// Returns when `connection` is no longer connected, or on `stop`.
async fn watch(connection: &Connection, link: &Link, stop: &CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.suspect.notified() => {}
            _ = tokio::time::sleep(HEALTH_CHECK) => {}
        }
        if !connection.status().connected() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let backoff = Backoff { first: Duration::from_millis(100), max: Duration::from_millis(350) };
        let mut d = backoff.first;
        let mut seen = Vec::new();
        for _ in 0..5 {
            d = backoff.next(d);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, [200, 350, 350, 350, 350]);
    }
}
