//! Events of the Coupon aggregate. A goods order uses a coupon as a
//! try/confirm/cancel resource: reserved on submit, redeemed on payment,
//! released on cancellation.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateEvents;

/// How the user came to hold the coupon; `{"kind": "seckill_order", ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CouponSource {
    RegularClaim,
    SeckillOrder { order_id: Uuid },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponStatus {
    Available,
    Reserved,
    Redeemed,
    Expired,
}

impl CouponStatus {
    /// The serialized name, for SQL filters and document fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Reserved => "reserved",
            Self::Redeemed => "redeemed",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CouponEvent {
    CouponIssued {
        coupon_id: Uuid,
        user_id: String,
        /// The voucher's merchant (API.md "Tenancy"); absent on coupons
        /// issued before tenancy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merchant_id: Option<String>,
        voucher_id: Uuid,
        value_cents: i64,
        min_spend_cents: i64,
        expires_at: DateTime<Utc>,
        source: CouponSource,
    },
    CouponReserved {
        order_id: Uuid,
    },
    CouponRedeemed {
        order_id: Uuid,
    },
    CouponReleased {
        order_id: Uuid,
    },
    CouponExpired {
        at: DateTime<Utc>,
    },
}

impl DomainEvent for CouponEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CouponIssued { .. } => "CouponIssued",
            Self::CouponReserved { .. } => "CouponReserved",
            Self::CouponRedeemed { .. } => "CouponRedeemed",
            Self::CouponReleased { .. } => "CouponReleased",
            Self::CouponExpired { .. } => "CouponExpired",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl AggregateEvents for CouponEvent {
    const AGGREGATE_TYPE: &'static str = "Coupon";
}
