//! The event store against a real Postgres: appends are all or nothing,
//! the sequence is the optimistic lock, and no append leaves a gap.

use event_store::{Append, EventStore, PendingEvent, StoreError};

#[tokio::test]
async fn the_store_refuses_an_append_that_would_leave_a_gap_in_a_sequence() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let store = EventStore::new(db.pool.clone());
    let event = |event_type: &str| PendingEvent {
        event_type: event_type.to_owned(),
        event_version: "1.0".to_owned(),
        payload: serde_json::json!({ event_type: {} }),
        metadata: serde_json::json!({}),
    };
    let append = |id: &str, base_version: u64, types: &[&str]| Append {
        aggregate_type: "Payment",
        aggregate_id: id.to_owned(),
        base_version,
        events: types.iter().map(|t| event(t)).collect(),
    };
    store.append(&[append("p-1", 0, &["PaymentCreated"])]).await?;
    // sequence 3 after 1: refused whole, with the good append beside it
    let refused = store
        .append(&[
            append("p-2", 0, &["PaymentCreated"]),
            append("p-1", 2, &["PaymentRefunded"]),
        ])
        .await;
    assert!(
        matches!(&refused, Err(StoreError::SequenceGap { aggregate_id, sequence: 3, .. }) if aggregate_id == "p-1"),
        "{refused:?}"
    );
    assert!(refused.as_ref().is_err_and(StoreError::is_permanent));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(stored, 1, "nothing of the refused call was stored");
    // two appends of one aggregate in one call chain: the second follows the first
    store
        .append(&[
            append("p-1", 1, &["PaymentSucceeded"]),
            append("p-1", 2, &["PaymentRefunded"]),
        ])
        .await?;
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = 'p-1' ORDER BY sequence")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(sequences, [1, 2, 3]);
    // the optimistic lock still answers a conflict, not a gap
    assert!(matches!(
        store.append(&[append("p-1", 2, &["PaymentRefunded"])]).await,
        Err(StoreError::Conflict)
    ));
    Ok(())
}
