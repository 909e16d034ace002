//! The order lifecycle reactor: the process manager that turns Order events
//! into the commands that must follow them, exactly once in effect.
//!
//! | event | what follows |
//! |---|---|
//! | `OrderSubmitted` | the goods reservation saga: reserve each product's stock, then the coupon (minimum spend checked against the priced subtotal), then place the order priced — or reject it with the reason, releasing every reservation already made |
//! | `OrderPlaced` | the payment deadline is scheduled ([`crate::timeouts`]) |
//! | `OrderPaid` | deadline dropped; a seckill order issues its coupon, a goods order redeems the coupon it holds |
//! | `OrderCancelled`, `OrderTimedOut` | deadline dropped; everything the order holds is released: the seckill unit (then the edge re-credits Redis), each product's stock, the coupon |
//! | `OrderRejected` | deadline dropped (nothing is held) |
//!
//! It consumes the Order events stream with a durable consumer: a crash
//! anywhere redelivers the event, and every command it sends is idempotent
//! per order (release twice = once; the coupon id is derived from the order
//! id, its expiry from the payment time, so a second issue is the same one).
//!
//! Failures are sorted ([`LifecycleError::is_permanent`]): a database away or
//! other writers winning is retried with backoff; an event that does not
//! decode, or a command its aggregate refuses, can never succeed and is
//! dead-lettered at once with the reason. What the saga can decide by itself
//! it decides: a total that cannot be represented, or lines of several
//! merchants, reject the order instead of failing the event.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use cp_nats::{BatchHandler, HandlerError};
use events::{CouponSource, EventEnvelope, EventMetadata, OrderEvent, OrderItem, OrderKind, OrderRejectionReason};
use futures::StreamExt as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    bus::{CommandError, Commands},
    domain::{
        Coupon, CouponCommand, Order, OrderCommand, Product, ProductCommand, SharedClock, Voucher, VoucherCommand,
        coupon::CouponError, order::OrderError, product::ProductError, voucher::VoucherError,
    },
    timeouts,
};
use event_store::EventStore;

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
    pub orders: Arc<Commands<Order>>,
    pub vouchers: Arc<Commands<Voucher>>,
    pub products: Arc<Commands<Product>>,
    pub coupons: Arc<Commands<Coupon>>,
    pub payment_timeout: Duration,
    pub coupon_validity: chrono::Duration,
    /// Given back once the saga has tried each product.
    pub hot_products: Option<crate::hot::ProductSemaphore>,
    /// "Now" for every time the reactor records.
    pub clock: SharedClock,
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
    #[error("database")]
    Database(#[from] sqlx::Error),
    #[error("event store")]
    Store(#[from] event_store::StoreError),
    #[error("{event_type} does not decode as an Order event")]
    Undecodable {
        event_type: String,
        #[source]
        source: events::envelope::EnvelopeError,
    },
    /// An aggregate refused a command the reactor sent, for a reason no
    /// retry changes.
    #[error("{aggregate} refused the command")]
    Refused {
        aggregate: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{aggregate} kept changing under the reactor")]
    Contended { aggregate: &'static str },
    #[error("voucher {voucher_id} of order {order_id} is unknown")]
    UnknownVoucher { voucher_id: Uuid, order_id: String },
}

impl LifecycleError {
    /// Whether the event can never succeed, so it is dead-lettered at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Database(_) | Self::Contended { .. } => false,
            Self::Store(error) => error.is_permanent(),
            Self::Undecodable { .. } | Self::Refused { .. } | Self::UnknownVoucher { .. } => true,
        }
    }
}

fn command_error<A: cqrs_es::Aggregate>(error: CommandError<A::Error>) -> LifecycleError
where
    A::Error: Send + Sync + 'static,
{
    match error {
        CommandError::Domain(source) => LifecycleError::Refused {
            aggregate: A::TYPE,
            source: Box::new(source),
        },
        CommandError::Conflict { .. } => LifecycleError::Contended { aggregate: A::TYPE },
        CommandError::Store(error) => LifecycleError::Store(error),
    }
}

/// The merchant of an order's lines: one, or [`OrderRejectionReason::MixedMerchants`].
fn single_merchant<'a>(mut merchants: impl Iterator<Item = &'a str>) -> Result<Option<&'a str>, OrderRejectionReason> {
    let Some(first) = merchants.next() else {
        return Ok(None);
    };
    if merchants.all(|other| other == first) {
        Ok(Some(first))
    } else {
        Err(OrderRejectionReason::MixedMerchants)
    }
}

