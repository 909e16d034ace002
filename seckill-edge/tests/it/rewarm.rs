//! Warm-up, re-warm and re-credit against real Redis, Postgres and NATS: the
//! gate is rebuilt from the event store's decisions, never from a bare stock
//! number, and each order's unit comes back at most once.

use std::time::Duration;

use crate::support::{Harness, NO_RATE_LIMIT, accepted, attempt, created, record_voucher_events, snapshot};
use chrono::{Duration as Span, Utc};
use cp_nats::{ConsumerRunner, ConsumerSpec, Outgoing, Publisher, RunnerConfig};
use events::{ClaimRejection, EventEnvelope, EventMetadata, VoucherEvent, subjects::SECKILL_EDGE_CONSUMER};
use http::StatusCode;
use platform::telemetry::TraceHeaders;
use seckill_edge::{
    gate::{Admission, Settlement},
    warmup::SaleEvents,
};
use testkit::eventually;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn admit(harness: &Harness, voucher: Uuid, user: &str) -> anyhow::Result<Uuid> {
    match harness
        .gate
        .admit(voucher, user, Uuid::now_v7(), None, &TraceHeaders::default())
        .await?
    {
        Admission::Admitted { order_id, .. } => Ok(order_id),
        other => anyhow::bail!("{user} not admitted: {other:?}"),
    }
}

/// Puts a Voucher event on the namespace's Voucher stream as the relay would
/// (a fresh message id each time: a redelivery that dedupe did not catch).
async fn deliver(harness: &Harness, voucher_id: Uuid, sequence: u64, event: &VoucherEvent) -> anyhow::Result<()> {
    let envelope = EventEnvelope::new(
        voucher_id.to_string(),
        sequence,
        i64::try_from(sequence)?,
        event,
        EventMetadata::system("test"),
        Utc::now(),
    )?;
    let message = Outgoing::new(
        harness.namespace.events_subject("Voucher"),
        Uuid::new_v4().to_string(),
        serde_json::to_vec(&envelope)?,
    );
    Publisher::new(harness.js.clone(), 16).publish(message).await?;
    Ok(())
}

/// Runs the edge's Voucher-events consumer until `stop`.
async fn sale_events(harness: &Harness, stop: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let spec = ConsumerSpec::new(harness.namespace.events_stream("Voucher"), SECKILL_EDGE_CONSUMER);
    let consumer = cp_nats::ensure_consumer(&harness.js, &spec).await?;
    let handler = SaleEvents {
        warmer: harness.warmer.clone(),
        gate: harness.gate.clone(),
        flags: harness.flags.clone(),
    };
    let runner = ConsumerRunner::new(
        consumer,
        handler,
        Publisher::new(harness.js.clone(), 16),
        harness.namespace.clone(),
        RunnerConfig::default(),
    );
    Ok(tokio::spawn(async move {
        runner.run(stop.cancelled_owned()).await.expect("consumer runs");
    }))
}

/// True once the edge's consumer has acknowledged everything on its stream.
async fn consumed(harness: &Harness) -> anyhow::Result<bool> {
    let stream = harness
        .js
        .get_stream(harness.namespace.events_stream("Voucher"))
        .await?;
    let info = stream.consumer_info(SECKILL_EDGE_CONSUMER).await?;
    Ok(info.num_pending == 0 && info.num_ack_pending == 0)
}

