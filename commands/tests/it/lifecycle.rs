//! The order lifecycle against a real Postgres: a saga interrupted between
//! steps completes when its event comes again, compensation happens once
//! however often it runs, and deadlines fire once, after their time, and
//! never against a paid order.

use std::{sync::Arc, time::Duration};

use chrono::{Duration as Span, Utc};
use commands::{
    AppState,
    domain::{CouponCommand, OrderCommand, ProductCommand, SharedClock, SystemClock},
    lifecycle::Lifecycle,
    timeouts::{self, TimeoutConfig, TimeoutPoller},
};
use events::{CancellationReason, CouponSource, EventEnvelope, EventMetadata, RequestedItem};
use platform::http::{Health, JwtKeys, Ops};
use uuid::Uuid;

fn state(db: &testkit::TestDb) -> AppState {
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let clock: SharedClock = Arc::new(SystemClock);
    AppState::with_clock(db.pool.clone(), JwtKeys::new(&platform::Secret::new("s")), ops, clock)
}

fn meta() -> EventMetadata {
    EventMetadata::system("test")
}

async fn envelope(
    db: &testkit::TestDb,
    aggregate_type: &str,
    id: &str,
    sequence: i64,
) -> anyhow::Result<EventEnvelope> {
    let row = sqlx::query(&format!(
        "SELECT {} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        event_store::ENVELOPE_COLUMNS
    ))
    .bind(aggregate_type)
    .bind(id)
    .bind(sequence)
    .fetch_one(&db.pool)
    .await?;
    Ok(event_store::envelope_from_row(&row)?)
}

async fn history(db: &testkit::TestDb, aggregate_type: &str, id: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id)
    .fetch_all(&db.pool)
    .await?)
}

/// A product, a coupon of ann's and ann's submitted goods order for them.
async fn submitted_order(state: &AppState) -> anyhow::Result<(Uuid, Uuid, Uuid)> {
    let (product, coupon, order) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    state
        .api
        .products
        .create(
            &product.to_string(),
            || ProductCommand::Create {
                product_id: product,
                merchant_id: "shop-1".into(),
                name: "Dumplings".into(),
                price_cents: 3_000,
                stock: 5,
            },
            &meta(),
        )
        .await?;
    state
        .api
        .coupons
        .create(
            &coupon.to_string(),
            || CouponCommand::Issue {
                coupon_id: coupon,
                merchant_id: Some("shop-1".into()),
                user_id: "ann".into(),
                voucher_id: Uuid::now_v7(),
                value_cents: 500,
                min_spend_cents: 1_000,
                expires_at: Utc::now() + Span::days(1),
                source: CouponSource::RegularClaim,
            },
            &meta(),
        )
        .await?;
    state
        .api
        .orders
        .create(
            &order.to_string(),
            || OrderCommand::SubmitGoodsOrder {
                order_id: order,
                user_id: "ann".into(),
                merchant_id: Some("shop-1".into()),
                items: vec![RequestedItem {
                    product_id: product,
                    quantity: 2,
                }],
                coupon_id: Some(coupon),
                submitted_at: Utc::now(),
            },
            &meta(),
        )
        .await?;
    Ok((product, coupon, order))
}

fn lifecycle(state: &AppState, db: &testkit::TestDb) -> Lifecycle {
    state.lifecycle(db.pool.clone(), Duration::from_secs(900))
}

#[tokio::test]
async fn a_saga_killed_between_steps_completes_when_its_event_comes_again() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let (product, coupon, order) = submitted_order(&state).await?;
    // the process died after reserving the coupon and the stock, before placing the order
    state
        .api
        .coupons
        .execute(
            &coupon.to_string(),
            || CouponCommand::Reserve {
                order_id: order,
                user_id: "ann".into(),
                subtotal_cents: 6_000,
                at: Utc::now(),
            },
            &meta(),
        )
        .await?;
    state
        .api
        .products
        .execute(
            &product.to_string(),
            || ProductCommand::Reserve {
                order_id: order,
                quantity: 2,
            },
            &meta(),
        )
        .await?;

    // the OrderSubmitted is redelivered after the restart, twice for good measure
    let submitted = envelope(&db, "Order", &order.to_string(), 1).await?;
    let reactor = lifecycle(&state, &db);
    reactor.react(&submitted).await?;
    reactor.react(&submitted).await?;
    assert_eq!(
        history(&db, "Order", &order.to_string()).await?,
        ["OrderSubmitted", "OrderPlaced"]
    );
    assert_eq!(
        history(&db, "Coupon", &coupon.to_string()).await?,
        ["CouponIssued", "CouponReserved"]
    );
    assert_eq!(
        history(&db, "Product", &product.to_string()).await?,
        ["ProductCreated", "ProductStockReserved"]
    );
    let placed = envelope(&db, "Order", &order.to_string(), 2).await?;
    assert_eq!(placed.payload["OrderPlaced"]["total_cents"], 5_500);
    assert_eq!(placed.metadata.causation_id, Some(submitted.event_id));
    db.drop_database().await
}

