//! Logs, traces and metrics.
//!
//! Every process installs the same stack: a `tracing` subscriber (text or JSON),
//! an OpenTelemetry layer so spans carry W3C trace ids (exported over OTLP/HTTP
//! only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set), and a Prometheus recorder
//! for the `metrics` macros, rendered by `GET /metrics`.
//!
//! Trace context crosses process boundaries in three carriers: HTTP headers,
//! NATS headers and event metadata (`traceparent`/`tracestate` strings). The
//! helpers here inject the current span's context into each and extract a
//! parent context from each.
//!
//! A request span costs an allocation-heavy trip through every layer, so
//! [`sample`] decides first whether a request gets one: only when traces
//! are exported, and then as the caller's `traceparent` says or, without
//! one, by `OTEL_TRACES_SAMPLER_ARG`. A request without a span still passes
//! its caller's context on ([`with_remote_parent`]), so an unsampled trace
//! keeps its id across processes.

use std::{collections::HashMap, future::Future, sync::OnceLock};

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::LevelFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::config::{LogFormat, TelemetryConfig};

/// Latency buckets (seconds) shared by every histogram: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Keeps the trace exporter alive; dropping it flushes pending spans.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    metrics: PrometheusHandle,
}

impl Telemetry {
    pub fn metrics(&self) -> PrometheusHandle {
        self.metrics.clone()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(error) = self.tracer_provider.shutdown() {
            tracing::debug!(%error, "tracer provider shutdown");
        }
    }
}

/// Installs logging, tracing and metrics for a binary called `default_name`.
pub fn init(default_name: &str, config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let service_name = config.service_name.clone().unwrap_or_else(|| default_name.to_owned());
    let resource = Resource::builder().with_service_name(service_name).build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    let exporting = config.otlp_endpoint.as_deref().is_some_and(|e| !e.is_empty());
    provider = match config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            let endpoint = traces_endpoint(endpoint);
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint.clone())
                .build()
                .with_context(|| format!("OTLP exporter for {endpoint}"))?;
            provider
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    config.trace_sample_ratio,
                ))))
                .with_batch_exporter(exporter)
        }
        // Spans still get trace ids (so context propagates and logs correlate) but
        // nothing is recorded for an exporter that does not exist.
        None => provider.with_sampler(Sampler::AlwaysOff),
    };
    // the first init of a process decides (tests init more than once)
    let _ = SAMPLING.set(Sampling {
        exporting,
        ratio: config.trace_sample_ratio,
    });
    let tracer_provider = provider.build();
    // Every sampled request and every message gets a span, so what the
    // layer does per span and per poll is on the hot path. Our propagation
    // reads the tracing span's context (`OpenTelemetrySpanExt::context`),
    // never the thread's active OpenTelemetry context, so activating it on
    // every enter is pure cost, as are busy/idle timings (two clock reads
    // per poll) and the thread-name attribute (an allocation per span).
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("citypicks"))
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false);

    // RUST_LOG filters the logs only: spans are exported at `info` whatever
    // the log level (an operator quieting the logs keeps the traces), and
    // the trace layer sees nothing at all while nothing is exported
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let traced = if exporting { LevelFilter::INFO } else { LevelFilter::OFF };
    // colours only for a person at a terminal, not in log files
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer.with_filter(traced))
        .try_init();

    Ok(Telemetry {
        tracer_provider,
        metrics: metrics_handle(),
    })
}

fn traces_endpoint(base: &str) -> String {
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{}/v1/traces", base.trim_end_matches('/'))
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets(LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed already (a test harness): keep ours private.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Renders the Prometheus text exposition.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    handle.run_upkeep();
    handle.render()
}

/// How requests are sampled; unset (a process that never ran [`init`]):
/// nothing is exported, so no request span is worth its cost.
#[derive(Debug, Clone, Copy)]
struct Sampling {
    exporting: bool,
    ratio: f64,
}

static SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// Whether a request whose caller sent `parent` gets a span: never while
/// traces are not exported; as the caller's sampled flag when it sent a
/// valid `traceparent`; else with the configured probability.
pub fn sample(parent: &Context) -> bool {
    decide(SAMPLING.get(), parent, rand::random::<f64>)
}

fn decide(sampling: Option<&Sampling>, parent: &Context, draw: impl FnOnce() -> f64) -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    let Some(sampling) = sampling.filter(|s| s.exporting) else {
        return false;
    };
    let caller = parent.span();
    let caller = caller.span_context();
    if caller.is_valid() {
        return caller.is_sampled();
    }
    sampling.ratio >= 1.0 || (sampling.ratio > 0.0 && draw() < sampling.ratio)
}

