//! The admissions' reconciler: proves that every request this gate admitted
//! (its reservation records: each voucher's buyers hash, user → order id)
//! reached a decision in the event store, and sends the ones that did not
//! to JetStream again.
//!
//! The forwarder acknowledges a Redis stream entry only after JetStream
//! acknowledged the publish, and the claim writer's own reconciler covers
//! what JetStream delivered (commands' `reconciler`). What is left is an
//! admission whose request never made it to the requests stream, or whose
//! message is gone from it (a stream that lost acknowledged messages, an
//! entry deleted by hand). So, every [`ReconcilerConfig::every`], for each
//! voucher in the registry: the buyers whose order is older than
//! [`ReconcilerConfig::grace`] (the order id is a UUIDv7: its time is the
//! admission's) and not yet confirmed are looked up in the store; the ones
//! with an order are confirmed (never asked again), the others are
//! published once more as `OrderRequested`, under a message id of their own
//! (`redrive:<order>:<10-minute bucket>`, so several edges or passes in one
//! bucket publish it once). The claim writer decides each order id once,
//! however many copies arrive. Each re-sent request counts in
//! `reconciler_repairs_total{chain="admissions"}`.
//!
//! The buyers hash of a big sale holds hundreds of thousands of entries, and
//! Redis runs the admissions of that sale. So the hash is never read whole:
//! a pass walks it with `HSCAN`, [`ReconcilerConfig::page`] entries at a
//! time with a pause after each page, which bounds what it costs Redis and
//! the edge to [`ReconcilerConfig::scan_rate`] entries a second (one
//! `HGETALL` of 300,000 buyers every 5 s took the admitted path's p99 from
//! 6 ms to 200 ms: docs/BENCHMARKS.md). A voucher whose last complete walk
//! found every buyer confirmed is not walked again until its hash grows or
//! is rebuilt (`meta`'s `loaded_at` and `version` change on every load):
//! within one load, buyers are only ever added.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use bytes::Bytes;
use chrono::{TimeZone as _, Utc};
use cp_nats::{Outgoing, Publisher};
use events::{AggregateEvents as _, Namespace, OrderEvent, OrderRequested, subjects::MSG_ID};
use platform::{clock::SharedClock, kv::Kv};
use redis::AsyncCommands as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    gate::order_millis,
    keys::{VoucherKeys, registry},
};

/// Candidates looked up in the store with one query.
const LOOKUP_CHUNK: usize = 1_000;

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub every: Duration,
    /// How old an admission must be before its order is looked for.
    pub grace: Duration,
    /// Buyers asked for per `HSCAN` (a hint to Redis, which may answer more).
    pub page: usize,
    /// The most buyers a pass reads per second, over all vouchers: after
    /// each page, the walk pauses for as long as the buyers it got take at
    /// this rate. 0 means no pause.
    pub scan_rate: u32,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(5),
            grace: Duration::from_secs(30),
            page: 500,
            scan_rate: 20_000,
        }
    }
}

impl ReconcilerConfig {
    /// How long reading `buyers` takes at the scan rate.
    fn pause(&self, buyers: usize) -> Duration {
        if self.scan_rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(buyers as f64 / f64::from(self.scan_rate))
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Buyers past their grace, not confirmed before, looked up in the store.
    pub checked: usize,
    pub resent: usize,
    /// Vouchers walked (the others were settled and unchanged).
    pub walked: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("redis")]
    Redis(#[from] redis::RedisError),
    #[error("event store")]
    Store(#[from] sqlx::Error),
    #[error("publishing a request again")]
    Publish(#[source] cp_nats::PublishFailure),
}

/// What the reconciler knows of one voucher's buyers.
#[derive(Debug, Default)]
struct Buyers {
    /// Order ids found in the store.
    confirmed: HashSet<Uuid>,
    /// Set when the last complete walk found every buyer confirmed: the
    /// hash's length and load then. Unchanged, the hash holds the same buyers.
    settled: Option<Shape>,
}

/// A buyers hash's length and the load that built it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    len: usize,
    loaded: (Option<String>, Option<String>),
}

pub struct AdmissionReconciler {
    redis: Kv,
    prefix: String,
    pool: PgPool,
    publisher: Publisher,
    namespace: Namespace,
    config: ReconcilerConfig,
    clock: SharedClock,
    vouchers: HashMap<Uuid, Buyers>,
}

impl std::fmt::Debug for AdmissionReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionReconciler")
            .field("config", &self.config)
            .field("vouchers", &self.vouchers.len())
            .finish_non_exhaustive()
    }
}

