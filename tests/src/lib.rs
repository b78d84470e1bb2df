//! Harness for the end-to-end tests: starts sluice roles in-process against
//! the real servers of `compose/native`, each test with its own tenant (so its
//! own queues, topics and rows), and gives clients for looking at every hop
//! from outside.
//!
//! A missing server is a failure with a message saying which one and how to
//! start it (`make up`), never a skipped test.
#![forbid(unsafe_code)]

pub mod chaos;

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

/// Where the in-process roles of this test binary log ([`Platform::start`]):
/// a file per binary and run in the temp folder, named in a helper's timeout
/// message, so a failure in CI leaves what the roles did behind. At `info`
/// unless `SLUICE_LOG` says otherwise.
static PLATFORM_LOG: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

fn log_platform_to_file() {
    PLATFORM_LOG.get_or_init(|| {
        let binary = std::env::current_exe().ok()?.file_stem()?.to_string_lossy().into_owned();
        let path = std::env::temp_dir().join(format!("sluice-tests-{binary}-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).ok()?;
        let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn,scylla=error"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .try_init()
            .ok()?;
        Some(path)
    });
}

/// " (the roles' log: <path>)" once [`Platform::start`] set one up.
pub fn platform_log_hint() -> String {
    match PLATFORM_LOG.get() {
        Some(Some(path)) => format!(" (the in-process roles' log: {})", path.display()),
        _ => String::new(),
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
            keys: vec![KeyConfig {
                sha256: hex::encode(hash_key(&self.key)),
                commands: vec![],
                name: format!("{}-test", self.name),
            }],
            amqp_url: None,
            kafka_brokers: None,
        }
    }
}

impl Default for TestTenant {
    fn default() -> Self {
        Self::new()
    }
}

/// Puts the edge of `settings` on a loopback port free when asked (for a
/// sluice run as a process of its own, whose port the test must know);
/// returns the edge's base URL.
pub fn edge_on_free_port(settings: &mut Settings) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    settings.ingest.http_addr = format!("127.0.0.1:{port}");
    format!("http://127.0.0.1:{port}")
}

/// Settings for a test: the dev defaults, the given tenants, port 0, and a
/// projection group of its own.
pub fn test_settings(tenants: &[&TestTenant]) -> Settings {
    let mut settings = Settings::load(None).expect("default settings load");
    settings.ingest.http_addr = "127.0.0.1:0".into();
    settings.tenants = tenants.iter().map(|t| t.config()).collect();
    // Projections of its own: their version rows, tables and consumer groups.
    let id = uuid::Uuid::new_v4().simple().to_string();
    settings.projector.name = format!("orders_{}", &id[..10]);
    settings.projector.patients_name = format!("patients_{}", &id[..10]);
    // Short delay tiers and a quick re-drive, so failure tests finish fast.
    settings.processor.retry_delays_ms = vec![200, 500, 1_000];
    settings.processor.redrive_interval_ms = 2_000;
    // One partition per context unless a test is about partitioning: every
    // command of the test tenant's context is then in `<t>.<c>.commands.0`
    // ([`orders_queue`]); the partition consumer's logic is the same for
    // any count, and the tests that share partitions set their own count.
    settings.amqp.partitions = 1;
    // A process-manager consumer group of its own, like the projection's.
    settings.processor.processes.consumer_group = format!("sluice.process.test.{}", uuid::Uuid::new_v4().simple());
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
        log_platform_to_file();
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let task = tokio::spawn(serve(settings, role, shutdown.clone(), Some(tx)));
        // Roles without the edge drop `ready` once started; a role that fails
        // to start ends the task.
        let base_url = match rx.await {
            Ok(addr) => format!("http://{addr}"),
            Err(_) if !task.is_finished() => String::new(),
            Err(_) => {
                let result = task.await.expect("serve task");
                panic!("sluice did not start: {result:?}");
            }
        };
        Self { base_url, shutdown, http: reqwest::Client::new(), task: Some(task) }
    }

    /// Stops every role and waits until they have drained: a platform that
    /// does not stop within [`STOP_WITHIN`] fails the test (a hung shutdown
    /// must not hang the suite).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => match tokio::time::timeout(STOP_WITHIN, task).await {
                Ok(stopped) => stopped?,
                Err(_) => panic!("the platform did not stop within {STOP_WITHIN:?}{}", platform_log_hint()),
            },
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

