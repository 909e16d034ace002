//! Where a voucher's state lives in Redis.
//!
//! Every key of one voucher carries the hash tag `{v<id>}`, so the admission
//! script's keys share one Redis Cluster slot; a test or a second deployment
//! on the same Redis uses its own prefix.

use uuid::Uuid;

/// The part of a voucher's keys before the suffix: `<prefix>sk:{v<id>}`.
pub fn base(prefix: &str, voucher_id: Uuid) -> String {
    format!("{prefix}sk:{{v{voucher_id}}}")
}

/// The suffixes of a voucher's keys.
pub const META: &str = ":meta";
pub const BUYERS: &str = ":users";
pub const RELEASED: &str = ":released";
pub const STREAM: &str = ":stream";

/// One user's `Idempotency-Key` answer on a voucher: `<base>:idem:<user>:<key>`.
pub fn idempotency(base: &str, user_id: &str, key: &str) -> String {
    format!("{base}:idem:{user_id}:{key}")
}

/// The keys of one seckill voucher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoucherKeys {
    base: String,
    pub meta: String,
    /// Hash user id → order id (a UUIDv7 of the request's time): one order per user, ever,
    /// and the record of every request this gate admitted.
    pub buyers: String,
    /// Set of order ids whose unit is settled (given back, or never real).
    pub released: String,
    /// The reservations hash of the older layout (order id → user), deleted
    /// when a voucher is loaded again.
    pub legacy_reservations: String,
    pub stream: String,
    /// Stream entries the forwarder could not read, kept for people to inspect.
    pub dead_letters: String,
}

impl VoucherKeys {
    pub fn new(prefix: &str, voucher_id: Uuid) -> Self {
        let base = base(prefix, voucher_id);
        Self {
            meta: format!("{base}{META}"),
            buyers: format!("{base}{BUYERS}"),
            released: format!("{base}{RELEASED}"),
            legacy_reservations: format!("{base}:res"),
            stream: format!("{base}{STREAM}"),
            dead_letters: format!("{base}:dead"),
            base,
        }
    }

    /// The stored answer of one user's `Idempotency-Key`.
    pub fn idempotency(&self, user_id: &str, key: &str) -> String {
        idempotency(&self.base, user_id, key)
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

/// The set of voucher ids that ever parked a dead letter: the registry
/// above forgets a voucher when its sale is over, its dead letters stay.
pub fn dead_letter_registry(prefix: &str) -> String {
    format!("{prefix}sk:dead-letters")
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
            &keys.buyers,
            &keys.released,
            &keys.legacy_reservations,
            &keys.stream,
            &keys.dead_letters,
            &keys.idempotency("u1", "k"),
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
        assert_ne!(dead_letter_registry("a:"), registry("a:"));
    }
}