impl AdmissionReconciler {
    pub fn new(
        redis: Kv,
        prefix: String,
        pool: PgPool,
        publisher: Publisher,
        namespace: Namespace,
        config: ReconcilerConfig,
        clock: SharedClock,
    ) -> Self {
        Self {
            redis,
            prefix,
            pool,
            publisher,
            namespace,
            config,
            clock,
            vouchers: HashMap::new(),
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.config.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(every.tick()).await.is_some() {
            if let Some(Err(error)) = stop.run_until_cancelled(self.pass()).await {
                tracing::warn!(%error, "admission reconciliation pass failed; next one retries");
            }
        }
    }

    pub async fn pass(&mut self) -> Result<PassReport, ReconcileError> {
        let mut report = PassReport::default();
        let vouchers: Vec<String> = self.redis.smembers(registry(&self.prefix)).await?;
        let vouchers: Vec<Uuid> = vouchers.iter().filter_map(|v| v.parse().ok()).collect();
        self.vouchers.retain(|voucher, _| vouchers.contains(voucher));
        for voucher_id in vouchers {
            self.reconcile(voucher_id, &mut report).await?;
        }
        Ok(report)
    }

    async fn reconcile(&mut self, voucher_id: Uuid, report: &mut PassReport) -> Result<(), ReconcileError> {
        let keys = VoucherKeys::new(&self.prefix, voucher_id);
        let shape = self.shape(&keys).await?;
        let buyers = self.vouchers.entry(voucher_id).or_default();
        if buyers.settled.as_ref() == Some(&shape) {
            return Ok(());
        }
        buyers.settled = None;
        report.walked += 1;
        // Judged once per walk: a buyer admitted during the walk is not due.
        let due =
            self.clock.now().timestamp_millis() - i64::try_from(self.config.grace.as_millis()).unwrap_or(i64::MAX);
        let mut seen = HashSet::new();
        let mut candidates: Vec<(Uuid, String)> = Vec::new();
        // Some buyer is not confirmed yet: too young, or sent again.
        let mut open = false;
        let mut cursor = 0_u64;
        loop {
            let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
                .arg(&keys.buyers)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.config.page.max(1))
                .query_async(&mut self.redis)
                .await?;
            let pause = self.config.pause(page.len());
            let buyers = self.vouchers.entry(voucher_id).or_default();
            for (user, order) in page {
                // an order id without a time cannot be judged or sent again:
                // not written by this edge's script
                let Some((order, at)) = order.parse::<Uuid>().ok().and_then(|o| Some((o, order_millis(o)?))) else {
                    continue;
                };
                if buyers.confirmed.contains(&order) {
                    continue;
                }
                if at > due {
                    open = true;
                } else if seen.insert(order) {
                    // (HSCAN may answer an entry twice while Redis rehashes)
                    candidates.push((order, user));
                }
            }
            if candidates.len() >= LOOKUP_CHUNK {
                open |= self.settle(voucher_id, std::mem::take(&mut candidates), report).await? > 0;
            }
            // the pause bounds the pass's rate over every voucher, the last
            // page of each included
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if !candidates.is_empty() {
            open |= self.settle(voucher_id, candidates, report).await? > 0;
        }
        // A hash that changed during the walk may hold buyers it did not see.
        if !open && self.shape(&keys).await? == shape {
            self.vouchers.entry(voucher_id).or_default().settled = Some(shape);
        }
        Ok(())
    }

    async fn shape(&mut self, keys: &VoucherKeys) -> Result<Shape, ReconcileError> {
        let len: usize = self.redis.hlen(&keys.buyers).await?;
        let loaded: (Option<String>, Option<String>) = self.redis.hmget(&keys.meta, &["loaded_at", "version"]).await?;
        Ok(Shape { len, loaded })
    }

    /// Looks the candidates up in the store: confirms the decided ones and
    /// sends the others again. Answers how many it sent.
    async fn settle(
        &mut self,
        voucher_id: Uuid,
        candidates: Vec<(Uuid, String)>,
        report: &mut PassReport,
    ) -> Result<usize, ReconcileError> {
        let mut resent = 0;
        for chunk in candidates.chunks(LOOKUP_CHUNK) {
            report.checked += chunk.len();
            let ids: Vec<String> = chunk.iter().map(|(order, _)| order.to_string()).collect();
            let existing = event_store::reconcile::existing(&self.pool, OrderEvent::AGGREGATE_TYPE, &ids).await?;
            let buyers = self.vouchers.entry(voucher_id).or_default();
            let mut missing = Vec::new();
            for (order, user) in chunk {
                if existing.contains(&order.to_string()) {
                    buyers.confirmed.insert(*order);
                } else {
                    missing.push((*order, user.clone()));
                }
            }
            if missing.is_empty() {
                continue;
            }
            tracing::warn!(
                %voucher_id, missing = missing.len(),
                "admitted requests without an order in the store: sending them again"
            );
            let sent = self.resend(voucher_id, &missing).await?;
            metrics::counter!("reconciler_repairs_total", "chain" => "admissions").increment(sent as u64);
            report.resent += sent;
            resent += sent;
        }
        Ok(resent)
    }

    async fn resend(&self, voucher_id: Uuid, missing: &[(Uuid, String)]) -> Result<usize, ReconcileError> {
        let bucket = self.clock.now().timestamp_millis() / 600_000;
        let subject = self.namespace.seckill_requests_subject();
        let messages: Vec<Outgoing> = missing
            .iter()
            .filter_map(|(order, user)| {
                let requested_at = Utc.timestamp_millis_opt(order_millis(*order)?).single()?;
                let request = OrderRequested {
                    order_id: *order,
                    voucher_id,
                    user_id: user.clone(),
                    requested_at,
                };
                let payload = Bytes::from(serde_json::to_vec(&request).ok()?);
                let mut message = Outgoing::new(&subject, format!("redrive:{order}:{bucket}"), payload);
                for (name, value) in request.headers() {
                    if name != MSG_ID {
                        message = message.header(name, value);
                    }
                }
                Some(message)
            })
            .collect();
        let sent = messages.len();
        self.publisher
            .publish_all(messages)
            .await
            .map_err(ReconcileError::Publish)?;
        Ok(sent)
    }
}
