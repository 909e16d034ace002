//! Read-side benchmarks: `./dev bench read_side [daemon|replay|query ...]`
//! (`replay_ratio` and `replay_1m` run the two halves of `replay`;
//! `replay_breakdown` and `daemon_without_gin`, only when named, are
//! diagnostics: where a replay's time goes, and the daemon without the view's
//! GIN index).
//!
//! Each scenario runs against the dev stack's real servers in a database and
//! NATS namespace of its own, dropped at the end. The event store is filled
//! with seckill orders of four events each (placed, payment started, paid,
//! preparation started), stored as the command side stores them; orders
//! progress in waves, so a page or batch of 10,000 events touches 10,000
//! different documents, three quarters of them already existing.
//!
//! - `replay`: our replay (`Projection::Orders.replay`) vs cqrs-es 0.5.0
//!   `QueryReplay` (postgres-es `PostgresEventRepository` into a
//!   `GenericQuery` over a `PostgresViewRepository` building the same order
//!   document) on the same 100,000 events, alternating rounds; then ours alone
//!   on 1,000,000 events (the baseline would take ~8 minutes there).
//! - `daemon`: 300,000 envelopes on the Order stream (published as the relay
//!   does, and stored), the projection daemon started on them: events/s until
//!   the `projection-orders` consumer has acknowledged everything, with two,
//!   four and eight workers; beside it the best-case writer, a bare loop upserting
//!   the same final documents in the same batches of 1,000 on one connection
//!   (the reference), and the same split between two connections.
//! - `query`: the query API in-process on 100,000 order documents, `wrk -t2
//!   -c64 -d10s --latency` on `GET /orders/{id}` with random ids as an admin,
//!   beside pgbench running the same lookup; then (also alone as
//!   `hot_voucher`) `GET /vouchers/{id}` of one hot voucher, beside a bare
//!   axum route answering the same body from the same process.
//!
//! Telemetry is installed as the service binaries install it, from the same
//! variables (`RUST_LOG`, `OTEL_*`; no trace export unless an endpoint is set).

#![allow(clippy::print_stdout)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{TimeZone as _, Utc};
use clap::Parser as _;
use commands::domain::{Order, OrderCommand};
use cp_nats::{Publisher, Topology};
use cqrs_es::{
    View,
    persist::{GenericQuery, QueryReplay},
    test::TestFramework,
};
use events::{EventEnvelope, EventMetadata, Namespace, OrderEvent};
use platform::{
    Secret,
    http::{JwtKeys, Role},
};
use postgres_es::{PostgresEventRepository, PostgresViewRepository};
use projections::{
    Daemon, Projection,
    daemon::consumer_name,
    replay::{ReplayOptions, Silent},
    views::{OrderProjector, OrderView, Projector as _},
};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row as _};
use testkit::bench::{CpuSample, loadavg, median};
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 3;
/// Orders per seeding statement: one statement stores 10,000 events.
const WAVE: i64 = 2_500;
const VOUCHER: &str = "7c6f0a52-5b1e-4c59-9a51-0d8f3e6b2a11";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    // what the service binaries install (from the same variables): the
    // request path is measured with its logging and tracing as deployed
    let telemetry = query_api::Config::try_parse_from(["query-api", "--jwt-secret", "unused"])?.telemetry;
    let _telemetry = platform::telemetry::init("read-side-bench", &telemetry)?;
    let all = args.is_empty();
    let wants = |name: &str| all || args.iter().any(|a| a == name);
    println!(
        "machine: {} cores; Postgres/NATS of the dev stack; load average {}",
        std::thread::available_parallelism()?,
        loadavg()
    );
    if wants("replay") || wants("replay_ratio") {
        replay_ratio().await?;
    }
    if wants("replay") || wants("replay_1m") {
        replay_million().await?;
    }
    // diagnosis only: not part of "all"
    if args.iter().any(|a| a == "replay_breakdown") {
        replay_breakdown().await?;
    }
    if wants("daemon") {
        daemon_bench(false).await?;
    }
    // diagnosis only: the daemon without the view's GIN index
    if args.iter().any(|a| a == "daemon_without_gin") {
        daemon_bench(true).await?;
    }
    if wants("query") {
        query_bench().await?;
    }
    if wants("query") || wants("hot_voucher") {
        hot_voucher_bench().await?;
    }
    Ok(())
}

/// What the whole Postgres server has done so far: WAL bytes written and
/// checkpoints (server-wide, so other databases' work counts too).
#[derive(Debug, Clone, Copy)]
struct PgActivity {
    wal_bytes: i64,
    checkpoints: i64,
}

impl PgActivity {
    async fn now(pool: &PgPool) -> anyhow::Result<Self> {
        let row = sqlx::query(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal,
                    (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter) AS checkpoints",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            wal_bytes: row.try_get("wal")?,
            checkpoints: row.try_get("checkpoints")?,
        })
    }

    /// "WAL 950 MB, 2 checkpoints" since `self`.
    async fn since(self, pool: &PgPool) -> anyhow::Result<String> {
        let now = Self::now(pool).await?;
        Ok(format!(
            "WAL {} MB, {} checkpoints",
            (now.wal_bytes - self.wal_bytes) >> 20,
            now.checkpoints - self.checkpoints
        ))
    }
}

/// How the events of one order lie in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// As orders progress over time: statement `w` places orders `w·WAVE..`,
    /// starts the payment of the wave before, pays the one before that and
    /// starts preparing the one before that. A page of 10,000 events touches
    /// 10,000 documents. Every scenario uses this.
    Waves,
    /// The four events of an order one after the other (a page of 10,000
    /// events touches 2,500 documents): the best case, for `replay_breakdown`.
    Adjacent,
}

