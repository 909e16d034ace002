//! The fault suite: scripted flash sales through every service, each run as
//! its own process (the built binaries), on infrastructure of the suite's
//! own — a Postgres server, a JetStream cluster of three nats-server with R3
//! streams, a Redis Cluster of three primaries with a replica each — while
//! one part is killed mid-sale and brought back.
//!
//! One scenario ([`run`]): a fresh database, NATS namespace and Redis key
//! prefix; the four services started and healthy; a seckill voucher created
//! through the command API; a crowd attempting at a steady pace, with
//! duplicates (users attempt several times); at [`SaleConfig::fault_at`] the
//! [`Fault`] strikes (SIGKILL of a process, an immediate stop of Postgres),
//! [`SaleConfig::down_for`] later the part is started again; the crowd stops
//! at [`SaleConfig::duration`]. Then the invariants ([`Outcome`]): every
//! 202 ends as exactly one order, no oversell, no user holds two orders, the
//! voucher view agrees with the store, every view equals a replay from the
//! store (`--dry-run`), and how long after the part was back all of it held.
//!
//! `./dev chaos` runs every scenario with the release build and writes the
//! table of docs/RELIABILITY.md ([`table`]); `e2e/tests/it/chaos.rs` runs a
//! smaller subset in every CI run.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::Utc;
use platform::http::{JwtKeys, Role};
use projections::{
    Projection,
    replay::{ReplayOptions, Silent},
};
use serde_json::json;
use sqlx::PgPool;
use testkit::{NatsCluster, PostgresServer, RedisCluster, postgres_server::Durability, reqwest};
use uuid::Uuid;

const SECRET: &str = "chaos-jwt-secret-not-for-production";
const WEBHOOK_SECRET: &str = "whsec_chaos";

/// What is killed mid-sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL of the seckill edge (admission and forwarder).
    Edge,
    /// SIGKILL of the command API (relay, claim writer, reactors).
    CommandApi,
    /// SIGKILL of the projection daemon.
    ProjectionDaemon,
    /// SIGKILL of the query API.
    QueryApi,
    /// SIGKILL of one node of the JetStream cluster (the requests stream's leader).
    NatsNode,
    /// `pg_ctl stop -m immediate` on a server with `synchronous_commit = off`,
    /// its WAL writer frozen for the last half second: the acknowledged
    /// commits of that half second vanish.
    Postgres,
    /// SIGKILL of the Redis Cluster primary that holds the voucher.
    RedisPrimary,
    /// No kill: every buyer pays through the simulated provider around the
    /// moment its order's payment deadline fires (3 s after placing).
    PaymentTimeoutRace,
}

impl Fault {
    pub const ALL: [Self; 8] = [
        Self::Edge,
        Self::CommandApi,
        Self::ProjectionDaemon,
        Self::QueryApi,
        Self::NatsNode,
        Self::Postgres,
        Self::RedisPrimary,
        Self::PaymentTimeoutRace,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Self::Edge => "kill -9 seckill edge",
            Self::CommandApi => "kill -9 command API (relay, claim writer, reactors)",
            Self::ProjectionDaemon => "kill -9 projection daemon",
            Self::QueryApi => "kill -9 query API",
            Self::NatsNode => "kill -9 one NATS node (the requests stream's leader)",
            Self::Postgres => "Postgres immediate stop, the last 0.5 s of commits lost",
            Self::RedisPrimary => "kill -9 the voucher's Redis primary",
            Self::PaymentTimeoutRace => "payments racing their 3 s deadline",
        }
    }
}

/// The size and timing of one scripted sale.
#[derive(Debug, Clone)]
pub struct SaleConfig {
    pub stock: u32,
    pub users: u32,
    /// Attempts per user (the same user again and again: duplicates).
    pub attempts_per_user: u32,
    /// How long the crowd attempts, at a steady pace.
    pub duration: Duration,
    pub fault_at: Duration,
    pub down_for: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
}

