//! The write side of City Picks: aggregates, the command API, the outbox
//! relay and the seckill claim writer, in one process (`command-api`).
//!
//! Layout:
//! - [`domain`]: the pure aggregates (Voucher, Order, Payment, Coupon, Product).
//! - [`bus`]: one command with bounded retries, over the `event-store`
//!   crate (appends, loads, the aggregate cache).
//! - [`api`]: the HTTP handlers and their error type.
//! - the outbox relay (`event_store::relay`) and the leader election
//!   (`event_store::leader`) run in this process.
//! - [`claims`]: the seckill claim writer, JetStream → voucher + orders;
//!   [`reconciler`]: beside it, proves every acknowledged request has an
//!   order and re-drives the ones a lost commit left without one.
//! - `cp_nats::ExhaustedDeliveries` runs here (and in the projection daemon):
//!   messages a consumer's process died on at every delivery, moved to the
//!   dead-letter stream.
//! - every cached aggregate is forgotten when Postgres restarted (it may
//!   have lost commits they include).
//! - [`lifecycle`]: the order lifecycle reactor; [`saga`]: the goods
//!   reservation saga's pure decision, which the reactor executes.
//! - [`Config`], [`AppState`], [`router`] (for in-process tests) and [`run`].

pub mod api;
pub mod bus;
pub mod claims;
pub mod domain;
pub mod hot;
pub mod lifecycle;
pub mod payments;
pub mod reconciler;
pub mod saga;
pub mod timeouts;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::FromRef};
use clap::Parser;
use event_store::{
    AggregateCache, EventStore,
    relay::{Relay, RelayConfig},
};
use events::Namespace;
use platform::{
    config::{AuthConfig, NatsConfig, PostgresConfig, RedisConfig, StartupConfig, TelemetryConfig},
    http::{Health, JwtKeys, Ops},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api::Api,
    bus::Commands,
    claims::ClaimWriter,
    domain::{SharedClock, SystemClock, VoucherServices},
};

pub const SERVICE: &str = "command-api";
pub use events::subjects::CLAIM_WRITER_CONSUMER;

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks command API, outbox relay and claim writer")]
pub struct Config {
    #[arg(long, env = "COMMAND_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Run the outbox relay in this process (one instance is active at a time).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay_enabled: bool,
    /// Events the relay reads and publishes per round.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 2_000)]
    pub relay_batch_size: i64,
    /// Run the seckill claim writer in this process (one instance is active at a time).
    #[arg(long, env = "CLAIM_WRITER_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub claim_writer_enabled: bool,
    /// Most OrderRequested messages decided in one voucher append.
    #[arg(long, env = "CLAIM_BATCH_SIZE", default_value_t = 1_000)]
    pub claim_batch_size: usize,
    /// How often the claim writer's reconciler checks that every acknowledged
    /// request has an order ([`reconciler`]); 0 turns it off.
    #[arg(long, env = "CLAIM_RECONCILE_INTERVAL_MS", default_value_t = 1_000)]
    pub claim_reconcile_interval_ms: u64,
    /// Run the order lifecycle reactor (deadlines, coupons, compensation) here.
    #[arg(long, env = "LIFECYCLE_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub lifecycle_enabled: bool,
    /// Goods orders in batches: submissions group-committed, and the saga
    /// deciding the orders of a consumer batch together. `false` runs one
    /// order at a time (the baseline of docs/BENCHMARKS.md).
    #[arg(long, env = "ORDER_BATCHING", default_value_t = true, action = clap::ArgAction::Set)]
    pub order_batching: bool,
    /// Run the payment-timeout poller here (any number of processes may).
    #[arg(long, env = "TIMEOUTS_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub timeouts_enabled: bool,
    /// How long a placed order may await payment before it is cancelled.
    #[arg(long, env = "PAYMENT_TIMEOUT_SECS", default_value_t = 900)]
    pub payment_timeout_secs: u64,
    /// The provider's webhook signing secret; unset turns payments off.
    #[arg(long, env = "PAYMENT_WEBHOOK_SECRET", hide_env_values = true)]
    pub payment_webhook_secret: Option<platform::Secret>,
    /// `hosted`: a real provider's checkout page (`PAYMENT_CHECKOUT_URL`);
    /// `simulated`: the local stack's fake provider, whose checkout route
    /// exists only with this setting (never in production).
    #[arg(long, env = "PAYMENT_PROVIDER", value_enum, default_value = "hosted")]
    pub payment_provider: payments::provider::ProviderKind,
    /// The hosted provider's checkout page; `{payment_id}` is replaced.
    #[arg(
        long,
        env = "PAYMENT_CHECKOUT_URL",
        default_value = "https://checkout.payments.invalid/pay/{payment_id}"
    )]
    pub payment_checkout_url: String,
    /// The command API as customers reach it: the simulated provider's checkout URLs start with it.
    #[arg(long, env = "PAYMENT_PUBLIC_URL", default_value = "http://127.0.0.1:8080")]
    pub payment_public_url: String,
    /// Orders in flight per product before `POST /orders` answers 503 `product_busy`; 0 turns the gate off.
    #[arg(long, env = "HOT_PRODUCT_LIMIT", default_value_t = 100)]
    pub hot_product_limit: u32,
    /// A crashed process's units expire with the gate's key after this long.
    #[arg(long, env = "HOT_PRODUCT_FUSE_MS", default_value_t = 10_000)]
    pub hot_product_fuse_ms: u64,
    /// Where the simulated provider delivers its webhooks.
    #[arg(
        long,
        env = "PAYMENT_WEBHOOK_URL",
        default_value = "http://127.0.0.1:8080/webhooks/payments"
    )]
    pub payment_webhook_url: String,
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

