//! The Order aggregate: one customer order, seckill voucher or goods, from
//! its creation to completion, cancellation or rejection.
//!
//! Lifecycle (`events::OrderStatus`):
//! - seckill: placed from an accepted claim straight into `pending_payment`,
//!   or `rejected` when the final guard refused the claim;
//! - goods: `submitted` with the requested lines, then placed (priced, stock
//!   and coupon reserved by the saga) into `pending_payment`, or `rejected`;
//! - `pending_payment` → `paid` → `preparing` → `completed`;
//! - `submitted` / `pending_payment` → `cancelled` by its customer, an admin,
//!   the system, or a payment timeout (a timed-out order is `cancelled`).
//!
//! Rules it enforces: customers cancel only their own orders; an order has
//! at most one payment, for exactly its total; a paid order cannot be
//! cancelled; a payment that arrives after cancellation is refused here and
//! refunded by the saga, which records the refund with `Refund` (only on a
//! cancelled order: a paid order cannot be cancelled, so it has no refund
//! path). Creation commands, `StartPayment`, `MarkPaid`, `PlaceGoodsOrder`,
//! `RejectGoodsOrder`, `Refund` and `TimeOut` are safe to redeliver: repeating
//! a recorded fact succeeds with no events.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use events::{
    AggregateEvents, CancellationReason, OrderEvent, OrderItem, OrderKind, OrderRejectionReason, OrderStatus,
    RequestedItem,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DomainError, ErrorKind};

pub const MAX_ITEMS: usize = 50;
/// Per line; with at most [`MAX_ITEMS`] lines and prices up to `MAX_CENTS`,
/// every total fits an `i64`.
pub const MAX_QUANTITY: u32 = super::limits::MAX_QUANTITY;

/// Who asks for a cancellation; only customers are limited to their own orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancellerRole {
    Customer,
    Admin,
    /// One of our own processes, e.g. the saga after a failed payment.
    System,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    PlaceSeckillOrder {
        order_id: Uuid,
        user_id: String,
        /// The voucher's merchant: the order belongs to it.
        merchant_id: String,
        voucher_id: Uuid,
        title: String,
        price_cents: i64,
        placed_at: DateTime<Utc>,
    },
    RejectSeckillOrder {
        order_id: Uuid,
        user_id: String,
        /// `None` when the voucher is unknown.
        merchant_id: Option<String>,
        voucher_id: Uuid,
        reason: OrderRejectionReason,
        rejected_at: DateTime<Utc>,
    },
    SubmitGoodsOrder {
        order_id: Uuid,
        user_id: String,
        /// The merchant of the lines' products, where they are known.
        merchant_id: Option<String>,
        items: Vec<RequestedItem>,
        coupon_id: Option<Uuid>,
        submitted_at: DateTime<Utc>,
    },
    /// The reservation saga priced the order and holds its stock and coupon.
    PlaceGoodsOrder {
        /// The products' merchant; must agree with the one recorded at submission.
        merchant_id: String,
        items: Vec<OrderItem>,
        coupon_id: Option<Uuid>,
        /// Clamped to the subtotal: a coupon worth more than the order makes
        /// it free, never negative.
        discount_cents: i64,
        placed_at: DateTime<Utc>,
    },
    RejectGoodsOrder {
        reason: OrderRejectionReason,
        rejected_at: DateTime<Utc>,
    },
    StartPayment {
        payment_id: Uuid,
        amount_cents: i64,
    },
    MarkPaid {
        payment_id: Uuid,
        amount_cents: i64,
        paid_at: DateTime<Utc>,
    },
    Cancel {
        by: String,
        by_role: CancellerRole,
        reason: CancellationReason,
        at: DateTime<Utc>,
    },
    /// Fired at least once by the durable timeout; a no-op unless the order
    /// still awaits payment.
    TimeOut {
        deadline: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    StartPreparing {
        /// The acting merchant (`None`: an admin or the system). A merchant
        /// acts only on its own orders; another's is answered as missing.
        merchant: Option<String>,
        at: DateTime<Utc>,
    },
    Complete {
        merchant: Option<String>,
        at: DateTime<Utc>,
    },
    /// Records the refund of a payment that arrived after cancellation.
    Refund {
        payment_id: Uuid,
        amount_cents: i64,
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("order not found")]
    NotFound,
    #[error("order already exists")]
    AlreadyExists,
    #[error("prices must not be negative")]
    NegativePrice,
    #[error("an order needs at least one item")]
    NoItems,
    #[error("an order has at most {MAX_ITEMS} items, got {count}")]
    TooManyItems { count: usize },
    #[error("quantity of {product_id} must be 1..={MAX_QUANTITY}, got {quantity}")]
    InvalidQuantity { product_id: Uuid, quantity: u32 },
    #[error("product {product_id} appears more than once")]
    DuplicateProduct { product_id: Uuid },
    #[error("priced items do not match the submitted items")]
    ItemsMismatch,
    #[error("the coupon does not match the submitted coupon")]
    CouponMismatch,
    #[error("discount must not be negative")]
    NegativeDiscount,
    #[error("a discount needs a coupon")]
    DiscountWithoutCoupon,
    #[error("the order total is too large")]
    AmountOverflow,
    #[error("amount {actual} does not match the order total {expected}")]
    AmountMismatch { expected: i64, actual: i64 },
    #[error("payment {payment_id} is already under way for this order")]
    PaymentAlreadyStarted { payment_id: Uuid },
    #[error("payment {actual} is not this order's payment {expected}")]
    PaymentMismatch { expected: Uuid, actual: Uuid },
    #[error("order is already paid")]
    AlreadyPaid,
    #[error("order is cancelled")]
    Cancelled,
    #[error("order is already cancelled")]
    AlreadyCancelled,
    #[error("the order's lines belong to merchant {expected}, not {actual}")]
    MerchantMismatch { expected: String, actual: String },
    #[error("the payment deadline has not passed")]
    DeadlineNotReached,
    #[error("cannot {action} an order that is {}", from.as_str())]
    InvalidTransition { from: OrderStatus, action: &'static str },
}

impl DomainError for OrderError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists
            | Self::AmountMismatch { .. }
            | Self::PaymentAlreadyStarted { .. }
            | Self::PaymentMismatch { .. }
            | Self::AlreadyPaid
            | Self::Cancelled
            | Self::AlreadyCancelled
            | Self::InvalidTransition { .. } => ErrorKind::Conflict,
            Self::NegativePrice
            | Self::NoItems
            | Self::TooManyItems { .. }
            | Self::InvalidQuantity { .. }
            | Self::DuplicateProduct { .. }
            | Self::ItemsMismatch
            | Self::MerchantMismatch { .. }
            | Self::CouponMismatch
            | Self::NegativeDiscount
            | Self::DiscountWithoutCoupon
            | Self::AmountOverflow
            | Self::DeadlineNotReached => ErrorKind::Invalid,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "order_not_found",
            Self::AlreadyExists => "order_exists",
            Self::NegativePrice => "negative_price",
            Self::NoItems => "no_items",
            Self::TooManyItems { .. } => "too_many_items",
            Self::InvalidQuantity { .. } => "invalid_quantity",
            Self::DuplicateProduct { .. } => "duplicate_product",
            Self::ItemsMismatch => "items_mismatch",
            Self::CouponMismatch => "coupon_mismatch",
            Self::NegativeDiscount => "negative_discount",
            Self::DiscountWithoutCoupon => "discount_without_coupon",
            Self::AmountOverflow => "amount_overflow",
            Self::AmountMismatch { .. } => "amount_mismatch",
            Self::PaymentAlreadyStarted { .. } => "payment_already_started",
            Self::PaymentMismatch { .. } => "payment_mismatch",
            Self::AlreadyPaid => "order_already_paid",
            Self::Cancelled => "order_cancelled",
            Self::AlreadyCancelled => "order_already_cancelled",
            Self::MerchantMismatch { .. } => "merchant_mismatch",
            Self::DeadlineNotReached => "deadline_not_reached",
            Self::InvalidTransition { .. } => "invalid_order_transition",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    order_id: Option<Uuid>,
    user_id: String,
    merchant_id: Option<String>,
    kind: Option<OrderKind>,
    status: Option<OrderStatus>,
    voucher_id: Option<Uuid>,
    coupon_id: Option<Uuid>,
    requested_items: Vec<RequestedItem>,
    items: Vec<OrderItem>,
    subtotal_cents: i64,
    discount_cents: i64,
    total_cents: i64,
    placed_at: Option<DateTime<Utc>>,
    rejection: Option<OrderRejectionReason>,
    /// Started or paid; at most one per order.
    payment_id: Option<Uuid>,
    paid_at: Option<DateTime<Utc>>,
    cancellation: Option<CancellationReason>,
    timed_out: bool,
    refunded_payments: Vec<Uuid>,
}