tokio::task_local! {
    /// The caller's trace context of a request that has no span of its own.
    static REMOTE_PARENT: Context;
}

/// Runs `future` (a request without a span) so that what it injects into
/// outgoing carriers is `parent`, the caller's context, passed on as is.
/// Without a caller's span there is nothing to pass on, and no scope is
/// set: a task-local scope costs on every poll.
pub async fn with_remote_parent<F: Future>(parent: Context, future: F) -> F::Output {
    use opentelemetry::trace::TraceContextExt as _;
    if parent.span().span_context().is_valid() {
        REMOTE_PARENT.scope(parent, future).await
    } else {
        future.await
    }
}

/// The context to pass on: the current span's, or, where no span is
/// recorded, the caller's context of the request being served.
fn current_context() -> Context {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return REMOTE_PARENT.try_with(Clone::clone).unwrap_or_default();
    }
    span.context()
}

/// Zero-sized: constructing one per call costs nothing.
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// W3C trace context in string form, as stored in event metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The context of the current `tracing` span (in a request without one,
    /// the caller's context: see [`with_remote_parent`]).
    pub fn current() -> Self {
        let mut carrier = HashMap::new();
        propagator().inject_context(&current_context(), &mut carrier);
        Self {
            traceparent: carrier.remove("traceparent"),
            tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
        }
    }

    /// The parent context these headers describe (empty when absent or malformed).
    pub fn context(&self) -> Context {
        let mut carrier = HashMap::new();
        if let Some(traceparent) = &self.traceparent {
            carrier.insert("traceparent".to_owned(), traceparent.clone());
        }
        if let Some(tracestate) = &self.tracestate {
            carrier.insert("tracestate".to_owned(), tracestate.clone());
        }
        propagator().extract(&carrier)
    }
}

/// The span `make` builds, as a child of `parent`, when this trace is
/// recorded ([`sample`]); else no span (run the work under
/// [`with_remote_parent`] so the caller's context still passes on).
pub fn child_span(parent: &Context, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !sample(parent) {
        return tracing::Span::none();
    }
    let span = make();
    set_parent(&span, parent.clone());
    span
}

/// Whether spans are exported: callers skip reading parents for
/// [`batch_span`] (a header parse per message) when they are not.
pub fn exporting() -> bool {
    SAMPLING.get().is_some_and(|s| s.exporting)
}

/// Span links a batch span carries at most (the SDK's default span limit).
pub const MAX_LINKS: usize = 128;

/// How a span over many messages relates to their traces.
#[derive(Debug, Clone)]
enum BatchRelation {
    /// Not recorded.
    None,
    /// All messages share one parent span: a child of it, in its trace.
    Parent(Context),
    /// Several parents (a span has one): a new trace linking to each.
    Links(Vec<opentelemetry::trace::SpanContext>),
}

fn relate(sampling: Option<&Sampling>, parents: &[Context], draw: impl FnOnce() -> f64) -> BatchRelation {
    use opentelemetry::trace::TraceContextExt as _;
    let mut valid: Vec<(opentelemetry::trace::SpanContext, &Context)> = Vec::new();
    for parent in parents {
        let span = parent.span();
        let context = span.span_context();
        if context.is_valid()
            && !valid
                .iter()
                .any(|(seen, _)| seen.span_id() == context.span_id() && seen.trace_id() == context.trace_id())
        {
            valid.push((context.clone(), parent));
        }
    }
    let recorded = if valid.is_empty() {
        decide(sampling, &Context::new(), draw)
    } else {
        sampling.is_some_and(|s| s.exporting) && valid.iter().any(|(context, _)| context.is_sampled())
    };
    match (recorded, valid.len()) {
        (false, _) => BatchRelation::None,
        (true, 0) => BatchRelation::Links(Vec::new()),
        (true, 1) => BatchRelation::Parent(valid[0].1.clone()),
        (true, _) => BatchRelation::Links(valid.into_iter().take(MAX_LINKS).map(|(context, _)| context).collect()),
    }
}

