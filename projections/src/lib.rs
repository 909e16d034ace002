//! The projection daemon: builds the JSON document views from JetStream.
//!
//! Layout: [`Config`] (env), [`AppState`], [`router`] (its `/health` and
//! `/metrics`) and [`run`] (connect, serve until shutdown). Projectors, the
//! daemon's consumers and the replay CLI arrive with the read-side issue.

use std::future::Future;

use axum::Router;
use clap::Parser;
use platform::{
    config::{NatsConfig, PostgresConfig, StartupConfig, TelemetryConfig},
    http::{Health, Ops},
};
use tokio::net::TcpListener;

pub const SERVICE: &str = "projection-daemon";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks projection daemon")]
pub struct Config {
    /// Where the daemon serves /health and /metrics.
    #[arg(long, env = "PROJECTIONS_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: String,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    pub ops: Ops,
}

pub fn router(state: AppState) -> Router {
    platform::http::service_router(Router::new(), state.ops)
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let timeout = config.startup.timeout();
    let pool = platform::pg::connect(&config.postgres, timeout).await?;
    let nats = platform::bus::connect(&config.nats, SERVICE, timeout).await?;
    let ops = Ops {
        health: Health::new().postgres(pool.clone()).nats(nats.clone()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState { pool, nats, ops };
    platform::http::serve(listener, router(state), shutdown).await?;
    Ok(())
}
