//! Requests exactly as the CloudEvents SDKs for Python, JavaScript and Go
//! build them: structured, binary (the Python SDK's `to_binary` sends no
//! Content-Type for an event without datacontenttype), and a batch of the
//! SDK's JSON for each event (none of the three writes batches). Captured as
//! fixtures by the generators in tests/fixtures/sdk/ (each says how to run
//! it); the test fills in its tenant's source and fresh ids, and every
//! request must be answered 202 with its commands queued.

use serde_json::Value;
use sluice_cli::serve::Role;
use sluice_tests::*;

/// One captured request.
struct Captured {
    sdk: String,
    mode: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Captured {
    fn of(value: &Value) -> Self {
        let text = |v: &Value| v.as_str().expect("a string").to_owned();
        let headers = value["headers"].as_array().expect("headers");
        Self {
            sdk: text(&value["sdk"]),
            mode: text(&value["mode"]),
            headers: headers.iter().map(|pair| (text(&pair[0]), text(&pair[1]))).collect(),
            body: text(&value["body"]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_as_the_cloudevents_sdks_build_them_are_accepted_and_queued() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let platform = Platform::start(settings.clone(), Role::Ingest).await;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sdk");
    let mut queued = 0;
    for sdk in ["python", "javascript", "go"] {
        let path = fixtures.join(format!("{sdk}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let captured: Vec<Captured> = serde_json::from_str::<Vec<Value>>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .iter()
            .map(Captured::of)
            .collect();
        for mode in ["structured", "binary", "batch"] {
            assert!(captured.iter().any(|c| c.mode == mode), "{sdk}: no {mode} request captured");
        }
        for c in &captured {
            let fill = |text: &str| {
                text.replace("__SOURCE__", &tenant.source)
                    .replace("__ID__", &format!("sdk-{sdk}"))
                    .replace("__ORDER__", &format!("o-{sdk}"))
            };
            let mut request = platform.http.post(format!("{}/events", platform.base_url)).bearer_auth(&tenant.key);
            for (name, value) in &c.headers {
                // Framing is the client's own; the body's length changed with the fill.
                if !["content-length", "host"].contains(&name.as_str()) {
                    request = request.header(name.as_str(), fill(value));
                }
            }
            let answer = Answer::read(request.body(fill(&c.body)).send().await.expect("the edge")).await;
            assert_eq!(answer.status, 202, "{} ({}): {}", c.sdk, c.mode, answer.body);
            queued += match c.mode.as_str() {
                "batch" => answer.body["operations"].as_array().map_or(0, Vec::len),
                _ => 1,
            };
        }
    }
    let mut depth = 0;
    for queue in partition_queues(&settings, &tenant, "orders") {
        depth += queue_depth(&queue).await as usize;
    }
    assert_eq!(depth, queued, "every accepted command is in its partition queue");
    assert!(queued >= 12, "{queued}");
    delete_tenant_queues(&settings, &tenant).await;
    platform.stop().await.unwrap();
}
