//! The flash-sale gate: Redis Lua admission, the Redis-stream forwarder to
//! JetStream, warm-up and re-credit.
//!
//! Layout: [`Config`] (env), [`AppState`], [`router`] (routes, for in-process
//! tests) and [`run`] (connect, serve until shutdown). Admission, forwarder
//! and warm-up arrive with the seckill-edge issue.

use std::future::Future;

use axum::{Router, extract::FromRef};
use clap::Parser;
use platform::{
    config::{AuthConfig, NatsConfig, RedisConfig, StartupConfig, TelemetryConfig},
    http::{Health, JwtKeys, Ops},
};
use tokio::net::TcpListener;

pub const SERVICE: &str = "seckill-edge";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks seckill edge")]
pub struct Config {
    #[arg(long, env = "SECKILL_EDGE_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: String,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, FromRef)]
pub struct AppState {
    pub redis: redis::aio::ConnectionManager,
    pub nats: async_nats::Client,
    pub jwt: JwtKeys,
    pub ops: Ops,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
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
    let redis = platform::kv::connect(&config.redis, timeout).await?;
    let nats = platform::bus::connect(&config.nats, SERVICE, timeout).await?;
    let ops = Ops {
        health: Health::new().redis(redis.clone()).nats(nats.clone()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState {
        redis,
        nats,
        jwt: JwtKeys::new(&config.auth.jwt_secret),
        ops,
    };
    platform::http::serve(listener, router(state), shutdown).await?;
    Ok(())
}
