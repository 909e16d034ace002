//! The admissions' reconciler against real Redis, Postgres and NATS: an
//! admission whose request never reached the requests stream (no forwarder
//! ran) is sent again; one with an order in the store is confirmed and never
//! asked about again; sending again within one bucket stores each request
//! once; admissions younger than the grace (by the injected clock) wait; a
//! big buyers hash is walked page by page; a voucher whose buyers are all
//! confirmed is walked again only when it has new ones or is reloaded.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use platform::clock::{FixedClock, SharedClock, SystemClock};
use redis::AsyncCommands as _;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{Harness, NO_RATE_LIMIT, attempt, occurrences};
use seckill_edge::reconciler::{AdmissionReconciler, PassReport, ReconcilerConfig};

fn new_reconciler(
    harness: &Harness,
    pool: &PgPool,
    config: ReconcilerConfig,
    clock: SharedClock,
) -> AdmissionReconciler {
    AdmissionReconciler::new(
        harness.redis.clone(),
        harness.prefix.clone(),
        pool.clone(),
        cp_nats::Publisher::new(harness.js.clone(), 1_000),
        harness.namespace.clone(),
        config,
        clock,
    )
}

fn no_grace() -> ReconcilerConfig {
    ReconcilerConfig {
        every: Duration::from_secs(1),
        grace: Duration::ZERO,
        ..ReconcilerConfig::default()
    }
}

/// Records the order as decided, as the claim writer would.
async fn decided(pool: &PgPool, order: Uuid) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Order', $1, 1, 'OrderPlaced', '1.0', '{}'::jsonb, '{}'::jsonb)",
    )
    .bind(order.to_string())
    .execute(pool)
    .await?;
    Ok(())
}

async fn admit(harness: &Harness, voucher: Uuid, users: &[&str]) -> anyhow::Result<Vec<Uuid>> {
    let router = harness.router();
    let mut orders = Vec::new();
    for user in users {
        let answer = attempt(&router, &voucher.to_string(), Some(&harness.token(user)), None).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        orders.push(answer.order_id().ok_or_else(|| anyhow::anyhow!("no order id"))?);
    }
    Ok(orders)
}

fn report(checked: usize, resent: usize, walked: usize) -> PassReport {
    PassReport {
        checked,
        resent,
        walked,
    }
}

#[tokio::test]
async fn admissions_without_an_order_are_sent_again_and_decided_ones_are_confirmed() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(10).await?;
    let orders = admit(&harness, voucher, &["ann", "bob", "cat"]).await?;
    let mut reconciler = new_reconciler(&harness, &db.pool, no_grace(), Arc::new(SystemClock));

    // nothing forwarded them, nothing decided them: all three go out
    let first = reconciler.pass().await?;
    assert_eq!((first.checked, first.resent), (3, 3), "{first:?}");
    let sent = harness.requests_on_jetstream().await?;
    let counts = occurrences(&sent);
    assert!(orders.iter().all(|o| counts.get(o) == Some(&1)), "{counts:?}");
    assert!(sent.iter().all(|r| r.voucher_id == voucher));

    // ann's order is decided: confirmed, never looked up again
    decided(&db.pool, orders[0]).await?;
    let second = reconciler.pass().await?;
    assert_eq!((second.checked, second.resent), (3, 2), "{second:?}");
    let third = reconciler.pass().await?;
    assert_eq!(third.checked, 2, "{third:?}");
    // sent again within the bucket: JetStream stored each request once
    let counts = occurrences(&harness.requests_on_jetstream().await?);
    assert!(orders.iter().all(|o| counts.get(o) == Some(&1)), "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn admissions_younger_than_the_grace_wait_by_the_injected_clock() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(10).await?;
    let orders = admit(&harness, voucher, &["ann", "bob"]).await?;
    let config = ReconcilerConfig {
        grace: Duration::from_secs(30),
        ..no_grace()
    };

    // 29 s after the admissions: not due, nothing looked up, nothing sent;
    // the voucher is walked again next time
    let early = Utc::now() + chrono::Duration::seconds(29);
    let mut reconciler = new_reconciler(&harness, &db.pool, config.clone(), Arc::new(FixedClock(early)));
    assert_eq!(reconciler.pass().await?, report(0, 0, 1));
    assert_eq!(reconciler.pass().await?, report(0, 0, 1));
    assert!(harness.requests_on_jetstream().await?.is_empty());

    // 31 s after: both due
    let late = Utc::now() + chrono::Duration::seconds(31);
    let mut reconciler = new_reconciler(&harness, &db.pool, config, Arc::new(FixedClock(late)));
    assert_eq!(reconciler.pass().await?, report(2, 2, 1));
    let counts = occurrences(&harness.requests_on_jetstream().await?);
    assert!(orders.iter().all(|o| counts.get(o) == Some(&1)), "{counts:?}");
    Ok(())
}

