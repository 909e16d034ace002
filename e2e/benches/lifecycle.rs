//! Order-lifecycle benchmarks: `./dev bench lifecycle [goods|timeouts]`.
//!
//! - `goods`: goods orders with three items and a coupon, end to end: the
//!   command API (with its relay and lifecycle reactor), the projection
//!   daemon and the query API run in-process on the dev stack's servers,
//!   each on a runtime of its own with named threads; 64 clients each
//!   `POST /orders`, then read the order from the query API
//!   (`min_version=2`; a 404 is retried after 10, 20, 40, then 80 ms) until
//!   it shows `pending_payment`. Orders/s from the first request to the last
//!   order visible, each order's latency, and the CPU every part spent per
//!   order (`/proc`) with the ceiling it implies. Run twice, same build:
//!   batched (`ORDER_BATCHING=true`) and the one-order-at-a-time baseline
//!   (`false`), and the ratio. `goods_batched` runs the first half alone.
//! - `timeouts`: 100,000 pending deadlines held in `order_deadlines`, due
//!   spread over 60 s starting 10 s after they are written, fired by two
//!   pollers; lateness = `timed_out_at − deadline` of every `OrderTimedOut`.

#![allow(clippy::print_stdout)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use clap::Parser as _;
use commands::{
    AppState,
    domain::{CouponCommand, ProductCommand, SharedClock, SystemClock},
    timeouts::{TimeoutConfig, TimeoutPoller},
};
use cp_nats::Topology;
use events::{CouponSource, EventMetadata, Namespace};
use platform::http::{Health, JwtKeys, Ops, Role};
use rand::seq::IndexedRandom as _;
use serde_json::{Value, json};
use testkit::bench::{CpuSample, loadavg, percentile};
use testkit::reqwest;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "bench-secret";
const ORDERS: usize = 5_000;
const CLIENTS: usize = 64;
const PRODUCTS: usize = 30;
const DEADLINES: i64 = 100_000;
const WINDOW_SECS: i64 = 60;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    // `goods_batched`: only the batched half of `goods` (profiling)
    println!(
        "machine: {} cores; Postgres/NATS/Redis of the dev stack; load {}",
        std::thread::available_parallelism()?,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    if args.iter().any(|a| a == "goods_batched") {
        goods_bench(true).await?;
    }
    if wants("goods") {
        // the batched path, then the one-order-at-a-time baseline, same run
        let batched = goods_bench(true).await?;
        let single = goods_bench(false).await?;
        println!(
            "\ngoods orders: batched {batched:.0}/s, one order at a time {single:.0}/s: {:.2}x (target ≥ 5x and ≥ 1,000/s)",
            batched / single
        );
    }
    if wants("timeouts") {
        timeouts_bench().await?;
    }
    Ok(())
}

fn runtime(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
}

fn setup_state(pool: &sqlx::PgPool) -> AppState {
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let clock: SharedClock = Arc::new(SystemClock);
    AppState::with_clock(pool.clone(), JwtKeys::new(&platform::Secret::new(SECRET)), ops, clock)
}

