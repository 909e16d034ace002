//! A per-product limit on orders in flight, in Redis, in front of hot
//! products: `POST /orders` takes one unit of each product's semaphore (an
//! INCR with a TTL fuse) and answers 503 `product_busy` at once when a product
//! already has `limit` orders waiting for their stock reservation, instead of
//! piling retries onto one Product aggregate. The reservation saga gives the
//! units back (DECR) once it has tried the product. A process that dies
//! holding units leaks them only until the fuse expires the key.
//!
//! Redis is a fast gate here, not a dependency: while it is unreachable the
//! gate lets every order through (and says so in the log and a counter).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use platform::kv::{Kv, KvClient};
use redis::Script;
use uuid::Uuid;

const ACQUIRE: &str = "local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end
return 1";

const RELEASE: &str = "local n = redis.call('DECR', KEYS[1])
if n <= 0 then redis.call('DEL', KEYS[1]) end
return n";

#[derive(Clone)]
pub struct ProductSemaphore {
    redis: Arc<OnceLock<Kv>>,
    prefix: String,
    limit: u32,
    fuse: Duration,
    acquire: Arc<Script>,
    release: Arc<Script>,
}

impl std::fmt::Debug for ProductSemaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProductSemaphore")
            .field("limit", &self.limit)
            .field("fuse", &self.fuse)
            .field("connected", &self.redis.get().is_some())
            .finish()
    }
}

/// A product that has `limit` orders in flight already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("product {0} is busy")]
pub struct Busy(pub Uuid);

impl ProductSemaphore {
    /// Connects in the background; until then every order passes.
    pub fn connect(client: KvClient, prefix: impl Into<String>, limit: u32, fuse: Duration) -> Self {
        let semaphore = Self::unconnected(prefix, limit, fuse);
        let slot = semaphore.redis.clone();
        tokio::spawn(async move {
            loop {
                match client.connect().await {
                    Ok(connection) => {
                        let _ = slot.set(connection);
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "hot-product gate: redis unreachable, letting orders through");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
        semaphore
    }

    /// A gate over an existing connection (tests).
    pub fn with_connection(connection: Kv, prefix: impl Into<String>, limit: u32, fuse: Duration) -> Self {
        let semaphore = Self::unconnected(prefix, limit, fuse);
        let _ = semaphore.redis.set(connection);
        semaphore
    }

    fn unconnected(prefix: impl Into<String>, limit: u32, fuse: Duration) -> Self {
        Self {
            redis: Arc::new(OnceLock::new()),
            prefix: prefix.into(),
            limit,
            fuse,
            acquire: Arc::new(Script::new(ACQUIRE)),
            release: Arc::new(Script::new(RELEASE)),
        }
    }

    fn key(&self, product: Uuid) -> String {
        format!("{}hot:product:{product}", self.prefix)
    }

    /// Takes one unit of each product (all or none), in one round trip: a
    /// pipeline of the script per product on one server; on a cluster, where
    /// each key may live on its own node and a pipeline may not span slots,
    /// the scripts run side by side instead.
    pub async fn acquire(&self, products: &[Uuid]) -> Result<(), Busy> {
        let Some(connection) = self.redis.get() else {
            return Ok(());
        };
        let mut products = products.to_vec();
        products.sort_unstable();
        products.dedup();
        let fuse = u64::try_from(self.fuse.as_millis()).unwrap_or(u64::MAX);
        let outcome: Result<Vec<i64>, redis::RedisError> = if connection.is_cluster() {
            futures::future::try_join_all(products.iter().map(|product| {
                let mut connection = connection.clone();
                async move {
                    self.acquire
                        .key(self.key(*product))
                        .arg(self.limit)
                        .arg(fuse)
                        .invoke_async(&mut connection)
                        .await
                }
            }))
            .await
        } else {
            let mut pipe = redis::pipe();
            pipe.load_script(&self.acquire).ignore();
            for product in &products {
                pipe.invoke_script(self.acquire.key(self.key(*product)).arg(self.limit).arg(fuse));
            }
            pipe.query_async(&mut connection.clone()).await
        };
        match outcome {
            Ok(granted) => {
                let taken: Vec<Uuid> = products
                    .iter()
                    .zip(&granted)
                    .filter(|(_, granted)| **granted == 1)
                    .map(|(product, _)| *product)
                    .collect();
                let busy = products.iter().zip(&granted).find(|(_, granted)| **granted != 1);
                match busy {
                    None => Ok(()),
                    Some((product, _)) => {
                        self.release(&taken).await;
                        metrics::counter!("hot_product_rejections_total").increment(1);
                        Err(Busy(*product))
                    }
                }
            }
            Err(error) => {
                // which units were taken is unknown: the fuse gives them back
                metrics::counter!("hot_product_gate_errors_total").increment(1);
                tracing::warn!(%error, "hot-product gate unavailable; letting the order through");
                Ok(())
            }
        }
    }

    /// Gives back one unit per listed product (a product listed twice gives
    /// back two: a batch of orders releases together), in one round trip.
    pub async fn release(&self, products: &[Uuid]) {
        let Some(connection) = self.redis.get() else { return };
        if products.is_empty() {
            return;
        }
        let released: Result<(), redis::RedisError> = if connection.is_cluster() {
            futures::future::try_join_all(products.iter().map(|product| {
                let mut connection = connection.clone();
                async move {
                    self.release
                        .key(self.key(*product))
                        .invoke_async::<i64>(&mut connection)
                        .await
                }
            }))
            .await
            .map(drop)
        } else {
            let mut pipe = redis::pipe();
            pipe.load_script(&self.release).ignore();
            for product in products {
                pipe.invoke_script(&self.release.key(self.key(*product))).ignore();
            }
            pipe.query_async(&mut connection.clone()).await
        };
        if let Err(error) = released {
            tracing::warn!(%error, products = products.len(), "hot-product gate: release failed; the fuse will clear it");
        }
    }
}