/// How long [`Platform::stop`] waits for every role to drain.
const STOP_WITHIN: Duration = Duration::from_secs(90);

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
            panic!("timed out after {timeout:?} waiting for {what}{}", platform_log_hint());
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
        let consumer = reader(KAFKA);
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

/// A queue as the broker sees it now (passive declare), `None` while it does
/// not exist: straight from the broker, not the management API's statistics.
async fn passive_queue(queue: &str) -> Option<lapin::Queue> {
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
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
        .ok();
    let _ = connection.close(200, "bye".into()).await;
    q
}

/// Messages ready in a queue (the queue must exist).
pub async fn queue_depth(queue: &str) -> u32 {
    passive_queue(queue).await.expect("queue exists").message_count()
}

// ---------------------------------------------------------------------------
// sluice as separate processes (competing consumers, SIGKILL tests)

/// The `sluice` binary of this workspace. `make test` builds it before the
/// tests run (`cargo test` alone does not build binaries of other packages).
pub fn sluice_bin() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/sluice");
    assert!(bin.exists(), "{} is missing: run `cargo build -p sluice-cli` (make test does)", bin.display());
    bin
}

/// A `sluice serve` child process, killed (SIGKILL) when dropped.
pub struct SluiceProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    _config: tempfile_path::TempPath,
}

impl SluiceProcess {
    /// Starts `sluice serve --role <role>` with `settings` written to a file.
    pub fn spawn(settings: &Settings, role: &str) -> Self {
        Self::spawn_with_log_level(settings, role, "info")
    }

