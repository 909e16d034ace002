//! Durable payment timeouts: the `order_deadlines` table and its poller.
//!
//! A deadline is scheduled when an order is placed and removed when it no
//! longer awaits payment. The poller claims due rows with `FOR UPDATE SKIP
//! LOCKED` (any number of command processes can poll), sends each order
//! `TimeOut` — a no-op unless the order still awaits payment, so a payment
//! racing the timeout wins or loses exactly once in the aggregate — and
//! deletes the row in the same transaction as the claim. A crash between the
//! command and the commit fires the deadline again: the second `TimeOut` is
//! a no-op. After an outage, overdue rows fire at once.
//!
//! A `TimeOut` that fails is sorted like every consumer's failure: a passing
//! one (the store away, a conflict) is retried with exponential backoff
//! (`retry_at`, up to [`MAX_ATTEMPTS`] attempts); one that can never succeed
//! (the aggregate refuses, a stored event does not decode) and one that
//! failed too often are set aside at once (`dead_lettered_at`, with
//! `last_error`, counted in `order_timeouts_dead_lettered_total`), so
//! nothing is retried forever and a failing row never holds up the others.

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use events::EventMetadata;
use sqlx::{PgExecutor, PgPool};

use crate::{
    bus::{CommandError, Commands},
    domain::{Order, OrderCommand, SharedClock},
};

/// Attempts at a deadline failing for a passing reason before it is set aside.
pub const MAX_ATTEMPTS: i32 = 20;
/// The longest wait between two attempts at a failing deadline.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Why one deadline did not fire.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Failure {
    message: String,
    /// No retry can help.
    permanent: bool,
}

#[derive(Debug, Clone)]
pub struct TimeoutConfig {
    /// How often the table is polled when nothing is due sooner.
    pub poll: Duration,
    /// Deadlines claimed per transaction.
    pub batch: i64,
    /// Orders timed out concurrently within a batch.
    pub concurrency: usize,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            batch: 500,
            concurrency: 16,
        }
    }
}

/// Schedules (or keeps) the order's deadline; idempotent.
pub async fn schedule(db: impl PgExecutor<'_>, order_id: &str, due_at: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO order_deadlines (order_id, due_at) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING")
        .bind(order_id)
        .bind(due_at)
        .execute(db)
        .await?;
    Ok(())
}

/// Holds the deadlines of many orders in one statement (the reactor's batch
/// of placements); idempotent like [`schedule`].
pub async fn schedule_many(db: impl PgExecutor<'_>, deadlines: &[(String, DateTime<Utc>)]) -> Result<(), sqlx::Error> {
    if deadlines.is_empty() {
        return Ok(());
    }
    let (ids, due): (Vec<&str>, Vec<DateTime<Utc>>) = deadlines.iter().map(|(id, at)| (id.as_str(), *at)).unzip();
    sqlx::query(
        "INSERT INTO order_deadlines (order_id, due_at)
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[])
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(ids)
    .bind(due)
    .execute(db)
    .await?;
    Ok(())
}

/// Forgets the order's deadline (paid, cancelled or rejected); idempotent.
pub async fn unschedule(db: impl PgExecutor<'_>, order_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM order_deadlines WHERE order_id = $1")
        .bind(order_id)
        .execute(db)
        .await?;
    Ok(())
}

#[derive(Clone)]
pub struct TimeoutPoller {
    pool: PgPool,
    orders: Arc<Commands<Order>>,
    clock: SharedClock,
    config: TimeoutConfig,
}

