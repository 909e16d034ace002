//! The Redis side of the edge: the three Lua scripts and typed calls to them.
//!
//! Scripts are loaded once at start-up and run by SHA; `redis::Script`
//! reloads one the server answers NOSCRIPT to (after a restart or a
//! `SCRIPT FLUSH`).

use std::{sync::LazyLock, time::Duration};

use chrono::{DateTime, TimeZone as _, Utc};
use platform::telemetry::TraceHeaders;
use redis::{RedisError, Script, aio::ConnectionManager};
use uuid::Uuid;

use crate::{keys::VoucherKeys, ledger::VoucherSnapshot};

pub const ADMIT_LUA: &str = include_str!("../lua/admit.lua");
pub const LOAD_LUA: &str = include_str!("../lua/load.lua");
pub const RECREDIT_LUA: &str = include_str!("../lua/recredit.lua");

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
static LOAD: LazyLock<Script> = LazyLock::new(|| Script::new(LOAD_LUA));
static RECREDIT: LazyLock<Script> = LazyLock::new(|| Script::new(RECREDIT_LUA));

/// The consumer group every forwarder instance reads a voucher's stream with.
pub const FORWARDER_GROUP: &str = "forwarder";

/// The token bucket of each user on each voucher; `per_second == 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

/// What the admission script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted {
        order_id: Uuid,
        requested_at: DateTime<Utc>,
    },
    SoldOut,
    AlreadyPurchased,
    SaleNotStarted,
    SaleEnded,
    RateLimited {
        retry_after: Duration,
    },
    /// Nothing loaded for this voucher: unknown here, or Redis lost its data.
    Cold,
}

/// What settling a reservation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The unit went back to the sale.
    Recredited,
    /// The record was dropped; the sale gets nothing back.
    Dropped,
    /// No reservation for this order (already settled, or never held).
    NothingHeld,
    /// The voucher is not loaded; a re-warm reads the outcome from the event store.
    NotLoaded,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("the admission script answered {0:?}")]
    UnexpectedAnswer(String),
}

/// Typed access to one Redis (or cluster) holding the sales.
#[derive(Clone)]
pub struct Gate {
    redis: ConnectionManager,
    prefix: String,
    rate: RateLimit,
    idempotency_ttl: Duration,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("prefix", &self.prefix)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(
        redis: ConnectionManager,
        prefix: impl Into<String>,
        rate: RateLimit,
        idempotency_ttl: Duration,
    ) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            rate,
            idempotency_ttl,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn keys(&self, voucher_id: Uuid) -> VoucherKeys {
        VoucherKeys::new(&self.prefix, voucher_id)
    }

    pub fn connection(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// Loads every script so the first attempts of a sale run by SHA.
    pub async fn load_scripts(&self) -> Result<(), RedisError> {
        let mut redis = self.redis.clone();
        for script in [&*ADMIT, &*LOAD, &*RECREDIT] {
            script.prepare_invoke().load_async(&mut redis).await?;
        }
        Ok(())
    }

    pub async fn admit(
        &self,
        voucher_id: Uuid,
        user_id: &str,
        order_id: Uuid,
        idempotency_key: Option<&str>,
        trace: &TraceHeaders,
    ) -> Result<Admission, GateError> {
        let keys = self.keys(voucher_id);
        let idempotency = match idempotency_key {
            Some(key) => keys.idempotency(user_id, key),
            None => keys.no_idempotency(),
        };
        let mut invocation = ADMIT.prepare_invoke();
        invocation
            .key(&keys.meta)
            .key(&keys.users)
            .key(&keys.reservations)
            .key(&keys.stream)
            .key(keys.rate(user_id))
            .key(idempotency)
            .arg(user_id)
            .arg(order_id.to_string())
            .arg(trace.traceparent.as_deref().unwrap_or(""))
            .arg(trace.tracestate.as_deref().unwrap_or(""))
            .arg(self.rate.burst)
            .arg(self.rate.per_second)
            .arg(if idempotency_key.is_some() { "1" } else { "0" })
            .arg(u64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(u64::MAX));
        let (status, order, number): (String, String, i64) = invocation.invoke_async(&mut self.redis.clone()).await?;
        Ok(match status.as_str() {
            "admitted" => Admission::Admitted {
                order_id: order
                    .parse()
                    .map_err(|_| GateError::UnexpectedAnswer(format!("{status} {order}")))?,
                requested_at: from_millis(number),
            },
            "sold_out" => Admission::SoldOut,
            "already_purchased" => Admission::AlreadyPurchased,
            "sale_not_started" => Admission::SaleNotStarted,
            "sale_ended" => Admission::SaleEnded,
            "rate_limited" => Admission::RateLimited {
                retry_after: Duration::from_millis(number.unsigned_abs()),
            },
            "cold" => Admission::Cold,
            _ => return Err(GateError::UnexpectedAnswer(status)),
        })
    }

    /// Loads `snapshot` unless the voucher is live; `true` when it loaded.
    /// Also registers the voucher with the forwarders.
    pub async fn load(&self, snapshot: &VoucherSnapshot) -> Result<bool, RedisError> {
        let keys = self.keys(snapshot.voucher_id);
        let mut invocation = LOAD.prepare_invoke();
        invocation
            .key(&keys.meta)
            .key(&keys.users)
            .key(&keys.reservations)
            .key(&keys.stream)
            .arg(snapshot.stock)
            .arg(snapshot.left())
            .arg(snapshot.begins_at.timestamp_millis())
            .arg(snapshot.ends_at.timestamp_millis())
            .arg(snapshot.version)
            .arg(FORWARDER_GROUP);
        for buyer in &snapshot.buyers {
            invocation
                .arg(&buyer.user_id)
                .arg(buyer.order_id.to_string())
                .arg(if buyer.holds_unit { "1" } else { "0" })
                .arg(buyer.requested_at.timestamp_millis());
        }
        let mut redis = self.redis.clone();
        let loaded: i64 = invocation.invoke_async(&mut redis).await?;
        let _: i64 = redis::cmd("SADD")
            .arg(crate::keys::registry(&self.prefix))
            .arg(snapshot.voucher_id.to_string())
            .query_async(&mut redis)
            .await?;
        Ok(loaded == 1)
    }

    /// Settles the reservation of `order_id`, giving its unit back when `give_back`.
    pub async fn settle(&self, voucher_id: Uuid, order_id: Uuid, give_back: bool) -> Result<Settlement, RedisError> {
        let keys = self.keys(voucher_id);
        let answer: i64 = RECREDIT
            .prepare_invoke()
            .key(&keys.meta)
            .key(&keys.reservations)
            .arg(order_id.to_string())
            .arg(if give_back { "1" } else { "0" })
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match answer {
            1 => Settlement::Recredited,
            2 => Settlement::Dropped,
            -1 => Settlement::NotLoaded,
            _ => Settlement::NothingHeld,
        })
    }

    /// Units the gate still offers, `None` when the voucher is not loaded.
    pub async fn left(&self, voucher_id: Uuid) -> Result<Option<i64>, RedisError> {
        redis::cmd("HGET")
            .arg(self.keys(voucher_id).meta)
            .arg("left")
            .query_async(&mut self.redis.clone())
            .await
    }

    /// Whether the voucher's state is loaded.
    pub async fn is_loaded(&self, voucher_id: Uuid) -> Result<bool, RedisError> {
        redis::cmd("EXISTS")
            .arg(self.keys(voucher_id).meta)
            .query_async(&mut self.redis.clone())
            .await
    }
}

fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis).single().unwrap_or_else(Utc::now)
}
