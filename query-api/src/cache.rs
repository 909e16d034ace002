//! The document cache: documents read by id, kept in memory by id and
//! version, so a crowd refreshing one sale's page does not reach Postgres on
//! every request.
//!
//! - **Bounded**: at most `QUERY_CACHE_MB` of document text (moka, weighed
//!   by size, TinyLFU admission keeps the hot keys); `0` turns it off.
//! - **One load per key**: concurrent misses of one key wait for a single
//!   read (moka's per-key compute), whose SQL keeps the caller's scope; a
//!   cached document is then handed only to callers its owner columns allow
//!   (the same predicate, in the handler).
//! - **Never behind what was answered**: an entry is only ever replaced by a
//!   later version; a read with `min_version` above the cached version goes
//!   to Postgres, and what it finds goes into the cache.
//! - **Invalidated by the projections' writes**: the daemon announces each
//!   batch's changed ids and versions on `view_changes`
//!   ([`platform::pg::ViewChange`], sent when its transaction commits); a
//!   listener drops every older entry (a replay's swap drops the table). A
//!   drop waits for a load of the same key in progress, so a load that read
//!   the old row cannot put it back after the drop. When the listener's
//!   connection breaks, everything is dropped (notifications may have been
//!   missed), and every entry also expires after `QUERY_CACHE_TTL_MS` as a
//!   backstop.

use std::{future::Future, sync::Arc, time::Duration};

use axum::body::Bytes;
use moka::ops::compute::Op;
use platform::pg::{VIEW_CHANGES_CHANNEL, ViewChange};
use sqlx::{PgPool, postgres::PgListener};
use uuid::Uuid;

use crate::watch::Table;

/// A document as stored, with the owner columns the caller's scope is
/// checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDoc {
    pub version: u64,
    pub doc: Bytes,
    pub user_id: Option<String>,
    pub merchant_id: Option<String>,
    /// What a voucher's status is computed from, decoded on the first read
    /// that needs it and kept with the cached copy.
    pub sale: std::sync::OnceLock<Option<crate::routes::SaleClock>>,
    /// A voucher's answer for each sale status, built the first time this
    /// copy is answered in that status (a hot sale's page is answered tens
    /// of thousands of times a second from one copy).
    pub pages: [std::sync::OnceLock<Bytes>; crate::routes::SALE_STATUSES],
}

impl CachedDoc {
    pub fn new(version: u64, doc: Bytes, user_id: Option<String>, merchant_id: Option<String>) -> Self {
        Self {
            version,
            doc,
            user_id,
            merchant_id,
            sale: std::sync::OnceLock::new(),
            pages: Default::default(),
        }
    }
}

/// Every document read by id has a UUID for an id (the routes take no
/// other), so the key is 16 bytes: no allocation to look one up.
type Key = (Table, Uuid);

/// The cache; cheap to clone (one reference count: the state holding it is
/// cloned for every request).
#[derive(Clone)]
pub struct DocCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// foldhash instead of SipHash: every read hashes its key a few times,
    /// and only documents that exist are ever keys (misses are not
    /// cached), so nobody can flood the table with colliding ids.
    docs: moka::future::Cache<Key, Arc<CachedDoc>, foldhash::quality::RandomState>,
    /// Registered once, not looked up per request.
    hits: metrics::Counter,
    misses: metrics::Counter,
}

impl std::fmt::Debug for DocCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocCache")
            .field("entries", &self.inner.docs.entry_count())
            .finish()
    }
}

