//! Warm-up, re-warm and re-credit: keeping the gate in step with the event
//! store, which is the truth.
//!
//! - [`Warmer::ensure`] loads a voucher that Redis does not hold, from the
//!   voucher's events (stock, window, buyers, units still held). It serves
//!   both the warm-up when a seckill voucher is created and the re-warm after
//!   Redis lost its data. One instance rebuilds (a Redis lock), after the
//!   claim writer has decided every request already forwarded, so the
//!   rebuild sees them; the load never overwrites live state.
//! - [`SaleEvents`] consumes the Voucher events stream: `VoucherCreated`
//!   (seckill) warms up, `SeckillStockReleased` gives the unit back once per
//!   order, and a claim the event store refused settles its reservation.

use std::{
    hash::{BuildHasher as _, RandomState},
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use cp_nats::{Handler, HandlerError};
use events::{ClaimRejection, EnvelopeError, EventEnvelope, Namespace, VoucherEvent, subjects::CLAIM_WRITER_CONSUMER};
use redis::Script;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    flags::VoucherFlags,
    gate::{Gate, Settlement},
    ledger::{self, Ledger},
};

/// A crashed warmer's lock expires after this long.
const WARMING_LOCK_TTL: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
const STRIPES: usize = 64;

static RELEASE_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
});

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("event store: {0}")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Decode(#[from] EnvelopeError),
    #[error("the voucher's history")]
    History(#[from] event_store::read::ReadError),
    #[error("jetstream: {0}")]
    Nats(String),
}

/// Whether a voucher can take attempts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmth {
    Ready,
    /// No seckill voucher with this id in the event store.
    Unknown,
    /// Another instance is rebuilding it and did not finish in time.
    Busy,
}

#[derive(Debug, Clone)]
pub struct WarmerConfig {
    /// How long a re-warm waits for the claim writer to decide what was
    /// already forwarded before it rebuilds anyway.
    pub drain_timeout: Duration,
    /// How long a caller waits for another instance's rebuild.
    pub wait: Duration,
}

impl Default for WarmerConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(5),
            wait: Duration::from_secs(2),
        }
    }
}

pub struct Warmer {
    gate: Gate,
    pool: PgPool,
    js: jetstream::Context,
    namespace: Namespace,
    config: WarmerConfig,
    /// One rebuild per voucher at a time in this process, without a map
    /// that attackers could grow with made-up ids.
    stripes: Vec<tokio::sync::Mutex<()>>,
    hasher: RandomState,
}

