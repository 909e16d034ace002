//! The Redis side of the edge: the three Lua scripts and typed calls to them.
//!
//! Scripts are loaded once at start-up and run by SHA; `redis::Script`
//! reloads one the server answers NOSCRIPT to (after a restart or a
//! `SCRIPT FLUSH`). Attempts are stamped with the injected clock, which the
//! script judges the sale window by. With replicas required
//! ([`Gate::with_replicas`]), an admission is answered only once a replica
//! holds it (`WAIT`), so a failover loses no 202.

use std::{
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use chrono::{DateTime, TimeZone as _, Utc};
use platform::kv::Kv;
use platform::{clock::SharedClock, telemetry::TraceHeaders};
use redis::{RedisError, Script, Value};
use uuid::{Timestamp, Uuid, timestamp::context::ContextV7};

use crate::{
    keys::{self, VoucherKeys},
    ledger::VoucherSnapshot,
    replication::ReplicaWaits,
};

pub const ADMIT_LUA: &str = include_str!("../lua/admit.lua");
pub const LOAD_LUA: &str = include_str!("../lua/load.lua");
pub const RECREDIT_LUA: &str = include_str!("../lua/recredit.lua");

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
static LOAD: LazyLock<Script> = LazyLock::new(|| Script::new(LOAD_LUA));
static RECREDIT: LazyLock<Script> = LazyLock::new(|| Script::new(RECREDIT_LUA));

/// The key layout the scripts write (`meta.layout`); a voucher loaded by an
/// older edge counts as not loaded and is rebuilt from the event store.
pub const LAYOUT: &str = "2";

/// The consumer group every forwarder instance reads a voucher's stream with.
pub const FORWARDER_GROUP: &str = "forwarder";

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
    /// Nothing loaded for this voucher: unknown here, or Redis lost its data.
    Cold,
}

/// What settling a reservation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The unit went back to the sale.
    Recredited,
    /// Marked settled; the sale gets nothing back.
    Dropped,
    /// This gate holds no unit for this order (already settled, or never held).
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
    /// The admission is on the primary but fewer replicas than required
    /// acknowledged it in time: a failover now could lose it, so it is not
    /// promised with a 202.
    #[error("the admission reached {acknowledged} of {required} replicas in time")]
    NotReplicated { acknowledged: i64, required: u16 },
}

/// Typed access to one Redis (or cluster) holding the sales.
#[derive(Clone)]
pub struct Gate {
    redis: Kv,
    prefix: Arc<str>,
    idempotency_ttl: Duration,
    clock: SharedClock,
    /// Replicas that must hold an admission before it is answered (0: none).
    replicas: u16,
    /// Present when `replicas > 0`.
    replication: Option<ReplicaWaits>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("prefix", &self.prefix)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(redis: Kv, prefix: impl Into<String>, idempotency_ttl: Duration, clock: SharedClock) -> Self {
        Self {
            redis,
            prefix: Arc::from(prefix.into()),
            idempotency_ttl,
            clock,
            replicas: 0,
            replication: None,
        }
    }

