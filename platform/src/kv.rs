//! Redis: one server or a Redis Cluster, behind one connection type.
//!
//! [`Kv`] is what services hold: a multiplexed, auto-reconnecting
//! connection to a single server (`ConnectionManager`), or the cluster-aware
//! connection of the `redis` crate, which routes each command by its key's
//! slot and follows the cluster through failovers and resharding. Both are
//! cheap to clone and implement `redis::aio::ConnectionLike`, so scripts,
//! commands and single-slot pipelines run unchanged on either. Code that
//! needs a connection of its own (blocking stream reads) opens one with
//! [`KvClient::connect`].
//!
//! A cluster connection that has answered nothing but connection errors
//! and timeouts for [`REBUILD_AFTER`] is replaced by a new one
//! ([`ClusterKv`]): after a primary died and stayed down, the `redis`
//! crate's connection sometimes stayed stuck in its slot refresh for more
//! than ten seconds, while a new connection found the promoted replica
//! within two (docs/SECKILL_EDGE.md, "A primary that dies").

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};

use crate::{config::RedisConfig, startup::wait_for};

/// How long to wait for a connection, and for each answer, by default.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect attempts after the first, on a single server.
const RECONNECT_RETRIES: usize = 1;

/// How long a cluster connection may fail every request before it is
/// replaced: longer than a failover takes (the node timeout and an
/// election, about 2 s on our clusters).
pub const REBUILD_AFTER: Duration = Duration::from_secs(3);

/// Where connections come from: a server or a cluster.
#[derive(Clone)]
pub enum KvClient {
    Single(redis::Client),
    // boxed: the cluster client is twice the single one's size
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for KvClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // no URLs: they may carry a password
        f.write_str(match self {
            Self::Single(_) => "KvClient::Single",
            Self::Cluster(_) => "KvClient::Cluster",
        })
    }
}

impl KvClient {
    /// From the configuration: `REDIS_CLUSTER` picks the client, `REDIS_URL`
    /// holds the server or the cluster's seed nodes (comma-separated).
    pub fn open(config: &RedisConfig) -> RedisResult<Self> {
        Self::from_urls(config.redis_url.expose(), config.redis_cluster)
    }

