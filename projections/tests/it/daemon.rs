//! The projection daemon against real Postgres and NATS: redelivery changes
//! nothing, events arriving out of order are applied in aggregate order, and
//! a poison event is dead-lettered while everything after it still applies.

use std::time::Duration;

use crate::support::{Setup, at};
use events::{CancellationReason, OrderEvent, OrderItem, OrderKind};
use testkit::eventually;
use uuid::Uuid;

pub(crate) fn placed(order: Uuid, user: &str) -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: order,
        user_id: user.into(),
        merchant_id: Some("m-1".into()),
        kind: OrderKind::SeckillVoucher,
        items: vec![OrderItem {
            product_id: None,
            voucher_id: Some(Uuid::from_u128(7)),
            name: "Hotpot for two".into(),
            quantity: 1,
            unit_price_cents: 990,
        }],
        voucher_id: Some(Uuid::from_u128(7)),
        coupon_id: None,
        subtotal_cents: 990,
        discount_cents: 0,
        total_cents: 990,
        placed_at: at(0),
    }
}

pub(crate) fn payment_started(payment: Uuid) -> OrderEvent {
    OrderEvent::OrderPaymentStarted {
        payment_id: payment,
        amount_cents: 990,
    }
}

pub(crate) fn paid(payment: Uuid) -> OrderEvent {
    OrderEvent::OrderPaid {
        payment_id: payment,
        amount_cents: 990,
        paid_at: at(60),
    }
}

/// Stores three events for each of `n` orders; returns their envelopes in order.
pub(crate) async fn paid_orders(setup: &Setup, n: usize) -> anyhow::Result<Vec<events::EventEnvelope>> {
    let mut envelopes = Vec::new();
    for i in 0..n {
        let (order, payment) = (Uuid::now_v7(), Uuid::now_v7());
        let id = order.to_string();
        envelopes.push(setup.store(&id, 1, &placed(order, &format!("user-{i}"))).await?);
        envelopes.push(setup.store(&id, 2, &payment_started(payment)).await?);
        envelopes.push(setup.store(&id, 3, &paid(payment)).await?);
    }
    Ok(envelopes)
}

#[tokio::test]
async fn a_redelivered_batch_leaves_the_views_unchanged() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let envelopes = paid_orders(&setup, 50).await?;
    for envelope in &envelopes {
        setup.publish(envelope, false).await?;
    }
    setup.start_daemon(5);
    setup.wait_caught_up().await?;
    let before = setup.rows("order_view").await?;
    assert_eq!(before.len(), 50);
    assert!(
        before
            .iter()
            .all(|(_, version, doc)| *version == 3 && doc["status"] == "paid")
    );

    for envelope in &envelopes {
        setup.publish(envelope, true).await?;
    }
    setup.wait_caught_up().await?;
    assert_eq!(setup.rows("order_view").await?, before);
    setup.finish().await
}

#[tokio::test]
async fn events_arriving_out_of_order_are_applied_in_aggregate_order() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let envelopes = paid_orders(&setup, 1).await?;
    // the last event first: the first two are read from the event store
    setup.publish(&envelopes[2], false).await?;
    setup.start_daemon(5);
    setup.wait_caught_up().await?;
    let id = &envelopes[0].aggregate_id;
    let doc = setup.doc("order_view", id).await?.expect("document");
    assert_eq!(
        (doc["status"].as_str(), doc["version"].as_u64()),
        (Some("paid"), Some(3))
    );
    let history: Vec<&str> = doc["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["status"].as_str())
        .collect();
    assert_eq!(history, ["pending_payment", "paid"]);
    // the earlier ones arrive late and change nothing
    setup.publish(&envelopes[0], false).await?;
    setup.publish(&envelopes[1], false).await?;
    setup.wait_caught_up().await?;
    assert_eq!(setup.doc("order_view", id).await?, Some(doc));
    setup.finish().await
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_later_events_still_apply() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let (a_id, b_id) = (a.to_string(), b.to_string());
    let a1 = setup.store(&a_id, 1, &placed(a, "ann")).await?;
    // an event no projector can read, stored and published like any other
    let a2 = setup
        .store_raw(
            "Order",
            &a_id,
            2,
            "OrderPaid",
            "1.0",
            serde_json::json!({"OrderPaid": {"bogus": true}}),
        )
        .await?;
    let cancelled = OrderEvent::OrderCancelled {
        reason: CancellationReason::CustomerRequested,
        cancelled_by: "ann".into(),
        cancelled_at: at(30),
    };
    let a3 = setup.store(&a_id, 3, &cancelled).await?;
    let b1 = setup.store(&b_id, 1, &placed(b, "bob")).await?;
    for envelope in [&a1, &a2, &a3, &b1] {
        setup.publish(envelope, false).await?;
    }
    // many deliveries allowed: only sorting the failure as permanent explains
    // a dead letter on the first one
    setup.start_daemon(10);

    eventually(Duration::from_secs(20), || async {
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters WHERE event_id = $1")
            .bind(a2.event_id)
            .fetch_one(&setup.db.pool)
            .await?;
        Ok(dead == 1)
    })
    .await?;
    setup.wait_caught_up().await?;
    let doc = setup.doc("order_view", &a_id).await?.expect("ann's order");
    assert_eq!(doc["status"], "cancelled", "the event after the poison applied");
    let version: i64 = sqlx::query_scalar("SELECT version FROM order_view WHERE id = $1")
        .bind(&a_id)
        .fetch_one(&setup.db.pool)
        .await?;
    assert_eq!(version, 3);
    let other = setup.doc("order_view", &b_id).await?.expect("bob's order");
    assert_eq!(other["status"], "pending_payment");
    let (event_type, error): (String, String) = sqlx::query_as(
        "SELECT event_type, error FROM projection_dead_letters WHERE projection = 'orders' AND event_id = $1",
    )
    .bind(a2.event_id)
    .fetch_one(&setup.db.pool)
    .await?;
    assert_eq!(event_type, "OrderPaid");
    assert!(!error.is_empty());
    let dlq = setup.js.get_stream(setup.namespace.dead_letter_stream()).await?;
    let copy = dlq.get_raw_message(1).await?;
    assert_eq!(
        copy.headers
            .get(cp_nats::consumer::HDR_DLQ_DELIVERED)
            .map(|v| v.as_str().to_owned())
            .as_deref(),
        Some("1"),
        "dead-lettered on its first delivery"
    );
    setup.finish().await
}