/// Stores `orders` seckill orders × 4 events in `events`, built in SQL as
/// serde serializes `OrderEvent` (checked by [`check_seed`]).
async fn seed(pool: &PgPool, orders: i64, layout: Layout) -> anyhow::Result<()> {
    let started = Instant::now();
    let metadata = serde_json::to_value(EventMetadata::system("bench").to_map())?;
    for wave in 0..(orders + WAVE - 1) / WAVE + 3 {
        sqlx::query(
            r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
               SELECT 'Order', o.order_id::text, s.seq, s.event_type, '1.0',
                      CASE s.seq
                        WHEN 1 THEN jsonb_build_object('OrderPlaced', jsonb_build_object(
                            'order_id', o.order_id, 'user_id', 'user-' || g.n, 'kind', 'seckill_voucher',
                            'items', jsonb_build_array(jsonb_build_object(
                                'product_id', NULL, 'voucher_id', $5::uuid, 'name', 'Hotpot for two',
                                'quantity', 1, 'unit_price_cents', 990)),
                            'voucher_id', $5::uuid, 'coupon_id', NULL, 'subtotal_cents', 990,
                            'discount_cents', 0, 'total_cents', 990, 'placed_at', o.at))
                        WHEN 2 THEN jsonb_build_object('OrderPaymentStarted', jsonb_build_object(
                            'payment_id', o.payment_id, 'amount_cents', 990))
                        WHEN 3 THEN jsonb_build_object('OrderPaid', jsonb_build_object(
                            'payment_id', o.payment_id, 'amount_cents', 990, 'paid_at', o.at))
                        ELSE jsonb_build_object('OrderPreparationStarted', jsonb_build_object('at', o.at))
                      END,
                      $4
                 FROM (VALUES (1, 'OrderPlaced'), (2, 'OrderPaymentStarted'), (3, 'OrderPaid'),
                              (4, 'OrderPreparationStarted')) AS s(seq, event_type)
                CROSS JOIN LATERAL generate_series(
                      CASE WHEN $6 THEN $1 * $2 ELSE GREATEST(($1 - s.seq + 1) * $2, 0) END,
                      CASE WHEN $6 THEN LEAST(($1 + 1) * $2, $3) ELSE LEAST(($1 - s.seq + 2) * $2, $3) END - 1) AS g(n)
                CROSS JOIN LATERAL (
                      SELECT md5('order-' || g.n)::uuid AS order_id, md5('payment-' || g.n)::uuid AS payment_id,
                             to_char(timestamp '2026-11-21 00:00:00' + (g.n / 10) * interval '1 second'
                                       + s.seq * interval '1 minute', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS at) AS o
                ORDER BY CASE WHEN $6 THEN g.n ELSE -s.seq END, CASE WHEN $6 THEN s.seq ELSE g.n END"#,
        )
        .bind(wave)
        .bind(WAVE)
        .bind(orders)
        .bind(&metadata)
        .bind(VOUCHER)
        .bind(layout == Layout::Adjacent)
        .execute(pool)
        .await?;
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Order'")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(stored == orders * 4, "seeded {stored} events, wanted {}", orders * 4);
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    println!(
        "seeded {stored} events ({orders} orders, {layout:?}) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check_seed(pool).await
}

/// One generated order: every payload decodes to an `OrderEvent` that
/// serializes back to the same JSON, the Order aggregate accepts the history
/// (it completes the order next) and our projector builds a preparing order.
async fn check_seed(pool: &PgPool) -> anyhow::Result<()> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM events WHERE aggregate_id = (SELECT aggregate_id FROM events ORDER BY global_position LIMIT 1)
          ORDER BY sequence",
        event_store::ENVELOPE_COLUMNS
    ))
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(rows.len() == 4, "a seeded order has {} events", rows.len());
    let mut decoded = Vec::new();
    let mut view = None;
    for row in &rows {
        let envelope = event_store::envelope_from_row(row)?;
        let event: OrderEvent =
            events::decode_payload(&envelope.event_type, &envelope.event_version, &envelope.payload)?;
        anyhow::ensure!(
            serde_json::to_value(&event)? == envelope.payload,
            "{} is not as serde writes it: {}",
            envelope.event_type,
            envelope.payload
        );
        view = Some(OrderProjector::apply(view, &envelope)?);
        decoded.push(event);
    }
    let at = Utc.with_ymd_and_hms(2026, 11, 22, 0, 0, 0).single().context("time")?;
    let next = TestFramework::<Order>::with(())
        .given(decoded)
        .when_async(OrderCommand::Complete { merchant: None, at })
        .await
        .inspect_result();
    anyhow::ensure!(
        matches!(next.as_deref(), Ok([OrderEvent::OrderCompleted { .. }])),
        "the Order aggregate refuses the seeded history: {next:?}"
    );
    let view = view.context("no view")?;
    anyhow::ensure!(view.status.as_str() == "preparing" && view.version == 4, "{view:?}");
    Ok(())
}

// ---------------------------------------------------------------- replay

/// The baseline's document: our order document, built by our projector
/// inside a cqrs-es `View` (`None` until the first event).
#[derive(Debug, Default, Serialize, Deserialize)]
struct BaselineView(Option<OrderView>);

/// Events the projector refused inside the baseline (cqrs-es views cannot fail).
static BASELINE_REFUSED: AtomicU64 = AtomicU64::new(0);

