//! Write-side benchmarks: `./dev bench write_side [commands|claims|relay ...]`.
//!
//! Each scenario runs against the dev stack's real servers in a database and
//! NATS namespace of its own, and measures its baseline in the same run:
//!
//! - `commands`: one-event commands (CreateProduct) on distinct aggregates,
//!   32 concurrent tasks, through our command bus (with its aggregate cache,
//!   as the service runs it) vs raw postgres-es
//!   (`postgres_cqrs`), alternating rounds, medians reported.
//! - `claims`: seckill claims on ONE voucher through the batched claim writer
//!   (decisions + orders in one append per batch), vs the naive
//!   one-command-per-claim hot aggregate through raw postgres-es.
//! - `relay`: a backlog of events from `events` to JetStream (events/s), then
//!   2,000 events/s offered for 10 s, latency commit → visible on the stream.

#![allow(clippy::print_stdout)]

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use commands::{
    bus::Commands,
    claims::ClaimWriter,
    domain::{
        Product, ProductCommand, SeckillClaim, SharedClock, SystemClock, Voucher, VoucherCommand, VoucherServices,
    },
};
use cp_nats::{Publisher, Topology};
use cqrs_es::AggregateError;
use event_store::{
    AggregateCache, EventStore,
    relay::{Relay, RelayConfig},
};
use events::{EventEnvelope, EventMetadata, Namespace, VoucherKind};
use futures::StreamExt as _;
use testkit::bench::median;
use uuid::Uuid;

/// Commands per round: as many aggregates as a service caches per type, so
/// updates run on a warm cache as they do in the service.
const COMMANDS: usize = commands::AGGREGATE_CACHE_CAPACITY;
const TASKS: usize = 32;
const ROUNDS: usize = 3;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let all = args.is_empty();
    let wants = |name: &str| all || args.iter().any(|a| a == name);
    println!(
        "machine: {} cores; Postgres/NATS of the dev stack",
        std::thread::available_parallelism()?
    );
    if wants("commands") {
        commands_bench().await?;
    }
    if wants("claims") {
        claims_bench().await?;
    }
    if wants("relay") {
        relay_bench().await?;
    }
    Ok(())
}

fn create_product(id: Uuid) -> ProductCommand {
    ProductCommand::Create {
        product_id: id,
        merchant_id: "bench".into(),
        name: "Bench tea".into(),
        price_cents: 300,
        stock: 100,
    }
}

