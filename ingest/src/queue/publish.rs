//! Publishing with confirms: persistent, mandatory, on one confirm channel of
//! the supervised connection. A publish has two phases, and which one fails
//! decides what the client is told:
//!
//! 1. before the first frame leaves (a permit, the connection, a channel):
//!    a failure means nothing was sent, hence nothing queued;
//! 2. from the first frame on, only the broker's answer tells: an ack is the
//!    202, a nack or a return means it did not keep the message, and no
//!    answer (timeout, dead connection) means it may or may not hold it.
//!
//! Both phases share one deadline, `confirm_timeout`, so a request never
//! waits longer than that on RabbitMQ, whatever state it is in.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, ErrorKind};
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::link::{self, Backoff, Link};
use super::{CommandQueue, QueueError, QueuedCommand};

/// Settings of the RabbitMQ command queue.
#[derive(Debug, Clone)]
pub struct AmqpQueueSettings {
    /// `amqp://user:password@host:port/vhost`; never logged.
    pub url: String,
    pub exchange: String,
    /// Longest a publish may take in all, waiting for a permit and a channel
    /// included: the bound on how long a client waits for its 503.
    pub confirm_timeout: Duration,
    /// Publishes awaiting a confirm at once.
    pub max_in_flight: usize,
    pub reconnect: Backoff,
    /// Longest one connection attempt may take.
    pub connect_timeout: Duration,
}

impl AmqpQueueSettings {
    /// The edge's queue: its configuration, the command exchange, reconnects
    /// from 100 ms up to every 2 s, connection attempts of at most 5 s.
    pub fn for_edge(url: &str, config: &crate::IngestConfig) -> Self {
        Self {
            url: url.to_owned(),
            exchange: sluice_schemas::names::COMMAND_EXCHANGE.to_owned(),
            confirm_timeout: Duration::from_millis(config.confirm_timeout_ms),
            max_in_flight: config.max_in_flight,
            reconnect: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The real queue: a supervised connection and one confirm channel on it,
/// reopened after a failure.
pub struct AmqpCommandQueue {
    link: Arc<Link>,
    /// The confirm channel and the connection generation it belongs to.
    channel: Mutex<Option<(u64, Channel)>>,
    exchange: String,
    confirm_timeout: Duration,
    /// Bounds publishes awaiting a confirm.
    in_flight: Semaphore,
    /// Stops the supervisor (and closes the connection) when the queue goes.
    _stop: DropGuard,
}

impl AmqpCommandQueue {
    /// Connects once (so a wrong URL or a missing broker fails startup
    /// loudly), then leaves the connection to the supervisor.
    pub async fn connect(settings: AmqpQueueSettings) -> Result<Self, QueueError> {
        let first = link::connect(&settings.url, settings.connect_timeout)
            .await
            .map_err(|e| QueueError::Unavailable(format!("connecting to RabbitMQ: {e}")))?;
        let stop = CancellationToken::new();
        let link = link::supervise(settings.url, first, settings.reconnect, settings.connect_timeout, stop.clone());
        Ok(Self {
            link,
            channel: Mutex::new(None),
            exchange: settings.exchange,
            confirm_timeout: settings.confirm_timeout,
            in_flight: Semaphore::new(settings.max_in_flight),
            _stop: stop.drop_guard(),
        })
    }

    /// Phase 1: a permit and an open confirm channel; nothing is sent.
    async fn prepare(&self) -> Result<(SemaphorePermit<'_>, Channel), QueueError> {
        let permit =
            self.in_flight.acquire().await.map_err(|_| QueueError::Unavailable("the queue is closed".into()))?;
        let (generation, connection) = self
            .link
            .current()
            .ok_or_else(|| QueueError::Unavailable("not connected to RabbitMQ (reconnecting)".into()))?;
        if connection.status().blocked() {
            return Err(QueueError::Unavailable("RabbitMQ blocks publishers (a resource alarm)".into()));
        }
        let mut slot = self.channel.lock().await;
        if let Some((_, channel)) = slot.as_ref().filter(|(g, c)| *g == generation && c.status().connected()) {
            return Ok((permit, channel.clone()));
        }
        let opened = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = opened.await.map_err(|e| {
            self.link.suspect();
            QueueError::Unavailable(format!("opening a channel: {e}"))
        })?;
        *slot = Some((generation, channel.clone()));
        Ok((permit, channel))
    }

    /// Phase 2: publish and await the broker's answer.
    async fn send(&self, channel: &Channel, command: &QueuedCommand) -> Result<(), QueueError> {
        let mut headers = FieldTable::default();
        for (name, value) in &command.headers {
            headers.insert(name.as_str().into(), AMQPValue::LongString(LongString::from(value.as_str())));
        }
        headers.insert("sluice-tenant".into(), AMQPValue::LongString(LongString::from(command.tenant.as_str())));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_message_id(command.operation_id.as_str().into())
            .with_app_id("sluice-ingest".into())
            .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default())
            .with_headers(headers);
        // mandatory: a message no queue takes comes back instead of vanishing.
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                command.routing_key.as_str().into(),
                options,
                &command.body,
                properties,
            )
            .await
            .map_err(|e| {
                self.link.suspect();
                match e.kind() {
                    // lapin checks the channel before queueing any frame.
                    ErrorKind::InvalidChannelState(_, "basic.publish") => {
                        QueueError::Unavailable(format!("channel closed: {e}"))
                    }
                    _ => QueueError::Unconfirmed(e.to_string()),
                }
            })?;
        let confirmation = confirm.await.map_err(|e| {
            self.link.suspect();
            QueueError::Unconfirmed(e.to_string())
        })?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(QueueError::Refused(format!("no queue is bound for {}", command.routing_key)))
            }
            Confirmation::Nack(_) => Err(QueueError::Refused("nack (queue full or unavailable)".into())),
            // Cannot happen on a channel in confirm mode; if it did, the
            // message went out without a promise either way.
            Confirmation::NotRequested => Err(QueueError::Unconfirmed("the channel is not in confirm mode".into())),
        }
    }
}

impl CommandQueue for AmqpCommandQueue {
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.confirm_timeout;
            let waited = self.confirm_timeout.as_millis();
            let (_permit, channel) = timeout_at(deadline, self.prepare())
                .await
                .map_err(|_| QueueError::Unavailable(format!("no channel to RabbitMQ within {waited} ms")))??;
            timeout_at(deadline, self.send(&channel, command)).await.map_err(|_| {
                self.link.suspect();
                QueueError::Unconfirmed(format!("no confirm within {waited} ms"))
            })?
        })
    }

    fn is_ready(&self) -> bool {
        self.link.current().is_some_and(|(_, connection)| !connection.status().blocked())
    }
}