impl std::fmt::Debug for TimeoutPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeoutPoller")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TimeoutPoller {
    pub fn new(pool: PgPool, orders: Arc<Commands<Order>>, clock: SharedClock, config: TimeoutConfig) -> Self {
        Self {
            pool,
            orders,
            clock,
            config,
        }
    }

    /// Fires every due deadline (a batch at a time); returns how many fired.
    pub async fn fire_due(&self) -> Result<usize, sqlx::Error> {
        let mut fired = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let due: Vec<(String, DateTime<Utc>, i32)> = sqlx::query_as(
                "SELECT order_id, due_at, attempts FROM order_deadlines
                  WHERE due_at <= $1 AND dead_lettered_at IS NULL AND (retry_at IS NULL OR retry_at <= $1)
                  ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .bind(self.clock.now())
            .bind(self.config.batch)
            .fetch_all(&mut *tx)
            .await?;
            if due.is_empty() {
                tx.rollback().await?;
                return Ok(fired);
            }
            let outcomes =
                futures::future::join_all(due.chunks(self.config.concurrency.max(1)).map(|chunk| async move {
                    let mut outcomes = Vec::with_capacity(chunk.len());
                    for (order_id, due_at, attempts) in chunk {
                        outcomes.push((order_id, *due_at, *attempts, self.time_out(order_id, *due_at).await));
                    }
                    outcomes
                }))
                .await;
            let now = self.clock.now();
            for (order_id, due_at, attempts, outcome) in outcomes.into_iter().flatten() {
                let lateness = (now - due_at).num_milliseconds().max(0) as f64 / 1000.0;
                match outcome {
                    Ok(()) => {
                        metrics::histogram!("order_timeout_lateness_seconds").record(lateness);
                        unschedule(&mut *tx, order_id).await?;
                        fired += 1;
                    }
                    Err(failure) => {
                        let attempts = attempts.saturating_add(1);
                        let (retry_at, dead_lettered_at) = if failure.permanent || attempts >= MAX_ATTEMPTS {
                            tracing::error!(
                                %order_id, error = %failure, attempts, permanent = failure.permanent,
                                "order timeout can not fire; set aside in order_deadlines"
                            );
                            metrics::counter!("order_timeouts_dead_lettered_total").increment(1);
                            (None, Some(now))
                        } else {
                            let delay = retry_delay(attempts);
                            tracing::warn!(
                                %order_id, error = %failure, attempts, retry_in_ms = delay.as_millis() as u64,
                                "order timeout failed; will retry"
                            );
                            (
                                Some(now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)),
                                None,
                            )
                        };
                        sqlx::query(
                            "UPDATE order_deadlines SET attempts = $2, last_error = $3, retry_at = $4,
                                    dead_lettered_at = $5
                              WHERE order_id = $1",
                        )
                        .bind(order_id)
                        .bind(attempts)
                        .bind(failure.message)
                        .bind(retry_at)
                        .bind(dead_lettered_at)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            tx.commit().await?;
            metrics::counter!("order_timeouts_fired_total").increment(fired as u64);
        }
    }

    async fn time_out(&self, order_id: &str, deadline: DateTime<Utc>) -> Result<(), Failure> {
        let at = self.clock.now();
        let result = self
            .orders
            .execute(
                order_id,
                || OrderCommand::TimeOut { deadline, at },
                &EventMetadata::system("order-timeouts"),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // an order that does not exist has nothing to time out
            Err(CommandError::Domain(crate::domain::order::OrderError::NotFound)) => Ok(()),
            Err(error) => {
                let permanent = match &error {
                    CommandError::Domain(_) => true,
                    CommandError::Conflict { .. } => false,
                    CommandError::Store(store) => store.is_permanent(),
                };
                Err(Failure {
                    message: error.to_string(),
                    permanent,
                })
            }
        }
    }

    /// Deadlines set aside because they can never fire (for people to look at).
    pub async fn dead_lettered(&self) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT order_id, coalesce(last_error, '') FROM order_deadlines
              WHERE dead_lettered_at IS NOT NULL ORDER BY dead_lettered_at",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Polls until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        loop {
            if let Err(error) = self.fire_due().await {
                tracing::warn!(%error, "order timeouts: polling failed");
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }
}

/// A deadline set aside because it could not fire (`dead_lettered_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineLetter {
    pub order_id: String,
    pub due_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: String,
    pub dead_lettered_at: DateTime<Utc>,
}

/// A row of a set-aside deadline: order id, due at, attempts, last error, set aside at.
type DeadlineRow = (String, DateTime<Utc>, i32, String, DateTime<Utc>);

/// The set-aside deadlines (read by the `citypicks-dlq` CLI), oldest first,
/// set aside at or after `since`.
pub async fn dead_letters(pool: &PgPool, since: Option<DateTime<Utc>>) -> Result<Vec<DeadlineLetter>, sqlx::Error> {
    let rows: Vec<DeadlineRow> = sqlx::query_as(
        "SELECT order_id, due_at, attempts, coalesce(last_error, ''), dead_lettered_at FROM order_deadlines
          WHERE dead_lettered_at IS NOT NULL AND ($1::timestamptz IS NULL OR dead_lettered_at >= $1)
          ORDER BY dead_lettered_at, order_id",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(letter).collect())
}

/// One set-aside deadline.
pub async fn dead_letter(pool: &PgPool, order_id: &str) -> Result<Option<DeadlineLetter>, sqlx::Error> {
    let row: Option<DeadlineRow> = sqlx::query_as(
        "SELECT order_id, due_at, attempts, coalesce(last_error, ''), dead_lettered_at FROM order_deadlines
          WHERE order_id = $1 AND dead_lettered_at IS NOT NULL",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(letter))
}

fn letter(row: DeadlineRow) -> DeadlineLetter {
    let (order_id, due_at, attempts, last_error, dead_lettered_at) = row;
    DeadlineLetter {
        order_id,
        due_at,
        attempts,
        last_error,
        dead_lettered_at,
    }
}

/// Puts a set-aside deadline back in line with fresh attempts: the poller
/// fires it at its next look (its due time has passed). False when it is
/// not set aside (fired, re-driven meanwhile, or unknown).
pub async fn redrive_dead_letter(pool: &PgPool, order_id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE order_deadlines SET dead_lettered_at = NULL, retry_at = NULL, attempts = 0
          WHERE order_id = $1 AND dead_lettered_at IS NOT NULL",
    )
    .bind(order_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Where a re-driven deadline is: gone (it fired), set aside again (with
/// its error), or still waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadlineState {
    Fired,
    SetAside(String),
    Waiting,
}

pub async fn deadline_state(pool: &PgPool, order_id: &str) -> Result<DeadlineState, sqlx::Error> {
    let row: Option<(Option<DateTime<Utc>>, String)> =
        sqlx::query_as("SELECT dead_lettered_at, coalesce(last_error, '') FROM order_deadlines WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    Ok(match row {
        None => DeadlineState::Fired,
        Some((Some(_), error)) => DeadlineState::SetAside(error),
        Some((None, _)) => DeadlineState::Waiting,
    })
}

/// Exponential backoff for the `attempts`-th failure: 1 s, 2 s, 4 s, … up to a minute.
fn retry_delay(attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_RETRY_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_a_minute() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
        assert_eq!(retry_delay(7), Duration::from_secs(60));
        assert_eq!(retry_delay(MAX_ATTEMPTS), Duration::from_secs(60));
    }
}
