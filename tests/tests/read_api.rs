//! The read API: a customer's orders paged newest first, daily sales with
//! cancellations subtracted, the operation's read-your-writes flag, metrics,
//! and reads that keep answering with the write side stopped.

use std::time::Duration;

use serde_json::json;
use sluice_cli::serve::Role;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customer_lists_daily_sales_and_read_your_writes() {
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    // The admin address, apart from the public edge.
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    settings.metrics.addr = Some(admin.to_string());
    let platform = Platform::start(settings.clone(), Role::All).await;
    let mut last = String::new();
    for i in 0..5 {
        let response =
            platform.post_event(&tenant, &submit_order(&tenant, &format!("s{i}"), &format!("o{i}"), "alice")).await;
        last = response.headers()["location"].to_str().unwrap().to_owned();
        platform.await_operation(&tenant, &last, WAIT).await;
    }
    let cancel = command(&tenant, "c1", "com.example.orders.CancelOrder", json!({"order_id": "o1", "reason": "no"}));
    let cancelled = platform.post_event(&tenant, &cancel).await.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(platform.await_operation(&tenant, &cancelled, WAIT).await["status"], "succeeded");

    // Read-your-writes: the operation says when the read model has its events.
    let op = eventually(WAIT, "the read model to catch up with the cancellation", || async {
        let (_, op) = platform.get_json(&tenant, &cancelled).await;
        (op["read_models"]["orders"]["caught_up"] == true).then_some(op)
    })
    .await;
    assert_eq!(op["status"], "succeeded");
    let (_, order) = platform.get_json(&tenant, "/orders/o1").await;
    assert_eq!(order["status"], "cancelled", "caught_up means the read shows it");

    // Newest first, two per page, every order exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/customers/alice/orders?limit=2&cursor={c}"),
            None => "/customers/alice/orders?limit=2".to_owned(),
        };
        let (status, page) = platform.get_json(&tenant, &path).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["items"].as_array().unwrap().len() <= 2);
        seen.extend(page["items"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["o4", "o3", "o2", "o1", "o0"]);
    assert_eq!(platform.get_json(&tenant, "/customers/alice/orders?cursor=not-a-cursor!").await.0, 400);
    // A full last page has no cursor to an empty one.
    let (_, all) = platform.get_json(&tenant, "/customers/alice/orders?limit=5").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert!(all["next_cursor"].is_null(), "{all}");
    // Cursors are bound to their listing: tampered, or used for another
    // customer, they are refused.
    let (_, first) = platform.get_json(&tenant, "/customers/alice/orders?limit=2").await;
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let (status, refused) = platform.get_json(&tenant, &format!("/customers/bob/orders?limit=2&cursor={cursor}")).await;
    assert_eq!((status, refused["type"].as_str()), (400, Some("https://sluice.dev/problems/malformed")), "{refused}");
    let (inner, tag) = cursor.rsplit_once('.').unwrap();
    let flipped = match tag.strip_prefix('0') {
        Some(rest) => format!("1{rest}"),
        None => format!("0{}", &tag[1..]),
    };
    let tampered = format!("{inner}.{flipped}");
    assert_eq!(platform.get_json(&tenant, &format!("/customers/alice/orders?limit=2&cursor={tampered}")).await.0, 400);
    assert_eq!(platform.get_json(&tenant, &format!("/customers/alice/orders?limit=2&cursor={inner}")).await.0, 400);
    // A limit that is not a number is a problem document too.
    let answer = platform
        .http
        .get(platform.url("/customers/alice/orders?limit=abc"))
        .bearer_auth(&tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");

    // Daily sales: five orders of 2100 cents, one cancelled.
    let today = chrono::Utc::now().date_naive();
    let (status, sales) =
        platform.get_json(&tenant, &format!("/sales/daily?from={}&to={today}", today.pred_opt().unwrap())).await;
    assert_eq!(status, 200);
    let days = sales["days"].as_array().unwrap();
    assert_eq!(days.len(), 2);
    assert_eq!(days[1]["day"], today.to_string());
    assert_eq!((days[1]["orders"].as_i64(), days[1]["total_cents"].as_i64()), (Some(4), Some(4 * 2100)));
    assert_eq!(platform.get_json(&tenant, "/sales/daily?from=2026-13-01&to=2026-12-01").await.0, 400);
    assert_eq!(platform.get_json(&tenant, "/sales/daily?from=2020-01-01&to=2026-01-01").await.0, 400);

    // Metrics name what happened, on the admin address only: they carry
    // tenant labels.
    let public = platform.http.get(platform.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404, "no metrics on the public edge");
    let metrics_url = format!("http://{admin}/metrics");
    let metrics = platform.http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
    // Their values moved with what this test did: six commands accepted,
    // confirmed, decided, produced and applied (other tests of this binary
    // share the process's metrics, so counts without a tenant label are at
    // least this test's).
    let tenant_label = format!("tenant=\"{}\"", tenant.name);
    let projection_label = format!("projection=\"{}\"", settings.projector.name);
    let moved = [
        ("sluice_http_event_requests_total", vec!["status=\"202\""], 6.0),
        ("sluice_publish_confirm_seconds_count", vec![], 6.0),
        ("sluice_commands_processed_total", vec![tenant_label.as_str(), "outcome=\"succeeded\""], 6.0),
        ("sluice_kafka_produce_seconds_count", vec![], 1.0),
        ("sluice_projection_apply_seconds_count", vec![projection_label.as_str()], 6.0),
    ];
    for (name, labels, least) in moved {
        let value = sample_sum(&metrics, name, &labels);
        assert!(value >= least, "{name}{labels:?} is {value}, at least {least} expected:\n{metrics}");
    }
    assert_eq!(
        sample_sum(&metrics, "sluice_commands_processed_total", &[&tenant_label, "outcome=\"succeeded\""]),
        6.0,
        "exactly this tenant's commands"
    );
    // Every Kafka consumer of the runtime exports its lag.
    for consumer in [settings.projector.name.as_str(), settings.projector.patients_name.as_str(), "onboarding"] {
        let label = format!("sluice_consumer_lag_records{{consumer=\"{consumer}\"");
        eventually(WAIT, &format!("the lag of {consumer} in /metrics"), || async {
            let metrics = platform.http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
            metrics.contains(&label).then_some(())
        })
        .await;
    }
    platform.stop().await.unwrap();

    // The write side stopped: the edge alone still serves every read.
    let edge = Platform::start(settings, Role::Ingest).await;
    assert_eq!(edge.get_json(&tenant, "/orders/o3").await.0, 200);
    assert_eq!(edge.get_json(&tenant, "/customers/alice/orders").await.0, 200);
    assert_eq!(edge.get_json(&tenant, &last).await.1["status"], "succeeded");
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patients_operation_says_when_the_patients_read_model_has_its_events() {
    let tenant = TestTenant::new();
    let settings = test_settings(&[&tenant]);
    let edge = Platform::start(settings.clone(), Role::Ingest).await;
    let processor = Platform::start(settings.clone(), Role::Processor).await;
    let enrol =
        command(&tenant, "e1", "com.example.patients.EnrollPatient", json!({"patient_id": "p1", "name": "Ada"}));
    let location = edge.post_event(&tenant, &enrol).await.headers()["location"].to_str().unwrap().to_owned();
    let op = edge.await_operation(&tenant, &location, WAIT).await;
    assert_eq!(op["status"], "succeeded");
    // No projector runs yet: decided and produced, not readable.
    assert_eq!(op["read_models"]["patients"]["caught_up"], false, "{op}");
    assert!(op["read_models"].get("orders").is_none(), "only the read model its events feed: {op}");
    assert_eq!(edge.get_json(&tenant, "/patients/p1/onboarding").await.0, 404);

    let projector = Platform::start(settings.clone(), Role::Projector).await;
    eventually(WAIT, "the patients read model to catch up", || async {
        let (_, op) = edge.get_json(&tenant, &location).await;
        (op["read_models"]["patients"]["caught_up"] == true).then_some(())
    })
    .await;
    let (status, view) = edge.get_json(&tenant, "/patients/p1/onboarding").await;
    assert_eq!(status, 200, "caught_up means the read shows it");
    assert_eq!(view["steps"][0]["step"], "enrolled", "{view}");
    projector.stop().await.unwrap();
    processor.stop().await.unwrap();
    edge.stop().await.unwrap();
}

/// The sum of a metric's samples (Prometheus text format) whose labels hold
/// every one of `labels`.
fn sample_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, series_labels) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name && labels.iter().all(|l| series_labels.contains(l));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
