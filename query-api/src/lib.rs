//! The read side's HTTP API over the JSON document views.
//!
//! Layout: [`routes`] (the endpoints of API.md "Query API": documents by id
//! with read-your-writes waits, order search, my coupons), [`filter`] (the
//! MongoDB-style `filter`, `sort` and cursor of `GET /orders`, translated to
//! parameterized SQL), [`watch`] (read-your-writes waits shared by every
//! waiting request), [`cache`] (documents by id in memory, invalidated by the
//! projections' writes), [`lookup`] (reads by id, gathered into one
//! statement per view under load), [`error`] (the one error type),
//! [`Config`] (env), [`AppState`], [`router`] (for in-process tests) and
//! [`run`].

pub mod cache;
pub mod error;
pub mod filter;
pub mod lookup;
pub mod routes;
pub mod watch;

use std::{future::Future, sync::Arc};

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
    /// Memory for documents read by id, in MiB (0: no cache).
    #[arg(long, env = "QUERY_CACHE_MB", default_value_t = 64)]
    pub cache_mb: u64,
    /// The longest a cached document is served without being read again,
    /// should an invalidation be lost.
    #[arg(long, env = "QUERY_CACHE_TTL_MS", default_value_t = 5_000)]
    pub cache_ttl_ms: u64,
    /// Reads by id in one statement at most.
    #[arg(long, env = "QUERY_BATCH_MAX", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1_000))]
    pub batch_max: u16,
    /// Statements of reads by id in flight at once; reads that arrive while
    /// all are busy go together in the next one. More statements at once
    /// mean smaller batches: on a machine shared with Postgres one is
    /// fastest (docs/BENCHMARKS.md); a Postgres with cores of its own can
    /// use more. Keep it below the pool's size, which list queries and
    /// read-your-writes waits share.
    #[arg(long, env = "QUERY_BATCH_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1_000))]
    pub batch_concurrency: u16,
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

/// What the handlers share, behind one reference count: axum clones the
/// state for every request and extractor.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug, Clone)]
pub struct Shared {
    pub pool: sqlx::PgPool,
    pub jwt: JwtKeys,
    pub ops: Ops,
    pub watch: watch::VersionWatch,
    pub lookups: lookup::Lookups,
    /// `None`: every read goes to Postgres.
    pub cache: Option<cache::DocCache>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl FromRef<AppState> for JwtKeys {
    fn from_ref(state: &AppState) -> Self {
        state.jwt.clone()
    }
}

impl AppState {
    pub fn new(pool: sqlx::PgPool, jwt: JwtKeys, ops: Ops) -> Self {
        Self(Arc::new(Shared {
            watch: watch::VersionWatch::new(pool.clone()),
            lookups: lookup::Lookups::new(pool.clone(), lookup::BatchOptions::default()),
            pool,
            jwt,
            ops,
            cache: None,
        }))
    }

    /// Reads by id gathered as `options` say.
    pub fn with_batching(self, options: lookup::BatchOptions) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.0);
        shared.lookups = lookup::Lookups::new(shared.pool.clone(), options);
        Self(Arc::new(shared))
    }

    /// Reads by id through `cache`; the caller keeps it invalidated
    /// ([`cache::DocCache::listen`]).
    pub fn with_cache(self, cache: cache::DocCache) -> Self {
        let mut shared = Arc::unwrap_or_clone(self.0);
        shared.cache = Some(cache);
        Self(Arc::new(shared))
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
    let mut state =
        AppState::new(pool.clone(), JwtKeys::new(&config.auth.jwt_secret), ops).with_batching(lookup::BatchOptions {
            max_batch: usize::from(config.batch_max),
            concurrency: usize::from(config.batch_concurrency),
        });
    let mut listening = None;
    if config.cache_mb > 0 {
        let cache = cache::DocCache::new(
            config.cache_mb.saturating_mul(1 << 20),
            std::time::Duration::from_millis(config.cache_ttl_ms),
        );
        listening = Some(cache.listen(pool));
        state = state.with_cache(cache);
    }
    let served = platform::http::serve(listener, router(state), &config.http, shutdown).await;
    if let Some(listening) = listening {
        listening.abort();
    }
    served?;
    Ok(())
}
