//! The admissions' reconciler against real Redis, Postgres and NATS: an
//! admission whose request never reached the requests stream (no forwarder
//! ran) is sent again; one with an order in the store is confirmed and never
//! asked about again; sending again within one bucket stores each request
//! once.

use std::time::Duration;

use crate::support::{Harness, NO_RATE_LIMIT, attempt, occurrences};
use seckill_edge::reconciler::{AdmissionReconciler, ReconcilerConfig};

#[tokio::test]
async fn admissions_without_an_order_are_sent_again_and_decided_ones_are_confirmed() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let harness = Harness::new(NO_RATE_LIMIT, db.pool.clone()).await?;
    let voucher = harness.open_sale(10).await?;
    let router = harness.router();
    let mut orders = Vec::new();
    for user in ["ann", "bob", "cat"] {
        let answer = attempt(&router, &voucher.to_string(), Some(&harness.token(user)), None).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        orders.push(answer.order_id().ok_or_else(|| anyhow::anyhow!("no order id"))?);
    }
    let mut reconciler = AdmissionReconciler::new(
        harness.redis.clone(),
        harness.prefix.clone(),
        db.pool.clone(),
        cp_nats::Publisher::new(harness.js.clone(), 64),
        harness.namespace.clone(),
        ReconcilerConfig {
            every: Duration::from_secs(1),
            grace: Duration::ZERO,
        },
    );

    // nothing forwarded them, nothing decided them: all three go out
    let first = reconciler.pass().await?;
    assert_eq!((first.checked, first.resent), (3, 3), "{first:?}");
    let sent = harness.requests_on_jetstream().await?;
    let counts = occurrences(&sent);
    assert!(orders.iter().all(|o| counts.get(o) == Some(&1)), "{counts:?}");
    assert!(sent.iter().all(|r| r.voucher_id == voucher));

    // ann's order is decided: confirmed, never looked up again
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Order', $1, 1, 'OrderPlaced', '1.0', '{}'::jsonb, '{}'::jsonb)",
    )
    .bind(orders[0].to_string())
    .execute(&db.pool)
    .await?;
    let second = reconciler.pass().await?;
    assert_eq!((second.checked, second.resent), (3, 2), "{second:?}");
    let third = reconciler.pass().await?;
    assert_eq!(third.checked, 2, "{third:?}");
    // sent again within the bucket: JetStream stored each request once
    let counts = occurrences(&harness.requests_on_jetstream().await?);
    assert!(orders.iter().all(|o| counts.get(o) == Some(&1)), "{counts:?}");
    Ok(())
}
