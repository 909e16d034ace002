//! The read side's writers: projectors that build JSON document views, the
//! projection daemon that keeps them current from JetStream, and the replay
//! CLI that rebuilds them from the event store.
//!
//! Layout:
//! - [`views`]: the pure projectors (`apply(view, event)`), one per view;
//! - [`writer`]: documents in a view table and the version rule, shared by
//!   the daemon and the replay;
//! - [`daemon`]: the batch handler of each projection's durable consumer,
//!   splitting each batch by aggregate id among workers' transactions;
//! - [`replay`]: rebuild into a shadow table and swap (binary `replay`);
//!   [`progress`]: its progress, a bar on a terminal, plain lines otherwise;
//! - [`reconciler`]: proves every stored event reached its view and repairs
//!   what a vanished commit left behind;
//! - [`dead_letters`]: the events projectors refused, and rebuilding their
//!   documents once the projector is fixed (the `citypicks-dlq` CLI);
//! - [`catalog`]: every projection by name;
//! - [`Config`] (env), [`AppState`], [`router`] (`/health`, `/metrics`) and
//!   [`run`] (the `projection-daemon` process, which also runs
//!   `cp_nats::ExhaustedDeliveries`, as the command API does).

pub mod catalog;
pub mod daemon;
pub mod dead_letters;
pub mod progress;
pub mod reconciler;
pub mod replay;
pub mod views;
pub mod writer;

use std::{future::Future, time::Duration};

use axum::Router;
use clap::Parser;
use cp_nats::{ConsumerRunner, ConsumerSpec, Publisher, RunnerConfig, Topology};
use events::Namespace;
use platform::{
    config::{NatsConfig, PostgresConfig, StartupConfig, TelemetryConfig},
    http::{Health, Ops},
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use catalog::Projection;
use daemon::ProjectionHandler;
use views::{CouponProjector, OrderProjector, ProductProjector, Projector, VoucherProjector};

pub const SERVICE: &str = "projection-daemon";

#[derive(Debug, Clone, Parser)]
#[command(name = SERVICE, about = "City Picks projection daemon")]
pub struct Config {
    /// Where the daemon serves /health and /metrics.
    #[arg(long, env = "PROJECTIONS_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: String,
    /// Events applied per transaction, at most.
    #[arg(long, env = "PROJECTIONS_BATCH_SIZE", default_value_t = 2_000)]
    pub batch_size: usize,
    /// Deliveries of an event before it is dead-lettered and skipped.
    #[arg(long, env = "PROJECTIONS_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Transactions each batch is split into by aggregate id, committed side
    /// by side (each on its own connection: keep it below the pool size).
    /// Four with batches of 2,000 was the fastest measured on two cores
    /// (docs/BENCHMARKS.md); more workers hide more commit waits.
    #[arg(long, env = "PROJECTIONS_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// How often the reconciler proves that every stored event is in its
    /// view and repairs what is not ([`reconciler`]); 0 turns it off.
    #[arg(long, env = "PROJECTIONS_RECONCILE_INTERVAL_MS", default_value_t = 1_000)]
    pub reconcile_interval_ms: u64,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    #[command(flatten)]
    pub http: platform::config::HttpConfig,
}

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub ops: Ops,
}

pub fn router(state: AppState) -> Router {
    platform::http::service_router(Router::new(), state.ops)
}

/// What running the projections needs.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub namespace: Namespace,
    pub batch_size: usize,
    pub max_deliver: i64,
    /// Transactions per batch, split by aggregate id.
    pub workers: usize,
}

