//! Removes what earlier test runs left in the stack: their projections'
//! tables, their tenants' queues and topics. Every test works in a tenant and
//! projections of its own and leaves them behind; a stack kept up across
//! runs piles them up (seen: 753 tables, 1,318 quorum queues and 3,400 topic
//! partitions after a day of runs), and the CQL store's heap fills with the
//! tables' metrics until it collects garbage all the time, which every later
//! test and `sluice bench` pays for. `make test` and `make bench` run this
//! first.
//!
//! Only names tests and the bench make are touched: `orders_<10 hex>_…`,
//! `patients_<10 hex>_…` and `bench_<10 hex>_…` tables and the bench's
//! `bench_<10 hex>` keyspaces older than [`STALE`];
//! the queues and topics of `t<10 hex>` and `bench<10 hex>` tenants none of
//! whose queues has a consumer. Queues tell no age, so this runs before a
//! run starts, never beside one.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use scylla::client::session_builder::SessionBuilder;
use serde_json::Value;
use sluice_cli::bench::probe::{generated_keyspace, generated_name, generated_table};
use sluice_cli::ops::management::encode;

/// Left alone while younger than this: no test runs this long.
const STALE: Duration = Duration::from_secs(30 * 60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sluice_tests::require_stack().await;
    let settings =
        sluice_cli::settings::Settings::load(None).map_err(|e| anyhow::anyhow!("loading the dev settings: {e}"))?;
    let (tables, keyspaces) = sweep_tables(&settings.cql.nodes, &settings.cql.keyspace).await?;
    let (queues, topics) = sweep_tenants(&settings.kafka.brokers).await?;
    println!(
        "leftovers of earlier test runs removed: {tables} tables, {keyspaces} keyspaces, {queues} queues, {topics} topics"
    );
    Ok(())
}

/// Drops the stale generated tables of `keyspace` and the stale keyspaces
/// bench runs made for themselves; how many of each.
async fn sweep_tables(nodes: &[String], keyspace: &str) -> anyhow::Result<(usize, usize)> {
    let session = SessionBuilder::new().known_nodes(nodes).build().await.context("connecting to the CQL store")?;
    let rows = session
        .query_unpaged("SELECT keyspace_name, table_name, id FROM system_schema.tables", ())
        .await?
        .into_rows_result()?;
    let now = SystemTime::now();
    let (mut tables, mut keyspaces) = (Vec::new(), BTreeSet::new());
    for row in rows.rows::<(String, String, uuid::Uuid)>()? {
        let (space, table, id) = row?;
        // A table's id is a time-based UUID: when it was created.
        let created = id.get_timestamp().map(|t| {
            let (secs, nanos) = t.to_unix();
            SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
        });
        if !created.is_some_and(|c| now.duration_since(c).is_ok_and(|age| age > STALE)) {
            continue;
        }
        if generated_keyspace(&space) {
            keyspaces.insert(space);
        } else if space == keyspace && generated_table(&table) {
            tables.push(table);
        }
    }
    for table in &tables {
        session.query_unpaged(format!("DROP TABLE IF EXISTS {keyspace}.{table}"), ()).await?;
    }
    for space in &keyspaces {
        session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {space}"), ()).await?;
    }
    Ok((tables.len(), keyspaces.len()))
}

/// The queues and topics of test and bench tenants none of whose queues
/// has a consumer.
async fn sweep_tenants(brokers: &str) -> anyhow::Result<(usize, usize)> {
    let api = sluice_tests::MANAGEMENT_API;
    let http = reqwest::Client::new();
    let queues: Vec<Value> = http
        .get(format!("{api}/queues?columns=name,vhost,consumers,idle_since"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    // Per tenant: whether no queue of it has a consumer.
    let mut tenants: HashMap<String, bool> = HashMap::new();
    for queue in &queues {
        let name = queue["name"].as_str().unwrap_or_default();
        let Some(tenant) = tenant_of(name) else { continue };
        let idle = queue["consumers"].as_u64() == Some(0);
        *tenants.entry(tenant.to_owned()).or_insert(true) &= idle;
    }
    let gone: BTreeSet<&str> = tenants.iter().filter(|(_, idle)| **idle).map(|(t, _)| t.as_str()).collect();
    let mut deleted = 0;
    for queue in &queues {
        let name = queue["name"].as_str().unwrap_or_default();
        if tenant_of(name).is_some_and(|t| gone.contains(t)) {
            let vhost = queue["vhost"].as_str().unwrap_or("/");
            let path = format!("{api}/queues/{}/{}", encode(vhost), encode(name));
            http.delete(path).basic_auth("guest", Some("guest")).send().await?.error_for_status()?;
            deleted += 1;
        }
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("Kafka admin client")?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10)).context("listing topics")?;
    let topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| tenant_of(t).is_some_and(|t| gone.contains(t)))
        .collect();
    for chunk in topics.chunks(100) {
        let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
        admin.delete_topics(&names, &AdminOptions::new()).await.context("deleting topics")?;
    }
    Ok((deleted, topics.len()))
}

/// The test or bench tenant a queue or topic belongs to.
fn tenant_of(name: &str) -> Option<&str> {
    let (tenant, _) = name.split_once('.')?;
    ["t", "bench"].iter().any(|p| generated_name(tenant, p) == Some("")).then_some(tenant)
}
