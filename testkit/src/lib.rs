//! Test helpers for integration tests against the real servers.
//!
//! Each test gets its own isolation unit: a fresh Postgres database with the
//! migrations applied ([`TestDb`]), a private NATS namespace for stream and
//! subject names ([`unique_namespace`]), and a Redis key prefix
//! ([`unique_prefix`]). The servers are the ones `./dev test` starts; their
//! addresses come from `TEST_DATABASE_URL`, `TEST_NATS_URL` and
//! `TEST_REDIS_URL`, defaulting to its ports.

pub mod bench;
mod nats_cluster;
pub mod postgres_server;

pub use nats_cluster::{NatsCluster, nats_server_bin};
pub use postgres_server::PostgresServer;

use std::{future::Future, time::Duration};

use anyhow::Context as _;
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:55433/postgres";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:54223";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:56380/";
/// The first of the test cluster's six nodes (47001–47006; cluster bus +10000).
pub const DEFAULT_REDIS_CLUSTER_URL: &str =
    "redis://127.0.0.1:47001/,redis://127.0.0.1:47002/,redis://127.0.0.1:47003/";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn admin_url() -> String {
    env_or("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
}

/// The test NATS: one server's URL, or with `CP_TEST_NATS=cluster` the test
/// infra's JetStream cluster (three URLs, comma-separated).
pub fn nats_url() -> String {
    env_or("TEST_NATS_URL", DEFAULT_NATS_URL)
}

/// Replicas for the streams tests create (`TEST_NATS_STREAM_REPLICAS`): 1,
/// or 3 when the tests run on the test infra's NATS cluster.
pub fn nats_stream_replicas() -> usize {
    std::env::var("TEST_NATS_STREAM_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

pub fn redis_url() -> String {
    env_or("TEST_REDIS_URL", DEFAULT_REDIS_URL)
}

/// The test Redis Cluster's seed nodes (comma-separated), as `./dev
/// test-infra up` starts it: three primaries with a replica each.
pub fn redis_cluster_urls() -> String {
    env_or("TEST_REDIS_CLUSTER_URL", DEFAULT_REDIS_CLUSTER_URL)
}

/// A client of the shared test Redis.
pub fn kv_client() -> platform::kv::KvClient {
    platform::kv::KvClient::from_urls(&redis_url(), false).expect("TEST_REDIS_URL is a Redis URL")
}

/// A client of the test Redis Cluster.
pub fn kv_cluster_client() -> platform::kv::KvClient {
    platform::kv::KvClient::from_urls(&redis_cluster_urls(), true).expect("TEST_REDIS_CLUSTER_URL lists Redis URLs")
}

/// A short random lowercase id, usable in database names, NATS names and keys.
pub fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A NATS namespace of this test's own (`t` + random), so streams never collide.
pub fn unique_namespace() -> String {
    format!("t{}", short_id())
}

/// A Redis key prefix of this test's own.
pub fn unique_prefix() -> String {
    format!("t{}:", short_id())
}

/// A freshly created database with every migration applied. `./dev test`
/// drops leftover `t_*` databases before each run.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> anyhow::Result<Self> {
        let db = Self::empty().await?;
        platform::pg::migrate(&db.pool).await.context("migrations")?;
        Ok(db)
    }

    /// A fresh database without migrations (to test the migrations themselves).
    pub async fn empty() -> anyhow::Result<Self> {
        let admin_url = admin_url();
        let name = format!("t_{}", short_id());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .with_context(|| "connecting to the test Postgres (is `./dev test-infra up` running?)".to_owned())?;
        admin.execute(format!(r#"CREATE DATABASE "{name}""#).as_str()).await?;
        admin.close().await?;
        let url = replace_database(&admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await?;
        Ok(Self { name, url, pool })
    }
}

fn replace_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, _) = url.rsplit_once('/').context("database URL without a path")?;
    Ok(format!("{base}/{database}"))
}

pub async fn nats() -> anyhow::Result<async_nats::Client> {
    let url = nats_url();
    let addrs = platform::bus::server_addrs(&url).map_err(|e| anyhow::anyhow!(e))?;
    async_nats::connect(addrs)
        .await
        .with_context(|| format!("connecting to the test NATS at {url}"))
}

pub async fn redis() -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(redis_url())?;
    Ok(redis::aio::ConnectionManager::new(client).await?)
}

/// A service started in-process on an ephemeral port, stopped on drop or by
/// [`Server::stop`], which also waits for its graceful shutdown.
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)`, then waits for `/health`.
    pub async fn start<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, futures_shutdown::Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, run).await
    }

    /// Like [`Server::start`] on a listener bound beforehand, for a service
    /// whose config must name its own address.
    pub async fn start_on<F, Fut>(listener: tokio::net::TcpListener, run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(tokio::net::TcpListener, futures_shutdown::Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(listener, futures_shutdown::Shutdown(stopped)));
        let server = Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = client.get(self.url("/health")).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} never became healthy",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signals shutdown and waits (bounded) for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().context("already stopped")?;
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .context("graceful shutdown took over 10 s")??
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub mod futures_shutdown {
    //! The shutdown future handed to a service's `run`.

    use std::{
        future::Future,
        pin::Pin,
        task::{Context, Poll},
    };

    #[derive(Debug)]
    pub struct Shutdown(pub(crate) tokio::sync::oneshot::Receiver<()>);

    impl Future for Shutdown {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            // a dropped sender also means stop
            Pin::new(&mut self.0).poll(cx).map(|_| ())
        }
    }
}

pub use reqwest;

/// Checks what every service promises: `/health` is 200 and names `checks`,
/// `/metrics` is Prometheus text counting the requests just made, and the
/// server stops gracefully when asked.
pub async fn assert_service_lifecycle(server: Server, checks: &[&str]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let health = client.get(server.url("/health")).send().await?;
    anyhow::ensure!(health.status() == 200, "/health answered {}", health.status());
    let body: serde_json::Value = health.json().await?;
    for check in checks {
        let ok = body["checks"].as_array().is_some_and(|all| {
            all.iter()
                .any(|c| c["name"] == *check && c["ok"] == serde_json::Value::Bool(true))
        });
        anyhow::ensure!(ok, "/health does not report {check} ok: {body}");
    }
    let metrics = client.get(server.url("/metrics")).send().await?;
    anyhow::ensure!(metrics.status() == 200, "/metrics answered {}", metrics.status());
    let text = metrics.text().await?;
    anyhow::ensure!(
        text.contains("http_requests_total"),
        "no request counter in /metrics:\n{text}"
    );
    server.stop().await
}

/// A pool whose every connection attempt is refused: a database that is down.
pub fn unreachable_pool() -> PgPool {
    PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap_or_else(|e| panic!("lazy pool: {e}"))
}

/// A NATS client that never connected: a broker that is down.
pub async fn unreachable_nats() -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect("nats://127.0.0.1:1")
        .await
        .unwrap_or_else(|e| panic!("nats client: {e}"))
}

/// Sends `request` to `router` in-process: status, headers and JSON body
/// (`Null` when the body is not JSON).
pub async fn respond(
    router: axum::Router,
    request: http::Request<axum::body::Body>,
) -> (http::StatusCode, http::HeaderMap, serde_json::Value) {
    use tower::ServiceExt as _;
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

/// GET `path` on `router` in-process and return the status.
pub async fn status_of(router: axum::Router, path: &str) -> u16 {
    use tower::ServiceExt as _;
    let request = http::Request::get(path)
        .body(axum::body::Body::empty())
        .unwrap_or_default();
    match router.oneshot(request).await {
        Ok(response) => response.status().as_u16(),
        Err(never) => match never {},
    }
}

impl TestDb {
    /// Drops the database (benchmarks clean up after themselves; tests leave
    /// theirs for `./dev test` to drop, so a failure can be inspected).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&admin_url()).await?;
        admin
            .execute(format!(r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#, self.name).as_str())
            .await?;
        Ok(())
    }
}

/// Logs of the code under test, shown for failing tests (`RUST_LOG` filters, default `warn`).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A Redis server of this test's own (`redis-server` from `PATH`, no
/// persistence, data in a temp dir, a free port on 127.0.0.1), for tests that
/// flush or restart Redis without touching the other tests' shared one.
/// Stopped by its PID on drop.
#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("cp-redis-{}", short_id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self { port, child: None, dir };
        server.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn connect(&self) -> anyhow::Result<redis::aio::ConnectionManager> {
        let client = redis::Client::open(self.url())?;
        Ok(redis::aio::ConnectionManager::new(client).await?)
    }

    /// Kills the server and starts it again on the same port: without
    /// persistence, every key is gone, as after a crash of a cache node.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Kills the server (SIGKILL) and leaves it down: Redis is away.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server again on the same port, empty.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "redis-server on {} is running", self.port);
        self.spawn()?;
        self.wait_ready().await
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting redis-server (install the Debian package redis-server)")?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_ping(self.port).await
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Redis Cluster of this test's own: three primaries with a replica each
/// (`redis-server` and `redis-cli --cluster create` from `PATH`, no
/// persistence, `cluster-node-timeout` 1 s, free ports on 127.0.0.1), for
/// tests that kill a node. Every node is stopped by its PID on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: std::path::PathBuf,
}

#[derive(Debug)]
struct ClusterNode {
    port: u16,
    bus: u16,
    child: Option<std::process::Child>,
}

impl RedisCluster {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("cp-rcluster-{}", short_id()));
        let mut nodes = Vec::new();
        // hold every listener until all ports are chosen, so none repeats
        let listeners = (0..12)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        drop(listeners);
        for pair in ports.chunks(2) {
            nodes.push(ClusterNode {
                port: pair[0],
                bus: pair[1],
                child: None,
            });
        }
        let mut cluster = Self { nodes, dir };
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index)?;
        }
        for node in &cluster.nodes {
            wait_ping(node.port).await?;
        }
        let status = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("redis-cli --cluster create (install the Debian package redis-tools)")?;
        anyhow::ensure!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_healthy(Duration::from_secs(20)).await?;
        cluster.wait_replicas_synced(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// The seed URLs, comma-separated, for `REDIS_URL` with `REDIS_CLUSTER=true`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary that owns `key`'s slot, as the first live
    /// node that answers sees it.
    pub async fn primary_of(&self, key: &str) -> anyhow::Result<u16> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(mut connection) = connect_node(node.port).await else {
                continue;
            };
            if let Ok(port) = primary_port(&mut connection, key).await {
                return Ok(port);
            }
        }
        anyhow::bail!("no node knows who owns {key}")
    }

    /// `CLUSTER NODES` as the first live node sees it (for failure messages).
    pub async fn nodes_view(&self) -> String {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Ok(mut connection) = connect_node(node.port).await
                && let Ok(view) = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut connection)
                    .await
            {
                return view;
            }
        }
        "no live node answers".to_owned()
    }

    /// The port of a replica of the primary on `primary`.
    pub async fn replica_of(&self, primary: u16) -> anyhow::Result<u16> {
        let view = self.nodes_view().await;
        let id = view
            .lines()
            .find(|line| {
                line.split(' ')
                    .nth(1)
                    .is_some_and(|a| a.starts_with(&format!("127.0.0.1:{primary}@")))
            })
            .and_then(|line| line.split(' ').next())
            .ok_or_else(|| anyhow::anyhow!("node {primary} unknown"))?;
        view.lines()
            .find(|line| line.split(' ').nth(3) == Some(id))
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|address| address.split(['@', ':']).nth(1))
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no replica of {primary}"))
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the node on `port`: a
    /// frozen replica falls behind its primary, as a slow one would.
    pub fn freeze(&self, port: u16, frozen: bool) -> anyhow::Result<()> {
        let pid = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.child.as_ref())
            .map(std::process::Child::id)
            .ok_or_else(|| anyhow::anyhow!("no running node on port {port}"))?;
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// Kills the node on `port` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, port: u16) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {port}"))?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the node on `port` again (after [`Self::kill`]), empty: it
    /// rejoins the cluster from its `nodes.conf`, as a replica of whoever
    /// took its slots over.
    pub async fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {port}"))?;
        anyhow::ensure!(self.nodes[index].child.is_none(), "node {port} is running");
        self.spawn(index)?;
        wait_ping(port).await
    }

    /// Until every live node sees the cluster as whole (`cluster_state:ok`).
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut healthy = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info: String = match connect_node(node.port).await {
                    Ok(mut connection) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut connection)
                        .await
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                healthy &= info.contains("cluster_state:ok");
            }
            if healthy {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the redis cluster is not healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Until every replica has its primary's data: a replica that never
    /// synced refuses to take over (its data counts as too old).
    async fn wait_replicas_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (mut replicas, mut synced) = (0, 0);
            for node in &self.nodes {
                let mut connection = connect_node(node.port).await?;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut connection)
                    .await?;
                if info.contains("role:slave") {
                    replicas += 1;
                    synced += usize::from(info.contains("master_link_status:up"));
                }
            }
            if replicas == 3 && synced == 3 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{synced} of {replicas} replicas synced with their primary"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let dir = self.dir.join(node.port.to_string());
        std::fs::create_dir_all(&dir)?;
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &node.port.to_string()])
            .args(["--cluster-enabled", "yes", "--cluster-port", &node.bus.to_string()])
            .args(["--cluster-node-timeout", "1000", "--cluster-config-file", "nodes.conf"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--maxmemory",
                "64mb",
            ])
            // a replica syncs at once (the default waits 5 s for company)
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting redis-server (install the Debian package redis-server)")?;
        node.child = Some(child);
        Ok(())
    }
}

/// The port of the Redis Cluster primary that owns `key`'s slot, from
/// `CLUSTER KEYSLOT` and `CLUSTER SLOTS` on `connection`.
pub async fn primary_port(connection: &mut impl redis::aio::ConnectionLike, key: &str) -> anyhow::Result<u16> {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(connection)
        .await?;
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(connection).await?;
    for range in slots {
        let redis::Value::Array(parts) = range else { continue };
        if let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to)), Some(redis::Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
            && (*from..=*to).contains(&slot)
            && let Some(redis::Value::Int(port)) = primary.get(1)
        {
            return Ok(u16::try_from(*port)?);
        }
    }
    anyhow::bail!("no primary owns slot {slot} of {key}")
}

async fn connect_node(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
}

async fn wait_ping(port: u16) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut connection) = connect_node(port).await
            && redis::cmd("PING").query_async::<String>(&mut connection).await.is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "redis-server on port {port} never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 20 ms until it is true; fails after `within`.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
