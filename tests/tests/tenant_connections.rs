//! Each tenant on its own connection: a tenant whose `amqp_url` names a vhost
//! of its own has its commands, retries and dead letters there, and nowhere
//! else. When that vhost goes away (no connection may be opened, the open
//! ones are closed), the tenant gets `503 unavailable` and nothing is queued
//! for it, while the other tenant keeps getting 202s end to end; when it is
//! back, the commands the tenant sends again go through, nothing lost or
//! duplicated.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sluice_cli::ops::status::{status, StatusOptions};
use sluice_cli::serve::Role;
use sluice_cli::settings::Settings;
use sluice_schemas::operation_id::OperationIds;
use sluice_tests::{
    assert_orders_in_kafka_exactly_once, eventually, rabbitmq_management, read_committed_topic, sluice_bin,
    submit_order, test_settings, Answer, Platform, TestTenant,
};

/// A vhost with a user of its own, deleted (queues and all) when dropped.
struct OwnVhost {
    name: String,
    password: String,
}

impl OwnVhost {
    async fn create(name: &str) -> Self {
        let vhost = Self { name: name.to_owned(), password: uuid::Uuid::new_v4().simple().to_string() };
        let put = |path: String, body: Value| async move {
            let response = rabbitmq_management(Method::PUT, &path, Some(body)).await;
            assert!(response.status().is_success(), "PUT {path}: {}", response.status());
        };
        put(format!("/vhosts/{name}"), json!({})).await;
        put(format!("/users/{name}"), json!({"password": vhost.password, "tags": "policymaker"})).await;
        put(format!("/permissions/{name}/{name}"), json!({"configure": ".*", "write": ".*", "read": ".*"})).await;
        vhost
    }

    /// The tenant's `amqp_url`: its own user and password.
    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/{}", self.name, self.password, self.name)
    }

    /// No connection may be opened in the vhost, and the open ones are closed.
    async fn take_away(&self) {
        let limit = format!("/vhost-limits/{}/max-connections", self.name);
        let response = rabbitmq_management(Method::PUT, &limit, Some(json!({"value": 0}))).await;
        assert!(response.status().is_success(), "PUT {limit}: {}", response.status());
        // The edge's and the processor's connections, at least: the
        // management API lists them a moment after they open.
        let closed = std::sync::atomic::AtomicUsize::new(0);
        eventually(Duration::from_secs(30), "every connection of the vhost closed", || async {
            let all: Vec<Value> = rabbitmq_management(Method::GET, "/connections", None).await.json().await.ok()?;
            let open: Vec<&Value> = all.iter().filter(|c| c["vhost"] == self.name.as_str()).collect();
            let closed = closed.fetch_add(open.len(), std::sync::atomic::Ordering::SeqCst) + open.len();
            for connection in &open {
                let name = connection["name"].as_str().unwrap_or_default();
                let encoded = utf8_percent_encode(name);
                rabbitmq_management(Method::DELETE, &format!("/connections/{encoded}"), None).await;
            }
            (open.is_empty() && closed >= 2).then_some(())
        })
        .await;
    }

    async fn bring_back(&self) {
        let limit = format!("/vhost-limits/{}/max-connections", self.name);
        let response = rabbitmq_management(Method::DELETE, &limit, None).await;
        assert!(response.status().is_success(), "DELETE {limit}: {}", response.status());
    }

    /// The names of the queues in `vhost` (`%2F` for the default one).
    async fn queues_in(vhost: &str) -> Vec<String> {
        let queues: Vec<Value> =
            rabbitmq_management(Method::GET, &format!("/queues/{vhost}"), None).await.json().await.expect("queues");
        queues.iter().filter_map(|q| q["name"].as_str().map(str::to_owned)).collect()
    }

    /// Consumers on the tenant's orders partition queue.
    async fn consumers(&self, queue: &str) -> u64 {
        let path = format!("/queues/{}/{queue}", self.name);
        let info: Value = rabbitmq_management(Method::GET, &path, None).await.json().await.unwrap_or(Value::Null);
        info["consumers"].as_u64().unwrap_or(0)
    }
}

impl Drop for OwnVhost {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: drop may run outside the test's runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                rabbitmq_management(Method::DELETE, &format!("/vhosts/{name}"), None).await;
                rabbitmq_management(Method::DELETE, &format!("/users/{name}"), None).await;
            });
        })
        .join();
    }
}

/// Percent-encodes a connection name for a management API path.
fn utf8_percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

async fn send(platform: &Platform, tenant: &TestTenant, event: &Value) -> Answer {
    Answer::read(platform.post_event(tenant, event).await).await
}

async fn readyz(platform: &Platform) -> (u16, Value) {
    let response = platform.http.get(platform.url("/readyz")).send().await.expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `/readyz`'s word on the connection of `tenant`.
fn connection_of<'a>(readyz: &'a Value, tenant: &TestTenant) -> Option<&'a Value> {
    readyz["connections"]
        .as_array()?
        .iter()
        .find(|c| c["tenants"].as_array().is_some_and(|t| t.contains(&json!(tenant.name))))
}

