//! Where each projection's live consumer is (`projection_checkpoints`): the
//! stream sequence and the global position of the last event it applied,
//! committed in the same transaction as the view rows of its batch. The row
//! is also the lock the replay takes to pause the daemon while it swaps
//! tables. Positions are the event store's, so the table is the store's.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// Locks the projection's checkpoint row (creating it on first use) for the
/// rest of the transaction, in one statement: the daemon holds it per batch,
/// the replay while it swaps tables, so the two never interleave.
pub async fn lock(conn: &mut PgConnection, projection: &str) -> Result<(), sqlx::Error> {
    // an upsert that changes nothing still takes the row lock
    sqlx::query(
        "INSERT INTO projection_checkpoints AS c (projection) VALUES ($1)
         ON CONFLICT (projection) DO UPDATE SET updated_at = c.updated_at",
    )
    .bind(projection)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the last event a batch applied (never moving the stream sequence
/// back: a redelivered older batch leaves it where it is).
pub async fn advance(
    conn: &mut PgConnection,
    projection: &str,
    stream_sequence: u64,
    global_position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints
            SET stream_sequence = GREATEST(stream_sequence, $2), global_position = $3, recorded_at = $4,
                updated_at = now()
          WHERE projection = $1",
    )
    .bind(projection)
    .bind(i64::try_from(stream_sequence).unwrap_or(i64::MAX))
    .bind(global_position)
    .bind(recorded_at)
    .execute(&mut *conn)
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