    pub fn from_urls(urls: &str, cluster: bool) -> RedisResult<Self> {
        if cluster {
            let nodes: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
            let client = ClusterClient::builder(nodes)
                .connection_timeout(CONNECTION_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()?;
            Ok(Self::Cluster(Box::new(client)))
        } else {
            Ok(Self::Single(redis::Client::open(urls.trim())?))
        }
    }

    /// A new connection of its own, answering within `response_timeout`
    /// (`None`: wait as long as it takes, for blocking reads).
    pub async fn connect_with(&self, response_timeout: Option<Duration>) -> RedisResult<Kv> {
        match self {
            Self::Single(client) => {
                // One quick retry, then the request fails: every request
                // waits for a reconnect in progress, and the crate's default
                // (6 retries, exponential) held them for 9.5 s while Redis
                // was down. The next request tries to reconnect again.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(response_timeout)
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_max_delay(Duration::from_millis(200));
                Ok(Kv::Single(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Self::Cluster(client) => {
                let mut config = ClusterConfig::new().set_connection_timeout(CONNECTION_TIMEOUT);
                if let Some(timeout) = response_timeout {
                    config = config.set_response_timeout(timeout);
                }
                let connection = client.get_async_connection_with_config(config.clone()).await?;
                Ok(Kv::Cluster(ClusterKv::new((**client).clone(), config, connection)))
            }
        }
    }

    /// A new connection with the default answer timeout.
    pub async fn connect(&self) -> RedisResult<Kv> {
        self.connect_with(Some(RESPONSE_TIMEOUT)).await
    }
}

/// A connection to a Redis server or cluster; clones share it.
#[derive(Clone)]
pub enum Kv {
    Single(ConnectionManager),
    Cluster(ClusterKv),
}

/// The cluster-aware connection, replaced by a new one when it has failed
/// every request for [`REBUILD_AFTER`]. Clones share it, and its
/// replacement.
#[derive(Clone)]
pub struct ClusterKv(Arc<ClusterShared>);

struct ClusterShared {
    client: ClusterClient,
    config: ClusterConfig,
    connection: RwLock<ClusterConnection>,
    /// Start of the current run of failed requests, in ms after `epoch`
    /// plus one; 0: the last request succeeded.
    failing_since: AtomicU64,
    rebuilding: AtomicBool,
    epoch: Instant,
}

impl ClusterKv {
    fn new(client: ClusterClient, config: ClusterConfig, connection: ClusterConnection) -> Self {
        Self(Arc::new(ClusterShared {
            client,
            config,
            connection: RwLock::new(connection),
            failing_since: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
            epoch: Instant::now(),
        }))
    }

    /// The connection in use now.
    fn current(&self) -> ClusterConnection {
        self.0
            .connection
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Notes how a request went; starts a rebuild once requests have failed
    /// for [`REBUILD_AFTER`] without one success.
    fn record<T>(&self, result: &RedisResult<T>) {
        let shared = &*self.0;
        match result {
            Ok(_) => {
                if shared.failing_since.load(Ordering::Relaxed) != 0 {
                    shared.failing_since.store(0, Ordering::Relaxed);
                }
            }
            Err(error) if connection_trouble(error) => {
                let now = u64::try_from(shared.epoch.elapsed().as_millis())
                    .unwrap_or(u64::MAX)
                    .saturating_add(1);
                let since = match shared
                    .failing_since
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => now,
                    Err(since) => since,
                };
                let failing = Duration::from_millis(now.saturating_sub(since));
                if failing >= REBUILD_AFTER && !shared.rebuilding.swap(true, Ordering::AcqRel) {
                    tokio::spawn(self.clone().rebuild(failing));
                }
            }
            // Redis answered (a script error, a wrong type): the connection works
            Err(_) => {}
        }
    }

    async fn rebuild(self, failing: Duration) {
        let shared = &*self.0;
        match shared
            .client
            .get_async_connection_with_config(shared.config.clone())
            .await
        {
            Ok(fresh) => {
                *shared
                    .connection
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
                shared.failing_since.store(0, Ordering::Relaxed);
                metrics::counter!("redis_cluster_connection_rebuilds_total").increment(1);
                tracing::warn!(
                    failing_ms = failing.as_millis() as u64,
                    "Redis Cluster connection replaced after failing every request"
                );
            }
            // the next failed request tries again
            Err(error) => tracing::warn!(%error, "could not open a new Redis Cluster connection"),
        }
        shared.rebuilding.store(false, Ordering::Release);
    }
}

/// Errors that say the connection, not the command, is in trouble.
fn connection_trouble(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_cluster_error()
        || matches!(error.kind(), ErrorKind::ClusterConnectionNotFound)
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Kv::Single",
            Self::Cluster(_) => "Kv::Cluster",
        })
    }
}

impl Kv {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// `WAIT replicas timeout` on the server that owns `key` (on a cluster,
    /// the primary of its slot: the cluster client would otherwise ask every
    /// primary). Answers how many replicas acknowledged every write this
    /// connection made before it, so after a write it says whether the write
    /// survives the loss of its primary. A replica that has it is one a
    /// failover can promote.
    pub async fn wait_replicas(&self, key: &str, replicas: u16, timeout: Duration) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Self::Single(connection) => wait.query_async(&mut connection.clone()).await,
            Self::Cluster(cluster) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let answer = cluster
                    .current()
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await;
                cluster.record(&answer);
                Ok(redis::from_redis_value(answer?)?)
            }
        }
    }
}

impl ConnectionLike for Kv {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(cluster) => {
                let (mut connection, cluster) = (cluster.current(), cluster.clone());
                Box::pin(async move {
                    let answer = connection.req_packed_command(cmd).await;
                    cluster.record(&answer);
                    answer
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(cluster) => {
                let (mut connection, cluster) = (cluster.current(), cluster.clone());
                Box::pin(async move {
                    let answers = connection.req_packed_commands(pipeline, offset, count).await;
                    cluster.record(&answers);
                    answers
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(cluster) => cluster.current().get_db(),
        }
    }
}

/// The process's shared connection, waiting for Redis at start-up.
pub async fn connect(config: &RedisConfig, timeout: Duration) -> anyhow::Result<Kv> {
    let client = KvClient::open(config)?;
    let kv = wait_for("redis", timeout, || client.connect()).await?;
    Ok(kv)
}

/// Whether Redis answers [`ping`]: a consumer's probe (`cp_nats::probe`).
pub async fn answers(connection: Kv) -> bool {
    ping(&connection).await.is_ok()
}

/// A health probe: PING within a second (on a cluster, every primary).
pub async fn ping(connection: &Kv) -> Result<(), String> {
    let mut connection = connection.clone();
    let ping = redis::cmd("PING");
    let probe = ping.query_async::<String>(&mut connection);
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}
