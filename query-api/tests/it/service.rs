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