    /// Like [`SluiceProcess::spawn`], logging at `level` (`SLUICE_LOG`).
    pub fn spawn_with_log_level(settings: &Settings, role: &str, level: &str) -> Self {
        let config = tempfile_path::TempPath::new("toml");
        std::fs::write(&config.0, toml::to_string(settings).expect("settings serialize")).expect("write config");
        let log = std::env::temp_dir().join(format!("sluice-test-{}.log", uuid::Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(sluice_bin())
            .arg("--config")
            .arg(&config.0)
            .args(["serve", "--role", role])
            .env("SLUICE_LOG", level)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn sluice");
        Self { child, log, _config: config }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process freezes mid-work; its sockets stay open.
    pub fn freeze(&self) {
        let status = std::process::Command::new("kill").args(["-STOP", &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "SIGSTOP");
    }

    /// SIGCONT: a frozen process goes on where it stopped.
    pub fn thaw(&self) {
        let status = std::process::Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "SIGCONT");
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("wait for sluice")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Consumers currently on a queue (0 while the queue does not exist yet).
pub async fn queue_consumers(queue: &str) -> u32 {
    passive_queue(queue).await.map_or(0, |q| q.consumer_count())
}

mod tempfile_path {
    /// A file path under the temp dir, removed on drop.
    pub struct TempPath(pub std::path::PathBuf);

    impl TempPath {
        pub fn new(ext: &str) -> Self {
            Self(std::env::temp_dir().join(format!("sluice-{}.{ext}", uuid::Uuid::new_v4().simple())))
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

// ---------------------------------------------------------------------------
// Straight to the broker and the stores, bypassing the edge

/// Publishes a message straight into a queue (default exchange) and waits
/// for the broker's confirm.
pub async fn publish_raw(queue: &str, body: &[u8], message_id: Option<&str>, headers: lapin::types::FieldTable) {
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (make up)");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.expect("confirm mode");
    let mut properties = lapin::BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "broker did not take the message: {confirm:?}");
    let _ = connection.close(200, "bye".into()).await;
}

/// Takes every message of a queue (acking them): for tests that inspect a
/// queue nobody else consumes. Consumes rather than `basic.get`, which
/// quorum queues with a single active consumer refuse.
pub async fn drain_queue(queue: &str) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
    read_queue(queue, true).await
}

/// Every message of `queue` as it stands, left in the queue: consumed
/// without acks, then handed back when the channel closes.
pub async fn peek_queue(queue: &str) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
    read_queue(queue, false).await
}

/// Consumes as many messages as `queue` holds now; `take` acks them (they
/// are gone), otherwise they go back to the queue with the channel.
async fn read_queue(queue: &str, take: bool) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
    use futures::StreamExt;
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (make up)");
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let depth = channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .expect("queue exists")
        .message_count();
    let mut out = Vec::new();
    if depth > 0 {
        let options = lapin::options::BasicConsumeOptions { no_ack: take, ..Default::default() };
        let mut consumer = channel
            .basic_consume(queue.into(), "read".into(), options, lapin::types::FieldTable::default())
            .await
            .expect("basic.consume");
        while out.len() < depth as usize {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .unwrap_or_else(|_| panic!("{queue}: {} of {depth} messages came within 10 s", out.len()))
                .expect("consumer open")
                .expect("delivery");
            out.push((delivery.properties.clone(), delivery.data.clone()));
        }
    }
    let _ = channel.close(200, "read".into()).await;
    let _ = connection.close(200, "bye".into()).await;
    out
}

/// Events stored for one order stream: (version, event_type, command_key).
pub async fn stored_events(tenant: &str, order_id: &str) -> Vec<(i64, String, String)> {
    stored_events_in(&*cql().await, tenant, order_id).await
}

/// [`stored_events`] over an open session (checks of thousands of orders).
pub async fn stored_events_in(
    session: &scylla::client::session::Session,
    tenant: &str,
    order_id: &str,
) -> Vec<(i64, String, String)> {
    let rows = session
        .query_unpaged(
            "SELECT version, event_type, command_key FROM sluice.events WHERE tenant = ? AND context = 'orders' AND stream_id = ?",
            (tenant, order_id),
        )
        .await
        .expect("events query")
        .into_rows_result()
        .expect("rows");
    rows.rows::<(i64, String, String)>().expect("typed rows").map(|r| r.expect("row")).collect()
}

/// A string header of an AMQP message.
pub fn amqp_header(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

// ---------------------------------------------------------------------------
// The edge from outside (tests/tests/edge_*.rs): answers read whole, problem
// documents, the tenant's command queue.

/// The work queue a tenant's orders commands land in (one partition, as
/// [`test_settings`] sets).
pub fn orders_queue(tenant: &TestTenant) -> String {
    sluice_schemas::names::command_queue(&tenant.name, "orders", 0)
}

/// The DLQ of a tenant's orders commands.
pub fn orders_dlq(tenant: &TestTenant) -> String {
    sluice_schemas::names::dead_letter_queue(&tenant.name, "orders")
}

/// An HTTP answer read whole: status, headers, and the body as JSON
/// (`Null` when it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        Self { status, headers, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem document: `status`, content type
    /// `application/problem+json`, type `https://sluice.dev/problems/<kind>`,
    /// the same status inside, a detail, and `Retry-After` on 429 and 503.
    pub fn assert_problem(&self, status: u16, kind: &str, context: &str) {
        assert_eq!(self.status, status, "{context}: status; body {}", self.body);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{context}: content type");
        assert_eq!(
            self.body["type"],
            format!("https://sluice.dev/problems/{kind}"),
            "{context}: type; body {}",
            self.body
        );
        assert_eq!(self.body["status"], status, "{context}: status member");
        assert!(self.body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{context}: detail");
        if status == 429 || status == 503 {
            let seconds: u64 = self.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(0);
            assert!(seconds >= 1, "{context}: Retry-After on {status}");
        }
    }

    /// Whether the problem's `errors` (batch entries' own `errors` included)
    /// hold an entry whose `key` is `value`.
    pub fn names(&self, key: &str, value: &Value) -> bool {
        fn any(errors: &Value, key: &str, value: &Value) -> bool {
            errors.as_array().into_iter().flatten().any(|e| &e[key] == value || any(&e["errors"], key, value))
        }
        any(&self.body["errors"], key, value)
    }
}

/// Deletes a queue (and its messages) once a test is done with it, so big
/// test runs leave no backlog on the shared broker.
pub async fn delete_queue(queue: &str) {
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (make up)");
    let channel = connection.create_channel().await.expect("channel");
    channel.queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default()).await.expect("queue.delete");
    let _ = connection.close(200, "bye".into()).await;
}

/// A request to RabbitMQ's management API (guest, loopback only).
pub async fn rabbitmq_management(method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().request(method, format!("{MANAGEMENT_API}{path}")).basic_auth("guest", Some("guest"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("RabbitMQ management API at 127.0.0.1:15672 (make up)")
}

/// A queue as the management API shows it (its counters lag by a few
/// seconds); `None` while the API does not answer with it.
pub async fn queue_info(queue: &str) -> Option<Value> {
    rabbitmq_management(reqwest::Method::GET, &format!("/queues/%2F/{queue}"), None).await.json().await.ok()
}

/// The partition queues of a tenant's context under `settings`.
pub fn partition_queues(settings: &Settings, tenant: &TestTenant, context: &str) -> Vec<String> {
    (0..settings.amqp.partitions).map(|p| sluice_schemas::names::command_queue(&tenant.name, context, p)).collect()
}

/// The processor holding a partition queue: the instance in the tag of the
/// queue's single active consumer (`<instance>/<queue>`).
pub async fn partition_owner(queue: &str) -> Option<String> {
    let info = queue_info(queue).await?;
    let tag = info["single_active_consumer_ctag"].as_str()?;
    Some(tag.strip_suffix(&format!("/{queue}")).unwrap_or(tag).to_owned())
}

/// Each partition queue's owner, once every one of them has exactly one
/// consumer (none waiting in a handover); `None` before.
pub async fn settled_owners(queues: &[String]) -> Option<Vec<String>> {
    let mut owners = Vec::with_capacity(queues.len());
    for queue in queues {
        if queue_consumers(queue).await != 1 {
            return None;
        }
        owners.push(partition_owner(queue).await?);
    }
    Some(owners)
}

/// Redeliveries summed over `queues` (a context's partitions).
pub async fn redeliveries_of(queues: &[String]) -> i64 {
    let mut total = 0;
    for queue in queues {
        total += redeliveries(queue).await;
    }
    total
}

/// How many times the broker delivered messages of `queue` again.
pub async fn redeliveries(queue: &str) -> i64 {
    queue_info(queue).await.and_then(|info| info["message_stats"]["redeliver"].as_i64()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Read models, straight from the CQL store

/// Every read-model row of `tenant` in one version of a projection, as
/// comparable text (write timestamps excluded): orders, customer lists, sales.
pub async fn read_model_rows(
    projection: &str,
    version: i32,
    tenant: &str,
    order_ids: &[String],
    customer_ids: &[String],
) -> Vec<String> {
    let session = cql().await;
    let mut rows = Vec::new();
    for id in order_ids {
        let result = session
            .query_unpaged(
                format!("SELECT JSON * FROM sluice.{projection}_by_id_v{version} WHERE tenant = ? AND order_id = ?"),
                (tenant, id),
            )
            .await
            .expect("orders_by_id")
            .into_rows_result()
            .expect("rows");
        for row in result.rows::<(String,)>().expect("json rows") {
            rows.push(format!("order {}", row.expect("row").0));
        }
    }
    for customer in customer_ids {
        let result = session
            .query_unpaged(format!("SELECT JSON * FROM sluice.{projection}_by_customer_v{version} WHERE tenant = ? AND customer_id = ?"), (tenant, customer))
            .await
            .expect("orders_by_customer")
            .into_rows_result()
            .expect("rows");
        for row in result.rows::<(String,)>().expect("json rows") {
            rows.push(format!("customer {}", row.expect("row").0));
        }
    }
    let result = session
        .query_unpaged(
            format!("SELECT JSON * FROM sluice.{projection}_sales_by_day_v{version} WHERE tenant = ? ALLOW FILTERING"),
            (tenant,),
        )
        .await
        .expect("sales_by_day")
        .into_rows_result()
        .expect("rows");
    for row in result.rows::<(String,)>().expect("json rows") {
        rows.push(format!("sale {}", row.expect("row").0));
    }
    rows.sort();
    rows
}

/// The CQL session with keyspace `sluice` selected, for the store types.
pub async fn cql_sluice() -> Arc<scylla::client::session::Session> {
    let session = cql().await;
    session.use_keyspace("sluice", false).await.expect("keyspace sluice");
    session
}

// ---------------------------------------------------------------------------
// Dead-letter tooling and `sluice status` (tests/tests/dlq_*.rs, status.rs):
// dead letters written straight into a tenant's DLQ the way the processors
// write them, and the ops functions of `sluice_cli::ops`.

/// One dead letter to seed, with the headers the consumer would have written.
#[derive(Debug, Clone)]
pub struct SeedLetter {
    pub message_id: String,
    /// The CloudEvent type; `None` writes a body that is not JSON at all.
    pub command_type: Option<String>,
    /// `x-sluice-error-class`; `None` seeds a message RabbitMQ dead-lettered
    /// itself (delivery limit), with `x-death` and no sluice verdict.
    pub class: Option<String>,
    pub reason: String,
    pub attempts: i64,
    pub dead_lettered_at: chrono::DateTime<chrono::Utc>,
}

/// `n` dead letters named `<prefix>-000`…: one in three a CancelOrder whose
/// retries ran out, the others malformed SubmitOrders.
pub fn letters(prefix: &str, n: usize) -> Vec<SeedLetter> {
    (0..n)
        .map(|i| {
            let (ty, class) = if i % 3 == 0 {
                ("com.example.orders.CancelOrder", "retries_exhausted")
            } else {
                ("com.example.orders.SubmitOrder", "malformed_command")
            };
            SeedLetter::new(&format!("{prefix}-{i:03}"), Some(ty), Some(class), "seeded")
        })
        .collect()
}

impl SeedLetter {
    pub fn new(message_id: &str, command_type: Option<&str>, class: Option<&str>, reason: &str) -> Self {
        Self {
            message_id: message_id.to_owned(),
            command_type: command_type.map(str::to_owned),
            class: class.map(str::to_owned),
            reason: reason.to_owned(),
            attempts: if class == Some("retries_exhausted") { 6 } else { 1 },
            dead_lettered_at: chrono::Utc::now(),
        }
    }

    /// The body and headers of this dead letter in `tenant`'s DLQ.
    pub fn message(&self, tenant: &TestTenant) -> (Vec<u8>, lapin::types::FieldTable) {
        use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
        let s = |v: &str| AMQPValue::LongString(LongString::from(v));
        let queue = orders_queue(tenant);
        let body = match &self.command_type {
            Some(ty) => json!({"specversion": "1.0", "id": format!("cmd-{}", self.message_id), "source": tenant.source, "type": ty,
                               "datacontenttype": "application/json", "data": {"order_id": format!("o-{}", self.message_id)}})
            .to_string()
            .into_bytes(),
            None => format!("\u{0}garbage {}", self.message_id).into_bytes(),
        };
        let mut headers = FieldTable::default();
        let at = self.dead_lettered_at.to_rfc3339();
        headers.insert("traceparent".into(), s("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        match &self.class {
            Some(class) => {
                headers.insert("x-sluice-attempt".into(), AMQPValue::LongLongInt(self.attempts));
                headers.insert("x-sluice-reason".into(), s(&self.reason));
                headers.insert("x-sluice-error-class".into(), s(class));
                headers.insert("x-sluice-original-queue".into(), s(&queue));
                headers.insert("x-sluice-dead-lettered-at".into(), s(&at));
                if class == "retries_exhausted" {
                    let mut history = FieldArray::default();
                    for attempt in 1..=self.attempts {
                        history.push(s(&format!("{at} attempt {attempt}: {}", self.reason)));
                    }
                    headers.insert("x-sluice-attempt-history".into(), AMQPValue::FieldArray(history));
                }
            }
            None => {
                let mut death = FieldTable::default();
                death.insert("queue".into(), s(&queue));
                death.insert("reason".into(), s("delivery_limit"));
                death.insert("count".into(), AMQPValue::LongLongInt(1));
                death.insert("exchange".into(), s("sluice.commands"));
                death.insert("time".into(), AMQPValue::Timestamp(self.dead_lettered_at.timestamp() as u64));
                let mut deaths = FieldArray::default();
                deaths.push(AMQPValue::FieldTable(death));
                headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
                headers.insert("x-first-death-reason".into(), s("delivery_limit"));
                headers.insert("x-first-death-queue".into(), s(&queue));
            }
        }
        (body, headers)
    }
}

/// Publishes dead letters into `tenant`'s orders DLQ, in order, each
/// confirmed by the broker (publishes pipelined, confirms awaited per batch).
pub async fn seed_dead_letters(tenant: &TestTenant, letters: &[SeedLetter]) {
    seed_dead_letters_claiming(tenant, tenant, letters).await;
}

/// [`seed_dead_letters`] into `tenant`'s DLQ of letters whose headers say
/// they came from `claimed`'s work queue (a forged or misrouted message).
pub async fn seed_dead_letters_claiming(tenant: &TestTenant, claimed: &TestTenant, letters: &[SeedLetter]) {
    let dlq = sluice_schemas::names::dead_letter_queue(&tenant.name, "orders");
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (make up)");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.expect("confirm mode");
    for chunk in letters.chunks(200) {
        let mut confirms = Vec::new();
        for letter in chunk {
            let (body, headers) = letter.message(claimed);
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(letter.message_id.as_str().into())
                .with_content_type("application/cloudevents+json".into())
                .with_headers(headers);
            let options = lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() };
            confirms.push(
                channel
                    .basic_publish("".into(), dlq.as_str().into(), options, &body, properties)
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            let confirm = confirm.await.expect("confirm");
            assert!(
                matches!(confirm, lapin::Confirmation::Ack(None)),
                "broker did not take a dead letter: {confirm:?}"
            );
        }
    }
    let _ = connection.close(200, "seeded".into()).await;
}

/// Declares `tenant`'s queues (partition queues, DLQ) as the edge does.
pub async fn declare_tenant_queues(settings: &Settings, tenant: &TestTenant) {
    sluice_cli::serve::declare_topology(settings, std::slice::from_ref(&tenant.name))
        .await
        .expect("declare the tenant's queues");
}

/// Deletes `tenant`'s queues (every context's) once a test is done with them.
pub async fn delete_tenant_queues(settings: &Settings, tenant: &TestTenant) {
    for context in sluice_schemas::catalog::CONTEXTS {
        delete_queue(&sluice_schemas::names::dead_letter_queue(&tenant.name, context.name)).await;
        for partition in 0..settings.amqp.partitions {
            delete_queue(&sluice_schemas::names::command_queue(&tenant.name, context.name, partition)).await;
        }
    }
}

/// The DLQ verbs on the local broker.
pub async fn dlq_ops() -> sluice_cli::ops::dlq::Dlq {
    require_stack().await;
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let management = sluice_cli::ops::management::Management::new(url, None).expect("management API address");
    sluice_cli::ops::dlq::Dlq::connect(url, management).await.expect("RabbitMQ at 127.0.0.1:5672 (make up)")
}

/// A parking queue of `tenant` (a quorum queue beside its work queues).
pub async fn parking_queue(tenant: &TestTenant) -> String {
    let parking = format!("{}.parking", orders_queue(tenant));
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(parking.as_str().into(), durable, args).await.unwrap();
    let _ = connection.close(200, "declared".into()).await;
    parking
}

/// The DLQs of one test tenant.
pub fn tenant_scope(tenant: &TestTenant) -> sluice_cli::ops::dlq::Scope {
    sluice_cli::ops::dlq::Scope::new(&[], Some(&tenant.name), Some("orders")).expect("scope")
}

/// Message ids of the messages a queue hands out, taking them all (acked):
/// for the final count of a test.
pub async fn drain_ids(queue: &str) -> Vec<String> {
    drain_queue(queue)
        .await
        .into_iter()
        .map(|(p, _)| p.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default())
        .collect()
}

/// Runs the `sluice` binary with `settings` as its config file, to its end;
/// its standard input is not a terminal (as in a script).
pub fn run_sluice(settings: &Settings, args: &[&str]) -> std::process::Output {
    let config = tempfile_path::TempPath::new("toml");
    std::fs::write(&config.0, toml::to_string(settings).expect("settings serialize")).expect("write config");
    std::process::Command::new(sluice_bin())
        .arg("--config")
        .arg(&config.0)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output()
        .expect("run sluice")
}

/// The `sluice` binary started with `settings` as its config file and its
/// standard output piped, for a test that talks to it while it runs.
pub struct SluiceChild {
    pub child: std::process::Child,
    _config: tempfile_path::TempPath,
}

pub fn spawn_sluice(settings: &Settings, args: &[&str]) -> SluiceChild {
    let config = tempfile_path::TempPath::new("toml");
    std::fs::write(&config.0, toml::to_string(settings).expect("settings serialize")).expect("write config");
    let child = std::process::Command::new(sluice_bin())
        .arg("--config")
        .arg(&config.0)
        .args(args)
        .env("SLUICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sluice");
    SluiceChild { child, _config: config }
}

/// [`run_sluice`], read as an operator reads it: (exit 0?, stdout, stderr).
pub fn sluice_says(settings: &Settings, args: &[&str]) -> (bool, String, String) {
    let out = run_sluice(settings, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every record of a topic from the beginning, read for a few seconds by a
/// consumer group of its own.
pub async fn read_topic(topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer = reader(KAFKA);
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(300)) {
                out.push(m.detach());
            }
        }
        out
    })
    .await
    .expect("reader thread")
}

/// The dev stack's Kafka.
pub const KAFKA: &str = "127.0.0.1:9092";

/// A consumer of its own group (never committing) that reads as a data
/// team's would: `read_committed`, from the earliest record.
fn reader(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("sluice.test.reader.{}", uuid::Uuid::new_v4().simple()))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer")
}

/// Every record of a topic, read as a data team would: `read_committed`,
/// from the beginning to the end the topic had when the read began.
pub async fn read_committed_topic(topic: &str) -> Vec<OwnedMessage> {
    read_committed_topic_at(KAFKA, topic).await
}

/// [`read_committed_topic`] on the Kafka cluster at `brokers`.
pub async fn read_committed_topic_at(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer = reader(&brokers);
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout).expect("metadata");
        let mut assignment = TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(&topic, p.id(), timeout).expect("watermarks");
            assignment.add_partition_offset(&topic, p.id(), Offset::Beginning).expect("assignment");
            ends.push((p.id(), high));
        }
        consumer.assign(&assignment).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(result) = consumer.poll(Duration::from_millis(200)) {
                out.push(result.expect("kafka record").detach());
            }
            // Read to the end: the position passes the last record and the
            // transaction markers after it.
            let positions = consumer.position().expect("positions");
            let done = ends.iter().all(|(p, high)| {
                *high == 0
                    || matches!(positions.find_partition(&topic, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *high)
            });
            if done {
                return out;
            }
            assert!(Instant::now() < deadline, "{topic} not read to its end within 120 s");
        }
    })
    .await
    .expect("reader thread")
}

/// Checks the orders topic of `tenant` the way a data team's consumer sees
/// it (`read_committed`, from the start): for each of `orders`, the records
/// keyed by it must be its stored events, each exactly once, in version
/// order. Answers what differs, one line per order.
pub async fn orders_off_in_kafka(tenant: &TestTenant, orders: &[String]) -> Vec<String> {
    orders_off_in_kafka_at(KAFKA, tenant, orders).await
}

/// [`orders_off_in_kafka`] with the tenant's topic on the cluster at `brokers`.
pub async fn orders_off_in_kafka_at(brokers: &str, tenant: &TestTenant, orders: &[String]) -> Vec<String> {
    let topic = sluice_schemas::names::events_topic(&tenant.name, "orders");
    let records = read_committed_topic_at(brokers, &topic).await;
    let mut by_key: std::collections::HashMap<Vec<u8>, Vec<String>> = std::collections::HashMap::new();
    for record in &records {
        use rdkafka::message::Headers;
        let id = record
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_id").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("every record has a ce_id");
        by_key.entry(record.key().unwrap_or_default().to_vec()).or_default().push(id);
    }
    let session = cql().await;
    let mut off = Vec::new();
    for order in orders {
        let rows = session
            .query_unpaged(
                "SELECT version, event_id FROM sluice.events WHERE tenant = ? AND context = 'orders' AND stream_id = ?",
                (&tenant.name, order),
            )
            .await
            .expect("events query")
            .into_rows_result()
            .expect("rows");
        let stored: Vec<String> =
            rows.rows::<(i64, String)>().expect("typed rows").map(|r| r.expect("row").1).collect();
        let seen = by_key.get(order.as_bytes()).cloned().unwrap_or_default();
        if seen != stored {
            off.push(format!("{order}: Kafka has {seen:?}, the event store {stored:?}"));
        }
    }
    if !off.is_empty() {
        for line in partition_ends(brokers, &topic).await {
            eprintln!("{line}");
        }
    }
    off
}

/// Each partition of `topic` with its high watermark and its last stable
/// offset (the end a `read_committed` reader stops at): a last stable
/// offset below the high watermark for long is a transaction left open.
async fn partition_ends(brokers: &str, topic: &str) -> Vec<String> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let committed = reader(&brokers);
        let timeout = Duration::from_secs(10);
        let metadata = committed.fetch_metadata(Some(&topic), timeout).expect("metadata");
        let raw: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("sluice.test.ends.{}", uuid::Uuid::new_v4().simple()))
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("kafka consumer");
        metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .map(|p| {
                let stable = committed.fetch_watermarks(&topic, p.id(), timeout).map(|(_, end)| end);
                let high = raw.fetch_watermarks(&topic, p.id(), timeout).map(|(_, end)| end);
                format!("{topic}/{}: high watermark {high:?}, last stable offset {stable:?}", p.id())
            })
            .collect()
    })
    .await
    .expect("watermarks thread")
}

/// [`orders_off_in_kafka`] finds nothing.
pub async fn assert_orders_in_kafka_exactly_once(tenant: &TestTenant, orders: &[String]) {
    let off = orders_off_in_kafka(tenant, orders).await;
    assert!(off.is_empty(), "{} order(s) not in Kafka exactly once in order:\n{}", off.len(), off.join("\n"));
}

/// Whether consumer `group` has read `topics` to their ends: a lag is known
/// for at least one partition, every partition holding records has a
/// committed offset, and none lags (an empty answer or a partition never
/// committed is not "caught up").
pub async fn caught_up(brokers: &str, group: &str, topics: &[String]) -> bool {
    let Ok(lag) = sluice_streams::lag::group_lag(brokers, group, topics).await else { return false };
    !lag.is_empty() && lag.iter().all(|p| p.lag == 0 && (p.end == 0 || p.committed.is_some()))
}
