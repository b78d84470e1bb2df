//! Each tenant's commands on its own connection: the edge keeps one
//! [`CommandQueue`] per distinct AMQP URL (a broker, or a vhost with its own
//! user) and sends each command to its tenant's. A connection that is down
//! answers 503 for its own tenants only.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{CommandQueue, ConnectionState, QueueError, QueuedCommand};

/// One connection and the tenants behind it.
pub struct TenantConnection {
    /// What `/readyz` and logs call it: the URL without credentials.
    pub label: String,
    pub tenants: Vec<String>,
    pub queue: Arc<dyn CommandQueue>,
}

/// The queues of every tenant, one per connection.
pub struct TenantQueues {
    connections: Vec<TenantConnection>,
    /// tenant → index into `connections`.
    by_tenant: HashMap<String, usize>,
}

impl TenantQueues {
    /// Panics if a tenant is on two connections: the configuration groups
    /// tenants by URL, so each is on exactly one.
    pub fn new(connections: Vec<TenantConnection>) -> Self {
        let mut by_tenant = HashMap::new();
        for (i, connection) in connections.iter().enumerate() {
            for tenant in &connection.tenants {
                assert!(by_tenant.insert(tenant.clone(), i).is_none(), "tenant {tenant} on two connections");
            }
        }
        Self { connections, by_tenant }
    }
}

impl CommandQueue for TenantQueues {
    fn publish<'a>(&'a self, command: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>> {
        match self.by_tenant.get(&command.tenant) {
            Some(&i) => self.connections[i].queue.publish(command),
            None => {
                let tenant = command.tenant.clone();
                Box::pin(async move { Err(QueueError::Unavailable(format!("no connection for tenant {tenant}"))) })
            }
        }
    }

    fn is_ready(&self) -> bool {
        self.connections.iter().all(|c| c.queue.is_ready())
    }

    fn connections(&self) -> Vec<ConnectionState> {
        self.connections
            .iter()
            .map(|c| ConnectionState {
                connection: c.label.clone(),
                tenants: c.tenants.clone(),
                ready: c.queue.is_ready(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Counting {
        published: AtomicUsize,
        down: AtomicBool,
    }

    impl CommandQueue for Counting {
        fn publish<'a>(&'a self, _: &'a QueuedCommand) -> BoxFuture<'a, Result<(), QueueError>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(QueueError::Unavailable("down".into()));
                }
                self.published.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }
        fn is_ready(&self) -> bool {
            !self.down.load(Ordering::SeqCst)
        }
    }

    fn command(tenant: &str) -> QueuedCommand {
        QueuedCommand {
            routing_key: format!("{tenant}.orders.0"),
            operation_id: "op".into(),
            tenant: tenant.into(),
            body: vec![],
            headers: vec![],
        }
    }

    #[tokio::test]
    async fn each_tenant_publishes_on_its_own_connection_and_only_its_own_goes_down() {
        let (shared, own) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let queues = TenantQueues::new(vec![
            TenantConnection {
                label: "amqp://mq/%2f".into(),
                tenants: vec!["acme".into(), "initech".into()],
                queue: shared.clone(),
            },
            TenantConnection { label: "amqp://mq/globex".into(), tenants: vec!["globex".into()], queue: own.clone() },
        ]);
        for tenant in ["acme", "initech", "globex"] {
            queues.publish(&command(tenant)).await.unwrap();
        }
        assert_eq!((shared.published.load(Ordering::SeqCst), own.published.load(Ordering::SeqCst)), (2, 1));
        assert!(matches!(queues.publish(&command("hooli")).await, Err(QueueError::Unavailable(_))));

        own.down.store(true, Ordering::SeqCst);
        assert!(matches!(queues.publish(&command("globex")).await, Err(QueueError::Unavailable(_))));
        queues.publish(&command("acme")).await.unwrap();
        assert!(!queues.is_ready());
        let states = queues.connections();
        assert_eq!(states.iter().map(|s| s.ready).collect::<Vec<_>>(), [true, false]);
        assert_eq!(states[1].tenants, ["globex"]);
    }
}