/// The subtotal of priced lines, or [`OrderRejectionReason::TotalTooLarge`].
fn subtotal_of(items: &[OrderItem]) -> Result<i64, OrderRejectionReason> {
    items
        .iter()
        .try_fold(0_i64, |sum, item| {
            item.unit_price_cents
                .checked_mul(i64::from(item.quantity))
                .and_then(|line| sum.checked_add(line))
        })
        .ok_or(OrderRejectionReason::TotalTooLarge)
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
        let event = envelope
            .decode::<OrderEvent>()
            .map_err(|source| LifecycleError::Undecodable {
                event_type: envelope.event_type.clone(),
                source,
            })?;
        match event {
            OrderEvent::OrderSubmitted { .. } => self.reserve_goods(order_id, &metadata).await?,
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
                let voucher = self.vouchers.read(&voucher_id.to_string()).await?.aggregate;
                let (Some(value_cents), Some(min_spend_cents)) = (voucher.value_cents(), voucher.min_spend_cents())
                else {
                    return Err(LifecycleError::UnknownVoucher {
                        voucher_id,
                        order_id: order_id.to_owned(),
                    });
                };
                let coupon_id = coupon_id_for(id);
                let issue = CouponCommand::Issue {
                    coupon_id,
                    user_id: user_id.to_owned(),
                    merchant_id: voucher.merchant_id().map(str::to_owned),
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
                    Err(error) => return Err(command_error::<Coupon>(error)),
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
                    .map_err(command_error::<Coupon>)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The reservation saga of a submitted goods order. Every step is
    /// idempotent per order, so a redelivery after a crash between steps
    /// picks up where it stopped.
    async fn reserve_goods(&self, order_id: &str, metadata: &EventMetadata) -> Result<(), LifecycleError> {
        let order = self.store.load::<Order>(order_id).await?.aggregate;
        let (Some(id), Some(user_id)) = (order.order_id(), order.user_id().map(str::to_owned)) else {
            return Ok(());
        };
        if order.status() != Some(events::OrderStatus::Submitted) {
            // decided already (placed, rejected, or cancelled meanwhile)
            return Ok(());
        }
        let requested = order.requested_items().to_vec();
        // 1. price the lines (prices as bought are copied into the order)
        let mut items = Vec::with_capacity(requested.len());
        let mut merchants = Vec::with_capacity(requested.len());
        let mut rejection = None;
        for line in &requested {
            let product = self.products.read(&line.product_id.to_string()).await?.aggregate;
            match (product.name(), product.price_cents(), product.merchant_id()) {
                (Some(name), Some(price), Some(merchant)) => {
                    merchants.push(merchant.to_owned());
                    items.push(OrderItem {
                        product_id: Some(line.product_id),
                        voucher_id: None,
                        name: name.to_owned(),
                        quantity: line.quantity,
                        unit_price_cents: price,
                    });
                }
                _ => {
                    rejection = Some(OrderRejectionReason::ProductNotFound {
                        product_id: line.product_id,
                    });
                    break;
                }
            }
        }
        // One merchant per order, and a total that can be represented: both
        // decided here, before anything is reserved.
        let merchant_id = match single_merchant(merchants.iter().map(String::as_str)) {
            Ok(merchant) => merchant.unwrap_or_default().to_owned(),
            Err(reason) => {
                rejection.get_or_insert(reason);
                String::new()
            }
        };
        let subtotal = match subtotal_of(&items) {
            Ok(subtotal) => subtotal,
            Err(reason) => {
                rejection.get_or_insert(reason);
                0
            }
        };
        // 2. the coupon, its minimum spend checked against the priced subtotal
        let mut discount_cents = 0;
        if let (None, Some(coupon_id)) = (rejection, order.coupon_id()) {
            let at = self.clock.now();
            let reserve = || CouponCommand::Reserve {
                order_id: id,
                user_id: user_id.clone(),
                subtotal_cents: subtotal,
                at,
            };
            match self.coupons.execute(&coupon_id.to_string(), reserve, metadata).await {
                Ok(_) => {
                    let coupon = self.store.load::<Coupon>(&coupon_id.to_string()).await?.aggregate;
                    discount_cents = coupon.value_cents().unwrap_or(0).min(subtotal);
                }
                Err(CommandError::Domain(CouponError::MinSpendNotMet { .. })) => {
                    rejection = Some(OrderRejectionReason::CouponMinSpendNotMet);
                }
                Err(CommandError::Domain(_)) => rejection = Some(OrderRejectionReason::CouponUnavailable),
                Err(error) => return Err(command_error::<Coupon>(error)),
            }
        }
        // 3. each product's stock, the sequence as optimistic lock
        if rejection.is_none() {
            for line in &requested {
                let reserve = || ProductCommand::Reserve {
                    order_id: id,
                    quantity: line.quantity,
                };
                match self
                    .products
                    .execute(&line.product_id.to_string(), reserve, metadata)
                    .await
                {
                    Ok(_) => {}
                    Err(CommandError::Domain(ProductError::NotFound)) => {
                        rejection = Some(OrderRejectionReason::ProductNotFound {
                            product_id: line.product_id,
                        });
                        break;
                    }
                    Err(CommandError::Domain(
                        ProductError::OutOfStock { .. } | ProductError::InvalidQuantity { .. },
                    )) => {
                        rejection = Some(OrderRejectionReason::OutOfStock {
                            product_id: line.product_id,
                        });
                        break;
                    }
                    Err(error) => return Err(command_error::<Product>(error)),
                }
            }
        }
        if let Some(gate) = &self.hot_products {
            let products: Vec<Uuid> = requested.iter().map(|line| line.product_id).collect();
            gate.release(&products).await;
        }
        let decision = match rejection {
            None => {
                let placed_at = self.clock.now();
                let coupon_id = order.coupon_id();
                let place = || OrderCommand::PlaceGoodsOrder {
                    merchant_id: merchant_id.clone(),
                    items: items.clone(),
                    coupon_id,
                    discount_cents,
                    placed_at,
                };
                self.orders.execute(order_id, place, metadata).await
            }
            Some(reason) => {
                // every partial reservation goes back before the order is refused
                self.release_products(id, requested.iter().map(|line| line.product_id), metadata)
                    .await?;
                self.release_coupon(&order, metadata).await?;
                let rejected_at = self.clock.now();
                self.orders
                    .execute(
                        order_id,
                        || OrderCommand::RejectGoodsOrder { reason, rejected_at },
                        metadata,
                    )
                    .await
            }
        };
        match decision {
            Ok(_) => Ok(()),
            // cancelled by the customer meanwhile: give back what the saga took
            Err(CommandError::Domain(OrderError::InvalidTransition { .. })) => {
                self.release_holds(order_id, metadata).await
            }
            Err(error) => Err(command_error::<Order>(error)),
        }
    }

    async fn release_coupon(&self, order: &Order, metadata: &EventMetadata) -> Result<(), LifecycleError> {
        let Some(id) = order.order_id() else { return Ok(()) };
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
                Err(error) => return Err(command_error::<Coupon>(error)),
            }
        }
        Ok(())
    }

    async fn release_products(
        &self,
        order_id: Uuid,
        products: impl Iterator<Item = Uuid>,
        metadata: &EventMetadata,
    ) -> Result<(), LifecycleError> {
        for product_id in products {
            let released = self
                .products
                .execute(
                    &product_id.to_string(),
                    || ProductCommand::Release { order_id },
                    metadata,
                )
                .await;
            match released {
                Ok(_) | Err(CommandError::Domain(ProductError::NotFound)) => {}
                Err(error) => return Err(command_error::<Product>(error)),
            }
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
                Err(error) => return Err(command_error::<Voucher>(error)),
            }
        }
        // a goods order cancelled before it was placed holds what the saga reserved so far
        let mut products: Vec<Uuid> = order.items().iter().filter_map(|item| item.product_id).collect();
        products.extend(order.requested_items().iter().map(|line| line.product_id));
        products.sort_unstable();
        products.dedup();
        self.release_products(id, products.into_iter(), metadata).await?;
        self.release_coupon(&order, metadata).await?;
        Ok(())
    }
}

