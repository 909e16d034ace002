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

use std::time::Duration;

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use crate::{config::RedisConfig, startup::wait_for};

/// How long to wait for a connection, and for each answer, by default.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub fn open(config: &RedisConfig) -> redis::RedisResult<Self> {
        Self::from_urls(config.redis_url.expose(), config.redis_cluster)
    }

    pub fn from_urls(urls: &str, cluster: bool) -> redis::RedisResult<Self> {
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
    pub async fn connect_with(&self, response_timeout: Option<Duration>) -> redis::RedisResult<Kv> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(response_timeout);
                Ok(Kv::Single(
                    ConnectionManager::new_with_config(client.clone(), config).await?,
                ))
            }
            Self::Cluster(client) => {
                let mut config = redis::cluster::ClusterConfig::new().set_connection_timeout(CONNECTION_TIMEOUT);
                if let Some(timeout) = response_timeout {
                    config = config.set_response_timeout(timeout);
                }
                Ok(Kv::Cluster(client.get_async_connection_with_config(config).await?))
            }
        }
    }

    /// A new connection with the default answer timeout.
    pub async fn connect(&self) -> redis::RedisResult<Kv> {
        self.connect_with(Some(RESPONSE_TIMEOUT)).await
    }
}

/// A connection to a Redis server or cluster; clones share it.
#[derive(Clone)]
pub enum Kv {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
    pub async fn wait_replicas(&self, key: &str, replicas: u16, timeout: Duration) -> redis::RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas)
            .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        match self {
            Self::Single(connection) => wait.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
                let route = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                let answer = connection
                    .clone()
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(answer)?)
            }
        }
    }
}

impl ConnectionLike for Kv {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
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
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The process's shared connection, waiting for Redis at start-up.
pub async fn connect(config: &RedisConfig, timeout: Duration) -> anyhow::Result<Kv> {
    let client = KvClient::open(config)?;
    let kv = wait_for("redis", timeout, || client.connect()).await?;
    Ok(kv)
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