impl SaleConfig {
    /// `./dev chaos`: a few hundred units, thousands of attempts.
    pub fn full() -> Self {
        Self {
            stock: 600,
            users: 800,
            attempts_per_user: 3,
            duration: Duration::from_secs(8),
            fault_at: Duration::from_millis(2_500),
            down_for: Duration::from_secs(3),
            concurrency: 32,
        }
    }

    /// The CI subset: smaller, on debug builds beside the other tests.
    pub fn ci() -> Self {
        Self {
            stock: 300,
            users: 400,
            attempts_per_user: 2,
            duration: Duration::from_secs(5),
            fault_at: Duration::from_millis(1_500),
            down_for: Duration::from_secs(2),
            concurrency: 16,
        }
    }
}

/// What one scenario showed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub fault: Fault,
    pub attempts: usize,
    pub admitted: usize,
    /// Orders decided in the store: placed and rejected.
    pub placed: usize,
    pub rejected: usize,
    /// 202s without an order in the store.
    pub lost: usize,
    /// More units held (placed minus released) than the stock.
    pub oversold: bool,
    /// Users holding more than one placed order.
    pub users_twice: usize,
    pub voucher_view_consistent: bool,
    /// Every projection's dry-run replay equals its view.
    pub replay_equal: bool,
    /// What differed, per projection: (name, changed, missing live, missing replay, sample ids).
    pub replay_differences: Vec<String>,
    /// From the part being back to every invariant holding (`None`: not
    /// within the wait).
    pub consistent_after: Option<Duration>,
    /// The same from the later of the part being back and the crowd's end
    /// (while the crowd admits, new requests are in flight).
    pub consistent_after_end: Option<Duration>,
    /// Repairs the reconcilers counted (requests, views).
    pub repairs: (u64, u64),
    /// The payment race: orders paid, timed out, and ending otherwise than
    /// with exactly one of the two (a payment after the timeout refunded
    /// once, the unit released once).
    pub race: Option<Race>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Race {
    pub paid: usize,
    pub timed_out: usize,
    pub refunded: usize,
    pub violations: usize,
}

/// The goal: consistent again this soon after the failed part is back.
pub const GOAL: Duration = Duration::from_secs(5);

impl Outcome {
    /// Every invariant held, and consistency came back within `goal`.
    pub fn met(&self, goal: Duration) -> bool {
        self.passed() && self.consistent_after.is_some_and(|after| after <= goal)
    }

    /// Every invariant held.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && !self.oversold
            && self.users_twice == 0
            && self.voucher_view_consistent
            && self.replay_equal
            && self.consistent_after.is_some()
            && self.race.is_none_or(|race| race.violations == 0)
    }
}

/// Where the service binaries are: `CP_BIN_DIR`, else the workspace's
/// `target/debug` (or `$CARGO_TARGET_DIR/debug`).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// The servers a scenario runs on, started once and shared by scenarios
/// (each has its own database, namespace and key prefix).
#[derive(Debug)]
pub struct Infra {
    pub postgres: PostgresServer,
    pub nats: NatsCluster,
    pub redis: RedisCluster,
}

impl Infra {
    pub async fn start() -> anyhow::Result<Self> {
        Ok(Self {
            postgres: PostgresServer::start(Durability::LoseRecentCommits)
                .await
                .context("postgres")?,
            nats: NatsCluster::start().await.context("nats cluster")?,
            redis: RedisCluster::start().await.context("redis cluster")?,
        })
    }
}

