//! The views' reconciler: proves that every event in the store is in its
//! view, and repairs what is not.
//!
//! The daemon acknowledges a batch after its commit. A commit that vanishes
//! afterwards (a Postgres crash with `synchronous_commit = off`, a failover
//! to a lagging replica) leaves a document behind with nothing left to
//! redeliver, and nothing later may touch that document. So, every
//! [`ReconcilerConfig::every`]:
//!
//! 1. read the log by global position from the cursor up to the final
//!    position (every transaction below it finished), noting each touched
//!    aggregate's highest sequence as a *suspect*;
//! 2. after [`ReconcilerConfig::grace`], compare the suspects with their
//!    documents' versions (one indexed read of `id, version` per view and
//!    chunk) and forget the ones that are current;
//! 3. a document still behind is caught up from the event store, through
//!    the daemon's own writer (version rule, dead letters, the projection's
//!    shared lock) — but only once nothing is in flight towards it (the
//!    relay has published everything and the projection's consumer has
//!    nothing pending: otherwise the pipeline is simply busy getting there),
//!    or after [`ReconcilerConfig::patience`] regardless. Each document caught up
//!    counts in `reconciler_repairs_total{chain="views"}`.
//!
//! The cursor starts [`START_WINDOW`] events back from the end of the log
//! (a restarted daemon proves the recent past again) and goes back 60 s
//! when Postgres restarted ([`event_store::reconcile::Cursor`]).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_nats::jetstream;
use event_store::reconcile::{self, Cursor};
use events::Namespace;
use sqlx::{PgPool, Row as _};
use tokio_util::sync::CancellationToken;

use crate::{
    Projection,
    daemon::consumer_name,
    views::{CouponProjector, OrderProjector, ProductProjector, Projector, VoucherProjector},
    writer::{Documents, Step, dead_letter, record_dead_letters},
};

/// Events before the end of the log that a starting reconciler checks again.
pub const START_WINDOW: i64 = 100_000;

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub every: Duration,
    /// How old a suspect must be before its document is checked.
    pub grace: Duration,
    /// How long a behind document may wait for a busy daemon.
    pub patience: Duration,
    /// Events read per page of the log.
    pub page: i64,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            grace: Duration::from_secs(2),
            patience: Duration::from_secs(30),
            page: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Suspect {
    sequence: u64,
    since: Instant,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub read_up_to: i64,
    pub checked: usize,
    pub repaired: usize,
    pub waiting: usize,
    pub rewound: bool,
}

#[derive(Debug)]
pub struct ViewReconciler {
    pool: PgPool,
    js: jetstream::Context,
    namespace: Namespace,
    config: ReconcilerConfig,
    cursor: Option<Cursor>,
    suspects: HashMap<(Projection, String), Suspect>,
}

impl ViewReconciler {
    pub fn new(pool: PgPool, js: jetstream::Context, namespace: Namespace, config: ReconcilerConfig) -> Self {
        Self {
            pool,
            js,
            namespace,
            config,
            cursor: None,
            suspects: HashMap::new(),
        }
    }

    /// Starts the cursor at `position` instead of [`START_WINDOW`] back.
    pub fn starting_at(mut self, position: i64) -> Self {
        self.cursor = Some(Cursor::new(position, Instant::now()));
        self
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.config.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(every.tick()).await.is_some() {
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "view reconciliation pass failed; next one retries");
            }
        }
    }

    /// One pass: read the new part of the log, check the suspects that are
    /// due, repair the documents that are behind.
    pub async fn pass(&mut self) -> Result<PassReport, sqlx::Error> {
        let now = Instant::now();
        let mut report = PassReport::default();
        let started = reconcile::server_started(&self.pool).await?;
        let upto = reconcile::final_position(&self.pool).await?;
        let cursor = self
            .cursor
            .get_or_insert_with(|| Cursor::new(upto.saturating_sub(START_WINDOW).max(0), now));
        if let Some(left) = cursor.observe_server(started, now) {
            tracing::warn!(
                left,
                back_to = cursor.position(),
                "Postgres restarted: checking the views again from before the restart"
            );
            metrics::counter!("reconciler_rewinds_total", "chain" => "views").increment(1);
            report.rewound = true;
        }
        while cursor.position() < upto {
            let (heads, end) = reconcile::heads(&self.pool, cursor.position(), upto, self.config.page).await?;
            for head in heads {
                let Some(projection) = Projection::ALL
                    .into_iter()
                    .find(|p| p.aggregate_type() == head.aggregate_type)
                else {
                    continue;
                };
                let suspect = self.suspects.entry((projection, head.aggregate_id)).or_insert(Suspect {
                    sequence: head.sequence,
                    since: now,
                });
                suspect.sequence = suspect.sequence.max(head.sequence);
            }
            if end <= cursor.position() {
                break;
            }
            cursor.advance(end, now);
        }
        report.read_up_to = cursor.position();

        for projection in Projection::ALL {
            let due: Vec<(String, u64)> = self
                .suspects
                .iter()
                .filter(|((p, _), s)| *p == projection && now.saturating_duration_since(s.since) >= self.config.grace)
                .map(|((_, id), s)| (id.clone(), s.sequence))
                .collect();
            if due.is_empty() {
                continue;
            }
            report.checked += due.len();
            let behind = behind(&self.pool, projection.table(), &due).await?;
            let current = due.len() - behind.len();
            for (id, _) in &due {
                if !behind.iter().any(|(b, _)| b == id) {
                    self.suspects.remove(&(projection, id.clone()));
                }
            }
            tracing::trace!(
                projection = projection.name(),
                current,
                behind = behind.len(),
                "views checked"
            );
            if behind.is_empty() {
                continue;
            }
            let oldest = behind
                .iter()
                .filter_map(|(id, _)| self.suspects.get(&(projection, id.clone())))
                .map(|s| now.saturating_duration_since(s.since))
                .max()
                .unwrap_or_default();
            if oldest < self.config.patience && !self.pipeline_idle(projection).await {
                report.waiting += behind.len();
                continue;
            }
            let repaired = repair(&self.pool, projection, &behind).await?;
            for (id, _) in &behind {
                self.suspects.remove(&(projection, id.clone()));
            }
            if repaired > 0 {
                tracing::warn!(
                    projection = projection.name(),
                    repaired,
                    "documents were behind the event store with nothing pending: caught up"
                );
                metrics::counter!("reconciler_repairs_total", "chain" => "views", "projection" => projection.name())
                    .increment(repaired as u64);
            }
            report.repaired += repaired;
        }
        metrics::gauge!("reconciler_suspects", "chain" => "views").set(self.suspects.len() as f64);
        Ok(report)
    }

    /// Nothing is in flight towards the projection: the relay has published
    /// everything, and the projection's consumer has nothing pending or
    /// unacknowledged. A document behind the store then was left behind.
    async fn pipeline_idle(&self, projection: Projection) -> bool {
        let relay = event_store::relay::RelayConfig::default().name;
        event_store::relay::caught_up(&self.pool, &relay).await.unwrap_or(false) && self.consumer_idle(projection).await
    }

    /// The projection's consumer has nothing pending or unacknowledged.
    async fn consumer_idle(&self, projection: Projection) -> bool {
        let stream = self.namespace.events_stream(projection.aggregate_type());
        let info = async {
            let mut consumer = self
                .js
                .get_stream(stream)
                .await?
                .get_consumer::<jetstream::consumer::pull::Config>(&consumer_name(projection.name()))
                .await?;
            let info = consumer.info().await?;
            Ok::<_, async_nats::Error>(info.num_pending == 0 && info.num_ack_pending == 0)
        };
        // unknown (NATS away): assume busy, patience decides
        info.await.unwrap_or(false)
    }
}

