//! The edge on a Redis Cluster (`./dev test-infra up` starts three primaries
//! with a replica each): every key of a voucher is in one slot, so the same
//! scripts, pipelines and blocking stream reads work through the
//! cluster-aware client, with vouchers spread over the primaries.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use crate::support::{Harness, NO_RATE_LIMIT, accepted, attempt, created, occurrences, record_voucher_events};
use http::StatusCode;
use seckill_edge::gate::Settlement;
use testkit::eventually;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sales_spread_over_the_primaries_never_oversell_and_forward_each_request_once() -> anyhow::Result<()> {
    const VOUCHERS: usize = 6;
    const STOCK: u32 = 50;
    const USERS: usize = 150;
    let harness = Harness::on_cluster(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let router = harness.router();
    let mut vouchers = Vec::new();
    for _ in 0..VOUCHERS {
        vouchers.push(harness.open_sale(STOCK).await?);
    }
    let mut primaries = HashSet::new();
    for voucher in &vouchers {
        primaries.insert(testkit::primary_port(&mut harness.redis.clone(), &harness.gate.keys(*voucher).meta).await?);
    }
    assert!(
        primaries.len() >= 2,
        "six vouchers should land on more than one primary: {primaries:?}"
    );

    // every user tries every voucher twice, 128 requests in flight
    let tokens: Arc<Vec<String>> = Arc::new((0..USERS).map(|u| harness.token(&format!("user-{u}"))).collect());
    let limit = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..2 {
        for user in 0..USERS {
            for voucher in &vouchers {
                let (router, tokens, limit, voucher) = (router.clone(), tokens.clone(), limit.clone(), *voucher);
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await.expect("semaphore");
                    let answer = attempt(&router, &voucher.to_string(), Some(&tokens[user]), None).await;
                    (
                        round,
                        user,
                        voucher,
                        answer.status,
                        answer.code().to_owned(),
                        answer.order_id(),
                    )
                });
            }
        }
    }
    let mut admitted: HashMap<Uuid, Vec<(usize, Uuid)>> = HashMap::new();
    while let Some(outcome) = tasks.join_next().await {
        let (_, user, voucher, status, code, order) = outcome?;
        match status {
            StatusCode::ACCEPTED => admitted
                .entry(voucher)
                .or_default()
                .push((user, order.expect("order id"))),
            StatusCode::CONFLICT => assert!(code == "sold_out" || code == "already_purchased", "{code}"),
            other => panic!("unexpected answer {other} {code}"),
        }
    }
    for voucher in &vouchers {
        let orders = &admitted[voucher];
        assert_eq!(orders.len(), STOCK as usize, "exactly the stock of {voucher}");
        let users: HashSet<usize> = orders.iter().map(|(user, _)| *user).collect();
        assert_eq!(users.len(), orders.len(), "no user twice on {voucher}");
        assert_eq!(harness.gate.left(*voucher).await?, Some(0));
    }

    // the forwarder reads every voucher's stream on its own cluster connection
    let forwarder = harness.forwarder("f1", Duration::from_secs(10))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(forwarder.run(stop.clone()));
    let total = VOUCHERS * STOCK as usize;
    eventually(Duration::from_secs(30), || async {
        Ok(harness.requests_on_jetstream().await?.len() >= total)
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        let mut left = 0;
        for voucher in &vouchers {
            left += harness.stream_length(*voucher).await?;
        }
        Ok(left == 0)
    })
    .await?;
    stop.cancel();
    task.await?;
    let requests = harness.requests_on_jetstream().await?;
    assert_eq!(requests.len(), total);
    assert!(occurrences(&requests).values().all(|n| *n == 1), "each order id once");
    let forwarded: HashSet<Uuid> = requests.iter().map(|r| r.order_id).collect();
    let answered: HashSet<Uuid> = admitted.values().flatten().map(|(_, order)| *order).collect();
    assert_eq!(forwarded, answered);
    harness.forget_everything().await?;
    Ok(())
}

#[tokio::test]
async fn a_lost_voucher_is_rebuilt_on_the_cluster_and_settles_once() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::on_cluster(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = Uuid::now_v7();
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    record_voucher_events(
        &db.pool,
        voucher,
        &[created(voucher, 3), accepted(ann, "ann"), accepted(bob, "bob")],
    )
    .await?;
    let router = harness.router();
    let cat = attempt(&router, &voucher.to_string(), Some(&harness.token("cat")), None).await;
    assert_eq!(
        cat.status,
        StatusCode::ACCEPTED,
        "re-warmed from the store, then admitted"
    );
    assert_eq!(harness.gate.left(voucher).await?, Some(0));
    let bobs = attempt(&router, &voucher.to_string(), Some(&harness.token("bob")), None).await;
    assert_eq!(bobs.code(), "already_purchased");
    assert_eq!(
        harness.gate.settle(voucher, bob, "bob", true).await?,
        Settlement::Recredited
    );
    assert_eq!(
        harness.gate.settle(voucher, bob, "bob", true).await?,
        Settlement::NothingHeld
    );
    assert_eq!(harness.gate.left(voucher).await?, Some(1));
    harness.forget_everything().await?;
    db.drop_database().await
}

#[tokio::test]
async fn the_scripts_are_reloaded_after_the_primaries_forget_them() -> anyhow::Result<()> {
    let harness = Harness::on_cluster(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(3).await?;
    // routed to every primary by the cluster client
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut harness.redis.clone())
        .await?;
    let answer = attempt(
        &harness.router(),
        &voucher.to_string(),
        Some(&harness.token("ann")),
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    harness.forget_everything().await?;
    Ok(())
}

/// With replicas required, concurrent admissions of a voucher share their
/// `WAIT`s: fewer `WAIT`s reach the voucher's primary than admissions are
/// answered 202, and every admission is still answered only after one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_share_their_replication_waits() -> anyhow::Result<()> {
    const USERS: usize = 400;
    let mut harness = Harness::on_cluster(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    harness.gate = harness.gate.clone().with_replicas(1, Duration::from_secs(2));
    let router = harness.router();
    let voucher = harness.open_sale(USERS as u32).await?;
    let port = testkit::primary_port(&mut harness.redis.clone(), &harness.gate.keys(voucher).meta).await?;
    let mut primary = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await?;
    let waits_before = wait_calls(&mut primary).await?;

    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..USERS {
        let (router, token) = (router.clone(), harness.token(&format!("user-{user}")));
        let voucher = voucher.to_string();
        tasks.spawn(async move { attempt(&router, &voucher, Some(&token), None).await.status });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status?, StatusCode::ACCEPTED);
    }
    let waits = wait_calls(&mut primary).await? - waits_before;
    assert!(
        (1..USERS as u64 / 2).contains(&waits),
        "{waits} WAITs for {USERS} admissions"
    );
    assert_eq!(harness.gate.left(voucher).await?, Some(0));
    harness.forget_everything().await?;
    Ok(())
}

/// `WAIT`s this Redis node has run (`INFO commandstats`).
async fn wait_calls(node: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(node).await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_wait:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0))
}
