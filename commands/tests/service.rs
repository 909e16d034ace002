//! The command API process: starts against real Postgres and NATS, reports
//! its dependencies on /health, serves /metrics, and stops on request.

use clap::Parser as _;
use commands::{AppState, Config};
use platform::http::{Health, JwtKeys, Ops};

#[tokio::test]
async fn starts_reports_health_and_metrics_and_shuts_down_gracefully() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let nats_url = testkit::nats_url();
    let args = [
        "command-api",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats_url,
        "--jwt-secret",
        "s3cret",
    ];
    let config = Config::try_parse_from(args)?;
    let server = testkit::Server::start(|listener, shutdown| commands::run(config, listener, shutdown)).await?;
    testkit::assert_service_lifecycle(server, &["postgres", "nats"]).await
}

#[tokio::test]
async fn health_is_503_while_postgres_or_nats_is_down() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let nats = testkit::nats().await?;
    let state = |pool: sqlx::PgPool, nats: async_nats::Client| {
        let ops = Ops {
            health: Health::new().postgres(pool.clone()).nats(nats),
            metrics: platform::telemetry::metrics_handle(),
        };
        AppState::new(pool, JwtKeys::new(&platform::Secret::new("s")), ops)
    };
    let up = commands::router(state(db.pool.clone(), nats.clone()));
    assert_eq!(testkit::status_of(up, "/health").await, 200);
    let pg_down = commands::router(state(testkit::unreachable_pool(), nats));
    assert_eq!(testkit::status_of(pg_down, "/health").await, 503);
    let nats_down = commands::router(state(db.pool.clone(), testkit::unreachable_nats().await));
    assert_eq!(testkit::status_of(nats_down, "/health").await, 503);
    Ok(())
}
