//! API keys never appear in logs: a platform run at debug level, fed valid
//! and invalid keys, is scanned for them afterwards.

use std::time::Duration;

use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_never_logged() {
    require_stack().await;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    settings.ingest.http_addr = format!("127.0.0.1:{port}");
    let mut sluice = SluiceProcess::spawn_with_log_level(&settings, "all", "debug");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the edge", || async {
        http.get(format!("{base}/healthz")).send().await.ok().map(drop)
    })
    .await;

    let wrong_key = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    for (i, key) in [&tenant.key, &wrong_key].into_iter().enumerate() {
        let response = http
            .post(format!("{base}/events"))
            .bearer_auth(key)
            .header("content-type", "application/cloudevents+json")
            .body(submit_order(&tenant, &format!("s-{i}"), "o-secret", "c").to_string())
            .send()
            .await
            .unwrap();
        assert!(response.status() == 202 || response.status() == 401);
        let response = http.get(format!("{base}/orders/o-secret")).bearer_auth(key).send().await.unwrap();
        assert!(response.status().is_client_error() || response.status().is_success());
    }
    // The accepted command is processed, so its whole path is in the log.
    let (_, op) = eventually(Duration::from_secs(60), "the command processed", || async {
        let ids = sluice_schemas::operation_id::OperationIds::new(&settings.ingest.operation_secret);
        let id = ids.issue(&tenant.name, &tenant.source, "s-0");
        let r = http.get(format!("{base}/operations/{id}")).bearer_auth(&tenant.key).send().await.ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        (body["status"] == "succeeded").then_some(((), body))
    })
    .await;
    assert_eq!(op["status"], "succeeded");
    assert_eq!(sluice.terminate().code(), Some(0), "drained and exited cleanly on SIGTERM");

    let log = sluice.log_text();
    assert!(log.contains("accepted"), "the log is a real debug log: {} bytes", log.len());
    for key in [&tenant.key, &wrong_key] {
        assert!(!log.contains(key.as_str()), "key {key} appears in the log");
    }
}
