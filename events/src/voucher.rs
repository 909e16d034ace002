//! Events of the Voucher aggregate: regular vouchers (free, one coupon per
//! user) and seckill vouchers, whose aggregate is the final stock and
//! one-per-user guard behind the edge's Redis gate.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateEvents;

/// Current version of `VoucherCreated`; "1.0" payloads are upgraded by
/// [`crate::upcast`].
pub const VOUCHER_CREATED_VERSION: &str = "2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoucherKind {
    Regular,
    Seckill,
}

/// Why the final guard refused a seckill claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimRejection {
    SoldOut,
    AlreadyPurchased,
    SaleNotStarted,
    SaleEnded,
    NotSeckill,
    /// The request can never be stored as it is (e.g. a user id the event
    /// store cannot hold): it still ends as a rejected order, and the gate
    /// gives its unit back to the sale.
    InvalidRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoucherEvent {
    VoucherCreated {
        voucher_id: Uuid,
        merchant_id: String,
        title: String,
        kind: VoucherKind,
        price_cents: i64,
        value_cents: i64,
        min_spend_cents: i64,
        /// `Some` exactly for seckill vouchers; regular ones are unlimited.
        stock: Option<u32>,
        begins_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
    },
    /// A regular voucher was claimed (once per user) and a coupon issued.
    VoucherClaimed { user_id: String, coupon_id: Uuid },
    /// An admitted seckill request took one unit of stock.
    SeckillClaimAccepted {
        order_id: Uuid,
        user_id: String,
        requested_at: DateTime<Utc>,
    },
    /// Recorded on the voucher, not only on the order, so a redelivered
    /// request with the same order id gets the same answer.
    SeckillClaimRejected {
        order_id: Uuid,
        user_id: String,
        reason: ClaimRejection,
    },
    /// A cancelled or timed-out order gave its unit back. The user keeps the
    /// "already purchased" mark: one order per user, whatever became of it.
    SeckillStockReleased { order_id: Uuid, user_id: String },
}

impl DomainEvent for VoucherEvent {
    fn event_type(&self) -> String {
        match self {
            Self::VoucherCreated { .. } => "VoucherCreated",
            Self::VoucherClaimed { .. } => "VoucherClaimed",
            Self::SeckillClaimAccepted { .. } => "SeckillClaimAccepted",
            Self::SeckillClaimRejected { .. } => "SeckillClaimRejected",
            Self::SeckillStockReleased { .. } => "SeckillStockReleased",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::VoucherCreated { .. } => VOUCHER_CREATED_VERSION,
            _ => "1.0",
        }
        .to_owned()
    }
}

impl AggregateEvents for VoucherEvent {
    const AGGREGATE_TYPE: &'static str = "Voucher";
}
