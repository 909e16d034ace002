//! The seckill claim writer against real Postgres and NATS: the event store
//! as the final guard against oversell.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{Duration as Span, Utc};
use commands::{
    AppState,
    domain::{Order, SharedClock, SystemClock, Voucher, VoucherCommand},
};
use cp_nats::{ConsumerRunner, ConsumerSpec, Outgoing, Publisher, RunnerConfig, Topology, ensure_consumer};
use events::{EventMetadata, Namespace, OrderRequested, OrderStatus, VoucherKind};
use platform::http::{Health, JwtKeys, Ops};
use uuid::Uuid;

pub(crate) fn state(db: &testkit::TestDb) -> AppState {
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let clock: SharedClock = Arc::new(SystemClock);
    AppState::with_clock(db.pool.clone(), JwtKeys::new(&platform::Secret::new("s")), ops, clock)
}

pub(crate) async fn seckill_voucher(state: &AppState, stock: u32) -> anyhow::Result<Uuid> {
    let voucher_id = Uuid::now_v7();
    let now = Utc::now();
    state
        .api
        .vouchers
        .execute(
            &voucher_id.to_string(),
            || VoucherCommand::Create {
                voucher_id,
                merchant_id: "m-1".into(),
                title: "Hotpot for two".into(),
                kind: VoucherKind::Seckill,
                price_cents: 990,
                value_cents: 5_000,
                min_spend_cents: 0,
                stock: Some(stock),
                begins_at: now - Span::minutes(1),
                ends_at: now + Span::hours(1),
            },
            &EventMetadata::system("test"),
        )
        .await?;
    Ok(voucher_id)
}

pub(crate) async fn order_statuses(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<String, (String, String)>> {
    // (status-deciding event, user) per order, straight from the event store
    let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, payload FROM events WHERE aggregate_type = 'Order' AND sequence = 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, event_type, payload)| {
            let user = payload[&event_type]["user_id"].as_str().unwrap_or_default().to_owned();
            (id, (event_type, user))
        })
        .collect())
}

#[tokio::test]
async fn five_thousand_requests_from_two_thousand_users_for_stock_500_place_exactly_500_orders() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let voucher_id = seckill_voucher(&state, 500).await?;

    let namespace = Namespace::new(testkit::unique_namespace())?;
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    cp_nats::ensure_topology(
        &js,
        &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;
    let publisher = Publisher::new(js.clone(), 4_096);

    // deterministic pseudo-random users, so some users ask several times
    let mut seed: u64 = 42;
    let mut requests = Vec::new();
    for _ in 0..5_000 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let user = format!("user-{}", (seed >> 33) % 2_000);
        let request = OrderRequested {
            order_id: Uuid::now_v7(),
            voucher_id,
            user_id: user,
            requested_at: Utc::now(),
        };
        requests.push(request);
    }
    let messages: Vec<Outgoing> = requests
        .iter()
        .map(|r| {
            Outgoing::new(
                namespace.seckill_requests_subject(),
                r.order_id.to_string(),
                serde_json::to_vec(r).unwrap_or_default(),
            )
        })
        .collect();
    publisher.publish_all(messages.clone()).await?;
    // and a redelivery storm: the first 300 again under fresh message ids
    let replays: Vec<Outgoing> = messages[..300]
        .iter()
        .cloned()
        .map(|mut m| {
            m.msg_id = format!("replay-{}", m.msg_id);
            m
        })
        .collect();
    publisher.publish_all(replays).await?;

    let consumer = ensure_consumer(
        &js,
        &ConsumerSpec::new(namespace.seckill_requests_stream(), "claim-writer"),
    )
    .await?;
    let config = RunnerConfig {
        batch: 500,
        ..RunnerConfig::default()
    };
    let runner = ConsumerRunner::batched(consumer, state.claim_writer(), publisher, namespace, config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async {
        let _ = stopped.await;
    }));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let orders = loop {
        let orders = order_statuses(&db.pool).await?;
        if orders.len() >= 5_000 {
            break orders;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} orders after 60 s",
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // let the replays drain
    let _ = stop.send(());
    let _ = task.await;

    let orders_after = order_statuses(&db.pool).await?;
    assert_eq!(orders_after.len(), 5_000, "every admitted request is exactly one order");
    let placed: Vec<&(String, String)> = orders.values().filter(|(e, _)| e == "OrderPlaced").collect();
    assert_eq!(placed.len(), 500, "no oversell, no undersell");
    let mut buyers: Vec<&str> = placed.iter().map(|(_, user)| user.as_str()).collect();
    buyers.sort_unstable();
    buyers.dedup();
    assert_eq!(buyers.len(), 500, "a user bought twice");
    assert_eq!(orders.values().filter(|(e, _)| e == "OrderRejected").count(), 4_500);

    let voucher = state.api.store.load::<Voucher>(&voucher_id.to_string()).await?;
    assert_eq!(voucher.aggregate.remaining(), 0);
    assert_eq!(voucher.aggregate.claimed(), 500);
    // the voucher's decisions and the orders were written together
    let split: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events v JOIN events o
             ON o.aggregate_type = 'Order' AND o.sequence = 1
            AND o.aggregate_id = coalesce(v.payload->'SeckillClaimAccepted'->>'order_id', v.payload->'SeckillClaimRejected'->>'order_id')
          WHERE v.aggregate_type = 'Voucher' AND v.tx_id <> o.tx_id",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(split, 0, "a decision and its order were committed apart");
    Ok(())
}

