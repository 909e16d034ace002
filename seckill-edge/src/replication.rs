//! Group `WAIT`: one replication wait for every admission of a voucher that
//! was written before it.
//!
//! Redis runs one connection's commands in order, and `WAIT` blocks the
//! connection it arrives on until the replicas acknowledge or the timeout
//! passes. The edge multiplexes every attempt over one connection per
//! Redis node, so one `WAIT` per admission made every other attempt on that
//! node queue behind each replication round trip (docs/BENCHMARKS.md,
//! "Failover"). `WAIT` counts the replicas holding every write the
//! connection made before it, so one `WAIT` answers for all admissions
//! whose script had returned when it was sent: admissions register here
//! after their script answered, a task per voucher sends one `WAIT` for all
//! those registered, and those that register meanwhile wait for the next.
//!
//! A `WAIT` counts the writes of the connection it arrives on. If the
//! connection is re-made between an admission's script and its `WAIT` (its
//! primary died, a replica was promoted), the `WAIT` reaches a connection
//! that wrote nothing and answers at once: had the promoted node a replica
//! of its own by then, an admission the dead primary never replicated
//! would be confirmed. A promotion takes at least the cluster's
//! `cluster-node-timeout`, so an answer that comes more than
//! [`LATE_FACTOR`] × the wait's timeout after the script is not counted:
//! keep that well below `cluster-node-timeout` (200 ms × 3 against 1 s
//! locally; Redis's default is 15 s). Nor is one later than
//! `platform::kv::REBUILD_AFTER`: the edge's own connection is replaced
//! only after failing that long with no success, and the admission's
//! script was one.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use platform::kv::Kv;
use redis::RedisError;
use tokio::sync::oneshot;

/// What one `WAIT` answered: the replicas that acknowledged.
type Answer = Result<i64, RedisError>;

/// An answer later than this many wait timeouts after the admission's
/// script is not counted (see the module doc). Two timeouts can pass
/// legitimately: the `WAIT` in flight when the admission registered, then
/// its own.
pub const LATE_FACTOR: u32 = 3;

/// The replication waits of one edge, shared by its requests.
#[derive(Clone)]
pub struct ReplicaWaits {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Kv,
    replicas: u16,
    timeout: Duration,
    /// Per voucher key: the admissions waiting for the next `WAIT`. A key
    /// is present while its task runs.
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<Answer>>>>,
}

impl std::fmt::Debug for ReplicaWaits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaWaits")
            .field("replicas", &self.inner.replicas)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl ReplicaWaits {
    pub fn new(redis: Kv, replicas: u16, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                replicas,
                timeout,
                waiting: Mutex::default(),
            }),
        }
    }

    /// How many replicas of `key`'s primary hold every write this edge made
    /// to it before the call (at most the required number, after at most
    /// the timeout); 0 for an answer too late to trust. `None` if the
    /// wait's task ended without an answer.
    pub async fn acknowledged(&self, key: &str) -> Option<Answer> {
        let registered = tokio::time::Instant::now();
        let (sender, answer) = oneshot::channel();
        let start = {
            let mut waiting = self
                .inner
                .waiting
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match waiting.get_mut(key) {
                Some(group) => {
                    group.push(sender);
                    false
                }
                None => {
                    waiting.insert(key.to_owned(), vec![sender]);
                    true
                }
            }
        };
        if start {
            // a task, not this request: a client that hangs up must not
            // strand the admissions that joined its wait
            tokio::spawn(self.clone().run(key.to_owned()));
        }
        let answer = answer.await.ok()?;
        if registered.elapsed() > self.late() {
            return Some(Ok(0));
        }
        Some(answer)
    }

    /// Past this after an admission's script, an answer is not trusted.
    fn late(&self) -> Duration {
        (self.inner.timeout * LATE_FACTOR).min(platform::kv::REBUILD_AFTER)
    }

    /// Sends one `WAIT` for everything registered, until nothing is.
    async fn run(self, key: String) {
        loop {
            let group = {
                let mut waiting = self
                    .inner
                    .waiting
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let Some(group) = waiting.get_mut(&key) else { return };
                if group.is_empty() {
                    waiting.remove(&key);
                    return;
                }
                std::mem::take(group)
            };
            // Bounded here too: a `WAIT` stuck on a dead connection would
            // hold every later admission of the voucher, and an answer this
            // late is not counted anyway.
            let answer = tokio::time::timeout(
                self.late(),
                self.inner
                    .redis
                    .wait_replicas(&key, self.inner.replicas, self.inner.timeout),
            )
            .await
            .unwrap_or(Ok(0));
            metrics::histogram!("seckill_replica_wait_group_size").record(group.len() as f64);
            for waiter in group {
                // a waiter that gave up (its request was dropped) needs no answer
                let _ = waiter.send(answer.clone());
            }
        }
    }
}
