//! Events of the Order aggregate: seckill voucher orders (placed from an
//! admitted claim) and goods orders (submitted, then placed once stock and
//! coupon are reserved), through payment to completion or cancellation.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateEvents;
use crate::voucher::ClaimRejection;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    SeckillVoucher,
    Goods,
}

/// A line as the customer asked for it, before prices are known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedItem {
    pub product_id: Uuid,
    pub quantity: u32,
}

/// A priced line. Exactly one of `product_id` (goods) and `voucher_id`
/// (seckill) is set; name and price are copied so the order stays readable
/// when the product changes later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: Option<Uuid>,
    pub voucher_id: Option<Uuid>,
    pub name: String,
    pub quantity: u32,
    pub unit_price_cents: i64,
}

/// Why an order was refused; serialized as `{"code": "...", ...}` so clients
/// can switch on the same codes the HTTP errors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum OrderRejectionReason {
    SoldOut,
    AlreadyPurchased,
    SaleNotStarted,
    SaleEnded,
    VoucherNotFound,
    OutOfStock {
        product_id: Uuid,
    },
    ProductNotFound {
        product_id: Uuid,
    },
    CouponUnavailable,
    CouponMinSpendNotMet,
    /// The request could never be recorded as it was (see
    /// [`ClaimRejection::InvalidRequest`]).
    InvalidRequest,
    /// The order's total cannot be represented: refused, never retried.
    TotalTooLarge,
    /// The lines belong to more than one merchant: an order has one.
    MixedMerchants,
}

impl From<ClaimRejection> for OrderRejectionReason {
    fn from(rejection: ClaimRejection) -> Self {
        match rejection {
            ClaimRejection::SoldOut => Self::SoldOut,
            ClaimRejection::AlreadyPurchased => Self::AlreadyPurchased,
            ClaimRejection::SaleNotStarted => Self::SaleNotStarted,
            ClaimRejection::SaleEnded => Self::SaleEnded,
            // The API answers a non-seckill voucher like an unknown one.
            ClaimRejection::NotSeckill => Self::VoucherNotFound,
            ClaimRejection::InvalidRequest => Self::InvalidRequest,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancellationReason {
    CustomerRequested,
    AdminRequested,
    PaymentFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Submitted,
    PendingPayment,
    Paid,
    Preparing,
    Completed,
    Cancelled,
    Rejected,
}

impl OrderStatus {
    /// The serialized name, for SQL filters and document fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::PendingPayment => "pending_payment",
            Self::Paid => "paid",
            Self::Preparing => "preparing",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// A goods order was recorded; its stock and coupon reservations are
    /// still pending.
    OrderSubmitted {
        order_id: Uuid,
        user_id: String,
        /// The merchant whose products these are (API.md "Tenancy"); absent
        /// on orders recorded before tenancy, and when no line's product was
        /// known at submission.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merchant_id: Option<String>,
        items: Vec<RequestedItem>,
        coupon_id: Option<Uuid>,
        submitted_at: DateTime<Utc>,
    },
    /// The order is priced and holds its stock; it now awaits payment.
    OrderPlaced {
        order_id: Uuid,
        user_id: String,
        /// The voucher's or the products' merchant; absent only on orders
        /// recorded before tenancy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merchant_id: Option<String>,
        kind: OrderKind,
        items: Vec<OrderItem>,
        voucher_id: Option<Uuid>,
        coupon_id: Option<Uuid>,
        subtotal_cents: i64,
        discount_cents: i64,
        total_cents: i64,
        placed_at: DateTime<Utc>,
    },
    OrderRejected {
        order_id: Uuid,
        user_id: String,
        /// Absent when the merchant is unknown (e.g. the voucher does not exist).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merchant_id: Option<String>,
        kind: OrderKind,
        voucher_id: Option<Uuid>,
        reason: OrderRejectionReason,
        rejected_at: DateTime<Utc>,
    },
    OrderPaymentStarted {
        payment_id: Uuid,
        amount_cents: i64,
    },
    OrderPaid {
        payment_id: Uuid,
        amount_cents: i64,
        paid_at: DateTime<Utc>,
    },
    OrderCancelled {
        reason: CancellationReason,
        /// The user id of whoever cancelled, or a system actor's name.
        cancelled_by: String,
        cancelled_at: DateTime<Utc>,
    },
    OrderTimedOut {
        deadline: DateTime<Utc>,
        timed_out_at: DateTime<Utc>,
    },
    OrderPreparationStarted {
        at: DateTime<Utc>,
    },
    OrderCompleted {
        at: DateTime<Utc>,
    },
    OrderRefunded {
        payment_id: Uuid,
        amount_cents: i64,
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            Self::OrderSubmitted { .. } => "OrderSubmitted",
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::OrderRejected { .. } => "OrderRejected",
            Self::OrderPaymentStarted { .. } => "OrderPaymentStarted",
            Self::OrderPaid { .. } => "OrderPaid",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::OrderTimedOut { .. } => "OrderTimedOut",
            Self::OrderPreparationStarted { .. } => "OrderPreparationStarted",
            Self::OrderCompleted { .. } => "OrderCompleted",
            Self::OrderRefunded { .. } => "OrderRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl AggregateEvents for OrderEvent {
    const AGGREGATE_TYPE: &'static str = "Order";
}