/// Runs `f` once per id over `TASKS` tasks; returns commands per second.
async fn drive<F, Fut>(ids: Arc<Vec<Uuid>>, run: F) -> anyhow::Result<f64>
where
    F: Fn(Uuid) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let run = Arc::new(run);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let (run, ids) = (run.clone(), ids.clone());
        tasks.spawn(async move {
            for id in ids.iter().skip(task).step_by(TASKS) {
                run(*id).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(ids.len() as f64 / started.elapsed().as_secs_f64())
}

fn fresh_ids() -> Arc<Vec<Uuid>> {
    Arc::new((0..COMMANDS).map(|_| Uuid::now_v7()).collect())
}

/// Raw postgres-es: `execute_with_metadata` on every id.
async fn baseline(pool: &sqlx::PgPool, ids: Arc<Vec<Uuid>>, make: fn(Uuid) -> ProductCommand) -> anyhow::Result<f64> {
    let cqrs = Arc::new(postgres_es::postgres_cqrs::<Product>(pool.clone(), vec![], ()));
    drive(ids, move |id| {
        let cqrs = cqrs.clone();
        async move {
            let metadata = EventMetadata::system("bench").to_map();
            cqrs.execute_with_metadata(&id.to_string(), make(id), metadata)
                .await
                .map_err(|e: AggregateError<_>| anyhow::anyhow!("{e}"))
        }
    })
    .await
}

fn restock(_: Uuid) -> ProductCommand {
    ProductCommand::Restock {
        quantity: 1,
        merchant: None,
    }
}

async fn commands_bench() -> anyhow::Result<()> {
    println!("\n## one-event commands on distinct aggregates ({COMMANDS} per round, {TASKS} tasks, {ROUNDS} rounds)");
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 1..=ROUNDS {
        // creations: postgres-es loads first; our bus skips the load for fresh ids
        // each side then runs one command on each aggregate it created
        // (load + decide + append for postgres-es; the bus decides on its
        // cached copy and the append's optimistic lock is the check)
        let db = testkit::TestDb::new().await?;
        let ids = fresh_ids();
        rates
            .entry("create/postgres-es")
            .or_default()
            .push(baseline(&db.pool, ids.clone(), create_product).await?);
        rates
            .entry("update/postgres-es")
            .or_default()
            .push(baseline(&db.pool, ids, restock).await?);
        db.drop_database().await?;
        let db = testkit::TestDb::new().await?;
        // the bus as the service builds it: with the aggregate cache
        let bus = Arc::new(
            Commands::<Product>::new(EventStore::new(db.pool.clone()), ())
                .with_cache(AggregateCache::new(commands::AGGREGATE_CACHE_CAPACITY)),
        );
        let ids = fresh_ids();
        let create = bus.clone();
        rates.entry("create/bus").or_default().push(
            drive(ids.clone(), move |id| {
                let bus = create.clone();
                async move {
                    bus.create(&id.to_string(), || create_product(id), &EventMetadata::system("bench"))
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        let update = bus.clone();
        rates.entry("update/bus").or_default().push(
            drive(ids, move |id| {
                let bus = update.clone();
                async move {
                    bus.execute(&id.to_string(), || restock(id), &EventMetadata::system("bench"))
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        db.drop_database().await?;
        let last = |key: &str| rates[key][round - 1];
        println!(
            "round {round}: create postgres-es {:>6.0}/s bus {:>6.0}/s | update postgres-es {:>6.0}/s bus {:>6.0}/s",
            last("create/postgres-es"),
            last("create/bus"),
            last("update/postgres-es"),
            last("update/bus")
        );
    }
    let m = |key: &str| median(rates[key].clone());
    for kind in ["create", "update"] {
        let (ours, raw) = (m(&format!("{kind}/bus")), m(&format!("{kind}/postgres-es")));
        println!(
            "median {kind}: command bus {ours:.0}/s, raw postgres-es {raw:.0}/s, ratio {:.2}",
            ours / raw
        );
    }
    println!("(targets: ≥ 4,000/s; updates of existing aggregates ≥ 1.5× raw postgres-es)");
    Ok(())
}

async fn seckill_voucher(store: &EventStore, stock: u32) -> anyhow::Result<Uuid> {
    let voucher_id = Uuid::now_v7();
    let clock: SharedClock = Arc::new(SystemClock);
    let now = Utc::now();
    Commands::<Voucher>::new(store.clone(), VoucherServices::new(clock))
        .execute(
            &voucher_id.to_string(),
            || VoucherCommand::Create {
                voucher_id,
                merchant_id: "bench".into(),
                title: "Bench voucher".into(),
                kind: VoucherKind::Seckill,
                price_cents: 990,
                value_cents: 5_000,
                min_spend_cents: 0,
                stock: Some(stock),
                begins_at: now - chrono::Duration::minutes(1),
                ends_at: now + chrono::Duration::hours(2),
            },
            &EventMetadata::system("bench"),
        )
        .await?;
    Ok(voucher_id)
}

fn claims(n: usize, from: usize) -> Vec<SeckillClaim> {
    (from..from + n)
        .map(|i| SeckillClaim {
            order_id: Uuid::now_v7(),
            user_id: format!("user-{i}"),
            requested_at: Utc::now(),
        })
        .collect()
}

async fn claims_bench() -> anyhow::Result<()> {
    const CLAIMS: usize = 100_000;
    const BATCH: usize = 1_000;
    const NAIVE: usize = 1_000;
    println!("\n## seckill claims on ONE voucher");
    let clock: SharedClock = Arc::new(SystemClock);

    let db = testkit::TestDb::new().await?;
    let store = EventStore::new(db.pool.clone());
    let voucher_id = seckill_voucher(&store, u32::try_from(CLAIMS)?).await?;
    let writer = ClaimWriter::new(
        store.clone(),
        AggregateCache::new(16),
        VoucherServices::new(clock.clone()),
        (),
    );
    let mut batch_seconds = Vec::new();
    let started = Instant::now();
    for batch in 0..CLAIMS / BATCH {
        let claims = claims(BATCH, batch * BATCH);
        let t = Instant::now();
        let decided = writer.process(voucher_id, &claims, &HashMap::new()).await?;
        batch_seconds.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(decided == BATCH, "batch {batch} decided {decided}");
    }
    let rate = CLAIMS as f64 / started.elapsed().as_secs_f64();
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Order'")
        .fetch_one(&db.pool)
        .await?;
    anyhow::ensure!(orders == i64::try_from(CLAIMS)?, "orders {orders}");
    println!(
        "batched claim writer: {CLAIMS} claims in batches of {BATCH}: {rate:.0} claims/s \
         (decision + order per claim; median batch {:.1} ms)",
        median(batch_seconds) * 1e3
    );
    db.drop_database().await?;

    let db = testkit::TestDb::new().await?;
    let store = EventStore::new(db.pool.clone());
    let voucher_id = seckill_voucher(&store, u32::try_from(NAIVE)?).await?;
    let cqrs = postgres_es::postgres_cqrs::<Voucher>(db.pool.clone(), vec![], VoucherServices::new(clock));
    let started = Instant::now();
    for claim in claims(NAIVE, 0) {
        cqrs.execute(
            &voucher_id.to_string(),
            VoucherCommand::ProcessSeckillClaims { claims: vec![claim] },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let naive = NAIVE as f64 / started.elapsed().as_secs_f64();
    println!(
        "naive one-command-per-claim through raw postgres-es (decision only, {NAIVE} claims, serial): {naive:.0} claims/s"
    );
    println!("ratio batched / naive: {:.1}× (target ≥ 5,000 claims/s)", rate / naive);
    db.drop_database().await?;
    Ok(())
}

/// Benchmarks leave no streams behind on the dev stack's NATS.
async fn drop_streams(js: &async_nats::jetstream::Context, namespace: &Namespace) -> anyhow::Result<()> {
    for stream in Topology::new(namespace.clone()).streams() {
        js.delete_stream(&stream.name).await?;
    }
    Ok(())
}

async fn relay_fixture() -> anyhow::Result<(
    testkit::TestDb,
    async_nats::jetstream::Context,
    Namespace,
    tokio::task::JoinHandle<()>,
)> {
    let db = testkit::TestDb::new().await?;
    let client = testkit::nats().await?;
    let js = cp_nats::jetstream(client, 5_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    cp_nats::ensure_topology(&js, &Topology::new(namespace.clone())).await?;
    let relay = Relay::new(
        db.pool.clone(),
        Publisher::new(js.clone(), 4_096),
        namespace.clone(),
        RelayConfig::default(),
    );
    let task = tokio::spawn(relay.run(std::future::pending()));
    Ok((db, js, namespace, task))
}

async fn relay_bench() -> anyhow::Result<()> {
    const BACKLOG: i64 = 200_000;
    println!("\n## outbox relay");
    // backlog: inserted before the relay starts, then drained
    let db = testkit::TestDb::new().await?;
    let metadata = serde_json::to_value(EventMetadata::system("bench").to_map())?;
    for chunk in 0..BACKLOG / 10_000 {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'Order', 'o-' || (n % 5000), n / 5000 + 1 + $1 * 2, 'OrderCompleted', '1.0',
                    jsonb_build_object('OrderCompleted', jsonb_build_object('at', now())), $2
               FROM generate_series(0, 9999) AS n",
        )
        .bind(chunk)
        .bind(&metadata)
        .execute(&db.pool)
        .await?;
    }
    let client = testkit::nats().await?;
    let js = cp_nats::jetstream(client, 5_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    cp_nats::ensure_topology(&js, &Topology::new(namespace.clone())).await?;
    let relay = Relay::new(
        db.pool.clone(),
        Publisher::new(js.clone(), 4_096),
        namespace.clone(),
        RelayConfig::default(),
    );
    let started = Instant::now();
    let task = tokio::spawn(relay.run(std::future::pending()));
    let stream = js.get_stream(namespace.events_stream("Order")).await?;
    loop {
        let published = stream.get_info().await?.state.messages;
        if published >= u64::try_from(BACKLOG)? {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "relay stalled at {published}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    println!("backlog of {BACKLOG} events drained at {rate:.0} events/s (target ≥ 20,000/s)");
    task.abort();
    drop_streams(&js, &namespace).await?;
    db.drop_database().await?;

    // latency at a steady offered load
    let (db, js, namespace, task) = relay_fixture().await?;
    let client = testkit::nats().await?;
    let mut subscription = client.subscribe(namespace.events_subject("Order")).await?;
    const RATE: u64 = 2_000;
    const SECONDS: u64 = 10;
    let offered = RATE * SECONDS;
    let pool = db.pool.clone();
    let producer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let metadata = serde_json::to_value(EventMetadata::system("bench").to_map()).unwrap_or_default();
        for i in 0..(offered / 20) {
            tick.tick().await;
            // 20 events per 10 ms, each its own transaction
            let inserts = (0..20).map(|j| {
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                     VALUES ('Order', $1, 1, 'OrderCompleted', '1.0', '{\"OrderCompleted\": {}}'::jsonb, $2)",
                )
                .bind(format!("lat-{i}-{j}"))
                .bind(&metadata)
                .execute(&pool)
            });
            for result in futures::future::join_all(inserts).await {
                result?;
            }
        }
        anyhow::Ok(())
    });
    let mut latencies = Vec::with_capacity(usize::try_from(offered)?);
    let deadline = Instant::now() + Duration::from_secs(SECONDS + 30);
    while latencies.len() < usize::try_from(offered)? && Instant::now() < deadline {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await else {
            break;
        };
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload)?;
        latencies.push((Utc::now() - envelope.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e3);
    }
    producer.await??;
    task.abort();
    anyhow::ensure!(
        latencies.len() == usize::try_from(offered)?,
        "received {} of {offered}",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{RATE} events/s offered for {SECONDS} s: commit → on the stream p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 ≤ 100 ms)",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    drop_streams(&js, &namespace).await?;
    db.drop_database().await?;
    Ok(())
}