#[tokio::test]
async fn each_committed_batch_announces_its_documents_and_versions() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&setup.db.pool).await?;
    listener.listen(platform::pg::VIEW_CHANGES_CHANNEL).await?;
    let envelopes = paid_orders(&setup, 20).await?;
    for envelope in &envelopes {
        setup.publish(envelope, false).await?;
    }
    setup.start_daemon(5);
    setup.wait_caught_up().await?;
    // the highest version announced per order document
    let mut announced = std::collections::HashMap::new();
    while let Ok(received) = tokio::time::timeout(Duration::from_millis(500), listener.try_recv()).await {
        let Some(notification) = received? else { break };
        match platform::pg::ViewChange::parse(notification.payload()) {
            Some(platform::pg::ViewChange::Documents { table, changed }) if table == "order_view" => {
                for (id, version) in changed {
                    let seen = announced.entry(id).or_insert(0);
                    *seen = version.max(*seen);
                }
            }
            Some(_) => {}
            None => anyhow::bail!("unreadable payload {}", notification.payload()),
        }
    }
    let stored = setup.rows("order_view").await?;
    assert_eq!(stored.len(), 20);
    for (id, version, _) in stored {
        assert_eq!(announced.get(&id), Some(&u64::try_from(version)?), "{id}");
    }
    setup.finish().await
}

#[tokio::test]
async fn a_replays_exclusive_lock_pauses_every_worker_and_the_checkpoint_follows_each_batch() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let envelopes = paid_orders(&setup, 40).await?;
    // what a replay's swap holds while it renames the tables
    let mut swap = setup.db.pool.begin().await?;
    event_store::checkpoint::lock(&mut swap, "orders").await?;
    for envelope in &envelopes {
        setup.publish(envelope, false).await?;
    }
    setup.start_daemon(5);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // forty documents split between two workers: neither got through
    assert!(setup.rows("order_view").await?.is_empty());
    swap.commit().await?;
    setup.wait_caught_up().await?;
    let stored = setup.rows("order_view").await?;
    assert_eq!(stored.len(), 40);
    assert!(
        stored
            .iter()
            .all(|(_, version, doc)| *version == 3 && doc["status"] == "paid")
    );
    let (sequence, position): (i64, Option<i64>) = sqlx::query_as(
        "SELECT stream_sequence, global_position FROM projection_checkpoints WHERE projection = 'orders'",
    )
    .fetch_one(&setup.db.pool)
    .await?;
    assert_eq!(sequence, 120);
    assert_eq!(position, envelopes.last().map(|e| e.global_position));
    setup.finish().await
}

#[tokio::test]
async fn document_loads_are_planned_for_the_table_as_it_is_not_as_it_was() -> anyhow::Result<()> {
    // a generic plan cached while the view was empty is a sequential scan
    // that outlives the view's growth: the load must never be a prepared,
    // cached statement
    let setup = Setup::new().await?;
    let mut conn = setup.db.pool.acquire().await?;
    let mut docs = projections::writer::Documents::<projections::views::OrderProjector>::new("order_view");
    for round in 0..8 {
        let id = format!("order-{round}");
        docs.load(&mut conn, [id.as_str()]).await?;
    }
    let cached: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT id, version, doc FROM order_view%'",
    )
    .fetch_one(&mut *conn)
    .await?;
    assert_eq!(cached, 0);
    drop(conn);
    setup.finish().await
}