#[tokio::test]
async fn compensation_releases_once_however_often_it_runs() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let (product, coupon, order) = submitted_order(&state).await?;
    let reactor = lifecycle(&state, &db);
    reactor
        .react(&envelope(&db, "Order", &order.to_string(), 1).await?)
        .await?;
    state
        .api
        .orders
        .execute(
            &order.to_string(),
            || OrderCommand::Cancel {
                by: "ann".into(),
                by_role: commands::domain::CancellerRole::Customer,
                reason: CancellationReason::CustomerRequested,
                at: Utc::now(),
            },
            &meta(),
        )
        .await?;
    let cancelled = envelope(&db, "Order", &order.to_string(), 3).await?;
    for _ in 0..3 {
        reactor.react(&cancelled).await?;
    }
    assert_eq!(
        history(&db, "Product", &product.to_string()).await?,
        ["ProductCreated", "ProductStockReserved", "ProductStockReleased"]
    );
    assert_eq!(
        history(&db, "Coupon", &coupon.to_string()).await?,
        ["CouponIssued", "CouponReserved", "CouponReleased"]
    );
    db.drop_database().await
}

#[tokio::test]
async fn deadlines_fire_once_after_their_time_and_never_against_a_paid_order() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let reactor = lifecycle(&state, &db);
    let (_, _, unpaid) = submitted_order(&state).await?;
    let (_, _, paid) = submitted_order(&state).await?;
    let (_, _, later) = submitted_order(&state).await?;
    for order in [unpaid, paid, later] {
        // placed by the saga, then its deadline scheduled (15 minutes out)
        reactor
            .react(&envelope(&db, "Order", &order.to_string(), 1).await?)
            .await?;
        reactor
            .react(&envelope(&db, "Order", &order.to_string(), 2).await?)
            .await?;
    }
    let payment = Uuid::now_v7();
    state
        .api
        .orders
        .execute(
            &paid.to_string(),
            || OrderCommand::MarkPaid {
                payment_id: payment,
                amount_cents: 5_500,
                paid_at: Utc::now(),
            },
            &meta(),
        )
        .await?;
    // the paid order's deadline is still there (say the reaction to OrderPaid has not run yet)
    let past = Utc::now() - Span::seconds(5);
    timeouts::unschedule(&db.pool, &unpaid.to_string()).await?;
    timeouts::schedule(&db.pool, &unpaid.to_string(), past).await?;
    timeouts::unschedule(&db.pool, &paid.to_string()).await?;
    timeouts::schedule(&db.pool, &paid.to_string(), past).await?;

    let poller = TimeoutPoller::new(
        db.pool.clone(),
        state.api.orders.clone(),
        state.api.clock.clone(),
        TimeoutConfig::default(),
    );
    assert_eq!(poller.fire_due().await?, 2);
    assert_eq!(poller.fire_due().await?, 0, "fired once");
    assert_eq!(
        history(&db, "Order", &unpaid.to_string()).await?,
        ["OrderSubmitted", "OrderPlaced", "OrderTimedOut"]
    );
    assert_eq!(
        history(&db, "Order", &paid.to_string()).await?,
        ["OrderSubmitted", "OrderPlaced", "OrderPaid"]
    );
    // not due yet: still waiting
    assert_eq!(
        history(&db, "Order", &later.to_string()).await?,
        ["OrderSubmitted", "OrderPlaced"]
    );
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM order_deadlines")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(waiting, 1);
    db.drop_database().await
}

