//! The outbox relay: every committed event onto JetStream, in commit order,
//! nothing lost, nothing duplicated.
//!
//! - **Which rows**: only those of finished transactions,
//!   `tx_id < pg_snapshot_xmin(pg_current_snapshot())`, read in
//!   `(tx_id, global_position)` order after the stored cursor. Every
//!   transaction below the snapshot's xmin has ended, so that set can no
//!   longer grow; a transaction that drew a lower `global_position` but
//!   commits later sorts after the cursor and is published, never skipped
//!   (docs/EVENTS.md). No wall-clock gap skipping.
//! - **Publishing**: `Nats-Msg-Id` = the event's stable id, its `traceparent`,
//!   pipelined within the publisher's window, every ack awaited. After a
//!   full batch the next one is read while this one is published (used only
//!   once this one is wholly out), so reading and publishing overlap.
//! - **Durable first**: before a batch is published, a synchronous commit of
//!   the relay's own flushes the WAL past every commit the batch came from
//!   ([`make_durable`]): nothing reaches JetStream that a crash of Postgres
//!   with `synchronous_commit = off` can take back.
//! - **Cursor**: stored only after the acks, and only forwards. A crash between
//!   publish and cursor write re-publishes the batch; JetStream drops the
//!   duplicates by id.
//! - **Waking**: `LISTEN events_appended` (one `NOTIFY` per insert statement)
//!   or a poll every `poll_interval` (≤ 50 ms), whichever comes first.
//!   Writers notify only while the relay sleeps (`relay_wakeup.listening`),
//!   because a notifying transaction serializes every commit behind it
//!   (see the migration `notify_only_a_sleeping_relay`).
//! - **One active relay**: a session advisory lock on a dedicated connection.
//!   Standbys retry the lock; when the active relay's process dies its session
//!   ends and a standby takes over from the stored cursor. Every read and
//!   cursor write goes through the lock's connection, so a relay that lost its
//!   session stops instead of publishing beside the new one.

