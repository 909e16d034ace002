//! Read-your-writes waits, shared by every waiting request of a process.
//!
//! A request whose document is below its `min_version` registers here and
//! sleeps; one background task looks up the versions of every waited-for
//! document in one query per view and tick, and hands each request whose
//! document got there that document, read in the same query. Before, each
//! waiting request polled its own row with a backoff: at a few hundred
//! orders per second that was most of the query API's statements (measured
//! in docs/BENCHMARKS.md). The waiter checked the caller's scope on its
//! first read, and a document's owner never changes, so the document handed
//! over needs no second check.
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

/// The version of each waited-for document, and the document itself once it
/// reached the lowest version anyone waits for (`$1` ids, `$2` versions).
macro_rules! lookup {
    ($table:literal) => {
        concat!(
            "SELECT v.id, v.version, CASE WHEN v.version >= w.min_version THEN v.doc::text END FROM ",
            $table,
            " v JOIN UNNEST($1::text[], $2::bigint[]) AS w(id, min_version) USING (id)"
        )
    };
}

impl Table {
    /// The view table by its name (as the projections announce it).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "order_view" => Some(Self::Orders),
            "voucher_view" => Some(Self::Vouchers),
            "product_view" => Some(Self::Products),
            _ => None,
        }
    }

    fn lookup(self) -> &'static str {
        match self {
            Self::Orders => lookup!("order_view"),
            Self::Vouchers => lookup!("voucher_view"),
            Self::Products => lookup!("product_view"),
        }
    }
}

/// A document as stored: its version and its JSON text.
pub type Versioned = (u64, String);

struct Waiter {
    min_version: u64,
    wake: oneshot::Sender<Versioned>,
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
    /// later, or until `timeout` passes: the document then, or `None` (the
    /// caller reads what there is).
    pub async fn wait(&self, table: Table, id: &str, min_version: u64, timeout: Duration) -> Option<Versioned> {
        let (wake, woken) = oneshot::channel();
        {
            let Ok(mut waiting) = self.inner.waiting.lock() else {
                return None;
            };
            waiting
                .entry((table, id.to_owned()))
                .or_default()
                .push(Waiter { min_version, wake });
        }
        self.ensure_task();
        self.inner.added.notify_one();
        tokio::time::timeout(timeout, woken).await.ok()?.ok()
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
        for (table, (ids, versions)) in wanted {
            match sqlx::query_as::<_, (String, i64, Option<String>)>(table.lookup())
                .bind(&ids)
                .bind(&versions)
                .fetch_all(&strong.pool)
                .await
            {
                Ok(rows) => wake(&strong, table, rows),
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

/// The ids waited for per table with the lowest version waited for, after
/// forgetting requests that gave up.
fn wanted(inner: &Inner) -> HashMap<Table, (Vec<String>, Vec<i64>)> {
    let mut wanted: HashMap<Table, (Vec<String>, Vec<i64>)> = HashMap::new();
    let Ok(mut waiting) = inner.waiting.lock() else {
        return wanted;
    };
    waiting.retain(|(table, id), waiters| {
        waiters.retain(|waiter| !waiter.wake.is_closed());
        if waiters.is_empty() {
            return false;
        }
        let lowest = waiters.iter().map(|waiter| waiter.min_version).min().unwrap_or(0);
        let (ids, versions) = wanted.entry(*table).or_default();
        ids.push(id.clone());
        versions.push(i64::try_from(lowest).unwrap_or(i64::MAX));
        true
    });
    wanted
}

fn wake(inner: &Inner, table: Table, rows: Vec<(String, i64, Option<String>)>) {
    let Ok(mut waiting) = inner.waiting.lock() else { return };
    for (id, version, doc) in rows {
        // no document: below every waiter's version
        let Some(doc) = doc else { continue };
        let version = version.unsigned_abs();
        let key = (table, id);
        let Some(waiters) = waiting.remove(&key) else { continue };
        let (ready, still): (Vec<Waiter>, Vec<Waiter>) = waiters.into_iter().partition(|w| w.min_version <= version);
        for waiter in ready {
            let _ = waiter.wake.send((version, doc.clone()));
        }
        if !still.is_empty() {
            waiting.insert(key, still);
        }
    }
}