/// Products are read through the aggregate cache (the saga prices from them);
/// what another process writes meanwhile must still be seen, and a stale entry
/// must never make a reservation double-book the stock.
#[tokio::test]
async fn cached_product_reads_see_every_processs_writes() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let (here, there) = (state(&db), state(&db));
    let (product, _, _) = submitted_order(&here).await?;
    let id = product.to_string();
    let reserve = |order_id: Uuid, quantity: u32| move || ProductCommand::Reserve { order_id, quantity };

    let first = here.api.products.read(&id).await?;
    assert_eq!((first.version, first.aggregate.available()), (1, 5));
    // another process reserves; our cached copy is one event behind
    there
        .api
        .products
        .execute(&id, reserve(Uuid::now_v7(), 2), &meta())
        .await?;
    let second = here.api.products.read(&id).await?;
    assert_eq!((second.version, second.aggregate.available()), (2, 3));
    // a write here after a write there: caught up, not conflicting, not overbooking
    there
        .api
        .products
        .execute(&id, reserve(Uuid::now_v7(), 1), &meta())
        .await?;
    here.api
        .products
        .execute(&id, reserve(Uuid::now_v7(), 2), &meta())
        .await?;
    let rejected = here
        .api
        .products
        .execute(&id, reserve(Uuid::now_v7(), 1), &meta())
        .await;
    assert!(
        matches!(
            rejected,
            Err(commands::bus::CommandError::Domain(
                commands::domain::ProductError::OutOfStock { .. }
            ))
        ),
        "{rejected:?}"
    );
    let stored = here.api.store.load::<commands::domain::Product>(&id).await?;
    let read = here.api.products.read(&id).await?;
    assert_eq!((read.version, read.aggregate.available()), (4, 0));
    assert_eq!(read.aggregate, stored.aggregate);
    Ok(())
}

/// A product recorded before the limits existed, priced so that three of it
/// overflow an `i64`: the order is rejected (`total_too_large`) and holds
/// nothing; the event is not retried forever.
#[tokio::test]
async fn an_order_whose_total_cannot_be_represented_is_rejected_not_retried() -> anyhow::Result<()> {
    use event_store::{Append, PendingEvent};
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let product = Uuid::now_v7();
    let price = i64::MAX / 2;
    state
        .api
        .store
        .append(&[Append {
            aggregate_type: "Product",
            aggregate_id: product.to_string(),
            base_version: 0,
            events: vec![PendingEvent {
                event_type: "ProductCreated".into(),
                event_version: "1.0".into(),
                payload: serde_json::json!({"ProductCreated": {
                    "product_id": product, "merchant_id": "shop-1", "name": "Gold",
                    "price_cents": price, "stock": 10
                }}),
                metadata: serde_json::json!({}),
            }],
        }])
        .await?;
    let order = Uuid::now_v7();
    state
        .api
        .orders
        .create(
            &order.to_string(),
            || OrderCommand::SubmitGoodsOrder {
                order_id: order,
                user_id: "ann".into(),
                merchant_id: Some("shop-1".into()),
                items: vec![RequestedItem {
                    product_id: product,
                    quantity: 3,
                }],
                coupon_id: None,
                submitted_at: Utc::now(),
            },
            &meta(),
        )
        .await?;
    let submitted = envelope(&db, "Order", &order.to_string(), 1).await?;
    let reactor = lifecycle(&state, &db);
    reactor.react(&submitted).await?;
    reactor.react(&submitted).await?;
    assert_eq!(
        history(&db, "Order", &order.to_string()).await?,
        ["OrderSubmitted", "OrderRejected"]
    );
    let rejected = envelope(&db, "Order", &order.to_string(), 2).await?;
    assert_eq!(rejected.payload["OrderRejected"]["reason"]["code"], "total_too_large");
    assert_eq!(rejected.payload["OrderRejected"]["merchant_id"], "shop-1");
    // nothing was reserved, so nothing stays held
    assert_eq!(history(&db, "Product", &product.to_string()).await?, ["ProductCreated"]);
    db.drop_database().await
}

