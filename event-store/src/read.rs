//! Reading events as envelopes: what the relay, the projections, the replay
//! and the edge's warm-up read, in one place, so the table's shape and the
//! envelope's decoding (metadata, event ids, upcasting) are written once.

use chrono::{DateTime, Utc};
use events::{AggregateEvents, EnvelopeError, EventEnvelope, EventMetadata};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};

/// The columns of `events` that [`envelope_from_row`] reads, for SELECT lists.
pub const ENVELOPE_COLUMNS: &str = "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, global_position, recorded_at";

/// A row of the `events` table (selected with [`ENVELOPE_COLUMNS`]) as the
/// envelope every reader of the store works with.
pub fn envelope_from_row(row: &PgRow) -> Result<EventEnvelope, sqlx::Error> {
    let aggregate_type: String = row.try_get("aggregate_type")?;
    let aggregate_id: String = row.try_get("aggregate_id")?;
    let sequence = row.try_get::<i64, _>("sequence")?.unsigned_abs();
    let metadata_json: Value = row.try_get("metadata")?;
    let metadata_map = serde_json::from_value(metadata_json).unwrap_or_default();
    let metadata = EventMetadata::from_map(&metadata_map).unwrap_or_else(|error| {
        // Read anyway: holding up every later event for a malformed audit
        // field would be worse. The event id stays stable, so dedupe holds.
        tracing::warn!(%error, %aggregate_type, %aggregate_id, sequence, "event metadata incomplete");
        EventMetadata::system("unknown")
    });
    let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
    Ok(EventEnvelope {
        event_id: events::event_id(&aggregate_type, &aggregate_id, sequence),
        aggregate_type,
        aggregate_id,
        sequence,
        global_position: row.try_get("global_position")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata,
        recorded_at,
    })
}

fn envelopes(rows: &[PgRow]) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    rows.iter().map(envelope_from_row).collect()
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One aggregate's events with a sequence above `after` and, if given,
/// below `before`, in sequence order.
pub async fn aggregate<'c>(
    db: impl PgExecutor<'c>,
    aggregate_type: &str,
    aggregate_id: &str,
    after: u64,
    before: Option<u64>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let query = format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
           AND sequence > $3 AND sequence < $4 ORDER BY sequence"
    );
    let rows = sqlx::query(&query)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(to_i64(after))
        .bind(before.map_or(i64::MAX, to_i64))
        .fetch_all(db)
        .await?;
    envelopes(&rows)
}

/// Why an aggregate's history could not be read as its events.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("database")]
    Database(#[from] sqlx::Error),
    #[error("a stored event does not decode")]
    Decode(#[from] EnvelopeError),
}

/// One aggregate's whole history, each event decoded (and upcast) into its
/// enum, with its sequence.
pub async fn aggregate_events<'c, E: AggregateEvents + DeserializeOwned>(
    db: impl PgExecutor<'c>,
    aggregate_id: &str,
) -> Result<Vec<(u64, E)>, ReadError> {
    aggregate(db, E::AGGREGATE_TYPE, aggregate_id, 0, None)
        .await?
        .iter()
        .map(|envelope| Ok((envelope.sequence, envelope.decode::<E>()?)))
        .collect()
}

/// How many events an aggregate type has.
pub async fn count<'c>(db: impl PgExecutor<'c>, aggregate_type: &str) -> Result<u64, sqlx::Error> {
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = $1")
        .bind(aggregate_type)
        .fetch_one(db)
        .await?;
    Ok(total.unsigned_abs())
}

/// Up to `limit` events of an aggregate type after `after` (a global
/// position), in global-position order: a page of a replay.
pub async fn page<'c>(
    db: impl PgExecutor<'c>,
    aggregate_type: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let query = format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE aggregate_type = $1 AND global_position > $2
          ORDER BY global_position LIMIT $3"
    );
    let rows = sqlx::query(&query)
        .bind(aggregate_type)
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?;
    envelopes(&rows)
}

/// The transactions that may still commit events below the current end of
/// the log: the snapshot's xmin, as text, for [`since`].
pub async fn snapshot_xmin<'c>(db: impl PgExecutor<'c>) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        .fetch_one(db)
        .await
}

/// Every event of an aggregate type after `after`, plus any committed since
/// by a transaction at or above `xmin` (taken with [`snapshot_xmin`] before
/// the pages were read): what a replay must still apply so that nothing a
/// slow transaction wrote below its position is missed.
pub async fn since<'c>(
    db: impl PgExecutor<'c>,
    aggregate_type: &str,
    after: i64,
    xmin: &str,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let query = format!(
        "SELECT {ENVELOPE_COLUMNS} FROM events WHERE aggregate_type = $1 AND (global_position > $2 OR tx_id >= $3::text::xid8)
          ORDER BY global_position"
    );
    let rows = sqlx::query(&query)
        .bind(aggregate_type)
        .bind(after)
        .bind(xmin)
        .fetch_all(db)
        .await?;
    envelopes(&rows)
}
