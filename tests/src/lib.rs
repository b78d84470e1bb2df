//! Harness for the end-to-end tests: starts sluice roles in-process against
//! the real servers of `compose/native`, each test with its own tenant (so its
//! own queues, topics and rows), and gives clients for looking at every hop
//! from outside.
//!
//! A missing server is a failure with a message saying which one and how to
//! start it (`make up`), never a skipped test.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sluice_cli::serve::{serve, Role};
use sluice_cli::settings::Settings;
use sluice_ingest::auth::{hash_key, KeyConfig, TenantConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const MANAGEMENT_API: &str = "http://127.0.0.1:15672/api";

/// Fails with a clear message when a server of the stack is not answering.
pub async fn require_stack() {
    let checks = [("RabbitMQ", 5672), ("Kafka", 9092), ("schema registry", 8081), ("CQL store", 9042)];
    for (name, port) in checks {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            panic!("{name} is not answering on 127.0.0.1:{port}: start the stack with `make up`");
        }
    }
}

/// A tenant of its own for one test.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub name: String,
    pub key: String,
    pub source: String,
}

impl TestTenant {
    pub fn new() -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let name = format!("t{id}");
        Self { key: format!("{name}-key-{}", uuid::Uuid::new_v4().simple()), source: format!("/{name}/shop"), name }
    }

    pub fn config(&self) -> TenantConfig {
        TenantConfig {
            name: self.name.clone(),
            sources: vec![format!("/{}/", self.name)],
            keys: vec![KeyConfig { sha256: hex::encode(hash_key(&self.key)), commands: vec![], name: format!("{}-test", self.name) }],
        }
    }
}

impl Default for TestTenant {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings for a test: the dev defaults, the given tenants, port 0, and a
/// projection group of its own.
pub fn test_settings(tenants: &[&TestTenant]) -> Settings {
    let mut settings = Settings::load(None).expect("default settings load");
    settings.ingest.http_addr = "127.0.0.1:0".into();
    settings.tenants = tenants.iter().map(|t| t.config()).collect();
    settings.projector.group = format!("sluice.test.{}", uuid::Uuid::new_v4().simple());
    settings.processor.retry_base_ms = 50;
    settings.processor.retry_max_ms = 500;
    settings
}

/// Roles running in this process until dropped or stopped.
pub struct Platform {
    pub base_url: String,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Platform {
    pub async fn start(settings: Settings, role: Role) -> Self {
        require_stack().await;
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let task = tokio::spawn(serve(settings, role, shutdown.clone(), Some(tx)));
        let addr = match rx.await {
            Ok(addr) => addr,
            Err(_) => {
                let result = task.await.expect("serve task");
                panic!("sluice did not start: {result:?}");
            }
        };
        Self { base_url: format!("http://{addr}"), shutdown, http: reqwest::Client::new(), task: Some(task) }
    }

    /// Stops every role and waits until they have drained.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// POSTs one structured-mode CloudEvent.
    pub async fn post_event(&self, tenant: &TestTenant, event: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/events"))
            .bearer_auth(&tenant.key)
            .header("content-type", "application/cloudevents+json")
            .body(event.to_string())
            .send()
            .await
            .expect("POST /events")
    }

    pub async fn get_json(&self, tenant: &TestTenant, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).bearer_auth(&tenant.key).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls an operation until it reaches a terminal state.
    pub async fn await_operation(&self, tenant: &TestTenant, location: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("operation {location} to finish"), || async {
            let (status, body) = self.get_json(tenant, location).await;
            let state = body["status"].as_str().unwrap_or_default().to_owned();
            (status == 200 && matches!(state.as_str(), "succeeded" | "rejected" | "dead_lettered")).then_some(body)
        })
        .await
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Awaits a condition by polling it; panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A SubmitOrder CloudEvent of `tenant`.
pub fn submit_order(tenant: &TestTenant, id: &str, order_id: &str, customer_id: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": tenant.source,
        "type": "com.example.orders.SubmitOrder",
        "datacontenttype": "application/json",
        "data": {
            "order_id": order_id,
            "customer_id": customer_id,
            "currency": "EUR",
            "lines": [
                {"sku": "tea", "quantity": 2, "unit_price_cents": 450},
                {"sku": "cup", "quantity": 1, "unit_price_cents": 1200}
            ]
        }
    })
}

/// A command event of any type for `tenant`.
pub fn command(tenant: &TestTenant, id: &str, ty: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": tenant.source, "type": ty, "data": data})
}

/// Reads one Kafka record at a known position, as any outside consumer would.
pub async fn read_record(topic: &str, partition: i32, offset: i64) -> OwnedMessage {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9092")
            .set("group.id", format!("sluice.test.reader.{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("kafka consumer");
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&topic, partition, Offset::Offset(offset)).expect("assignment");
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(result) = consumer.poll(Duration::from_millis(500)) {
                let message = result.expect("kafka record");
                if message.offset() == offset {
                    return message.detach();
                }
            }
        }
        panic!("no record at {topic}/{partition}@{offset}");
    })
    .await
    .expect("reader thread")
}

/// A CQL session on keyspace `sluice`.
pub async fn cql() -> Arc<scylla::client::session::Session> {
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node("127.0.0.1:9042")
        .build()
        .await
        .expect("CQL store at 127.0.0.1:9042 (make up)");
    Arc::new(session)
}

/// Messages ready in a queue, straight from the broker (passive declare), not
/// from the management API's periodic statistics.
pub async fn queue_depth(queue: &str) -> u32 {
    let connection = lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 (make up)");
    let channel = connection.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = connection.close(200, "bye".into()).await;
    q.message_count()
}