#[tokio::test]
async fn a_redelivered_batch_claims_nothing_twice() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let voucher_id = seckill_voucher(&state, 10).await?;
    let writer = state.claim_writer();
    let claims: Vec<_> = (0..5)
        .map(|i| commands::domain::SeckillClaim {
            order_id: Uuid::now_v7(),
            user_id: format!("u-{i}"),
            requested_at: Utc::now(),
        })
        .collect();
    assert_eq!(writer.process(voucher_id, &claims, &HashMap::new()).await?, 5);
    assert_eq!(writer.process(voucher_id, &claims, &HashMap::new()).await?, 0);
    // a fresh writer (a restarted process, empty cache) agrees
    assert_eq!(
        self::state(&db)
            .claim_writer()
            .process(voucher_id, &claims, &HashMap::new())
            .await?,
        0
    );
    let voucher = state.api.store.load::<Voucher>(&voucher_id.to_string()).await?;
    assert_eq!(voucher.aggregate.claimed(), 5);
    for claim in &claims {
        let order = state.api.store.load::<Order>(&claim.order_id.to_string()).await?;
        assert_eq!(order.version, 1);
        assert_eq!(order.aggregate.status(), Some(OrderStatus::PendingPayment));
    }
    Ok(())
}

#[tokio::test]
async fn a_request_for_an_unknown_voucher_still_ends_as_a_rejected_order() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let claim = commands::domain::SeckillClaim {
        order_id: Uuid::now_v7(),
        user_id: "u".into(),
        requested_at: Utc::now(),
    };
    let writer = state.claim_writer();
    let unknown = Uuid::now_v7();
    assert_eq!(
        writer
            .process(unknown, std::slice::from_ref(&claim), &HashMap::new())
            .await?,
        1
    );
    // redelivered: the order exists, nothing more is recorded
    assert_eq!(
        writer
            .process(unknown, std::slice::from_ref(&claim), &HashMap::new())
            .await?,
        0
    );
    let order = state.api.store.load::<Order>(&claim.order_id.to_string()).await?;
    assert_eq!(
        (order.version, order.aggregate.status()),
        (1, Some(OrderStatus::Rejected))
    );
    Ok(())
}

#[tokio::test]
async fn the_cached_voucher_catches_up_with_writes_made_elsewhere() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let voucher_id = seckill_voucher(&state, 3).await?;
    let claim = |user: &str| commands::domain::SeckillClaim {
        order_id: Uuid::now_v7(),
        user_id: user.into(),
        requested_at: Utc::now(),
    };
    let first = state.claim_writer();
    first.process(voucher_id, &[claim("a")], &HashMap::new()).await?; // cached at version 2
    // another process (a second writer instance) takes the last two units
    self::state(&db)
        .claim_writer()
        .process(voucher_id, &[claim("b"), claim("c")], &HashMap::new())
        .await?;
    // the first writer's cache is stale; it must catch up, not oversell
    first.process(voucher_id, &[claim("d")], &HashMap::new()).await?;
    let voucher = state.api.store.load::<Voucher>(&voucher_id.to_string()).await?;
    assert_eq!((voucher.aggregate.claimed(), voucher.aggregate.remaining()), (3, 0));
    Ok(())
}

