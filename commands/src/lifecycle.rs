//! The order lifecycle reactor: the process manager that turns Order events
//! into the commands that must follow them, exactly once in effect.
//!
//! | event | what follows |
//! |---|---|
//! | `OrderPlaced` | the payment deadline is scheduled ([`crate::timeouts`]) |
//! | `OrderPaid` | deadline dropped; a seckill order issues its coupon, a goods order redeems the coupon it holds |
//! | `OrderCancelled`, `OrderTimedOut` | deadline dropped; everything the order holds is released: the seckill unit (then the edge re-credits Redis), each product's stock, the coupon |
//! | `OrderRejected` | deadline dropped (nothing is held) |
//!
//! It consumes the Order events stream with a durable consumer: a crash
//! anywhere redelivers the event, and every command it sends is idempotent
//! per order (release twice = once; the coupon id is derived from the order
//! id, its expiry from the payment time, so a second issue is the same one).

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use cp_nats::{Handler, HandlerError};
use events::{CouponSource, EventEnvelope, EventMetadata, OrderEvent, OrderKind};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    bus::{CommandError, Commands},
    domain::{
        Coupon, CouponCommand, Order, Product, ProductCommand, Voucher, VoucherCommand, coupon::CouponError,
        voucher::VoucherError,
    },
    store::EventStore,
    timeouts,
};

/// Durable consumer of the reactor on the Order events stream.
pub const LIFECYCLE_CONSUMER: &str = "order-lifecycle";

/// Coupon ids of seckill orders: derived from the order id, so issuing twice
/// is issuing the same coupon.
pub const COUPON_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c3e_2f0a_9b1d_4c7e_8a55_0d2f_7e91_c4b3);

pub fn coupon_id_for(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&COUPON_ID_NAMESPACE, order_id.as_bytes())
}

#[derive(Clone)]
pub struct Lifecycle {
    pub pool: PgPool,
    pub store: EventStore,
    pub vouchers: Arc<Commands<Voucher>>,
    pub products: Arc<Commands<Product>>,
    pub coupons: Arc<Commands<Coupon>>,
    pub payment_timeout: Duration,
    pub coupon_validity: chrono::Duration,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("payment_timeout", &self.payment_timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Command(String),
}

fn command_error<E: std::error::Error>(error: CommandError<E>) -> LifecycleError {
    LifecycleError::Command(error.to_string())
}

impl Lifecycle {
    /// Reacts to one Order event.
    pub async fn react(&self, envelope: &EventEnvelope) -> Result<(), LifecycleError> {
        let order_id = envelope.aggregate_id.as_str();
        let metadata = EventMetadata {
            correlation_id: envelope.metadata.correlation_id,
            traceparent: envelope.metadata.traceparent.clone(),
            tracestate: envelope.metadata.tracestate.clone(),
            ..EventMetadata::system("order-lifecycle")
        }
        .caused_by(envelope.event_id);
        let Ok(event) = envelope.decode::<OrderEvent>() else {
            return Err(LifecycleError::Command(format!(
                "{} does not decode",
                envelope.event_type
            )));
        };
        match event {
            OrderEvent::OrderPlaced { placed_at, .. } => {
                let due = placed_at + chrono::Duration::from_std(self.payment_timeout).unwrap_or(chrono::Duration::MAX);
                timeouts::schedule(&self.pool, order_id, due).await?;
            }
            OrderEvent::OrderPaid { paid_at, .. } => {
                timeouts::unschedule(&self.pool, order_id).await?;
                self.settle_paid(order_id, paid_at, &metadata).await?;
            }
            OrderEvent::OrderCancelled { .. } | OrderEvent::OrderTimedOut { .. } => {
                timeouts::unschedule(&self.pool, order_id).await?;
                self.release_holds(order_id, &metadata).await?;
            }
            OrderEvent::OrderRejected { .. } => timeouts::unschedule(&self.pool, order_id).await?,
            _ => {}
        }
        Ok(())
    }

    async fn settle_paid(
        &self,
        order_id: &str,
        paid_at: DateTime<Utc>,
        metadata: &EventMetadata,
    ) -> Result<(), LifecycleError> {
        let order = self.store.load::<Order>(order_id).await?.aggregate;
        let (Some(id), Some(user_id)) = (order.order_id(), order.user_id()) else {
            return Ok(());
        };
        match (order.kind(), order.voucher_id(), order.coupon_id()) {
            (Some(OrderKind::SeckillVoucher), Some(voucher_id), _) => {
                let voucher = self.store.load::<Voucher>(&voucher_id.to_string()).await?.aggregate;
                let (Some(value_cents), Some(min_spend_cents)) = (voucher.value_cents(), voucher.min_spend_cents())
                else {
                    return Err(LifecycleError::Command(format!(
                        "voucher {voucher_id} of order {order_id} is unknown"
                    )));
                };
                let coupon_id = coupon_id_for(id);
                let issue = CouponCommand::Issue {
                    coupon_id,
                    user_id: user_id.to_owned(),
                    voucher_id,
                    value_cents,
                    min_spend_cents,
                    expires_at: paid_at + self.coupon_validity,
                    source: CouponSource::SeckillOrder { order_id: id },
                };
                match self
                    .coupons
                    .create(&coupon_id.to_string(), || issue.clone(), metadata)
                    .await
                {
                    Ok(_) | Err(CommandError::Domain(CouponError::AlreadyIssued)) => {}
                    Err(error) => return Err(command_error(error)),
                }
            }
            (Some(OrderKind::Goods), _, Some(coupon_id)) => {
                self.coupons
                    .execute(
                        &coupon_id.to_string(),
                        || CouponCommand::Redeem { order_id: id },
                        metadata,
                    )
                    .await
                    .map_err(command_error)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Releases everything a cancelled or timed-out order holds.
    async fn release_holds(&self, order_id: &str, metadata: &EventMetadata) -> Result<(), LifecycleError> {
        let order = self.store.load::<Order>(order_id).await?.aggregate;
        let Some(id) = order.order_id() else { return Ok(()) };
        if let (Some(OrderKind::SeckillVoucher), Some(voucher_id)) = (order.kind(), order.voucher_id()) {
            let released = self
                .vouchers
                .execute(
                    &voucher_id.to_string(),
                    || VoucherCommand::ReleaseSeckillStock { order_id: id },
                    metadata,
                )
                .await;
            match released {
                // a claim the voucher never accepted holds nothing
                Ok(_) | Err(CommandError::Domain(VoucherError::ClaimNotFound)) => {}
                Err(error) => return Err(command_error(error)),
            }
        }
        for product_id in order.items().iter().filter_map(|item| item.product_id) {
            self.products
                .execute(
                    &product_id.to_string(),
                    || ProductCommand::Release { order_id: id },
                    metadata,
                )
                .await
                .map_err(command_error)?;
        }
        if let Some(coupon_id) = order.coupon_id() {
            let released = self
                .coupons
                .execute(
                    &coupon_id.to_string(),
                    || CouponCommand::Release { order_id: id },
                    metadata,
                )
                .await;
            match released {
                Ok(_) | Err(CommandError::Domain(CouponError::NotFound)) => {}
                Err(error) => return Err(command_error(error)),
            }
        }
        Ok(())
    }
}

impl Handler for Lifecycle {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandlerError> {
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload)?;
        if envelope.aggregate_type != <OrderEvent as events::AggregateEvents>::AGGREGATE_TYPE {
            return Ok(());
        }
        self.react(&envelope).await?;
        Ok(())
    }
}
