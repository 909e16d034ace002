//! Postgres: the pool every service uses and the embedded migrations.

use std::time::Duration;

use chrono::{DateTime, Utc};
use events::{EventEnvelope, EventMetadata};
use serde_json::Value;
use sqlx::{
    PgPool, Row as _,
    migrate::Migrator,
    postgres::{PgPoolOptions, PgRow},
};

use crate::{config::PostgresConfig, startup::wait_for};

/// The SQL migrations of `migrations/`, compiled into every binary that needs them.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Connects a pool, waiting up to `timeout` for the server.
pub async fn connect(config: &PostgresConfig, timeout: Duration) -> anyhow::Result<PgPool> {
    let options = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_secs(5));
    let url = config.database_url.expose();
    wait_for("postgres", timeout, || options.clone().connect(url)).await
}

/// Applies every pending migration; safe to run concurrently with itself
/// (sqlx takes an advisory lock) and a no-op when the schema is current.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// `SELECT 1` with a short timeout: the health probe.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    let probe = sqlx::query("SELECT 1").execute(pool);
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// The columns of `events` that [`envelope_from_row`] reads, for SELECT lists.
pub const ENVELOPE_COLUMNS: &str = "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, global_position, recorded_at";

/// A row of the `events` table (selected with [`ENVELOPE_COLUMNS`]) as the
/// envelope every reader of the store (relay, projections, replay) works with.
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
