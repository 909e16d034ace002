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

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use bytes::Bytes;
use chrono::{TimeZone as _, Utc};
use cp_nats::{Outgoing, Publisher};
use events::{AggregateEvents as _, Namespace, OrderEvent, OrderRequested, subjects::MSG_ID};
use platform::kv::Kv;
use redis::AsyncCommands as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    gate::order_millis,
    keys::{VoucherKeys, registry},
};

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub every: Duration,
    /// How old an admission must be before its order is looked for.
    pub grace: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(5),
            grace: Duration::from_secs(30),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub checked: usize,
    pub resent: usize,
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

pub struct AdmissionReconciler {
    redis: Kv,
    prefix: String,
    pool: PgPool,
    publisher: Publisher,
    namespace: Namespace,
    config: ReconcilerConfig,
    /// Per voucher, the order ids found in the store.
    confirmed: HashMap<Uuid, HashSet<Uuid>>,
}

impl std::fmt::Debug for AdmissionReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionReconciler")
            .field("config", &self.config)
            .field("vouchers", &self.confirmed.len())
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
    ) -> Self {
        Self {
            redis,
            prefix,
            pool,
            publisher,
            namespace,
            config,
            confirmed: HashMap::new(),
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.config.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(every.tick()).await.is_some() {
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "admission reconciliation pass failed; next one retries");
            }
        }
    }

    pub async fn pass(&mut self) -> Result<PassReport, ReconcileError> {
        let mut report = PassReport::default();
        let now = Utc::now().timestamp_millis();
        let due = now - i64::try_from(self.config.grace.as_millis()).unwrap_or(i64::MAX);
        let vouchers: Vec<String> = self.redis.smembers(registry(&self.prefix)).await?;
        let vouchers: Vec<Uuid> = vouchers.iter().filter_map(|v| v.parse().ok()).collect();
        self.confirmed.retain(|voucher, _| vouchers.contains(voucher));
        for voucher_id in vouchers {
            let keys = VoucherKeys::new(&self.prefix, voucher_id);
            let buyers: HashMap<String, String> = self.redis.hgetall(&keys.buyers).await?;
            let confirmed = self.confirmed.entry(voucher_id).or_default();
            let candidates: Vec<(Uuid, String)> = buyers
                .into_iter()
                .filter_map(|(user, order)| Some((order.parse::<Uuid>().ok()?, user)))
                .filter(|(order, _)| !confirmed.contains(order) && order_millis(*order).is_some_and(|at| at <= due))
                .collect();
            for chunk in candidates.chunks(1_000) {
                report.checked += chunk.len();
                let ids: Vec<String> = chunk.iter().map(|(order, _)| order.to_string()).collect();
                let existing = event_store::reconcile::existing(&self.pool, OrderEvent::AGGREGATE_TYPE, &ids).await?;
                let mut missing = Vec::new();
                for (order, user) in chunk {
                    if existing.contains(&order.to_string()) {
                        confirmed.insert(*order);
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
                let bucket = now / 600_000;
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
                metrics::counter!("reconciler_repairs_total", "chain" => "admissions").increment(sent as u64);
                report.resent += sent;
            }
        }
        Ok(report)
    }
}