#[derive(Debug, Clone, FromRef)]
pub struct AppState {
    pub api: Api,
    pub ops: Ops,
    /// The goods saga decides a consumer batch's submissions together
    /// (default); `false` decides one order at a time (`ORDER_BATCHING`).
    pub order_batching: bool,
}

/// Aggregates each command type keeps in memory, to decide on without
/// reading the store first (see [`bus::Commands::execute`]).
pub const AGGREGATE_CACHE_CAPACITY: usize = 10_000;

/// At most this many submissions share one group-commit statement.
pub const ORDER_GROUP_COMMIT: usize = 256;

impl AppState {
    /// Wires the write side over `pool` with the system clock.
    pub fn new(pool: sqlx::PgPool, jwt: JwtKeys, ops: Ops) -> Self {
        Self::with_clock(pool, jwt, ops, Arc::new(SystemClock))
    }

    pub fn with_clock(pool: sqlx::PgPool, jwt: JwtKeys, ops: Ops, clock: SharedClock) -> Self {
        let store = EventStore::new(pool);
        let voucher_cache = AggregateCache::new(AGGREGATE_CACHE_CAPACITY);
        let vouchers =
            Commands::new(store.clone(), VoucherServices::new(clock.clone())).with_cache(voucher_cache.clone());
        let api = Api {
            vouchers: Arc::new(vouchers),
            voucher_cache,
            orders: Arc::new(Commands::new(store.clone(), ())),
            // products are hot too: every goods order reserves stock on each of its lines
            products: Arc::new(Commands::new(store.clone(), ()).with_cache(AggregateCache::new(10_000))),
            coupons: Arc::new(Commands::new(store.clone(), ())),
            store,
            clock,
            jwt,
            payments: None,
            hot_products: None,
        };
        Self {
            api,
            ops,
            order_batching: true,
        }
    }

    /// Puts the per-product in-flight limit in front of goods orders.
    /// Submissions of goods orders group-committed (`ORDER_BATCHING`). Needs
    /// a Tokio runtime: it starts the group-commit writer.
    pub fn with_submit_group_commit(mut self) -> Self {
        let group = event_store::group::GroupCommit::start(self.api.store.clone(), ORDER_GROUP_COMMIT);
        let cache = AggregateCache::new(AGGREGATE_CACHE_CAPACITY);
        self.api.orders = Arc::new(
            Commands::new(self.api.store.clone(), ())
                .with_cache(cache)
                .with_group_commit(group),
        );
        self
    }

    pub fn with_hot_products(mut self, gate: hot::ProductSemaphore) -> Self {
        self.api.hot_products = Some(gate);
        self
    }

    /// Turns payments on (the pay, webhook and simulated-provider routes).
    pub fn with_payments(mut self, settings: payments::PaymentSettings) -> Self {
        self.api.payments = Some(Arc::new(settings));
        self
    }

