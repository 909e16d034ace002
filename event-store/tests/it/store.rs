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
    // not permanent: after a lost commit a cached aggregate is ahead of the
    // store, and deciding again on the stored state succeeds
    assert!(refused.as_ref().is_err_and(|e| !e.is_permanent()));
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

#[tokio::test]
async fn group_commit_stores_concurrent_callers_together_and_answers_each_on_its_own() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let store = EventStore::new(db.pool.clone());
    let append = |id: String, base_version: u64| Append {
        aggregate_type: "Order",
        aggregate_id: id,
        base_version,
        events: vec![PendingEvent {
            event_type: "OrderSubmitted".to_owned(),
            event_version: "1.0".to_owned(),
            payload: serde_json::json!({ "OrderSubmitted": {} }),
            metadata: serde_json::json!({}),
        }],
    };
    store.append(&[append("taken".to_owned(), 0)]).await?;
    let group = event_store::group::GroupCommit::start(store.clone(), 64);
    // 200 callers at once, one of them creating an aggregate that exists
    let mut callers = tokio::task::JoinSet::new();
    for n in 0..200 {
        let (group, id) = (
            group.clone(),
            if n == 77 { "taken".to_owned() } else { format!("o-{n}") },
        );
        let append = append(id.clone(), 0);
        callers.spawn(async move { (id, group.append(vec![append]).await) });
    }
    let mut refused = Vec::new();
    while let Some(done) = callers.join_next().await {
        let (id, outcome) = done?;
        match outcome {
            Ok(()) => {}
            Err(StoreError::Conflict) => refused.push(id),
            Err(other) => anyhow::bail!("{id}: {other}"),
        }
    }
    assert_eq!(refused, ["taken"], "only the existing aggregate is refused");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(stored, 200, "199 new orders and the one that was there");
    // callers were batched: fewer transactions than callers
    let transactions: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT tx_id) FROM events WHERE aggregate_id <> 'taken'")
            .fetch_one(&db.pool)
            .await?;
    assert!(transactions < 199, "{transactions} transactions for 199 callers");
    drop(group);
    db.drop_database().await
}
