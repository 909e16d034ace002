//! The order lifecycle reactor: the process manager that turns Order events
//! into the commands that must follow them, exactly once in effect.
//!
//! | event | what follows |
//! |---|---|
//! | `OrderSubmitted` | the goods reservation saga ([`crate::saga`]): price the lines, then reserve the coupon (minimum spend checked against the priced subtotal) and every line's stock and place the order priced, in one append — or reject it with the reason, holding nothing |
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
use events::{CouponSource, EventEnvelope, EventMetadata, OrderEvent, OrderKind, OrderRejectionReason};
use futures::StreamExt as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    bus::{CommandError, Commands, RetryPolicy, UnitError, unit_of_work},
    domain::{
        Coupon, CouponCommand, Order, OrderCommand, Product, ProductCommand, SharedClock, Voucher, VoucherCommand,
        coupon::CouponError, product::ProductError, voucher::VoucherError,
    },
    saga::{self, GoodsPlan},
    timeouts,
};
use event_store::{Append, Decided, EventStore, Loaded, decide};

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
    /// Decide the submissions of a consumer batch together
    /// ([`Lifecycle::reserve_goods_batch`]); `false`: one order at a time.
    pub batching: bool,
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
    /// The batch this order was decided in failed for a passing reason.
    #[error("the order's batch failed")]
    Batch(#[source] Arc<LifecycleError>),
    /// Holding the payment deadlines of a batch of placements failed.
    #[error("holding the batch's payment deadlines failed")]
    Deadlines(#[source] Arc<sqlx::Error>),
}

impl LifecycleError {
    /// Whether the event can never succeed, so it is dead-lettered at once.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Database(_) | Self::Contended { .. } | Self::Batch(_) | Self::Deadlines(_) => false,
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

/// What the reactor records in reaction to `envelope`: its correlation and
/// trace, caused by it.
fn reaction_metadata(envelope: &EventEnvelope) -> EventMetadata {
    EventMetadata {
        correlation_id: envelope.metadata.correlation_id,
        traceparent: envelope.metadata.traceparent.clone(),
        tracestate: envelope.metadata.tracestate.clone(),
        ..EventMetadata::system("order-lifecycle")
    }
    .caused_by(envelope.event_id)
}

/// The placement of a priced order holding its reservations, as its append.
async fn place_goods(
    order: Loaded<Order>,
    priced: saga::Priced,
    discount_cents: i64,
    now: DateTime<Utc>,
    metadata: &EventMetadata,
) -> Result<Append, LifecycleError> {
    let order_id = order.aggregate.order_id().map(|id| id.to_string()).unwrap_or_default();
    let place = OrderCommand::PlaceGoodsOrder {
        merchant_id: priced.merchant_id,
        items: priced.items,
        coupon_id: order.aggregate.coupon_id(),
        discount_cents,
        placed_at: now,
    };
    let placed = decide(&order_id, order, place, &())
        .await
        .map_err(|(error, _)| LifecycleError::Refused {
            aggregate: "Order",
            source: Box::new(error),
        })?;
    Ok(placed.to_append(metadata)?)
}

/// A product's decision within a batch, with each event's metadata (the
/// order it reserves for).
struct ProductDecision {
    decided: Decided<Product>,
    metadata: Vec<EventMetadata>,
}

/// How one run of the goods saga ended.
enum GoodsOutcome {
    /// The order was decided already.
    Done,
    Rejected,
    /// Placed; the products' new states, for the cache.
    Placed(Vec<Decided<Product>>),
}

impl Lifecycle {
    /// When an order placed at `placed_at` times out unpaid.
    fn deadline(&self, placed_at: DateTime<Utc>) -> DateTime<Utc> {
        placed_at + chrono::Duration::from_std(self.payment_timeout).unwrap_or(chrono::Duration::MAX)
    }

    /// Reacts to one Order event.
    pub async fn react(&self, envelope: &EventEnvelope) -> Result<(), LifecycleError> {
        let order_id = envelope.aggregate_id.as_str();
        let metadata = reaction_metadata(envelope);
        let event = envelope
            .decode::<OrderEvent>()
            .map_err(|source| LifecycleError::Undecodable {
                event_type: envelope.event_type.clone(),
                source,
            })?;
        match event {
            OrderEvent::OrderSubmitted { .. } => self.reserve_goods(order_id, &metadata).await?,
            OrderEvent::OrderPlaced { placed_at, .. } => {
                timeouts::schedule(&self.pool, order_id, self.deadline(placed_at)).await?;
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

    /// The reservation saga of a submitted goods order: [`saga::plan`]
    /// decides from the order and its products; the coupon's and every
    /// line's reservation and the placement are then decided by their
    /// aggregates and appended together, in one unit of work, so an order is
    /// placed holding everything or nothing. A refusal (a coupon that is not
    /// available, a line out of stock) rejects the order with nothing held.
    /// A redelivery finds the order decided and does nothing.
    async fn reserve_goods(&self, order_id: &str, metadata: &EventMetadata) -> Result<(), LifecycleError> {
        let submitted = self.store.load::<Order>(order_id).await?.aggregate;
        if submitted.status() != Some(events::OrderStatus::Submitted) {
            return Ok(());
        }
        let mut product_ids: Vec<Uuid> = submitted.requested_items().iter().map(|line| line.product_id).collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        // Hot products: queue behind this process's other writers of them,
        // always in the same order, instead of colliding on the lock.
        let mut writers = Vec::with_capacity(product_ids.len());
        if let Some(cache) = self.products.cache() {
            for product_id in &product_ids {
                writers.push(cache.writer(&product_id.to_string()).await);
            }
        }
        let outcome = unit_of_work(&self.store, RetryPolicy::default(), "Order", || {
            self.decide_goods(order_id, &product_ids, metadata)
        })
        .await
        .map_err(|error| match error {
            UnitError::Decide(error) => error,
            UnitError::Conflict { .. } => LifecycleError::Contended { aggregate: "Order" },
            UnitError::Store(error) => LifecycleError::Store(error),
        })?;
        drop(writers);
        if let Some(gate) = &self.hot_products {
            gate.release(&product_ids).await;
        }
        match outcome {
            GoodsOutcome::Done | GoodsOutcome::Rejected => Ok(()),
            GoodsOutcome::Placed(products) => {
                // keep the hot products' cached state current
                if let Some(cache) = self.products.cache() {
                    for decided in products {
                        cache.put(&decided.aggregate_id.clone(), decided.into_loaded());
                    }
                }
                Ok(())
            }
        }
    }

    /// One attempt of the saga: load, plan, decide every reservation and the
    /// placement (or the rejection); the appends of one transaction.
    async fn decide_goods(
        &self,
        order_id: &str,
        product_ids: &[Uuid],
        metadata: &EventMetadata,
    ) -> Result<(Vec<Append>, GoodsOutcome), LifecycleError> {
        let order = self.store.load::<Order>(order_id).await?;
        let mut products = HashMap::with_capacity(product_ids.len());
        let mut loaded = HashMap::with_capacity(product_ids.len());
        for product_id in product_ids {
            let product = self.products.read(&product_id.to_string()).await?;
            products.insert(*product_id, product.aggregate.clone());
            loaded.insert(*product_id, product);
        }
        let now = self.clock.now();
        let priced = match saga::plan(&order.aggregate, &products) {
            GoodsPlan::Done => return Ok((Vec::new(), GoodsOutcome::Done)),
            GoodsPlan::Reject(reason) => return self.reject_goods(order, reason, now, metadata).await,
            GoodsPlan::Reserve(priced) => priced,
        };
        let Some(id) = order.aggregate.order_id() else {
            return Ok((Vec::new(), GoodsOutcome::Done));
        };
        let user_id = order.aggregate.user_id().unwrap_or_default().to_owned();
        let mut appends = Vec::with_capacity(product_ids.len() + 2);
        // the coupon, its minimum spend checked against the priced subtotal
        let mut discount_cents = 0;
        if let Some(coupon_id) = order.aggregate.coupon_id() {
            let key = coupon_id.to_string();
            let coupon = self.store.load::<Coupon>(&key).await?;
            let reserve = CouponCommand::Reserve {
                order_id: id,
                user_id: user_id.clone(),
                subtotal_cents: priced.subtotal_cents,
                at: now,
            };
            match decide(&key, coupon, reserve, &()).await {
                Ok(reserved) => {
                    discount_cents = reserved.aggregate.value_cents().unwrap_or(0).min(priced.subtotal_cents);
                    appends.push(reserved.to_append(metadata)?);
                }
                Err((CouponError::MinSpendNotMet { .. }, _)) => {
                    return self
                        .reject_goods(order, OrderRejectionReason::CouponMinSpendNotMet, now, metadata)
                        .await;
                }
                Err(_) => {
                    return self
                        .reject_goods(order, OrderRejectionReason::CouponUnavailable, now, metadata)
                        .await;
                }
            }
        }
        // each line's stock, the product's sequence as optimistic lock
        let mut reserved_products = Vec::with_capacity(product_ids.len());
        for line in order.aggregate.requested_items() {
            let Some(product) = loaded.remove(&line.product_id) else {
                continue;
            };
            let reserve = ProductCommand::Reserve {
                order_id: id,
                quantity: line.quantity,
            };
            match decide(&line.product_id.to_string(), product, reserve, &()).await {
                Ok(reserved) => {
                    appends.push(reserved.to_append(metadata)?);
                    reserved_products.push(reserved);
                }
                Err((ProductError::NotFound, _)) => {
                    let reason = OrderRejectionReason::ProductNotFound {
                        product_id: line.product_id,
                    };
                    return self.reject_goods(order, reason, now, metadata).await;
                }
                Err((ProductError::OutOfStock { .. } | ProductError::InvalidQuantity { .. }, _)) => {
                    let reason = OrderRejectionReason::OutOfStock {
                        product_id: line.product_id,
                    };
                    return self.reject_goods(order, reason, now, metadata).await;
                }
                Err((error, _)) => {
                    return Err(LifecycleError::Refused {
                        aggregate: "Product",
                        source: Box::new(error),
                    });
                }
            }
        }
        appends.push(place_goods(order, priced, discount_cents, now, metadata).await?);
        Ok((appends, GoodsOutcome::Placed(reserved_products)))
    }

    /// The order refused with `reason`, holding nothing: the only append.
    async fn reject_goods(
        &self,
        order: Loaded<Order>,
        reason: OrderRejectionReason,
        now: DateTime<Utc>,
        metadata: &EventMetadata,
    ) -> Result<(Vec<Append>, GoodsOutcome), LifecycleError> {
        let order_id = order.aggregate.order_id().map(|id| id.to_string()).unwrap_or_default();
        let reject = OrderCommand::RejectGoodsOrder {
            reason,
            rejected_at: now,
        };
        let rejected = decide(&order_id, order, reject, &())
            .await
            .map_err(|(error, _)| LifecycleError::Refused {
                aggregate: "Order",
                source: Box::new(error),
            })?;
        Ok((vec![rejected.to_append(metadata)?], GoodsOutcome::Rejected))
    }

    /// The saga of several submitted orders at once: loaded together,
    /// decided one after another on the products' evolving state (each
    /// order's lines checked against what the earlier ones took), and
    /// appended in ONE unit of work: one append per product, coupon and order
    /// for the whole batch. Invariants as for one order: a product never
    /// below zero, a coupon in at most one order, each order placed holding
    /// everything or rejected holding nothing. Should the batch fail for
    /// good (an aggregate refusing what the plan allowed), each order runs
    /// on its own, so one order cannot hold up the others.
    pub async fn reserve_goods_batch(&self, submitted: &[EventEnvelope]) -> Vec<Result<(), LifecycleError>> {
        let orders: Vec<(String, EventMetadata)> = submitted
            .iter()
            .map(|envelope| (envelope.aggregate_id.clone(), reaction_metadata(envelope)))
            .collect();
        match self.batch_unit(&orders).await {
            Ok(()) => orders.iter().map(|_| Ok(())).collect(),
            Err(error) if error.is_permanent() => {
                tracing::warn!(%error, orders = orders.len(), "goods batch refused; deciding its orders one by one");
                let mut outcomes = Vec::with_capacity(orders.len());
                for (order_id, metadata) in &orders {
                    outcomes.push(self.reserve_goods(order_id, metadata).await);
                }
                outcomes
            }
            Err(error) => {
                tracing::warn!(%error, "goods batch failed; every order is retried");
                let error = Arc::new(error);
                orders
                    .iter()
                    .map(|_| Err(LifecycleError::Batch(error.clone())))
                    .collect()
            }
        }
    }

    async fn batch_unit(&self, orders: &[(String, EventMetadata)]) -> Result<(), LifecycleError> {
        let ids: Vec<String> = orders.iter().map(|(id, _)| id.clone()).collect();
        let first_look = self.store.load_many::<Order>(&ids).await?;
        let mut product_ids: Vec<Uuid> = first_look
            .values()
            .flat_map(|order| order.aggregate.requested_items().iter().map(|line| line.product_id))
            .collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        let mut writers = Vec::with_capacity(product_ids.len());
        if let Some(cache) = self.products.cache() {
            for product_id in &product_ids {
                writers.push(cache.writer(&product_id.to_string()).await);
            }
        }
        let products = unit_of_work(&self.store, RetryPolicy::default(), "Order", || {
            self.decide_goods_batch(orders, &product_ids)
        })
        .await
        .map_err(|error| match error {
            UnitError::Decide(error) => error,
            UnitError::Conflict { .. } => LifecycleError::Contended { aggregate: "Order" },
            UnitError::Store(error) => LifecycleError::Store(error),
        })?;
        drop(writers);
        if let Some(cache) = self.products.cache() {
            for decided in products {
                cache.put(&decided.aggregate_id.clone(), decided.into_loaded());
            }
        }
        // each order that was awaiting its saga gives back the units it took
        // at the gate (a redelivered, decided order gave them back already)
        if let Some(gate) = &self.hot_products {
            let waiting = first_look
                .values()
                .filter(|order| order.aggregate.status() == Some(events::OrderStatus::Submitted));
            let lines: Vec<Uuid> = waiting
                .flat_map(|order| {
                    // one unit per distinct product of an order, as it took them
                    let mut lines: Vec<Uuid> = order.aggregate.requested_items().iter().map(|l| l.product_id).collect();
                    lines.sort_unstable();
                    lines.dedup();
                    lines
                })
                .collect();
            gate.release(&lines).await;
        }
        Ok(())
    }

    /// One attempt at a batch: the appends of one transaction, and the
    /// products' new states for the cache.
    async fn decide_goods_batch(
        &self,
        orders: &[(String, EventMetadata)],
        product_ids: &[Uuid],
    ) -> Result<(Vec<Append>, Vec<Decided<Product>>), LifecycleError> {
        let ids: Vec<String> = orders.iter().map(|(id, _)| id.clone()).collect();
        let mut loaded_orders = self.store.load_many::<Order>(&ids).await?;
        let mut products: HashMap<Uuid, ProductDecision> = HashMap::with_capacity(product_ids.len());
        let keys: Vec<String> = product_ids.iter().map(Uuid::to_string).collect();
        let mut current = self.products.read_many(&keys).await?;
        for (product_id, key) in product_ids.iter().zip(&keys) {
            let loaded = current.remove(key).unwrap_or_default();
            let decided = Decided::unchanged(key, loaded);
            products.insert(
                *product_id,
                ProductDecision {
                    decided,
                    metadata: Vec::new(),
                },
            );
        }
        let coupon_ids: Vec<String> = loaded_orders
            .values()
            .filter_map(|order| order.aggregate.coupon_id().map(|id| id.to_string()))
            .collect();
        let mut coupons: HashMap<String, Decided<Coupon>> = self
            .store
            .load_many::<Coupon>(&coupon_ids)
            .await?
            .into_iter()
            .map(|(id, loaded)| (id.clone(), Decided::unchanged(&id, loaded)))
            .collect();
        let now = self.clock.now();
        let mut appends = Vec::with_capacity(orders.len() * 2 + products.len());
        for (order_id, metadata) in orders {
            let Some(order) = loaded_orders.remove(order_id) else {
                continue;
            };
            let lookup = |id: &Uuid| products.get(id).map(|p| &p.decided.aggregate);
            let priced = match saga::plan_with(&order.aggregate, lookup) {
                GoodsPlan::Done => continue,
                GoodsPlan::Reject(reason) => {
                    appends.extend(self.reject_goods(order, reason, now, metadata).await?.0);
                    continue;
                }
                GoodsPlan::Reserve(priced) => priced,
            };
            if let Some(product_id) = saga::short_line(&order.aggregate, lookup) {
                let reason = OrderRejectionReason::OutOfStock { product_id };
                appends.extend(self.reject_goods(order, reason, now, metadata).await?.0);
                continue;
            }
            let Some(id) = order.aggregate.order_id() else { continue };
            // the coupon, its minimum spend checked against the priced subtotal
            let mut discount_cents = 0;
            if let Some(coupon_id) = order.aggregate.coupon_id() {
                let key = coupon_id.to_string();
                let coupon = coupons
                    .remove(&key)
                    .unwrap_or_else(|| Decided::unchanged(&key, Loaded::default()));
                let reserve = CouponCommand::Reserve {
                    order_id: id,
                    user_id: order.aggregate.user_id().unwrap_or_default().to_owned(),
                    subtotal_cents: priced.subtotal_cents,
                    at: now,
                };
                let refused = match coupon.then(reserve, &()).await {
                    Ok(reserved) => {
                        discount_cents = reserved.aggregate.value_cents().unwrap_or(0).min(priced.subtotal_cents);
                        // this order's coupon events carry its metadata
                        if !reserved.events.is_empty() {
                            appends.push(reserved.to_append(metadata)?);
                        }
                        let settled = Decided::unchanged(&key, reserved.into_loaded());
                        coupons.insert(key, settled);
                        None
                    }
                    Err((error, unchanged)) => {
                        coupons.insert(key, unchanged);
                        Some(match error {
                            CouponError::MinSpendNotMet { .. } => OrderRejectionReason::CouponMinSpendNotMet,
                            _ => OrderRejectionReason::CouponUnavailable,
                        })
                    }
                };
                if let Some(reason) = refused {
                    appends.extend(self.reject_goods(order, reason, now, metadata).await?.0);
                    continue;
                }
            }
            // every line fits (checked above): reserve each on the batch's state
            for line in order.aggregate.requested_items() {
                let Some(product) = products.remove(&line.product_id) else {
                    continue;
                };
                let ProductDecision {
                    decided,
                    metadata: mut metas,
                } = product;
                let before = decided.events.len();
                let reserve = ProductCommand::Reserve {
                    order_id: id,
                    quantity: line.quantity,
                };
                let decided = decided
                    .then(reserve, &())
                    .await
                    .map_err(|(error, _)| LifecycleError::Refused {
                        aggregate: "Product",
                        source: Box::new(error),
                    })?;
                metas.extend((before..decided.events.len()).map(|_| metadata.clone()));
                products.insert(
                    line.product_id,
                    ProductDecision {
                        decided,
                        metadata: metas,
                    },
                );
            }
            appends.push(place_goods(order, priced, discount_cents, now, metadata).await?);
        }
        // one append per product for the whole batch, each event with the
        // metadata of the order it reserves for
        let mut decided_products = Vec::with_capacity(products.len());
        for (_, product) in products {
            if product.decided.events.is_empty() {
                continue;
            }
            let mut append = product.decided.to_append(&EventMetadata::system("order-lifecycle"))?;
            for (pending, metadata) in append.events.iter_mut().zip(&product.metadata) {
                pending.metadata = event_store::metadata_json(metadata)?;
            }
            appends.push(append);
            decided_products.push(product.decided);
        }
        Ok((appends, decided_products))
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
        // Orders whose only event here is their submission are decided
        // together (one append for the batch); the rest one order at a time.
        let (lone, by_order): (Vec<_>, Vec<_>) = by_order.into_iter().partition(|(_, events)| {
            self.batching && matches!(events.as_slice(), [(_, envelope)] if envelope.event_type == "OrderSubmitted")
        });
        if !lone.is_empty() {
            let submitted: Vec<EventEnvelope> = lone.iter().map(|(_, events)| events[0].1.clone()).collect();
            let results = self.reserve_goods_batch(&submitted).await;
            for ((_, events), result) in lone.iter().zip(results) {
                outcomes[events[0].0] = Some(result.map_err(|error| {
                    let permanent = error.is_permanent();
                    let error = Box::new(error) as HandlerError;
                    if permanent { cp_nats::permanent(error) } else { error }
                }));
            }
        }
        // Orders whose only event here is their placement: every deadline in
        // one statement.
        let (placed, by_order): (Vec<_>, Vec<_>) = by_order.into_iter().partition(|(_, events)| {
            self.batching && matches!(events.as_slice(), [(_, envelope)] if envelope.event_type == "OrderPlaced")
        });
        if !placed.is_empty() {
            let mut deadlines = Vec::with_capacity(placed.len());
            for (order_id, events) in &placed {
                let (index, envelope) = &events[0];
                match envelope.decode::<OrderEvent>() {
                    Ok(OrderEvent::OrderPlaced { placed_at, .. }) => {
                        deadlines.push((order_id.clone(), self.deadline(placed_at)))
                    }
                    Ok(_) => outcomes[*index] = Some(Ok(())),
                    Err(source) => {
                        let error = LifecycleError::Undecodable {
                            event_type: envelope.event_type.clone(),
                            source,
                        };
                        outcomes[*index] = Some(Err(cp_nats::permanent(Box::new(error) as HandlerError)));
                    }
                }
            }
            let scheduled = timeouts::schedule_many(&self.pool, &deadlines).await.map_err(Arc::new);
            for (_, events) in &placed {
                let index = events[0].0;
                if outcomes[index].is_none() {
                    outcomes[index] = Some(
                        scheduled
                            .clone()
                            .map_err(|error| Box::new(LifecycleError::Deadlines(error)) as HandlerError),
                    );
                }
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
