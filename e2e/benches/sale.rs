//! A flash sale through the whole stack: `./dev bench sale [STOCK...]`
//! (default: 20000 50000).
//!
//! Every part runs on this machine against the dev stack's Postgres, NATS
//! and Redis, each service in-process on a runtime of its own with named
//! threads (as in its own process; `/proc` tells their CPU apart): the
//! command API (relay, claim writer, reactors), the seckill edge with its
//! forwarder, the projection daemon and the query API, with telemetry
//! installed as the binaries install it (`RUST_LOG`, `OTEL_*`). Per stock:
//!
//! 1. **Whole stack.** A voucher with that stock is created through the
//!    command API and reaches the edge through the relay; the crowd starts
//!    once the edge is warm and its forwarder reads the voucher's stream (a
//!    sale is created before it opens). A crowd of
//!    distinct users (three per unit, at least 60,000), each with its own
//!    token signed beforehand, asks on 64 connections, one attempt each, and
//!    keeps asking after the sell-out. For every 202 the client notes when
//!    it came and which order it names; a listener on the projections'
//!    `view_changes` announcements notes when each order document was first
//!    committed to the view, which is when the query API can serve it.
//!    Reported: admissions/s (first request to the last 202), answers/s,
//!    the time from each 202 to its order being visible (p50/p99/max, target
//!    p99 ≤ 2 s), orders visible/s end to end, and the CPU per admitted
//!    order of every part.
//! 2. **Edge alone.** The same crowd against a new voucher of the same stock
//!    with the edge's forwarder off: the admission path with no pipeline
//!    behind it (nothing reaches NATS, the event store or the views). The
//!    ratio whole-stack/edge-alone admissions/s tells what the pipeline's
//!    CPU takes from the crowd.
//!
//! Checked every run: exactly `stock` 202s, no user twice, and (whole stack)
//! exactly `stock` placed orders visible in the view.

#![allow(clippy::print_stdout)]

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{Duration as Span, Utc};
use clap::Parser as _;
use cp_nats::Topology;
use events::Namespace;
use platform::http::{JwtKeys, Role};
use serde_json::json;
use testkit::bench::{CpuSample, loadavg, percentile};
use testkit::{Server, reqwest};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "bench-secret";
const CLIENTS: usize = 64;
const MIN_CROWD: usize = 60_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stocks: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse().context("a stock (a whole number)"))
        .collect::<anyhow::Result<_>>()?;
    let stocks = if stocks.is_empty() {
        vec![20_000, 50_000]
    } else {
        stocks
    };
    // what the service binaries install (from the same variables), so every
    // part runs with its logging and tracing as deployed
    let telemetry = query_api::Config::try_parse_from(["query-api", "--jwt-secret", "unused"])?.telemetry;
    let _telemetry = platform::telemetry::init("sale-bench", &telemetry)?;
    println!(
        "machine: {} cores; Postgres/NATS/Redis of the dev stack; load {}",
        std::thread::available_parallelism()?,
        loadavg()
    );
    for stock in stocks {
        let crowd = (stock * 3).max(MIN_CROWD);
        println!("\n## flash sale: stock {stock}, {crowd} distinct users, {CLIENTS} connections");
        let whole = sale(stock, crowd, true).await?;
        let alone = sale(stock, crowd, false).await?;
        println!(
            "stock {stock}: whole stack {:.0} admissions/s, edge alone {:.0} admissions/s: {:.2}× of it; \
             every order visible ≤ {:.0} ms after its 202 at p99 (target ≤ 2,000 ms)",
            whole.admissions_per_second,
            alone.admissions_per_second,
            whole.admissions_per_second / alone.admissions_per_second,
            whole.visible_p99_ms.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// A runtime of its own with named threads, shut down in the background
/// when dropped (dropping a runtime inside another one's task panics, so an
/// early error return must not).
struct NamedRuntime(Option<tokio::runtime::Runtime>);

impl NamedRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("runtime until dropped").handle()
    }
}

impl Drop for NamedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn runtime(name: &str) -> std::io::Result<NamedRuntime> {
    Ok(NamedRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()?,
    )))
}

struct Outcome {
    admissions_per_second: f64,
    visible_p99_ms: Option<f64>,
}