impl DocCache {
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let docs = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Key, doc: &Arc<CachedDoc>| u32::try_from(doc.doc.len() + 80).unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .build_with_hasher(foldhash::quality::RandomState::default());
        Self {
            inner: Arc::new(Inner {
                docs,
                hits: metrics::counter!("query_cache_total", "outcome" => "hit"),
                misses: metrics::counter!("query_cache_total", "outcome" => "miss"),
            }),
        }
    }

    /// The cached document, or the one `load` reads (one load per key at a
    /// time; a missing document is not cached: anyone can name ids).
    pub async fn get_or_load<E, F, Fut>(&self, table: Table, id: Uuid, load: F) -> Result<Option<Arc<CachedDoc>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Arc<CachedDoc>>, E>>,
    {
        let key = (table, id);
        if let Some(doc) = self.inner.docs.get(&key).await {
            self.inner.hits.increment(1);
            return Ok(Some(doc));
        }
        self.inner.misses.increment(1);
        let mut failure = None;
        let mut found = None;
        self.inner
            .docs
            .entry(key)
            .and_compute_with(|existing| async {
                // another caller loaded it while this one waited for the key
                if let Some(existing) = existing {
                    found = Some(existing.into_value());
                    return Op::Nop;
                }
                match load().await {
                    Ok(Some(doc)) => {
                        found = Some(doc.clone());
                        Op::Put(doc)
                    }
                    Ok(None) => Op::Nop,
                    Err(error) => {
                        failure = Some(error);
                        Op::Nop
                    }
                }
            })
            .await;
        match failure {
            Some(error) => Err(error),
            None => Ok(found),
        }
    }

    /// Keeps `doc` unless the cache holds the same or a later version.
    pub async fn put_if_newer(&self, table: Table, id: Uuid, doc: Arc<CachedDoc>) {
        self.inner
            .docs
            .entry((table, id))
            .and_compute_with(|existing| async move {
                match existing {
                    Some(existing) if existing.value().version >= doc.version => Op::Nop,
                    _ => Op::Put(doc),
                }
            })
            .await;
    }

    /// Drops the entry if it is older than `version`.
    pub async fn forget_older(&self, table: Table, id: Uuid, version: u64) {
        self.inner
            .docs
            .entry((table, id))
            .and_compute_with(|existing| async move {
                match existing {
                    Some(existing) if existing.value().version < version => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    pub fn forget_all(&self) {
        self.inner.docs.invalidate_all();
    }

    /// Follows `view_changes` until the returned task is aborted (the service
    /// aborts it at shutdown).
    pub fn listen(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = cache.follow(&pool).await {
                    tracing::warn!(%error, "document cache: view changes not followed; forgetting everything");
                }
                // whatever was announced meanwhile is lost: start clean
                cache.forget_all();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn follow(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(VIEW_CHANGES_CHANNEL).await?;
        // announcements before LISTEN took effect were not heard
        self.forget_all();
        loop {
            // `recv` reconnects on its own; a reconnect is `None` from
            // `try_recv`, which this loop must see to forget what it missed
            let Some(notification) = listener.try_recv().await? else {
                self.forget_all();
                continue;
            };
            match ViewChange::parse(notification.payload()) {
                Some(ViewChange::Documents { table, changed }) => {
                    let Some(table) = Table::from_name(&table) else {
                        continue;
                    };
                    for (id, version) in changed {
                        // an id that is no UUID was never read by id, so never cached
                        if let Ok(id) = Uuid::parse_str(&id) {
                            self.forget_older(table, id, version).await;
                        }
                    }
                }
                Some(ViewChange::Table { table }) => {
                    if Table::from_name(&table).is_some() {
                        self.forget_all();
                    }
                }
                None => {
                    tracing::warn!(
                        payload = notification.payload(),
                        "document cache: unreadable view change; forgetting everything"
                    );
                    self.forget_all();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const HOT: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001);
    const ORDER: Uuid = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0002);

    fn doc(version: u64) -> Arc<CachedDoc> {
        Arc::new(CachedDoc::new(
            version,
            Bytes::from(format!("{{\"version\":{version}}}")),
            None,
            None,
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_of_one_key_load_it_once() {
        let cache = DocCache::new(1 << 20, Duration::from_secs(60));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (cache, loads) = (cache.clone(), loads.clone());
            readers.spawn(async move {
                cache
                    .get_or_load(Table::Vouchers, HOT, || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::convert::Infallible>(Some(doc(7)))
                    })
                    .await
            });
        }
        while let Some(read) = readers.join_next().await {
            let read = read.expect("reader").expect("infallible");
            assert_eq!(read.map(|d| d.version), Some(7));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn entries_only_move_forward_and_older_ones_are_forgotten() {
        let cache = DocCache::new(1 << 20, Duration::from_secs(60));
        let never = || async { Ok::<_, std::convert::Infallible>(None) };
        cache.put_if_newer(Table::Orders, ORDER, doc(3)).await;
        cache.put_if_newer(Table::Orders, ORDER, doc(2)).await;
        let held = cache.get_or_load(Table::Orders, ORDER, never).await.expect("read");
        assert_eq!(
            held.map(|d| d.version),
            Some(3),
            "an older copy never replaces a newer one"
        );
        cache.forget_older(Table::Orders, ORDER, 3).await;
        let held = cache.get_or_load(Table::Orders, ORDER, never).await.expect("read");
        assert_eq!(held.map(|d| d.version), Some(3), "announcing what it holds keeps it");
        cache.forget_older(Table::Orders, ORDER, 4).await;
        let held = cache.get_or_load(Table::Orders, ORDER, never).await.expect("read");
        assert_eq!(
            held, None,
            "a later version announced: the copy is gone, the store is asked"
        );
        // a missing document is not cached: the next read asks again
        let later = cache
            .get_or_load(Table::Orders, ORDER, || async {
                Ok::<_, std::convert::Infallible>(Some(doc(4)))
            })
            .await
            .expect("read");
        assert_eq!(later.map(|d| d.version), Some(4));
    }
}
