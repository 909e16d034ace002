//! The seckill edge process: starts against real Redis and NATS, reports
//! them on /health, serves /metrics, and stops on request.

use clap::Parser as _;
use platform::http::{Health, Ops};
use seckill_edge::{AppState, Config, Edge};

#[tokio::test]
async fn starts_reports_health_and_metrics_and_shuts_down_gracefully() -> anyhow::Result<()> {
    let (redis_url, nats_url) = (testkit::redis_url(), testkit::nats_url());
    let args = [
        "seckill-edge",
        "--redis-url",
        &redis_url,
        "--nats-url",
        &nats_url,
        "--jwt-secret",
        "s3cret",
    ];
    let config = Config::try_parse_from(args)?;
    let server = testkit::Server::start(|listener, shutdown| seckill_edge::run(config, listener, shutdown)).await?;
    testkit::assert_service_lifecycle(server, &["redis", "nats"]).await
}

#[tokio::test]
async fn health_is_503_while_nats_is_down() -> anyhow::Result<()> {
    let harness = crate::support::Harness::new(crate::support::NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let state = AppState {
        edge: std::sync::Arc::new(Edge {
            gate: harness.gate.clone(),
            flags: harness.flags.clone(),
            warmer: harness.warmer.clone(),
            limiter: harness.limiter.clone(),
        }),
        jwt: harness.jwt.clone(),
        ops: Ops {
            health: Health::new()
                .redis(harness.redis.clone())
                .nats(testkit::unreachable_nats().await),
            metrics: platform::telemetry::metrics_handle(),
        },
    };
    assert_eq!(testkit::status_of(seckill_edge::router(state), "/health").await, 503);
    Ok(())
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() -> anyhow::Result<()> {
    let harness = crate::support::Harness::new(crate::support::NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let response = tower::ServiceExt::oneshot(
        harness.router(),
        http::Request::get("/openapi.json").body(axum::body::Body::empty())?,
    )
    .await?;
    assert_eq!(response.status(), 200);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in ["/seckill/{voucher_id}", "/health", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    let codes = doc["paths"]["/seckill/{voucher_id}"]["post"]["responses"]
        .as_object()
        .map(|r| r.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    for status in ["202", "400", "401", "403", "404", "409", "429", "503"] {
        assert!(codes.iter().any(|c| c == status), "{status} documented");
    }
    Ok(())
}