/// Orders are independent: their events run concurrently (up to
/// [`REACTION_CONCURRENCY`] orders at a time), each order's in stream order.
pub const REACTION_CONCURRENCY: usize = 32;

impl BatchHandler for Lifecycle {
    async fn handle_batch(&self, messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        let mut outcomes: Vec<Option<Result<(), HandlerError>>> = (0..messages.len()).map(|_| None).collect();
        let mut by_order: Vec<(String, Vec<(usize, EventEnvelope)>)> = Vec::new();
        let mut position: HashMap<String, usize> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                Ok(envelope) if envelope.aggregate_type == <OrderEvent as events::AggregateEvents>::AGGREGATE_TYPE => {
                    let at = *position.entry(envelope.aggregate_id.clone()).or_insert_with(|| {
                        by_order.push((envelope.aggregate_id.clone(), Vec::new()));
                        by_order.len() - 1
                    });
                    by_order[at].1.push((index, envelope));
                }
                Ok(_) => outcomes[index] = Some(Ok(())),
                Err(error) => outcomes[index] = Some(Err(cp_nats::permanent(error))),
            }
        }
        let results: Vec<Vec<(usize, Result<(), HandlerError>)>> = futures::stream::iter(by_order)
            .map(|(_, events)| async move {
                let mut results = Vec::with_capacity(events.len());
                let mut failed = false;
                for (index, envelope) in events {
                    // a later event of an order whose earlier one failed waits for the retry
                    let outcome: Result<(), HandlerError> = if failed {
                        Err("an earlier event of this order failed".into())
                    } else {
                        self.react(&envelope).await.map_err(|error| {
                            let permanent = error.is_permanent();
                            let error = Box::new(error) as HandlerError;
                            if permanent { cp_nats::permanent(error) } else { error }
                        })
                    };
                    failed |= outcome.is_err();
                    results.push((index, outcome));
                }
                results
            })
            .buffer_unordered(REACTION_CONCURRENCY)
            .collect()
            .await;
        for (index, outcome) in results.into_iter().flatten() {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Err("not handled".into())))
            .collect()
    }
}
