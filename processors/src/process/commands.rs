//! Commands of process managers onto the normal command path: a CloudEvent
//! published persistent to exchange `sluice.commands` with routing key
//! `<tenant>.<context>`, awaited until the broker confirms. The CloudEvent's
//! id derives from (process, correlation, step), and the operation id (AMQP
//! `message_id`) is signed from it as the edge signs clients' ids, so sending
//! a step again is a redelivery the processors deduplicate, never a second
//! command, and its operation can be read at `GET /operations/{id}`.

use std::future::Future;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::json;
use sluice_schemas::names;
use sluice_schemas::operation_id::OperationIds;
use tokio::sync::Mutex;

use super::CommandIntent;
use crate::amqp::Brokers;

/// A command as the process sends it.
#[derive(Debug, Clone)]
pub struct OutgoingCommand<'a> {
    pub tenant: &'a str,
    pub process: &'a str,
    pub correlation: &'a str,
    pub intent: &'a CommandIntent,
}

impl OutgoingCommand<'_> {
    /// The CloudEvent `source` of a process's commands.
    pub fn source(&self) -> String {
        names::process_source(self.tenant, self.process)
    }

    /// The CloudEvent `id`: one per step of one process instance.
    pub fn command_id(&self) -> String {
        format!("{}:{}:{}", self.process, self.correlation, self.intent.step)
    }

    /// The operation id, from the same inputs as the edge's ids.
    pub fn operation_id(&self, ids: &OperationIds) -> String {
        ids.issue(self.tenant, &self.source(), &self.command_id())
    }

    pub fn cloud_event(&self) -> serde_json::Value {
        json!({
            "specversion": "1.0",
            "id": self.command_id(),
            "source": self.source(),
            "type": self.intent.ty,
            "datacontenttype": "application/json",
            "subject": self.correlation,
            "data": self.intent.data,
        })
    }
}

/// Sending failed or was not confirmed: the step is tried again.
#[derive(Debug, thiserror::Error)]
#[error("sending a command: {0}")]
pub struct SendError(pub String);

pub trait CommandSender: Send + Sync {
    /// Resolves once the broker confirmed the command is queued.
    fn send(&self, command: OutgoingCommand<'_>) -> impl Future<Output = Result<(), SendError>> + Send;
}

/// Publishes over one confirm channel per connection (each tenant's
/// commands on its tenant's), reconnecting after a failure.
pub struct AmqpCommandSender {
    brokers: Brokers,
    operation_ids: OperationIds,
    /// Each connection of `brokers` and its confirm channel, opened on
    /// first use.
    channels: Vec<Mutex<Option<(Connection, Channel)>>>,
    confirm_timeout: Duration,
    /// Partitions of every context's commands (`amqp.partitions`).
    partitions: u16,
}

impl AmqpCommandSender {
    pub fn new(brokers: Brokers, operation_ids: OperationIds, partitions: u16) -> Self {
        Self {
            channels: brokers.connections().iter().map(|_| Mutex::new(None)).collect(),
            brokers,
            operation_ids,
            confirm_timeout: Duration::from_secs(10),
            partitions,
        }
    }

    /// Connects and opens a confirm channel, within the confirm timeout (a
    /// broker that is starting can accept the socket and never answer).
    async fn open(&self, url: &str) -> Result<(Connection, Channel), SendError> {
        let err = |e: lapin::Error| SendError(e.to_string());
        let open = async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await.map_err(err)?;
            let channel = connection.create_channel().await.map_err(err)?;
            channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(err)?;
            Ok((connection, channel))
        };
        tokio::time::timeout(self.confirm_timeout, open)
            .await
            .unwrap_or_else(|_| Err(SendError("RabbitMQ did not answer in time".into())))
    }
}

impl CommandSender for AmqpCommandSender {
    async fn send(&self, command: OutgoingCommand<'_>) -> Result<(), SendError> {
        let tenant = command.tenant;
        let Some(i) = self.brokers.connections().iter().position(|c| c.tenants.iter().any(|t| t == tenant)) else {
            return Err(SendError(format!("no RabbitMQ connection for tenant {tenant}")));
        };
        let mut guard = self.channels[i].lock().await;
        if guard.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            *guard = Some(self.open(&self.brokers.connections()[i].url).await?);
        }
        let (_, channel) = guard.as_ref().expect("opened above");
        let body = command.cloud_event().to_string();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(command.operation_id(&self.operation_ids).into())
            .with_content_type("application/cloudevents+json".into());
        // Its stream's partition, as the edge routes a client's command.
        let partition = sluice_schemas::catalog::stream_key(&command.intent.ty, &command.intent.data)
            .map_or(0, |key| names::command_partition(command.tenant, key, self.partitions));
        let routing_key = names::routing_key(command.tenant, &command.intent.context, partition);
        let result = async {
            let confirm = channel
                .basic_publish(
                    names::COMMAND_EXCHANGE.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    body.as_bytes(),
                    properties,
                )
                .await
                .map_err(|e| SendError(e.to_string()))?;
            match tokio::time::timeout(self.confirm_timeout, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(other)) => Err(SendError(format!("not confirmed by the broker: {other:?}"))),
                Ok(Err(e)) => Err(SendError(e.to_string())),
                Err(_) => Err(SendError("no confirm in time".into())),
            }
        }
        .await;
        if result.is_err() {
            // Start over with a fresh channel next time.
            *guard = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_always_gets_the_same_command_and_operation_ids() {
        let intent =
            CommandIntent { step: "reminder-1".into(), context: "patients".into(), ty: "t".into(), data: json!({}) };
        let a = OutgoingCommand { tenant: "acme", process: "onboarding", correlation: "p1", intent: &intent };
        let b = a.clone();
        let ids = OperationIds::new("secret");
        assert_eq!(a.command_id(), "onboarding:p1:reminder-1");
        assert_eq!(a.operation_id(&ids), b.operation_id(&ids));
        assert!(ids.verify("acme", &a.operation_id(&ids)), "signed for its tenant, as the edge signs");
        let other = CommandIntent { step: "reminder-2".into(), ..intent.clone() };
        assert_ne!(OutgoingCommand { intent: &other, ..a.clone() }.operation_id(&ids), a.operation_id(&ids));
        assert_eq!(a.cloud_event()["source"], "/acme/processes/onboarding");
    }
}
