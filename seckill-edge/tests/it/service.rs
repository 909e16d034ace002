//! The seckill edge process: starts against real Redis and NATS, reports
//! them on /health, serves /metrics, and stops on request.

use std::time::{Duration, Instant};

use clap::Parser as _;
use platform::http::{Health, Ops};
use seckill_edge::{AppState, Config, Edge};
use uuid::Uuid;

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

/// What clients see while Redis is away, through the whole process: a 503
/// `gate_unavailable` with `Retry-After`, fast (never a hang, never a 500),
/// `/health` names Redis; and admissions resume once it is back.
#[tokio::test]
async fn while_redis_is_away_attempts_are_refused_fast_and_health_names_it() -> anyhow::Result<()> {
    testkit::init_logs();
    let db = testkit::TestDb::new().await?;
    let mut redis = testkit::RedisServer::start().await?;
    let (redis_url, nats_url, namespace) = (redis.url(), testkit::nats_url(), testkit::unique_namespace());
    let config = Config::try_parse_from([
        "seckill-edge",
        "--database-url",
        &db.url,
        "--redis-url",
        &redis_url,
        "--nats-url",
        &nats_url,
        "--nats-namespace",
        &namespace,
        "--jwt-secret",
        "s3cret",
    ])?;
    let server = testkit::Server::start(|listener, shutdown| seckill_edge::run(config, listener, shutdown)).await?;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let token = platform::http::auth::JwtKeys::new(&platform::Secret::new("s3cret")).issue(
        "user-1",
        platform::http::auth::Role::Customer,
        Duration::from_secs(600),
    )?;
    let attempt = |http: reqwest::Client, base: String, token: String| async move {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/seckill/{}", Uuid::new_v4()))
            .bearer_auth(token)
            .send()
            .await?;
        let retry_after = response.headers().get("retry-after").cloned();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        anyhow::Ok((status, retry_after, body, started.elapsed()))
    };
    let (status, _, _, _) = attempt(http.clone(), base.clone(), token.clone()).await?;
    assert_eq!(status, 404, "an unknown voucher, with Redis up");

    redis.stop();
    let mut crowd = tokio::task::JoinSet::new();
    for _ in 0..20 {
        crowd.spawn(attempt(http.clone(), base.clone(), token.clone()));
    }
    let mut slowest = Duration::ZERO;
    while let Some(answer) = crowd.join_next().await {
        let (status, retry_after, body, took) = answer??;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "gate_unavailable", "{body}");
        assert!(retry_after.is_some(), "503 without Retry-After");
        slowest = slowest.max(took);
    }
    tracing::info!(?slowest, "slowest answer while Redis is away");
    assert!(slowest < Duration::from_millis(1_500), "an attempt took {slowest:?}");
    let health = http.get(format!("{base}/health")).send().await?;
    assert_eq!(health.status(), 503);
    let health: serde_json::Value = health.json().await?;
    let redis_check = health["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == "redis"))
        .cloned();
    assert_eq!(redis_check.map(|c| c["ok"].clone()), Some(false.into()), "{health}");

    redis.start_again().await?;
    let back = Instant::now();
    testkit::eventually(Duration::from_secs(10), || {
        let attempt = attempt(http.clone(), base.clone(), token.clone());
        async move { Ok(attempt.await?.0 == 404) }
    })
    .await?;
    tracing::info!(took = ?back.elapsed(), "the gate answers again after Redis is back");
    server.stop().await
}
