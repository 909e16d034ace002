//! The per-user attempt limit, kept in this process rather than in Redis.
//!
//! A token bucket per (voucher, user) in Redis cost a read and two writes on
//! every attempt, about a quarter of the admission script's time (2026-11-29,
//! docs/SECKILL_EDGE.md). Here it costs a map lookup, and a flood from one
//! user never reaches Redis. The limit is per edge instance: behind a load
//! balancer spreading one user over N instances, a user gets up to N times
//! it. It guards Redis from floods; fairness (one order per user) is the
//! script's and the event store's job, not this one's.

use std::{hash::BuildHasher as _, num::NonZeroU32, time::Duration};

use governor::{
    Quota, RateLimiter,
    clock::{Clock as _, DefaultClock},
    state::keyed::DashMapStateStore,
};
use uuid::Uuid;

/// A burst of attempts per user and voucher, refilled at `per_second`;
/// `per_second == 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
}

impl RateLimit {
    pub const OFF: Self = Self {
        burst: 1,
        per_second: 0.0,
    };

    fn quota(self) -> Option<Quota> {
        if !self.per_second.is_finite() || self.per_second <= 0.0 {
            return None;
        }
        // 1 ns at the least: a rate beyond 10^9/s is no limit worth a lookup
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        Some(Quota::with_period(period)?.allow_burst(NonZeroU32::new(self.burst.max(1))?))
    }
}

/// A bucket's key: the voucher and a 64-bit hash of the user id, so a check
/// allocates nothing. Two users whose ids collide (about one pair in 10^7
/// among a million users) share a bucket: each gets less, never more.
type Key = (Uuid, u64);

/// The buckets, hashed with foldhash (seeded per process) rather than
/// SipHash: the keys are user ids of verified tokens.
type Buckets = RateLimiter<Key, DashMapStateStore<Key, foldhash::quality::RandomState>, DefaultClock>;

/// Attempts allowed so far, per (voucher, user).
pub struct AttemptLimiter {
    limiter: Option<Buckets>,
    /// Seeded per process, like the map's own hasher.
    users: foldhash::quality::RandomState,
    rate: RateLimit,
}

impl std::fmt::Debug for AttemptLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptLimiter")
            .field("rate", &self.rate)
            .field("tracked", &self.tracked())
            .finish()
    }
}

impl AttemptLimiter {
    pub fn new(rate: RateLimit) -> Self {
        Self {
            limiter: rate
                .quota()
                .map(|quota| RateLimiter::dashmap_with_hasher(quota, foldhash::quality::RandomState::default())),
            users: foldhash::quality::RandomState::default(),
            rate,
        }
    }

    /// Takes one attempt of `user_id` on `voucher_id`, or answers how long
    /// until the next one is allowed.
    pub fn check(&self, voucher_id: Uuid, user_id: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&(voucher_id, self.users.hash_one(user_id)))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets users whose bucket is full again (they would start afresh
    /// anyway), so memory follows the users active in the last seconds.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// (voucher, user) pairs currently tracked.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_the_burst_then_waits_while_others_are_untouched() {
        let limiter = AttemptLimiter::new(RateLimit {
            burst: 3,
            per_second: 1.0,
        });
        let voucher = Uuid::from_u128(1);
        for _ in 0..3 {
            assert_eq!(limiter.check(voucher, "ann"), Ok(()));
        }
        let wait = limiter.check(voucher, "ann").expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        // another user, and the same user on another voucher, have their own buckets
        assert_eq!(limiter.check(voucher, "bob"), Ok(()));
        assert_eq!(limiter.check(Uuid::from_u128(2), "ann"), Ok(()));
        assert_eq!(limiter.tracked(), 3);
    }

    #[test]
    fn a_bucket_refills_and_idle_users_are_forgotten() {
        let limiter = AttemptLimiter::new(RateLimit {
            burst: 1,
            per_second: 50.0,
        });
        let voucher = Uuid::from_u128(1);
        assert_eq!(limiter.check(voucher, "ann"), Ok(()));
        assert!(limiter.check(voucher, "ann").is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(limiter.check(voucher, "ann"), Ok(()));
        std::thread::sleep(Duration::from_millis(40));
        limiter.forget_idle();
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn no_rate_or_a_nonsense_rate_means_no_limit() {
        for per_second in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let limiter = AttemptLimiter::new(RateLimit { burst: 1, per_second });
            for _ in 0..100 {
                assert_eq!(limiter.check(Uuid::from_u128(1), "ann"), Ok(()));
            }
            assert_eq!(limiter.tracked(), 0);
        }
    }
}
