//! Where each projection's live consumer is (`projection_checkpoints`): the
//! stream sequence and the global position of the last event it applied,
//! recorded right after its batch committed. Beside it, the projection's
//! lock (a transaction-level advisory lock): the daemon's workers share it
//! per batch, the replay takes it alone to pause them while it swaps tables.
//! Positions are the event store's, so the table is the store's.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// Takes the projection's lock exclusively for the rest of the transaction:
/// the replay holds it while it swaps tables, so no daemon worker is inside
/// a batch then.
pub async fn lock(conn: &mut PgConnection, projection: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('projection:' || $1, 0))")
        .bind(projection)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Takes the projection's lock shared for the rest of the transaction: the
/// daemon's workers hold it per batch, side by side, and all of them wait
/// while a replay swaps tables.
pub async fn lock_shared(conn: &mut PgConnection, projection: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended('projection:' || $1, 0))")
        .bind(projection)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records the last event a batch applied, after the batch committed
/// (never moving the stream sequence back: a redelivered older batch leaves
/// it where it is). Creates the row on first use.
pub async fn advance(
    executor: impl sqlx::PgExecutor<'_>,
    projection: &str,
    stream_sequence: u64,
    global_position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints AS c (projection, stream_sequence, global_position, recorded_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (projection) DO UPDATE
            SET stream_sequence = GREATEST(c.stream_sequence, EXCLUDED.stream_sequence),
                global_position = GREATEST(c.global_position, EXCLUDED.global_position),
                recorded_at = GREATEST(c.recorded_at, EXCLUDED.recorded_at),
                updated_at = now()",
    )
    .bind(projection)
    .bind(i64::try_from(stream_sequence).unwrap_or(i64::MAX))
    .bind(global_position)
    .bind(recorded_at)
    .execute(executor)
    .await?;
    Ok(())
}

/// When the last event the projection applied was recorded (`None` before
/// its first batch).
pub async fn recorded_at(pool: &PgPool, projection: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(
        sqlx::query_scalar("SELECT recorded_at FROM projection_checkpoints WHERE projection = $1")
            .bind(projection)
            .fetch_optional(pool)
            .await?
            .flatten(),
    )
}