/// The `rabbitmq` lines of `sluice status`: (address, reachable, detail).
async fn rabbitmq_lines(settings: &Settings) -> Vec<(String, bool, String)> {
    let report = status(settings, &StatusOptions::default()).await.expect("status");
    report
        .servers
        .iter()
        .filter(|s| s.name == "rabbitmq")
        .map(|s| (s.address.clone(), s.reachable, s.detail.clone()))
        .collect()
}

/// `sluice_amqp_connected` of `role` for the connection to `vhost`, as this
/// process's metrics render it (the roles run in it).
fn connected_gauge(vhost: &str, role: &str) -> Option<f64> {
    let connection = format!("connection=\"amqp://127.0.0.1:5672/{vhost}\"");
    sluice_ingest::metrics::render()
        .lines()
        .find(|l| {
            l.starts_with("sluice_amqp_connected{")
                && l.contains(&connection)
                && l.contains(&format!("role=\"{role}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `sluice dlq list` with `settings`: its stdout and stderr.
fn dlq_list(settings: &Settings) -> (String, String) {
    let config = std::env::temp_dir().join(format!("sluice-config-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, toml::to_string(settings).expect("settings serialize")).expect("write config");
    let out = std::process::Command::new(sluice_bin())
        .arg("--config")
        .arg(&config)
        .args(["dlq", "list"])
        .output()
        .expect("run sluice dlq list");
    let _ = std::fs::remove_file(&config);
    assert!(out.status.success(), "sluice dlq list: {}", String::from_utf8_lossy(&out.stderr));
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_whose_vhost_is_gone_gets_503s_while_the_other_keeps_going_and_nothing_crosses_connections() {
    let shared = TestTenant::new();
    let own = TestTenant::new();
    let vhost = OwnVhost::create(&own.name).await;
    let mut settings = test_settings(&[&shared, &own]);
    settings.tenants[1].amqp_url = Some(vhost.url());
    let platform = Platform::start(settings.clone(), Role::All).await;
    let wait = Duration::from_secs(60);

    // Both connections up; /readyz names them without credentials.
    let (status, ready) = readyz(&platform).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")), "{ready}");
    assert_eq!(ready["connections"].as_array().map(Vec::len), Some(2), "{ready}");
    assert!(!ready.to_string().contains(&vhost.password), "/readyz shows a password: {ready}");

    // Both tenants, end to end.
    let mut shared_orders = Vec::new();
    let mut own_orders = Vec::new();
    for i in 0..3 {
        for (tenant, orders) in [(&shared, &mut shared_orders), (&own, &mut own_orders)] {
            let order = format!("before-{i}");
            let answer = send(&platform, tenant, &submit_order(tenant, &format!("c-before-{i}"), &order, "cu")).await;
            assert_eq!(answer.status, 202, "{}: {:?}", tenant.name, answer.body);
            let operation = answer.body["location"].as_str().expect("location").to_owned();
            let done = platform.await_operation(tenant, &operation, wait).await;
            assert_eq!(done["status"], "succeeded", "{done}");
            orders.push(order);
        }
    }

    // `sluice status` and the DLQ verbs cover both connections, each
    // with its tenants, and print no password.
    let lines = rabbitmq_lines(&settings).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|(_, up, _)| *up), "{lines:?}");
    assert!(lines[1].0.ends_with(&format!("/{}", own.name)) && lines[1].2.contains(&own.name), "{lines:?}");
    assert!(!format!("{lines:?}").contains(&vhost.password), "status shows a password: {lines:?}");
    let (listing, said) = dlq_list(&settings);
    for tenant in [&shared, &own] {
        let dlq = sluice_schemas::names::dead_letter_queue(&tenant.name, "orders");
        assert!(listing.contains(&dlq), "dlq list misses {dlq}: {listing}");
    }
    assert!(said.contains(&format!("/{} (tenants {})", own.name, own.name)), "dlq list names no connection: {said}");
    assert!(!format!("{listing}{said}").contains(&vhost.password), "dlq list shows a password");

    // The tenant's vhost goes away.
    vhost.take_away().await;
    eventually(Duration::from_secs(30), "/readyz to say the tenant's connection is down", || async {
        let (status, ready) = readyz(&platform).await;
        let down = connection_of(&ready, &own).is_some_and(|c| c["ready"] == false);
        let up = connection_of(&ready, &shared).is_some_and(|c| c["ready"] == true);
        (status == 200 && ready["status"] == "degraded" && down && up).then_some(())
    })
    .await;

    let lines = rabbitmq_lines(&settings).await;
    assert_eq!(lines.iter().map(|(_, up, _)| *up).collect::<Vec<_>>(), [true, false], "{lines:?}");
    // The metrics say which connection is down, for the edge and the processor.
    eventually(Duration::from_secs(30), "the connection gauges to say down", || async {
        let down =
            connected_gauge(&own.name, "edge") == Some(0.0) && connected_gauge(&own.name, "processor") == Some(0.0);
        (down && connected_gauge("%2f", "edge") == Some(1.0)).then_some(())
    })
    .await;
    assert!(lines[1].2.contains(&own.name), "the connection down names its tenant: {lines:?}");

    // Its commands get 503 `unavailable` (nothing queued), the other
    // tenant's go through end to end.
    let mut refused = Vec::new();
    for i in 0..5 {
        let (id, order) = (format!("c-during-{i}"), format!("during-{i}"));
        let event = submit_order(&own, &id, &order, "cu");
        let answer = send(&platform, &own, &event).await;
        answer.assert_problem(503, "unavailable", "the tenant whose vhost is gone");
        refused.push((id, order, event));

        let order = format!("during-{i}");
        let answer = send(&platform, &shared, &submit_order(&shared, &format!("c-during-{i}"), &order, "cu")).await;
        assert_eq!(answer.status, 202, "the other tenant: {:?}", answer.body);
        let operation = answer.body["location"].as_str().expect("location").to_owned();
        let done = platform.await_operation(&shared, &operation, wait).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        shared_orders.push(order);
    }

    // Back again: the edge and the processors reconnect by themselves.
    vhost.bring_back().await;
    eventually(Duration::from_secs(30), "/readyz to say ready again", || async {
        let (status, ready) = readyz(&platform).await;
        (status == 200 && ready["status"] == "ready").then_some(())
    })
    .await;
    let queue = sluice_schemas::names::command_queue(&own.name, "orders", 0);
    eventually(wait, "a processor consuming the tenant's partition again", || async {
        (vhost.consumers(&queue).await > 0).then_some(())
    })
    .await;
    // A connection that came back can still drop once more while the
    // vhost settles (its gauge goes to 0 until the next reconnect): await
    // both gauges rather than read them once.
    eventually(wait, "the edge's and the processor's connections to the vhost to say connected", || async {
        (connected_gauge(&own.name, "edge") == Some(1.0) && connected_gauge(&own.name, "processor") == Some(1.0))
            .then_some(())
    })
    .await;
    // A command sent now is decided after anything queued before it in its
    // partition, so once it succeeded, a refused command that had been
    // queued anyway would have been decided too. None was: each operation
    // still says `accepted` (what the API says of an id it signed and
    // never saw processed).
    let answer = send(&platform, &own, &submit_order(&own, "c-after", "after", "cu")).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let operation = answer.body["location"].as_str().expect("location").to_owned();
    assert_eq!(platform.await_operation(&own, &operation, wait).await["status"], "succeeded");
    own_orders.push("after".into());
    let ids = OperationIds::new(&settings.ingest.operation_secret);
    for (id, _, _) in &refused {
        let operation = ids.issue(&own.name, &own.source, id);
        let (status, body) = platform.get_json(&own, &format!("/operations/{operation}")).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("accepted")), "a refused command was queued: {body}");
    }

    // The client sends the refused commands again: each goes through once.
    for (_, order, event) in &refused {
        let answer = send(&platform, &own, event).await;
        assert_eq!(answer.status, 202, "{:?}", answer.body);
        let operation = answer.body["location"].as_str().expect("location").to_owned();
        assert_eq!(platform.await_operation(&own, &operation, wait).await["status"], "succeeded");
        own_orders.push(order.clone());
    }
    assert_orders_in_kafka_exactly_once(&own, &own_orders).await;
    assert_orders_in_kafka_exactly_once(&shared, &shared_orders).await;

    // Nothing crossed: each tenant's queues are on its own connection only,
    // and each topic holds its own tenant's events only.
    let default_vhost = OwnVhost::queues_in("%2F").await;
    let own_vhost = OwnVhost::queues_in(&own.name).await;
    let prefix = |t: &TestTenant| format!("{}.", t.name);
    assert!(
        default_vhost.iter().any(|q| q.starts_with(&prefix(&shared))),
        "the shared tenant's queues: {default_vhost:?}"
    );
    assert!(!default_vhost.iter().any(|q| q.starts_with(&prefix(&own))), "the tenant's queues on the shared vhost");
    assert!(own_vhost.iter().any(|q| q.starts_with(&prefix(&own))), "no queue of the tenant on its vhost");
    assert!(
        own_vhost.iter().all(|q| q.starts_with(&prefix(&own))),
        "another tenant's queue on its vhost: {own_vhost:?}"
    );
    for tenant in [&shared, &own] {
        let topic = sluice_schemas::names::events_topic(&tenant.name, "orders");
        for record in read_committed_topic(&topic).await {
            use rdkafka::message::{Headers, Message};
            let source = record
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "ce_source").and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            assert_eq!(source, format!("/sluice/{}/orders", tenant.name), "{topic} holds another tenant's event");
        }
    }

    platform.stop().await.unwrap();
}