impl View<Order> for BaselineView {
    fn update(&mut self, event: &cqrs_es::EventEnvelope<Order>) {
        let metadata = EventMetadata::from_map(&event.metadata).unwrap_or_else(|_| EventMetadata::system("unknown"));
        // cqrs-es hands over no recording time: "now" stands in for it
        let envelope = EventEnvelope::new(
            event.aggregate_id.clone(),
            event.sequence as u64,
            0,
            &event.payload,
            metadata,
            Utc::now(),
        );
        match envelope.map(|envelope| OrderProjector::apply(self.0.take(), &envelope)) {
            Ok(Ok(view)) => self.0 = Some(view),
            _ => {
                BASELINE_REFUSED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Our replay of the orders view; returns events/s and seconds.
async fn replay_ours(pool: &PgPool, orders: i64) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let report = Projection::Orders
        .replay(
            pool,
            &ReplayOptions {
                batch: 10_000,
                dry_run: false,
                ..ReplayOptions::default()
            },
            &mut Silent,
        )
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let events = u64::try_from(orders * 4)?;
    anyhow::ensure!(
        report.events == events && report.documents == u64::try_from(orders)? && report.dead_letters == 0,
        "replay read {} events into {} documents with {} dead letters",
        report.events,
        report.documents,
        report.dead_letters
    );
    let complete: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_view WHERE version = 4 AND status = 'preparing'")
            .fetch_one(pool)
            .await?;
    anyhow::ensure!(complete == orders, "{complete} of {orders} documents complete");
    Ok((events as f64 / seconds, seconds))
}

/// cqrs-es `QueryReplay::replay_all` into `order_query`; returns events/s
/// and seconds, after checking that it really wrote every document.
async fn replay_baseline(pool: &PgPool, orders: i64) -> anyhow::Result<(f64, f64)> {
    sqlx::query("TRUNCATE order_query").execute(pool).await?;
    BASELINE_REFUSED.store(0, Ordering::Relaxed);
    let errors = Arc::new(AtomicU64::new(0));
    let views = Arc::new(PostgresViewRepository::<BaselineView, Order>::new(
        "order_query",
        pool.clone(),
    ));
    let mut query = GenericQuery::<_, BaselineView, Order>::new(views);
    let counted = errors.clone();
    query.use_error_handler(Box::new(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
    }));
    let mut replay = QueryReplay::new(PostgresEventRepository::new(pool.clone()), query);
    let counted = errors.clone();
    replay.use_error_handler(Box::new(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
    }));
    let started = Instant::now();
    replay.replay_all().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    // QueryReplay reports success whatever happened: count what it wrote
    let complete: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_query WHERE version = 4 AND payload::jsonb ->> 'status' = 'preparing'",
    )
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        complete == orders && errors.load(Ordering::Relaxed) == 0 && BASELINE_REFUSED.load(Ordering::Relaxed) == 0,
        "baseline wrote {complete} of {orders} documents; {} errors, {} refused events",
        errors.load(Ordering::Relaxed),
        BASELINE_REFUSED.load(Ordering::Relaxed)
    );
    Ok(((orders * 4) as f64 / seconds, seconds))
}

/// Ours vs cqrs-es `QueryReplay` on the same 100,000 events.
async fn replay_ratio() -> anyhow::Result<()> {
    const RATIO_ORDERS: i64 = 25_000;
    println!(
        "\n## replay vs cqrs-es QueryReplay on the same {} events ({ROUNDS} rounds, alternating)",
        RATIO_ORDERS * 4
    );
    let db = testkit::TestDb::new().await?;
    let result = async {
        seed(&db.pool, RATIO_ORDERS, Layout::Waves).await?;
        // postgres-es's documented view table
        sqlx::query(
            "CREATE TABLE order_query (view_id text NOT NULL PRIMARY KEY,
                 version bigint CHECK (version >= 0) NOT NULL, payload json NOT NULL)",
        )
        .execute(&db.pool)
        .await?;
        let (mut ours, mut baseline) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let (rate, seconds) = replay_ours(&db.pool, RATIO_ORDERS).await?;
            ours.push(rate);
            let (base, base_seconds) = replay_baseline(&db.pool, RATIO_ORDERS).await?;
            baseline.push(base);
            println!(
                "round {round}: ours {rate:>7.0} events/s ({seconds:.2} s) | QueryReplay {base:>6.0} events/s \
                 ({base_seconds:.1} s) | load {}",
                loadavg()
            );
        }
        let (ours, baseline) = (median(ours), median(baseline));
        println!(
            "median: ours {ours:.0} events/s, cqrs-es QueryReplay {baseline:.0} events/s, ratio {:.1}× (target ≥ 20×)",
            ours / baseline
        );
        anyhow::Ok(())
    }
    .await;
    db.drop_database().await?;
    result
}

/// Ours alone on 1,000,000 events.
async fn replay_million() -> anyhow::Result<()> {
    const BIG_ORDERS: i64 = 250_000;
    println!("\n## replay of {} events (ours alone, {ROUNDS} rounds)", BIG_ORDERS * 4);
    let db = testkit::TestDb::new().await?;
    let result = async {
        seed(&db.pool, BIG_ORDERS, Layout::Waves).await?;
        let (mut rates, mut times) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let before = PgActivity::now(&db.pool).await?;
            let cpu_before = CpuSample::now();
            let (rate, seconds) = replay_ours(&db.pool, BIG_ORDERS).await?;
            let cpu = CpuSample::now().since(&cpu_before);
            println!(
                "round {round}: {rate:>7.0} events/s, {seconds:.1} s | {} | load {}",
                before.since(&db.pool).await?,
                loadavg()
            );
            // the replay runs on this program's runtime threads ("tokio-rt-worker")
            println!(
                "  cost: {}",
                cpu.per_unit(BIG_ORDERS as f64 * 4.0 / 1_000.0, "1,000 events")
            );
            rates.push(rate);
            times.push(seconds);
        }
        let (rate, time) = (median(rates), median(times));
        println!(
            "median: {rate:.0} events/s, {time:.1} s for {} events (target ≥ 50,000 events/s, ≤ 20 s)",
            BIG_ORDERS * 4
        );
        // the same run's limit: COPYing the final documents into the same
        // table (primary key while filling, the other indexes built after,
        // as the replay does)
        let copy_seconds = copy_reference(&db.pool).await?;
        let copy_rate = (BIG_ORDERS * 4) as f64 / copy_seconds;
        println!(
            "reference: COPY of the final {BIG_ORDERS} documents and their indexes: {copy_seconds:.1} s \
             ({copy_rate:.0} events/s equivalent); ratio replay / COPY: {:.2} (target ≥ 0.5) | load {}",
            rate / copy_rate,
            loadavg()
        );
        anyhow::Ok(())
    }
    .await;
    db.drop_database().await?;
    result
}

