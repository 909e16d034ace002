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
    /// the timeout). `None` if the wait's task ended without an answer.
    pub async fn acknowledged(&self, key: &str) -> Option<Answer> {
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
        answer.await.ok()
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
            let answer = self
                .inner
                .redis
                .wait_replicas(&key, self.inner.replicas, self.inner.timeout)
                .await;
            metrics::histogram!("seckill_replica_wait_group_size").record(group.len() as f64);
            for waiter in group {
                // a waiter that gave up (its request was dropped) needs no answer
                let _ = waiter.send(answer.clone());
            }
        }
    }
}