impl std::fmt::Debug for Warmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer")
            .field("namespace", &self.namespace)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Warmer {
    pub fn new(gate: Gate, pool: PgPool, js: jetstream::Context, namespace: Namespace, config: WarmerConfig) -> Self {
        Self {
            gate,
            pool,
            js,
            namespace,
            config,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Makes sure Redis holds the voucher, rebuilding it from the event store
    /// when it does not.
    pub async fn ensure(&self, voucher_id: Uuid) -> Result<Warmth, WarmError> {
        let stripe = usize::try_from(self.hasher.hash_one(voucher_id)).unwrap_or_default() % STRIPES;
        let _local = self.stripes[stripe].lock().await;
        if self.gate.is_loaded(voucher_id).await? {
            return Ok(Warmth::Ready);
        }
        let lock = self.gate.keys(voucher_id).warming();
        let token = Uuid::new_v4().to_string();
        let mut redis = self.gate.connection();
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(WARMING_LOCK_TTL.as_millis()).unwrap_or(30_000))
            .query_async(&mut redis)
            .await?;
        if acquired.is_none() {
            return self.wait_for_other(voucher_id).await;
        }
        let rebuilt = self.rebuild(voucher_id).await;
        let released: Result<i64, _> = RELEASE_LOCK
            .prepare_invoke()
            .key(&lock)
            .arg(&token)
            .invoke_async(&mut redis)
            .await;
        if let Err(error) = released {
            tracing::warn!(%voucher_id, %error, "could not release the warming lock; it expires");
        }
        rebuilt
    }

    async fn wait_for_other(&self, voucher_id: Uuid) -> Result<Warmth, WarmError> {
        let deadline = Instant::now() + self.config.wait;
        while Instant::now() < deadline {
            if self.gate.is_loaded(voucher_id).await? {
                return Ok(Warmth::Ready);
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(Warmth::Busy)
    }

    async fn rebuild(&self, voucher_id: Uuid) -> Result<Warmth, WarmError> {
        // a cheap answer for made-up ids before waiting on anything
        if !matches!(read_ledger(&self.pool, voucher_id).await?, Ledger::Seckill(_)) {
            return Ok(Warmth::Unknown);
        }
        if !self.claim_writer_drained().await? {
            metrics::counter!("seckill_rewarm_undrained_total").increment(1);
            tracing::warn!(
                %voucher_id,
                "the claim writer did not catch up in time; rebuilding anyway (the event store still guards the stock)"
            );
        }
        let Ledger::Seckill(snapshot) = read_ledger(&self.pool, voucher_id).await? else {
            return Ok(Warmth::Unknown);
        };
        if self.gate.load(&snapshot).await? {
            metrics::counter!("seckill_warmups_total").increment(1);
            tracing::info!(
                %voucher_id,
                version = snapshot.version,
                left = snapshot.left(),
                buyers = snapshot.buyers.len(),
                "voucher loaded into the gate"
            );
        }
        Ok(Warmth::Ready)
    }

    /// True once the claim writer has acked every request that was on the
    /// seckill stream when this was called, false on timeout.
    async fn claim_writer_drained(&self) -> Result<bool, WarmError> {
        let stream = match self.js.get_stream(self.namespace.seckill_requests_stream()).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "no seckill requests stream: nothing to wait for");
                return Ok(true);
            }
        };
        let last = stream
            .get_info()
            .await
            .map_err(|e| WarmError::Nats(e.to_string()))?
            .state
            .last_sequence;
        let deadline = Instant::now() + self.config.drain_timeout;
        loop {
            match stream.consumer_info(CLAIM_WRITER_CONSUMER).await {
                Ok(info) if info.ack_floor.stream_sequence >= last => return Ok(true),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "no claim writer consumer: nothing decides requests yet");
                    return Ok(true);
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The voucher's events from the event store, folded for the gate.
pub async fn read_ledger(pool: &PgPool, voucher_id: Uuid) -> Result<Ledger, WarmError> {
    let history = event_store::read::aggregate_events::<VoucherEvent>(pool, &voucher_id.to_string()).await?;
    Ok(ledger::fold(voucher_id, history))
}

/// The edge's consumer of Voucher events.
#[derive(Debug, Clone)]
pub struct SaleEvents {
    pub warmer: Arc<Warmer>,
    pub gate: Gate,
    pub flags: Arc<VoucherFlags>,
}

impl SaleEvents {
    async fn settle(
        &self,
        voucher_id: Uuid,
        order_id: Uuid,
        user_id: &str,
        give_back: bool,
    ) -> Result<(), HandlerError> {
        let settlement = self.gate.settle(voucher_id, order_id, user_id, give_back).await?;
        if settlement == Settlement::Recredited {
            self.flags.clear_sold_out(voucher_id);
            metrics::counter!("seckill_recredits_total").increment(1);
            tracing::info!(%voucher_id, %order_id, "unit returned to the sale");
        }
        Ok(())
    }
}

impl Handler for SaleEvents {
    /// A message that is not a Voucher event it can read can never succeed:
    /// it is dead-lettered at once. Redis or the store being away is retried.
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandlerError> {
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload).map_err(cp_nats::permanent)?;
        if envelope.aggregate_type != <VoucherEvent as events::AggregateEvents>::AGGREGATE_TYPE {
            return Ok(());
        }
        let voucher_id: Uuid = envelope.aggregate_id.parse().map_err(cp_nats::permanent)?;
        match envelope.decode::<VoucherEvent>().map_err(cp_nats::permanent)? {
            VoucherEvent::VoucherCreated {
                kind: events::VoucherKind::Seckill,
                ..
            } => {
                // Rebuilt from the store, not from this event: a replay of an
                // old VoucherCreated must not offer the whole stock again.
                let warmth = self.warmer.ensure(voucher_id).await?;
                if warmth == Warmth::Ready {
                    self.flags.clear_unknown(voucher_id);
                }
            }
            VoucherEvent::SeckillStockReleased { order_id, user_id } => {
                self.settle(voucher_id, order_id, &user_id, true).await?;
            }
            VoucherEvent::SeckillClaimRejected {
                order_id,
                user_id,
                reason,
            } => {
                // Sold out in the store: the unit the gate took does not exist.
                self.settle(voucher_id, order_id, &user_id, reason != ClaimRejection::SoldOut)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