/// The span `make` builds for work on many messages at once (a consumer's
/// batch, a relay batch), joined to the messages' traces: as a child when
/// they all have one parent, else linked to each (up to [`MAX_LINKS`]).
/// Recorded when any of their traces is (or, none carrying one, as
/// [`sample`] decides); else no span.
pub fn batch_span(parents: &[Context], make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    match relate(SAMPLING.get(), parents, rand::random::<f64>) {
        BatchRelation::None => tracing::Span::none(),
        BatchRelation::Parent(parent) => {
            let span = make();
            set_parent(&span, parent);
            span
        }
        BatchRelation::Links(links) => {
            let span = make();
            for link in links {
                span.add_link(link);
            }
            span
        }
    }
}

/// Makes `span` a child of `parent` when `parent` carries a valid remote span.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    use opentelemetry::trace::TraceContextExt as _;
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Writes the current span's context into outgoing HTTP headers.
pub fn inject_http(headers: &mut http::HeaderMap) {
    propagator().inject_context(&current_context(), &mut HttpCarrier(headers));
}

/// Reads a parent context from incoming HTTP headers.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    propagator().extract(&HttpCarrierRef(headers))
}

/// Writes the current span's context into outgoing NATS headers.
pub fn inject_nats(headers: &mut async_nats::HeaderMap) {
    propagator().inject_context(&current_context(), &mut NatsCarrier(headers));
}

/// Reads a parent context from the headers of a NATS message.
pub fn extract_nats(headers: &async_nats::HeaderMap) -> Context {
    propagator().extract(&NatsCarrierRef(headers))
}

struct HttpCarrier<'a>(&'a mut http::HeaderMap);
struct HttpCarrierRef<'a>(&'a http::HeaderMap);
struct NatsCarrier<'a>(&'a mut async_nats::HeaderMap);
struct NatsCarrierRef<'a>(&'a async_nats::HeaderMap);

impl Injector for HttpCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

impl Extractor for HttpCarrierRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

impl Injector for NatsCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