async fn goods_bench(batching: bool) -> anyhow::Result<f64> {
    let mode = if batching {
        "batched (ORDER_BATCHING=true)"
    } else {
        "one order at a time (ORDER_BATCHING=false)"
    };
    println!("\n## goods orders, 3 items + a coupon, end to end ({ORDERS} orders, {CLIENTS} clients), {mode}");
    let db = testkit::TestDb::new().await?;
    let namespace = Namespace::new(testkit::unique_namespace())?;
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    cp_nats::ensure_topology(&js, &Topology::new(namespace.clone())).await?;
    let (nats_url, redis_url) = (testkit::nats_url(), testkit::redis_url());
    let commands_config = commands::Config::try_parse_from([
        "command-api",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats_url,
        "--redis-url",
        &redis_url,
        "--nats-namespace",
        namespace.as_str(),
        "--jwt-secret",
        SECRET,
        "--order-batching",
        if batching { "true" } else { "false" },
    ])?;
    // each service on a runtime of its own, as in its own process, with
    // named threads so a profile tells their CPU apart
    let (commands_rt, query_rt, daemon_rt) = (runtime("svc-commands")?, runtime("svc-query")?, runtime("svc-daemon")?);
    let commands = commands_rt
        .spawn(testkit::Server::start(|l, s| commands::run(commands_config, l, s)))
        .await??;
    let query_config =
        query_api::Config::try_parse_from(["query-api", "--database-url", &db.url, "--jwt-secret", SECRET])?;
    let query = query_rt
        .spawn(testkit::Server::start(|l, s| query_api::run(query_config, l, s)))
        .await??;
    let stop = CancellationToken::new();
    // the daemon's pool as the service builds it (platform::pg::connect)
    let daemon_pool = platform::pg::connect(
        &platform::config::PostgresConfig {
            database_url: platform::Secret::new(db.url.clone()),
            database_max_connections: 16,
        },
        Duration::from_secs(10),
    )
    .await?;
    // the daemon's defaults (or the environment's PROJECTIONS_* settings)
    let settings = projections::Config::try_parse_from(["projection-daemon"])?;
    let daemon = projections::Daemon {
        pool: daemon_pool,
        js: js.clone(),
        namespace: namespace.clone(),
        batch_size: settings.batch_size,
        max_deliver: settings.max_deliver,
        workers: settings.workers,
    };
    let projecting = daemon_rt.spawn(daemon.run(stop.clone()));

    // the catalogue and one coupon per order, straight through the command bus
    let state = setup_state(&db.pool);
    let meta = EventMetadata::system("bench");
    let mut products = Vec::new();
    for i in 0..PRODUCTS {
        let id = Uuid::now_v7();
        let price_cents = 1_000 + i64::try_from(i)? * 10;
        state
            .api
            .products
            .create(
                &id.to_string(),
                || ProductCommand::Create {
                    product_id: id,
                    merchant_id: "shop-1".into(),
                    name: format!("Dish {i}"),
                    price_cents,
                    stock: 1_000_000,
                },
                &meta,
            )
            .await?;
        products.push(id);
    }
    let coupons: Vec<(String, Uuid)> = (0..ORDERS)
        .map(|i| (format!("user-{}", i % 1_000), Uuid::now_v7()))
        .collect();
    let issue = Arc::new(tokio::sync::Semaphore::new(32));
    let mut issuing = tokio::task::JoinSet::new();
    for (user, coupon) in coupons.clone() {
        let (state, meta, issue) = (state.clone(), meta.clone(), issue.clone());
        issuing.spawn(async move {
            let _permit = issue.acquire_owned().await?;
            state
                .api
                .coupons
                .create(
                    &coupon.to_string(),
                    || CouponCommand::Issue {
                        coupon_id: coupon,
                        merchant_id: Some("shop-1".into()),
                        user_id: user.clone(),
                        voucher_id: Uuid::from_u128(1),
                        value_cents: 500,
                        min_spend_cents: 1_000,
                        expires_at: Utc::now() + chrono::Duration::days(1),
                        source: CouponSource::RegularClaim,
                    },
                    &meta,
                )
                .await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = issuing.join_next().await {
        done??;
    }
    println!(
        "setup: {PRODUCTS} products, {ORDERS} coupons issued; load {}",
        loadavg()
    );

    let jwt = JwtKeys::new(&platform::Secret::new(SECRET));
    // the clients on threads of their own ("bench-client"), so a profile
    // tells their CPU from the services'
    let client_runtime = runtime("bench-client")?;
    let http = reqwest::Client::new();
    let clients = Arc::new(tokio::sync::Semaphore::new(CLIENTS));
    let products = Arc::new(products);
    let reads = Arc::new([
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    ]);
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let mut orders = tokio::task::JoinSet::new();
    for (user, coupon) in coupons {
        let (clients, http, jwt, products) = (clients.clone(), http.clone(), jwt.clone(), products.clone());
        let reads = reads.clone();
        let (commands_url, query_url) = (commands.url("/orders"), query.url(""));
        orders.spawn_on(
            async move {
                let _permit = clients.acquire_owned().await?;
                let token = jwt.issue(&user, Role::Customer, Duration::from_secs(3_600))?;
                let items: Vec<Value> = products
                    .choose_multiple(&mut rand::rng(), 3)
                    .map(|p| json!({"product_id": p, "quantity": 1}))
                    .collect();
                let sent = Instant::now();
                let response = http
                    .post(&commands_url)
                    .bearer_auth(&token)
                    .json(&json!({"items": items, "coupon_id": coupon}))
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 202, "POST /orders answered {}", response.status());
                let body: Value = response.json().await?;
                let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                // a client's patience while the order is not projected yet: a
                // 404 is retried after 10 ms, then 20, 40, 80 ms at most
                let mut pause = Duration::from_millis(10);
                loop {
                    let read = http
                        .get(format!("{query_url}/orders/{order}?min_version=2&wait_ms=10000"))
                        .bearer_auth(&token)
                        .send()
                        .await?;
                    reads[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // not projected yet: an id the view lacks is a 404 at once (API.md)
                    if read.status() == 404 {
                        reads[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(80));
                    }
                    let doc: Value = read.json().await?;
                    match doc["status"].as_str() {
                        Some("pending_payment") => return Ok((sent.elapsed().as_secs_f64(), true)),
                        Some("rejected") => return Ok((sent.elapsed().as_secs_f64(), false)),
                        _ => anyhow::ensure!(sent.elapsed() < Duration::from_secs(120), "order {order} never placed"),
                    }
                }
            },
            client_runtime.handle(),
        );
    }
    let mut latencies = Vec::with_capacity(ORDERS);
    let mut rejected = 0;
    while let Some(done) = orders.join_next().await {
        let (latency, placed) = done??;
        latencies.push(latency);
        rejected += usize::from(!placed);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = CpuSample::now().since(&cpu_before);
    latencies.sort_by(f64::total_cmp);
    println!(
        "reads of the query API: {} ({} of them 404: not projected yet)",
        reads[0].load(std::sync::atomic::Ordering::Relaxed),
        reads[1].load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "orders placed and visible: {:.0}/s ({} in {elapsed:.1}s, {rejected} rejected); \
         latency request → pending_payment in the query API: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; load {}",
        ORDERS as f64 / elapsed,
        ORDERS,
        percentile(&latencies, 0.5) * 1e3,
        percentile(&latencies, 0.99) * 1e3,
        percentile(&latencies, 1.0) * 1e3,
        loadavg()
    );
    // the same-run limit: what an order costs in CPU, all parts together,
    // and the most this machine's cores can place at that cost
    let cores = std::thread::available_parallelism()?.get() as f64;
    let per_order = cpu.machine_busy_ms / ORDERS as f64;
    println!("cost: {}", cpu.per_unit(ORDERS as f64, "order"));
    println!(
        "ceiling at this cost: {:.0} orders/s ({cores} cores × 1,000 ms ÷ {per_order:.2} ms per order); measured {:.0}/s = {:.0} % of it",
        cores * 1_000.0 / per_order,
        ORDERS as f64 / elapsed,
        100.0 * (ORDERS as f64 / elapsed) / (cores * 1_000.0 / per_order)
    );
    client_runtime.shutdown_background();
    stop.cancel();
    let _ = projecting.await;
    commands.stop().await?;
    query.stop().await?;
    for rt in [commands_rt, query_rt, daemon_rt] {
        rt.shutdown_background();
    }
    for stream in Topology::new(namespace.clone()).streams() {
        js.delete_stream(&stream.name).await?;
    }
    db.drop_database().await?;
    Ok(ORDERS as f64 / elapsed)
}

async fn timeouts_bench() -> anyhow::Result<()> {
    println!("\n## payment timeouts: {DEADLINES} deadlines due over {WINDOW_SECS} s, two pollers");
    let db = testkit::TestDb::new().await?;
    let metadata = serde_json::to_value(EventMetadata::system("bench").to_map())?;
    // placed orders awaiting payment, written in bulk
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'Order', id::text, 1, 'OrderPlaced', '1.0',
                jsonb_build_object('OrderPlaced', jsonb_build_object(
                    'order_id', id, 'user_id', 'user-' || n, 'kind', 'seckill_voucher', 'items', '[]'::jsonb,
                    'voucher_id', NULL, 'coupon_id', NULL, 'subtotal_cents', 990, 'discount_cents', 0,
                    'total_cents', 990, 'placed_at', to_jsonb(now()))),
                $1
           FROM (SELECT n, gen_random_uuid() AS id FROM generate_series(1, $2) AS n) orders",
    )
    .bind(&metadata)
    .bind(DEADLINES)
    .execute(&db.pool)
    .await?;
    let written = Instant::now();
    sqlx::query(
        "INSERT INTO order_deadlines (order_id, due_at)
         SELECT aggregate_id, now() + interval '10 seconds' + (row_number() OVER () * $1 / $2) * interval '1 millisecond'
           FROM events WHERE aggregate_type = 'Order'",
    )
    .bind(WINDOW_SECS * 1_000)
    .bind(DEADLINES)
    .execute(&db.pool)
    .await?;
    println!(
        "{DEADLINES} deadlines held in {:.1}s; load {}",
        written.elapsed().as_secs_f64(),
        loadavg()
    );

    let state = setup_state(&db.pool);
    let stop = CancellationToken::new();
    let mut pollers = Vec::new();
    for _ in 0..2 {
        let poller = TimeoutPoller::new(
            db.pool.clone(),
            state.api.orders.clone(),
            state.api.clock.clone(),
            TimeoutConfig::default(),
        );
        pollers.push(tokio::spawn(poller.run(stop.clone().cancelled_owned())));
    }
    let deadline = Instant::now() + Duration::from_secs(u64::try_from(WINDOW_SECS)? + 60);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM order_deadlines")
            .fetch_one(&db.pool)
            .await?;
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    for poller in pollers {
        poller.await?;
    }
    let row: (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness),
                max(lateness)
           FROM (SELECT extract(epoch FROM (payload->'OrderTimedOut'->>'timed_out_at')::timestamptz
                                      - (payload->'OrderTimedOut'->>'deadline')::timestamptz)::float8 AS lateness
                   FROM events WHERE event_type = 'OrderTimedOut') fired",
    )
    .fetch_one(&db.pool)
    .await?;
    println!(
        "fired {} of {DEADLINES}; lateness after the due time: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target: every one ≤ 2,000 ms); load {}",
        row.0,
        row.1.unwrap_or(f64::NAN) * 1e3,
        row.2.unwrap_or(f64::NAN) * 1e3,
        row.3.unwrap_or(f64::NAN) * 1e3,
        loadavg()
    );
    db.drop_database().await
}