/// Seconds to COPY the live order view's documents into a fresh table with
/// its primary key, then build its other indexes: the least a replay that
/// writes those documents can take on this machine.
async fn copy_reference(pool: &PgPool) -> anyhow::Result<f64> {
    use futures::TryStreamExt as _;
    const COLUMNS: &str = "id, version, doc, user_id, status, created_at, updated_at, merchant_id";
    let mut conn = pool.acquire().await?;
    let mut data = Vec::new();
    {
        let mut out = conn
            .copy_out_raw(&format!("COPY (SELECT {COLUMNS} FROM order_view) TO STDOUT"))
            .await?;
        while let Some(chunk) = out.try_next().await? {
            data.extend_from_slice(&chunk);
        }
    }
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname, indexdef FROM pg_indexes
          WHERE schemaname = current_schema() AND tablename = 'order_view' AND indexname <> 'order_view_pkey'",
    )
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("DROP TABLE IF EXISTS order_view_copy")
        .execute(&mut *conn)
        .await?;
    sqlx::query("CREATE TABLE order_view_copy (LIKE order_view INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("ALTER TABLE order_view_copy ADD PRIMARY KEY (id)")
        .execute(&mut *conn)
        .await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!("COPY order_view_copy ({COLUMNS}) FROM STDIN"))
        .await?;
    copy.send(data.as_slice()).await?;
    copy.finish().await?;
    for (name, definition) in &indexes {
        let definition = definition
            .replacen(&format!("INDEX {name} ON"), &format!("INDEX {name}_copy ON"), 1)
            .replacen(" ON public.order_view ", " ON public.order_view_copy ", 1);
        sqlx::query(&definition).execute(&mut *conn).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE order_view_copy").execute(&mut *conn).await?;
    Ok(seconds)
}