#[tokio::test]
async fn a_lost_voucher_is_rebuilt_from_the_event_store_decisions() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = Uuid::now_v7();
    let (ann, bob, cat) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    record_voucher_events(
        &db.pool,
        voucher,
        &[
            created(voucher, 10),
            accepted(ann, "ann"),
            accepted(bob, "bob"),
            accepted(cat, "cat"),
            VoucherEvent::SeckillStockReleased {
                order_id: ann,
                user_id: "ann".into(),
            },
            VoucherEvent::SeckillClaimRejected {
                order_id: Uuid::now_v7(),
                user_id: "dan".into(),
                reason: ClaimRejection::SoldOut,
            },
        ],
    )
    .await?;
    let router = harness.router();
    let voucher_path = voucher.to_string();

    // nothing in Redis: the first attempt rebuilds, then is decided
    assert!(!harness.gate.is_loaded(voucher).await?);
    let eve = attempt(&router, &voucher_path, Some(&harness.token("eve")), None).await;
    assert_eq!(eve.status, StatusCode::ACCEPTED);
    // 10 − bob − cat (ann gave hers back) − eve
    assert_eq!(harness.gate.left(voucher).await?, Some(7));
    // buyers keep their mark, released or not; a refused user may try
    for user in ["ann", "bob", "cat"] {
        let answer = attempt(&router, &voucher_path, Some(&harness.token(user)), None).await;
        assert_eq!(answer.code(), "already_purchased", "{user}");
    }
    assert_eq!(
        attempt(&router, &voucher_path, Some(&harness.token("dan")), None)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // units were rebuilt as held for the orders still holding one, and only
    // those; an order is settled only as its own buyer's
    for (order, user, expected) in [
        (ann, "ann", Settlement::NothingHeld),
        (bob, "bob", Settlement::Recredited),
        (bob, "bob", Settlement::NothingHeld),
        (cat, "bob", Settlement::NothingHeld),
    ] {
        assert_eq!(
            harness.gate.settle(voucher, order, user, true).await?,
            expected,
            "{user}"
        );
    }
    assert_eq!(harness.gate.left(voucher).await?, Some(7));
    db.drop_database().await
}

#[tokio::test]
async fn a_voucher_an_older_edge_loaded_is_rebuilt_in_the_current_layout() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = Uuid::now_v7();
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    record_voucher_events(
        &db.pool,
        voucher,
        &[
            created(voucher, 5),
            accepted(ann, "ann"),
            accepted(bob, "bob"),
            VoucherEvent::SeckillStockReleased {
                order_id: ann,
                user_id: "ann".into(),
            },
        ],
    )
    .await?;
    // what the previous layout left: no `layout` field, users → order, a
    // reservations hash, and a stock count the store does not back
    let keys = harness.gate.keys(voucher);
    let now = Utc::now().timestamp_millis();
    let mut redis = harness.redis.clone();
    let _: () = redis::pipe()
        .hset_multiple(
            &keys.meta,
            &[
                ("left", "4".to_owned()),
                ("stock", "5".to_owned()),
                ("begins", (now - 60_000).to_string()),
                ("ends", (now + 3_600_000).to_string()),
                ("version", "3".to_owned()),
            ],
        )
        .hset(&keys.buyers, "bob", bob.to_string())
        .hset(&keys.legacy_reservations, bob.to_string(), format!("bob {now}"))
        .query_async(&mut redis)
        .await?;
    assert!(!harness.gate.is_loaded(voucher).await?, "an older layout is not loaded");

    let router = harness.router();
    let cat = attempt(&router, &voucher.to_string(), Some(&harness.token("cat")), None).await;
    assert_eq!(cat.status, StatusCode::ACCEPTED);
    // 5 − bob − cat: rebuilt from the store (ann gave hers back), not from the old count
    assert_eq!(harness.gate.left(voucher).await?, Some(3));
    for user in ["ann", "bob"] {
        let answer = attempt(&router, &voucher.to_string(), Some(&harness.token(user)), None).await;
        assert_eq!(answer.code(), "already_purchased", "{user}");
    }
    let legacy: bool = redis::cmd("EXISTS")
        .arg(&keys.legacy_reservations)
        .query_async(&mut redis)
        .await?;
    assert!(!legacy, "the older layout's reservations are gone");
    assert_eq!(
        harness.gate.settle(voucher, ann, "ann", true).await?,
        Settlement::NothingHeld
    );
    assert_eq!(
        harness.gate.settle(voucher, bob, "bob", true).await?,
        Settlement::Recredited
    );
    assert_eq!(harness.gate.left(voucher).await?, Some(4));
    db.drop_database().await
}

#[tokio::test]
async fn a_load_never_overwrites_a_live_sale() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(5).await?;
    admit(&harness, voucher, "ann").await?;
    admit(&harness, voucher, "bob").await?;
    let now = Utc::now();
    let fresh = snapshot(voucher, 5, now - Span::minutes(1), now + Span::hours(1));
    assert!(!harness.gate.load(&fresh).await?, "refused: the sale is live");
    assert_eq!(harness.gate.left(voucher).await?, Some(3));
    Ok(())
}

