//! One telemetry set-up for every worker: `tracing` logs (text, or JSON with
//! `FL_LOG_FORMAT=json`), OpenTelemetry spans exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and the W3C trace context carried in NATS headers
//! so one trace runs from a gateway's publish to the agent's notification (DESIGN.md).

use std::sync::OnceLock;
use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How long the exit waits for the span export to finish: a collector that is down or does
/// not answer must not hang the process (STYLE: flush telemetry under a timeout).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the tracer provider; call [`Telemetry::shutdown`] on exit to flush spans. (Metrics
/// are scraped by Prometheus: nothing of them to flush.)
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans finished so far now, instead of at the batch's next tick; waits at
    /// most [`FLUSH_TIMEOUT`].
    pub fn flush(&self) {
        let provider = self.provider.clone();
        if let Err(e) = bounded("flush", FLUSH_TIMEOUT, move || provider.force_flush()) {
            tracing::warn!("telemetry {e}");
        }
    }

    /// Flushes and stops span export; waits at most [`FLUSH_TIMEOUT`], then gives up on what
    /// is not exported (the export thread is left to the process's exit).
    pub fn shutdown(self) {
        let provider = self.provider;
        if let Err(e) = bounded("shutdown", FLUSH_TIMEOUT, move || provider.shutdown()) {
            eprintln!("telemetry {e}");
        }
    }

    /// [`Telemetry::shutdown`] from async code: on a blocking thread, so that the runtime
    /// keeps running meanwhile (a second signal still exits at once, [`crate::shutdown`]).
    pub async fn shutdown_async(self) {
        if let Err(e) = tokio::task::spawn_blocking(move || self.shutdown()).await {
            eprintln!("telemetry shutdown: {e}");
        }
    }
}

/// Runs `f` on a thread of its own and waits for it at most `timeout`; the error says what
/// went wrong (`shutdown: ...`).
fn bounded<E: std::fmt::Display + Send + 'static>(
    what: &'static str,
    timeout: Duration,
    f: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> Result<(), String> {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("telemetry-{what}"))
        .spawn(move || {
            let _ = done.send(f().map_err(|e| e.to_string()));
        })
        .map_err(|e| format!("{what}: starting its thread: {e}"))?;
    match result.recv_timeout(timeout) {
        Ok(outcome) => outcome.map_err(|e| format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: not done after {timeout:?}, giving up on the spans not exported"
        )),
    }
}

/// Installs logging and tracing for the process `service` (e.g. `firstline-ingest`).
/// Log level from `RUST_LOG` (default `info`).
pub fn init(service: &'static str) -> anyhow::Result<Telemetry> {
    init_with(service, None)
}

/// [`init`], exporting spans to the OTLP/HTTP `endpoint` (e.g. `http://127.0.0.1:4318`)
/// instead of `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn init_with(service: &'static str, endpoint: Option<String>) -> anyhow::Result<Telemetry> {
    // The OTLP exporter's HTTP client (reqwest, shared with the API's webhooks) is built
    // without a default TLS provider.
    crate::install_crypto_provider();
    let provider = tracer_provider(service, endpoint)?;
    let tracer = provider.tracer(service);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("FL_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()?;
    Ok(Telemetry { provider })
}

/// For tests: quiet unless `TEST_LOG` is set; installed once per process.
pub fn init_for_tests() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_test_writer()
                .try_init();
        }
    });
}

fn tracer_provider(
    service: &'static str,
    endpoint: Option<String>,
) -> anyhow::Result<SdkTracerProvider> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = endpoint.or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok());
    let provider = build_provider(service, endpoint)?;
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(provider)
}

/// The tracer provider of `service`, exporting to `endpoint` when there is one.
fn build_provider(
    service: &'static str,
    endpoint: Option<String>,
) -> anyhow::Result<SdkTracerProvider> {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    // OTLP over HTTP/protobuf (Jaeger and Tempo take it on :4318). The exporter reads
    // OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TIMEOUT...; the sampler reads
    // OTEL_TRACES_SAMPLER(_ARG). The batch processor exports from its own thread, which the
    // blocking HTTP client suits.
    if let Some(endpoint) = endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's context (`traceparent`) into NATS headers.
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Makes `span` a child of the trace context in `headers`, when there is one, and records
/// the trace id in the span's `trace_id` field, so that every log line under it carries it.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let cx = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(cx);
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Records the ids a handler learns on the current span (declared by the consume loop), so
/// that traces and log lines can be searched by them.
pub fn record_ids(
    tenant: Option<&dyn std::fmt::Display>,
    channel: Option<&dyn std::fmt::Display>,
    conversation: Option<&dyn std::fmt::Display>,
    agent: Option<&dyn std::fmt::Display>,
) {
    let span = tracing::Span::current();
    for (field, value) in [
        ("tenant", tenant),
        ("channel", channel),
        ("conversation", conversation),
        ("agent", agent),
    ] {
        if let Some(value) = value {
            span.record(field, tracing::field::display(value));
        }
    }
}

/// The `traceparent` in `headers`, as text (for the outbox, which publishes later).
pub fn current_traceparent() -> Option<String> {
    let mut headers = HeaderMap::new();
    inject_current(&mut headers);
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::Tracer as _;
    use std::time::Instant;

    #[test]
    fn a_slow_step_is_given_up_after_the_timeout() {
        let started = Instant::now();
        let outcome = bounded("shutdown", Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(30));
            Ok::<(), String>(())
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(outcome.unwrap_err().starts_with("shutdown: not done after"));
        assert_eq!(
            bounded("flush", Duration::from_secs(5), || Err("refused")),
            Err("flush: refused".to_owned())
        );
    }

    /// A collector that takes the connection and never answers (the exporter's own timeout is
    /// 10 s): the shutdown gives up after [`FLUSH_TIMEOUT`].
    #[test]
    fn a_collector_that_never_answers_does_not_hang_the_shutdown() {
        crate::install_crypto_provider();
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let provider = build_provider("firstline-test", Some(endpoint)).unwrap();
        provider.tracer("test").in_span("never exported", |_| {});
        let started = Instant::now();
        Telemetry { provider }.shutdown();
        let took = started.elapsed();
        assert!(took < FLUSH_TIMEOUT + Duration::from_secs(2), "{took:?}");
        drop(silent);
    }
}
