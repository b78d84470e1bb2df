//! Publishing accepted commands to RabbitMQ: persistent, mandatory, with
//! publisher confirms. `publish` returns only once the broker confirmed the
//! message is stored in its queue; anything else is an error the edge turns
//! into 503, and then nothing was queued (a nack or return means the broker
//! did not keep it).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Mutex, Semaphore};

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

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker refused the message: {0}")]
    Refused(String),
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
}

/// The command queue as the edge sees it.
pub trait CommandQueue: Send + Sync {
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>>;
    fn is_ready(&self) -> bool;
}

/// The real queue: one confirm channel, reopened after a failure.
pub struct AmqpCommandQueue {
    connection: Arc<Connection>,
    channel: Mutex<Option<Channel>>,
    exchange: String,
    confirm_timeout: Duration,
    /// Bounds publishes awaiting a confirm.
    in_flight: Semaphore,
}

impl AmqpCommandQueue {
    pub fn new(connection: Arc<Connection>, exchange: &str, confirm_timeout: Duration, max_in_flight: usize) -> Self {
        Self {
            connection,
            channel: Mutex::new(None),
            exchange: exchange.to_owned(),
            confirm_timeout,
            in_flight: Semaphore::new(max_in_flight),
        }
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await.map_err(|e| QueueError::Unavailable(e.to_string()))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn publish_confirmed(&self, command: &QueuedCommand) -> Result<(), QueueError> {
        let _permit = self.in_flight.acquire().await.map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let channel = self.channel().await?;
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
            .basic_publish(self.exchange.as_str().into(), command.routing_key.as_str().into(), options, &command.body, properties)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        match confirm.await.map_err(|e| QueueError::Unavailable(e.to_string()))? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(QueueError::Refused(format!("no queue is bound for {}", command.routing_key))),
            Confirmation::Nack(_) => Err(QueueError::Refused("nack (queue full or unavailable)".into())),
            Confirmation::NotRequested => Err(QueueError::Unavailable("channel is not in confirm mode".into())),
        }
    }
}

impl CommandQueue for AmqpCommandQueue {
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.confirm_timeout, self.publish_confirmed(command)).await {
                Ok(result) => result,
                Err(_) => Err(QueueError::Timeout(self.confirm_timeout)),
            }
        })
    }

    fn is_ready(&self) -> bool {
        self.connection.status().connected()
    }
}
