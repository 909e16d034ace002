//! The flash-sale gate: Redis Lua admission, the Redis-stream forwarder to
//! JetStream, warm-up, re-warm and re-credit.
//!
//! Layout:
//! - [`admission`]: `POST /seckill/{voucher_id}`, with the in-process
//!   sold-out and unknown-voucher flags of [`flags`] and the per-user rate
//!   limit of [`limiter`];
//! - [`gate`]: the Lua scripts (`lua/`) and typed calls to them; [`keys`]:
//!   the key layout, one hash tag per voucher; [`replication`]: the `WAIT`
//!   an admission's 202 waits for on a replicated Redis, one per group of
//!   admissions;
//! - [`forwarder`]: Redis streams → JetStream `OrderRequested`;
//!   [`dead_letters`]: the entries it could not read (the `citypicks-dlq`
//!   CLI lists and re-drives them);
//!   [`reconciler`]: every admission of this gate has an order in the
//!   store, or its request is sent again;
//! - [`ledger`] (pure) and [`warmup`]: rebuilding a voucher's gate from the
//!   event store, and the consumer of Voucher events (warm-up, re-credit);
//! - [`Config`] (env), [`AppState`], [`router`] (routes, for in-process
//!   tests) and [`run`] (connect, serve until shutdown).

pub mod admission;
pub mod dead_letters;
pub mod error;
pub mod flags;
pub mod forwarder;
pub mod gate;
pub mod keys;
pub mod ledger;
pub mod limiter;
pub mod reconciler;
pub mod replication;
pub mod warmup;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::FromRef, routing::post};
use clap::Parser;
use events::{Namespace, VoucherEvent, subjects::SECKILL_EDGE_CONSUMER};
use platform::{
    config::{AuthConfig, NatsConfig, PostgresConfig, RedisConfig, StartupConfig, TelemetryConfig},
    http::{Health, JwtKeys, Ops},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use admission::Edge;
use forwarder::{Forwarder, ForwarderConfig};
use gate::Gate;
use limiter::{AttemptLimiter, RateLimit};
use warmup::{SaleEvents, Warmer, WarmerConfig};

pub const SERVICE: &str = "seckill-edge";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks seckill edge")]
pub struct Config {
    #[arg(long, env = "SECKILL_EDGE_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: String,
    /// Prefix of every Redis key of the edge (one per deployment sharing a Redis).
    #[arg(long, env = "SECKILL_KEY_PREFIX", default_value = "cp:")]
    pub key_prefix: String,
    /// Attempts a user may burst on one voucher before the rate limit applies
    /// (per edge instance: the limit is kept in process).
    #[arg(long, env = "SECKILL_RATE_LIMIT_BURST", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate_limit_burst: u32,
    /// Sustained attempts per second per user and voucher, per edge instance;
    /// 0 turns the limit off.
    #[arg(long, env = "SECKILL_RATE_LIMIT_PER_SEC", default_value_t = 5.0, value_parser = rate_per_second)]
    pub rate_limit_per_sec: f64,
    /// How long this process answers "sold out" without asking Redis.
    #[arg(long, env = "SECKILL_SOLD_OUT_TTL_MS", default_value_t = 1_000)]
    pub sold_out_ttl_ms: u64,
    /// How long this process answers 404 for an id the event store does not know.
    #[arg(long, env = "SECKILL_UNKNOWN_TTL_MS", default_value_t = 2_000)]
    pub unknown_ttl_ms: u64,
    /// Replicas of the voucher's Redis primary that must hold an admission
    /// before it is answered 202 (`WAIT`); 0 answers at once. Set it to 1 on
    /// a replicated Redis (a cluster), so a failover loses no promised order.
    #[arg(long, env = "SECKILL_ADMIT_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=16))]
    pub admit_replicas: u16,
    /// How long an admission waits for those replicas before the attempt is
    /// answered 503 (retry) instead. An acknowledgement later than
    /// [`replication::LATE_FACTOR`] times this (at most 3 s) is not
    /// trusted: keep that well below the cluster's `cluster-node-timeout`.
    #[arg(long, env = "SECKILL_ADMIT_REPLICA_TIMEOUT_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub admit_replica_timeout_ms: u64,
    /// How long an `Idempotency-Key`'s answer is kept.
    #[arg(long, env = "SECKILL_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// Run the forwarder (Redis streams → JetStream) in this process.
    #[arg(long, env = "SECKILL_FORWARDER_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub forwarder_enabled: bool,
    /// Entries the forwarder reads and publishes per round.
    #[arg(long, env = "SECKILL_FORWARDER_BATCH", default_value_t = 1_000)]
    pub forwarder_batch: usize,
    /// Pending entries idle this long are taken over from a dead forwarder.
    #[arg(long, env = "SECKILL_FORWARDER_CLAIM_IDLE_MS", default_value_t = 10_000)]
    pub forwarder_claim_idle_ms: u64,
    /// Consume Voucher events here (warm-up and re-credit).
    #[arg(long, env = "SECKILL_SALE_EVENTS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub sale_events_enabled: bool,
    /// How long a re-warm waits for the claim writer to catch up.
    #[arg(long, env = "SECKILL_REWARM_DRAIN_TIMEOUT_MS", default_value_t = 5_000)]
    pub rewarm_drain_timeout_ms: u64,
    /// This instance's name in the forwarder's consumer groups (default: random).
    #[arg(long, env = "SECKILL_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How often the admissions' reconciler checks that every admitted
    /// request has an order in the store ([`reconciler`]); 0 turns it off.
    #[arg(long, env = "SECKILL_RECONCILE_INTERVAL_MS", default_value_t = 5_000)]
    pub reconcile_interval_ms: u64,
    /// How old an admission must be before the reconciler looks for its order.
    #[arg(long, env = "SECKILL_RECONCILE_GRACE_MS", default_value_t = 30_000)]
    pub reconcile_grace_ms: u64,
    /// The most buyers a second the reconciler reads from Redis (it walks
    /// each voucher's buyers in pages, pausing between them); 0: no pause.
    #[arg(long, env = "SECKILL_RECONCILE_SCAN_RATE", default_value_t = 20_000)]
    pub reconcile_scan_rate: u32,
    #[command(flatten)]
    pub postgres: PostgresConfig,
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
    #[command(flatten)]
    pub http: platform::config::HttpConfig,
}

impl Config {
    pub fn rate_limit(&self) -> RateLimit {
        RateLimit {
            burst: self.rate_limit_burst,
            per_second: self.rate_limit_per_sec,
        }
    }

    pub fn instance_id(&self) -> String {
        self.instance_id
            .clone()
            .unwrap_or_else(|| format!("edge-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
    }
}

/// A rate between 0 and 1,000,000 attempts per second.
fn rate_per_second(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if (0.0..=1_000_000.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "{value:?} is not a number of attempts per second from 0 to 1000000"
        )),
    }
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub edge: Arc<Edge>,
    pub jwt: JwtKeys,
    pub ops: Ops,
}

/// The routes' state: axum clones it for every request (more than once), so
/// it is one reference count. Cloning [`AppState`] itself also cloned the
/// health checks' Redis and NATS clients, and dropping those clones cost
/// more than the rate limit (docs/BENCHMARKS.md, "Seckill edge").
#[derive(Debug, Clone)]
struct Routes(Arc<AppState>);

impl FromRef<Routes> for Arc<Edge> {
    fn from_ref(routes: &Routes) -> Self {
        routes.0.edge.clone()
    }
}

impl FromRef<Routes> for JwtKeys {
    fn from_ref(routes: &Routes) -> Self {
        routes.0.jwt.clone()
    }
}

pub fn router(state: AppState) -> Router {
    let ops = state.ops.clone();
    let routes = Router::new()
        .route("/seckill/{voucher_id}", post(admission::attempt))
        .route("/openapi.json", axum::routing::get(openapi))
        .with_state(Routes(Arc::new(state)));
    platform::http::service_router(routes, ops)
}

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let timeout = config.startup.timeout();
    let redis = platform::kv::connect(&config.redis, timeout).await?;
    let redis_client = platform::kv::KvClient::open(&config.redis)?;
    let nats = platform::bus::connect(&config.nats, SERVICE, timeout).await?;
    let namespace = Namespace::new(&config.nats.nats_namespace)?;
    let js = cp_nats::jetstream(nats.clone(), 5_000);
    let topology = cp_nats::Topology::new(namespace.clone()).with_replicas(config.nats.nats_stream_replicas.into());
    cp_nats::ensure_topology_within(&js, &topology, timeout).await?;
    // Only a re-warm reads the event store: admission keeps working while it is down.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.postgres.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(config.postgres.database_url.expose())?;

    if config.redis.redis_cluster && config.admit_replicas == 0 {
        tracing::warn!(
            "SECKILL_ADMIT_REPLICAS=0 on a Redis Cluster: a failover can lose admissions already answered 202; set it to 1"
        );
    }
    let clock: platform::clock::SharedClock = Arc::new(platform::clock::SystemClock);
    let gate = Gate::new(
        redis.clone(),
        config.key_prefix.clone(),
        Duration::from_secs(config.idempotency_ttl_secs),
        clock.clone(),
    )
    .with_replicas(
        config.admit_replicas,
        Duration::from_millis(config.admit_replica_timeout_ms),
    );
    let limiter = Arc::new(AttemptLimiter::new(config.rate_limit()));
    gate.load_scripts().await?;
    let flags = Arc::new(flags::VoucherFlags::new(
        Duration::from_millis(config.sold_out_ttl_ms),
        Duration::from_millis(config.unknown_ttl_ms),
    ));
    let warmer = Arc::new(Warmer::new(
        gate.clone(),
        pool.clone(),
        js.clone(),
        namespace.clone(),
        WarmerConfig {
            drain_timeout: Duration::from_millis(config.rewarm_drain_timeout_ms),
            ..WarmerConfig::default()
        },
    ));
    let edge = Edge {
        gate: gate.clone(),
        flags: flags.clone(),
        warmer: warmer.clone(),
        limiter: limiter.clone(),
    };
    let ops = Ops {
        health: Health::new().redis(redis.clone()).nats(nats),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState {
        edge: Arc::new(edge),
        jwt: JwtKeys::new(&config.auth.jwt_secret),
        ops,
    };

    let stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    background.spawn({
        let stop = stop.clone();
        async move {
            // users whose bucket is full again are forgotten: memory follows
            // the users of the last seconds, not of the whole sale
            let mut every = tokio::time::interval(Duration::from_secs(10));
            while stop.run_until_cancelled(every.tick()).await.is_some() {
                limiter.forget_idle();
            }
        }
    });
    let publisher = cp_nats::Publisher::new(js.clone(), 4_096);
    if config.forwarder_enabled {
        let forwarder_config = ForwarderConfig {
            batch: config.forwarder_batch.max(1),
            claim_idle: Duration::from_millis(config.forwarder_claim_idle_ms),
            ..ForwarderConfig::new(config.instance_id())
        };
        let forwarder = Forwarder::new(
            redis_client,
            config.key_prefix.clone(),
            publisher.clone(),
            namespace.clone(),
            forwarder_config,
        );
        background.spawn(forwarder.run(stop.clone()));
    }
    if config.reconcile_interval_ms > 0 {
        let reconciler = reconciler::AdmissionReconciler::new(
            redis.clone(),
            config.key_prefix.clone(),
            pool.clone(),
            publisher.clone(),
            namespace.clone(),
            reconciler::ReconcilerConfig {
                every: Duration::from_millis(config.reconcile_interval_ms),
                grace: Duration::from_millis(config.reconcile_grace_ms),
                scan_rate: config.reconcile_scan_rate,
                ..reconciler::ReconcilerConfig::default()
            },
            clock.clone(),
        );
        background.spawn(reconciler.run(stop.clone()));
    }
    if config.sale_events_enabled {
        let spec = cp_nats::ConsumerSpec::new(
            namespace.events_stream(<VoucherEvent as events::AggregateEvents>::AGGREGATE_TYPE),
            SECKILL_EDGE_CONSUMER,
        )
        .max_deliver(10);
        let consumer = cp_nats::ensure_consumer(&js, &spec).await?;
        let handler = SaleEvents { warmer, gate, flags };
        let runner_config = cp_nats::RunnerConfig {
            max_deliver: 10,
            ..cp_nats::RunnerConfig::default()
        };
        // a sale event waits while Redis is away rather than spending its deliveries
        let runner = cp_nats::ConsumerRunner::new(consumer, handler, publisher, namespace, runner_config)
            .with_probe(cp_nats::probe(move || platform::kv::answers(redis.clone())));
        let stop = stop.clone();
        background.spawn(async move {
            if let Err(error) = runner.run(stop.cancelled_owned()).await {
                tracing::error!(%error, "sale events consumer stopped");
            }
        });
    }

    let served = platform::http::serve(listener, router(state), &config.http, shutdown).await;
    stop.cancel();
    while background.join_next().await.is_some() {}
    served?;
    Ok(())
}
