//! `dead_letter_actions`, the audit of what operators did (this crate owns
//! the table): one row per re-drive or drop, never changed afterwards. An
//! entry's state is its latest row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row as _};

use crate::id::Source;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Redrive,
    Drop,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Re-driven and processed.
    Redriven,
    /// Re-driven and refused again.
    FailedAgain,
    /// Re-driven; its processing was not seen within the wait.
    Unconfirmed,
    Dropped,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Redriven => "redriven",
            Self::FailedAgain => "failed_again",
            Self::Unconfirmed => "unconfirmed",
            Self::Dropped => "dropped",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Redriven, Self::FailedAgain, Self::Unconfirmed, Self::Dropped]
            .into_iter()
            .find(|o| o.name() == text)
    }
}

/// One audit row.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub action: Action,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub operator: String,
    pub recorded_at: DateTime<Utc>,
}

fn record(row: &sqlx::postgres::PgRow) -> Result<Record, sqlx::Error> {
    let action: String = row.try_get("action")?;
    let outcome: String = row.try_get("outcome")?;
    Ok(Record {
        action: if action == "drop" {
            Action::Drop
        } else {
            Action::Redrive
        },
        outcome: Outcome::parse(&outcome).ok_or_else(|| sqlx::Error::Decode(format!("outcome {outcome:?}").into()))?,
        reason: row.try_get("reason")?,
        detail: row.try_get("detail")?,
        operator: row.try_get("operator")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// The latest record of each of `ids` that has one.
pub async fn latest(pool: &PgPool, ids: &[String]) -> Result<HashMap<String, Record>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (entry_id) entry_id, action, outcome, reason, detail, operator, recorded_at
           FROM dead_letter_actions WHERE entry_id = ANY($1) ORDER BY entry_id, id DESC",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get::<String, _>("entry_id")?, record(row)?)))
        .collect()
}

/// Every record of one entry, oldest first.
pub async fn history(pool: &PgPool, id: &str) -> Result<Vec<Record>, sqlx::Error> {
    sqlx::query(
        "SELECT action, outcome, reason, detail, operator, recorded_at
           FROM dead_letter_actions WHERE entry_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?
    .iter()
    .map(record)
    .collect()
}

/// The snapshot the latest record of `id` kept, if any.
pub async fn snapshot(pool: &PgPool, id: &str) -> Result<Option<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar("SELECT entry FROM dead_letter_actions WHERE entry_id = $1 ORDER BY id DESC LIMIT 1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The latest record and snapshot of every entry of `sources` acted on at
/// or after `since` and not among `present` (the entries still where they
/// were parked): what a re-drive took away (an edge entry, a fired deadline).
pub async fn gone(
    pool: &PgPool,
    sources: &[Source],
    present: &[String],
    since: Option<DateTime<Utc>>,
) -> Result<Vec<(String, Record, serde_json::Value)>, sqlx::Error> {
    let sources: Vec<&str> = sources.iter().map(|s| s.name()).collect();
    let rows = sqlx::query(
        "SELECT * FROM (
             SELECT DISTINCT ON (entry_id) entry_id, action, outcome, reason, detail, operator, recorded_at, entry
               FROM dead_letter_actions WHERE source = ANY($1) ORDER BY entry_id, id DESC
         ) latest
          WHERE NOT (entry_id = ANY($2)) AND ($3::timestamptz IS NULL OR recorded_at >= $3)",
    )
    .bind(&sources)
    .bind(present)
    .bind(since)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("entry_id")?, record(row)?, row.try_get("entry")?)))
        .collect()
}

/// Serializes work on one entry across operators until the transaction ends,
/// and returns its latest record as seen under that lock.
pub async fn lock(conn: &mut PgConnection, id: &str) -> Result<Option<Record>, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('dead-letter:' || $1, 0))")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "SELECT action, outcome, reason, detail, operator, recorded_at
           FROM dead_letter_actions WHERE entry_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .as_ref()
    .map(record)
    .transpose()
}

/// What one action writes.
pub struct NewRecord<'a> {
    pub id: &'a str,
    pub source: Source,
    pub action: Action,
    pub outcome: Outcome,
    pub reason: Option<&'a str>,
    pub detail: Option<&'a str>,
    pub operator: &'a str,
    pub entry: &'a serde_json::Value,
}

pub async fn write(conn: &mut PgConnection, new: &NewRecord<'_>) -> Result<(), sqlx::Error> {
    let clip = |text: Option<&str>, max: usize| text.map(|t| t.chars().take(max).collect::<String>());
    sqlx::query(
        "INSERT INTO dead_letter_actions (entry_id, source, action, outcome, reason, detail, operator, entry)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new.id)
    .bind(new.source.name())
    .bind(match new.action {
        Action::Redrive => "redrive",
        Action::Drop => "drop",
    })
    .bind(new.outcome.name())
    .bind(clip(new.reason, 2_000))
    .bind(clip(new.detail, 4_000))
    .bind(new.operator.chars().take(200).collect::<String>())
    .bind(new.entry)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
