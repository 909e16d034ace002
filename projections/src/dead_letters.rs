//! The projections' dead letters (`projection_dead_letters`): events a
//! projector refused, which their document skipped. Read by the
//! `citypicks-dlq` CLI, and re-driven by rebuilding the document from the
//! event store ([`rebuild`]): after a fixed projector, the skipped event
//! applies and the document is whole again; with the projector unchanged, it
//! fails again and the document stays as it was.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use crate::{
    catalog::Projection,
    views::{CouponProjector, OrderProjector, ProductProjector, Projector, VoucherProjector},
    writer::{Documents, Step},
};

/// One row of `projection_dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionDeadLetter {
    pub projection: String,
    pub event_id: Uuid,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
}

const COLUMNS: &str = "projection, event_id, aggregate_id, sequence, event_type, error, recorded_at";

fn from_row(row: &sqlx::postgres::PgRow) -> Result<ProjectionDeadLetter, sqlx::Error> {
    Ok(ProjectionDeadLetter {
        projection: row.try_get("projection")?,
        event_id: row.try_get("event_id")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get::<i64, _>("sequence")?.unsigned_abs(),
        event_type: row.try_get("event_type")?,
        error: row.try_get("error")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// Every dead letter recorded at or after `since`, oldest first.
pub async fn list(pool: &PgPool, since: Option<DateTime<Utc>>) -> Result<Vec<ProjectionDeadLetter>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM projection_dead_letters
          WHERE $1::timestamptz IS NULL OR recorded_at >= $1 ORDER BY recorded_at, projection, event_id"
    ))
    .bind(since)
    .fetch_all(pool)
    .await?
    .iter()
    .map(from_row)
    .collect()
}

pub async fn get(pool: &PgPool, projection: &str, event_id: Uuid) -> Result<Option<ProjectionDeadLetter>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM projection_dead_letters WHERE projection = $1 AND event_id = $2"
    ))
    .bind(projection)
    .bind(event_id)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebuild {
    /// The document now holds every event of its aggregate, up to `version`.
    Rebuilt { version: u64 },
    /// An event still does not apply: nothing was written.
    FailedAgain {
        event_id: Uuid,
        sequence: u64,
        error: String,
    },
    /// The event store has no events for the document.
    NoEvents,
}

/// Rebuilds one document of `projection` from every event of its aggregate,
/// in one transaction under the projection's shared lock (as a daemon worker
/// writes): the old row is replaced only if every event applies.
pub async fn rebuild(pool: &PgPool, projection: Projection, aggregate_id: &str) -> Result<Rebuild, sqlx::Error> {
    match projection {
        Projection::Orders => rebuild_one::<OrderProjector>(pool, aggregate_id).await,
        Projection::Coupons => rebuild_one::<CouponProjector>(pool, aggregate_id).await,
        Projection::Vouchers => rebuild_one::<VoucherProjector>(pool, aggregate_id).await,
        Projection::Products => rebuild_one::<ProductProjector>(pool, aggregate_id).await,
    }
}

async fn rebuild_one<P: Projector>(pool: &PgPool, aggregate_id: &str) -> Result<Rebuild, sqlx::Error> {
    let mut tx = pool.begin().await?;
    event_store::checkpoint::lock_shared(&mut tx, P::NAME).await?;
    // the row stays locked until commit: a daemon worker writing the same
    // document meanwhile waits, then finds the rebuilt version (and its
    // version rule skips what the rebuild already holds)
    sqlx::query(&format!("DELETE FROM {} WHERE id = $1", P::TABLE))
        .bind(aggregate_id)
        .execute(&mut *tx)
        .await?;
    let events = event_store::read::aggregate(&mut *tx, P::AGGREGATE_TYPE, aggregate_id, 0, None).await?;
    let Some(last) = events.last().map(|event| event.sequence) else {
        return Ok(Rebuild::NoEvents);
    };
    let mut docs = Documents::<P>::new(P::TABLE);
    for event in &events {
        let failed = match docs.apply(&mut tx, event).await? {
            Step::Applied | Step::Duplicate => continue,
            Step::Gap { version } => format!("events after version {version} are not visible yet"),
            Step::Failed(error) => error.to_string(),
        };
        // dropping the transaction rolls the delete back
        return Ok(Rebuild::FailedAgain {
            event_id: event.event_id,
            sequence: event.sequence,
            error: failed,
        });
    }
    docs.flush(&mut tx).await?;
    tx.commit().await?;
    Ok(Rebuild::Rebuilt { version: last })
}