/// An event the reactor can never handle is a permanent failure (dead-lettered
/// at once); a database that is away is not.
#[tokio::test]
async fn failures_are_sorted_into_permanent_and_transient() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let (_, _, order) = submitted_order(&state).await?;
    let mut garbled = envelope(&db, "Order", &order.to_string(), 1).await?;
    garbled.payload = serde_json::json!({"OrderSubmitted": {"order_id": 5}});
    let reactor = lifecycle(&state, &db);
    let error = reactor
        .react(&garbled)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("accepted"))?;
    assert!(error.is_permanent(), "{error:?}");

    // the same reactor over a pool whose database is gone
    let submitted = envelope(&db, "Order", &order.to_string(), 1).await?;
    let away = AppState::with_clock(
        testkit::unreachable_pool(),
        JwtKeys::new(&platform::Secret::new("s")),
        Ops {
            health: Health::new(),
            metrics: platform::telemetry::metrics_handle(),
        },
        Arc::new(SystemClock),
    );
    let error = away
        .lifecycle(testkit::unreachable_pool(), Duration::from_secs(900))
        .react(&submitted)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("accepted without a database"))?;
    assert!(!error.is_permanent(), "{error:?}");
    db.drop_database().await
}

/// A deadline whose order can never be timed out (its stored history does
/// not decode) is set aside with its reason after one attempt, and does not
/// stop the deadlines beside it; nothing is retried forever.
#[tokio::test]
async fn a_deadline_that_can_never_fire_is_set_aside_not_retried_forever() -> anyhow::Result<()> {
    use event_store::{Append, PendingEvent};
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let reactor = lifecycle(&state, &db);
    let (_, _, healthy) = submitted_order(&state).await?;
    reactor
        .react(&envelope(&db, "Order", &healthy.to_string(), 1).await?)
        .await?;
    let broken = Uuid::now_v7();
    state
        .api
        .store
        .append(&[Append {
            aggregate_type: "Order",
            aggregate_id: broken.to_string(),
            base_version: 0,
            events: vec![PendingEvent {
                event_type: "OrderPlaced".into(),
                event_version: "1.0".into(),
                payload: serde_json::json!({"OrderPlaced": {"bogus": true}}),
                metadata: serde_json::json!({}),
            }],
        }])
        .await?;
    let past = Utc::now() - Span::seconds(5);
    for order in [healthy, broken] {
        timeouts::unschedule(&db.pool, &order.to_string()).await?;
        timeouts::schedule(&db.pool, &order.to_string(), past).await?;
    }
    let poller = TimeoutPoller::new(
        db.pool.clone(),
        state.api.orders.clone(),
        state.api.clock.clone(),
        TimeoutConfig::default(),
    );
    // returns (no tight loop over the failing row) having fired the healthy one
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), poller.fire_due()).await??,
        1
    );
    assert_eq!(poller.fire_due().await?, 0);
    let set_aside = poller.dead_lettered().await?;
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].0, broken.to_string());
    assert!(!set_aside[0].1.is_empty(), "the reason is kept");
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM order_deadlines WHERE order_id = $1")
        .bind(broken.to_string())
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(attempts, 1, "a permanent failure is not retried");
    db.drop_database().await
}

/// Reading ids nobody wrote (a client can send any product id) must not fill
/// the aggregate cache and push the hot products out.
#[tokio::test]
async fn reading_unknown_ids_leaves_the_cache_to_the_hot_aggregates() -> anyhow::Result<()> {
    use commands::{bus::Commands, domain::Product};
    use event_store::{AggregateCache, EventStore};
    let db = testkit::TestDb::new().await?;
    let cache = AggregateCache::<Product>::new(100);
    let products = Commands::new(EventStore::new(db.pool.clone()), ()).with_cache(cache.clone());
    for _ in 0..50 {
        let id = Uuid::now_v7().to_string();
        let unknown = products.read(&id).await?;
        assert_eq!(unknown.version, 0);
        // a command on it fails, and leaves nothing behind either
        let restock = products
            .execute(
                &id,
                || ProductCommand::Restock {
                    quantity: 1,
                    merchant: None,
                },
                &meta(),
            )
            .await;
        assert!(restock.is_err());
    }
    assert!(cache.is_empty(), "{} unknown ids cached", cache.len());
    db.drop_database().await
}