impl Extractor for NatsCarrierRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn remote(traceparent: &str) -> Context {
        TraceHeaders {
            traceparent: Some(traceparent.to_owned()),
            tracestate: None,
        }
        .context()
    }

    #[test]
    fn a_batch_joins_one_parent_as_its_child_and_several_by_links() {
        let on = Sampling {
            exporting: true,
            ratio: 0.0,
        };
        let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
        let one = relate(Some(&on), &[remote(PARENT), remote(PARENT), Context::new()], || 1.0);
        assert!(matches!(one, BatchRelation::Parent(_)), "{one:?}");
        match relate(Some(&on), &[remote(PARENT), remote(other), remote(unsampled)], || 1.0) {
            BatchRelation::Links(links) => {
                let traces: Vec<String> = links.iter().map(|l| l.trace_id().to_string()).collect();
                assert_eq!(
                    traces,
                    [
                        "4bf92f3577b34da6a3ce929d0e0e4736",
                        "0af7651916cd43dd8448eb211c80319c",
                        "11111111111111111111111111111111"
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // recorded only when a message's trace is, and only while exporting
        assert!(matches!(
            relate(Some(&on), &[remote(unsampled)], || 0.0),
            BatchRelation::None
        ));
        let off = Sampling {
            exporting: false,
            ratio: 1.0,
        };
        assert!(matches!(
            relate(Some(&off), &[remote(PARENT)], || 0.0),
            BatchRelation::None
        ));
        assert!(matches!(relate(None, &[remote(PARENT)], || 0.0), BatchRelation::None));
        // no trace among them: the configured ratio decides
        let all = Sampling {
            exporting: true,
            ratio: 1.0,
        };
        assert!(matches!(relate(Some(&all), &[Context::new()], || 0.5), BatchRelation::Links(l) if l.is_empty()));
        assert!(matches!(
            relate(Some(&on), &[Context::new()], || 0.5),
            BatchRelation::None
        ));
        // many parents: links are bounded
        let many: Vec<Context> = (1..=200u32)
            .map(|i| remote(&format!("00-{:032x}-{:016x}-01", u128::from(i), u64::from(i))))
            .collect();
        match relate(Some(&on), &many, || 1.0) {
            BatchRelation::Links(links) => assert_eq!(links.len(), MAX_LINKS),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn http_headers_round_trip_a_remote_parent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(PARENT));
        let cx = extract_http(&headers);
        let mut out = HashMap::new();
        propagator().inject_context(&cx, &mut out);
        assert_eq!(out.get("traceparent").map(String::as_str), Some(PARENT));
    }

    #[test]
    fn nats_headers_round_trip_a_remote_parent() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", PARENT);
        let cx = extract_nats(&headers);
        let mut out = async_nats::HeaderMap::new();
        propagator().inject_context(&cx, &mut NatsCarrier(&mut out));
        assert_eq!(
            out.get("traceparent").map(async_nats::HeaderValue::as_str),
            Some(PARENT)
        );
    }

    #[test]
    fn metadata_strings_round_trip_and_garbage_is_ignored() {
        let headers = TraceHeaders {
            traceparent: Some(PARENT.to_owned()),
            tracestate: None,
        };
        let mut out = HashMap::new();
        propagator().inject_context(&headers.context(), &mut out);
        assert_eq!(out.get("traceparent").map(String::as_str), Some(PARENT));

        let garbage = TraceHeaders {
            traceparent: Some("not-a-trace".to_owned()),
            tracestate: None,
        };
        let mut out = HashMap::new();
        propagator().inject_context(&garbage.context(), &mut out);
        assert!(!out.contains_key("traceparent"));
    }

    #[tokio::test]
    async fn a_request_without_a_span_passes_its_callers_context_on() {
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", http::HeaderValue::from_static(PARENT));
        let parent = extract_http(&incoming);
        let (headers, nats, metadata) = with_remote_parent(parent, async {
            let mut headers = http::HeaderMap::new();
            inject_http(&mut headers);
            let mut nats = async_nats::HeaderMap::new();
            inject_nats(&mut nats);
            (headers, nats, TraceHeaders::current())
        })
        .await;
        assert_eq!(headers.get("traceparent").and_then(|v| v.to_str().ok()), Some(PARENT));
        assert_eq!(
            nats.get("traceparent").map(async_nats::HeaderValue::as_str),
            Some(PARENT)
        );
        assert_eq!(metadata.traceparent.as_deref(), Some(PARENT));
        // outside a request: nothing to pass on
        assert_eq!(TraceHeaders::current(), TraceHeaders::default());
    }

    #[test]
    fn nothing_is_sampled_while_traces_are_not_exported() {
        // this test binary never runs `init` with an endpoint
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", http::HeaderValue::from_static(PARENT));
        assert!(!sample(&extract_http(&incoming)));
        assert!(!sample(&Context::new()));
    }

    #[test]
    fn a_sampled_caller_is_followed_and_the_ratio_decides_for_the_rest() {
        let exporting = |ratio| Sampling { exporting: true, ratio };
        let caller = |flags: &'static str| {
            let mut headers = http::HeaderMap::new();
            let traceparent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            headers.insert(
                "traceparent",
                http::HeaderValue::from_str(&traceparent).expect("header"),
            );
            extract_http(&headers)
        };
        let never = || -> f64 { unreachable!("no draw when the caller decides") };
        assert!(decide(Some(&exporting(0.0)), &caller("01"), never));
        assert!(!decide(Some(&exporting(1.0)), &caller("00"), never));
        assert!(decide(Some(&exporting(1.0)), &Context::new(), || 0.999));
        assert!(!decide(Some(&exporting(0.0)), &Context::new(), || 0.0));
        assert!(decide(Some(&exporting(0.25)), &Context::new(), || 0.2));
        assert!(!decide(Some(&exporting(0.25)), &Context::new(), || 0.3));
        let off = Sampling {
            exporting: false,
            ratio: 1.0,
        };
        assert!(!decide(Some(&off), &caller("01"), never));
        assert!(!decide(None, &caller("01"), never));
    }

    #[test]
    fn otlp_endpoint_gets_the_traces_path_once() {
        assert_eq!(traces_endpoint("http://jaeger:4318"), "http://jaeger:4318/v1/traces");
        assert_eq!(traces_endpoint("http://jaeger:4318/"), "http://jaeger:4318/v1/traces");
        assert_eq!(traces_endpoint("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }
}
