//! Admission against the real Redis: the flash crowd, the sale window,
//! unknown vouchers, the rate limit, idempotency keys, the in-process
//! sold-out flag and bad input.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use crate::support::{Harness, NO_RATE_LIMIT, attempt, occurrences, snapshot};
use chrono::{Duration as Span, Utc};
use events::{VoucherEvent, VoucherKind};
use http::StatusCode;
use platform::http::Role;
use seckill_edge::limiter::RateLimit;
use testkit::eventually;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flash_crowd_never_oversells_and_every_admitted_request_reaches_jetstream_once() -> anyhow::Result<()> {
    const USERS: usize = 5_000;
    const ATTEMPTS: usize = 20_000;
    const STOCK: u32 = 1_000;
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(STOCK).await?;
    let router = harness.router();
    let tokens: Arc<Vec<String>> = Arc::new((0..USERS).map(|u| harness.token(&format!("user-{u}"))).collect());

    // every user tries 4 times, interleaved, 256 requests in flight
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ATTEMPTS {
        let (router, tokens, limit) = (router.clone(), tokens.clone(), limit.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore");
            let user = i % USERS;
            let answer = attempt(&router, &voucher.to_string(), Some(&tokens[user]), None).await;
            (user, answer.status, answer.code().to_owned(), answer.order_id())
        });
    }
    let mut admitted: Vec<(usize, Uuid)> = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        let (user, status, code, order_id) = outcome?;
        match status {
            StatusCode::ACCEPTED => admitted.push((user, order_id.expect("order id"))),
            StatusCode::CONFLICT => assert!(code == "sold_out" || code == "already_purchased", "{code}"),
            other => panic!("unexpected answer {other} {code}"),
        }
    }
    assert_eq!(admitted.len(), STOCK as usize, "exactly the stock is admitted");
    let users: HashSet<usize> = admitted.iter().map(|(user, _)| *user).collect();
    assert_eq!(users.len(), admitted.len(), "no user admitted twice");
    assert_eq!(harness.gate.left(voucher).await?, Some(0));

    let forwarder = harness.forwarder("f1", Duration::from_secs(10))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { forwarder.forward_voucher(voucher, stop).await }
    });
    eventually(Duration::from_secs(30), || async {
        Ok(
            harness.stream_length(voucher).await? == 0
                && harness.requests_on_jetstream().await?.len() >= admitted.len(),
        )
    })
    .await?;
    stop.cancel();
    task.await?;

    let requests = harness.requests_on_jetstream().await?;
    assert_eq!(requests.len(), admitted.len());
    assert!(occurrences(&requests).values().all(|n| *n == 1), "each order id once");
    let on_jetstream: HashSet<(String, Uuid)> = requests.iter().map(|r| (r.user_id.clone(), r.order_id)).collect();
    let expected: HashSet<(String, Uuid)> = admitted.iter().map(|(u, o)| (format!("user-{u}"), *o)).collect();
    assert_eq!(on_jetstream, expected);
    assert!(requests.iter().all(|r| r.voucher_id == voucher));
    Ok(())
}