/// Many orders racing on few products and coupons, decided in batches by two
/// reactors at once (two processes): no product below zero, a coupon in at
/// most one order, every order placed or rejected exactly once, and a
/// rejected order holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_racing_on_few_products_and_coupons_keep_every_invariant() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let (apple, bread) = (Uuid::now_v7(), Uuid::now_v7());
    for (product, stock) in [(apple, 5), (bread, 8)] {
        state
            .api
            .products
            .create(
                &product.to_string(),
                || ProductCommand::Create {
                    product_id: product,
                    merchant_id: "shop-1".into(),
                    name: "Dish".into(),
                    price_cents: 1_000,
                    stock,
                },
                &meta(),
            )
            .await?;
    }
    // three coupons, each wanted by several orders of its owner
    let mut coupons = Vec::new();
    for user in ["ann", "bob", "cat"] {
        let coupon = Uuid::now_v7();
        state
            .api
            .coupons
            .create(
                &coupon.to_string(),
                || CouponCommand::Issue {
                    coupon_id: coupon,
                    user_id: user.into(),
                    merchant_id: Some("shop-1".into()),
                    voucher_id: Uuid::now_v7(),
                    value_cents: 100,
                    min_spend_cents: 0,
                    expires_at: Utc::now() + Span::days(1),
                    source: CouponSource::RegularClaim,
                },
                &meta(),
            )
            .await?;
        coupons.push((user, coupon));
    }
    let mut submitted = Vec::new();
    for i in 0..24 {
        let order = Uuid::now_v7();
        let (user, coupon) = coupons[i % 3];
        let items = if i % 2 == 0 {
            vec![
                RequestedItem {
                    product_id: apple,
                    quantity: 1,
                },
                RequestedItem {
                    product_id: bread,
                    quantity: 1,
                },
            ]
        } else {
            vec![RequestedItem {
                product_id: bread,
                quantity: 1,
            }]
        };
        state
            .api
            .orders
            .create(
                &order.to_string(),
                || OrderCommand::SubmitGoodsOrder {
                    order_id: order,
                    user_id: user.into(),
                    merchant_id: Some("shop-1".into()),
                    items: items.clone(),
                    coupon_id: (i % 4 == 0).then_some(coupon),
                    submitted_at: Utc::now(),
                },
                &meta(),
            )
            .await?;
        submitted.push(envelope(&db, "Order", &order.to_string(), 1).await?);
    }
    // two reactors (as two processes: separate caches) take overlapping batches
    let (first, second) = (lifecycle(&state, &db), lifecycle(&self::state(&db), &db));
    let (a, b) = tokio::join!(
        first.reserve_goods_batch(&submitted[..16]),
        second.reserve_goods_batch(&submitted[8..]),
    );
    for outcome in a.into_iter().chain(b) {
        outcome?;
    }
    // and a redelivery of everything changes nothing
    for outcome in first.reserve_goods_batch(&submitted).await {
        outcome?;
    }

    let (mut placed, mut placed_with_apple) = (0, 0);
    for (i, envelope) in submitted.iter().enumerate() {
        let events = history(&db, "Order", &envelope.aggregate_id).await?;
        assert_eq!(events.len(), 2, "decided exactly once: {events:?}");
        let was_placed = events[1] == "OrderPlaced";
        placed += usize::from(was_placed);
        placed_with_apple += usize::from(was_placed && i % 2 == 0);
    }
    let held = |product: Uuid| {
        let state = &state;
        async move {
            anyhow::Ok(
                state
                    .api
                    .store
                    .load::<commands::domain::Product>(&product.to_string())
                    .await?
                    .aggregate,
            )
        }
    };
    let (apple_state, bread_state) = (held(apple).await?, held(bread).await?);
    // every order wants bread: its stock (8) bounds the placed orders, and
    // exactly the placed orders hold units; rejected ones hold nothing
    assert_eq!(placed, 8);
    assert_eq!(bread_state.held(), 8, "every bread sold, none twice");
    assert_eq!(usize::try_from(apple_state.held())?, placed_with_apple);
    assert!(apple_state.held() <= 5, "no product below zero");
    for (_, coupon) in &coupons {
        let events = history(&db, "Coupon", &coupon.to_string()).await?;
        let reserved = events.iter().filter(|e| *e == "CouponReserved").count();
        assert!(reserved <= 1, "a coupon in at most one order: {events:?}");
    }
    db.drop_database().await
}
