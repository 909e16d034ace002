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

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use events::EventMetadata;
use sqlx::{PgExecutor, PgPool};

use crate::{
    bus::{CommandError, Commands},
    domain::{Order, OrderCommand, SharedClock},
};

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
            let due: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT order_id, due_at FROM order_deadlines WHERE due_at <= $1
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
                    for (order_id, due_at) in chunk {
                        outcomes.push((order_id, *due_at, self.time_out(order_id, *due_at).await));
                    }
                    outcomes
                }))
                .await;
            let now = self.clock.now();
            for (order_id, due_at, outcome) in outcomes.into_iter().flatten() {
                let lateness = (now - due_at).num_milliseconds().max(0) as f64 / 1000.0;
                match outcome {
                    Ok(()) => {
                        metrics::histogram!("order_timeout_lateness_seconds").record(lateness);
                        unschedule(&mut *tx, order_id).await?;
                        fired += 1;
                    }
                    Err(error) => {
                        // kept, retried on the next round; visible for people
                        tracing::warn!(%order_id, %error, "order timeout failed; will retry");
                        sqlx::query(
                            "UPDATE order_deadlines SET attempts = attempts + 1, last_error = $2 WHERE order_id = $1",
                        )
                        .bind(order_id)
                        .bind(error)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            tx.commit().await?;
            metrics::counter!("order_timeouts_fired_total").increment(fired as u64);
        }
    }

    async fn time_out(&self, order_id: &str, deadline: DateTime<Utc>) -> Result<(), String> {
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
            Err(error) => Err(error.to_string()),
        }
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
