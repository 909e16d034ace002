//! Wrapping a service's routes with what every service serves, and serving them.
//!
//! [`service_router`] adds `/health`, `/metrics`, JSON 404/405, the body
//! limit, the URI limit, the request timeout, request tracing and metrics
//! with bounded labels, and a catch-all that gives every error response
//! without a JSON body (axum's plain-text rejections) the contract body.
//!
//! [`serve`] runs our own accept loop on hyper instead of `axum::serve`, which
//! has no header-read timeout and no connection cap (API.md "Limits"): a
//! connection that has not sent a request's headers within the header-read
//! timeout is closed, at most `http_max_connections` are served at once, and
//! hyper's own parse-error answers get the contract body ([`super::wire`]).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    pin::pin,
    sync::Arc,
    sync::{LazyLock, RwLock},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    response::{IntoResponse, Response},
    routing::get,
};
use http::{Method, StatusCode, header};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use metrics::{Label, SharedString};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt as _;
use tracing::Instrument as _;

use super::{
    error::{CommonError, error_response, generic_error},
    health::Health,
    wire::ContractIo,
};
use crate::{config::HttpConfig, telemetry};

/// API.md: request bodies above 64 KiB are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The longest request URI (path and query) a handler sees; longer ones are
/// 414 `uri_too_long`. hyper's own limit (65534 bytes) is far above anything
/// our routes take.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// What `Retry-After` says on a request timeout: the overload that made the
/// request slow is usually over within a second or two.
const TIMEOUT_RETRY_AFTER_SECS: u64 = 1;

/// What `/health` and `/metrics` need.
#[derive(Debug, Clone)]
pub struct Ops {
    pub health: Health,
    pub metrics: PrometheusHandle,
}

/// `app` plus `/health`, `/metrics`, JSON 404/405, the body and URI limits,
/// the request timeout, the contract body on every error, and request
/// tracing/metrics.
pub fn service_router(app: Router, ops: Ops) -> Router {
    let ops_routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(ops);
    app.merge(ops_routes)
        .fallback(|| async { CommonError::RouteNotFound })
        .method_not_allowed_fallback(|| async { CommonError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(TrackLayer)
}

/// Wraps every route in [`track`]. Hand-written rather than
/// `middleware::from_fn(track)`, which boxes the inner service again and
/// clones it into a `Next` on every request.
#[derive(Debug, Clone, Copy)]
struct TrackLayer;

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

#[derive(Debug, Clone)]
struct Track<S> {
    inner: S,
}

impl<S> tower::Service<Request> for Track<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // the clone that was made ready is the one that is called
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { Ok(track(request, ready).await) })
    }
}

async fn health(State(ops): State<Ops>) -> Response {
    let report = ops.health.check().await;
    let status = if report.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn render_metrics(State(ops): State<Ops>) -> Response {
    // refreshes `dependency_up` (each probe sets its own, within PROBE_TIMEOUT)
    ops.health.check().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_metrics(&ops.metrics),
    )
        .into_response()
}

/// Gives every error response that lacks a JSON body the contract body:
/// axum's own rejections (e.g. the raw `Bytes` extractor's 413) answer in
/// plain text, and their text may name internal types, so it is replaced,
/// not passed on.
fn with_contract_body(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || json {
        return response;
    }
    let (code, message) = generic_error(status);
    let (parts, _plain_text) = response.into_parts();
    let mut rewritten = error_response(status, code, message);
    // Keep what the status needs (Allow, Retry-After, WWW-Authenticate…);
    // the body's own headers come from the new body.
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}

/// Per-request deadline, put on each request by [`serve`] from its config;
/// requests that did not come through `serve` (in-process tests) get the
/// default.
#[derive(Debug, Clone, Copy)]
struct RequestTimeout(Duration);

/// What every request goes through, in one middleware (each layer costs
/// a boxed service and future per request): a span per sampled request
/// ([`telemetry::sample`]), child of the caller's `traceparent` (an
/// unsampled request passes the caller's context on); over-long URIs
/// refused before any handler runs; the request timeout; the contract body
/// on every error ([`with_contract_body`]); and the RED metrics, labelled
/// only with bounded sets: the method (the standard ones, else `other`),
/// the route template (or `unmatched`) and the status code.
async fn track<S>(request: Request, inner: S) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    // a reference count, not a copy of the template
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = method_label(request.method());
    let deadline = request.extensions().get::<RequestTimeout>().map_or_else(
        || Duration::from_millis(HttpConfig::REQUEST_TIMEOUT_MS),
        |timeout| timeout.0,
    );
    let parent = telemetry::extract_http(request.headers());
    // A span only for requests whose trace is recorded: an unrecorded one
    // cost more than the rest of a cached read (docs/BENCHMARKS.md).
    let span = telemetry::child_span(&parent, || {
        tracing::info_span!(
            "http_request",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
        )
    });
    let started = Instant::now();
    let uri_bytes = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let response = if uri_bytes > MAX_URI_BYTES {
        CommonError::UriTooLong { limit: MAX_URI_BYTES }.into_response()
    } else {
        match tokio::time::timeout(deadline, telemetry::with_remote_parent(parent, run(inner, request)))
            .instrument(span.clone())
            .await
        {
            Ok(response) => with_contract_body(response),
            Err(_) => {
                // The handler's future is dropped, as when a client hangs up.
                tracing::warn!(parent: &span, method, route, timeout_ms = deadline.as_millis() as u64, "request timed out");
                CommonError::RequestTimeout {
                    retry_after_secs: TIMEOUT_RETRY_AFTER_SECS,
                }
                .into_response()
            }
        }
    };
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        tracing::warn!(parent: &span, method, route, status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::debug!(parent: &span, method, route, status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request finished");
    }
    let (duration, requests) = request_metrics(method, route, status_label(status));
    duration.record(elapsed.as_secs_f64());
    requests.increment(1);
    response
}