impl Order {
    pub fn exists(&self) -> bool {
        self.status.is_some()
    }

    pub fn order_id(&self) -> Option<Uuid> {
        self.order_id
    }

    pub fn status(&self) -> Option<OrderStatus> {
        self.status
    }

    pub fn user_id(&self) -> Option<&str> {
        self.exists().then_some(self.user_id.as_str())
    }

    /// The merchant the order belongs to (API.md "Tenancy").
    pub fn merchant_id(&self) -> Option<&str> {
        self.merchant_id.as_deref()
    }

    /// Whether `merchant` (an acting merchant; `None` for an admin or the
    /// system) may see and act on this order.
    fn visible_to_merchant(&self, merchant: Option<&str>) -> bool {
        merchant.is_none_or(|merchant| self.merchant_id.as_deref() == Some(merchant))
    }

    pub fn kind(&self) -> Option<OrderKind> {
        self.kind
    }

    pub fn voucher_id(&self) -> Option<Uuid> {
        self.voucher_id
    }

    pub fn coupon_id(&self) -> Option<Uuid> {
        self.coupon_id
    }

    /// The lines as the customer asked for them (goods orders only).
    pub fn requested_items(&self) -> &[RequestedItem] {
        &self.requested_items
    }

    /// The priced lines; empty until the order is placed.
    pub fn items(&self) -> &[OrderItem] {
        &self.items
    }

    pub fn subtotal_cents(&self) -> i64 {
        self.subtotal_cents
    }

    pub fn discount_cents(&self) -> i64 {
        self.discount_cents
    }

    pub fn total_cents(&self) -> i64 {
        self.total_cents
    }

    pub fn was_placed(&self) -> bool {
        self.placed_at.is_some()
    }

    pub fn rejection(&self) -> Option<OrderRejectionReason> {
        self.rejection
    }

    pub fn payment_id(&self) -> Option<Uuid> {
        self.payment_id
    }

    pub fn is_paid(&self) -> bool {
        self.paid_at.is_some()
    }

    pub fn cancellation(&self) -> Option<CancellationReason> {
        self.cancellation
    }

    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    pub fn is_refunded(&self, payment_id: Uuid) -> bool {
        self.refunded_payments.contains(&payment_id)
    }

    fn current(&self) -> Result<OrderStatus, OrderError> {
        self.status.ok_or(OrderError::NotFound)
    }

