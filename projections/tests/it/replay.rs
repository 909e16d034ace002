//! The replay against real Postgres and NATS: a rebuild equals what the
//! daemon built (text COPY must escape its separators in ids and names), a dry run finds a tampered document, the swap repairs it,
//! two replays of one projection never run at once, and the CLI exits
//! non-zero on failure.

use std::process::Command;

use crate::support::{Setup, at};
use events::{OrderEvent, OrderItem, OrderKind, ProductEvent};
use projections::{
    Projection,
    replay::{ReplayError, ReplayOptions, Silent},
};
use uuid::Uuid;

/// Orders and products, stored and published; the daemon projects them.
async fn projected_history(setup: &mut Setup) -> anyhow::Result<()> {
    for i in 0..40u32 {
        let order = Uuid::now_v7();
        let id = order.to_string();
        // some ids and names hold what COPY's text format must escape
        // (the replay COPYs documents it writes first)
        let (user_id, name) = if i % 4 == 1 {
            (format!("user\\{i}\t\r\n"), format!("Hot\tpot \\N \"{i}\"\nnight\r"))
        } else {
            (format!("user-{i}"), "Hotpot".to_owned())
        };
        let placed = OrderEvent::OrderPlaced {
            order_id: order,
            user_id,
            merchant_id: Some("m-1".into()),
            kind: OrderKind::SeckillVoucher,
            items: vec![OrderItem {
                product_id: None,
                voucher_id: Some(Uuid::from_u128(7)),
                name,
                quantity: 1,
                unit_price_cents: 990,
            }],
            voucher_id: Some(Uuid::from_u128(7)),
            coupon_id: None,
            subtotal_cents: 990,
            discount_cents: 0,
            total_cents: 990,
            placed_at: at(i64::from(i)),
        };
        setup.publish(&setup.store(&id, 1, &placed).await?, false).await?;
        if i % 3 == 0 {
            let started = OrderEvent::OrderPaymentStarted {
                payment_id: Uuid::now_v7(),
                amount_cents: 990,
            };
            setup.publish(&setup.store(&id, 2, &started).await?, false).await?;
        }
    }
    for i in 0..10u32 {
        let product = Uuid::now_v7();
        let id = product.to_string();
        let created = ProductEvent::ProductCreated {
            product_id: product,
            merchant_id: "m-1".into(),
            name: format!("Dumplings #{i}"),
            price_cents: 1_200,
            stock: 50,
        };
        setup.publish(&setup.store(&id, 1, &created).await?, false).await?;
        let restocked = ProductEvent::ProductRestocked { quantity: i + 1 };
        setup.publish(&setup.store(&id, 2, &restocked).await?, false).await?;
    }
    setup.start_daemon(5);
    setup.wait_caught_up().await
}

/// A dry run whose cache overflows every few pages, so documents are
/// written by the background writer, forgotten and read back mid-scan.
fn dry_run(batch: usize) -> ReplayOptions {
    ReplayOptions {
        batch,
        dry_run: true,
        document_cache: 5,
    }
}