#[tokio::test]
async fn attempts_outside_the_sale_window_are_refused_and_take_nothing() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let router = harness.router();
    let now = Utc::now();
    let (early, late) = (Uuid::now_v7(), Uuid::now_v7());
    harness
        .gate
        .load(&snapshot(early, 5, now + Span::hours(1), now + Span::hours(2)))
        .await?;
    harness
        .gate
        .load(&snapshot(late, 5, now - Span::hours(2), now - Span::hours(1)))
        .await?;
    let token = harness.token("ann");

    let answer = attempt(&router, &early.to_string(), Some(&token), None).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::FORBIDDEN, "sale_not_started")
    );
    let answer = attempt(&router, &late.to_string(), Some(&token), None).await;
    assert_eq!((answer.status, answer.code()), (StatusCode::FORBIDDEN, "sale_ended"));

    assert_eq!(harness.gate.left(early).await?, Some(5));
    assert_eq!(harness.gate.left(late).await?, Some(5));
    assert_eq!(
        harness.stream_length(early).await? + harness.stream_length(late).await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn the_sale_window_is_judged_by_the_edges_clock_to_the_millisecond() -> anyhow::Result<()> {
    let opens = Utc::now() + Span::hours(1);
    let closes = opens + Span::minutes(10);
    let at = |instant| -> platform::clock::SharedClock { Arc::new(platform::clock::FixedClock(instant)) };
    let voucher = Uuid::now_v7();
    for (instant, user, expected) in [
        (opens - Span::milliseconds(1), "ann", "sale_not_started"),
        (opens, "bob", ""),
        (closes - Span::milliseconds(1), "cat", ""),
        (closes, "dan", "sale_ended"),
    ] {
        let harness = Harness::on_at(
            testkit::kv_client(),
            NO_RATE_LIMIT,
            testkit::unreachable_pool(),
            at(instant),
        )
        .await?;
        harness.gate.load(&snapshot(voucher, 5, opens, closes)).await?;
        let answer = attempt(
            &harness.router(),
            &voucher.to_string(),
            Some(&harness.token(user)),
            None,
        )
        .await;
        assert_eq!(answer.code(), expected, "at {instant}");
        if expected.is_empty() {
            assert_eq!(answer.status, StatusCode::ACCEPTED);
            // the request is stamped with the same clock: its order id carries the time
            let order_id = answer.order_id().expect("order id");
            assert_eq!(
                seckill_edge::gate::order_millis(order_id),
                Some(instant.timestamp_millis())
            );
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(harness.gate.keys(voucher).stream)
                .arg("-")
                .arg("+")
                .query_async(&mut harness.redis.clone())
                .await?;
            let fields: HashMap<String, String> = entries[0].1.iter().cloned().collect();
            assert_eq!(fields["o"], order_id.to_string());
            assert_eq!(fields["u"], user);
        }
    }
    Ok(())
}

#[tokio::test]
async fn unknown_and_regular_vouchers_are_not_found() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let router = harness.router();
    let token = harness.token("ann");
    let regular = Uuid::now_v7();
    let now = Utc::now();
    crate::support::record_voucher_events(
        &db.pool,
        regular,
        &[VoucherEvent::VoucherCreated {
            voucher_id: regular,
            merchant_id: "m".into(),
            title: "Free drink".into(),
            kind: VoucherKind::Regular,
            price_cents: 0,
            value_cents: 300,
            min_spend_cents: 0,
            stock: None,
            begins_at: now - Span::hours(1),
            ends_at: now + Span::hours(1),
        }],
    )
    .await?;

    for voucher in [Uuid::now_v7(), regular] {
        let answer = attempt(&router, &voucher.to_string(), Some(&token), None).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::NOT_FOUND, "voucher_not_found")
        );
        assert!(!harness.gate.is_loaded(voucher).await?, "nothing loaded for {voucher}");
        // the second time comes from the in-process flag
        let again = attempt(&router, &voucher.to_string(), Some(&token), None).await;
        assert_eq!(again.status, StatusCode::NOT_FOUND);
    }
    db.drop_database().await
}

#[tokio::test]
async fn a_user_over_the_rate_limit_gets_429_with_retry_after_and_others_do_not() -> anyhow::Result<()> {
    let rate = RateLimit {
        burst: 2,
        per_second: 2.0,
    };
    let harness = Harness::new(rate, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(10).await?.to_string();
    let router = harness.router();
    let (ann, bob) = (harness.token("ann"), harness.token("bob"));

    assert_eq!(
        attempt(&router, &voucher, Some(&ann), None).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        attempt(&router, &voucher, Some(&ann), None).await.code(),
        "already_purchased"
    );
    let limited = attempt(&router, &voucher, Some(&ann), None).await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(
        limited.retry_after.is_some_and(|s| s >= 1),
        "Retry-After in whole seconds"
    );

    assert_eq!(
        attempt(&router, &voucher, Some(&bob), None).await.status,
        StatusCode::ACCEPTED
    );
    // the bucket refills at 2 tokens per second
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        attempt(&router, &voucher, Some(&ann), None).await.code(),
        "already_purchased"
    );
    assert_eq!(harness.gate.left(voucher.parse()?).await?, Some(8));
    Ok(())
}

#[tokio::test]
async fn an_idempotency_key_from_the_same_user_gets_the_same_answer() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher_id = harness.open_sale(2).await?;
    let voucher = voucher_id.to_string();
    let router = harness.router();
    let (ann, bob, cat) = (harness.token("ann"), harness.token("bob"), harness.token("cat"));

    let first = attempt(&router, &voucher, Some(&ann), Some("k-1")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let replay = attempt(&router, &voucher, Some(&ann), Some("k-1")).await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.order_id(), first.order_id(), "the same order, not a new one");
    // a new key is a new attempt
    assert_eq!(
        attempt(&router, &voucher, Some(&ann), Some("k-2")).await.code(),
        "already_purchased"
    );
    // keys are per user
    let bobs = attempt(&router, &voucher, Some(&bob), Some("k-1")).await;
    assert_eq!(bobs.status, StatusCode::ACCEPTED);
    assert_ne!(bobs.order_id(), first.order_id());
    assert_eq!(harness.gate.left(voucher_id).await?, Some(0));
    assert_eq!(
        harness.stream_length(voucher_id).await?,
        2,
        "one request queued per order"
    );

    // a refusal is an answer too: cat's key keeps "sold out" after a unit comes back
    assert_eq!(
        attempt(&router, &voucher, Some(&cat), Some("k-9")).await.code(),
        "sold_out"
    );
    let order = first.order_id().expect("order id");
    harness.gate.settle(voucher_id, order, "ann", true).await?;
    harness.flags.clear_sold_out(voucher_id);
    assert_eq!(
        attempt(&router, &voucher, Some(&cat), Some("k-9")).await.code(),
        "sold_out"
    );
    assert_eq!(
        attempt(&router, &voucher, Some(&cat), Some("k-10")).await.status,
        StatusCode::ACCEPTED
    );
    Ok(())
}

