//! Reads by id, gathered into one statement per view under load.
//!
//! At most `QUERY_BATCH_CONCURRENCY` statements are in flight (one by
//! default); the lookups that arrive meanwhile wait in a queue, and the
//! next statement takes all of them (at most `QUERY_BATCH_MAX`). A lone
//! request is read at once, as before; a crowd costs Postgres one statement and one round trip per
//! batch instead of one per request, which is where a lookup by id spends
//! most of its time (docs/BENCHMARKS.md, "Query API").
//!
//! Each lookup keeps the caller's [`Scope`] in the SQL: the batch joins the
//! view with the (id, user, merchant) of every lookup, so a document is
//! returned only to the lookups its owner columns allow, exactly as the
//! single-row query did (API.md "Tenancy").
//!
//! The statement is not prepared once and cached: a cached generic plan
//! made while a view was empty stays a sequential scan as the view grows
//! (the daemon's document load had this: docs/READ_SIDE.md).

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use axum::body::Bytes;
use platform::http::{AuthUser, Role};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{cache::CachedDoc, watch::Table};

/// Lookups waiting for a statement, beyond which a request waits to queue
/// (each is one HTTP request in flight, which the connection cap bounds).
const QUEUE: usize = 4_096;

/// What of a view the caller may see, as SQL predicates that are always
/// ANDed into its queries (API.md "Tenancy"): a customer its own documents,
/// a merchant its own, an admin everything. Another's document is answered
/// exactly like a missing one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub user_id: Option<String>,
    pub merchant_id: Option<String>,
}

impl Scope {
    /// Orders: the customer's own, or the merchant's own.
    pub fn orders(user: &AuthUser) -> Self {
        match user.role {
            Role::Customer => Self {
                user_id: Some(user.sub.clone()),
                merchant_id: None,
            },
            Role::Merchant => Self {
                user_id: None,
                merchant_id: Some(user.sub.clone()),
            },
            Role::Admin => Self::default(),
        }
    }

    /// Catalogue documents (vouchers, products): anyone authenticated.
    pub fn everyone() -> Self {
        Self::default()
    }

    /// The same predicate as the SQL's, on a cached document's owners.
    pub fn allows(&self, doc: &CachedDoc) -> bool {
        let owns = |wanted: &Option<String>, owner: &Option<String>| wanted.is_none() || wanted == owner;
        owns(&self.user_id, &doc.user_id) && owns(&self.merchant_id, &doc.merchant_id)
    }
}

/// Why a lookup has no answer; every waiter of a failed statement gets the
/// same cause.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("the views are unavailable")]
    Store(#[source] Arc<sqlx::Error>),
    /// The statement's task ended without answering (it panicked, or the
    /// service is stopping).
    #[error("the lookup was not answered")]
    Unanswered,
}

/// A document the caller may see, or `None` (missing, or another's).
pub type Found = Result<Option<Arc<CachedDoc>>, LookupError>;

/// How lookups are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Lookups in one statement at most.
    pub max_batch: usize,
    /// Statements in flight at once (each holds a pooled connection).
    pub concurrency: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch: 64,
            concurrency: 1,
        }
    }
}

struct Lookup {
    table: Table,
    id: String,
    scope: Scope,
    reply: oneshot::Sender<Found>,
}

/// The lookups of one process; cheap to clone. The statement task starts
/// with the first lookup and ends when the last handle is dropped.
#[derive(Clone)]
pub struct Lookups {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    options: BatchOptions,
    queue: OnceLock<mpsc::Sender<Lookup>>,
    statements: Arc<AtomicU64>,
}

impl std::fmt::Debug for Lookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookups")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Lookups {
    pub fn new(pool: PgPool, options: BatchOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                options: BatchOptions {
                    max_batch: options.max_batch.max(1),
                    concurrency: options.concurrency.clamp(1, Semaphore::MAX_PERMITS),
                },
                queue: OnceLock::new(),
                statements: Arc::default(),
            }),
        }
    }

    /// The document `id` of `table` if `scope` may see it.
    pub async fn get(&self, table: Table, id: &str, scope: &Scope) -> Found {
        let queue = self.inner.queue.get_or_init(|| {
            let (queue, queued) = mpsc::channel(QUEUE);
            tokio::spawn(dispatch(
                self.inner.pool.clone(),
                queued,
                self.inner.options,
                Arc::clone(&self.inner.statements),
            ));
            queue
        });
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            table,
            id: id.to_owned(),
            scope: scope.clone(),
            reply,
        };
        queue.send(lookup).await.map_err(|_| LookupError::Unanswered)?;
        answer.await.map_err(|_| LookupError::Unanswered)?
    }

    /// Statements run so far (tests, and the batching's effect).
    pub fn statements(&self) -> u64 {
        self.inner.statements.load(Ordering::Relaxed)
    }
}