#[tokio::test]
async fn a_voucher_whose_buyers_are_all_confirmed_is_walked_again_only_when_it_has_new_ones() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(10).await?;
    let orders = admit(&harness, voucher, &["ann", "bob", "cat"]).await?;
    for order in &orders {
        decided(&db.pool, *order).await?;
    }
    let mut reconciler = new_reconciler(&harness, &db.pool, no_grace(), Arc::new(SystemClock));

    assert_eq!(reconciler.pass().await?, report(3, 0, 1), "every buyer confirmed");
    assert_eq!(reconciler.pass().await?, report(0, 0, 0), "settled: not walked");

    // a new buyer whose request is lost: walked, sent again until decided
    let late = admit(&harness, voucher, &["dan"]).await?[0];
    assert_eq!(reconciler.pass().await?, report(1, 1, 1));
    assert_eq!(reconciler.pass().await?, report(1, 1, 1), "still open");
    decided(&db.pool, late).await?;
    assert_eq!(reconciler.pass().await?, report(1, 0, 1));
    assert_eq!(reconciler.pass().await?, report(0, 0, 0));
    let counts = occurrences(&harness.requests_on_jetstream().await?);
    assert_eq!(counts.get(&late), Some(&1), "one copy within the bucket: {counts:?}");

    // reloaded with the same number of buyers (Redis lost its data, the
    // edge re-warmed, a buyer came back): the hash is walked again
    let mut redis = harness.redis.clone();
    let keys = harness.gate.keys(voucher);
    let _: () = redis.hset(&keys.meta, "loaded_at", "1").await?;
    assert_eq!(reconciler.pass().await?, report(0, 0, 1));
    assert_eq!(reconciler.pass().await?, report(0, 0, 0));
    Ok(())
}

#[tokio::test]
async fn a_big_buyers_hash_is_walked_page_by_page() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(10).await?;
    // 2,500 buyers admitted a minute ago whose requests were all lost, and
    // one bought earlier and decided
    let mut redis = harness.redis.clone();
    let keys = harness.gate.keys(voucher);
    let minute_ago = u64::try_from((Utc::now() - chrono::Duration::minutes(1)).timestamp())?;
    let buyers: Vec<(String, String)> = (0..2_500)
        .map(|i| {
            let order = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, minute_ago, i));
            (format!("user-{i}"), order.to_string())
        })
        .collect();
    for page in buyers.chunks(500) {
        let _: () = redis.hset_multiple(&keys.buyers, page).await?;
    }
    let decided_order = admit(&harness, voucher, &["ann"]).await?[0];
    decided(&db.pool, decided_order).await?;

    let config = ReconcilerConfig {
        page: 100,
        scan_rate: 50_000, // 2,501 buyers: 50 ms of pauses in all
        ..no_grace()
    };
    let mut reconciler = new_reconciler(
        &harness,
        &db.pool,
        config,
        Arc::new(FixedClock(Utc::now() + chrono::Duration::seconds(1))),
    );
    let started = std::time::Instant::now();
    assert_eq!(reconciler.pass().await?, report(2_501, 2_500, 1));
    // paced by the buyers read, whatever the pages held
    assert!(
        started.elapsed() >= Duration::from_millis(48),
        "{:?}",
        started.elapsed()
    );
    let stream = harness
        .js
        .get_stream(harness.namespace.seckill_requests_stream())
        .await?;
    assert_eq!(stream.cached_info().state.messages, 2_500);
    Ok(())
}

#[tokio::test]
async fn on_a_redis_cluster_the_walk_is_routed_to_the_vouchers_node() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::on_cluster(NO_RATE_LIMIT, db.pool.clone()).await?;
    let mut vouchers = Vec::new();
    // several vouchers: their hash tags land on different primaries
    for _ in 0..4 {
        let voucher = harness.open_sale(10).await?;
        admit(&harness, voucher, &["ann", "bob"]).await?;
        vouchers.push(voucher);
    }
    let mut reconciler = new_reconciler(&harness, &db.pool, no_grace(), Arc::new(SystemClock));
    assert_eq!(reconciler.pass().await?, report(8, 8, 4));
    Ok(())
}

#[tokio::test]
async fn the_scan_rate_caps_a_pass_over_many_small_vouchers() -> anyhow::Result<()> {
    // one page each: a pause per full page would never pause them
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let mut redis = harness.redis.clone();
    let minute_ago = u64::try_from((Utc::now() - chrono::Duration::minutes(1)).timestamp())?;
    for _ in 0..4 {
        let voucher = harness.open_sale(10).await?;
        let buyers: Vec<(String, String)> = (0..100)
            .map(|i| {
                let order = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, minute_ago, i));
                (format!("user-{i}"), order.to_string())
            })
            .collect();
        let _: () = redis.hset_multiple(&harness.gate.keys(voucher).buyers, &buyers).await?;
    }
    let config = ReconcilerConfig {
        scan_rate: 4_000, // 400 buyers: 100 ms
        ..no_grace()
    };
    let mut reconciler = new_reconciler(&harness, &db.pool, config, Arc::new(SystemClock));
    let started = std::time::Instant::now();
    assert_eq!(reconciler.pass().await?, report(400, 400, 4));
    assert!(
        started.elapsed() >= Duration::from_millis(95),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}
