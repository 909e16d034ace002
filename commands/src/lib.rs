//! The write side of City Picks: the command API over the aggregates.
//!
//! Layout: [`Config`] (env), [`AppState`], [`router`] (routes, for in-process
//! tests) and [`run`] (connect, serve until shutdown). Aggregates, the outbox
//! relay and the reactors arrive with the write-side issue.

use std::future::Future;

use axum::{Router, extract::FromRef};
use clap::Parser;
use platform::{
    config::{AuthConfig, NatsConfig, PostgresConfig, StartupConfig, TelemetryConfig},
    http::{Health, JwtKeys, Ops},
};
use tokio::net::TcpListener;

pub const SERVICE: &str = "command-api";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks command API")]
pub struct Config {
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, FromRef)]
pub struct AppState {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    pub jwt: JwtKeys,
    pub ops: Ops,
}

pub fn router(state: AppState) -> Router {
    let ops = state.ops.clone();
    platform::http::service_router(Router::new().with_state(state), ops)
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
    let state = AppState {
        pool,
        nats,
        jwt: JwtKeys::new(&config.auth.jwt_secret),
        ops,
    };
    platform::http::serve(listener, router(state), shutdown).await?;
    Ok(())
}