/// Takes what is queued whenever a statement slot is free.
async fn dispatch(pool: PgPool, mut queued: mpsc::Receiver<Lookup>, options: BatchOptions, statements: Arc<AtomicU64>) {
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let lookups_total = metrics::counter!("query_lookups_total");
    let statements_total = metrics::counter!("query_lookup_statements_total");
    loop {
        // the slot first: while none is free, lookups gather in the queue
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(options.max_batch);
        if queued.recv_many(&mut batch, options.max_batch).await == 0 {
            return;
        }
        lookups_total.increment(batch.len() as u64);
        let (pool, statements, statements_total) = (pool.clone(), Arc::clone(&statements), statements_total.clone());
        tokio::spawn(async move {
            for (table, lookups) in by_table(batch) {
                statements.fetch_add(1, Ordering::Relaxed);
                statements_total.increment(1);
                answer(&pool, table, lookups).await;
            }
            drop(slot);
        });
    }
}

fn by_table(batch: Vec<Lookup>) -> Vec<(Table, Vec<Lookup>)> {
    let mut tables: Vec<(Table, Vec<Lookup>)> = Vec::with_capacity(1);
    for lookup in batch {
        match tables.iter_mut().find(|(table, _)| *table == lookup.table) {
            Some((_, lookups)) => lookups.push(lookup),
            None => tables.push((lookup.table, vec![lookup])),
        }
    }
    tables
}

/// The documents of every lookup in `table` (`$1` ids, `$2` users, `$3`
/// merchants: NULL = any), each row tagged with its lookup's position.
macro_rules! by_ids {
    ($table:literal) => {
        concat!(
            "SELECT q.n, v.version, v.doc::text, v.user_id, v.merchant_id
             FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(id, user_id, merchant_id, n)
             JOIN ",
            $table,
            " v ON v.id = q.id
             WHERE (q.user_id IS NULL OR v.user_id = q.user_id)
               AND (q.merchant_id IS NULL OR v.merchant_id = q.merchant_id)"
        )
    };
}

fn statement(table: Table) -> &'static str {
    match table {
        Table::Orders => by_ids!("order_view"),
        Table::Vouchers => by_ids!("voucher_view"),
        Table::Products => by_ids!("product_view"),
    }
}

type Row = (i64, i64, String, Option<String>, Option<String>);

async fn answer(pool: &PgPool, table: Table, lookups: Vec<Lookup>) {
    let (mut ids, mut users, mut merchants) = (
        Vec::with_capacity(lookups.len()),
        Vec::with_capacity(lookups.len()),
        Vec::with_capacity(lookups.len()),
    );
    for lookup in &lookups {
        ids.push(lookup.id.as_str());
        users.push(lookup.scope.user_id.as_deref());
        merchants.push(lookup.scope.merchant_id.as_deref());
    }
    let rows = sqlx::query_as::<_, Row>(statement(table))
        .bind(&ids)
        .bind(&users)
        .bind(&merchants)
        .persistent(false)
        .fetch_all(pool)
        .await;
    let mut found: Vec<Option<Arc<CachedDoc>>> = vec![None; lookups.len()];
    match rows {
        Ok(rows) => {
            for (n, version, doc, user_id, merchant_id) in rows {
                // ORDINALITY counts from 1
                let slot = usize::try_from(n - 1).ok().and_then(|i| found.get_mut(i));
                if let Some(slot) = slot {
                    *slot = Some(Arc::new(CachedDoc::new(
                        version.unsigned_abs(),
                        Bytes::from(doc),
                        user_id,
                        merchant_id,
                    )));
                }
            }
            for (lookup, doc) in lookups.into_iter().zip(found) {
                // a request that gave up (timeout, client gone) drops its receiver
                let _ = lookup.reply.send(Ok(doc));
            }
        }
        Err(error) => {
            let error = LookupError::Store(Arc::new(error));
            for lookup in lookups {
                let _ = lookup.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_split_by_view_keeping_each_views_order() {
        let lookup = |table, id: &str| Lookup {
            table,
            id: id.to_owned(),
            scope: Scope::everyone(),
            reply: oneshot::channel().0,
        };
        let batch = vec![
            lookup(Table::Orders, "a"),
            lookup(Table::Vouchers, "v"),
            lookup(Table::Orders, "b"),
        ];
        let split: Vec<(Table, Vec<String>)> = by_table(batch)
            .into_iter()
            .map(|(table, lookups)| (table, lookups.into_iter().map(|l| l.id).collect()))
            .collect();
        assert_eq!(
            split,
            vec![
                (Table::Orders, vec!["a".to_owned(), "b".to_owned()]),
                (Table::Vouchers, vec!["v".to_owned()])
            ]
        );
    }

    #[test]
    fn scopes_allow_what_the_sql_allows() {
        let doc = CachedDoc::new(1, Bytes::from_static(b"{}"), Some("u1".into()), Some("m1".into()));
        assert!(Scope::everyone().allows(&doc));
        let customer = |id: &str| Scope {
            user_id: Some(id.into()),
            merchant_id: None,
        };
        let merchant = |id: &str| Scope {
            user_id: None,
            merchant_id: Some(id.into()),
        };
        assert!(customer("u1").allows(&doc));
        assert!(!customer("u2").allows(&doc));
        assert!(merchant("m1").allows(&doc));
        assert!(!merchant("m2").allows(&doc));
    }
}