impl Daemon {
    /// Runs every projection's consumer and the lag reporter until `stop`.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().project::<OrderProjector>(stop.clone()));
        tasks.spawn(self.clone().project::<CouponProjector>(stop.clone()));
        tasks.spawn(self.clone().project::<VoucherProjector>(stop.clone()));
        tasks.spawn(self.clone().project::<ProductProjector>(stop.clone()));
        tasks.spawn(self.clone().report_lag(stop.clone()));
        let mut result = Ok(());
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(error)) = done {
                // one projection failing to start stops them all: better loud than half a read side
                stop.cancel();
                result = Err(error);
            }
        }
        result
    }

    async fn project<P: Projector>(self, stop: CancellationToken) -> anyhow::Result<()> {
        let spec = ConsumerSpec::new(
            self.namespace.events_stream(P::AGGREGATE_TYPE),
            daemon::consumer_name(P::NAME),
        )
        .max_deliver(self.max_deliver)
        .max_ack_pending(i64::try_from(self.batch_size * 4).unwrap_or(4_000));
        let consumer = cp_nats::ensure_consumer(&self.js, &spec).await?;
        let runner = ConsumerRunner::batched(
            consumer,
            ProjectionHandler::<P>::new(self.pool.clone(), self.workers),
            Publisher::new(self.js.clone(), 256),
            self.namespace.clone(),
            RunnerConfig {
                max_deliver: self.max_deliver,
                batch: self.batch_size,
                ..RunnerConfig::default()
            },
        )
        .with_probe({
            let pool = self.pool.clone();
            cp_nats::probe(move || platform::pg::answers(pool.clone()))
        });
        tracing::info!(projection = P::NAME, "projecting");
        runner.run(stop.cancelled_owned()).await?;
        Ok(())
    }

    async fn report_lag(self, stop: CancellationToken) -> anyhow::Result<()> {
        while !stop.is_cancelled() {
            for projection in Projection::ALL {
                let stream = self
                    .js
                    .get_stream(self.namespace.events_stream(projection.aggregate_type()))
                    .await;
                let reported = match stream {
                    Ok(stream) => daemon::report_lag(&self.pool, &stream, projection.name()).await,
                    Err(error) => Err(error.into()),
                };
                if let Err(error) = reported {
                    tracing::debug!(projection = projection.name(), %error, "lag not reported");
                }
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        Ok(())
    }
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
    let topology = Topology::new(namespace.clone()).with_replicas(config.nats.nats_stream_replicas.into());
    cp_nats::ensure_topology_within(&js, &topology, timeout).await?;
    let ops = Ops {
        health: Health::new().postgres(pool.clone()).nats(nats.clone()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let stop = CancellationToken::new();
    let reconciling = (config.reconcile_interval_ms > 0).then(|| {
        let reconciler = reconciler::ViewReconciler::new(
            pool.clone(),
            js.clone(),
            namespace.clone(),
            reconciler::ReconcilerConfig {
                every: Duration::from_millis(config.reconcile_interval_ms),
                ..reconciler::ReconcilerConfig::default()
            },
        );
        tokio::spawn(reconciler.run(stop.clone()))
    });
    // messages a consumer's process died on every time (any consumer, not
    // only this daemon's): moved to the dead-letter stream
    let exhausted = tokio::spawn(
        cp_nats::ExhaustedDeliveries::new(js.clone(), Publisher::new(js.clone(), 64), namespace.clone())
            .run(stop.clone().cancelled_owned()),
    );
    let daemon = Daemon {
        pool: pool.clone(),
        js,
        namespace,
        batch_size: config.batch_size.max(1),
        max_deliver: config.max_deliver.max(1),
        workers: config.workers.max(1),
    };
    let mut projecting = tokio::spawn(daemon.run(stop.clone()));
    let state = AppState { pool, nats, ops };
    let serving = platform::http::serve(listener, router(state), &config.http, shutdown);
    tokio::select! {
        served = serving => {
            stop.cancel();
            projecting.await??;
            exhausted.await?;
            if let Some(reconciling) = reconciling {
                reconciling.await?;
            }
            served?;
            Ok(())
        }
        // a daemon that cannot project must not look healthy: exit, get restarted
        done = &mut projecting => {
            done??;
            anyhow::bail!("the projections stopped")
        }
    }
}