#[tokio::test]
async fn a_replay_equals_the_daemons_views_finds_tampering_and_repairs_it_by_swapping() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    projected_history(&mut setup).await?;
    let pool = setup.db.pool.clone();

    for projection in Projection::ALL {
        // small pages: the scan crosses many page boundaries
        let report = projection.replay(&pool, &dry_run(7), &mut Silent).await?;
        let differences = report.differences.expect("a dry run compares");
        assert!(differences.is_empty(), "{projection}: {differences:?}");
    }

    let tampered: String = sqlx::query_scalar(
        "UPDATE order_view SET doc = jsonb_set(doc, '{status}', '\"completed\"')
          WHERE id = (SELECT min(id) FROM order_view) RETURNING id",
    )
    .fetch_one(&pool)
    .await?;
    sqlx::query("DELETE FROM product_view WHERE id = (SELECT min(id) FROM product_view)")
        .execute(&pool)
        .await?;
    let orders = Projection::Orders.replay(&pool, &dry_run(7), &mut Silent).await?;
    let differences = orders.differences.expect("compared");
    assert_eq!(
        (
            differences.changed,
            differences.missing_live,
            differences.missing_replay
        ),
        (1, 0, 0)
    );
    assert_eq!(differences.sample, vec![tampered.clone()]);
    let products = Projection::Products.replay(&pool, &dry_run(7), &mut Silent).await?;
    assert_eq!(products.differences.expect("compared").missing_live, 1);
    // a dry run swaps nothing
    assert_eq!(
        setup.doc("order_view", &tampered).await?.expect("doc")["status"],
        "completed"
    );

    let indexes = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, String)>(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            )
            .bind(table)
            .fetch_all(&pool)
            .await
        }
    };
    let before = (indexes("order_view").await?, indexes("product_view").await?);
    for projection in [Projection::Orders, Projection::Products] {
        let report = projection
            .replay(
                &pool,
                &ReplayOptions {
                    document_cache: 5,
                    ..ReplayOptions::default()
                },
                &mut Silent,
            )
            .await?;
        assert!(report.differences.is_none());
        assert_eq!(report.dead_letters, 0);
    }
    // the swapped-in tables carry every index under its own name and definition
    assert_eq!((indexes("order_view").await?, indexes("product_view").await?), before);
    assert!(before.0.len() > 3, "{:?}", before.0);
    assert_eq!(
        setup.doc("order_view", &tampered).await?.expect("doc")["status"],
        "pending_payment"
    );
    for projection in Projection::ALL {
        let report = projection.replay(&pool, &dry_run(1_000), &mut Silent).await?;
        assert!(
            report.differences.expect("compared").is_empty(),
            "{projection} after the swap"
        );
    }
    // the daemon keeps projecting into the swapped-in table
    let late = Uuid::now_v7();
    let created = ProductEvent::ProductCreated {
        product_id: late,
        merchant_id: "m-1".into(),
        name: "Late bun".into(),
        price_cents: 300,
        stock: 5,
    };
    setup
        .publish(&setup.store(&late.to_string(), 1, &created).await?, false)
        .await?;
    setup.wait_caught_up().await?;
    assert!(setup.doc("product_view", &late.to_string()).await?.is_some());
    setup.finish().await
}

#[tokio::test]
async fn two_replays_of_one_projection_never_run_at_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mut holder = setup.db.pool.acquire().await?;
    let _: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended('replay:orders', 0))")
        .fetch_one(&mut *holder)
        .await?;
    let refused = Projection::Orders
        .replay(&setup.db.pool, &ReplayOptions::default(), &mut Silent)
        .await;
    assert!(matches!(refused, Err(ReplayError::Busy("orders"))), "{refused:?}");
    // other projections are not held up
    Projection::Products
        .replay(&setup.db.pool, &ReplayOptions::default(), &mut Silent)
        .await?;
    drop(holder);
    setup.finish().await
}

#[tokio::test]
async fn the_cli_reports_and_exits_non_zero_on_failure() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    projected_history(&mut setup).await?;
    let binary = env!("CARGO_BIN_EXE_replay");

    let output = Command::new(binary)
        .args(["--projection", "all", "--dry-run", "--batch", "5"])
        .env("DATABASE_URL", &setup.db.url)
        .env("STARTUP_TIMEOUT_SECS", "5")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for projection in Projection::ALL {
        assert!(
            stdout.contains(&format!("{projection}: the live view equals the replay")),
            "{stdout}"
        );
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("events/s"), "progress on stderr: {stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "not a terminal: plain lines, no bar: {stderr:?}"
    );

    let output = Command::new(binary)
        .args(["--projection", "all", "--dry-run", "--json"])
        .env("DATABASE_URL", &setup.db.url)
        .env("STARTUP_TIMEOUT_SECS", "5")
        .output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["dry_run"], true);
    let reports = summary["projections"].as_array().cloned().unwrap_or_default();
    assert_eq!(reports.len(), Projection::ALL.len(), "{summary}");
    for report in &reports {
        assert_eq!(report["equal"], true, "{report}");
        assert_eq!(report["swapped"], false, "{report}");
        assert!(
            report["events"].as_u64().is_some() && report["elapsed_ms"].as_u64().is_some(),
            "{report}"
        );
    }
    let orders = reports
        .iter()
        .find(|r| r["projection"] == "orders")
        .cloned()
        .unwrap_or_default();
    assert!(orders["events"].as_u64().unwrap_or(0) > 0, "{orders}");

    let output = Command::new(binary)
        .args(["--projection", "orders"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("STARTUP_TIMEOUT_SECS", "1")
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("replay failed"));

    let output = Command::new(binary).args(["--projection", "nonsense"]).output()?;
    assert!(!output.status.success());
    setup.finish().await
}