/// The ids among `due` whose document is missing or below the sequence.
async fn behind(pool: &PgPool, table: &str, due: &[(String, u64)]) -> Result<Vec<(String, u64)>, sqlx::Error> {
    let mut behind = Vec::new();
    for chunk in due.chunks(1_000) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let rows = sqlx::query(&format!("SELECT id, version FROM {table} WHERE id = ANY($1)"))
            .bind(&ids)
            .persistent(false)
            .fetch_all(pool)
            .await?;
        let versions: HashMap<String, u64> = rows
            .iter()
            .map(|row| {
                Ok::<_, sqlx::Error>((
                    row.try_get::<String, _>("id")?,
                    row.try_get::<i64, _>("version")?.unsigned_abs(),
                ))
            })
            .collect::<Result<_, _>>()?;
        behind.extend(
            chunk
                .iter()
                .filter(|(id, sequence)| versions.get(id).copied().unwrap_or(0) < *sequence)
                .cloned(),
        );
    }
    Ok(behind)
}

/// Catches `documents` up with the event store; how many changed.
pub async fn repair(pool: &PgPool, projection: Projection, documents: &[(String, u64)]) -> Result<usize, sqlx::Error> {
    match projection {
        Projection::Orders => catch_up::<OrderProjector>(pool, documents).await,
        Projection::Coupons => catch_up::<CouponProjector>(pool, documents).await,
        Projection::Vouchers => catch_up::<VoucherProjector>(pool, documents).await,
        Projection::Products => catch_up::<ProductProjector>(pool, documents).await,
    }
}

/// As a daemon worker would: under the projection's shared lock, each
/// document's missing events applied through the version rule, in one
/// transaction per chunk.
async fn catch_up<P: Projector>(pool: &PgPool, documents: &[(String, u64)]) -> Result<usize, sqlx::Error> {
    let mut repaired = 0;
    for chunk in documents.chunks(500) {
        let mut tx = pool.begin().await?;
        event_store::checkpoint::lock_shared(&mut tx, P::NAME).await?;
        let mut docs = Documents::<P>::new(P::TABLE);
        docs.load(&mut tx, chunk.iter().map(|(id, _)| id.as_str())).await?;
        let mut letters = Vec::new();
        for (id, _) in chunk {
            let missing = event_store::read::aggregate(&mut *tx, P::AGGREGATE_TYPE, id, docs.version(id), None).await?;
            let mut changed = false;
            for envelope in &missing {
                match docs.apply(&mut tx, envelope).await? {
                    Step::Applied => changed = true,
                    Step::Duplicate | Step::Gap { .. } => {}
                    Step::Failed(error) => {
                        tracing::error!(
                            projection = P::NAME, event_id = %envelope.event_id, %error,
                            "stored event does not apply; dead-lettered, its document skips it"
                        );
                        letters.push(dead_letter(envelope, &error));
                        docs.skip(envelope);
                        changed = true;
                    }
                }
            }
            repaired += usize::from(changed);
        }
        docs.flush(&mut tx).await?;
        letters.append(&mut docs.dead_letters);
        record_dead_letters(&mut tx, P::NAME, &letters).await?;
        tx.commit().await?;
    }
    Ok(repaired)
}
