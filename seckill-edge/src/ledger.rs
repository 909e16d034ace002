//! What the gate must hold for a voucher, folded from the voucher's events:
//! the pure half of warm-up and re-warm (the event store read and the Redis
//! load are at the edges, in [`crate::warmup`] and [`crate::gate`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use events::{VoucherEvent, VoucherKind};
use uuid::Uuid;

/// A user whose claim the event store accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buyer {
    pub user_id: String,
    pub order_id: Uuid,
    /// False once the order released its unit; the user keeps the mark.
    pub holds_unit: bool,
    pub requested_at: DateTime<Utc>,
}

/// A seckill voucher as the gate loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoucherSnapshot {
    pub voucher_id: Uuid,
    pub stock: u32,
    pub begins_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// The voucher's sequence in the event store this snapshot reflects.
    pub version: u64,
    pub buyers: Vec<Buyer>,
}

impl VoucherSnapshot {
    /// Units still for sale: stock minus units held by orders.
    pub fn left(&self) -> u32 {
        let held = self.buyers.iter().filter(|b| b.holds_unit).count();
        self.stock.saturating_sub(u32::try_from(held).unwrap_or(u32::MAX))
    }
}

/// What the event store says about a voucher id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ledger {
    Unknown,
    NotSeckill,
    Seckill(VoucherSnapshot),
}

/// Folds a voucher's events, in sequence order, into what the gate needs.
pub fn fold(voucher_id: Uuid, events: impl IntoIterator<Item = (u64, VoucherEvent)>) -> Ledger {
    let mut ledger = Ledger::Unknown;
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    for (sequence, event) in events {
        match (&mut ledger, event) {
            (
                Ledger::Unknown,
                VoucherEvent::VoucherCreated {
                    kind: VoucherKind::Seckill,
                    stock: Some(stock),
                    begins_at,
                    ends_at,
                    ..
                },
            ) => {
                ledger = Ledger::Seckill(VoucherSnapshot {
                    voucher_id,
                    stock,
                    begins_at,
                    ends_at,
                    version: sequence,
                    buyers: Vec::new(),
                });
            }
            (Ledger::Unknown, VoucherEvent::VoucherCreated { .. }) => ledger = Ledger::NotSeckill,
            (Ledger::Seckill(snapshot), event) => {
                snapshot.version = sequence;
                match event {
                    VoucherEvent::SeckillClaimAccepted {
                        order_id,
                        user_id,
                        requested_at,
                    } => {
                        index.entry(order_id).or_insert_with(|| {
                            snapshot.buyers.push(Buyer {
                                user_id,
                                order_id,
                                holds_unit: true,
                                requested_at,
                            });
                            snapshot.buyers.len() - 1
                        });
                    }
                    VoucherEvent::SeckillStockReleased { order_id, .. } => {
                        if let Some(&at) = index.get(&order_id) {
                            snapshot.buyers[at].holds_unit = false;
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    ledger
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn at(second: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
    }

    fn created(kind: VoucherKind, stock: Option<u32>) -> VoucherEvent {
        VoucherEvent::VoucherCreated {
            voucher_id: Uuid::from_u128(1),
            merchant_id: "m".into(),
            title: "t".into(),
            kind,
            price_cents: 100,
            value_cents: 500,
            min_spend_cents: 0,
            stock,
            begins_at: at(0),
            ends_at: at(3600),
        }
    }

    fn accepted(order: u128, user: &str) -> VoucherEvent {
        VoucherEvent::SeckillClaimAccepted {
            order_id: Uuid::from_u128(order),
            user_id: user.into(),
            requested_at: at(10),
        }
    }

    fn sequenced(events: Vec<VoucherEvent>) -> Vec<(u64, VoucherEvent)> {
        (1..).zip(events).collect()
    }

    fn snapshot(ledger: Ledger) -> VoucherSnapshot {
        match ledger {
            Ledger::Seckill(snapshot) => snapshot,
            other => panic!("expected a seckill voucher, got {other:?}"),
        }
    }

    #[test]
    fn no_events_is_an_unknown_voucher() {
        assert_eq!(fold(Uuid::from_u128(1), Vec::new()), Ledger::Unknown);
    }

    #[test]
    fn a_regular_voucher_is_not_for_the_gate() {
        let events = sequenced(vec![created(VoucherKind::Regular, None)]);
        assert_eq!(fold(Uuid::from_u128(1), events), Ledger::NotSeckill);
    }

    #[test]
    fn a_new_seckill_voucher_offers_its_whole_stock() {
        let snapshot = snapshot(fold(
            Uuid::from_u128(1),
            sequenced(vec![created(VoucherKind::Seckill, Some(10))]),
        ));
        assert_eq!((snapshot.stock, snapshot.left(), snapshot.version), (10, 10, 1));
        assert_eq!((snapshot.begins_at, snapshot.ends_at), (at(0), at(3600)));
        assert!(snapshot.buyers.is_empty());
    }

    #[test]
    fn accepted_claims_hold_units_and_releases_give_them_back_but_keep_the_buyer() {
        let events = sequenced(vec![
            created(VoucherKind::Seckill, Some(3)),
            accepted(1, "ann"),
            accepted(2, "bob"),
            VoucherEvent::SeckillClaimRejected {
                order_id: Uuid::from_u128(3),
                user_id: "cat".into(),
                reason: events::ClaimRejection::SoldOut,
            },
            VoucherEvent::SeckillStockReleased {
                order_id: Uuid::from_u128(1),
                user_id: "ann".into(),
            },
        ]);
        let snapshot = snapshot(fold(Uuid::from_u128(1), events));
        assert_eq!(snapshot.left(), 2);
        assert_eq!(snapshot.version, 5);
        let buyers: Vec<(&str, bool)> = snapshot
            .buyers
            .iter()
            .map(|b| (b.user_id.as_str(), b.holds_unit))
            .collect();
        assert_eq!(buyers, vec![("ann", false), ("bob", true)]);
    }

    #[test]
    fn a_release_of_an_order_never_accepted_changes_nothing() {
        let events = sequenced(vec![
            created(VoucherKind::Seckill, Some(3)),
            VoucherEvent::SeckillStockReleased {
                order_id: Uuid::from_u128(9),
                user_id: "zed".into(),
            },
        ]);
        let snapshot = snapshot(fold(Uuid::from_u128(1), events));
        assert_eq!(snapshot.left(), 3);
        assert!(snapshot.buyers.is_empty());
    }

    #[test]
    fn a_repeated_acceptance_counts_once() {
        let events = sequenced(vec![
            created(VoucherKind::Seckill, Some(3)),
            accepted(1, "ann"),
            accepted(1, "ann"),
        ]);
        assert_eq!(snapshot(fold(Uuid::from_u128(1), events)).left(), 2);
    }
}
