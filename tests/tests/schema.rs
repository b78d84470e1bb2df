//! The CQL schema is created by `sluice schemas apply` and by nothing else: a
//! role or an ops verb that finds it missing (a fresh store, a mistyped
//! keyspace) says what to run and creates nothing.

use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_cli::serve::{serve, Role};
use sluice_tests::*;
use tokio_util::sync::CancellationToken;

async fn keyspace_exists(name: &str) -> bool {
    cql()
        .await
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?", (name,))
        .await
        .expect("system_schema")
        .into_rows_result()
        .expect("rows")
        .rows_num()
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_schema_apply_creates_the_schema_and_everything_else_says_to_run_it() {
    require_stack().await;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // A keyspace nobody created: a fresh store, or a name mistyped.
    let keyspace = format!("sluice_schema_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    settings.cql.keyspace = keyspace.clone();

    // An ops verb: refused, pointing at the fix, and nothing created.
    let (ok, _, err) = sluice_says(&settings, &["dlt", "list"]);
    assert!(!ok && err.contains(&format!("keyspace {keyspace}")) && err.contains("sluice schemas apply"), "{err}");
    assert!(!keyspace_exists(&keyspace).await, "an ops verb created the keyspace");

    // A role: stops at once with the same words, instead of waiting for a
    // store that is not starting up.
    let started = Instant::now();
    let served = tokio::time::timeout(
        Duration::from_secs(60),
        serve(settings.clone(), Role::Processor, CancellationToken::new(), None),
    )
    .await
    .expect("the role gave up at once");
    let err = format!("{:#}", served.expect_err("a role without its schema"));
    assert!(err.contains("sluice schemas apply"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "it waited {:?}", started.elapsed());
    assert!(!keyspace_exists(&keyspace).await, "a role created the keyspace");

    // schemas apply creates it all, once.
    let (ok, out, err) = sluice_says(&settings, &["schemas", "apply", "--json"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    let created: Vec<&str> = report["tables_created"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(created.len(), sluice_schemas::cql::table_names().len(), "{report}");
    assert!(created.contains(&"command_journal"), "{report}");
    let (ok, out, _) = sluice_says(&settings, &["schemas", "apply", "--json"]);
    let again: Value = serde_json::from_str(&out).expect("JSON report");
    assert!(ok && again["tables_created"].as_array().unwrap().is_empty(), "{again}");

    // A store from before a column was added: named, then added by apply.
    let session = cql().await;
    session.query_unpaged(format!("ALTER TABLE {keyspace}.command_journal DROP written_by"), ()).await.unwrap();
    let (ok, _, err) = sluice_says(&settings, &["dlt", "list"]);
    assert!(!ok && err.contains("column written_by") && err.contains("sluice schemas apply"), "{err}");
    let (ok, out, err) = sluice_says(&settings, &["schemas", "apply", "--json"]);
    assert!(ok, "{err}");
    let added: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(added["columns_added"], serde_json::json!(["command_journal.written_by"]));
    sluice_cli::serve::connect_cql(&settings).await.expect("the schema is complete");

    session.query_unpaged(format!("DROP KEYSPACE {keyspace}"), ()).await.unwrap();
}
