//! Where a voucher's state lives in Redis.
//!
//! Every key of one voucher carries the hash tag `{v<id>}`, so the admission
//! script's keys share one Redis Cluster slot; a test or a second deployment
//! on the same Redis uses its own prefix.

use uuid::Uuid;

/// The keys of one seckill voucher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoucherKeys {
    base: String,
    pub meta: String,
    pub users: String,
    pub reservations: String,
    pub stream: String,
    /// Stream entries the forwarder could not read, kept for people to inspect.
    pub dead_letters: String,
}

impl VoucherKeys {
    pub fn new(prefix: &str, voucher_id: Uuid) -> Self {
        let base = format!("{prefix}sk:{{v{voucher_id}}}");
        Self {
            meta: format!("{base}:meta"),
            users: format!("{base}:users"),
            reservations: format!("{base}:res"),
            stream: format!("{base}:stream"),
            dead_letters: format!("{base}:dead"),
            base,
        }
    }

    /// One user's token bucket for this voucher: in the voucher's slot, so the
    /// rate limit costs no extra round trip.
    pub fn rate(&self, user_id: &str) -> String {
        format!("{}:rl:{user_id}", self.base)
    }

    /// The stored answer of one user's `Idempotency-Key`.
    pub fn idempotency(&self, user_id: &str, key: &str) -> String {
        format!("{}:idem:{user_id}:{key}", self.base)
    }

    /// Stands in for [`Self::idempotency`] when the request has no key (a
    /// script's keys must all be in one slot, an empty name is not).
    pub fn no_idempotency(&self) -> String {
        format!("{}:idem:-", self.base)
    }

    /// Held by the one edge instance that is re-warming this voucher.
    pub fn warming(&self) -> String {
        format!("{}:warming", self.base)
    }
}

/// The set of voucher ids whose streams the forwarders read.
pub fn registry(prefix: &str) -> String {
    format!("{prefix}sk:vouchers")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tag(key: &str) -> &str {
        let open = key.find('{').expect("hash tag");
        let close = key[open..].find('}').expect("closed hash tag") + open;
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_a_voucher_shares_its_hash_tag() {
        let id = Uuid::from_u128(7);
        let keys = VoucherKeys::new("cp:", id);
        let tag = format!("v{id}");
        for key in [
            &keys.meta,
            &keys.users,
            &keys.reservations,
            &keys.stream,
            &keys.dead_letters,
            &keys.rate("u1"),
            &keys.idempotency("u1", "k"),
            &keys.no_idempotency(),
            &keys.warming(),
        ] {
            assert!(key.starts_with("cp:sk:"), "{key}");
            assert_eq!(slot_tag(key), tag, "{key}");
        }
    }

    #[test]
    fn prefixes_keep_deployments_apart() {
        let id = Uuid::from_u128(7);
        assert_ne!(VoucherKeys::new("a:", id).meta, VoucherKeys::new("b:", id).meta);
        assert_ne!(registry("a:"), registry("b:"));
    }
}
