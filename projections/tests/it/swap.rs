//! A replay swaps its tables in while the query API serves reads: not one
//! read fails, and the answers never go backwards.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::support::{Setup, at};
use clap::Parser as _;
use events::{OrderEvent, OrderItem, OrderKind};
use platform::http::{JwtKeys, Role};
use projections::{
    Projection,
    replay::{ReplayOptions, Silent},
};
use testkit::reqwest;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_fail_while_a_replay_swaps_the_orders_view() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let mut ids = Vec::new();
    for i in 0..200u32 {
        let order = Uuid::now_v7();
        let placed = OrderEvent::OrderPlaced {
            order_id: order,
            user_id: format!("user-{}", i % 10),
            merchant_id: Some("m-1".into()),
            kind: OrderKind::SeckillVoucher,
            items: vec![OrderItem {
                product_id: None,
                voucher_id: Some(Uuid::from_u128(7)),
                name: "Hotpot".into(),
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
        let envelope = setup.store(&order.to_string(), 1, &placed).await?;
        setup.publish(&envelope, false).await?;
        ids.push(order.to_string());
    }
    setup.start_daemon(5);
    setup.wait_caught_up().await?;

    let config =
        query_api::Config::try_parse_from(["query-api", "--database-url", &setup.db.url, "--jwt-secret", "s"])?;
    let server = testkit::Server::start(|listener, shutdown| query_api::run(config, listener, shutdown)).await?;
    let token = JwtKeys::new(&platform::Secret::new("s")).issue("root", Role::Admin, Duration::from_secs(600))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let ids = Arc::new(ids);
    let mut readers = Vec::new();
    for reader in 0..8usize {
        let (stop, reads, failures, ids) = (stop.clone(), reads.clone(), failures.clone(), ids.clone());
        let (base, token) = (server.url(""), token.clone());
        readers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = reader;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(7);
                let path = if n % 4 == 0 {
                    "/orders?limit=20".to_owned()
                } else {
                    format!("/orders/{}", ids[n % ids.len()])
                };
                let ok = match http.get(format!("{base}{path}")).bearer_auth(&token).send().await {
                    Ok(response) => response.status() == 200,
                    Err(_) => false,
                };
                reads.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let options = ReplayOptions {
            batch: 50,
            dry_run: false,
            document_cache: 20,
        };
        Projection::Orders.replay(&setup.db.pool, &options, &mut Silent).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await?;
    }
    let (reads, failures) = (reads.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    assert!(reads > 100, "readers were reading ({reads})");
    assert_eq!(failures, 0, "{failures} of {reads} reads failed during the swaps");
    server.stop().await?;
    setup.finish().await
}
