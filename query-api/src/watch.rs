//! Read-your-writes waits, shared by every waiting request of a process.
//!
//! A request whose document is below its `min_version` registers here and
//! sleeps; one background task looks up the versions of every waited-for
//! document in one query per view and tick (`id = ANY($1)`), and wakes the
//! requests whose document got there. Before, each waiting request polled
//! its own row with a backoff: at a few hundred orders per second that was
//! most of the query API's statements (measured in docs/BENCHMARKS.md).
//!
//! The task runs only while someone waits, holds the registry weakly (it
//! ends with the last [`VersionWatch`] handle), and a failed lookup only
//! delays the waiters: each re-reads its document when woken or when its
//! own deadline passes, so a lost wake-up costs time, never a wrong answer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use sqlx::PgPool;
use tokio::sync::{Notify, oneshot};

/// How often the versions of waited-for documents are looked up.
pub const WATCH_TICK: Duration = Duration::from_millis(5);

/// A view table whose documents can be waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Orders,
    Vouchers,
    Products,
}

impl Table {
    fn versions(self) -> &'static str {
        match self {
            Self::Orders => "SELECT id, version FROM order_view WHERE id = ANY($1)",
            Self::Vouchers => "SELECT id, version FROM voucher_view WHERE id = ANY($1)",
            Self::Products => "SELECT id, version FROM product_view WHERE id = ANY($1)",
        }
    }
}

struct Waiter {
    min_version: u64,
    wake: oneshot::Sender<()>,
}

type Waiting = HashMap<(Table, String), Vec<Waiter>>;

struct Inner {
    pool: PgPool,
    tick: Duration,
    waiting: Mutex<Waiting>,
    added: Arc<Notify>,
    task: Mutex<bool>,
}

/// The registry of waiting requests; cheap to clone.
#[derive(Clone)]
pub struct VersionWatch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VersionWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionWatch")
            .field("tick", &self.inner.tick)
            .finish_non_exhaustive()
    }
}

impl VersionWatch {
    pub fn new(pool: PgPool) -> Self {
        Self::with_tick(pool, WATCH_TICK)
    }

    pub fn with_tick(pool: PgPool, tick: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                tick,
                waiting: Mutex::default(),
                added: Arc::new(Notify::new()),
                task: Mutex::new(false),
            }),
        }
    }

    /// Waits until the document `id` of `table` is stored at `min_version` or
    /// later, or until `timeout` passes. `true` when the version was seen;
    /// the caller reads the document again either way.
    pub async fn wait(&self, table: Table, id: &str, min_version: u64, timeout: Duration) -> bool {
        let (wake, woken) = oneshot::channel();
        {
            let Ok(mut waiting) = self.inner.waiting.lock() else {
                return false;
            };
            waiting
                .entry((table, id.to_owned()))
                .or_default()
                .push(Waiter { min_version, wake });
        }
        self.ensure_task();
        self.inner.added.notify_one();
        matches!(tokio::time::timeout(timeout, woken).await, Ok(Ok(())))
    }

    /// How many requests wait now (tests, metrics).
    pub fn waiting(&self) -> usize {
        self.inner
            .waiting
            .lock()
            .map(|waiting| {
                waiting
                    .values()
                    .flatten()
                    .filter(|waiter| !waiter.wake.is_closed())
                    .count()
            })
            .unwrap_or(0)
    }

    fn ensure_task(&self) {
        let Ok(mut started) = self.inner.task.lock() else {
            return;
        };
        if !*started {
            *started = true;
            tokio::spawn(watch(Arc::downgrade(&self.inner)));
        }
    }
}

/// The watcher: while anyone waits, one lookup per view and tick.
async fn watch(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let wanted = wanted(&strong);
        if wanted.is_empty() {
            // idle: wake on a new waiter, and look now and then whether the
            // registry is still alive
            let (added, idle) = (strong.added.clone(), strong.tick.max(Duration::from_secs(1)));
            drop(strong);
            let _ = tokio::time::timeout(idle, added.notified()).await;
            continue;
        }
        for (table, ids) in wanted {
            match sqlx::query_as::<_, (String, i64)>(table.versions())
                .bind(&ids)
                .fetch_all(&strong.pool)
                .await
            {
                Ok(rows) => wake(&strong, table, &rows),
                Err(error) => {
                    tracing::warn!(%error, "read-your-writes: version lookup failed; waiters re-read on their deadline")
                }
            }
        }
        let tick = strong.tick;
        drop(strong);
        tokio::time::sleep(tick).await;
    }
}

/// The ids waited for per table, after forgetting requests that gave up.
fn wanted(inner: &Inner) -> HashMap<Table, Vec<String>> {
    let mut wanted: HashMap<Table, Vec<String>> = HashMap::new();
    let Ok(mut waiting) = inner.waiting.lock() else {
        return wanted;
    };
    waiting.retain(|(table, id), waiters| {
        waiters.retain(|waiter| !waiter.wake.is_closed());
        if waiters.is_empty() {
            return false;
        }
        wanted.entry(*table).or_default().push(id.clone());
        true
    });
    wanted
}

fn wake(inner: &Inner, table: Table, rows: &[(String, i64)]) {
    let Ok(mut waiting) = inner.waiting.lock() else { return };
    for (id, version) in rows {
        let version = version.unsigned_abs();
        let key = (table, id.clone());
        let Some(waiters) = waiting.remove(&key) else { continue };
        let (ready, still): (Vec<Waiter>, Vec<Waiter>) = waiters.into_iter().partition(|w| w.min_version <= version);
        for waiter in ready {
            let _ = waiter.wake.send(());
        }
        if !still.is_empty() {
            waiting.insert(key, still);
        }
    }
}