#[tokio::test]
async fn admitted_requests_the_store_cannot_hold_end_as_rejected_orders_and_unreadable_ones_are_dead_lettered()
-> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let state = state(&db);
    let voucher_id = seckill_voucher(&state, 10).await?;
    let namespace = Namespace::new(testkit::unique_namespace())?;
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    cp_nats::ensure_topology(
        &js,
        &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;
    let publisher = Publisher::new(js.clone(), 4_096);

    let request = |user_id: &str| OrderRequested {
        order_id: Uuid::now_v7(),
        voucher_id,
        user_id: user_id.to_owned(),
        requested_at: Utc::now(),
    };
    // a NUL (Postgres cannot store it in jsonb), an empty and an oversized user id
    let bad: Vec<OrderRequested> = vec![request("ann\0"), request(""), request(&"x".repeat(10_000))];
    let good = request("bob");
    // names its order and voucher, but is no OrderRequested
    let broken_order = Uuid::now_v7();
    let broken = serde_json::json!({ "order_id": broken_order, "voucher_id": voucher_id, "user_id": 7 });
    let mut messages: Vec<Outgoing> = bad
        .iter()
        .chain(std::iter::once(&good))
        .map(|r| {
            Outgoing::new(
                namespace.seckill_requests_subject(),
                r.order_id.to_string(),
                serde_json::to_vec(r).unwrap_or_default(),
            )
        })
        .collect();
    messages.push(Outgoing::new(
        namespace.seckill_requests_subject(),
        broken_order.to_string(),
        serde_json::to_vec(&broken)?,
    ));
    messages.push(Outgoing::new(
        namespace.seckill_requests_subject(),
        "garbage",
        b"not json at all".to_vec(),
    ));
    publisher.publish_all(messages).await?;

    let consumer = ensure_consumer(
        &js,
        &ConsumerSpec::new(namespace.seckill_requests_stream(), "claim-writer").max_deliver(10),
    )
    .await?;
    let config = RunnerConfig {
        max_deliver: 10,
        ..RunnerConfig::default()
    };
    let runner = ConsumerRunner::batched(consumer, state.claim_writer(), publisher, namespace.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async {
        let _ = stopped.await;
    }));
    let dlq = js.get_stream(namespace.dead_letter_stream()).await?;
    testkit::eventually(Duration::from_secs(20), || async {
        let dead = js
            .get_stream(namespace.dead_letter_stream())
            .await?
            .get_info()
            .await?
            .state
            .messages;
        Ok(order_statuses(&db.pool).await?.len() == 5 && dead == 1)
    })
    .await?;
    let _ = stop.send(());
    let _ = task.await;

    // every identifiable admitted request is one order: the bad ones rejected
    for order_id in bad.iter().map(|r| r.order_id).chain([broken_order]) {
        let order = state.api.store.load::<Order>(&order_id.to_string()).await?;
        assert_eq!(order.aggregate.status(), Some(OrderStatus::Rejected), "{order_id}");
        assert_eq!(
            order.aggregate.rejection(),
            Some(events::OrderRejectionReason::InvalidRequest)
        );
        let user = order.aggregate.user_id().unwrap_or_default();
        assert!(commands::domain::limits::is_valid_user_id(user), "{user:?}");
    }
    let placed = state.api.store.load::<Order>(&good.order_id.to_string()).await?;
    assert_eq!(placed.aggregate.status(), Some(OrderStatus::PendingPayment));
    assert_eq!(placed.aggregate.merchant_id(), Some("m-1"));
    // the refused requests took no unit in the store (the edge re-credits its own)
    let voucher = state.api.store.load::<Voucher>(&voucher_id.to_string()).await?;
    assert_eq!(voucher.aggregate.remaining(), 9);
    // the unreadable one was dead-lettered at once, with its reason
    let dead = dlq.get_raw_message(1).await?;
    assert_eq!(&dead.payload[..], b"not json at all");
    let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header(cp_nats::consumer::HDR_DLQ_DELIVERED).as_deref(), Some("1"));
    assert!(
        header(cp_nats::consumer::HDR_DLQ_ERROR)
            .unwrap_or_default()
            .contains("not an OrderRequested"),
    );
    Ok(())
}

/// The unit of work retries a conflicting append with fresh decisions, a
/// bounded number of times, and never retries a refused decision.
#[tokio::test]
async fn a_unit_of_work_retries_conflicts_a_bounded_number_of_times() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU32, Ordering};

    use commands::bus::{RetryPolicy, UnitError, unit_of_work};
    use event_store::{Append, EventStore, PendingEvent};

    let db = testkit::TestDb::new().await?;
    let store = EventStore::new(db.pool.clone());
    let first = |base_version: u64| Append {
        aggregate_type: "Payment",
        aggregate_id: "p-1".into(),
        base_version,
        events: vec![PendingEvent {
            event_type: "PaymentCreated".into(),
            event_version: "1.0".into(),
            payload: serde_json::json!({"PaymentCreated": {}}),
            metadata: serde_json::json!({}),
        }],
    };
    store.append(&[first(0)]).await?;
    let retry = RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(1),
    };

    // always deciding on a stale version: four tries, then a conflict
    let tries = AtomicU32::new(0);
    let stale = unit_of_work(&store, retry, "Payment", || async {
        tries.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>((vec![first(0)], ()))
    })
    .await;
    assert!(matches!(stale, Err(UnitError::Conflict { attempts: 4 })), "{stale:?}");
    assert_eq!(tries.load(Ordering::SeqCst), 4);

    // stale once, then fresh: committed on the second try
    let tries = AtomicU32::new(0);
    let version = unit_of_work(&store, retry, "Payment", || async {
        let attempt = tries.fetch_add(1, Ordering::SeqCst);
        let base = if attempt == 0 { 0 } else { 1 };
        Ok::<_, std::convert::Infallible>((vec![first(base)], base + 1))
    })
    .await;
    assert!(matches!(version, Ok(2)), "{version:?}");

    // a refused decision is not retried
    let tries = AtomicU32::new(0);
    let refused = unit_of_work(&store, retry, "Payment", || async {
        tries.fetch_add(1, Ordering::SeqCst);
        Err::<(Vec<Append>, ()), _>("refused")
    })
    .await;
    assert!(matches!(refused, Err(UnitError::Decide("refused"))));
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    Ok(())
}
