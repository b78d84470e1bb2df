//! Traces over OTLP: with `traces.otlp_endpoint` set, the edge, a processor
//! and a projector (three processes) export their spans to a collector (a
//! stand-in here, speaking OTLP/HTTP JSON), and one trace follows a command
//! from the client's POST to the read model, each hop a child of the one
//! before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use serde_json::Value;
use sluice_tests::*;

const WAIT: Duration = Duration::from_secs(90);

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// Accepts `POST /v1/traces` (OTLP/HTTP, JSON) and keeps every span.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let kept = spans.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |body: String| async move {
                let request: Value = serde_json::from_str(&body).expect("OTLP JSON");
                for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                    let service = ["sluice-ingest", "sluice-processor", "sluice-projector"]
                        .into_iter()
                        .find(|s| resource["resource"].to_string().contains(&format!("\"{s}\"")))
                        .unwrap_or("other");
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            let field = |name: &str| span[name].as_str().unwrap_or_default().to_owned();
                            kept.lock().unwrap().push(ReceivedSpan {
                                service: service.to_owned(),
                                name: field("name"),
                                trace_id: field("traceId"),
                                span_id: field("spanId"),
                                parent_span_id: field("parentSpanId"),
                            });
                        }
                    }
                }
                "{}"
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, spans }
    }

    fn spans_of(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_follows_a_command_from_the_post_to_the_read_model() {
    require_stack().await;
    let collector = Collector::start().await;
    let tenant = TestTenant::new();
    let mut settings = test_settings(&[&tenant]);
    let base = edge_on_free_port(&mut settings);
    settings.traces.otlp_endpoint = Some(collector.url.clone());
    let _roles = ["ingest", "processor", "projector"].map(|role| SluiceProcess::spawn(&settings, role));
    let http = reqwest::Client::new();
    eventually(WAIT, "the edge to be ready", || async {
        http.get(format!("{base}/readyz")).send().await.ok().filter(|r| r.status() == 200).map(drop)
    })
    .await;

    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = http
        .post(format!("{base}/events"))
        .bearer_auth(&tenant.key)
        .header("content-type", "application/cloudevents+json")
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .body(submit_order(&tenant, "traced", "o-traced", "c1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually(WAIT, "the order in the read model", || async {
        let r = http.get(format!("{base}/orders/o-traced")).bearer_auth(&tenant.key).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // Batches are exported every few seconds: wait for all three hops.
    let spans = eventually(WAIT, "the spans of the edge, the processor and the projector", || async {
        let spans = collector.spans_of(trace_id);
        let services = ["sluice-ingest", "sluice-processor", "sluice-projector"];
        services.iter().all(|s| spans.iter().any(|x| x.service == *s)).then_some(spans)
    })
    .await;
    let of = |service: &str| spans.iter().find(|s| s.service == service).unwrap().clone();
    let (edge, processor, projector) = (of("sluice-ingest"), of("sluice-processor"), of("sluice-projector"));
    assert_eq!(edge.parent_span_id, client_span, "the edge's span continues the client's: {edge:?}");
    assert_eq!(processor.parent_span_id, edge.span_id, "the processor's span is the edge's child: {processor:?}");
    assert_eq!(projector.parent_span_id, processor.span_id, "the projector's span is the processor's child");
    assert_eq!((edge.name.as_str(), projector.name.as_str()), ("sluice.ingest", "sluice.project"));
}