    /// Every admission waits (`WAIT`) until `replicas` replicas of its
    /// voucher's primary hold it, at most `timeout`, before it is answered:
    /// Redis replicates asynchronously, and a failover promotes a replica,
    /// so without this an admission already answered 202 can vanish with
    /// its primary. Not reached in time: the attempt fails with
    /// [`GateError::NotReplicated`] (the user is told to retry). The
    /// admissions of a voucher share their `WAIT`s ([`ReplicaWaits`]).
    pub fn with_replicas(mut self, replicas: u16, timeout: Duration) -> Self {
        self.replicas = replicas;
        self.replication = (replicas > 0).then(|| ReplicaWaits::new(self.redis.clone(), replicas, timeout));
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn keys(&self, voucher_id: Uuid) -> VoucherKeys {
        VoucherKeys::new(&self.prefix, voucher_id)
    }

    pub fn connection(&self) -> Kv {
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

    /// A new order id: a UUIDv7 of the clock's now, so ids sort by admission
    /// and the id carries its request's time (the stream entry does not).
    pub fn new_order_id(&self) -> Uuid {
        static CONTEXT: LazyLock<Mutex<ContextV7>> = LazyLock::new(|| Mutex::new(ContextV7::new()));
        let now = self.clock.now();
        let seconds = u64::try_from(now.timestamp()).unwrap_or(0);
        Uuid::new_v7(Timestamp::from_unix(&*CONTEXT, seconds, now.timestamp_subsec_nanos()))
    }

    /// Runs the admission script for one attempt, at the time in `order_id`
    /// (see [`Self::new_order_id`]; the clock's now for an id without one).
    pub async fn admit(
        &self,
        voucher_id: Uuid,
        user_id: &str,
        order_id: Uuid,
        idempotency_key: Option<&str>,
        trace: &TraceHeaders,
    ) -> Result<Admission, GateError> {
        // only the keys the script takes: this runs for every attempt
        let mut key = keys::base(&self.prefix, voucher_id);
        let base = key.len();
        let now = order_millis(order_id).unwrap_or_else(|| self.clock.now().timestamp_millis());
        let mut invocation = ADMIT.prepare_invoke();
        for suffix in [keys::META, keys::BUYERS, keys::STREAM] {
            key.truncate(base);
            key.push_str(suffix);
            invocation.key(key.as_str());
        }
        if let Some(idempotency_key) = idempotency_key {
            invocation.key(keys::idempotency(&key[..base], user_id, idempotency_key));
        }
        invocation
            .arg(user_id)
            .arg(order_id.to_string())
            .arg(now)
            .arg(trace.traceparent.as_deref().unwrap_or(""))
            .arg(trace.tracestate.as_deref().unwrap_or(""));
        if idempotency_key.is_some() {
            invocation.arg(u64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(u64::MAX));
        }
        let answer: Value = invocation.invoke_async(&mut self.redis.clone()).await?;
        let admission = Self::admission_of_answer(answer, order_id, now)?;
        if let Some(replication) = &self.replication
            && matches!(admission, Admission::Admitted { .. })
        {
            key.truncate(base);
            key.push_str(keys::META);
            // no answer: the wait's task died; not known to be replicated
            let acknowledged = replication.acknowledged(&key).await.transpose()?.unwrap_or(0);
            if acknowledged < i64::from(self.replicas) {
                metrics::counter!("seckill_unreplicated_admissions_total").increment(1);
                return Err(GateError::NotReplicated {
                    acknowledged,
                    required: self.replicas,
                });
            }
        }
        Ok(admission)
    }

    fn admission_of_answer(answer: Value, order_id: Uuid, now: i64) -> Result<Admission, GateError> {
        match answer {
            Value::Int(code) => admission_of(code, order_id, now),
            // an Idempotency-Key seen before: "<code> <order id> <requested ms>"
            Value::BulkString(bytes) => {
                let stored = String::from_utf8_lossy(&bytes);
                let mut parts = stored.split(' ');
                let unexpected = || GateError::UnexpectedAnswer(stored.to_string());
                let code = parts.next().and_then(|p| p.parse().ok()).ok_or_else(unexpected)?;
                let order = parts.next().ok_or_else(unexpected)?;
                let at = parts.next().and_then(|p| p.parse().ok()).ok_or_else(unexpected)?;
                let order_id = if code == 0 {
                    order.parse().map_err(|_| unexpected())?
                } else {
                    order_id
                };
                admission_of(code, order_id, at)
            }
            other => Err(GateError::UnexpectedAnswer(format!("{other:?}"))),
        }
    }

    /// Loads `snapshot` unless the voucher is live; `true` when it loaded.
    /// Also registers the voucher with the forwarders.
    pub async fn load(&self, snapshot: &VoucherSnapshot) -> Result<bool, RedisError> {
        let keys = self.keys(snapshot.voucher_id);
        let mut invocation = LOAD.prepare_invoke();
        invocation
            .key(&keys.meta)
            .key(&keys.buyers)
            .key(&keys.released)
            .key(&keys.stream)
            .key(&keys.legacy_reservations)
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
                .arg(if buyer.holds_unit { "1" } else { "0" });
        }
        let mut redis = self.redis.clone();
        let loaded: i64 = invocation.invoke_async(&mut redis).await?;
        let _: i64 = redis::cmd("SADD")
            .arg(keys::registry(&self.prefix))
            .arg(snapshot.voucher_id.to_string())
            .query_async(&mut redis)
            .await?;
        Ok(loaded == 1)
    }

    /// Settles the unit of `user_id`'s order `order_id`, giving it back to
    /// the sale when `give_back`; once per order, however often it is called.
    pub async fn settle(
        &self,
        voucher_id: Uuid,
        order_id: Uuid,
        user_id: &str,
        give_back: bool,
    ) -> Result<Settlement, RedisError> {
        let keys = self.keys(voucher_id);
        let answer: i64 = RECREDIT
            .prepare_invoke()
            .key(&keys.meta)
            .key(&keys.buyers)
            .key(&keys.released)
            .arg(order_id.to_string())
            .arg(user_id)
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

    /// Whether the voucher's state is loaded (in this layout).
    pub async fn is_loaded(&self, voucher_id: Uuid) -> Result<bool, RedisError> {
        let layout: Option<String> = redis::cmd("HGET")
            .arg(self.keys(voucher_id).meta)
            .arg("layout")
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(layout.as_deref() == Some(LAYOUT))
    }
}

/// The unix milliseconds in a UUIDv7 (`None` for other versions).
pub fn order_millis(order_id: Uuid) -> Option<i64> {
    let (seconds, nanos) = order_id.get_timestamp()?.to_unix();
    i64::try_from(seconds.checked_mul(1_000)? + u64::from(nanos / 1_000_000)).ok()
}

/// The script's answer codes (`lua/admit.lua`).
fn admission_of(code: i64, order_id: Uuid, at_millis: i64) -> Result<Admission, GateError> {
    Ok(match code {
        0 => Admission::Admitted {
            order_id,
            requested_at: from_millis(at_millis),
        },
        1 => Admission::Cold,
        2 => Admission::SaleNotStarted,
        3 => Admission::SaleEnded,
        4 => Admission::AlreadyPurchased,
        5 => Admission::SoldOut,
        other => return Err(GateError::UnexpectedAnswer(other.to_string())),
    })
}

fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis).single().unwrap_or_else(Utc::now)
}