/// Where the 1,000,000-event replay's time goes (one round each, not in
/// `all`): the store as always; then without the view's GIN index and then
/// with its primary key only (the replay fills its shadow with only a
/// primary key and builds the live table's other indexes before the swap, so
/// this shows what building them costs); then the best-case layout.
async fn replay_breakdown() -> anyhow::Result<()> {
    const BIG_ORDERS: i64 = 250_000;
    println!(
        "\n## replay breakdown: {} events, one round per variant",
        BIG_ORDERS * 4
    );
    let secondary = "SELECT indexname FROM pg_indexes WHERE tablename = 'order_view' AND indexdef NOT LIKE '%UNIQUE%'";
    for layout in [Layout::Waves, Layout::Adjacent] {
        let db = testkit::TestDb::new().await?;
        let result = async {
            seed(&db.pool, BIG_ORDERS, layout).await?;
            let variants: &[&str] = match layout {
                Layout::Waves => &["every index", "no GIN index", "primary key only"],
                Layout::Adjacent => &["every index"],
            };
            for variant in variants {
                let drop: Vec<String> = match *variant {
                    "no GIN index" => {
                        sqlx::query_scalar(&format!("{secondary} AND indexdef LIKE '%USING gin%'"))
                            .fetch_all(&db.pool)
                            .await?
                    }
                    "primary key only" => sqlx::query_scalar(secondary).fetch_all(&db.pool).await?,
                    _ => Vec::new(),
                };
                for index in drop {
                    sqlx::query(&format!(r#"DROP INDEX "{index}""#))
                        .execute(&db.pool)
                        .await?;
                }
                let before = PgActivity::now(&db.pool).await?;
                let (rate, seconds) = replay_ours(&db.pool, BIG_ORDERS).await?;
                println!(
                    "{layout:?}, {variant}: {rate:>7.0} events/s, {seconds:.1} s | {} | load {}",
                    before.since(&db.pool).await?,
                    loadavg()
                );
            }
            anyhow::Ok(())
        }
        .await;
        db.drop_database().await?;
        result?;
    }
    Ok(())
}

// ---------------------------------------------------------------- daemon

/// Benchmarks leave no streams behind on the dev stack's NATS.
async fn drop_streams(js: &async_nats::jetstream::Context, namespace: &Namespace) -> anyhow::Result<()> {
    for stream in Topology::new(namespace.clone()).streams() {
        js.delete_stream(&stream.name).await?;
    }
    Ok(())
}

/// Publishes every stored event in commit order, as the relay would.
async fn publish_store(
    pool: &PgPool,
    js: &async_nats::jetstream::Context,
    namespace: &Namespace,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let publisher = Publisher::new(js.clone(), 4_096);
    let query = format!(
        "SELECT {} FROM events WHERE global_position > $1 ORDER BY global_position LIMIT 10000",
        event_store::ENVELOPE_COLUMNS
    );
    let (mut cursor, mut published) = (0i64, 0u64);
    loop {
        let rows = sqlx::query(&query).bind(cursor).fetch_all(pool).await?;
        let Some(last) = rows.last() else { break };
        cursor = last.try_get("global_position")?;
        let messages = rows
            .iter()
            .map(|row| {
                let envelope = event_store::envelope_from_row(row)?;
                anyhow::Ok(event_store::relay::event_message(namespace, &envelope)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        published += publisher.publish_all(messages).await?.len() as u64;
    }
    println!(
        "published {published} envelopes to {} in {:.1} s",
        namespace.events_stream("Order"),
        started.elapsed().as_secs_f64()
    );
    Ok(published)
}

/// One run of the daemon from an empty view and a new consumer over the
/// whole stream; returns events/s until everything is acknowledged.
async fn daemon_round(
    db: &testkit::TestDb,
    js: &async_nats::jetstream::Context,
    namespace: &Namespace,
    run: DaemonRun,
    orders: i64,
) -> anyhow::Result<f64> {
    let stream = js.get_stream(namespace.events_stream("Order")).await?;
    let consumer = consumer_name(Projection::Orders.name());
    // a new consumer starts from the stream's first message
    let _ = stream.delete_consumer(&consumer).await;
    sqlx::query("TRUNCATE order_view, projection_checkpoints, projection_dead_letters")
        .execute(&db.pool)
        .await?;
    let state = stream.get_info().await?.state;
    anyhow::ensure!(
        state.messages == u64::try_from(orders * 4)?,
        "stream holds {}",
        state.messages
    );
    let stop = CancellationToken::new();
    let daemon = Daemon {
        pool: db.pool.clone(),
        js: js.clone(),
        namespace: namespace.clone(),
        batch_size: run.batch,
        max_deliver: 5,
        workers: run.workers,
    };
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    let task = tokio::spawn(daemon.run(stop.clone()));
    let outcome = async {
        loop {
            if let Ok(info) = stream.consumer_info(&consumer).await
                && info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence >= state.last_sequence
            {
                break;
            }
            anyhow::ensure!(!task.is_finished(), "the daemon stopped");
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the daemon did not catch up in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(started.elapsed().as_secs_f64())
    }
    .await;
    let cpu = CpuSample::now().since(&cpu_before);
    stop.cancel();
    task.await??;
    let seconds = outcome?;
    check_complete(&db.pool, orders).await?;
    // the daemon runs on this program's runtime threads ("tokio-runtime-w")
    println!(
        "  cost: {}",
        cpu.per_unit((orders * 4) as f64 / 1_000.0, "1,000 events")
    );
    Ok((orders * 4) as f64 / seconds)
}

/// Every order document at its last version, nothing dead-lettered.
async fn check_complete(pool: &PgPool, orders: i64) -> anyhow::Result<()> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM order_view WHERE version = 4 AND status = 'preparing') AS complete,
                (SELECT count(*) FROM projection_dead_letters) AS dead",
    )
    .fetch_one(pool)
    .await?;
    let (complete, dead): (i64, i64) = (row.try_get("complete")?, row.try_get("dead")?);
    anyhow::ensure!(
        complete == orders && dead == 0,
        "{complete} of {orders} documents complete, {dead} dead letters"
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DaemonRun {
    batch: usize,
    workers: usize,
}

impl std::fmt::Display for DaemonRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {:>4}, {} worker{}",
            self.batch,
            self.workers,
            if self.workers == 1 { "" } else { "s" }
        )
    }
}

/// The documents of one batch as they stand after it, ready to write:
/// those of the first of two workers (by aggregate id, as the daemon splits
/// them) come first, up to `split`.
struct FinalDocs {
    split: usize,
    ids: Vec<String>,
    versions: Vec<i64>,
    docs: Vec<String>,
    users: Vec<Option<String>>,
    statuses: Vec<Option<String>>,
    created: Vec<Option<chrono::DateTime<Utc>>>,
    updated: Vec<Option<chrono::DateTime<Utc>>>,
    merchants: Vec<Option<String>>,
}

/// The best-case writer's input: the stored events cut into the daemon's
/// batches (stream order = commit order), each batch's documents in their
/// state after it, serialized, computed before the clock starts.
async fn final_documents(pool: &PgPool, batch: usize) -> anyhow::Result<(u64, Vec<FinalDocs>)> {
    let query = format!(
        "SELECT {} FROM events WHERE aggregate_type = 'Order' ORDER BY global_position",
        event_store::ENVELOPE_COLUMNS
    );
    let rows = sqlx::query(&query).fetch_all(pool).await?;
    let envelopes = rows
        .iter()
        .map(event_store::envelope_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let mut views: HashMap<String, OrderView> = HashMap::new();
    let mut batches = Vec::new();
    for chunk in envelopes.chunks(batch) {
        let mut touched: Vec<&str> = Vec::new();
        for envelope in chunk {
            let view = OrderProjector::apply(views.remove(&envelope.aggregate_id), envelope)?;
            views.insert(envelope.aggregate_id.clone(), view);
            touched.push(&envelope.aggregate_id);
        }
        touched.sort_unstable();
        touched.dedup();
        let worker = |id: &str| {
            let mut hasher = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(id, &mut hasher);
            std::hash::Hasher::finish(&hasher) % 2
        };
        touched.sort_by_key(|id| worker(id));
        let mut docs = FinalDocs {
            split: touched.iter().filter(|id| worker(id) == 0).count(),
            ids: Vec::new(),
            versions: Vec::new(),
            docs: Vec::new(),
            users: Vec::new(),
            statuses: Vec::new(),
            created: Vec::new(),
            updated: Vec::new(),
            merchants: Vec::new(),
        };
        for id in touched {
            let view = &views[id];
            let columns = OrderProjector::columns(view);
            docs.ids.push(id.to_owned());
            docs.versions.push(i64::try_from(OrderProjector::version(view))?);
            docs.docs.push(serde_json::to_string(view)?);
            docs.users.push(columns.user_id);
            docs.statuses.push(columns.status);
            docs.created.push(columns.created_at);
            docs.updated.push(columns.updated_at);
            docs.merchants.push(columns.merchant_id);
        }
        batches.push(docs);
    }
    Ok((envelopes.len() as u64, batches))
}

/// The same-run reference: a bare loop upserting each batch's final
/// documents in one statement and one transaction per connection (with two,
/// each batch split between them as the daemon's two workers split it); no
/// NATS, no decoding, no loading, no projector. Returns events/s.
async fn best_case_writer(
    pool: &PgPool,
    events: u64,
    batches: &[FinalDocs],
    orders: i64,
    connections: usize,
) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE order_view, projection_checkpoints, projection_dead_letters")
        .execute(pool)
        .await?;
    let mut first = pool.acquire().await?;
    let mut second = pool.acquire().await?;
    let cpu_before = CpuSample::now();
    let started = Instant::now();
    for docs in batches {
        if connections == 1 {
            upsert(&mut first, docs, 0..docs.ids.len()).await?;
        } else {
            tokio::try_join!(
                upsert(&mut first, docs, 0..docs.split),
                upsert(&mut second, docs, docs.split..docs.ids.len())
            )?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = CpuSample::now().since(&cpu_before);
    drop((first, second));
    check_complete(pool, orders).await?;
    println!("  cost: {}", cpu.per_unit(events as f64 / 1_000.0, "1,000 events"));
    Ok(events as f64 / seconds)
}

/// One transaction upserting `rows` of a batch's final documents.
async fn upsert(conn: &mut sqlx::PgConnection, docs: &FinalDocs, rows: std::ops::Range<usize>) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&projections::writer::upsert_statement("order_view"))
        .bind(&docs.ids[rows.clone()])
        .bind(&docs.versions[rows.clone()])
        .bind(&docs.docs[rows.clone()])
        .bind(&docs.users[rows.clone()])
        .bind(&docs.statuses[rows.clone()])
        .bind(&docs.created[rows.clone()])
        .bind(&docs.updated[rows.clone()])
        .bind(&docs.merchants[rows])
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn daemon_bench(without_gin: bool) -> anyhow::Result<()> {
    const ORDERS: i64 = 75_000;
    const BATCH: usize = 1_000;
    // BENCH_DAEMON_RUNS="2000x4,1000x2" picks (batch x workers) runs
    let runs = match std::env::var("BENCH_DAEMON_RUNS") {
        Ok(list) => list
            .split(',')
            .map(|run| {
                let (batch, workers) = run
                    .trim()
                    .split_once('x')
                    .ok_or_else(|| anyhow::anyhow!("BENCH_DAEMON_RUNS: {run:?} is not BATCHxWORKERS"))?;
                Ok(DaemonRun {
                    batch: batch.parse()?,
                    workers: workers.parse()?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Err(_) => vec![
            DaemonRun {
                batch: BATCH,
                workers: 2,
            },
            DaemonRun {
                batch: BATCH,
                workers: 4,
            },
            DaemonRun {
                batch: 2_000,
                workers: 4,
            },
            DaemonRun {
                batch: 2_000,
                workers: 8,
            },
        ],
    };
    println!(
        "\n## projection daemon{}: {} events on the Order stream ({ROUNDS} rounds each, \
         beside a best-case writer upserting the same final documents in batches of {BATCH})",
        if without_gin { " without the GIN index" } else { "" },
        ORDERS * 4
    );
    let db = testkit::TestDb::new().await?;
    if without_gin {
        sqlx::query("DROP INDEX order_view_doc_idx").execute(&db.pool).await?;
    }
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    cp_nats::ensure_topology(&js, &Topology::new(namespace.clone())).await?;
    let result = async {
        seed(&db.pool, ORDERS, Layout::Waves).await?;
        publish_store(&db.pool, &js, &namespace).await?;
        let (events, batches) = final_documents(&db.pool, BATCH).await?;
        let mut rates: HashMap<DaemonRun, Vec<f64>> = HashMap::new();
        let mut writers: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 1..=ROUNDS {
            for connections in [1, 2] {
                let before = PgActivity::now(&db.pool).await?;
                let rate = best_case_writer(&db.pool, events, &batches, ORDERS, connections).await?;
                writers[connections - 1].push(rate);
                println!(
                    "round {round}, best-case writer, {connections} connection{}: {rate:>6.0} events/s | {} | load {}",
                    if connections == 1 { " " } else { "s" },
                    before.since(&db.pool).await?,
                    loadavg()
                );
            }
            for &run in &runs {
                let before = PgActivity::now(&db.pool).await?;
                let rate = daemon_round(&db, &js, &namespace, run, ORDERS).await?;
                rates.entry(run).or_default().push(rate);
                println!(
                    "round {round}, {run}: {rate:>6.0} events/s | {} | load {}",
                    before.since(&db.pool).await?,
                    loadavg()
                );
            }
        }
        let [one, two] = writers;
        let (writer, parallel) = (median(one), median(two));
        println!(
            "median best-case writer: {writer:.0} events/s on one connection (the reference), \
             {parallel:.0} events/s on two"
        );
        for &run in &runs {
            let all = &rates[&run];
            let low = all.iter().copied().fold(f64::INFINITY, f64::min);
            let rate = median(all.clone());
            println!(
                "median {run}: {rate:.0} events/s, slowest round {low:.0} ({:.2}× the best-case writer, \
                 {:.2}× it on two connections; targets ≥ 15,000 events/s every round and ≥ 0.6×)",
                rate / writer,
                rate / parallel
            );
        }
        anyhow::Ok(())
    }
    .await;
    drop_streams(&js, &namespace).await?;
    db.drop_database().await?;
    result
}

// ---------------------------------------------------------------- query

#[derive(Debug, Clone, Default)]
struct WrkResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Responses with a status of 400 or more (wrk's "Non-2xx or 3xx").
    errors: u64,
    socket_errors: String,
}

/// "850.00us", "1.23ms", "1.02s" in milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(output: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in output.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["50%", value] => result.p50_ms = parse_duration_ms(value).context("p50")?,
            ["99%", value] => result.p99_ms = parse_duration_ms(value).context("p99")?,
            ["Requests/sec:", value] => result.requests_per_second = value.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", value] => result.errors = value.parse()?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["Socket", "errors:", ..] => result.socket_errors = line.to_owned(),
            _ => {}
        }
    }
    anyhow::ensure!(
        result.requests_per_second > 0.0 && result.p99_ms > 0.0,
        "cannot read wrk's output:\n{output}"
    );
    Ok(result)
}

/// `wrk -t2 -c64 --latency` with the `get_order.lua` script, killed if it hangs.
async fn wrk(url: String, ids: PathBuf, token: String, seconds: u64) -> anyhow::Result<WrkResult> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/get_order.lua");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("--kill-after=5")
            .arg((seconds + 30).to_string())
            .args(["wrk", "-t2", "-c64", &format!("-d{seconds}s"), "--latency", "-s"])
            .arg(&script)
            .arg(&url)
            .arg("--")
            .arg(&ids)
            .arg(&token)
            .output()
    })
    .await?
    .context("running wrk (apt-get install wrk)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&stdout)
}

/// `pgbench` running the query API's lookup (`SELECT doc FROM order_view
/// WHERE id = $1`, prepared) on random order ids; returns queries/s.
async fn pgbench_lookups(url: &str, orders: i64, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join(format!("read_side_lookup_{}.sql", testkit::short_id()));
    std::fs::write(
        &script,
        format!(
            "\\set n random(0, {})\nSELECT doc FROM order_view WHERE id = md5('order-' || :n)::uuid::text;\n",
            orders - 1
        ),
    )?;
    let (url, path) = (url.to_owned(), script.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("--kill-after=5")
            .arg((seconds + 30).to_string())
            .args(["pgbench", "-n", "-M", "prepared", "-j", "2"])
            .arg(format!("-c{clients}"))
            .arg(format!("-T{seconds}"))
            .arg("-f")
            .arg(&path)
            .arg(&url)
            .output()
    })
    .await?;
    let _ = std::fs::remove_file(&script);
    let output = output.context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("cannot read pgbench's output:\n{stdout}"))
}

