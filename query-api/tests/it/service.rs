//! The query API process: starts against real Postgres, reports it on
//! /health, serves /metrics, and stops on request.

use clap::Parser as _;
use platform::http::{Health, JwtKeys, Ops};
use query_api::{AppState, Config};

#[tokio::test]
async fn starts_reports_health_and_metrics_and_shuts_down_gracefully() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let config = Config::try_parse_from(["query-api", "--database-url", &db.url, "--jwt-secret", "s3cret"])?;
    let server = testkit::Server::start(|listener, shutdown| query_api::run(config, listener, shutdown)).await?;
    testkit::assert_service_lifecycle(server, &["postgres"]).await
}

#[tokio::test]
async fn health_is_503_while_postgres_is_down() {
    let pool = testkit::unreachable_pool();
    let state = AppState::new(
        pool.clone(),
        JwtKeys::new(&platform::Secret::new("s")),
        Ops {
            health: Health::new().postgres(pool),
            metrics: platform::telemetry::metrics_handle(),
        },
    );
    assert_eq!(testkit::status_of(query_api::router(state), "/health").await, 503);
}

/// What a client sees while Postgres is away: 503 `store_unavailable` with
/// `Retry-After` (never a hang, never a 500).
#[tokio::test]
async fn a_query_while_postgres_is_away_is_503_with_retry_after() -> anyhow::Result<()> {
    let keys = JwtKeys::new(&platform::Secret::new("s"));
    let pool = testkit::unreachable_pool();
    let state = AppState::new(
        pool.clone(),
        keys.clone(),
        Ops {
            health: Health::new().postgres(pool),
            metrics: platform::telemetry::metrics_handle(),
        },
    );
    let token = keys.issue(
        "user-1",
        platform::http::Role::Customer,
        std::time::Duration::from_secs(60),
    )?;
    let request = http::Request::get(format!("/orders/{}", uuid::Uuid::new_v4()))
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::empty())?;
    let started = std::time::Instant::now();
    let (status, headers, body) = testkit::respond(query_api::router(state), request).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    Ok(())
}
