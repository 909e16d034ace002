//! The projection daemon process: starts against real Postgres and NATS,
//! reports them on /health, serves /metrics, and stops on request.

use clap::Parser as _;
use platform::http::{Health, Ops};
use projections::{AppState, Config};

#[tokio::test]
async fn starts_reports_health_and_metrics_and_shuts_down_gracefully() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let nats_url = testkit::nats_url();
    let config = Config::try_parse_from(["projection-daemon", "--database-url", &db.url, "--nats-url", &nats_url])?;
    let server = testkit::Server::start(|listener, shutdown| projections::run(config, listener, shutdown)).await?;
    testkit::assert_service_lifecycle(server, &["postgres", "nats"]).await
}

#[tokio::test]
async fn health_is_503_while_postgres_is_down() -> anyhow::Result<()> {
    let nats = testkit::nats().await?;
    let pool = testkit::unreachable_pool();
    let state = AppState {
        pool: pool.clone(),
        nats: nats.clone(),
        ops: Ops {
            health: Health::new().postgres(pool).nats(nats),
            metrics: platform::telemetry::metrics_handle(),
        },
    };
    assert_eq!(testkit::status_of(projections::router(state), "/health").await, 503);
    Ok(())
}