    /// Each command decided by its own method (as `voucher.rs` does).
    fn decide(&self, command: OrderCommand) -> Result<Option<OrderEvent>, OrderError> {
        match command {
            OrderCommand::PlaceSeckillOrder {
                order_id,
                user_id,
                merchant_id,
                voucher_id,
                title,
                price_cents,
                placed_at,
            } => self.decide_place_seckill(
                order_id,
                user_id,
                merchant_id,
                voucher_id,
                title,
                price_cents,
                placed_at,
            ),
            OrderCommand::RejectSeckillOrder {
                order_id,
                user_id,
                merchant_id,
                voucher_id,
                reason,
                rejected_at,
            } => self.decide_reject_seckill(order_id, user_id, merchant_id, voucher_id, reason, rejected_at),
            OrderCommand::SubmitGoodsOrder {
                order_id,
                user_id,
                merchant_id,
                items,
                coupon_id,
                submitted_at,
            } => self.decide_submit_goods(order_id, user_id, merchant_id, items, coupon_id, submitted_at),
            OrderCommand::PlaceGoodsOrder {
                merchant_id,
                items,
                coupon_id,
                discount_cents,
                placed_at,
            } => self.decide_place_goods(merchant_id, items, coupon_id, discount_cents, placed_at),
            OrderCommand::RejectGoodsOrder { reason, rejected_at } => self.decide_reject_goods(reason, rejected_at),
            OrderCommand::StartPayment {
                payment_id,
                amount_cents,
            } => self.decide_start_payment(payment_id, amount_cents),
            OrderCommand::MarkPaid {
                payment_id,
                amount_cents,
                paid_at,
            } => self.decide_mark_paid(payment_id, amount_cents, paid_at),
            OrderCommand::Cancel {
                by,
                by_role,
                reason,
                at,
            } => self.decide_cancel(by, by_role, reason, at),
            OrderCommand::TimeOut { deadline, at } => self.decide_time_out(deadline, at),
            OrderCommand::StartPreparing { merchant, at } => self.decide_start_preparing(merchant, at),
            OrderCommand::Complete { merchant, at } => self.decide_complete(merchant, at),
            OrderCommand::Refund {
                payment_id,
                amount_cents,
                reason,
                at,
            } => self.decide_refund(payment_id, amount_cents, reason, at),
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the command's fields, passed as they come")]
    fn decide_place_seckill(
        &self,
        order_id: Uuid,
        user_id: String,
        merchant_id: String,
        voucher_id: Uuid,
        title: String,
        price_cents: i64,
        placed_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        if self.exists() {
            let same = self.kind == Some(OrderKind::SeckillVoucher)
                && self.was_placed()
                && self.user_id == user_id
                && self.voucher_id == Some(voucher_id);
            return if same { Ok(None) } else { Err(OrderError::AlreadyExists) };
        }
        if price_cents < 0 {
            return Err(OrderError::NegativePrice);
        }
        Ok(Some(OrderEvent::OrderPlaced {
            order_id,
            user_id,
            merchant_id: Some(merchant_id),
            kind: OrderKind::SeckillVoucher,
            items: vec![OrderItem {
                product_id: None,
                voucher_id: Some(voucher_id),
                name: title,
                quantity: 1,
                unit_price_cents: price_cents,
            }],
            voucher_id: Some(voucher_id),
            coupon_id: None,
            subtotal_cents: price_cents,
            discount_cents: 0,
            total_cents: price_cents,
            placed_at,
        }))
    }

    fn decide_reject_seckill(
        &self,
        order_id: Uuid,
        user_id: String,
        merchant_id: Option<String>,
        voucher_id: Uuid,
        reason: OrderRejectionReason,
        rejected_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        if self.exists() {
            let same = self.kind == Some(OrderKind::SeckillVoucher)
                && self.status == Some(OrderStatus::Rejected)
                && self.user_id == user_id
                && self.voucher_id == Some(voucher_id);
            return if same { Ok(None) } else { Err(OrderError::AlreadyExists) };
        }
        Ok(Some(OrderEvent::OrderRejected {
            order_id,
            user_id,
            merchant_id,
            kind: OrderKind::SeckillVoucher,
            voucher_id: Some(voucher_id),
            reason,
            rejected_at,
        }))
    }

    fn decide_submit_goods(
        &self,
        order_id: Uuid,
        user_id: String,
        merchant_id: Option<String>,
        items: Vec<RequestedItem>,
        coupon_id: Option<Uuid>,
        submitted_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        if self.exists() {
            let same = self.kind == Some(OrderKind::Goods)
                && self.user_id == user_id
                && self.requested_items == items
                && self.coupon_id == coupon_id;
            return if same { Ok(None) } else { Err(OrderError::AlreadyExists) };
        }
        validate_requested(&items)?;
        Ok(Some(OrderEvent::OrderSubmitted {
            order_id,
            user_id,
            merchant_id,
            items,
            coupon_id,
            submitted_at,
        }))
    }

    fn decide_reject_goods(
        &self,
        reason: OrderRejectionReason,
        rejected_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if status == OrderStatus::Rejected && self.rejection == Some(reason) {
            return Ok(None);
        }
        if status != OrderStatus::Submitted {
            return Err(OrderError::InvalidTransition {
                from: status,
                action: "reject",
            });
        }
        Ok(Some(OrderEvent::OrderRejected {
            order_id: self.order_id.unwrap_or_default(),
            user_id: self.user_id.clone(),
            merchant_id: self.merchant_id.clone(),
            kind: OrderKind::Goods,
            voucher_id: None,
            reason,
            rejected_at,
        }))
    }

    fn decide_start_payment(&self, payment_id: Uuid, amount_cents: i64) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if self.payment_id == Some(payment_id) {
            return Ok(None);
        }
        match status {
            OrderStatus::PendingPayment => {}
            OrderStatus::Cancelled => return Err(OrderError::Cancelled),
            OrderStatus::Paid | OrderStatus::Preparing | OrderStatus::Completed => {
                return Err(OrderError::AlreadyPaid);
            }
            OrderStatus::Submitted | OrderStatus::Rejected => {
                return Err(OrderError::InvalidTransition {
                    from: status,
                    action: "start payment for",
                });
            }
        }
        if let Some(existing) = self.payment_id {
            return Err(OrderError::PaymentAlreadyStarted { payment_id: existing });
        }
        self.check_amount(amount_cents)?;
        Ok(Some(OrderEvent::OrderPaymentStarted {
            payment_id,
            amount_cents,
        }))
    }

    fn decide_mark_paid(
        &self,
        payment_id: Uuid,
        amount_cents: i64,
        paid_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        match status {
            OrderStatus::PendingPayment => {}
            OrderStatus::Paid | OrderStatus::Preparing | OrderStatus::Completed => {
                return if self.payment_id == Some(payment_id) {
                    Ok(None)
                } else {
                    Err(OrderError::AlreadyPaid)
                };
            }
            // The saga refunds a payment that arrives now.
            OrderStatus::Cancelled => return Err(OrderError::Cancelled),
            OrderStatus::Submitted | OrderStatus::Rejected => {
                return Err(OrderError::InvalidTransition {
                    from: status,
                    action: "pay",
                });
            }
        }
        // Accepted without a recorded start: the payment may have been
        // created by a request that failed before `StartPayment`, and
        // the money has arrived anyway.
        self.check_payment(payment_id, amount_cents)?;
        Ok(Some(OrderEvent::OrderPaid {
            payment_id,
            amount_cents,
            paid_at,
        }))
    }

    fn decide_cancel(
        &self,
        by: String,
        by_role: CancellerRole,
        reason: CancellationReason,
        at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        // Ownership before state, so a stranger learns nothing about
        // it: another customer's order is answered as missing.
        if by_role == CancellerRole::Customer && by != self.user_id {
            return Err(OrderError::NotFound);
        }
        match status {
            OrderStatus::Submitted | OrderStatus::PendingPayment => Ok(Some(OrderEvent::OrderCancelled {
                reason,
                cancelled_by: by,
                cancelled_at: at,
            })),
            OrderStatus::Cancelled => Err(OrderError::AlreadyCancelled),
            OrderStatus::Paid | OrderStatus::Preparing | OrderStatus::Completed => Err(OrderError::AlreadyPaid),
            OrderStatus::Rejected => Err(OrderError::InvalidTransition {
                from: status,
                action: "cancel",
            }),
        }
    }

    fn decide_time_out(&self, deadline: DateTime<Utc>, at: DateTime<Utc>) -> Result<Option<OrderEvent>, OrderError> {
        if self.current()? != OrderStatus::PendingPayment {
            return Ok(None);
        }
        if at < deadline {
            return Err(OrderError::DeadlineNotReached);
        }
        Ok(Some(OrderEvent::OrderTimedOut {
            deadline,
            timed_out_at: at,
        }))
    }

    fn decide_start_preparing(
        &self,
        merchant: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if !self.visible_to_merchant(merchant.as_deref()) {
            return Err(OrderError::NotFound);
        }
        if status != OrderStatus::Paid {
            return Err(OrderError::InvalidTransition {
                from: status,
                action: "start preparing",
            });
        }
        Ok(Some(OrderEvent::OrderPreparationStarted { at }))
    }

    fn decide_complete(&self, merchant: Option<String>, at: DateTime<Utc>) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if !self.visible_to_merchant(merchant.as_deref()) {
            return Err(OrderError::NotFound);
        }
        if status != OrderStatus::Preparing {
            return Err(OrderError::InvalidTransition {
                from: status,
                action: "complete",
            });
        }
        Ok(Some(OrderEvent::OrderCompleted { at }))
    }

    fn decide_refund(
        &self,
        payment_id: Uuid,
        amount_cents: i64,
        reason: String,
        at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if self.refunded_payments.contains(&payment_id) {
            return Ok(None);
        }
        if status != OrderStatus::Cancelled {
            return Err(OrderError::InvalidTransition {
                from: status,
                action: "refund",
            });
        }
        self.check_payment(payment_id, amount_cents)?;
        Ok(Some(OrderEvent::OrderRefunded {
            payment_id,
            amount_cents,
            reason,
            at,
        }))
    }

    /// The payment is this order's (when one was started) and for its total.
    fn check_payment(&self, payment_id: Uuid, amount_cents: i64) -> Result<(), OrderError> {
        if let Some(expected) = self.payment_id
            && expected != payment_id
        {
            return Err(OrderError::PaymentMismatch {
                expected,
                actual: payment_id,
            });
        }
        self.check_amount(amount_cents)
    }

    fn decide_place_goods(
        &self,
        merchant_id: String,
        items: Vec<OrderItem>,
        coupon_id: Option<Uuid>,
        discount_cents: i64,
        placed_at: DateTime<Utc>,
    ) -> Result<Option<OrderEvent>, OrderError> {
        let status = self.current()?;
        if status != OrderStatus::Submitted {
            // A redelivered placement of what was already placed.
            let same = self.kind == Some(OrderKind::Goods)
                && self.was_placed()
                && self.items == items
                && self.coupon_id == coupon_id;
            return if same {
                Ok(None)
            } else {
                Err(OrderError::InvalidTransition {
                    from: status,
                    action: "place",
                })
            };
        }
        if items.is_empty() {
            return Err(OrderError::NoItems);
        }
        if items.iter().any(|item| item.unit_price_cents < 0) {
            return Err(OrderError::NegativePrice);
        }
        if !same_lines(&self.requested_items, &items) {
            return Err(OrderError::ItemsMismatch);
        }
        if coupon_id != self.coupon_id {
            return Err(OrderError::CouponMismatch);
        }
        if let Some(expected) = &self.merchant_id
            && *expected != merchant_id
        {
            return Err(OrderError::MerchantMismatch {
                expected: expected.clone(),
                actual: merchant_id,
            });
        }
        if discount_cents < 0 {
            return Err(OrderError::NegativeDiscount);
        }
        if discount_cents > 0 && coupon_id.is_none() {
            return Err(OrderError::DiscountWithoutCoupon);
        }
        let subtotal_cents = items
            .iter()
            .try_fold(0_i64, |sum, item| {
                i64::from(item.quantity)
                    .checked_mul(item.unit_price_cents)
                    .and_then(|line| sum.checked_add(line))
            })
            .ok_or(OrderError::AmountOverflow)?;
        let discount_cents = discount_cents.min(subtotal_cents);
        Ok(Some(OrderEvent::OrderPlaced {
            order_id: self.order_id.unwrap_or_default(),
            user_id: self.user_id.clone(),
            merchant_id: Some(merchant_id),
            kind: OrderKind::Goods,
            items,
            voucher_id: None,
            coupon_id,
            subtotal_cents,
            discount_cents,
            total_cents: subtotal_cents - discount_cents,
            placed_at,
        }))
    }