#[tokio::test]
async fn sold_out_is_answered_in_process_without_redis() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(1).await?.to_string();
    let router = harness.router();
    assert_eq!(
        attempt(&router, &voucher, Some(&harness.token("ann")), None)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        attempt(&router, &voucher, Some(&harness.token("bob")), None)
            .await
            .code(),
        "sold_out"
    );

    // with Redis empty, only the process's flag can still say "sold out"
    harness.forget_everything().await?;
    let answer = attempt(&router, &voucher, Some(&harness.token("cat")), None).await;
    assert_eq!((answer.status, answer.code()), (StatusCode::CONFLICT, "sold_out"));
    // the flag expires (500 ms here): then Redis and the event store are asked,
    // and the event store does not know this voucher, which only lived in Redis
    tokio::time::sleep(Duration::from_millis(600)).await;
    let answer = attempt(&router, &voucher, Some(&harness.token("cat")), None).await;
    assert_eq!(answer.code(), "voucher_not_found");
    db.drop_database().await
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher_id = harness.open_sale(3).await?;
    let voucher = voucher_id.to_string();
    let router = harness.router();
    let ann = harness.token("ann");

    let cases = [
        (
            attempt(&router, &voucher, None, None).await,
            StatusCode::UNAUTHORIZED,
            "missing_token",
        ),
        (
            attempt(&router, &voucher, Some("not.a.jwt"), None).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        ),
        (
            attempt(&router, &voucher, Some(&harness.token_as("shop", Role::Merchant)), None).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            attempt(&router, "not-a-uuid", Some(&ann), None).await,
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            attempt(&router, &voucher, Some(&ann), Some("has space")).await,
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
        ),
    ];
    for (answer, status, code) in cases {
        assert_eq!((answer.status, answer.code()), (status, code));
        assert!(answer.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(harness.gate.left(voucher_id).await?, Some(3));
    assert_eq!(harness.stream_length(voucher_id).await?, 0);
    Ok(())
}

/// A `sub` the event store could never hold (a NUL), an empty or a 10 KB
/// one, or a token not valid yet, is refused before Redis is asked: no
/// unit is taken, nothing is queued (API.md "Auth").
#[tokio::test]
async fn identities_outside_the_rules_are_401_and_take_nothing() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher_id = harness.open_sale(3).await?;
    let voucher = voucher_id.to_string();
    let router = harness.router();
    let long = "x".repeat(10 * 1024);
    for sub in ["ann\0", "", long.as_str(), " ann", "a\u{202e}nn"] {
        let answer = attempt(&router, &voucher, Some(&harness.token(sub)), None).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::UNAUTHORIZED, "invalid_token"),
            "{sub:?}"
        );
    }
    let in_an_hour = Utc::now().timestamp().unsigned_abs() + 3_600;
    let not_yet = harness.jwt.issue_claims(&platform::http::auth::Claims {
        sub: "ann".into(),
        role: Role::Customer,
        exp: in_an_hour + 600,
        nbf: Some(in_an_hour),
    })?;
    let answer = attempt(&router, &voucher, Some(&not_yet), None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(harness.gate.left(voucher_id).await?, Some(3));
    assert_eq!(harness.stream_length(voucher_id).await?, 0);
    // the same person with a valid token is admitted
    let answer = attempt(&router, &voucher, Some(&harness.token("ann")), None).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    Ok(())
}

#[tokio::test]
async fn the_scripts_are_reloaded_after_redis_forgets_them() -> anyhow::Result<()> {
    let server = testkit::RedisServer::start().await?;
    let client = platform::kv::KvClient::from_urls(&server.url(), false)?;
    let harness = Harness::on(client, NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(3).await?.to_string();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut harness.redis.clone())
        .await?;
    let answer = attempt(&harness.router(), &voucher, Some(&harness.token("ann")), None).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    Ok(())
}
