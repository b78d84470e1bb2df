//! Logs and traces of every sluice process.
//!
//! - [`init`]: logs to stderr (filter `SLUICE_LOG`), and, when an OTLP
//!   endpoint is configured, spans exported over OTLP/HTTP (JSON) to it.
//! - [`trace_context`]: which W3C `traceparent` a command carries.
//! - [`set_parent`] / [`onward`]: one trace follows a command across the
//!   hops. Each hop (edge, processor, projector) makes its span a child of
//!   the `traceparent` it received and passes its own span on; without an
//!   exporter the received `traceparent` travels on unchanged.
#![forbid(unsafe_code)]

pub mod trace_context;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether [`init`] installed an exporter: spans then leave the process.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans (an OTLP endpoint is configured). A
/// hot path that makes a span per item only to continue a trace skips it
/// when they are not: without an exporter the span is only a log context.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Log levels when `SLUICE_LOG` is not set.
const DEFAULT_FILTER: &str = "info,lapin=warn,scylla=error";

/// Keeps the exporter until [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (blocking: call it on the way out).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing traces: {e}");
            }
        }
    }
}

/// Installs the process-wide subscriber. `otlp_endpoint` is the collector's
/// base URL (`http://host:4318`); spans go to `<endpoint>/v1/traces` under
/// the resource `service.name = service`.
pub fn init(service: &str, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let provider = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpJson)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
                    .build(),
            )
        }
        None => None,
    };
    let spans = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("sluice")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// Makes `span` (not yet entered) a child of the remote `traceparent`, when
/// one was received and is valid.
pub fn set_parent(span: &Span, traceparent: Option<&str>) {
    if let Some(remote) = traceparent.and_then(remote_span) {
        let _ = span.set_parent(Context::new().with_remote_span_context(remote));
    }
}

/// The `traceparent` to send to the next hop: `span`'s own when spans are
/// exported, else the one `received`, unchanged.
pub fn onward(span: &Span, received: Option<&str>) -> Option<String> {
    let context = span.context();
    let own = context.span().span_context().clone();
    if own.is_valid() {
        Some(format!("00-{}-{}-{:02x}", own.trace_id(), own.span_id(), own.trace_flags().to_u8()))
    } else {
        received.map(str::to_owned)
    }
}

/// A valid `traceparent` as the remote span it names.
fn remote_span(traceparent: &str) -> Option<SpanContext> {
    if !trace_context::is_traceparent(traceparent) {
        return None;
    }
    let mut fields = traceparent.split('-').skip(1);
    let trace_id = TraceId::from_hex(fields.next()?).ok()?;
    let span_id = SpanId::from_hex(fields.next()?).ok()?;
    let flags = u8::from_str_radix(fields.next()?, 16).ok()?;
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_names_its_remote_span_and_a_broken_one_none() {
        let remote = remote_span(GOOD).expect("valid");
        assert_eq!(remote.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(remote.span_id().to_string(), "00f067aa0ba902b7");
        assert!(remote.is_sampled() && remote.is_remote());
        assert!(remote_span("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none());
        assert!(remote_span("junk").is_none());
    }

    #[test]
    fn without_an_exporter_the_received_traceparent_travels_on_unchanged() {
        let span = tracing::info_span!("hop");
        set_parent(&span, Some(GOOD));
        assert_eq!(onward(&span, Some(GOOD)).as_deref(), Some(GOOD));
        assert_eq!(onward(&span, None), None);
    }
}

/// `url` without its user and password (`amqp://host:5672/vhost`): what
/// logs, errors and health documents may say about a server.
pub fn url_without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{rest}")
        }
        None => "(invalid URL)".into(),
    }
}

#[cfg(test)]
mod url_tests {
    use super::url_without_credentials;

    #[test]
    fn a_url_loses_its_credentials() {
        assert_eq!(url_without_credentials("amqp://globex:p@ss@127.0.0.1:5672/globex"), "amqp://127.0.0.1:5672/globex");
        assert_eq!(url_without_credentials("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(url_without_credentials("nonsense"), "(invalid URL)");
    }
}
