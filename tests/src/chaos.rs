//! The chaos run: a fixed number of commands from several concurrent clients
//! while processors and projectors are killed with SIGKILL and RabbitMQ, Kafka
//! and Cassandra are each restarted once; then, once quiet, every promise is
//! checked against the stores. Used by `tests/chaos.rs` (short) and runnable
//! at any size: `SLUICE_CHAOS_COMMANDS=10000 cargo test -p sluice-tests --test chaos -- --nocapture`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use sluice_projections::store::ReadModels;
use sluice_schemas::operation_id::OperationIds;
use tokio::sync::Mutex;

use crate::*;

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Commands to send (orders, follow-ups, duplicates and poison together).
    pub commands: usize,
    pub clients: usize,
    /// Kill and restart things while sending.
    pub faults: bool,
    /// How long the system may take to become quiet afterwards.
    pub settle_timeout: Duration,
    /// Seeds the fault positions and victims: a failing run is repeated
    /// with `SLUICE_CHAOS_SEED` set to the seed it printed.
    pub seed: u64,
}

impl ChaosConfig {
    /// Size from `SLUICE_CHAOS_COMMANDS` / `SLUICE_CHAOS_CLIENTS`, else the defaults given.
    pub fn from_env(commands: usize, clients: usize) -> Self {
        let read =
            |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Self {
            commands: read("SLUICE_CHAOS_COMMANDS", commands),
            clients: read("SLUICE_CHAOS_CLIENTS", clients),
            faults: true,
            settle_timeout: Duration::from_secs(read("SLUICE_CHAOS_SETTLE_SECONDS", 300) as u64),
            seed: std::env::var("SLUICE_CHAOS_SEED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub accepted: u64,
    pub succeeded: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
    /// Accepted commands in no terminal state once quiet.
    pub lost: u64,
    /// Effects that happened twice (an event stored twice for one command, a
    /// read model counting an order twice).
    pub duplicated: u64,
    /// 5xx other than 503, and requests that hung past the client timeout.
    pub server_errors: u64,
    pub unavailable_503: u64,
    pub refused_4xx: u64,
    /// Read-model rows that disagree with the event store.
    pub mismatches: u64,
    /// Orders whose records in Kafka (read_committed) are not their stored
    /// events once each in version order.
    pub kafka_mismatches: u64,
    pub faults: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chaos: accepted={} succeeded={} rejected={} dead_lettered={} lost={} duplicated={} 5xx={} (503s={} 4xx={} read_model_mismatches={} kafka_mismatches={} faults=[{}])",
            self.accepted,
            self.succeeded,
            self.rejected,
            self.dead_lettered,
            self.lost,
            self.duplicated,
            self.server_errors,
            self.unavailable_503,
            self.refused_4xx,
            self.mismatches,
            self.kafka_mismatches,
            self.faults.join(", ")
        )
    }
}

/// One accepted command: where to ask about it and what it was.
#[derive(Debug, Clone)]
struct Accepted {
    location: String,
    order_id: String,
}

fn script(name: &str) -> String {
    format!("{}/../compose/native/{name}.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Restarts a server of the stack: stop, start, wait until it answers.
async fn restart_server(name: &str) {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        for action in ["stop", "start", "wait"] {
            let status = std::process::Command::new(script(&name)).arg(action).status().expect("stack script");
            assert!(status.success(), "{name}.sh {action} failed");
        }
    })
    .await
    .expect("restart thread");
}

/// Prints what Kafka's transaction tool knows of `topic`'s transactions:
/// the transactions its coordinators hold, the producers each partition
/// has open (a partition's open transaction that no coordinator lists is
/// hanging, and holds every read_committed consumer of it back), and what
/// the tool itself finds hanging past a minute: the evidence a failed
/// Kafka check needs.
fn transactions_of(topic: &str, partitions: i32) {
    let mut runs: Vec<Vec<String>> = vec![
        vec!["list".into()],
        vec!["find-hanging".into(), "--broker-id".into(), "1".into(), "--max-transaction-timeout".into(), "1".into()],
    ];
    for p in 0..partitions {
        runs.push(vec![
            "describe-producers".into(),
            "--topic".into(),
            topic.into(),
            "--partition".into(),
            p.to_string(),
        ]);
    }
    for args in runs {
        let out = std::process::Command::new(script("kafka"))
            .arg("transactions")
            .args(&args)
            .output()
            .expect("kafka.sh transactions");
        eprintln!(
            "kafka.sh transactions {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Makes sure every server is up again, whatever happened (drop guard).
struct StackBack;

impl Drop for StackBack {
    fn drop(&mut self) {
        for name in ["rabbitmq", "kafka", "registry", "cassandra"] {
            let _ = std::process::Command::new(script(name)).arg("start").status();
            let _ = std::process::Command::new(script(name)).arg("wait").status();
        }
    }
}

pub async fn run(config: ChaosConfig) -> Summary {
    require_stack().await;
    eprintln!(
        "chaos: seed {} (SLUICE_CHAOS_SEED={} repeats the fault positions and victims)",
        config.seed, config.seed
    );
    let _guard = StackBack;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    let base = edge_on_free_port(&mut settings);
    // Patience for a server restart (tens of seconds) within the retries.
    settings.processor.retry_delays_ms = vec![500, 2_000, 5_000, 10_000];
    settings.processor.max_attempts = 12;
    settings.processor.redrive_interval_ms = 5_000;
    // A transaction Kafka left hanging is ended within seconds of being
    // found, not half a minute.
    settings.processor.hanging_sweep_interval_ms = 5_000;
    settings.processor.prefetch = 16;
    settings.amqp.partitions = 4;
    settings.ingest.rate_limit_per_second = 100_000.0;
    settings.ingest.rate_limit_burst = 100_000;
    settings.ingest.read_rate_limit_per_second = 100_000.0;
    settings.ingest.read_rate_limit_burst = 100_000;

    let _edge = SluiceProcess::spawn(&settings, "ingest");
    let processors = Arc::new(Mutex::new(vec![
        SluiceProcess::spawn(&settings, "processor"),
        SluiceProcess::spawn(&settings, "processor"),
    ]));
    let projector = Arc::new(Mutex::new(SluiceProcess::spawn(&settings, "projector")));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    eventually(Duration::from_secs(60), "the edge to answer", || async {
        http.get(format!("{base}/healthz")).send().await.ok().filter(|r| r.status() == 200).map(drop)
    })
    .await;
    let queues = crate::partition_queues(&settings, &tenant, "orders");
    eventually(Duration::from_secs(60), "two processors sharing the partitions", || async {
        let owners = crate::settled_owners(&queues).await?;
        (owners.iter().collect::<std::collections::HashSet<_>>().len() == 2).then_some(())
    })
    .await;

    let summary = Arc::new(Mutex::new(Summary::default()));
    let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(AtomicU64::new(0));

    // The faults, at random moments while the clients send.
    let faults = {
        let (settings, processors, projector, summary, sent) =
            (settings.clone(), processors.clone(), projector.clone(), summary.clone(), sent.clone());
        let total = config.commands as u64;
        let enabled = config.faults;
        let mut random = Random(config.seed | 1);
        tokio::spawn(async move {
            if !enabled {
                return;
            }
            let plan = [
                "kill processor",
                "restart rabbitmq",
                "kill projector",
                "restart kafka",
                "kill processor",
                "restart cassandra",
                "kill projector",
            ];
            for (i, fault) in plan.iter().enumerate() {
                // Spread the faults over the sending phase, at jittered points.
                let target = total * (i as u64 + 1) / (plan.len() as u64 + 1) + (random.next() % (total / 20 + 1));
                while sent.load(Ordering::Relaxed) < target.min(total) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                match *fault {
                    "kill processor" => {
                        let mut procs = processors.lock().await;
                        let victim = (random.next() % procs.len() as u64) as usize;
                        procs[victim].kill();
                        procs[victim] = SluiceProcess::spawn(&settings, "processor");
                    }
                    "kill projector" => {
                        let mut p = projector.lock().await;
                        p.kill();
                        *p = SluiceProcess::spawn(&settings, "projector");
                    }
                    restart => restart_server(restart.trim_start_matches("restart ")).await,
                }
                eprintln!("chaos: {fault} after command {}", target.min(total));
                summary.lock().await.faults.push(format!("{fault} @{}", target.min(total)));
            }
        })
    };

    // The clients: each sends its share of the plan, retrying 503s with the
    // same CloudEvent (safe: commands are deduplicated by source and id).
    let ids = OperationIds::new(&settings.ingest.operation_secret);
    let mut clients = Vec::new();
    for client in 0..config.clients {
        let (http, base, tenant, summary, accepted, sent, ids) =
            (http.clone(), base.clone(), tenant.clone(), summary.clone(), accepted.clone(), sent.clone(), ids.clone());
        let partitions = settings.amqp.partitions;
        let share = (client..config.commands).step_by(config.clients).collect::<Vec<_>>();
        clients.push(tokio::spawn(async move {
            for n in share {
                let (event, order_id, poison) = plan_command(&tenant, n);
                sent.fetch_add(1, Ordering::Relaxed);
                if poison {
                    // Past the edge, as a misbehaving producer would: data
                    // that fails its schema, with a real operation id.
                    let op = ids.issue(&tenant.name, event["source"].as_str().unwrap(), event["id"].as_str().unwrap());
                    // Its stream's partition, as the edge would route it.
                    let partition = sluice_schemas::names::command_partition(&tenant.name, &order_id, partitions);
                    let mut last = Err(String::new());
                    for _ in 0..120 {
                        last = publish_to_exchange(&tenant, partition, &event, &op).await;
                        if last.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    if let Err(e) = last {
                        panic!("poison command {n} could not be queued within a minute: {e}");
                    }
                    summary.lock().await.accepted += 1;
                    accepted.lock().await.push(Accepted { location: format!("/operations/{op}"), order_id });
                    continue;
                }
                for _ in 0..120 {
                    let response = http
                        .post(format!("{base}/events"))
                        .bearer_auth(&tenant.key)
                        .header("content-type", "application/cloudevents+json")
                        .body(event.to_string())
                        .send()
                        .await;
                    let mut s = summary.lock().await;
                    match response {
                        Ok(r) if r.status() == 202 => {
                            s.accepted += 1;
                            let location = r.headers()["location"].to_str().unwrap().to_owned();
                            drop(s);
                            accepted.lock().await.push(Accepted { location, order_id: order_id.clone() });
                            break;
                        }
                        Ok(r) if r.status() == 503 => {
                            s.unavailable_503 += 1;
                            drop(s);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Ok(r) if r.status().is_client_error() => {
                            s.refused_4xx += 1;
                            break;
                        }
                        Ok(_) | Err(_) => {
                            s.server_errors += 1;
                            drop(s);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }));
    }
    for c in clients {
        c.await.expect("client");
    }
    faults.await.expect("faults");

    // Quiet: every accepted command settles. The checks below read thousands
    // of operations, streams and rows; they run CHECKS_IN_FLIGHT at a time.
    let accepted = accepted.lock().await.clone();
    let deadline = Instant::now() + config.settle_timeout;
    let statuses: Vec<String> = stream::iter(&accepted)
        .map(|a| final_status(&http, format!("{base}{}", a.location), &tenant.key, deadline))
        .buffer_unordered(CHECKS_IN_FLIGHT)
        .collect()
        .await;
    let mut summary = summary.lock().await.clone();
    for status in &statuses {
        match status.as_str() {
            "succeeded" => summary.succeeded += 1,
            "rejected" => summary.rejected += 1,
            "dead_lettered" => summary.dead_lettered += 1,
            _ => summary.lost += 1,
        }
    }

    // The event store: each command's events once.
    let mut orders: Vec<String> = accepted.iter().map(|a| a.order_id.clone()).collect();
    orders.sort();
    orders.dedup();
    let session = cql().await;
    let streams: BTreeMap<String, Vec<(i64, String, String)>> = stream::iter(&orders)
        .map(|order| {
            let session = &session;
            let tenant = &tenant.name;
            async move { (order.clone(), stored_events_in(session, tenant, order).await) }
        })
        .buffer_unordered(CHECKS_IN_FLIGHT)
        .collect()
        .await;
    for events in streams.values() {
        let mut keys: Vec<&String> = events.iter().map(|(_, _, k)| k).collect();
        let before = keys.len();
        keys.sort();
        keys.dedup();
        summary.duplicated += (before - keys.len()) as u64;
    }

    // Once the projector (a read_committed consumer) has read everything:
    // an operation says `succeeded` just before its transaction commits, so
    // the last commands' events may become visible a moment after.
    let group = sluice_projections::runner::group_id(&settings.projector, 1);
    let topics = vec![format!("{}.orders.events", tenant.name)];
    let deadline = Instant::now() + config.settle_timeout;
    while !crate::caught_up(&settings.kafka.brokers, &group, &topics).await {
        if Instant::now() > deadline {
            transactions_of(&topics[0], settings.processor.topic_partitions);
            panic!("the projection did not catch up within {:?}", config.settle_timeout);
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // between two lag reads
    }

    // Kafka as a data team reads it: each stored event once, in version
    // order per key, nothing else. Read again while something is off, for a
    // while: a late commit only adds what was missing, while a duplicate or
    // a lost event stays off. The while covers a transaction Kafka left
    // hanging whose producer it lost: ended by a sweep once it is older than
    // a transaction may live (90 s after its last record).
    let deadline = Instant::now() + Duration::from_secs(120);
    let off = loop {
        let off = crate::orders_off_in_kafka(&tenant, &orders).await;
        if off.is_empty() || Instant::now() > deadline {
            break off;
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // between two reads of the topic
    };
    for line in off.iter().take(10) {
        eprintln!("{line}");
    }
    if !off.is_empty() {
        transactions_of(&topics[0], settings.processor.topic_partitions);
    }
    summary.kafka_mismatches = off.len() as u64;

    // The read models against the event store.
    let store = ReadModels::new(cql_sluice().await, &settings.projector).await.expect("read models");
    let views: HashMap<&String, Option<_>> = stream::iter(streams.keys())
        .map(|order| {
            let store = &store;
            let tenant = &tenant.name;
            async move { (order, store.order(tenant, order).await.expect("read order")) }
        })
        .buffer_unordered(CHECKS_IN_FLIGHT)
        .collect()
        .await;
    let (mut expected_orders, mut expected_total) = (0i64, 0i64);
    let mut per_customer: HashMap<String, usize> = HashMap::new();
    for (order, events) in &streams {
        let Some((last_version, last_type, _)) = events.last() else { continue };
        let submitted = events.iter().any(|(_, t, _)| t.ends_with("OrderSubmitted"));
        let cancelled = events.iter().any(|(_, t, _)| t.ends_with("OrderCancelled"));
        let want_status = match last_type.rsplit('.').next() {
            Some("OrderSubmitted") => "submitted",
            Some("OrderCancelled") => "cancelled",
            _ => "shipped",
        };
        match &views[order] {
            Some(v) if v.status.as_deref() == Some(want_status) && v.version == Some(*last_version) => {}
            other => {
                summary.mismatches += 1;
                eprintln!("read model of {order} is {other:?}, the store says {want_status} v{last_version}");
            }
        }
        if submitted {
            let total = order_total(order);
            *per_customer.entry(customer_of(order)).or_default() += 1;
            expected_orders += 1;
            expected_total += total;
            if cancelled {
                expected_orders -= 1;
                expected_total -= total;
            }
        }
    }
    let now = chrono::Utc::now().timestamp_millis();
    let days = store.daily_sales(&tenant.name, now - 2 * 86_400_000, now).await.expect("daily sales");
    let (orders_counted, total_counted) = days.iter().fold((0, 0), |(o, t), d| (o + d.orders, t + d.total_cents));
    if (orders_counted, total_counted) != (expected_orders, expected_total) {
        eprintln!("daily sales {orders_counted} orders / {total_counted} cents; the store says {expected_orders} / {expected_total}");
        summary.mismatches += 1;
        if orders_counted > expected_orders {
            summary.duplicated += (orders_counted - expected_orders) as u64;
        }
    }
    for (customer, count) in &per_customer {
        let mut listed = 0;
        let mut cursor: Option<String> = None;
        loop {
            let page =
                store.customer_orders(&tenant.name, customer, 500, cursor.as_deref()).await.expect("customer orders");
            listed += page.items.len();
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        if listed != *count {
            eprintln!("customer {customer} lists {listed} orders; the store has {count}");
            summary.mismatches += 1;
        }
    }
    summary
}

/// How many operations, streams or rows the checks read at once.
const CHECKS_IN_FLIGHT: usize = 32;

/// An operation's terminal status, polled until it has one or `deadline`
/// passes (then `stuck:<last status>`). Rejections and dead letters must say why.
async fn final_status(http: &reqwest::Client, url: String, key: &str, deadline: Instant) -> String {
    loop {
        let body: Value = match http.get(&url).bearer_auth(key).send().await {
            Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let status = body["status"].as_str().unwrap_or("").to_owned();
        if matches!(status.as_str(), "succeeded" | "rejected" | "dead_lettered") {
            if status != "succeeded" {
                assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{status} without a reason: {body}");
            }
            return status;
        }
        if Instant::now() > deadline {
            return format!("stuck:{status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Command `n` of the plan: mostly submissions, then follow-ups on earlier
/// orders (cancel, ship: some will be rejected by the rules), duplicate
/// submissions (rejected), and a few poison commands. Returns the event, the
/// order it is about, and whether it is poison.
fn plan_command(tenant: &TestTenant, n: usize) -> (Value, String, bool) {
    let order = |k: usize| format!("ch-{k}");
    let submit = |k: usize| {
        let mut e = submit_order(tenant, &format!("s{k}"), &order(k), &customer_of(&order(k)));
        e["data"]["lines"] = json!([{"sku": "x", "quantity": (k % 7) + 1, "unit_price_cents": 100}]);
        e
    };
    match n % 20 {
        0..=12 => (submit(n), order(n), false),
        13 | 14 => {
            let k = n - 13;
            (
                command(
                    tenant,
                    &format!("c{n}"),
                    "com.example.orders.CancelOrder",
                    json!({"order_id": order(k), "reason": "chaos"}),
                ),
                order(k),
                false,
            )
        }
        15 | 16 => {
            let k = n - 15;
            (
                command(
                    tenant,
                    &format!("x{n}"),
                    "com.example.orders.ShipOrder",
                    json!({"order_id": order(k), "carrier": "c", "tracking_number": "t"}),
                ),
                order(k),
                false,
            )
        }
        17 | 18 => {
            // The same order submitted again under a new id: rejected.
            let k = n - 17;
            let mut e = submit(k);
            e["id"] = json!(format!("dup{n}"));
            (e, order(k), false)
        }
        _ => {
            let e = command(
                tenant,
                &format!("p{n}"),
                "com.example.orders.SubmitOrder",
                json!({"order_id": order(n), "lines": "not a list"}),
            );
            (e, order(n), true)
        }
    }
}

fn customer_of(order: &str) -> String {
    let k: usize = order.trim_start_matches("ch-").parse().unwrap_or(0);
    format!("cust{}", k % 11)
}

fn order_total(order: &str) -> i64 {
    let k: usize = order.trim_start_matches("ch-").parse().unwrap_or(0);
    ((k % 7) + 1) as i64 * 100
}

/// Publishes `event` to the exchange the way the edge does, with a confirm; false when not confirmed within 10 s
/// (a broker restarting can leave a connect, a confirm or a close waiting
/// forever: lapin has no timeouts of its own).
async fn publish_to_exchange(
    tenant: &TestTenant,
    partition: u16,
    event: &Value,
    operation_id: &str,
) -> Result<(), String> {
    let publish = publish_confirmed(tenant, partition, event, operation_id);
    tokio::time::timeout(Duration::from_secs(10), publish).await.unwrap_or_else(|_| Err("no confirm in 10 s".into()))
}

async fn publish_confirmed(
    tenant: &TestTenant,
    partition: u16,
    event: &Value,
    operation_id: &str,
) -> Result<(), String> {
    let connection =
        lapin::Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", lapin::ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string())?;
    let result = async {
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
        let properties = lapin::BasicProperties::default().with_delivery_mode(2).with_message_id(operation_id.into());
        let confirm = channel
            .basic_publish(
                "sluice.commands".into(),
                sluice_schemas::names::routing_key(&tenant.name, "orders", partition).as_str().into(),
                lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() },
                event.to_string().as_bytes(),
                properties,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            lapin::Confirmation::Ack(None) => Ok(()),
            other => Err(format!("not confirmed: {other:?}")),
        }
    }
    .await;
    let _ = connection.close(200, "bye".into()).await;
    result
}

/// A little seeded randomness without a dependency (xorshift64*).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