/// Calls `ready`, a service [`Track::poll_ready`] made ready.
async fn run<S>(mut ready: S, request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    match ready.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The RED metric handles of each (route, method, status), registered on the
/// first request that needs them: the label sets are bounded, and looking a
/// handle up here is a read lock and two hash lookups instead of building
/// labels and searching the recorder's registry on every request.
fn request_metrics(method: &'static str, route: &str, status: &'static str) -> (metrics::Histogram, metrics::Counter) {
    type Handles = HashMap<(&'static str, &'static str), (metrics::Histogram, metrics::Counter)>;
    static REGISTERED: LazyLock<RwLock<HashMap<String, Handles>>> = LazyLock::new(RwLock::default);
    if let Ok(registered) = REGISTERED.read()
        && let Some(handles) = registered.get(route).and_then(|by| by.get(&(method, status)))
    {
        return handles.clone();
    }
    let labels = [
        Label::new("method", method),
        Label::new("route", SharedString::from(route.to_owned())),
        Label::new("status", status),
    ];
    let handles = (
        metrics::histogram!("http_request_duration_seconds", labels[..2].iter()),
        metrics::counter!("http_requests_total", labels.iter()),
    );
    if let Ok(mut registered) = REGISTERED.write() {
        registered
            .entry(route.to_owned())
            .or_default()
            .insert((method, status), handles.clone());
    }
    handles
}

/// The method as a metric label: invented methods would each add a series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// "100" to "999", so a status label needs no allocation.
static STATUS_DIGITS: [u8; 2700] = {
    let mut digits = [0u8; 2700];
    let mut i = 0;
    while i < 900 {
        let code = i + 100;
        digits[3 * i] = b'0' + (code / 100) as u8;
        digits[3 * i + 1] = b'0' + (code / 10 % 10) as u8;
        digits[3 * i + 2] = b'0' + (code % 10) as u8;
        i += 1;
    }
    digits
};

fn status_label(status: StatusCode) -> &'static str {
    // StatusCode is always 100..=999.
    let start = usize::from(status.as_u16().saturating_sub(100)) * 3;
    STATUS_DIGITS
        .get(start..start + 3)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .unwrap_or("other")
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting and drains: open connections finish their in-flight request and
/// close; the drain waits at most the request timeout plus the header-read
/// timeout.
///
/// At `http_max_connections` open connections the loop stops accepting until
/// one closes: new connections wait in the kernel's listen backlog (and are
/// refused once it is full) rather than being accepted only to be dropped.
/// Idle keep-alive connections count, but the header-read timeout closes them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, max_connections = config.http_max_connections, "listening");
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout())
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(
        usize::try_from(config.http_max_connections)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS),
    ));
    let timeout = RequestTimeout(config.request_timeout());
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // responses are small and latency matters more than packet count
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "TCP_NODELAY not set");
                    }
                    stream
                }
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service = service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(timeout);
            router.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(ContractIo::new(stream)), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                // Header timeouts, resets, parse errors: the client's doing.
                tracing::debug!(%error, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "draining");
    // In-flight requests end within the request timeout; what is still open
    // after that plus a header-read timeout is a client that stopped reading,
    // and is left to the process's exit.
    let drain = config.request_timeout() + config.header_read_timeout();
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            drain_ms = drain.as_millis() as u64,
            "connections still open after the drain"
        );
    }
    Ok(())
}

/// Errors of one connection are not the listener's; anything else (e.g. out
/// of file descriptors) is waited out rather than spun on.
async fn accept_failed(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_the_codes() {
        for code in [100, 200, 201, 404, 413, 503, 999] {
            let status = StatusCode::from_u16(code).unwrap_or_default();
            assert_eq!(status_label(status), code.to_string());
        }
    }

    #[test]
    fn methods_map_to_a_fixed_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::CONNECT), "other");
        let invented = Method::from_bytes(b"BREW").unwrap_or_default();
        assert_eq!(method_label(&invented), "other");
    }
}
