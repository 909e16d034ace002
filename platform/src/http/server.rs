//! Wrapping a service's routes with what every service serves, and serving them.

use std::{future::Future, io, time::Instant};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::Instrument as _;

use super::{error::CommonError, health::Health};
use crate::telemetry;

/// API.md: request bodies above 64 KiB are refused with 413.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// What `/health` and `/metrics` need.
#[derive(Debug, Clone)]
pub struct Ops {
    pub health: Health,
    pub metrics: PrometheusHandle,
}

/// `app` plus `/health`, `/metrics`, JSON 404/405, the body limit and request
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
        .layer(middleware::from_fn(track))
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
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_metrics(&ops.metrics),
    )
        .into_response()
}

/// One span per request, child of the caller's `traceparent`, and the RED metrics.
async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::set_parent(&span, telemetry::extract_http(request.headers()));
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        tracing::warn!(parent: &span, status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::debug!(parent: &span, status = status.as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request finished");
    }
    let labels = [("method", method.to_string()), ("route", route)];
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
    let mut labels = labels.to_vec();
    labels.push(("status", status.as_u16().to_string()));
    metrics::counter!("http_requests_total", &labels).increment(1);
    response
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains
/// in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "listening");
    }
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
