//! The order document: what a customer, merchant or admin sees of one order,
//! from submission or placement to its end, with every status change.

use chrono::{DateTime, Utc};
use events::{
    CancellationReason, EventEnvelope, OrderEvent, OrderItem, OrderKind, OrderRejectionReason, OrderStatus,
    RequestedItem,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApplyError, Columns, Projector};

/// One line of the order. Before a goods order is placed only what the
/// customer asked for is known, so name and prices are null until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: Option<Uuid>,
    pub voucher_id: Option<Uuid>,
    pub name: Option<String>,
    pub quantity: u32,
    pub unit_price_cents: Option<i64>,
    /// quantity × unit price.
    pub total_cents: Option<i64>,
}

impl From<RequestedItem> for OrderLine {
    fn from(item: RequestedItem) -> Self {
        Self {
            product_id: Some(item.product_id),
            voucher_id: None,
            name: None,
            quantity: item.quantity,
            unit_price_cents: None,
            total_cents: None,
        }
    }
}

impl From<OrderItem> for OrderLine {
    fn from(item: OrderItem) -> Self {
        // The aggregate refuses orders whose total overflows, so saturation
        // never shows; it only keeps this function total.
        let total = i64::from(item.quantity).saturating_mul(item.unit_price_cents);
        Self {
            product_id: item.product_id,
            voucher_id: item.voucher_id,
            name: Some(item.name),
            quantity: item.quantity,
            unit_price_cents: Some(item.unit_price_cents),
            total_cents: Some(total),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Refunded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub payment_id: Uuid,
    pub status: PaymentStatus,
    pub amount_cents: i64,
}

/// [`CancellationReason`] plus the timeout, which the aggregate records as
/// its own event but the customer sees as one more way to be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    CustomerRequested,
    AdminRequested,
    PaymentFailed,
    TimedOut,
}

impl From<CancellationReason> for CancelReason {
    fn from(reason: CancellationReason) -> Self {
        match reason {
            CancellationReason::CustomerRequested => Self::CustomerRequested,
            CancellationReason::AdminRequested => Self::AdminRequested,
            CancellationReason::PaymentFailed => Self::PaymentFailed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    pub reason: CancelReason,
    /// A user id, or the name of the system actor that cancelled.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub status: OrderStatus,
    /// When it happened according to the event, not when it was recorded.
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    pub order_id: Uuid,
    pub user_id: String,
    /// The merchant the order belongs to; `null` only on orders recorded
    /// before tenancy, or rejected for a voucher nobody owns.
    pub merchant_id: Option<String>,
    pub kind: OrderKind,
    pub status: OrderStatus,
    pub items: Vec<OrderLine>,
    pub voucher_id: Option<Uuid>,
    pub coupon_id: Option<Uuid>,
    pub subtotal_cents: i64,
    pub discount_cents: i64,
    /// 0 until the order is placed.
    pub total_cents: i64,
    pub payment: Option<PaymentView>,
    pub rejection: Option<OrderRejectionReason>,
    pub cancellation: Option<Cancellation>,
    /// Every status the order went through, the first one its creation.
    pub history: Vec<StatusChange>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl OrderView {
    /// The document of an order's first event, or `None` when the event
    /// cannot be one.
    fn create(event: OrderEvent, envelope: &EventEnvelope) -> Option<Self> {
        let blank = |order_id: Uuid,
                     user_id: String,
                     merchant_id: Option<String>,
                     kind: OrderKind,
                     status: OrderStatus,
                     at: DateTime<Utc>| Self {
            order_id,
            user_id,
            merchant_id,
            kind,
            status,
            items: Vec::new(),
            voucher_id: None,
            coupon_id: None,
            subtotal_cents: 0,
            discount_cents: 0,
            total_cents: 0,
            payment: None,
            rejection: None,
            cancellation: None,
            history: vec![StatusChange { status, at }],
            version: envelope.sequence,
            created_at: at,
            updated_at: envelope.recorded_at,
        };
        match event {
            OrderEvent::OrderSubmitted {
                order_id,
                user_id,
                merchant_id,
                items,
                coupon_id,
                submitted_at,
            } => {
                let mut view = blank(
                    order_id,
                    user_id,
                    merchant_id,
                    OrderKind::Goods,
                    OrderStatus::Submitted,
                    submitted_at,
                );
                view.items = items.into_iter().map(OrderLine::from).collect();
                view.coupon_id = coupon_id;
                Some(view)
            }
            // Only seckill orders start placed or rejected; a goods order's
            // placement or rejection follows its submission.
            OrderEvent::OrderPlaced {
                order_id,
                user_id,
                merchant_id,
                kind: kind @ OrderKind::SeckillVoucher,
                items,
                voucher_id,
                coupon_id,
                subtotal_cents,
                discount_cents,
                total_cents,
                placed_at,
            } => {
                let mut view = blank(
                    order_id,
                    user_id,
                    merchant_id,
                    kind,
                    OrderStatus::PendingPayment,
                    placed_at,
                );
                view.place(
                    items,
                    voucher_id,
                    coupon_id,
                    subtotal_cents,
                    discount_cents,
                    total_cents,
                );
                Some(view)
            }
            OrderEvent::OrderRejected {
                order_id,
                user_id,
                merchant_id,
                kind: kind @ OrderKind::SeckillVoucher,
                voucher_id,
                reason,
                rejected_at,
            } => {
                let mut view = blank(order_id, user_id, merchant_id, kind, OrderStatus::Rejected, rejected_at);
                view.voucher_id = voucher_id;
                view.rejection = Some(reason);
                Some(view)
            }
            _ => None,
        }
    }

    /// Applies an event that follows the first; `false` when it cannot.
    fn update(&mut self, event: OrderEvent, envelope: &EventEnvelope) -> bool {
        match event {
            OrderEvent::OrderSubmitted { .. } => return false,
            OrderEvent::OrderPlaced {
                merchant_id,
                kind,
                items,
                voucher_id,
                coupon_id,
                subtotal_cents,
                discount_cents,
                total_cents,
                placed_at,
                ..
            } => {
                if kind != OrderKind::Goods || self.kind != OrderKind::Goods {
                    return false;
                }
                if merchant_id.is_some() {
                    self.merchant_id = merchant_id;
                }
                self.place(
                    items,
                    voucher_id,
                    coupon_id,
                    subtotal_cents,
                    discount_cents,
                    total_cents,
                );
                self.transition(OrderStatus::PendingPayment, placed_at);
            }
            OrderEvent::OrderRejected {
                kind,
                voucher_id,
                reason,
                rejected_at,
                ..
            } => {
                if kind != OrderKind::Goods || self.kind != OrderKind::Goods {
                    return false;
                }
                // As the aggregate does: a goods rejection names no voucher.
                if voucher_id.is_some() {
                    self.voucher_id = voucher_id;
                }
                self.rejection = Some(reason);
                self.transition(OrderStatus::Rejected, rejected_at);
            }
            OrderEvent::OrderPaymentStarted {
                payment_id,
                amount_cents,
            } => {
                self.payment = Some(PaymentView {
                    payment_id,
                    status: PaymentStatus::Pending,
                    amount_cents,
                });
            }
            // Replaces rather than updates the payment: the aggregate accepts
            // a payment whose start was never recorded.
            OrderEvent::OrderPaid {
                payment_id,
                amount_cents,
                paid_at,
            } => {
                self.payment = Some(PaymentView {
                    payment_id,
                    status: PaymentStatus::Succeeded,
                    amount_cents,
                });
                self.transition(OrderStatus::Paid, paid_at);
            }
            OrderEvent::OrderCancelled {
                reason,
                cancelled_by,
                cancelled_at,
            } => {
                self.cancellation = Some(Cancellation {
                    reason: reason.into(),
                    by: cancelled_by,
                });
                self.transition(OrderStatus::Cancelled, cancelled_at);
            }
            OrderEvent::OrderTimedOut { timed_out_at, .. } => {
                // The event names no canceller; the process that fired the
                // timeout is in the metadata, which replay reads as well.
                self.cancellation = Some(Cancellation {
                    reason: CancelReason::TimedOut,
                    by: envelope.metadata.actor.id.clone(),
                });
                self.transition(OrderStatus::Cancelled, timed_out_at);
            }
            OrderEvent::OrderPreparationStarted { at } => self.transition(OrderStatus::Preparing, at),
            OrderEvent::OrderCompleted { at } => self.transition(OrderStatus::Completed, at),
            // A refund is of a payment that arrived after cancellation, which
            // may be the first the order hears of it.
            OrderEvent::OrderRefunded {
                payment_id,
                amount_cents,
                ..
            } => {
                self.payment = Some(PaymentView {
                    payment_id,
                    status: PaymentStatus::Refunded,
                    amount_cents,
                });
            }
        }
        true
    }

    fn place(
        &mut self,
        items: Vec<OrderItem>,
        voucher_id: Option<Uuid>,
        coupon_id: Option<Uuid>,
        subtotal_cents: i64,
        discount_cents: i64,
        total_cents: i64,
    ) {
        self.items = items.into_iter().map(OrderLine::from).collect();
        self.voucher_id = voucher_id;
        self.coupon_id = coupon_id;
        self.subtotal_cents = subtotal_cents;
        self.discount_cents = discount_cents;
        self.total_cents = total_cents;
    }

    fn transition(&mut self, status: OrderStatus, at: DateTime<Utc>) {
        if self.status != status {
            self.status = status;
            self.history.push(StatusChange { status, at });
        }
    }
}

pub struct OrderProjector;

impl Projector for OrderProjector {
    type View = OrderView;
    const NAME: &'static str = "orders";
    const TABLE: &'static str = "order_view";
    const AGGREGATE_TYPE: &'static str = "Order";

    fn apply(view: Option<OrderView>, event: &EventEnvelope) -> Result<OrderView, ApplyError> {
        let decoded = event.decode::<OrderEvent>()?;
        let mut view = match view {
            None => OrderView::create(decoded, event).ok_or_else(|| unexpected(event, "a missing order"))?,
            Some(mut view) => {
                if !view.update(decoded, event) {
                    return Err(unexpected(event, "an existing order"));
                }
                view
            }
        };
        view.version = event.sequence;
        view.updated_at = event.recorded_at;
        Ok(view)
    }

    fn version(view: &OrderView) -> u64 {
        view.version
    }

    fn columns(view: &OrderView) -> Columns {
        Columns {
            user_id: Some(view.user_id.clone()),
            merchant_id: view.merchant_id.clone(),
            status: Some(view.status.as_str().to_owned()),
            created_at: Some(view.created_at),
            updated_at: Some(view.updated_at),
        }
    }
}

fn unexpected(event: &EventEnvelope, state: &'static str) -> ApplyError {
    ApplyError::Unexpected {
        event_type: event.event_type.clone(),
        state,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::{Duration, TimeZone};
    use events::EventMetadata;
    use serde_json::Value;

    use super::*;

    const ORDER: u128 = 0x0D;
    const VOUCHER: u128 = 0xF00D;
    const COUPON: u128 = 0xC0;
    const PAYMENT: u128 = 0xBA7;
    const APPLE: u128 = 0xA1;
    const BREAD: u128 = 0xB2;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(seconds)
    }

    /// Recorded a little after the fact, so tests can tell event times from
    /// recording times.
    fn recorded(seconds: i64) -> DateTime<Utc> {
        at(seconds) + Duration::milliseconds(250)
    }

    fn envelope(sequence: u64, event: &OrderEvent, seconds: i64) -> EventEnvelope {
        EventEnvelope::new(
            id(ORDER).to_string(),
            sequence,
            i64::try_from(sequence).unwrap() + 100,
            event,
            EventMetadata::system("test"),
            recorded(seconds),
        )
        .unwrap()
    }

    /// Applies the events in order, each at its index in seconds.
    fn project(events: &[OrderEvent]) -> Result<OrderView, ApplyError> {
        let mut view = None;
        for (n, event) in events.iter().enumerate() {
            let n = u64::try_from(n).unwrap();
            view = Some(OrderProjector::apply(
                view,
                &envelope(n + 1, event, i64::try_from(n).unwrap()),
            )?);
        }
        Ok(view.expect("no events"))
    }

    fn seckill_placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some("shop-1".into()),
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
            placed_at: at(0),
        }
    }

    fn seckill_rejected() -> OrderEvent {
        OrderEvent::OrderRejected {
            order_id: id(ORDER),
            user_id: "alice".into(),
            merchant_id: Some("shop-1".into()),
            kind: OrderKind::SeckillVoucher,
            voucher_id: Some(id(VOUCHER)),
            reason: OrderRejectionReason::SoldOut,
            rejected_at: at(0),
        }
    }

    fn goods_submitted() -> OrderEvent {
        OrderEvent::OrderSubmitted {
            order_id: id(ORDER),
            user_id: "bob".into(),
            merchant_id: Some("shop-2".into()),
            items: vec![
                RequestedItem {
                    product_id: id(APPLE),
                    quantity: 3,
                },
                RequestedItem {
                    product_id: id(BREAD),
                    quantity: 1,
                },
            ],
            coupon_id: Some(id(COUPON)),
            submitted_at: at(0),
        }
    }

    fn goods_placed(seconds: i64) -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: id(ORDER),
            user_id: "bob".into(),
            merchant_id: Some("shop-2".into()),
            kind: OrderKind::Goods,
            items: vec![
                OrderItem {
                    product_id: Some(id(APPLE)),
                    voucher_id: None,
                    name: "Apple".into(),
                    quantity: 3,
                    unit_price_cents: 150,
                },
                OrderItem {
                    product_id: Some(id(BREAD)),
                    voucher_id: None,
                    name: "Bread".into(),
                    quantity: 1,
                    unit_price_cents: 420,
                },
            ],
            voucher_id: None,
            coupon_id: Some(id(COUPON)),
            subtotal_cents: 870,
            discount_cents: 300,
            total_cents: 570,
            placed_at: at(seconds),
        }
    }

