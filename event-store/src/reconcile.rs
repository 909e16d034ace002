//! What the reconcilers share: reading the store for what must have
//! happened, and a cursor that goes back when the database may have lost
//! commits.
//!
//! Every stage commits, then acknowledges its input. That is exact only while
//! no acknowledged commit is ever lost, which no replicated store promises
//! across a failover (and `synchronous_commit = off` does not promise even
//! without one): a commit is visible to others, and acted on, before it is
//! durable. A reconciler proves the chain after the fact — every admitted
//! request has a decision, every stored event is in the views — and
//! re-drives what is missing through the normal idempotent paths. Its
//! [`Cursor`] notices that the server restarted (another
//! `pg_postmaster_start_time()`: a crash, a restart, a failover to another
//! server) and goes back [`REWIND`] to check again what it had already seen:
//! a lost commit is at most a second or so older than the crash.

use std::{
    collections::{HashSet, VecDeque},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row as _};

/// How far a [`Cursor`] goes back when the server restarted.
pub const REWIND: Duration = Duration::from_secs(60);

/// Notices that the server restarted: `pg_postmaster_start_time()` changed.
#[derive(Debug, Clone, Default)]
pub struct ServerWatch {
    started: Option<DateTime<Utc>>,
}

impl ServerWatch {
    /// Whether `started` differs from the start time seen before (the first
    /// one seen is only recorded).
    pub fn restarted(&mut self, started: DateTime<Utc>) -> bool {
        self.started
            .replace(started)
            .is_some_and(|previous| previous != started)
    }
}

/// A reconciler's position (a global position, or a stream sequence) with
/// the history it needs to go back [`REWIND`] after a server restart.
#[derive(Debug, Clone)]
pub struct Cursor {
    position: i64,
    /// (when, position) samples, oldest first; the first is the newest one
    /// at least `window` old (or the oldest there is).
    history: VecDeque<(Instant, i64)>,
    server: ServerWatch,
    window: Duration,
}

impl Cursor {
    pub fn new(position: i64, now: Instant) -> Self {
        Self::with_window(position, now, REWIND)
    }

    pub fn with_window(position: i64, now: Instant, window: Duration) -> Self {
        Self {
            position,
            history: VecDeque::from([(now, position)]),
            server: ServerWatch::default(),
            window,
        }
    }

    pub fn position(&self) -> i64 {
        self.position
    }

    /// Everything up to `position` has been checked.
    pub fn advance(&mut self, position: i64, now: Instant) {
        if position <= self.position {
            return;
        }
        self.position = position;
        self.history.push_back((now, position));
        while self
            .history
            .get(1)
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.window)
        {
            self.history.pop_front();
        }
    }

    /// Tells the cursor when the server last started. The first call only
    /// records it; a different time later means the server restarted, and
    /// the cursor goes back to where it stood `window` ago (returning the
    /// position it left, `None` if nothing changed).
    pub fn observe_server(&mut self, started: DateTime<Utc>, now: Instant) -> Option<i64> {
        if !self.server.restarted(started) {
            return None;
        }
        let left = self.position;
        let back = self.history.front().map_or(self.position, |(_, p)| *p).min(left);
        self.position = back;
        self.history = VecDeque::from([(now, back)]);
        Some(left)
    }
}

/// When the server last started: a change means it restarted (or another
/// server took over), and commits acknowledged just before may be gone.
pub async fn server_started<'c>(db: impl PgExecutor<'c>) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_postmaster_start_time()")
        .fetch_one(db)
        .await
}

/// The highest global position below which every transaction has finished:
/// no event can appear at or below it any more (except by a lost commit,
/// which the cursor's rewind covers).
pub async fn final_position<'c>(db: impl PgExecutor<'c>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(
            (SELECT min(global_position) - 1 FROM events WHERE tx_id >= pg_snapshot_xmin(pg_current_snapshot())),
            (SELECT max(global_position) FROM events),
            0)",
    )
    .fetch_one(db)
    .await
}

/// The last event of one aggregate within a page of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
}

/// The aggregates with events in `(after, upto]` (global positions, at most
/// `limit` events read), each with its highest sequence there, and the
/// position the page ended at.
pub async fn heads<'c>(
    db: impl PgExecutor<'c>,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<(Vec<Head>, i64), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, max(sequence) AS sequence, max(global_position) AS position
           FROM (SELECT aggregate_type, aggregate_id, sequence, global_position FROM events
                  WHERE global_position > $1 AND global_position <= $2
                  ORDER BY global_position LIMIT $3) page
          GROUP BY aggregate_type, aggregate_id",
    )
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let mut end = after;
    let mut heads = Vec::with_capacity(rows.len());
    for row in &rows {
        end = end.max(row.try_get::<i64, _>("position")?);
        heads.push(Head {
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get::<i64, _>("sequence")?.unsigned_abs(),
        });
    }
    Ok((heads, end))
}

/// Which of `ids` have at least one event as aggregates of `aggregate_type`.
pub async fn existing<'c>(
    db: impl PgExecutor<'c>,
    aggregate_type: &str,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND sequence = 1",
    )
    .bind(aggregate_type)
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(found.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn the_first_server_start_seen_is_only_recorded() {
        let start = Instant::now();
        let mut cursor = Cursor::new(10, start);
        assert_eq!(cursor.observe_server(Utc::now(), start), None);
        cursor.advance(50, at(start, 1));
        assert_eq!(cursor.position(), 50);
    }

    #[test]
    fn a_restart_goes_back_to_where_the_cursor_stood_a_window_ago() {
        let start = Instant::now();
        let booted = Utc::now();
        let mut cursor = Cursor::with_window(0, start, Duration::from_secs(60));
        cursor.observe_server(booted, start);
        for second in 1..=100 {
            cursor.advance(second * 10, at(start, second.unsigned_abs()));
        }
        assert_eq!(cursor.observe_server(booted, at(start, 100)), None, "same server");
        let restarted = booted + chrono::Duration::seconds(100);
        assert_eq!(cursor.observe_server(restarted, at(start, 100)), Some(1_000));
        // 60 s before second 100: the sample of second 40
        assert_eq!(cursor.position(), 400);
    }

    #[test]
    fn a_restart_early_on_goes_back_to_the_start() {
        let start = Instant::now();
        let booted = Utc::now();
        let mut cursor = Cursor::with_window(7, start, Duration::from_secs(60));
        cursor.observe_server(booted, start);
        cursor.advance(20, at(start, 5));
        assert_eq!(
            cursor.observe_server(booted + chrono::Duration::seconds(5), at(start, 6)),
            Some(20)
        );
        assert_eq!(cursor.position(), 7);
    }

    #[test]
    fn a_cursor_never_moves_back_by_advancing() {
        let start = Instant::now();
        let mut cursor = Cursor::new(30, start);
        cursor.advance(20, at(start, 1));
        assert_eq!(cursor.position(), 30);
    }
}