async fn query_bench() -> anyhow::Result<()> {
    const ORDERS: i64 = 100_000;
    const SECONDS: u64 = 10;
    println!("\n## query API: GET /orders/{{id}} on {ORDERS} documents, wrk -t2 -c64 -d{SECONDS}s ({ROUNDS} rounds)");
    let db = testkit::TestDb::new().await?;
    let ids = std::env::temp_dir().join(format!("read_side_ids_{}.txt", testkit::short_id()));
    let result = async {
        seed(&db.pool, ORDERS, Layout::Waves).await?;
        replay_ours(&db.pool, ORDERS).await?;
        let order_ids: Vec<String> = sqlx::query_scalar("SELECT id FROM order_view").fetch_all(&db.pool).await?;
        anyhow::ensure!(order_ids.len() == usize::try_from(ORDERS)?, "{} documents", order_ids.len());
        std::fs::write(&ids, order_ids.join("\n") + "\n")?;

        let secret = format!("bench-{}", testkit::short_id());
        let config = query_api::Config::try_parse_from([
            "query-api",
            "--database-url",
            &db.url,
            "--jwt-secret",
            &secret,
        ])?;
        println!(
            "query API: pool of {} connections, cache {} MiB, reads by id in at most {} statements at once of up to {} ids \
             (QUERY_* variables of the environment apply)",
            config.postgres.database_max_connections, config.cache_mb, config.batch_concurrency, config.batch_max
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(query_api::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let outcome = async {
            let token = JwtKeys::new(&Secret::new(secret.clone())).issue("bench", Role::Admin, Duration::from_secs(3600))?;
            let http = reqwest::Client::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !http
                .get(format!("{base}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                anyhow::ensure!(Instant::now() < deadline, "the query API did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let response = http
                .get(format!("{base}/orders/{}", order_ids[0]))
                .bearer_auth(&token)
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "GET /orders/{{id}}: {}", response.status());
            let body: serde_json::Value = response.json().await?;
            anyhow::ensure!(
                body.to_string().contains(&order_ids[0]),
                "unexpected answer: {body}"
            );

            // warm-up: connections, Postgres caches, allocator
            wrk(base.clone(), ids.clone(), token.clone(), 3).await?;
            let mut runs = Vec::new();
            for round in 1..=ROUNDS {
                let run = wrk(base.clone(), ids.clone(), token.clone(), SECONDS).await?;
                println!(
                    "round {round}: {:>6.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} requests, {} non-2xx{}{} | load {}",
                    run.requests_per_second,
                    run.p50_ms,
                    run.p99_ms,
                    run.requests,
                    run.errors,
                    if run.socket_errors.is_empty() { "" } else { ", " },
                    run.socket_errors,
                    loadavg()
                );
                anyhow::ensure!(run.errors == 0, "{} error responses", run.errors);
                runs.push(run);
            }
            let rate = median(runs.iter().map(|r| r.requests_per_second).collect());
            println!(
                "median: {rate:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (64 connections)",
                median(runs.iter().map(|r| r.p50_ms).collect()),
                median(runs.iter().map(|r| r.p99_ms).collect())
            );
            let metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
            let counter = |name: &str| -> f64 {
                metrics
                    .lines()
                    .filter(|line| line.starts_with(name))
                    .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                    .fold(0.0, |sum, value| sum + value)
            };
            let (hits, misses) = (
                counter("query_cache_total{outcome=\"hit\"}"),
                counter("query_cache_total{outcome=\"miss\"}"),
            );
            println!(
                "whole run: cache hits {:.0} % of by-id reads; {:.1} lookups per statement ({} statements)",
                100.0 * hits / (hits + misses).max(1.0),
                counter("query_lookups_total") / counter("query_lookup_statements_total").max(1.0),
                counter("query_lookup_statements_total")
            );
            anyhow::Ok(rate)
        }
        .await;
        let _ = stop.send(());
        server.await??;
        let median_rate = outcome?;
        // what Postgres alone answers: the API's query over as many connections as its pool
        match pgbench_lookups(&db.url, ORDERS, 16, SECONDS).await {
            Ok(tps) => println!(
                "reference: Postgres alone (pgbench, the same lookup by id, 16 connections): {tps:.0} queries/s | load {}\n\
                 ratio query API / pgbench: {:.2} (target ≥ 0.4, p99 ≤ 10 ms)",
                loadavg(),
                median_rate / tps
            ),
            Err(error) => println!("reference: pgbench not run: {error:#}"),
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&ids);
    db.drop_database().await?;
    result
}

/// `wrk -t2 -c64 --latency` on one URL with a bearer token, killed if it hangs.
async fn wrk_one(url: String, token: String, seconds: u64) -> anyhow::Result<WrkResult> {
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .arg("--kill-after=5")
            .arg((seconds + 30).to_string())
            .args(["wrk", "-t2", "-c64", &format!("-d{seconds}s"), "--latency", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .arg(&url)
            .output()
    })
    .await?
    .context("running wrk (apt-get install wrk)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "wrk failed ({}): {stdout}", output.status);
    parse_wrk(&stdout)
}

/// A crowd refreshing one sale's page: `GET /vouchers/{id}` of one voucher
/// through the query API (its document cache on, as configured by default)
/// against a bare axum route in the same process answering the same body,
/// alternating rounds.
async fn hot_voucher_bench() -> anyhow::Result<()> {
    const SECONDS: u64 = 10;
    println!("\n## query API: GET /vouchers/{{id}} of one hot voucher, wrk -t2 -c64 -d{SECONDS}s ({ROUNDS} rounds)");
    let db = testkit::TestDb::new().await?;
    let voucher = uuid::Uuid::now_v7().to_string();
    let doc = serde_json::json!({
        "voucher_id": voucher, "merchant_id": "shop-1", "title": "Hotpot for two", "kind": "seckill",
        "price_cents": 990, "value_cents": 2_000, "min_spend_cents": 0, "stock": 20_000, "sold": 1_234,
        "sold_out": false, "begins_at": Utc::now() - chrono::Duration::minutes(1),
        "ends_at": Utc::now() + chrono::Duration::hours(1), "version": 42
    });
    sqlx::query(
        "INSERT INTO voucher_view (id, version, doc, user_id, status, created_at, updated_at, merchant_id)
         VALUES ($1, 42, $2, NULL, 'active', now(), now(), 'shop-1')",
    )
    .bind(&voucher)
    .bind(&doc)
    .execute(&db.pool)
    .await?;
    let secret = format!("bench-{}", testkit::short_id());
    let config = query_api::Config::try_parse_from(["query-api", "--database-url", &db.url, "--jwt-secret", &secret])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}/vouchers/{voucher}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(query_api::run(config, listener, async move {
        let _ = stopped.await;
    }));
    // the reference: the same body from a bare route, same process
    let token = JwtKeys::new(&Secret::new(secret.clone())).issue("bench", Role::Customer, Duration::from_secs(3600))?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(response) = http.get(&api).bearer_auth(&token).send().await
            && response.status() == 200
        {
            break response.text().await?;
        }
        anyhow::ensure!(Instant::now() < deadline, "the query API did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bare = format!("http://{}/vouchers/{voucher}", bare_listener.local_addr()?);
    let fixed: &'static str = Box::leak(body.into_boxed_str());
    let bare_router = axum::Router::new().route(
        "/vouchers/{id}",
        axum::routing::get(move || async move { ([(http::header::CONTENT_TYPE, "application/json")], fixed) }),
    );
    let bare_server = tokio::spawn(async move { axum::serve(bare_listener, bare_router).await });
    let outcome = async {
        wrk_one(api.clone(), token.clone(), 3).await?;
        let (mut ours, mut reference) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let run = wrk_one(api.clone(), token.clone(), SECONDS).await?;
            anyhow::ensure!(run.errors == 0, "{} error responses", run.errors);
            let base = wrk_one(bare.clone(), token.clone(), SECONDS).await?;
            println!(
                "round {round}: query API {:>6.0} req/s (p99 {:.2} ms) | bare axum route {:>6.0} req/s (p99 {:.2} ms) | load {}",
                run.requests_per_second,
                run.p99_ms,
                base.requests_per_second,
                base.p99_ms,
                loadavg()
            );
            ours.push(run.requests_per_second);
            reference.push(base.requests_per_second);
        }
        let (ours, reference) = (median(ours), median(reference));
        println!(
            "median: query API {ours:.0} req/s, bare axum route {reference:.0} req/s: ratio {:.2} (target ≥ 0.5)",
            ours / reference
        );
        anyhow::Ok(())
    }
    .await;
    bare_server.abort();
    let _ = stop.send(());
    server.await??;
    db.drop_database().await?;
    outcome
}