    pub fn lifecycle(&self, pool: sqlx::PgPool, payment_timeout: Duration) -> lifecycle::Lifecycle {
        lifecycle::Lifecycle {
            pool,
            store: self.api.store.clone(),
            orders: self.api.orders.clone(),
            vouchers: self.api.vouchers.clone(),
            products: self.api.products.clone(),
            coupons: self.api.coupons.clone(),
            payment_timeout,
            coupon_validity: api::COUPON_VALIDITY,
            hot_products: self.api.hot_products.clone(),
            clock: self.api.clock.clone(),
            batching: self.order_batching,
        }
    }

    pub fn claim_writer(&self) -> ClaimWriter {
        ClaimWriter::new(
            self.api.store.clone(),
            self.api.voucher_cache.clone(),
            self.api.vouchers.services().clone(),
            (),
        )
    }
}

pub fn router(state: AppState) -> Router {
    platform::http::service_router(api::routes(state.api), state.ops)
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let timeout = config.startup.timeout();
    let pool = platform::pg::connect(&config.postgres, timeout).await?;
    let nats = platform::bus::connect(&config.nats, SERVICE, timeout).await?;
    let namespace = Namespace::new(&config.nats.nats_namespace)?;
    let js = cp_nats::jetstream(nats.clone(), 5_000);
    let topology = cp_nats::Topology::new(namespace.clone()).with_replicas(config.nats.nats_stream_replicas.into());
    cp_nats::ensure_topology_within(&js, &topology, timeout).await?;
    let ops = Ops {
        health: Health::new().postgres(pool.clone()).nats(nats.clone()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let mut state = AppState::new(pool.clone(), JwtKeys::new(&config.auth.jwt_secret), ops);
    state.order_batching = config.order_batching;
    if config.order_batching {
        state = state.with_submit_group_commit();
    }
    match &config.payment_webhook_secret {
        Some(secret) => {
            let provider: Arc<dyn payments::provider::PaymentProvider> = match config.payment_provider {
                payments::provider::ProviderKind::Hosted => Arc::new(payments::provider::HostedProvider {
                    checkout_url_template: config.payment_checkout_url.clone(),
                }),
                payments::provider::ProviderKind::Simulated => {
                    tracing::warn!("PAYMENT_PROVIDER=simulated: payments are simulated, never use this in production");
                    Arc::new(payments::provider::SimulatedProvider {
                        public_url: config.payment_public_url.clone(),
                    })
                }
            };
            state = state.with_payments(payments::PaymentSettings {
                provider,
                webhook_secret: secret.clone(),
                webhook_url: config.payment_webhook_url.clone(),
                http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
            });
        }
        None => tracing::warn!("PAYMENT_WEBHOOK_SECRET is not set: payments are off"),
    }
    if config.hot_product_limit > 0 {
        let client = platform::kv::KvClient::open(&config.redis)?;
        state = state.with_hot_products(hot::ProductSemaphore::connect(
            client,
            format!("{}:", namespace.as_str()),
            config.hot_product_limit,
            Duration::from_millis(config.hot_product_fuse_ms),
        ));
    }
    let stop = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();
    let publisher = cp_nats::Publisher::new(js.clone(), 4_096);

    if config.relay_enabled {
        let relay_config = RelayConfig {
            batch_size: config.relay_batch_size,
            ..RelayConfig::default()
        };
        let relay = Relay::new(pool.clone(), publisher.clone(), namespace.clone(), relay_config);
        background.spawn(relay.run(stop.clone().cancelled_owned()));
    }
    if config.claim_writer_enabled {
        let writer = state.claim_writer();
        let reconcile_interval_ms = config.claim_reconcile_interval_ms;
        let spec = cp_nats::ConsumerSpec::new(namespace.seckill_requests_stream(), CLAIM_WRITER_CONSUMER)
            .max_deliver(10)
            .max_ack_pending(i64::try_from(config.claim_batch_size * 20).unwrap_or(20_000));
        let runner_config = cp_nats::RunnerConfig {
            max_deliver: 10,
            batch: config.claim_batch_size,
            ..cp_nats::RunnerConfig::default()
        };
        let (pool, js, stop, publisher, namespace) = (
            pool.clone(),
            js.clone(),
            stop.clone(),
            publisher.clone(),
            namespace.clone(),
        );
        background.spawn(async move {
            event_store::leader::while_leader(
                &pool,
                claims::CLAIM_WRITER_LOCK_KEY,
                stop.clone().cancelled_owned(),
                |stepping_down| {
                    let reconcile_every = Duration::from_millis(reconcile_interval_ms);
                    let (writer, js, spec, publisher, namespace, runner_config, pool) = (
                        writer.clone(),
                        js.clone(),
                        spec.clone(),
                        publisher.clone(),
                        namespace.clone(),
                        runner_config.clone(),
                        pool.clone(),
                    );
                    async move {
                        match cp_nats::ensure_consumer(&js, &spec).await {
                            Ok(consumer) => {
                                // beside the writer, in the same term: it re-drives through it
                                let reconciling = (!reconcile_every.is_zero()).then(|| {
                                    let reconciler = reconciler::RequestReconciler::new(
                                        pool.clone(),
                                        js.clone(),
                                        namespace.clone(),
                                        writer.clone(),
                                        reconciler::ReconcilerConfig {
                                            every: reconcile_every,
                                            ..reconciler::ReconcilerConfig::default()
                                        },
                                    );
                                    tokio::spawn(reconciler.run(stepping_down.clone()))
                                });
                                let runner = cp_nats::ConsumerRunner::batched(
                                    consumer,
                                    writer,
                                    publisher,
                                    namespace,
                                    runner_config,
                                )
                                .with_probe(cp_nats::probe(move || platform::pg::answers(pool.clone())));
                                // on lost leadership (or shutdown) it gives back what it holds
                                if let Err(error) = runner.run(stepping_down.clone().cancelled_owned()).await {
                                    tracing::error!(%error, "claim writer stopped");
                                }
                                if let Some(reconciling) = reconciling {
                                    reconciling.abort();
                                    let _ = reconciling.await;
                                }
                            }
                            Err(error) => tracing::error!(%error, "claim writer consumer unavailable"),
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
            )
            .await;
        });
    }

    if config.lifecycle_enabled {
        let lifecycle = state.lifecycle(pool.clone(), Duration::from_secs(config.payment_timeout_secs));
        let spec = cp_nats::ConsumerSpec::new(
            namespace.events_stream(<events::OrderEvent as events::AggregateEvents>::AGGREGATE_TYPE),
            lifecycle::LIFECYCLE_CONSUMER,
        )
        .max_deliver(20);
        let consumer = cp_nats::ensure_consumer(&js, &spec).await?;
        let runner_config = cp_nats::RunnerConfig {
            max_deliver: 20,
            ..cp_nats::RunnerConfig::default()
        };
        let runner =
            cp_nats::ConsumerRunner::batched(consumer, lifecycle, publisher.clone(), namespace.clone(), runner_config)
                .with_probe({
                    let pool = pool.clone();
                    cp_nats::probe(move || platform::pg::answers(pool.clone()))
                });
        let stop = stop.clone();
        background.spawn(async move {
            if let Err(error) = runner.run(stop.cancelled_owned()).await {
                tracing::error!(%error, "order lifecycle reactor stopped");
            }
        });
    }
    background.spawn(watch_store(pool.clone(), state.api.clone(), stop.clone()));
    // messages a consumer's process died on every time (any consumer, not
    // only this service's): moved to the dead-letter stream
    let sweeper = cp_nats::ExhaustedDeliveries::new(js.clone(), publisher.clone(), namespace.clone());
    background.spawn(sweeper.run(stop.clone().cancelled_owned()));
    if config.timeouts_enabled {
        let poller = timeouts::TimeoutPoller::new(
            pool.clone(),
            state.api.orders.clone(),
            state.api.clock.clone(),
            timeouts::TimeoutConfig::default(),
        );
        background.spawn(poller.run(stop.clone().cancelled_owned()));
    }

    let served = platform::http::serve(listener, router(state), &config.http, shutdown).await;
    stop.cancel();
    while background.join_next().await.is_some() {}
    served?;
    Ok(())
}

/// Forgets the cached aggregates whenever Postgres restarted (checked every
/// second): it may have lost commits they include.
async fn watch_store(pool: sqlx::PgPool, api: Api, stop: CancellationToken) {
    let mut watch = event_store::reconcile::ServerWatch::default();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    while stop.run_until_cancelled(every.tick()).await.is_some() {
        if let Ok(started) = event_store::reconcile::server_started(&pool).await
            && watch.restarted(started)
        {
            tracing::warn!("Postgres restarted: forgetting the cached aggregates, which may hold lost commits");
            metrics::counter!("aggregate_cache_flushes_total").increment(1);
            api.forget_cached();
        }
    }
}