    fn check_amount(&self, amount_cents: i64) -> Result<(), OrderError> {
        if amount_cents != self.total_cents {
            return Err(OrderError::AmountMismatch {
                expected: self.total_cents,
                actual: amount_cents,
            });
        }
        Ok(())
    }
}

fn validate_requested(items: &[RequestedItem]) -> Result<(), OrderError> {
    if items.is_empty() {
        return Err(OrderError::NoItems);
    }
    if items.len() > MAX_ITEMS {
        return Err(OrderError::TooManyItems { count: items.len() });
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    for item in items {
        if item.quantity == 0 || item.quantity > MAX_QUANTITY {
            return Err(OrderError::InvalidQuantity {
                product_id: item.product_id,
                quantity: item.quantity,
            });
        }
        if !seen.insert(item.product_id) {
            return Err(OrderError::DuplicateProduct {
                product_id: item.product_id,
            });
        }
    }
    Ok(())
}

/// Whether the priced lines are exactly the requested ones (same products,
/// same quantities, in any order), each a goods line.
fn same_lines(requested: &[RequestedItem], priced: &[OrderItem]) -> bool {
    let mut want: Vec<(Uuid, u32)> = requested.iter().map(|i| (i.product_id, i.quantity)).collect();
    let mut got = Vec::with_capacity(priced.len());
    for item in priced {
        match (item.product_id, item.voucher_id) {
            (Some(product_id), None) => got.push((product_id, item.quantity)),
            _ => return false,
        }
    }
    want.sort_unstable();
    got.sort_unstable();
    want == got
}

impl Aggregate for Order {
    const TYPE: &'static str = OrderEvent::AGGREGATE_TYPE;
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if let Some(event) = self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            OrderEvent::OrderSubmitted {
                order_id,
                user_id,
                merchant_id,
                items,
                coupon_id,
                ..
            } => {
                self.order_id = Some(order_id);
                self.user_id = user_id;
                self.merchant_id = merchant_id;
                self.kind = Some(OrderKind::Goods);
                self.status = Some(OrderStatus::Submitted);
                self.requested_items = items;
                self.coupon_id = coupon_id;
            }
            OrderEvent::OrderPlaced {
                order_id,
                user_id,
                merchant_id,
                kind,
                items,
                voucher_id,
                coupon_id,
                subtotal_cents,
                discount_cents,
                total_cents,
                placed_at,
            } => {
                self.order_id = Some(order_id);
                self.user_id = user_id;
                if merchant_id.is_some() {
                    self.merchant_id = merchant_id;
                }
                self.kind = Some(kind);
                self.status = Some(OrderStatus::PendingPayment);
                self.items = items;
                self.voucher_id = voucher_id;
                self.coupon_id = coupon_id;
                self.subtotal_cents = subtotal_cents;
                self.discount_cents = discount_cents;
                self.total_cents = total_cents;
                self.placed_at = Some(placed_at);
            }
            OrderEvent::OrderRejected {
                order_id,
                user_id,
                merchant_id,
                kind,
                voucher_id,
                reason,
                ..
            } => {
                self.order_id = Some(order_id);
                self.user_id = user_id;
                if merchant_id.is_some() {
                    self.merchant_id = merchant_id;
                }
                self.kind = Some(kind);
                self.status = Some(OrderStatus::Rejected);
                if voucher_id.is_some() {
                    self.voucher_id = voucher_id;
                }
                self.rejection = Some(reason);
            }
            OrderEvent::OrderPaymentStarted { payment_id, .. } => {
                self.payment_id = Some(payment_id);
            }
            OrderEvent::OrderPaid {
                payment_id, paid_at, ..
            } => {
                self.payment_id = Some(payment_id);
                self.paid_at = Some(paid_at);
                self.status = Some(OrderStatus::Paid);
            }
            OrderEvent::OrderCancelled { reason, .. } => {
                self.cancellation = Some(reason);
                self.status = Some(OrderStatus::Cancelled);
            }
            OrderEvent::OrderTimedOut { .. } => {
                self.timed_out = true;
                self.status = Some(OrderStatus::Cancelled);
            }
            OrderEvent::OrderPreparationStarted { .. } => {
                self.status = Some(OrderStatus::Preparing);
            }
            OrderEvent::OrderCompleted { .. } => {
                self.status = Some(OrderStatus::Completed);
            }
            OrderEvent::OrderRefunded { payment_id, .. } => {
                if !self.refunded_payments.contains(&payment_id) {
                    self.refunded_payments.push(payment_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::domain::testing::{at_secs, execute, id, replay};

    const ORDER: u128 = 0x0D;
    const VOUCHER: u128 = 0xF00D;
    const PAYMENT: u128 = 0xBA7;
    const COUPON: u128 = 0xC0;
    const APPLE: u128 = 0xA1;
    const BREAD: u128 = 0xB2;
    const SHOP: &str = "shop-1";

    fn framework() -> TestFramework<Order> {
        TestFramework::with(())
    }

    // ---- seckill fixtures ----

    fn place_seckill() -> OrderCommand {
        OrderCommand::PlaceSeckillOrder {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: SHOP.into(),
            voucher_id: id(VOUCHER),
            title: "Two coffees for one".into(),
            price_cents: 990,
            placed_at: at_secs(0),
        }
    }

    fn seckill_placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            kind: OrderKind::SeckillVoucher,
            items: vec![OrderItem {
                product_id: None,
                voucher_id: Some(id(VOUCHER)),
                name: "Two coffees for one".into(),
                quantity: 1,
                unit_price_cents: 990,
            }],
            voucher_id: Some(id(VOUCHER)),
            coupon_id: None,
            subtotal_cents: 990,
            discount_cents: 0,
            total_cents: 990,
            placed_at: at_secs(0),
        }
    }

    fn reject_seckill() -> OrderCommand {
        OrderCommand::RejectSeckillOrder {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            voucher_id: id(VOUCHER),
            reason: OrderRejectionReason::SoldOut,
            rejected_at: at_secs(0),
        }
    }

    fn seckill_rejected() -> OrderEvent {
        OrderEvent::OrderRejected {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            kind: OrderKind::SeckillVoucher,
            voucher_id: Some(id(VOUCHER)),
            reason: OrderRejectionReason::SoldOut,
            rejected_at: at_secs(0),
        }
    }

    // ---- goods fixtures ----

    fn requested() -> Vec<RequestedItem> {
        vec![
            RequestedItem {
                product_id: id(APPLE),
                quantity: 3,
            },
            RequestedItem {
                product_id: id(BREAD),
                quantity: 1,
            },
        ]
    }

    fn submit(items: Vec<RequestedItem>) -> OrderCommand {
        OrderCommand::SubmitGoodsOrder {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            items,
            coupon_id: Some(id(COUPON)),
            submitted_at: at_secs(0),
        }
    }

    fn submitted() -> OrderEvent {
        OrderEvent::OrderSubmitted {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            items: requested(),
            coupon_id: Some(id(COUPON)),
            submitted_at: at_secs(0),
        }
    }

    fn priced() -> Vec<OrderItem> {
        vec![
            OrderItem {
                product_id: Some(id(BREAD)),
                voucher_id: None,
                name: "Bread".into(),
                quantity: 1,
                unit_price_cents: 450,
            },
            OrderItem {
                product_id: Some(id(APPLE)),
                voucher_id: None,
                name: "Apple".into(),
                quantity: 3,
                unit_price_cents: 120,
            },
        ]
    }

    fn place_goods(discount_cents: i64) -> OrderCommand {
        OrderCommand::PlaceGoodsOrder {
            merchant_id: SHOP.into(),
            items: priced(),
            coupon_id: Some(id(COUPON)),
            discount_cents,
            placed_at: at_secs(1),
        }
    }

    /// Subtotal 810 = 450 + 3 × 120.
    fn goods_placed(discount_cents: i64) -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            kind: OrderKind::Goods,
            items: priced(),
            voucher_id: None,
            coupon_id: Some(id(COUPON)),
            subtotal_cents: 810,
            discount_cents,
            total_cents: 810 - discount_cents,
            placed_at: at_secs(1),
        }
    }

    fn goods_rejected(reason: OrderRejectionReason) -> OrderEvent {
        OrderEvent::OrderRejected {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            kind: OrderKind::Goods,
            voucher_id: None,
            reason,
            rejected_at: at_secs(1),
        }
    }

    // ---- lifecycle fixtures (on the seckill order, total 990) ----

    fn payment_started() -> OrderEvent {
        OrderEvent::OrderPaymentStarted {
            payment_id: id(PAYMENT),
            amount_cents: 990,
        }
    }

    fn paid() -> OrderEvent {
        OrderEvent::OrderPaid {
            payment_id: id(PAYMENT),
            amount_cents: 990,
            paid_at: at_secs(60),
        }
    }

    fn cancelled() -> OrderEvent {
        OrderEvent::OrderCancelled {
            reason: CancellationReason::CustomerRequested,
            cancelled_by: "alice".into(),
            cancelled_at: at_secs(30),
        }
    }

    fn timed_out() -> OrderEvent {
        OrderEvent::OrderTimedOut {
            deadline: at_secs(900),
            timed_out_at: at_secs(900),
        }
    }

    fn preparing() -> OrderEvent {
        OrderEvent::OrderPreparationStarted { at: at_secs(120) }
    }

    fn completed() -> OrderEvent {
        OrderEvent::OrderCompleted { at: at_secs(180) }
    }

    fn refunded() -> OrderEvent {
        OrderEvent::OrderRefunded {
            payment_id: id(PAYMENT),
            amount_cents: 990,
            reason: "paid after cancellation".into(),
            at: at_secs(70),
        }
    }

    fn start_payment(payment: u128, amount_cents: i64) -> OrderCommand {
        OrderCommand::StartPayment {
            payment_id: id(payment),
            amount_cents,
        }
    }

    fn mark_paid(payment: u128, amount_cents: i64) -> OrderCommand {
        OrderCommand::MarkPaid {
            payment_id: id(payment),
            amount_cents,
            paid_at: at_secs(60),
        }
    }

    fn cancel(by: &str, by_role: CancellerRole) -> OrderCommand {
        OrderCommand::Cancel {
            by: by.into(),
            by_role,
            reason: CancellationReason::CustomerRequested,
            at: at_secs(30),
        }
    }

    fn time_out(at: i64) -> OrderCommand {
        OrderCommand::TimeOut {
            deadline: at_secs(900),
            at: at_secs(at),
        }
    }

    fn refund(payment: u128, amount_cents: i64) -> OrderCommand {
        OrderCommand::Refund {
            payment_id: id(payment),
            amount_cents,
            reason: "paid after cancellation".into(),
            at: at_secs(70),
        }
    }

    /// Every reachable state, for the "only from X" tests.
    fn history_to(status: OrderStatus) -> Vec<OrderEvent> {
        match status {
            OrderStatus::Submitted => vec![submitted()],
            OrderStatus::PendingPayment => vec![seckill_placed()],
            OrderStatus::Paid => vec![seckill_placed(), payment_started(), paid()],
            OrderStatus::Preparing => vec![seckill_placed(), payment_started(), paid(), preparing()],
            OrderStatus::Completed => vec![seckill_placed(), payment_started(), paid(), preparing(), completed()],
            OrderStatus::Cancelled => vec![seckill_placed(), cancelled()],
            OrderStatus::Rejected => vec![seckill_rejected()],
        }
    }

    const ALL_STATUSES: [OrderStatus; 7] = [
        OrderStatus::Submitted,
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Preparing,
        OrderStatus::Completed,
        OrderStatus::Cancelled,
        OrderStatus::Rejected,
    ];

    /// In every status but `allowed`, `command` is refused as an invalid
    /// transition named `action`.
    fn only_from(allowed: &[OrderStatus], action: &'static str, command: impl Fn() -> OrderCommand) {
        for status in ALL_STATUSES {
            if allowed.contains(&status) {
                continue;
            }
            assert_eq!(
                when_in(status, command()),
                Err(OrderError::InvalidTransition { from: status, action }),
                "{status:?}"
            );
        }
    }

    fn when_in(status: OrderStatus, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        let mut order: Order = replay(history_to(status));
        assert_eq!(order.status(), Some(status));
        execute(&mut order, command, &())
    }

    // ---- PlaceSeckillOrder ----

    #[test]
    fn place_seckill_order() {
        framework()
            .given_no_previous_events()
            .when(place_seckill())
            .then_expect_events(vec![seckill_placed()]);
    }

    #[test]
    fn place_seckill_order_again_is_a_no_op_whatever_became_of_it() {
        for history in [
            vec![seckill_placed()],
            vec![seckill_placed(), cancelled()],
            history_to(OrderStatus::Completed),
        ] {
            framework()
                .given(history)
                .when(place_seckill())
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn place_seckill_order_over_a_different_order_is_a_conflict() {
        framework()
            .given(vec![submitted()])
            .when(place_seckill())
            .then_expect_error(OrderError::AlreadyExists);
        framework()
            .given(vec![seckill_rejected()])
            .when(place_seckill())
            .then_expect_error(OrderError::AlreadyExists);
        let mut other_user = place_seckill();
        if let OrderCommand::PlaceSeckillOrder { user_id, .. } = &mut other_user {
            *user_id = "mallory".into();
        }
        framework()
            .given(vec![seckill_placed()])
            .when(other_user)
            .then_expect_error(OrderError::AlreadyExists);
    }

    #[test]
    fn place_seckill_order_with_a_negative_price_is_invalid() {
        let mut command = place_seckill();
        if let OrderCommand::PlaceSeckillOrder { price_cents, .. } = &mut command {
            *price_cents = -1;
        }
        framework()
            .given_no_previous_events()
            .when(command)
            .then_expect_error(OrderError::NegativePrice);
    }

    // ---- RejectSeckillOrder ----

    #[test]
    fn reject_seckill_order() {
        framework()
            .given_no_previous_events()
            .when(reject_seckill())
            .then_expect_events(vec![seckill_rejected()]);
    }

    #[test]
    fn reject_seckill_order_again_is_a_no_op() {
        framework()
            .given(vec![seckill_rejected()])
            .when(reject_seckill())
            .then_expect_events(vec![]);
    }

    #[test]
    fn reject_seckill_order_that_was_placed_is_a_conflict() {
        framework()
            .given(vec![seckill_placed()])
            .when(reject_seckill())
            .then_expect_error(OrderError::AlreadyExists);
    }

    // ---- SubmitGoodsOrder ----

    #[test]
    fn submit_goods_order() {
        framework()
            .given_no_previous_events()
            .when(submit(requested()))
            .then_expect_events(vec![submitted()]);
    }

    #[test]
    fn submit_goods_order_again_is_a_no_op() {
        framework()
            .given(vec![submitted()])
            .when(submit(requested()))
            .then_expect_events(vec![]);
    }

    #[test]
    fn submit_goods_order_over_a_different_order_is_a_conflict() {
        framework()
            .given(vec![submitted()])
            .when(submit(vec![RequestedItem {
                product_id: id(APPLE),
                quantity: 1,
            }]))
            .then_expect_error(OrderError::AlreadyExists);
        framework()
            .given(vec![seckill_placed()])
            .when(submit(requested()))
            .then_expect_error(OrderError::AlreadyExists);
    }

    #[test]
    fn submit_goods_order_without_items_is_invalid() {
        framework()
            .given_no_previous_events()
            .when(submit(vec![]))
            .then_expect_error(OrderError::NoItems);
    }

    fn lines(n: usize) -> Vec<RequestedItem> {
        (0..n)
            .map(|i| RequestedItem {
                product_id: id(1000 + i as u128),
                quantity: 1,
            })
            .collect()
    }

    #[test]
    fn submit_goods_order_with_up_to_50_items() {
        let events = execute(&mut Order::default(), submit(lines(MAX_ITEMS)), &()).unwrap();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn submit_goods_order_with_too_many_items_is_invalid() {
        framework()
            .given_no_previous_events()
            .when(submit(lines(MAX_ITEMS + 1)))
            .then_expect_error(OrderError::TooManyItems { count: 51 });
    }

    #[test]
    fn submit_goods_order_with_a_quantity_out_of_range_is_invalid() {
        for quantity in [0, MAX_QUANTITY + 1] {
            framework()
                .given_no_previous_events()
                .when(submit(vec![RequestedItem {
                    product_id: id(APPLE),
                    quantity,
                }]))
                .then_expect_error(OrderError::InvalidQuantity {
                    product_id: id(APPLE),
                    quantity,
                });
        }
        let events = execute(
            &mut Order::default(),
            submit(vec![RequestedItem {
                product_id: id(APPLE),
                quantity: MAX_QUANTITY,
            }]),
            &(),
        )
        .unwrap();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn submit_goods_order_with_a_duplicate_product_is_invalid() {
        let mut items = requested();
        items.push(RequestedItem {
            product_id: id(APPLE),
            quantity: 1,
        });
        framework()
            .given_no_previous_events()
            .when(submit(items))
            .then_expect_error(OrderError::DuplicateProduct { product_id: id(APPLE) });
    }

    // ---- PlaceGoodsOrder ----

    #[test]
    fn place_goods_order_prices_it() {
        framework()
            .given(vec![submitted()])
            .when(place_goods(300))
            .then_expect_events(vec![goods_placed(300)]);
    }

    #[test]
    fn place_goods_order_clamps_the_discount_to_the_subtotal() {
        framework()
            .given(vec![submitted()])
            .when(place_goods(5_000))
            .then_expect_events(vec![goods_placed(810)]);
    }

    #[test]
    fn place_goods_order_again_is_a_no_op() {
        framework()
            .given(vec![submitted(), goods_placed(300)])
            .when(place_goods(300))
            .then_expect_events(vec![]);
    }

    #[test]
    fn place_goods_order_on_a_missing_order_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(place_goods(0))
            .then_expect_error(OrderError::NotFound);
    }

    #[test]
    fn place_goods_order_only_from_submitted() {
        for (history, from) in [
            (vec![submitted(), cancelled()], OrderStatus::Cancelled),
            (
                vec![submitted(), goods_rejected(OrderRejectionReason::CouponUnavailable)],
                OrderStatus::Rejected,
            ),
            (vec![seckill_placed()], OrderStatus::PendingPayment),
        ] {
            framework()
                .given(history)
                .when(place_goods(0))
                .then_expect_error(OrderError::InvalidTransition { from, action: "place" });
        }
    }

    fn place_goods_with(edit: impl FnOnce(&mut Vec<OrderItem>, &mut Option<Uuid>, &mut i64)) -> OrderCommand {
        let mut items = priced();
        let mut coupon_id = Some(id(COUPON));
        let mut discount_cents = 0;
        edit(&mut items, &mut coupon_id, &mut discount_cents);
        OrderCommand::PlaceGoodsOrder {
            merchant_id: SHOP.into(),
            items,
            coupon_id,
            discount_cents,
            placed_at: at_secs(1),
        }
    }

    #[test]
    fn place_goods_order_validates_the_priced_lines() {
        let cases: Vec<(OrderCommand, OrderError)> = vec![
            (place_goods_with(|items, _, _| items.clear()), OrderError::NoItems),
            (
                place_goods_with(|items, _, _| items[0].unit_price_cents = -1),
                OrderError::NegativePrice,
            ),
            (
                place_goods_with(|items, _, _| items[1].quantity = 2),
                OrderError::ItemsMismatch,
            ),
            (
                place_goods_with(|items, _, _| {
                    items.pop();
                }),
                OrderError::ItemsMismatch,
            ),
            (
                place_goods_with(|items, _, _| {
                    items[0].voucher_id = Some(id(VOUCHER));
                }),
                OrderError::ItemsMismatch,
            ),
            (
                place_goods_with(|items, _, _| items[0].product_id = Some(id(0xDEAD))),
                OrderError::ItemsMismatch,
            ),
            (
                place_goods_with(|_, coupon, _| *coupon = Some(id(0xC1))),
                OrderError::CouponMismatch,
            ),
            (
                place_goods_with(|_, _, discount| *discount = -1),
                OrderError::NegativeDiscount,
            ),
            (
                place_goods_with(|items, _, _| items[0].unit_price_cents = i64::MAX),
                OrderError::AmountOverflow,
            ),
        ];
        for (command, error) in cases {
            framework()
                .given(vec![submitted()])
                .when(command)
                .then_expect_error(error);
        }
    }

    #[test]
    fn place_goods_order_without_a_coupon_cannot_discount() {
        let without_coupon = OrderEvent::OrderSubmitted {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some(SHOP.into()),
            items: requested(),
            coupon_id: None,
            submitted_at: at_secs(0),
        };
        framework()
            .given(vec![without_coupon])
            .when(place_goods_with(|_, coupon, discount| {
                *coupon = None;
                *discount = 100;
            }))
            .then_expect_error(OrderError::DiscountWithoutCoupon);
    }

    // ---- RejectGoodsOrder ----

    fn reject_goods(reason: OrderRejectionReason) -> OrderCommand {
        OrderCommand::RejectGoodsOrder {
            reason,
            rejected_at: at_secs(1),
        }
    }

    #[test]
    fn reject_goods_order() {
        let reason = OrderRejectionReason::OutOfStock { product_id: id(APPLE) };
        framework()
            .given(vec![submitted()])
            .when(reject_goods(reason))
            .then_expect_events(vec![goods_rejected(reason)]);
    }

    #[test]
    fn reject_goods_order_again_is_a_no_op() {
        let reason = OrderRejectionReason::CouponUnavailable;
        framework()
            .given(vec![submitted(), goods_rejected(reason)])
            .when(reject_goods(reason))
            .then_expect_events(vec![]);
    }

    #[test]
    fn reject_goods_order_on_a_missing_order_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(reject_goods(OrderRejectionReason::CouponUnavailable))
            .then_expect_error(OrderError::NotFound);
    }

    #[test]
    fn reject_goods_order_only_from_submitted() {
        framework()
            .given(vec![
                submitted(),
                goods_rejected(OrderRejectionReason::CouponUnavailable),
            ])
            .when(reject_goods(OrderRejectionReason::CouponMinSpendNotMet))
            .then_expect_error(OrderError::InvalidTransition {
                from: OrderStatus::Rejected,
                action: "reject",
            });
        only_from(&[OrderStatus::Submitted, OrderStatus::Rejected], "reject", || {
            reject_goods(OrderRejectionReason::CouponUnavailable)
        });
    }

    // ---- StartPayment ----

    #[test]
    fn start_payment_while_pending() {
        framework()
            .given(vec![seckill_placed()])
            .when(start_payment(PAYMENT, 990))
            .then_expect_events(vec![payment_started()]);
    }

    #[test]
    fn start_payment_on_a_goods_order_uses_its_discounted_total() {
        framework()
            .given(vec![submitted(), goods_placed(300)])
            .when(start_payment(PAYMENT, 510))
            .then_expect_events(vec![OrderEvent::OrderPaymentStarted {
                payment_id: id(PAYMENT),
                amount_cents: 510,
            }]);
    }

    #[test]
    fn start_payment_again_with_the_same_payment_is_a_no_op() {
        for history in [vec![seckill_placed(), payment_started()], history_to(OrderStatus::Paid)] {
            framework()
                .given(history)
                .when(start_payment(PAYMENT, 990))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn start_payment_with_another_payment_is_a_conflict() {
        framework()
            .given(vec![seckill_placed(), payment_started()])
            .when(start_payment(0xBB, 990))
            .then_expect_error(OrderError::PaymentAlreadyStarted {
                payment_id: id(PAYMENT),
            });
    }

    #[test]
    fn start_payment_with_the_wrong_amount_is_a_conflict() {
        framework()
            .given(vec![seckill_placed()])
            .when(start_payment(PAYMENT, 989))
            .then_expect_error(OrderError::AmountMismatch {
                expected: 990,
                actual: 989,
            });
    }

    #[test]
    fn start_payment_only_while_pending_payment() {
        let expect = |status| match status {
            OrderStatus::Cancelled => OrderError::Cancelled,
            OrderStatus::Paid | OrderStatus::Preparing | OrderStatus::Completed => OrderError::AlreadyPaid,
            from => OrderError::InvalidTransition {
                from,
                action: "start payment for",
            },
        };
        for status in ALL_STATUSES {
            if status == OrderStatus::PendingPayment {
                continue;
            }
            // A new payment id, so no no-op applies.
            assert_eq!(
                when_in(status, start_payment(0xBB, 990)),
                Err(expect(status)),
                "{status:?}"
            );
        }
        framework()
            .given_no_previous_events()
            .when(start_payment(PAYMENT, 990))
            .then_expect_error(OrderError::NotFound);
    }

    // ---- MarkPaid ----

    #[test]
    fn mark_paid_a_pending_order() {
        framework()
            .given(vec![seckill_placed(), payment_started()])
            .when(mark_paid(PAYMENT, 990))
            .then_expect_events(vec![paid()]);
    }

    #[test]
    fn mark_paid_without_a_recorded_start() {
        framework()
            .given(vec![seckill_placed()])
            .when(mark_paid(PAYMENT, 990))
            .then_expect_events(vec![paid()]);
    }

    #[test]
    fn mark_paid_again_is_a_no_op_also_after_preparing_or_completing() {
        for status in [OrderStatus::Paid, OrderStatus::Preparing, OrderStatus::Completed] {
            assert_eq!(when_in(status, mark_paid(PAYMENT, 990)), Ok(vec![]));
        }
    }

    #[test]
    fn mark_paid_with_another_payment_after_paying_is_a_conflict() {
        framework()
            .given(history_to(OrderStatus::Paid))
            .when(mark_paid(0xBB, 990))
            .then_expect_error(OrderError::AlreadyPaid);
    }

    #[test]
    fn mark_paid_after_cancellation_is_refused_so_the_saga_refunds() {
        framework()
            .given(vec![seckill_placed(), payment_started(), cancelled()])
            .when(mark_paid(PAYMENT, 990))
            .then_expect_error(OrderError::Cancelled);
        framework()
            .given(vec![seckill_placed(), payment_started(), timed_out()])
            .when(mark_paid(PAYMENT, 990))
            .then_expect_error(OrderError::Cancelled);
    }

    #[test]
    fn mark_paid_with_the_wrong_amount_is_a_conflict() {
        framework()
            .given(vec![seckill_placed(), payment_started()])
            .when(mark_paid(PAYMENT, 1))
            .then_expect_error(OrderError::AmountMismatch {
                expected: 990,
                actual: 1,
            });
    }

    #[test]
    fn mark_paid_with_another_payment_than_started_is_a_conflict() {
        framework()
            .given(vec![seckill_placed(), payment_started()])
            .when(mark_paid(0xBB, 990))
            .then_expect_error(OrderError::PaymentMismatch {
                expected: id(PAYMENT),
                actual: id(0xBB),
            });
    }

    #[test]
    fn mark_paid_on_submitted_rejected_or_missing_orders_is_refused() {
        for status in [OrderStatus::Submitted, OrderStatus::Rejected] {
            assert_eq!(
                when_in(status, mark_paid(PAYMENT, 990)),
                Err(OrderError::InvalidTransition {
                    from: status,
                    action: "pay"
                })
            );
        }
        framework()
            .given_no_previous_events()
            .when(mark_paid(PAYMENT, 990))
            .then_expect_error(OrderError::NotFound);
    }

    // ---- Cancel ----

    #[test]
    fn customer_cancels_their_pending_order() {
        framework()
            .given(vec![seckill_placed()])
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_events(vec![cancelled()]);
    }

    #[test]
    fn customer_cancels_their_submitted_order() {
        framework()
            .given(vec![submitted()])
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_events(vec![cancelled()]);
    }

    #[test]
    fn admin_and_system_cancel_anyone_s_order() {
        for (by, role, reason) in [
            ("admin-1", CancellerRole::Admin, CancellationReason::AdminRequested),
            ("payments", CancellerRole::System, CancellationReason::PaymentFailed),
        ] {
            framework()
                .given(vec![seckill_placed(), payment_started()])
                .when(OrderCommand::Cancel {
                    by: by.into(),
                    by_role: role,
                    reason,
                    at: at_secs(30),
                })
                .then_expect_events(vec![OrderEvent::OrderCancelled {
                    reason,
                    cancelled_by: by.into(),
                    cancelled_at: at_secs(30),
                }]);
        }
    }

    #[test]
    fn customer_cannot_cancel_someone_else_s_order() {
        for status in ALL_STATUSES {
            assert_eq!(
                when_in(status, cancel("mallory", CancellerRole::Customer)),
                Err(OrderError::NotFound)
            );
        }
    }

    #[test]
    fn cancel_twice_is_a_conflict() {
        framework()
            .given(vec![seckill_placed(), cancelled()])
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_error(OrderError::AlreadyCancelled);
        framework()
            .given(vec![seckill_placed(), timed_out()])
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_error(OrderError::AlreadyCancelled);
    }

    #[test]
    fn cancel_a_paid_order_is_refused() {
        for status in [OrderStatus::Paid, OrderStatus::Preparing, OrderStatus::Completed] {
            assert_eq!(
                when_in(status, cancel("alice", CancellerRole::Customer)),
                Err(OrderError::AlreadyPaid)
            );
            assert_eq!(
                when_in(status, cancel("admin-1", CancellerRole::Admin)),
                Err(OrderError::AlreadyPaid)
            );
        }
    }

    #[test]
    fn cancel_a_rejected_or_missing_order_is_refused() {
        framework()
            .given(vec![seckill_rejected()])
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_error(OrderError::InvalidTransition {
                from: OrderStatus::Rejected,
                action: "cancel",
            });
        framework()
            .given_no_previous_events()
            .when(cancel("alice", CancellerRole::Customer))
            .then_expect_error(OrderError::NotFound);
    }

    // ---- TimeOut ----

    #[test]
    fn time_out_a_pending_order() {
        framework()
            .given(vec![seckill_placed(), payment_started()])
            .when(time_out(900))
            .then_expect_events(vec![timed_out()]);
    }

    #[test]
    fn time_out_in_any_other_state_is_a_no_op() {
        for status in ALL_STATUSES {
            if status == OrderStatus::PendingPayment {
                continue;
            }
            assert_eq!(when_in(status, time_out(900)), Ok(vec![]), "{status:?}");
        }
        framework()
            .given(vec![seckill_placed(), timed_out()])
            .when(time_out(901))
            .then_expect_events(vec![]);
    }

    #[test]
    fn time_out_before_the_deadline_is_refused() {
        framework()
            .given(vec![seckill_placed()])
            .when(time_out(899))
            .then_expect_error(OrderError::DeadlineNotReached);
    }

    #[test]
    fn time_out_of_a_missing_order_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(time_out(900))
            .then_expect_error(OrderError::NotFound);
    }

    // ---- StartPreparing / Complete ----

    #[test]
    fn a_merchant_acts_only_on_its_own_orders() {
        let prepare = |merchant: &str| OrderCommand::StartPreparing {
            merchant: Some(merchant.into()),
            at: at_secs(120),
        };
        framework()
            .given(history_to(OrderStatus::Paid))
            .when(prepare(SHOP))
            .then_expect_events(vec![preparing()]);
        // another merchant's order is answered as missing, whatever its state
        for status in ALL_STATUSES {
            assert_eq!(when_in(status, prepare("shop-2")), Err(OrderError::NotFound));
            assert_eq!(
                when_in(
                    status,
                    OrderCommand::Complete {
                        merchant: Some("shop-2".into()),
                        at: at_secs(180),
                    }
                ),
                Err(OrderError::NotFound)
            );
        }
    }

    #[test]
    fn a_goods_order_is_placed_for_the_merchant_it_was_submitted_to() {
        let mut command = place_goods(0);
        if let OrderCommand::PlaceGoodsOrder { merchant_id, .. } = &mut command {
            *merchant_id = "shop-2".into();
        }
        framework()
            .given(vec![submitted()])
            .when(command)
            .then_expect_error(OrderError::MerchantMismatch {
                expected: SHOP.into(),
                actual: "shop-2".into(),
            });
    }

    #[test]
    fn start_preparing_a_paid_order() {
        framework()
            .given(history_to(OrderStatus::Paid))
            .when(OrderCommand::StartPreparing {
                merchant: None,
                at: at_secs(120),
            })
            .then_expect_events(vec![preparing()]);
    }

    #[test]
    fn start_preparing_only_from_paid() {
        only_from(&[OrderStatus::Paid], "start preparing", || {
            OrderCommand::StartPreparing {
                merchant: None,
                at: at_secs(120),
            }
        });
        framework()
            .given_no_previous_events()
            .when(OrderCommand::StartPreparing {
                merchant: None,
                at: at_secs(120),
            })
            .then_expect_error(OrderError::NotFound);
    }

    #[test]
    fn complete_a_preparing_order() {
        framework()
            .given(history_to(OrderStatus::Preparing))
            .when(OrderCommand::Complete {
                merchant: None,
                at: at_secs(180),
            })
            .then_expect_events(vec![completed()]);
    }

    #[test]
    fn complete_only_from_preparing() {
        only_from(&[OrderStatus::Preparing], "complete", || OrderCommand::Complete {
            merchant: None,
            at: at_secs(180),
        });
        framework()
            .given_no_previous_events()
            .when(OrderCommand::Complete {
                merchant: None,
                at: at_secs(180),
            })
            .then_expect_error(OrderError::NotFound);
    }

    // ---- Refund ----

    #[test]
    fn refund_a_payment_that_arrived_after_cancellation() {
        framework()
            .given(vec![seckill_placed(), payment_started(), cancelled()])
            .when(refund(PAYMENT, 990))
            .then_expect_events(vec![refunded()]);
    }

    #[test]
    fn refund_twice_is_a_no_op() {
        framework()
            .given(vec![seckill_placed(), payment_started(), cancelled(), refunded()])
            .when(refund(PAYMENT, 990))
            .then_expect_events(vec![]);
    }

    #[test]
    fn refund_only_from_cancelled() {
        for status in ALL_STATUSES {
            if status == OrderStatus::Cancelled {
                continue;
            }
            assert_eq!(
                when_in(status, refund(PAYMENT, 990)),
                Err(OrderError::InvalidTransition {
                    from: status,
                    action: "refund"
                })
            );
        }
        framework()
            .given_no_previous_events()
            .when(refund(PAYMENT, 990))
            .then_expect_error(OrderError::NotFound);
    }

    #[test]
    fn refund_of_another_payment_or_amount_is_a_conflict() {
        framework()
            .given(vec![seckill_placed(), payment_started(), cancelled()])
            .when(refund(0xBB, 990))
            .then_expect_error(OrderError::PaymentMismatch {
                expected: id(PAYMENT),
                actual: id(0xBB),
            });
        framework()
            .given(vec![seckill_placed(), payment_started(), cancelled()])
            .when(refund(PAYMENT, 500))
            .then_expect_error(OrderError::AmountMismatch {
                expected: 990,
                actual: 500,
            });
    }

    // ---- state ----

    #[test]
    fn helpers_read_the_folded_state() {
        let order: Order = replay(vec![submitted(), goods_placed(300), payment_started()]);
        assert_eq!(order.status(), Some(OrderStatus::PendingPayment));
        assert_eq!(order.order_id(), Some(id(ORDER)));
        assert_eq!(order.user_id(), Some("alice"));
        assert_eq!(order.kind(), Some(OrderKind::Goods));
        assert_eq!(order.coupon_id(), Some(id(COUPON)));
        assert_eq!(order.voucher_id(), None);
        assert_eq!(order.subtotal_cents(), 810);
        assert_eq!(order.discount_cents(), 300);
        assert_eq!(order.total_cents(), 510);
        assert_eq!(order.items(), priced().as_slice());
        assert_eq!(order.requested_items(), requested().as_slice());
        assert_eq!(order.payment_id(), Some(id(PAYMENT)));
        assert!(order.was_placed());
        assert!(!order.is_paid());

        let gone: Order = replay(vec![seckill_placed(), timed_out()]);
        assert_eq!(gone.status(), Some(OrderStatus::Cancelled));
        assert!(gone.timed_out());
        assert_eq!(gone.voucher_id(), Some(id(VOUCHER)));

        let missing = Order::default();
        assert_eq!(missing.status(), None);
        assert_eq!(missing.user_id(), None);
    }

    #[test]
    fn a_full_lifecycle_runs_through_the_cache_rules() {
        let mut order = Order::default();
        let steps = [
            place_seckill(),
            start_payment(PAYMENT, 990),
            mark_paid(PAYMENT, 990),
            OrderCommand::StartPreparing {
                merchant: None,
                at: at_secs(120),
            },
            OrderCommand::Complete {
                merchant: None,
                at: at_secs(180),
            },
        ];
        for step in steps {
            assert_eq!(execute(&mut order, step, &()).unwrap().len(), 1);
        }
        assert_eq!(order.status(), Some(OrderStatus::Completed));
        assert_eq!(order, replay(history_to(OrderStatus::Completed)));
    }

    #[test]
    fn every_error_has_a_distinct_code() {
        let all = [
            OrderError::NotFound,
            OrderError::AlreadyExists,
            OrderError::NegativePrice,
            OrderError::NoItems,
            OrderError::TooManyItems { count: 0 },
            OrderError::InvalidQuantity {
                product_id: id(0),
                quantity: 0,
            },
            OrderError::DuplicateProduct { product_id: id(0) },
            OrderError::ItemsMismatch,
            OrderError::CouponMismatch,
            OrderError::NegativeDiscount,
            OrderError::DiscountWithoutCoupon,
            OrderError::AmountOverflow,
            OrderError::AmountMismatch { expected: 0, actual: 0 },
            OrderError::PaymentAlreadyStarted { payment_id: id(0) },
            OrderError::PaymentMismatch {
                expected: id(0),
                actual: id(0),
            },
            OrderError::AlreadyPaid,
            OrderError::Cancelled,
            OrderError::AlreadyCancelled,
            OrderError::MerchantMismatch {
                expected: "m-1".into(),
                actual: "m-2".into(),
            },
            OrderError::DeadlineNotReached,
            OrderError::InvalidTransition {
                from: OrderStatus::Paid,
                action: "cancel",
            },
        ];
        let codes: BTreeSet<_> = all.iter().map(DomainError::code).collect();
        assert_eq!(codes.len(), all.len());
        // another's order is answered as missing (API.md "Auth")
        assert_eq!(OrderError::NotFound.kind().http_status(), 404);
    }
}