/// One service process: spawned with its environment, killed with SIGKILL.
#[derive(Debug)]
struct Service {
    name: &'static str,
    addr: SocketAddr,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn spawn(&mut self, bins: &Path) -> anyhow::Result<()> {
        let bin = bins.join(self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&bin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (cargo build --bins)", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client, within: Duration) -> anyhow::Result<()> {
        let url = format!("http://{}/health", self.addr);
        let deadline = Instant::now() + within;
        loop {
            if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!("{} exited ({status}); see {}", self.name, self.log.display());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not healthy within {within:?}; see {}",
                self.name,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The four services of one scenario.
struct Stack {
    pool: PgPool,
    prefix: String,
    edge: Service,
    commands: Service,
    queries: Service,
    projections: Service,
    bins: PathBuf,
    http: reqwest::Client,
    jwt: JwtKeys,
}

impl Stack {
    async fn start(
        infra: &Infra,
        bins: &Path,
        logs: &Path,
        label: &str,
        payment_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let database = format!("chaos_{}", testkit::short_id());
        let admin = PgPool::connect(&infra.postgres.url("postgres")).await?;
        sqlx::query(&format!(r#"CREATE DATABASE "{database}""#))
            .execute(&admin)
            .await?;
        admin.close().await;
        let database_url = infra.postgres.url(&database);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&database_url)
            .await?;
        platform::pg::migrate(&pool).await?;
        let namespace = testkit::unique_namespace();
        let prefix = testkit::unique_prefix();
        let common = vec![
            ("DATABASE_URL", database_url.clone()),
            ("DATABASE_MAX_CONNECTIONS", "16".to_owned()),
            ("REDIS_URL", infra.redis.urls()),
            ("REDIS_CLUSTER", "true".to_owned()),
            ("NATS_URL", infra.nats.urls()),
            ("NATS_NAMESPACE", namespace),
            ("NATS_STREAM_REPLICAS", "3".to_owned()),
            ("JWT_SECRET", SECRET.to_owned()),
            // CHAOS_RUST_LOG: the services' log filter (default info)
            (
                "RUST_LOG",
                std::env::var("CHAOS_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            ),
            ("LOG_FORMAT", "text".to_owned()),
            ("STARTUP_TIMEOUT_SECS", "30".to_owned()),
        ];
        let service = |name: &'static str, addr_var: &str, extra: Vec<(&str, String)>| -> anyhow::Result<Service> {
            let addr = free_addr()?;
            let mut env: Vec<(String, String)> = common.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
            env.push((addr_var.to_owned(), addr.to_string()));
            env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
            Ok(Service {
                name,
                addr,
                env,
                log: logs.join(format!("{label}-{name}.log")),
                child: None,
            })
        };
        let mut commands = service("command-api", "COMMAND_API_ADDR", vec![])?;
        let public = format!("http://{}", commands.addr);
        commands.env.extend([
            ("PAYMENT_PROVIDER".to_owned(), "simulated".to_owned()),
            ("PAYMENT_WEBHOOK_SECRET".to_owned(), WEBHOOK_SECRET.to_owned()),
            ("PAYMENT_PUBLIC_URL".to_owned(), public.clone()),
            ("PAYMENT_WEBHOOK_URL".to_owned(), format!("{public}/webhooks/payments")),
            ("PAYMENT_TIMEOUT_SECS".to_owned(), payment_timeout.as_secs().to_string()),
        ]);
        let edge = service(
            "seckill-edge",
            "SECKILL_EDGE_ADDR",
            vec![
                ("SECKILL_KEY_PREFIX", prefix.clone()),
                ("SECKILL_ADMIT_REPLICAS", "1".to_owned()),
                // a stable name: a restarted edge re-reads its own pending entries
                ("SECKILL_INSTANCE_ID", "edge-1".to_owned()),
                ("SECKILL_RATE_LIMIT_PER_SEC", "0".to_owned()),
            ],
        )?;
        let queries = service("query-api", "QUERY_API_ADDR", vec![])?;
        let projections = service("projection-daemon", "PROJECTIONS_ADDR", vec![])?;
        let mut stack = Self {
            pool,
            prefix,
            edge,
            commands,
            queries,
            projections,
            bins: bins.to_owned(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
            jwt: JwtKeys::new(&platform::Secret::new(SECRET)),
        };
        // the command API first: it creates the streams the others read
        stack.commands.spawn(&stack.bins)?;
        stack
            .commands
            .wait_healthy(&stack.http, Duration::from_secs(60))
            .await?;
        for service in [&mut stack.edge, &mut stack.queries, &mut stack.projections] {
            service.spawn(&stack.bins)?;
        }
        for service in [&mut stack.edge, &mut stack.queries, &mut stack.projections] {
            service.wait_healthy(&stack.http, Duration::from_secs(60)).await?;
        }
        Ok(stack)
    }

    fn token(&self, sub: &str, role: Role) -> anyhow::Result<String> {
        Ok(self.jwt.issue(sub, role, Duration::from_secs(3_600))?)
    }

    fn service(&mut self, fault: Fault) -> Option<&mut Service> {
        match fault {
            Fault::Edge => Some(&mut self.edge),
            Fault::CommandApi => Some(&mut self.commands),
            Fault::ProjectionDaemon => Some(&mut self.projections),
            Fault::QueryApi => Some(&mut self.queries),
            Fault::NatsNode | Fault::Postgres | Fault::RedisPrimary | Fault::PaymentTimeoutRace => None,
        }
    }

    async fn create_sale(&self, stock: u32) -> anyhow::Result<Uuid> {
        let now = Utc::now();
        let response = self
            .http
            .post(format!("http://{}/vouchers", self.commands.addr))
            .bearer_auth(self.token("shop-chaos", Role::Merchant)?)
            .json(&json!({
                "title": "Hotpot for two",
                "kind": "seckill",
                "price_cents": 990,
                "value_cents": 5_000,
                "min_spend_cents": 0,
                "stock": stock,
                "begins_at": now - chrono::Duration::minutes(1),
                "ends_at": now + chrono::Duration::hours(1),
            }))
            .send()
            .await?;
        anyhow::ensure!(response.status() == 201, "voucher not created: {}", response.status());
        let body: serde_json::Value = response.json().await?;
        Ok(body["voucher_id"].as_str().unwrap_or_default().parse()?)
    }

    /// Until the edge admits for the voucher (its warm-up came through);
    /// the probe's admission, a buyer like any other.
    async fn wait_warm(&self, voucher: Uuid) -> anyhow::Result<Option<(Uuid, String)>> {
        let url = format!("http://{}/seckill/{voucher}", self.edge.addr);
        let token = self.token("warm-up-probe", Role::Customer)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = self.http.post(&url).bearer_auth(&token).send().await;
            if let Ok(response) = response
                && (response.status() == 202 || response.status() == 409)
            {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let order = body["order_id"].as_str().and_then(|id| id.parse().ok());
                return Ok(order.map(|order| (order, "warm-up-probe".to_owned())));
            }
            anyhow::ensure!(Instant::now() < deadline, "the edge never warmed up for {voucher}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every order in the store: id → (deciding event, user). The e2e tests
/// read orders the same way.
pub async fn orders(pool: &PgPool) -> anyhow::Result<HashMap<Uuid, (String, String)>> {
    let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, payload FROM events WHERE aggregate_type = 'Order' AND sequence = 1",
    )
    .fetch_all(pool)
    .await?;
    let mut orders = HashMap::new();
    for (id, event_type, payload) in rows {
        let body = payload
            .as_object()
            .and_then(|o| o.values().next())
            .cloned()
            .unwrap_or_default();
        let user = body["user_id"].as_str().unwrap_or_default().to_owned();
        orders.insert(id.parse()?, (event_type, user));
    }
    Ok(orders)
}

/// Documents whose version differs from their aggregate's last sequence.
async fn views_behind(pool: &PgPool) -> anyhow::Result<i64> {
    let mut behind = 0;
    for projection in Projection::ALL {
        let count: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (SELECT aggregate_id, max(sequence) AS s FROM events WHERE aggregate_type = $1 GROUP BY 1) e
               LEFT JOIN {} v ON v.id = e.aggregate_id WHERE v.version IS DISTINCT FROM e.s",
            projection.table()
        ))
        .bind(projection.aggregate_type())
        .fetch_one(pool)
        .await?;
        behind += count;
    }
    Ok(behind)
}

/// The crowd's record: order ids answered 202, with their users and when.
type Admitted = Arc<Mutex<HashMap<Uuid, (String, Instant)>>>;

/// What the crowd needs of the stack (which the fault changes meanwhile).
#[derive(Clone)]
struct Client {
    edge: SocketAddr,
    http: reqwest::Client,
    jwt: JwtKeys,
}

/// Attempts for `config.duration`, `concurrency` in flight. A refused
/// connection (the edge is down) or a 503 counts as an attempt and moves on.
async fn crowd(client: Client, voucher: Uuid, config: SaleConfig, admitted: Admitted) -> anyhow::Result<usize> {
    // Users arrive at a steady pace over the first 80% of the sale (so it
    // is still selling when the fault strikes), each coming back
    // `attempts_per_user - 1` times, a tenth of the sale apart.
    let mut users: Vec<u32> = (0..config.users).collect();
    let mut seed: u64 = 0x5eed;
    for i in (1..users.len()).rev() {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = usize::try_from(seed >> 33).unwrap_or(0) % (i + 1);
        users.swap(i, j);
    }
    let span = config.duration.as_secs_f64();
    let mut attempts: Vec<(f64, String)> = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let first = span * 0.8 * i as f64 / f64::from(config.users.max(1));
        for again in 0..config.attempts_per_user {
            attempts.push((first + span * 0.1 * f64::from(again), format!("user-{user}")));
        }
    }
    attempts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = attempts.len();
    let url = format!("http://{}/seckill/{voucher}", client.edge);
    let limit = Arc::new(tokio::sync::Semaphore::new(config.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (at, user) in attempts {
        let due = started + Duration::from_secs_f64(at);
        tokio::time::sleep_until(due.into()).await;
        let permit = limit.clone().acquire_owned().await?;
        let (http, url, admitted) = (client.http.clone(), url.clone(), admitted.clone());
        let token = client.jwt.issue(&user, Role::Customer, Duration::from_secs(3_600))?;
        tasks.spawn(async move {
            let _permit = permit;
            let response = http
                .post(&url)
                .bearer_auth(token)
                .header("idempotency-key", Uuid::new_v4().to_string())
                .send()
                .await;
            if let Ok(response) = response
                && response.status() == 202
                && let Ok(body) = response.json::<serde_json::Value>().await
                && let Some(order) = body["order_id"].as_str().and_then(|id| id.parse().ok())
                && let Ok(mut admitted) = admitted.lock()
            {
                admitted.insert(order, (user, Instant::now()));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(total)
}

/// Kills (or stops) the part; returns what to start again.
async fn strike(fault: Fault, stack: &mut Stack, infra: &mut Infra, voucher: Uuid) -> anyhow::Result<Option<usize>> {
    if let Some(service) = stack.service(fault) {
        service.kill()?;
        return Ok(None);
    }
    match fault {
        Fault::NatsNode => {
            let js = async_nats::jetstream::new(infra.nats.connect().await?);
            let namespace = stack
                .edge
                .env
                .iter()
                .find(|(k, _)| k == "NATS_NAMESPACE")
                .map(|(_, v)| v.clone());
            let namespace = events::Namespace::new(namespace.unwrap_or_default())?;
            let info = js
                .get_stream(namespace.seckill_requests_stream())
                .await?
                .get_info()
                .await?;
            let leader = info.cluster.and_then(|c| c.leader).unwrap_or_default();
            let index = infra.nats.index_of(&leader).unwrap_or(0);
            infra.nats.kill(index)?;
            Ok(Some(index))
        }
        Fault::Postgres => {
            // the last half second of commits is certain to vanish, not
            // only what the WAL writer happened not to have written
            infra.postgres.stall_wal_writer().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            infra.postgres.stop_immediately()?;
            Ok(None)
        }
        Fault::RedisPrimary => {
            let keys = seckill_edge::keys::VoucherKeys::new(&stack.prefix, voucher);
            let port = infra.redis.primary_of(&keys.meta).await?;
            infra.redis.kill(port)?;
            Ok(Some(usize::from(port)))
        }
        Fault::Edge | Fault::CommandApi | Fault::ProjectionDaemon | Fault::QueryApi | Fault::PaymentTimeoutRace => {
            Ok(None)
        }
    }
}

async fn recover(fault: Fault, stack: &mut Stack, infra: &mut Infra, struck: Option<usize>) -> anyhow::Result<()> {
    let (bins, http) = (stack.bins.clone(), stack.http.clone());
    if let Some(service) = stack.service(fault) {
        service.spawn(&bins)?;
        return service.wait_healthy(&http, Duration::from_secs(60)).await;
    }
    match (fault, struck) {
        (Fault::NatsNode, Some(index)) => infra.nats.restart(index).await,
        (Fault::Postgres, _) => infra.postgres.start_again().await,
        (Fault::RedisPrimary, Some(port)) => {
            infra.redis.restart(u16::try_from(port)?).await?;
            infra.redis.wait_healthy(Duration::from_secs(30)).await
        }
        _ => Ok(()),
    }
}

/// The payment deadline of the race scenario.
const RACE_DEADLINE: Duration = Duration::from_secs(3);

/// Every buyer pays at about the same moment, and a checkout is three
/// requests to the command API (the provider calls its webhook): on debug
/// builds sharing two cores with the other tests one took over 5 s in CI.
/// Slow is not wrong here; the checks are on how each order ended.
const PAYMENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Every buyer pays (`POST /orders/{id}/pay`, then the simulated provider's
/// checkout, which calls the signed webhook) at a moment spread from 1 s
/// before to 1 s after its order's deadline, as measured from its 202.
async fn pay_around_deadlines(stack: &Stack, admitted: &HashMap<Uuid, (String, Instant)>) -> anyhow::Result<()> {
    let mut payments = tokio::task::JoinSet::new();
    let count = admitted.len().max(1);
    for (i, (order, (user, at))) in admitted.iter().enumerate() {
        let offset = -1.0 + 2.0 * i as f64 / count as f64;
        let due = *at + RACE_DEADLINE;
        let due = if offset < 0.0 {
            due.checked_sub(Duration::from_secs_f64(-offset)).unwrap_or(due)
        } else {
            due + Duration::from_secs_f64(offset)
        };
        let (http, commands) = (stack.http.clone(), stack.commands.addr);
        let token = stack.token(user, Role::Customer)?;
        let order = *order;
        payments.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            // an order already timed out refuses the payment (409): that is one outcome too
            let response = http
                .post(format!("http://{commands}/orders/{order}/pay"))
                .bearer_auth(&token)
                .timeout(PAYMENT_REQUEST_TIMEOUT)
                .send()
                .await?;
            if response.status() != 200 {
                return anyhow::Ok(());
            }
            let body: serde_json::Value = response.json().await?;
            let checkout = body["checkout_url"].as_str().unwrap_or_default().to_owned();
            http.post(checkout)
                .bearer_auth(&token)
                .timeout(PAYMENT_REQUEST_TIMEOUT)
                .send()
                .await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = payments.join_next().await {
        done??;
    }
    Ok(())
}

/// How each order of the race ended, from its events.
async fn race(pool: &PgPool) -> anyhow::Result<Race> {
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT aggregate_id, array_agg(event_type ORDER BY sequence) FROM events
          WHERE aggregate_type = 'Order' GROUP BY aggregate_id",
    )
    .fetch_all(pool)
    .await?;
    let mut race = Race {
        paid: 0,
        timed_out: 0,
        refunded: 0,
        violations: 0,
    };
    for (_, events) in rows {
        if events.first().map(String::as_str) != Some("OrderPlaced") {
            continue;
        }
        let count = |name: &str| events.iter().filter(|e| *e == name).count();
        let (paid, timed_out, refunded) = (count("OrderPaid"), count("OrderTimedOut"), count("OrderRefunded"));
        race.paid += paid.min(1);
        race.timed_out += timed_out.min(1);
        race.refunded += refunded.min(1);
        // exactly one outcome, and money that came too late went back once
        if paid + timed_out != 1 || refunded > 1 || (paid == 1 && refunded == 1) {
            race.violations += 1;
        }
    }
    Ok(race)
}

/// Sums a counter over the services' `/metrics` (every label set).
async fn counter(stack: &Stack, name: &str, chain: &str) -> u64 {
    let mut total = 0.0;
    for service in [&stack.commands, &stack.projections] {
        let Ok(response) = stack.http.get(format!("http://{}/metrics", service.addr)).send().await else {
            continue;
        };
        let Ok(text) = response.text().await else { continue };
        for line in text.lines() {
            if line.starts_with(name)
                && line.contains(&format!("chain=\"{chain}\""))
                && let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
            {
                total += value;
            }
        }
    }
    total as u64
}

/// Runs one scenario on `infra` (service logs under `logs`).
pub async fn run(
    fault: Fault,
    config: &SaleConfig,
    infra: &mut Infra,
    bins: &Path,
    logs: &Path,
) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(logs)?;
    let label = format!("{fault:?}").to_lowercase();
    let payment_timeout = if fault == Fault::PaymentTimeoutRace {
        RACE_DEADLINE
    } else {
        Duration::from_secs(900)
    };
    let mut stack = Stack::start(infra, bins, logs, &label, payment_timeout).await?;
    let voucher = stack.create_sale(config.stock).await?;

    let admitted: Admitted = Arc::default();
    if let (Some((order, user)), Ok(mut admitted)) = (stack.wait_warm(voucher).await?, admitted.lock()) {
        admitted.insert(order, (user, Instant::now()));
    }
    let client = Client {
        edge: stack.edge.addr,
        http: stack.http.clone(),
        jwt: stack.jwt.clone(),
    };
    let sale_started = Instant::now();
    let crowd = tokio::spawn(crowd(client, voucher, config.clone(), admitted.clone()));
    let (attempts, back_at) = if fault == Fault::PaymentTimeoutRace {
        let attempts = crowd.await??;
        let admitted = admitted.lock().map(|a| a.clone()).unwrap_or_default();
        pay_around_deadlines(&stack, &admitted).await?;
        (attempts, Instant::now())
    } else {
        // the fault strikes while the crowd goes on
        tokio::time::sleep_until((sale_started + config.fault_at).into()).await;
        let struck = strike(fault, &mut stack, infra, voucher).await?;
        tokio::time::sleep(config.down_for).await;
        recover(fault, &mut stack, infra, struck).await?;
        let back_at = Instant::now();
        (crowd.await??, back_at)
    };
    let ended_at = Instant::now().max(back_at);
    let wait_until = Instant::now() + Duration::from_secs(60);
    let admitted: HashMap<Uuid, String> = admitted
        .lock()
        .map(|a| a.iter().map(|(id, (user, _))| (*id, user.clone())).collect())
        .unwrap_or_default();
    let mut consistent_at = None;
    while Instant::now() < wait_until {
        let ok = async {
            let stored = orders(&stack.pool).await?;
            let all_decided = admitted.keys().all(|id| stored.contains_key(id));
            let settled = fault != Fault::PaymentTimeoutRace || race(&stack.pool).await?.violations == 0;
            anyhow::Ok(all_decided && settled && views_behind(&stack.pool).await? == 0)
        }
        .await
        .unwrap_or(false);
        if ok {
            consistent_at = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stored = orders(&stack.pool).await?;
    let placed: Vec<&String> = stored
        .values()
        .filter(|(event, _)| event == "OrderPlaced")
        .map(|(_, user)| user)
        .collect();
    let rejected = stored.len() - placed.len();
    let mut per_user: HashMap<&String, usize> = HashMap::new();
    for user in &placed {
        *per_user.entry(user).or_default() += 1;
    }
    let lost = admitted.keys().filter(|id| !stored.contains_key(id)).count();
    let voucher_doc: Option<serde_json::Value> = sqlx::query_scalar("SELECT doc FROM voucher_view WHERE id = $1")
        .bind(voucher.to_string())
        .fetch_optional(&stack.pool)
        .await?;
    let released: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Voucher' AND aggregate_id = $1 AND event_type = 'SeckillStockReleased'",
    )
    .bind(voucher.to_string())
    .fetch_one(&stack.pool)
    .await?;
    let race = if fault == Fault::PaymentTimeoutRace {
        Some(race(&stack.pool).await?)
    } else {
        None
    };
    let released = released.unsigned_abs();
    let voucher_view_consistent = voucher_doc.is_some_and(|doc| {
        let holding = (placed.len() as u64).saturating_sub(released);
        doc["accepted"].as_u64() == Some(placed.len() as u64)
            && doc["released"].as_u64() == Some(released)
            && doc["claimed"].as_u64() == Some(holding)
            && doc["remaining"].as_u64() == Some(u64::from(config.stock).saturating_sub(holding))
            // a unit comes back once per order that timed out, never more
            && race.is_none_or(|race| released == race.timed_out as u64)
    });
    let mut replay_equal = true;
    let mut replay_differences = Vec::new();
    for projection in Projection::ALL {
        let options = ReplayOptions {
            batch: 1_000,
            dry_run: true,
            document_cache: 10_000,
        };
        let report = projection.replay(&stack.pool, &options, &mut Silent).await?;
        let differences = report.differences.context("a dry run compares")?;
        let count = differences.changed + differences.missing_live + differences.missing_replay;
        if count > 0 {
            replay_differences.push(format!(
                "{}: {} changed, {} missing live, {} missing in the replay (e.g. {:?})",
                projection.name(),
                differences.changed,
                differences.missing_live,
                differences.missing_replay,
                differences.sample
            ));
        }
        replay_equal &= count == 0;
    }
    let repairs = (
        counter(&stack, "reconciler_repairs_total", "requests").await,
        counter(&stack, "reconciler_repairs_total", "views").await,
    );
    Ok(Outcome {
        fault,
        attempts,
        admitted: admitted.len(),
        placed: placed.len(),
        rejected,
        lost,
        // units held: a timed-out order gave its unit back to the sale
        oversold: (placed.len() as u64).saturating_sub(released) > u64::from(config.stock),
        users_twice: per_user.values().filter(|n| **n > 1).count(),
        voucher_view_consistent,
        replay_equal,
        replay_differences,
        consistent_after: consistent_at.map(|at| at.saturating_duration_since(back_at)),
        consistent_after_end: consistent_at.map(|at| at.saturating_duration_since(ended_at)),
        repairs,
        race,
    })
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// The results as the markdown table of docs/RELIABILITY.md.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| fault | attempts | 202 | placed | rejected | lost | oversell | user twice | voucher view | replay equal | consistent after back (after the sale's end) | repairs (requests / views) | payments: paid / timed out / refunded / wrong | result |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---|---|---:|---:|---:|---|\n",
    );
    for o in outcomes {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} / {} | {} | {} |\n",
            o.fault.describe(),
            o.attempts,
            o.admitted,
            o.placed,
            o.rejected,
            o.lost,
            if o.oversold { "**yes**" } else { "no" },
            o.users_twice,
            if o.voucher_view_consistent {
                "consistent"
            } else {
                "**differs**"
            },
            if o.replay_equal { "yes" } else { "**no**" },
            o.consistent_after
                .map_or_else(|| "**not within 60 s**".to_owned(), seconds),
            o.consistent_after_end.map_or_else(|| "–".to_owned(), seconds),
            o.repairs.0,
            o.repairs.1,
            o.race.map_or_else(
                || "–".to_owned(),
                |r| format!("{} / {} / {} / {}", r.paid, r.timed_out, r.refunded, r.violations)
            ),
            if o.met(GOAL) {
                "pass"
            } else if o.passed() {
                "**slow**"
            } else {
                "**FAIL**"
            },
        ));
    }
    out
}

/// Replaces what lies between `<!-- chaos:begin -->` and `<!-- chaos:end -->`
/// in `document` with `content`.
pub fn splice(document: &str, content: &str) -> anyhow::Result<String> {
    const BEGIN: &str = "<!-- chaos:begin -->";
    const END: &str = "<!-- chaos:end -->";
    let start = document.find(BEGIN).context("no <!-- chaos:begin --> marker")? + BEGIN.len();
    let end = document.find(END).context("no <!-- chaos:end --> marker")?;
    anyhow::ensure!(start <= end, "the chaos markers are out of order");
    Ok(format!("{}\n{}{}", &document[..start], content, &document[end..]))
}