/// One sale; `pipeline` false runs the edge with its forwarder off.
async fn sale(stock: usize, crowd: usize, pipeline: bool) -> anyhow::Result<Outcome> {
    let label = if pipeline {
        "whole stack"
    } else {
        "edge alone (forwarder off)"
    };
    let db = testkit::TestDb::new().await?;
    let namespace = Namespace::new(testkit::unique_namespace())?;
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    cp_nats::ensure_topology(&js, &Topology::new(namespace.clone())).await?;
    let prefix = testkit::unique_prefix();
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
    ])?;
    let edge_config = seckill_edge::Config::try_parse_from([
        "seckill-edge",
        "--database-url",
        &db.url,
        "--redis-url",
        &redis_url,
        "--nats-url",
        &nats_url,
        "--nats-namespace",
        namespace.as_str(),
        "--jwt-secret",
        SECRET,
        "--key-prefix",
        &prefix,
        // the crowd is distinct users, one attempt each: no per-user limit to hit
        "--rate-limit-per-sec",
        "0",
        "--forwarder-enabled",
        if pipeline { "true" } else { "false" },
    ])?;
    let query_config =
        query_api::Config::try_parse_from(["query-api", "--database-url", &db.url, "--jwt-secret", SECRET])?;
    let (commands_rt, edge_rt, query_rt, daemon_rt) = (
        runtime("svc-commands")?,
        runtime("svc-edge")?,
        runtime("svc-query")?,
        runtime("svc-daemon")?,
    );
    let commands = commands_rt
        .handle()
        .spawn(Server::start(|l, s| commands::run(commands_config, l, s)))
        .await??;
    let edge = edge_rt
        .handle()
        .spawn(Server::start(|l, s| seckill_edge::run(edge_config, l, s)))
        .await??;
    let query = query_rt
        .handle()
        .spawn(Server::start(|l, s| query_api::run(query_config, l, s)))
        .await??;
    let stop = CancellationToken::new();
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
    let projecting = daemon_rt.handle().spawn(daemon.run(stop.clone()));

    let result = async {
        let jwt = JwtKeys::new(&platform::Secret::new(SECRET));
        let http = reqwest::Client::new();
        let voucher = create_sale(&http, &jwt, &commands, stock).await?;
        // warm-up: the creation travels relay → JetStream → edge
        let meta_key = seckill_edge::keys::VoucherKeys::new(&prefix, voucher).meta;
        let mut redis = redis::aio::ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
        let warm_by = Instant::now() + Duration::from_secs(30);
        loop {
            let left: Option<String> = redis::cmd("HGET")
                .arg(&meta_key)
                .arg("left")
                .query_async(&mut redis)
                .await?;
            if left.as_deref() == Some(stock.to_string().as_str()) {
                break;
            }
            anyhow::ensure!(Instant::now() < warm_by, "the edge never warmed up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if pipeline {
            // A sale is created well before it opens: the forwarder has found
            // the voucher (it re-reads the registry once a second) and is
            // reading its stream by then. Without this wait the first orders
            // carry up to a second of discovery.
            let stream_key = seckill_edge::keys::VoucherKeys::new(&prefix, voucher).stream;
            loop {
                let consumers: redis::Value = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream_key)
                    .arg(seckill_edge::gate::FORWARDER_GROUP)
                    .query_async(&mut redis)
                    .await
                    .unwrap_or(redis::Value::Nil);
                if matches!(&consumers, redis::Value::Array(found) if !found.is_empty()) {
                    break;
                }
                anyhow::ensure!(Instant::now() < warm_by, "the forwarder never read the voucher's stream");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        // the projections' announcements: when each order document first
        // became visible
        let visible: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool).await?;
        listener.listen(platform::pg::VIEW_CHANGES_CHANNEL).await?;
        let listening = {
            let visible = visible.clone();
            tokio::spawn(async move {
                while let Ok(notification) = listener.recv().await {
                    let seen = Instant::now();
                    if let Some(platform::pg::ViewChange::Documents { table, changed }) =
                        platform::pg::ViewChange::parse(notification.payload())
                        && table == "order_view"
                    {
                        let mut visible = visible.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for (id, _) in changed {
                            visible.entry(id).or_insert(seen);
                        }
                    }
                }
            })
        };

        // tokens signed before the clock starts; the clients on threads of their own
        let tokens: Vec<(String, String)> = (0..crowd)
            .map(|i| {
                let user = format!("crowd-{i}");
                let token = jwt.issue(&user, Role::Customer, Duration::from_secs(3_600))?;
                anyhow::Ok((user, token))
            })
            .collect::<anyhow::Result<_>>()?;
        let client_runtime = runtime("bench-client")?;
        let url = edge.url(&format!("/seckill/{voucher}"));
        let queue = Arc::new(Mutex::new(tokens.into_iter()));
        // where the backlog sits during the sale: the voucher's Redis stream
        // (admitted, not forwarded yet) and the claim writer's consumer
        // (forwarded, not decided yet), sampled every 100 ms
        let backlog: Arc<[std::sync::atomic::AtomicU64; 4]> = Arc::default();
        let sampling = {
            let (js, namespace, backlog) = (js.clone(), namespace.clone(), backlog.clone());
            let pool = db.pool.clone();
            let stream_key = seckill_edge::keys::VoucherKeys::new(&prefix, voucher).stream;
            let mut redis = redis.clone();
            tokio::spawn(async move {
                let requests = js.get_stream(namespace.seckill_requests_stream()).await?;
                let orders = js.get_stream(namespace.events_stream("Order")).await?;
                let projection = projections::daemon::consumer_name("orders");
                loop {
                    let len: u64 = redis::cmd("XLEN").arg(&stream_key).query_async(&mut redis).await?;
                    backlog[0].fetch_max(len, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(info) = requests.consumer_info(commands::CLAIM_WRITER_CONSUMER).await {
                        let waiting = info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0);
                        backlog[1].fetch_max(waiting, std::sync::atomic::Ordering::Relaxed);
                    }
                    // stored, not yet published by the relay
                    let unrelayed: Option<i64> = sqlx::query_scalar(
                        "SELECT (SELECT max(global_position) FROM events)
                              - (SELECT COALESCE(max(last_position), 0) FROM relay_cursor)",
                    )
                    .fetch_one(&pool)
                    .await?;
                    backlog[2].fetch_max(
                        u64::try_from(unrelayed.unwrap_or(0)).unwrap_or(0),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    if let Ok(info) = orders.consumer_info(&projection).await {
                        let waiting = info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0);
                        backlog[3].fetch_max(waiting, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                #[allow(unreachable_code)]
                anyhow::Ok(())
            })
        };
        let cpu_before = CpuSample::now();
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (queue, http, url) = (queue.clone(), http.clone(), url.clone());
            clients.spawn_on(
                async move {
                    let mut admitted = Vec::new();
                    let mut answers = 0u64;
                    loop {
                        let next = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next();
                        let Some((user, token)) = next else { break };
                        let response = http.post(&url).bearer_auth(&token).send().await?;
                        let status = response.status().as_u16();
                        let body: serde_json::Value = response.json().await?;
                        answers += 1;
                        match status {
                            202 => {
                                let order = body["order_id"].as_str().context("a 202 without order_id")?;
                                admitted.push((user, order.to_owned(), Instant::now(), Utc::now()));
                            }
                            409 => {}
                            other => anyhow::bail!("{user}: {other} {body}"),
                        }
                    }
                    anyhow::Ok((admitted, answers))
                },
                client_runtime.handle(),
            );
        }
        let mut admitted = Vec::new();
        let mut answers = 0;
        while let Some(done) = clients.join_next().await {
            let (mut some, count) = done??;
            admitted.append(&mut some);
            answers += count;
        }
        let asked = started.elapsed().as_secs_f64();
        let cpu_crowd = CpuSample::now().since(&cpu_before);
        anyhow::ensure!(admitted.len() == stock, "{} admitted of {stock}", admitted.len());
        let users: HashSet<&String> = admitted.iter().map(|(user, ..)| user).collect();
        anyhow::ensure!(users.len() == stock, "a user admitted twice");
        let last_admission = admitted.iter().map(|(_, _, at, _)| *at).max().context("no admissions")?;
        let admissions_per_second = stock as f64 / (last_admission - started).as_secs_f64();
        println!(
            "{label}: {stock} admitted at {admissions_per_second:.0}/s (sold out {:.1} s after the first request); \
             {answers} answers in {asked:.1} s ({:.0}/s); load {}",
            (last_admission - started).as_secs_f64(),
            answers as f64 / asked,
            loadavg()
        );

        let mut visible_p99_ms = None;
        if pipeline {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let seen = visible.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
                if seen >= stock {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{seen} of {stock} orders visible after 2 minutes"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let cpu = CpuSample::now().since(&cpu_before);
            let visible = visible
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let mut delays = Vec::with_capacity(stock);
            for (_, order, accepted, _) in &admitted {
                let seen = visible
                    .get(order)
                    .with_context(|| format!("order {order} never announced"))?;
                delays.push(seen.saturating_duration_since(*accepted).as_secs_f64() * 1e3);
            }
            delays.sort_by(f64::total_cmp);
            // where the time goes: 202 → the claim writer's commit (the
            // OrderPlaced event's recorded_at), wall clock on both sides
            let stored: HashMap<String, chrono::DateTime<Utc>> = sqlx::query_as(
                "SELECT aggregate_id, recorded_at FROM events WHERE aggregate_type = 'Order' AND sequence = 1",
            )
            .fetch_all(&db.pool)
            .await?
            .into_iter()
            .collect();
            let mut to_store = Vec::with_capacity(stock);
            for (_, order, _, accepted) in &admitted {
                let at = stored.get(order).with_context(|| format!("order {order} not stored"))?;
                to_store.push((*at - *accepted).num_microseconds().unwrap_or(0) as f64 / 1e3);
            }
            to_store.sort_by(f64::total_cmp);
            println!(
                "202 → OrderPlaced committed in the event store: min {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                percentile(&to_store, 0.0),
                percentile(&to_store, 0.5),
                percentile(&to_store, 0.99),
                percentile(&to_store, 1.0)
            );
            let last_visible = visible.values().max().copied().context("nothing visible")?;
            sampling.abort();
            println!(
                "largest backlog seen (every 100 ms): {} admitted requests in the voucher's Redis stream, \
                 {} forwarded requests not yet decided by the claim writer, {} stored events not yet \
                 published by the relay, {} order events not yet projected",
                backlog[0].load(std::sync::atomic::Ordering::Relaxed),
                backlog[1].load(std::sync::atomic::Ordering::Relaxed),
                backlog[2].load(std::sync::atomic::Ordering::Relaxed),
                backlog[3].load(std::sync::atomic::Ordering::Relaxed)
            );
            let placed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM order_view WHERE doc->>'voucher_id' = $1 AND status <> 'rejected'",
            )
            .bind(voucher.to_string())
            .fetch_one(&db.pool)
            .await?;
            anyhow::ensure!(
                placed == i64::try_from(stock)?,
                "{placed} orders in the view for stock {stock}"
            );
            visible_p99_ms = Some(percentile(&delays, 0.99));
            println!(
                "202 → order visible: min {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; orders visible/s end to end \
                 {:.0} (the last {:.1} s after the first request, {:.1} s after the last 202)",
                percentile(&delays, 0.0),
                percentile(&delays, 0.5),
                percentile(&delays, 0.99),
                percentile(&delays, 1.0),
                stock as f64 / (last_visible - started).as_secs_f64(),
                (last_visible - started).as_secs_f64(),
                last_visible.saturating_duration_since(last_admission).as_secs_f64()
            );
            println!(
                "cost until every order was visible: {}",
                cpu.per_unit(stock as f64, "admitted order")
            );
        } else {
            println!(
                "cost while the crowd asked: {}",
                cpu_crowd.per_unit(stock as f64, "admitted order")
            );
        }
        drop(client_runtime);
        sampling.abort();
        listening.abort();
        anyhow::Ok(Outcome {
            admissions_per_second,
            visible_p99_ms,
        })
    }
    .await;

    stop.cancel();
    let _ = projecting.await;
    edge.stop().await?;
    commands.stop().await?;
    query.stop().await?;
    drop((commands_rt, edge_rt, query_rt, daemon_rt));
    for stream in Topology::new(namespace.clone()).streams() {
        js.delete_stream(&stream.name).await?;
    }
    let mut redis = redis::aio::ConnectionManager::new(redis::Client::open(redis_url.as_str())?).await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    }
    db.drop_database().await?;
    result
}

async fn create_sale(http: &reqwest::Client, jwt: &JwtKeys, commands: &Server, stock: usize) -> anyhow::Result<Uuid> {
    let now = Utc::now();
    let response = http
        .post(commands.url("/vouchers"))
        .bearer_auth(jwt.issue("shop-1", Role::Merchant, Duration::from_secs(600))?)
        .json(&json!({
            "title": "Hotpot for two",
            "kind": "seckill",
            "price_cents": 990,
            "value_cents": 5_000,
            "min_spend_cents": 0,
            "stock": stock,
            "begins_at": now - Span::minutes(1),
            "ends_at": now + Span::hours(1),
        }))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 201, "voucher not created: {}", response.status());
    let body: serde_json::Value = response.json().await?;
    Ok(body["voucher_id"].as_str().unwrap_or_default().parse()?)
}
