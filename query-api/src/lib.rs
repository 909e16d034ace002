//! The read side's HTTP API over the JSON document views.
//!
//! Layout: [`routes`] (the endpoints of API.md "Query API": documents by id
//! with read-your-writes waits, order search, my coupons), [`filter`] (the
//! MongoDB-style `filter`, `sort` and cursor of `GET /orders`, translated to
//! parameterized SQL), [`watch`] (read-your-writes waits shared by every
//! waiting request), [`error`] (the one error type), [`Config`] (env),
//! [`AppState`], [`router`] (for in-process tests) and [`run`].

pub mod error;
pub mod filter;
pub mod routes;
pub mod watch;

use std::future::Future;

use axum::{Router, extract::FromRef};
use clap::Parser;
use platform::{
    config::{AuthConfig, PostgresConfig, StartupConfig, TelemetryConfig},
    http::{Health, JwtKeys, Ops},
};
use tokio::net::TcpListener;

pub const SERVICE: &str = "query-api";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks query API")]
pub struct Config {
    #[arg(long, env = "QUERY_API_ADDR", default_value = "127.0.0.1:8082")]
    pub addr: String,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    #[command(flatten)]
    pub http: platform::config::HttpConfig,
}

#[derive(Debug, Clone, FromRef)]
pub struct AppState {
    pub pool: sqlx::PgPool,
    pub jwt: JwtKeys,
    pub ops: Ops,
    pub watch: watch::VersionWatch,
}

impl AppState {
    pub fn new(pool: sqlx::PgPool, jwt: JwtKeys, ops: Ops) -> Self {
        Self {
            watch: watch::VersionWatch::new(pool.clone()),
            pool,
            jwt,
            ops,
        }
    }
}

pub fn router(state: AppState) -> Router {
    let ops = state.ops.clone();
    platform::http::service_router(routes::routes(state), ops)
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = platform::pg::connect(&config.postgres, config.startup.timeout()).await?;
    let ops = Ops {
        health: Health::new().postgres(pool.clone()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState::new(pool, JwtKeys::new(&config.auth.jwt_secret), ops);
    platform::http::serve(listener, router(state), &config.http, shutdown).await?;
    Ok(())
}