use std::{future::Future, pin::pin, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use cp_nats::{Outgoing, Publisher};
use events::{
    EventEnvelope, Namespace,
    subjects::{
        HDR_AGGREGATE_ID, HDR_AGGREGATE_TYPE, HDR_CORRELATION_ID, HDR_EVENT_TYPE, HDR_EVENT_VERSION,
        HDR_GLOBAL_POSITION, HDR_SEQUENCE,
    },
};
use platform::telemetry::TraceHeaders;
use sqlx::{PgConnection, PgPool, Row as _, postgres::PgListener};
use tokio::time::{Instant, sleep};

/// Advisory lock key of the relay ("cprelay1" as bytes).
pub const RELAY_LOCK_KEY: i64 = 0x6370_7265_6c61_7931;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Cursor row name; one per relay deployment.
    pub name: String,
    pub batch_size: i64,
    pub poll_interval: Duration,
    /// How often a standby retries the lock.
    pub standby_retry: Duration,
    pub lock_key: i64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            name: "main".to_owned(),
            batch_size: 2_000,
            poll_interval: Duration::from_millis(50),
            standby_retry: Duration::from_millis(500),
            lock_key: RELAY_LOCK_KEY,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publish: {0}")]
    Publish(#[from] cp_nats::PublishFailure),
    #[error("encode an envelope: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The message the relay publishes for a stored event: the envelope as JSON,
/// its event id as `Nats-Msg-Id` (JetStream's dedup), its trace context, and
/// the headers consumers route and order by.
pub fn event_message(namespace: &Namespace, envelope: &EventEnvelope) -> Result<Outgoing, serde_json::Error> {
    let trace = TraceHeaders {
        traceparent: envelope.metadata.traceparent.clone(),
        tracestate: envelope.metadata.tracestate.clone(),
    };
    Ok(Outgoing::new(
        namespace.events_subject(&envelope.aggregate_type),
        envelope.event_id.to_string(),
        Bytes::from(serde_json::to_vec(envelope)?),
    )
    .trace(&trace)
    .header(HDR_EVENT_TYPE, &envelope.event_type)
    .header(HDR_EVENT_VERSION, &envelope.event_version)
    .header(HDR_AGGREGATE_TYPE, &envelope.aggregate_type)
    .header(HDR_AGGREGATE_ID, &envelope.aggregate_id)
    .header(HDR_SEQUENCE, envelope.sequence.to_string())
    .header(HDR_GLOBAL_POSITION, envelope.global_position.to_string())
    .header(HDR_CORRELATION_ID, envelope.metadata.correlation_id.to_string()))
}

/// Where the relay got to: the last published `(tx_id, global_position)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub tx_id: u64,
    pub position: i64,
}

#[derive(Debug)]
pub struct Relay {
    pool: PgPool,
    publisher: Publisher,
    namespace: Namespace,
    config: RelayConfig,
}

struct Row {
    cursor: Cursor,
    recorded_at: DateTime<Utc>,
    message: Outgoing,
}

impl Relay {
    pub fn new(pool: PgPool, publisher: Publisher, namespace: Namespace, config: RelayConfig) -> Self {
        Self {
            pool,
            publisher,
            namespace,
            config,
        }
    }

    /// Runs until `shutdown` resolves: standby until it holds the lock, then active.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        loop {
            let outcome = tokio::select! {
                () = &mut shutdown => return,
                outcome = self.session() => outcome,
            };
            metrics::gauge!("relay_active").set(0.0);
            match outcome {
                Ok(()) => sleep(self.config.standby_retry).await,
                Err(error) => {
                    tracing::warn!(%error, "relay session ended; retrying");
                    sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One database session: returns Ok(()) when another relay holds the lock.
    async fn session(&self) -> Result<(), RelayError> {
        let Some(mut conn) = crate::leader::lead(&self.pool, self.config.lock_key).await? else {
            return Ok(());
        };
        tracing::info!(relay = %self.config.name, "relay is active");
        // this session's commits are durable (and on synchronous standbys)
        // before they return, whatever the writers' setting: see make_durable
        sqlx::query("SET synchronous_commit = on").execute(&mut conn).await?;
        metrics::gauge!("relay_active").set(1.0);
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("events_appended").await?;
        sqlx::query("INSERT INTO relay_cursor (relay_name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(&self.config.name)
            .execute(&mut conn)
            .await?;
        let row = sqlx::query("SELECT last_tx_id::text AS tx, last_position FROM relay_cursor WHERE relay_name = $1")
            .bind(&self.config.name)
            .fetch_one(&mut conn)
            .await?;
        let mut cursor = Cursor {
            tx_id: parse_xid(row.try_get("tx")?),
            position: row.try_get("last_position")?,
        };
        // the next batch, read while the current one was being published
        let mut prefetched: Option<Vec<Row>> = None;
        loop {
            let mut rows = match prefetched.take() {
                Some(rows) => rows,
                None => self.fetch(&mut conn, cursor).await?,
            };
            if rows.is_empty() {
                metrics::gauge!("relay_lag_events").set(0.0);
                metrics::gauge!("relay_lag_seconds").set(0.0);
                // Ask writers to notify, then look once more: a row committed
                // before they could see the flag would otherwise wait a poll.
                set_listening(&mut conn, true).await?;
                rows = self.fetch(&mut conn, cursor).await?;
                if rows.is_empty() {
                    // The poll covers a notification missed around the flip
                    // or while the listener reconnects.
                    let _ = tokio::time::timeout(self.config.poll_interval, listener.try_recv()).await;
                }
                set_listening(&mut conn, false).await?;
                if rows.is_empty() {
                    continue;
                }
            }
            make_durable(&mut conn, &self.config.name).await?;
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= self.config.batch_size;
            metrics::gauge!("relay_lag_seconds")
                .set((Utc::now() - rows[0].recorded_at).num_milliseconds().max(0) as f64 / 1000.0);
            // A full batch means more is waiting: read the next one (after
            // this batch's last row) on the leader connection while this one
            // is published, so reading and publishing overlap. It is used
            // only if this whole batch was published.
            let (published, next) = if full {
                let after = rows.last().map_or(cursor, |row| row.cursor);
                let (published, next) = tokio::join!(self.publish(rows), self.fetch(&mut conn, after));
                (published, Some(next))
            } else {
                (self.publish(rows).await, None)
            };
            let (advanced, failure) = match published {
                Ok(last) => (last, None),
                Err((last, error)) => (last, Some(error)),
            };
            if let Some(last) = advanced
                && last > cursor
            {
                cursor = last;
                store_cursor(&mut conn, &self.config.name, cursor).await?;
            }
            if let Some(error) = failure {
                return Err(error);
            }
            // the whole batch is out and its cursor stored
            if let Some(next) = next {
                prefetched = Some(next?);
            }
            if full {
                let head: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM events")
                    .fetch_one(&mut conn)
                    .await?;
                metrics::gauge!("relay_lag_events")
                    .set(head.unwrap_or(0).saturating_sub(cursor.position).max(0) as f64);
            }
        }
    }

    async fn fetch(&self, conn: &mut PgConnection, after: Cursor) -> Result<Vec<Row>, RelayError> {
        let rows = sqlx::query(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                    global_position, recorded_at, tx_id::text AS tx
               FROM events
              WHERE (tx_id, global_position) > ($1::text::xid8, $2)
                AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY tx_id, global_position
              LIMIT $3",
        )
        .bind(after.tx_id.to_string())
        .bind(after.position)
        .bind(self.config.batch_size)
        .fetch_all(conn)
        .await?;
        rows.iter().map(|row| self.to_message(row)).collect()
    }

    fn to_message(&self, row: &sqlx::postgres::PgRow) -> Result<Row, RelayError> {
        let envelope = crate::read::envelope_from_row(row)?;
        let (global_position, recorded_at) = (envelope.global_position, envelope.recorded_at);
        // an envelope that cannot be encoded stops the relay here (retried,
        // logged) rather than going out with an empty body
        let message = event_message(&self.namespace, &envelope)?;
        let tx: String = row.try_get("tx")?;
        Ok(Row {
            cursor: Cursor {
                tx_id: parse_xid(tx),
                position: global_position,
            },
            recorded_at,
            message,
        })
    }

    /// Publishes in order; returns the cursor of the last acknowledged row.
    async fn publish(&self, rows: Vec<Row>) -> Result<Option<Cursor>, (Option<Cursor>, RelayError)> {
        let started = Instant::now();
        let cursors: Vec<(Cursor, DateTime<Utc>)> = rows.iter().map(|r| (r.cursor, r.recorded_at)).collect();
        // joined to the traces of the events' commands (their metadata)
        let span = if platform::telemetry::exporting() {
            let parents: Vec<_> = rows
                .iter()
                .map(|r| platform::telemetry::extract_nats(&r.message.headers))
                .collect();
            platform::telemetry::batch_span(&parents, || {
                tracing::info_span!(
                    "relay_batch",
                    otel.name = "relay_batch",
                    otel.kind = "producer",
                    events = rows.len()
                )
            })
        } else {
            tracing::Span::none()
        };
        let result =
            tracing::Instrument::instrument(self.publisher.publish_all(rows.into_iter().map(|r| r.message)), span)
                .await;
        let acked = match &result {
            Ok(acks) => acks.len(),
            Err(failure) => failure.index,
        };
        let now = Utc::now();
        for (_, recorded_at) in &cursors[..acked] {
            metrics::histogram!("relay_commit_to_ack_seconds")
                .record((now - *recorded_at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
        }
        metrics::counter!("relay_published_total").increment(acked as u64);
        metrics::histogram!("relay_batch_seconds").record(started.elapsed().as_secs_f64());
        let last = acked.checked_sub(1).map(|i| cursors[i].0);
        match result {
            Ok(_) => Ok(last),
            Err(failure) => Err((last, failure.into())),
        }
    }
}

/// Whether the relay `name` has published every event of a finished
/// transaction (nothing waits behind its cursor): a reader that finds a view
/// behind the store can tell "not published yet" from "published and lost".
pub async fn caught_up(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM relay_cursor c WHERE c.relay_name = $1 AND NOT EXISTS (
             SELECT 1 FROM events e
              WHERE (e.tx_id, e.global_position) > (c.last_tx_id, c.last_position)
                AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())))",
    )
    .bind(name)
    .fetch_one(pool)
    .await
}

/// Makes every commit a batch came from durable before the batch leaves.
///
/// With `synchronous_commit = off` a commit is visible (and read here)
/// before its WAL is flushed, and a failover to a lagging replica loses
/// commits that were flushed only locally. An event published from such a
/// commit and then lost from the store would be a phantom: consumers act on
/// it, and its aggregate's sequence is later reused for another event with
/// the same id, which JetStream's dedupe then drops (measured by the fault
/// suite: an order view left at the phantom's content). A commit of this
/// session, with `synchronous_commit = on`, flushes the WAL up to its own
/// record (and waits for synchronous standbys, if any), which follows the
/// commit record of every row the batch read.
async fn make_durable(conn: &mut PgConnection, name: &str) -> Result<(), RelayError> {
    let started = Instant::now();
    sqlx::query("UPDATE relay_cursor SET updated_at = now() WHERE relay_name = $1")
        .bind(name)
        .execute(conn)
        .await?;
    metrics::histogram!("relay_durable_wait_seconds").record(started.elapsed().as_secs_f64());
    Ok(())
}

async fn set_listening(conn: &mut PgConnection, listening: bool) -> Result<(), RelayError> {
    sqlx::query(
        "INSERT INTO relay_wakeup (singleton, listening) VALUES (true, $1)
         ON CONFLICT (singleton) DO UPDATE SET listening = EXCLUDED.listening",
    )
    .bind(listening)
    .execute(conn)
    .await?;
    Ok(())
}

async fn store_cursor(conn: &mut PgConnection, name: &str, cursor: Cursor) -> Result<(), RelayError> {
    // Only forwards: a relay that lost its lock late cannot move it back.
    sqlx::query(
        "UPDATE relay_cursor SET last_tx_id = $2::text::xid8, last_position = $3, updated_at = now()
          WHERE relay_name = $1 AND (last_tx_id, last_position) < ($2::text::xid8, $3)",
    )
    .bind(name)
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .execute(conn)
    .await?;
    Ok(())
}

fn parse_xid(text: String) -> u64 {
    text.parse().unwrap_or(0)
}