#[tokio::test]
async fn a_created_seckill_voucher_is_warmed_up_from_the_store_even_when_replayed_late() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let (fresh, old) = (Uuid::now_v7(), Uuid::now_v7());
    record_voucher_events(&db.pool, fresh, &[created(fresh, 50)]).await?;
    // an old sale whose VoucherCreated is consumed again (a new consumer reading
    // from the start): its stock must not be offered again in full
    record_voucher_events(
        &db.pool,
        old,
        &[
            created(old, 50),
            accepted(Uuid::now_v7(), "ann"),
            accepted(Uuid::now_v7(), "bob"),
        ],
    )
    .await?;
    deliver(&harness, fresh, 1, &created(fresh, 50)).await?;
    deliver(&harness, old, 1, &created(old, 50)).await?;

    let stop = CancellationToken::new();
    let task = sale_events(&harness, stop.clone()).await?;
    eventually(Duration::from_secs(10), || consumed(&harness)).await?;
    assert_eq!(harness.gate.left(fresh).await?, Some(50));
    assert_eq!(harness.gate.left(old).await?, Some(48));
    stop.cancel();
    task.await?;
    db.drop_database().await
}

#[tokio::test]
async fn the_same_release_delivered_twice_recredits_once_and_reopens_the_sale() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(2).await?;
    let router = harness.router();
    let voucher_path = voucher.to_string();
    let ann = admit(&harness, voucher, "ann").await?;
    let bob = admit(&harness, voucher, "bob").await?;
    // cat finds it sold out, and this process remembers
    assert_eq!(
        attempt(&router, &voucher_path, Some(&harness.token("cat")), None)
            .await
            .code(),
        "sold_out"
    );

    let release = VoucherEvent::SeckillStockReleased {
        order_id: ann,
        user_id: "ann".into(),
    };
    deliver(&harness, voucher, 4, &release).await?;
    deliver(&harness, voucher, 4, &release).await?;
    // the store refused bob's claim as sold out: his record goes, no unit comes back
    let refused = VoucherEvent::SeckillClaimRejected {
        order_id: bob,
        user_id: "bob".into(),
        reason: ClaimRejection::SoldOut,
    };
    deliver(&harness, voucher, 5, &refused).await?;
    let stop = CancellationToken::new();
    let task = sale_events(&harness, stop.clone()).await?;
    eventually(Duration::from_secs(10), || consumed(&harness)).await?;

    assert_eq!(harness.gate.left(voucher).await?, Some(1), "one unit back, once");
    assert_eq!(
        harness.gate.settle(voucher, bob, "bob", true).await?,
        Settlement::NothingHeld
    );
    // the re-credit cleared the sold-out flag: cat gets the unit at once
    assert_eq!(
        attempt(&router, &voucher_path, Some(&harness.token("cat")), None)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    // ann keeps her mark
    assert_eq!(
        attempt(&router, &voucher_path, Some(&harness.token("ann")), None)
            .await
            .code(),
        "already_purchased"
    );
    stop.cancel();
    task.await?;
    db.drop_database().await
}

/// A request the store refused as unstorable (`invalid_request`) took a unit
/// at the edge that must come back to the sale: the sale sells its whole
/// stock. (Before, such a request was retried and dead-lettered, and its unit
/// stayed held in Redis for good.)
#[tokio::test]
async fn a_request_refused_as_invalid_gives_its_unit_back_to_the_sale() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(1).await?;
    let router = harness.router();
    let voucher_path = voucher.to_string();
    let ann = admit(&harness, voucher, "ann").await?;
    assert_eq!(harness.gate.left(voucher).await?, Some(0));
    let refused = VoucherEvent::SeckillClaimRejected {
        order_id: ann,
        user_id: "ann".into(),
        reason: ClaimRejection::InvalidRequest,
    };
    deliver(&harness, voucher, 2, &refused).await?;
    let stop = CancellationToken::new();
    let task = sale_events(&harness, stop.clone()).await?;
    eventually(Duration::from_secs(10), || consumed(&harness)).await?;
    assert_eq!(harness.gate.left(voucher).await?, Some(1), "the unit is back");
    assert_eq!(
        attempt(&router, &voucher_path, Some(&harness.token("bob")), None)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    stop.cancel();
    task.await?;
    db.drop_database().await
}
