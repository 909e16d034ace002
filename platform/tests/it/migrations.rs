//! The migrations against a real, empty Postgres database.

use futures::StreamExt as _;
use sqlx::{Row as _, postgres::PgListener};

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_again_as_a_no_op() -> anyhow::Result<()> {
    let db = testkit::TestDb::empty().await?;
    platform::pg::migrate(&db.pool).await?;
    platform::pg::migrate(&db.pool).await?;

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(applied, i64::try_from(platform::pg::MIGRATOR.iter().count())?);

    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
          WHERE table_name = 'events' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await?;
    let types: std::collections::HashMap<_, _> = columns.into_iter().collect();
    assert_eq!(types.get("payload").map(String::as_str), Some("jsonb"));
    assert_eq!(types.get("metadata").map(String::as_str), Some("jsonb"));
    assert_eq!(types.get("global_position").map(String::as_str), Some("bigint"));
    assert_eq!(types.get("tx_id").map(String::as_str), Some("xid8"));
    assert_eq!(
        types.get("recorded_at").map(String::as_str),
        Some("timestamp with time zone")
    );
    Ok(())
}

/// postgres-es names its seven columns; the added ones must fill themselves.
#[tokio::test]
async fn a_postgres_es_insert_gets_position_transaction_and_time() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let insert =
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                  VALUES ($1, $2, $3, $4, $5, $6, $7)";
    for sequence in 1..=2_i32 {
        sqlx::query(insert)
            .bind("Order")
            .bind("o-1")
            .bind(sequence)
            .bind("OrderPlaced")
            .bind("1.0")
            .bind(serde_json::json!({"OrderPlaced": {}}))
            .bind(serde_json::json!({"correlation_id": "c"}))
            .execute(&db.pool)
            .await?;
    }
    let rows = sqlx::query(
        "SELECT global_position, tx_id::text AS tx, recorded_at IS NOT NULL AS stamped FROM events ORDER BY sequence",
    )
    .fetch_all(&db.pool)
    .await?;
    let positions: Vec<i64> = rows.iter().map(|r| r.get("global_position")).collect();
    assert!(positions[0] < positions[1], "positions grow: {positions:?}");
    let txs: Vec<String> = rows.iter().map(|r| r.get("tx")).collect();
    assert_ne!(
        txs[0], txs[1],
        "two statements outside a transaction are two transactions"
    );
    assert!(rows.iter().all(|r| r.get::<bool, _>("stamped")));

    // optimistic lock: the same sequence twice is refused
    let duplicate = sqlx::query(insert)
        .bind("Order")
        .bind("o-1")
        .bind(2_i32)
        .bind("OrderPaid")
        .bind("1.0")
        .bind(serde_json::json!({}))
        .bind(serde_json::json!({}))
        .execute(&db.pool)
        .await;
    assert!(duplicate.is_err());
    Ok(())
}

#[tokio::test]
async fn one_notification_per_insert_statement_not_per_row() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let mut listener = PgListener::connect(&db.url).await?;
    listener.listen("events_appended").await?;
    // writers notify only while the relay says it is waiting
    sqlx::query("UPDATE relay_wakeup SET listening = true")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'Voucher', 'v-1', n, 'SeckillClaimAccepted', '1.0', '{}'::jsonb, '{}'::jsonb
           FROM generate_series(1, 100) AS n",
    )
    .execute(&db.pool)
    .await?;
    let mut stream = listener.into_stream();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await?;
    assert!(matches!(first, Some(Ok(_))));
    let second = tokio::time::timeout(std::time::Duration::from_millis(300), stream.next()).await;
    assert!(second.is_err(), "a second notification arrived for the same statement");
    Ok(())
}

#[tokio::test]
async fn writers_do_not_notify_while_the_relay_is_busy() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let mut listener = PgListener::connect(&db.url).await?;
    listener.listen("events_appended").await?;
    sqlx::query("UPDATE relay_wakeup SET listening = false")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('Voucher', 'v-1', 1, 'VoucherCreated', '2.0', '{}'::jsonb, '{}'::jsonb)",
    )
    .execute(&db.pool)
    .await?;
    let mut stream = listener.into_stream();
    let notified = tokio::time::timeout(std::time::Duration::from_millis(300), stream.next()).await;
    assert!(notified.is_err(), "a writer notified a relay that was not listening");
    Ok(())
}