    fn goods_rejected(seconds: i64) -> OrderEvent {
        OrderEvent::OrderRejected {
            order_id: id(ORDER),
            user_id: "bob".into(),
            merchant_id: Some("shop-2".into()),
            kind: OrderKind::Goods,
            voucher_id: None,
            reason: OrderRejectionReason::OutOfStock { product_id: id(BREAD) },
            rejected_at: at(seconds),
        }
    }

    fn payment_started(amount_cents: i64) -> OrderEvent {
        OrderEvent::OrderPaymentStarted {
            payment_id: id(PAYMENT),
            amount_cents,
        }
    }

    fn paid(amount_cents: i64, seconds: i64) -> OrderEvent {
        OrderEvent::OrderPaid {
            payment_id: id(PAYMENT),
            amount_cents,
            paid_at: at(seconds),
        }
    }

    fn cancelled(seconds: i64) -> OrderEvent {
        OrderEvent::OrderCancelled {
            reason: CancellationReason::CustomerRequested,
            cancelled_by: "bob".into(),
            cancelled_at: at(seconds),
        }
    }

    fn timed_out(seconds: i64) -> OrderEvent {
        OrderEvent::OrderTimedOut {
            deadline: at(seconds - 1),
            timed_out_at: at(seconds),
        }
    }

