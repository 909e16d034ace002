//! `projection_dead_letters`: a re-drive rebuilds the document.

use chrono::{TimeZone as _, Utc};
use dlq::Exit;
use events::{CancellationReason, EventMetadata, OrderEvent, OrderItem, OrderKind};
use projections::Projection;
use uuid::Uuid;

use crate::Places;

fn placed(order: Uuid) -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: order,
        user_id: "ann".into(),
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
        placed_at: Utc.timestamp_opt(1_800_000_000, 0).single().unwrap_or_default(),
    }
}

fn cancelled() -> OrderEvent {
    OrderEvent::OrderCancelled {
        reason: CancellationReason::CustomerRequested,
        cancelled_by: "ann".into(),
        cancelled_at: Utc.timestamp_opt(1_800_000_030, 0).single().unwrap_or_default(),
    }
}

/// Stores an event row as the event store does; its id.
async fn store(
    places: &Places,
    order: &str,
    sequence: i64,
    event_type: &str,
    payload: serde_json::Value,
) -> anyhow::Result<Uuid> {
    let metadata = serde_json::to_value(EventMetadata::system("test").to_map())?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Order', $1, $2, $3, '1.0', $4, $5)",
    )
    .bind(order)
    .bind(sequence)
    .bind(event_type)
    .bind(payload)
    .bind(metadata)
    .execute(&places.db.pool)
    .await?;
    Ok(events::event_id("Order", order, sequence.unsigned_abs()))
}

async fn status(places: &Places, order: &str) -> anyhow::Result<(i64, String)> {
    Ok(
        sqlx::query_as("SELECT version, doc->>'status' FROM order_view WHERE id = $1")
            .bind(order)
            .fetch_one(&places.db.pool)
            .await?,
    )
}

#[tokio::test]
async fn a_refused_event_fails_again_until_the_projector_takes_it_then_its_document_is_whole() -> anyhow::Result<()> {
    let places = Places::new().await?;
    // ann's order: an event no projector reads, between two good ones
    let a = Uuid::now_v7();
    let a_id = a.to_string();
    store(&places, &a_id, 1, "OrderPlaced", serde_json::to_value(placed(a))?).await?;
    let poison = store(
        &places,
        &a_id,
        2,
        "OrderPaid",
        serde_json::json!({"OrderPaid": {"bogus": true}}),
    )
    .await?;
    store(&places, &a_id, 3, "OrderCancelled", serde_json::to_value(cancelled())?).await?;
    // projected as the daemon's catch-up does: the poison is parked and skipped
    projections::reconciler::repair(&places.db.pool, Projection::Orders, &[(a_id.clone(), 3)]).await?;
    assert_eq!(status(&places, &a_id).await?, (3, "cancelled".into()));

    let id = format!("projections:orders:{poison}");
    let listed = places.entries(&["--source", "projections"]).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["event_type"], "OrderPaid");
    assert_eq!(listed[0]["key"], format!("{a_id} #2"));
    // the daemon also parks it on the dead-letter stream: shown once, here
    cp_nats::Publisher::new(places.js.clone(), 1)
        .publish(
            cp_nats::Outgoing::new(
                places.namespace.dead_letter_subject("projection-orders"),
                format!("dlq:projection-orders:{poison}"),
                &b"{}"[..],
            )
            .header(cp_nats::consumer::HDR_DLQ_CONSUMER, "projection-orders")
            .header(cp_nats::consumer::HDR_DLQ_ORIGINAL_MSG_ID, poison.to_string()),
        )
        .await?;
    let everywhere = places.entries(&[]).await?;
    assert_eq!(everywhere.len(), 1, "{everywhere:?}");
    assert_eq!(everywhere[0]["id"], id.as_str());
    // asked for by its stream id, it is the same projections entry
    let (_, shown, _) = places.dlq(&["show", "events:1", "--json"]).await?;
    let shown: serde_json::Value = serde_json::from_str(&shown)?;
    assert_eq!(shown["entry"]["id"], id.as_str(), "{shown}");

    let (exit, out, _) = places.dlq(&["redrive", &id]).await?;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(
        out.contains("failed_again") && out.contains("document unchanged"),
        "{out}"
    );
    assert_eq!(
        status(&places, &a_id).await?,
        (3, "cancelled".into()),
        "a failed rebuild writes nothing"
    );
    assert_eq!(places.entries(&[]).await?.len(), 1, "still open");

    // bob's order: its cancellation was refused by an older projector (the
    // document holds the placement only, at version 2); the fixed one takes it
    let b = Uuid::now_v7();
    let b_id = b.to_string();
    store(&places, &b_id, 1, "OrderPlaced", serde_json::to_value(placed(b))?).await?;
    projections::reconciler::repair(&places.db.pool, Projection::Orders, &[(b_id.clone(), 1)]).await?;
    let refused = store(&places, &b_id, 2, "OrderCancelled", serde_json::to_value(cancelled())?).await?;
    sqlx::query("UPDATE order_view SET version = 2 WHERE id = $1")
        .bind(&b_id)
        .execute(&places.db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO projection_dead_letters (projection, event_id, aggregate_id, sequence, event_type, error)
         VALUES ('orders', $1, $2, 2, 'OrderCancelled', 'unknown variant OrderCancelled')",
    )
    .bind(refused)
    .bind(&b_id)
    .execute(&places.db.pool)
    .await?;
    assert_eq!(status(&places, &b_id).await?, (2, "pending_payment".into()));
    let bob = format!("projections:orders:{refused}");
    let (exit, out, _) = places.dlq(&["redrive", &bob]).await?;
    assert_eq!(exit, Exit::Done, "{out}");
    assert!(out.contains("redriven") && out.contains("up to version 2"), "{out}");
    assert_eq!(status(&places, &b_id).await?, (2, "cancelled".into()));
    let (_, out, _) = places.dlq(&["redrive", &bob]).await?;
    assert!(out.contains("already redriven"), "{out}");

    // ann's is given up on
    let (exit, _, _) = places
        .dlq(&["drop", &id, "--reason", "written by a bug, see #123"])
        .await?;
    assert_eq!(exit, Exit::Done);
    assert!(places.entries(&[]).await?.is_empty());
    let audit = places.audit().await?;
    let outcomes: Vec<(&str, &str)> = audit.iter().map(|(e, _, o, _)| (e.as_str(), o.as_str())).collect();
    assert_eq!(
        outcomes,
        [
            (id.as_str(), "failed_again"),
            (bob.as_str(), "redriven"),
            (id.as_str(), "dropped")
        ]
    );
    places.finish().await
}
