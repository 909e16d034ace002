//! The seckill edge process: starts against real Redis and NATS, reports
//! them on /health, serves /metrics, and stops on request.

use clap::Parser as _;
use platform::http::{Health, JwtKeys, Ops};
use seckill_edge::{AppState, Config};

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
    let redis = testkit::redis().await?;
    let nats = testkit::unreachable_nats().await;
    let state = AppState {
        redis: redis.clone(),
        nats: nats.clone(),
        jwt: JwtKeys::new(&platform::Secret::new("s")),
        ops: Ops {
            health: Health::new().redis(redis).nats(nats),
            metrics: platform::telemetry::metrics_handle(),
        },
    };
    assert_eq!(testkit::status_of(seckill_edge::router(state), "/health").await, 503);
    Ok(())
}
