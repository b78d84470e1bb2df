//! API keys never appear in logs: a platform run at trace level, fed a valid
//! and an invalid key, is scanned afterwards for the keys, their prefixes
//! and their usual encodings.

use std::time::Duration;

use sluice_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_never_logged() {
    require_stack().await;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    let base = edge_on_free_port(&mut settings);
    let mut sluice = SluiceProcess::spawn_with_log_level(&settings, "all", "trace");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "the edge", || async {
        http.get(format!("{base}/healthz")).send().await.ok().map(drop)
    })
    .await;

    let wrong_key = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    for (i, (key, post, read)) in
        [(&tenant.key, 202, [200, 404]), (&wrong_key, 401, [401, 401])].into_iter().enumerate()
    {
        let response = http
            .post(format!("{base}/events"))
            .bearer_auth(key)
            .header("content-type", "application/cloudevents+json")
            .body(submit_order(&tenant, &format!("s-{i}"), "o-secret", "c").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), post, "POST with key {i}");
        // The order may not be readable yet for the valid key.
        let response = http.get(format!("{base}/orders/o-secret")).bearer_auth(key).send().await.unwrap();
        assert!(read.contains(&response.status().as_u16()), "GET with key {i}: {}", response.status());
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
    use base64::Engine;
    for key in [&tenant.key, &wrong_key] {
        // The key, a telling prefix of it, and the encodings a log line
        // might carry (an Authorization header dumped, a hex or base64 blob).
        let forms = [
            key.to_string(),
            key[..key.len().min(12)].to_owned(),
            hex::encode(key.as_bytes()),
            base64::engine::general_purpose::STANDARD.encode(key.as_bytes()),
            format!("Bearer {key}"),
        ];
        for form in forms {
            assert!(!log.contains(&form), "key {key} appears in the log as {form:?}");
        }
    }
}