    fn refunded(amount_cents: i64, seconds: i64) -> OrderEvent {
        OrderEvent::OrderRefunded {
            payment_id: id(PAYMENT),
            amount_cents,
            reason: "paid after cancellation".into(),
            at: at(seconds),
        }
    }

    fn history(view: &OrderView) -> Vec<(OrderStatus, DateTime<Utc>)> {
        view.history.iter().map(|change| (change.status, change.at)).collect()
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn seckill_placement_creates_a_pending_payment_order() {
        let view = project(&[seckill_placed()]).unwrap();

        assert_eq!(view.order_id, id(ORDER));
        assert_eq!(view.user_id, "alice");
        assert_eq!(view.kind, OrderKind::SeckillVoucher);
        assert_eq!(view.status, OrderStatus::PendingPayment);
        assert_eq!(
            view.items,
            vec![OrderLine {
                product_id: None,
                voucher_id: Some(id(VOUCHER)),
                name: Some("Two coffees for one".into()),
                quantity: 1,
                unit_price_cents: Some(990),
                total_cents: Some(990),
            }]
        );
        assert_eq!(view.voucher_id, Some(id(VOUCHER)));
        assert_eq!(view.coupon_id, None);
        assert_eq!(
            (view.subtotal_cents, view.discount_cents, view.total_cents),
            (990, 0, 990)
        );
        assert_eq!(view.payment, None);
        assert_eq!(view.rejection, None);
        assert_eq!(view.cancellation, None);
        assert_eq!(history(&view), vec![(OrderStatus::PendingPayment, at(0))]);
        assert_eq!(view.version, 1);
        assert_eq!(view.created_at, at(0));
        assert_eq!(view.updated_at, recorded(0));
    }

    #[test]
    fn seckill_lifecycle_from_placement_to_completion() {
        let view = project(&[
            seckill_placed(),
            payment_started(990),
            paid(990, 2),
            OrderEvent::OrderPreparationStarted { at: at(3) },
            OrderEvent::OrderCompleted { at: at(4) },
        ])
        .unwrap();

        assert_eq!(view.status, OrderStatus::Completed);
        assert_eq!(
            view.payment,
            Some(PaymentView {
                payment_id: id(PAYMENT),
                status: PaymentStatus::Succeeded,
                amount_cents: 990,
            })
        );
        // Starting a payment changes no status, so it adds no history.
        assert_eq!(
            history(&view),
            vec![
                (OrderStatus::PendingPayment, at(0)),
                (OrderStatus::Paid, at(2)),
                (OrderStatus::Preparing, at(3)),
                (OrderStatus::Completed, at(4)),
            ]
        );
        assert_eq!(view.version, 5);
        assert_eq!(view.created_at, at(0));
        assert_eq!(view.updated_at, recorded(4));
    }

    #[test]
    fn starting_a_payment_records_it_pending_without_a_status_change() {
        let view = project(&[seckill_placed(), payment_started(990)]).unwrap();

        assert_eq!(view.status, OrderStatus::PendingPayment);
        assert_eq!(
            view.payment,
            Some(PaymentView {
                payment_id: id(PAYMENT),
                status: PaymentStatus::Pending,
                amount_cents: 990,
            })
        );
        assert_eq!(view.history.len(), 1);
        assert_eq!(view.version, 2);
    }

    #[test]
    fn a_payment_without_a_recorded_start_still_shows() {
        let view = project(&[seckill_placed(), paid(990, 1)]).unwrap();

        assert_eq!(view.status, OrderStatus::Paid);
        assert_eq!(view.payment.map(|p| p.status), Some(PaymentStatus::Succeeded));
    }

    #[test]
    fn seckill_rejection_creates_a_rejected_order() {
        let view = project(&[seckill_rejected()]).unwrap();

        assert_eq!(view.kind, OrderKind::SeckillVoucher);
        assert_eq!(view.status, OrderStatus::Rejected);
        assert_eq!(view.rejection, Some(OrderRejectionReason::SoldOut));
        assert_eq!(view.voucher_id, Some(id(VOUCHER)));
        assert!(view.items.is_empty());
        assert_eq!(view.total_cents, 0);
        assert_eq!(history(&view), vec![(OrderStatus::Rejected, at(0))]);
        assert_eq!(view.created_at, at(0));
    }

    #[test]
    fn goods_submission_shows_the_requested_items_unpriced() {
        let view = project(&[goods_submitted()]).unwrap();

        assert_eq!(view.kind, OrderKind::Goods);
        assert_eq!(view.status, OrderStatus::Submitted);
        assert_eq!(view.user_id, "bob");
        assert_eq!(view.coupon_id, Some(id(COUPON)));
        assert_eq!(view.voucher_id, None);
        assert_eq!(
            view.items,
            vec![
                OrderLine {
                    product_id: Some(id(APPLE)),
                    voucher_id: None,
                    name: None,
                    quantity: 3,
                    unit_price_cents: None,
                    total_cents: None,
                },
                OrderLine {
                    product_id: Some(id(BREAD)),
                    voucher_id: None,
                    name: None,
                    quantity: 1,
                    unit_price_cents: None,
                    total_cents: None,
                },
            ]
        );
        assert_eq!((view.subtotal_cents, view.discount_cents, view.total_cents), (0, 0, 0));
        assert_eq!(history(&view), vec![(OrderStatus::Submitted, at(0))]);
    }

    #[test]
    fn goods_placement_prices_the_items() {
        let view = project(&[goods_submitted(), goods_placed(1)]).unwrap();

        assert_eq!(view.status, OrderStatus::PendingPayment);
        let lines: Vec<_> = view
            .items
            .iter()
            .map(|line| {
                (
                    line.name.as_deref(),
                    line.quantity,
                    line.unit_price_cents,
                    line.total_cents,
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (Some("Apple"), 3, Some(150), Some(450)),
                (Some("Bread"), 1, Some(420), Some(420)),
            ]
        );
        assert_eq!(
            (view.subtotal_cents, view.discount_cents, view.total_cents),
            (870, 300, 570)
        );
        assert_eq!(view.coupon_id, Some(id(COUPON)));
        // Creation time stays the submission's.
        assert_eq!(view.created_at, at(0));
    }

    #[test]
    fn goods_lifecycle_submitted_placed_cancelled() {
        let view = project(&[goods_submitted(), goods_placed(1), cancelled(2)]).unwrap();

        assert_eq!(view.status, OrderStatus::Cancelled);
        assert_eq!(
            view.cancellation,
            Some(Cancellation {
                reason: CancelReason::CustomerRequested,
                by: "bob".into(),
            })
        );
        assert_eq!(
            history(&view),
            vec![
                (OrderStatus::Submitted, at(0)),
                (OrderStatus::PendingPayment, at(1)),
                (OrderStatus::Cancelled, at(2)),
            ]
        );
        assert_eq!(view.version, 3);
        assert_eq!(view.updated_at, recorded(2));
    }

    #[test]
    fn goods_rejection_after_submission_keeps_the_requested_items() {
        let view = project(&[goods_submitted(), goods_rejected(1)]).unwrap();

        assert_eq!(view.status, OrderStatus::Rejected);
        assert_eq!(
            view.rejection,
            Some(OrderRejectionReason::OutOfStock { product_id: id(BREAD) })
        );
        assert_eq!(view.items.len(), 2);
        assert_eq!(view.voucher_id, None);
        assert_eq!(
            history(&view),
            vec![(OrderStatus::Submitted, at(0)), (OrderStatus::Rejected, at(1))]
        );
    }

    #[test]
    fn a_timeout_cancels_with_reason_timed_out_by_the_firing_process() {
        let view = project(&[seckill_placed(), payment_started(990), timed_out(5)]).unwrap();

        assert_eq!(view.status, OrderStatus::Cancelled);
        assert_eq!(
            view.cancellation,
            Some(Cancellation {
                reason: CancelReason::TimedOut,
                by: "test".into(),
            })
        );
        assert_eq!(
            view.history.last().map(|c| (c.status, c.at)),
            Some((OrderStatus::Cancelled, at(5)))
        );
        // The started payment is still shown as it was.
        assert_eq!(view.payment.map(|p| p.status), Some(PaymentStatus::Pending));
    }

    #[test]
    fn a_refund_marks_the_payment_refunded_and_keeps_the_status() {
        let view = project(&[seckill_placed(), payment_started(990), timed_out(2), refunded(990, 3)]).unwrap();

        assert_eq!(view.status, OrderStatus::Cancelled);
        assert_eq!(
            view.payment,
            Some(PaymentView {
                payment_id: id(PAYMENT),
                status: PaymentStatus::Refunded,
                amount_cents: 990,
            })
        );
        assert_eq!(view.history.len(), 2);
    }

    #[test]
    fn a_refund_of_a_payment_never_started_still_shows_it() {
        let view = project(&[goods_submitted(), goods_placed(1), cancelled(2), refunded(570, 3)]).unwrap();

        assert_eq!(
            view.payment.map(|p| (p.status, p.amount_cents)),
            Some((PaymentStatus::Refunded, 570))
        );
    }

    #[test]
    fn events_after_the_first_need_a_document() {
        for event in [
            goods_placed(0),
            goods_rejected(0),
            payment_started(990),
            paid(990, 0),
            cancelled(0),
            timed_out(0),
            OrderEvent::OrderPreparationStarted { at: at(0) },
            OrderEvent::OrderCompleted { at: at(0) },
            refunded(990, 0),
        ] {
            let result = OrderProjector::apply(None, &envelope(1, &event, 0));
            assert!(
                matches!(result, Err(ApplyError::Unexpected { .. })),
                "{event:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn creation_events_on_an_existing_document_are_unexpected() {
        let goods = project(&[goods_submitted()]).unwrap();
        let seckill = project(&[seckill_placed()]).unwrap();
        let cases = [
            (goods.clone(), goods_submitted()),
            (goods.clone(), seckill_placed()),
            (goods, seckill_rejected()),
            (seckill.clone(), goods_submitted()),
            (seckill.clone(), goods_placed(1)),
            (seckill, goods_rejected(1)),
        ];
        for (view, event) in cases {
            let result = OrderProjector::apply(Some(view), &envelope(2, &event, 1));
            assert!(
                matches!(result, Err(ApplyError::Unexpected { .. })),
                "{event:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn another_aggregates_payload_is_a_decode_error() {
        let mut event = envelope(1, &seckill_placed(), 0);
        event.payload = serde_json::json!({ "CouponExpired": { "at": "2030-06-01T12:00:00Z" } });
        event.event_type = "CouponExpired".into();

        let result = OrderProjector::apply(None, &event);

        assert!(matches!(result, Err(ApplyError::Decode(_))), "{result:?}");
    }

    #[test]
    fn the_document_has_the_contract_fields() {
        let view = project(&[seckill_placed(), payment_started(990), timed_out(2)]).unwrap();

        let json = serde_json::to_value(&view).unwrap();

        assert_eq!(
            keys(&json),
            BTreeSet::from([
                "order_id",
                "user_id",
                "kind",
                "merchant_id",
                "status",
                "items",
                "voucher_id",
                "coupon_id",
                "subtotal_cents",
                "discount_cents",
                "total_cents",
                "payment",
                "rejection",
                "cancellation",
                "history",
                "version",
                "created_at",
                "updated_at",
            ])
        );
        assert_eq!(json["kind"], "seckill_voucher");
        assert_eq!(json["status"], "cancelled");
        assert_eq!(
            keys(&json["items"][0]),
            BTreeSet::from([
                "product_id",
                "voucher_id",
                "name",
                "quantity",
                "unit_price_cents",
                "total_cents"
            ])
        );
        assert_eq!(
            keys(&json["payment"]),
            BTreeSet::from(["payment_id", "status", "amount_cents"])
        );
        assert_eq!(json["payment"]["status"], "pending");
        assert_eq!(json["cancellation"]["reason"], "timed_out");
        assert_eq!(json["cancellation"]["by"], "test");
        assert_eq!(keys(&json["history"][0]), BTreeSet::from(["status", "at"]));
        assert_eq!(json["history"][0]["status"], "pending_payment");
        assert_eq!(json["rejection"], Value::Null);
        assert_eq!(json["version"], 3);
        assert_eq!(serde_json::from_value::<OrderView>(json).unwrap(), view);
    }

    #[test]
    fn rejection_and_unpriced_items_serialize_as_documented() {
        let rejected = serde_json::to_value(project(&[seckill_rejected()]).unwrap()).unwrap();
        assert_eq!(rejected["rejection"], serde_json::json!({ "code": "sold_out" }));
        assert_eq!(rejected["payment"], Value::Null);

        let submitted = serde_json::to_value(project(&[goods_submitted()]).unwrap()).unwrap();
        assert_eq!(submitted["status"], "submitted");
        assert_eq!(submitted["items"][0]["unit_price_cents"], Value::Null);
        assert_eq!(submitted["items"][0]["total_cents"], Value::Null);
        assert_eq!(submitted["items"][0]["quantity"], 3);
    }

    #[test]
    fn columns_carry_owner_status_and_times() {
        let view = project(&[goods_submitted(), goods_placed(1)]).unwrap();

        assert_eq!(
            OrderProjector::columns(&view),
            Columns {
                user_id: Some("bob".into()),
                merchant_id: Some("shop-2".into()),
                status: Some("pending_payment".into()),
                created_at: Some(at(0)),
                updated_at: Some(recorded(1)),
            }
        );
        assert_eq!(OrderProjector::version(&view), 2);
    }
}
