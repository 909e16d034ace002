//! What one edge process remembers about vouchers so most attempts never
//! reach Redis: "sold out" (short-lived, cleared when this process re-credits
//! a unit) and "no such seckill voucher".
//!
//! Other instances learn of a re-credit when their flag expires, so the TTL
//! bounds how long a returned unit can go unoffered by them.

use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};

use uuid::Uuid;

/// Above this many entries, expired ones are dropped on the next insert.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug)]
pub struct VoucherFlags {
    sold_out_ttl: Duration,
    unknown_ttl: Duration,
    sold_out: RwLock<HashMap<Uuid, Instant>>,
    unknown: RwLock<HashMap<Uuid, Instant>>,
}

impl VoucherFlags {
    pub fn new(sold_out_ttl: Duration, unknown_ttl: Duration) -> Self {
        Self {
            sold_out_ttl,
            unknown_ttl,
            sold_out: RwLock::default(),
            unknown: RwLock::default(),
        }
    }

    pub fn is_sold_out(&self, voucher_id: Uuid) -> bool {
        is_set(&self.sold_out, voucher_id)
    }

    pub fn mark_sold_out(&self, voucher_id: Uuid) {
        set(&self.sold_out, voucher_id, self.sold_out_ttl);
    }

    pub fn clear_sold_out(&self, voucher_id: Uuid) {
        clear(&self.sold_out, voucher_id);
    }

    pub fn is_unknown(&self, voucher_id: Uuid) -> bool {
        is_set(&self.unknown, voucher_id)
    }

    pub fn mark_unknown(&self, voucher_id: Uuid) {
        set(&self.unknown, voucher_id, self.unknown_ttl);
    }

    pub fn clear_unknown(&self, voucher_id: Uuid) {
        clear(&self.unknown, voucher_id);
    }
}

fn is_set(map: &RwLock<HashMap<Uuid, Instant>>, voucher_id: Uuid) -> bool {
    let map = map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    map.get(&voucher_id).is_some_and(|until| Instant::now() < *until)
}

fn set(map: &RwLock<HashMap<Uuid, Instant>>, voucher_id: Uuid, ttl: Duration) {
    if ttl.is_zero() {
        return;
    }
    let now = Instant::now();
    let mut map = map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.len() >= PRUNE_ABOVE {
        map.retain(|_, until| *until > now);
    }
    map.insert(voucher_id, now + ttl);
}

fn clear(map: &RwLock<HashMap<Uuid, Instant>>, voucher_id: Uuid) {
    map.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&voucher_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_holds_until_it_expires_or_is_cleared() {
        let flags = VoucherFlags::new(Duration::from_millis(50), Duration::from_secs(60));
        let id = Uuid::from_u128(1);
        assert!(!flags.is_sold_out(id));
        flags.mark_sold_out(id);
        assert!(flags.is_sold_out(id));
        assert!(!flags.is_sold_out(Uuid::from_u128(2)));
        flags.clear_sold_out(id);
        assert!(!flags.is_sold_out(id));
        flags.mark_sold_out(id);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!flags.is_sold_out(id));
    }

    #[test]
    fn a_zero_ttl_turns_a_flag_off() {
        let flags = VoucherFlags::new(Duration::ZERO, Duration::ZERO);
        flags.mark_sold_out(Uuid::from_u128(1));
        flags.mark_unknown(Uuid::from_u128(1));
        assert!(!flags.is_sold_out(Uuid::from_u128(1)));
        assert!(!flags.is_unknown(Uuid::from_u128(1)));
    }

    #[test]
    fn expired_entries_are_pruned_when_the_map_grows() {
        let flags = VoucherFlags::new(Duration::from_millis(1), Duration::from_secs(60));
        for i in 0..PRUNE_ABOVE as u128 {
            flags.mark_sold_out(Uuid::from_u128(i));
        }
        std::thread::sleep(Duration::from_millis(5));
        flags.mark_sold_out(Uuid::from_u128(u128::MAX));
        assert_eq!(flags.sold_out.read().unwrap().len(), 1);
    }
}
