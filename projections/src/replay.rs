//! Rebuilding a view from the event store while the live one keeps serving.
//!
//! 1. A shadow table `<view>_shadow` (same columns, only the primary key
//!    while filling) is filled by reading the projection's events in
//!    `global_position` order, a page at a time (never all in memory),
//!    through the same projector as the daemon. A second connection reads
//!    the next page while the current one is applied; a full document
//!    cache is written by a task on a third connection while the scan goes
//!    on (documents written for the first time with `COPY`).
//! 2. Transactions still open when the scan started may commit events below
//!    the scan's position later; the final catch-up reads them too (every
//!    event of a transaction at or above the start's xmin), and the version
//!    rule makes reading an event twice harmless.
//! 3. The shadow's secondary indexes are built (in two lanes, on
//!    connections of their own). Then the swap runs in one transaction
//!    holding the projection's lock exclusively (every daemon worker holds
//!    it shared in every batch), so the daemon pauses: the catch-up brings
//!    the shadow to everything committed, the tables are renamed, and the
//!    daemon resumes on the new table. Whatever it had applied to the old
//!    table was committed, hence is in the store and in the catch-up;
//!    whatever it applies next goes through the version rule. No event is
//!    lost or applied twice. Readers wait for the rename (ms), never fail.
//!
//! `--dry-run` stops after step 2 and compares the shadow with the live view.

use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgConnection, PgPool, Row as _};

use crate::{
    views::Projector,
    writer::{Documents, Step, Writes, dead_letter, record_dead_letters},
};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("another replay of {0} is running")]
    Busy(&'static str),
    #[error("a reader or writer task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("a cache write was started while another was under way")]
    WriterBusy,
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Events per page read from the store.
    pub batch: usize,
    pub dry_run: bool,
    /// Documents held in memory between pages; above it, they are written
    /// and the written ones forgotten (read back when a later event needs
    /// them).
    pub document_cache: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            batch: 10_000,
            dry_run: false,
            document_cache: 50_000,
        }
    }
}

/// How the rebuilt view differs from the live one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Differences {
    /// Documents the replay has and the live view does not.
    pub missing_live: u64,
    /// Documents the live view has and the replay does not.
    pub missing_replay: u64,
    /// Documents in both whose content or version differ.
    pub changed: u64,
    /// Up to ten ids of differing documents.
    pub sample: Vec<String>,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.missing_live == 0 && self.missing_replay == 0 && self.changed == 0
    }
}

#[derive(Debug, Clone)]
pub struct ReplayReport {
    pub projection: &'static str,
    pub events: u64,
    pub documents: u64,
    pub dead_letters: u64,
    pub elapsed: Duration,
    /// Set by a dry run.
    pub differences: Option<Differences>,
}

impl ReplayReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report for scripts (`replay --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "projection": self.projection,
            "events": self.events,
            "documents": self.documents,
            "dead_letters": self.dead_letters,
            "elapsed_ms": u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
            "events_per_second": self.events_per_second().round(),
            "swapped": self.differences.is_none(),
            "equal": self.differences.as_ref().map(Differences::is_empty),
            "differences": self.differences,
        })
    }
}

/// Told how far a replay is.
pub trait Progress {
    fn start(&mut self, projection: &str, total: u64);
    fn advance(&mut self, done: u64);
    fn finish(&mut self, report: &ReplayReport);
}

/// Reports nothing (tests, benchmarks).
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self, _: &ReplayReport) {}
}

pub fn shadow_table(table: &str) -> String {
    format!("{table}_shadow")
}

/// Rebuilds `P`'s view from the event store and swaps it in (or, on a dry
/// run, compares it with the live one and drops it).
pub async fn replay<P: Projector>(
    pool: &PgPool,
    options: &ReplayOptions,
    progress: &mut dyn Progress,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let shadow = shadow_table(P::TABLE);
    // A connection of its own, not the pool's: the session lock below goes
    // with it when it closes, however the replay ends.
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("replay:{}", P::NAME))
        .fetch_one(&mut conn)
        .await?;
    if !locked {
        return Err(ReplayError::Busy(P::NAME));
    }
    // "table does not exist, skipping" is not news for an operator
    sqlx::query("SET client_min_messages = warning")
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
        .execute(&mut conn)
        .await?;
    // Only the primary key while filling: secondary indexes (the GIN on
    // `doc` above all) are built once at the end, far cheaper than updated
    // row by row.
    sqlx::query(&format!(
        "CREATE TABLE {shadow} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
        P::TABLE
    ))
    .execute(&mut conn)
    .await?;
    sqlx::query(&format!("ALTER TABLE {shadow} ADD PRIMARY KEY (id)"))
        .execute(&mut conn)
        .await?;
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT indexname, indexdef FROM pg_indexes
          WHERE schemaname = current_schema() AND tablename = $1 AND indexname <> $1 || '_pkey'",
    )
    .bind(P::TABLE)
    .fetch_all(&mut conn)
    .await?;
    // Transactions open now may still commit events below the scan's position.
    let xmin = event_store::read::snapshot_xmin(&mut conn).await?;
    let total = event_store::read::count(&mut conn, P::AGGREGATE_TYPE).await?;
    progress.start(P::NAME, total);

    let mut docs = Documents::<P>::filling(shadow.clone());
    let mut letters = Vec::new();
    let mut cursor = 0i64;
    let mut events = 0u64;
    let page_size = i64::try_from(options.batch.max(1)).unwrap_or(10_000);
    // A second connection reads page N+1 while page N is applied and
    // written on the first: the scan's reads overlap its writes.
    let mut reader = PgConnection::connect_with(&pool.connect_options()).await?;
    let mut writer = BackgroundWriter::Idle(PgConnection::connect_with(&pool.connect_options()).await?);
    let mut page = event_store::read::page(&mut reader, P::AGGREGATE_TYPE, cursor, page_size).await?;
    while let Some(last) = page.last() {
        cursor = last.global_position;
        // the next page is read and decoded on another thread (a task of
        // its own), so decoding rows overlaps applying this page
        let next = tokio::spawn(async move {
            let page = event_store::read::page(&mut reader, P::AGGREGATE_TYPE, cursor, page_size).await;
            (reader, page)
        });
        let applied = apply_envelopes::<P>(&mut conn, &mut docs, &page, &mut letters).await;
        // Documents stay in memory until the cache is full: each is written
        // about once instead of once per page it appears in. A full cache's
        // documents are written by a task on a third connection while the
        // scan goes on; they are forgotten (and read back if needed) only
        // once that write is done.
        let cache = options.document_cache.max(1);
        if docs.len() > cache {
            // far over the cache: wait for the write under way
            let wait = docs.len() > 3 * cache;
            writer.settle(&mut docs, wait).await?;
            if docs.len() > cache && writer.is_idle() {
                writer.start(docs.take_writes()?)?;
            }
        }
        let (returned, next) = next.await?;
        reader = returned;
        events += applied?;
        progress.advance(events);
        page = next?;
    }
    drop(reader);
    writer.settle(&mut docs, true).await?;
    drop(writer);
    docs.flush(&mut conn).await?;

    let differences = if options.dry_run {
        let rest = event_store::read::since(&mut conn, P::AGGREGATE_TYPE, cursor, &xmin).await?;
        events += apply_envelopes::<P>(&mut conn, &mut docs, &rest, &mut letters).await?;
        docs.flush(&mut conn).await?;
        let differences = compare(&mut conn, P::TABLE, &shadow).await?;
        sqlx::query(&format!("DROP TABLE {shadow}")).execute(&mut conn).await?;
        Some(differences)
    } else {
        build_indexes(pool, &indexes, P::TABLE, &shadow).await?;
        let mut tx = conn.begin().await?;
        // pauses the daemon of this projection until the swap commits
        event_store::checkpoint::lock(&mut tx, P::NAME).await?;
        let rest = event_store::read::since(&mut *tx, P::AGGREGATE_TYPE, cursor, &xmin).await?;
        events += apply_envelopes::<P>(&mut tx, &mut docs, &rest, &mut letters).await?;
        docs.flush(&mut tx).await?;
        letters.append(&mut docs.dead_letters);
        record_dead_letters(&mut tx, P::NAME, &letters).await?;
        let old = format!("{}_old", P::TABLE);
        let mut statements = vec![
            format!("ALTER TABLE {} RENAME TO {old}", P::TABLE),
            format!("ALTER TABLE {shadow} RENAME TO {}", P::TABLE),
            format!("DROP TABLE {old}"),
            // the swapped-in table takes the live one's names, so the next replay finds them
            format!(
                "ALTER TABLE {} RENAME CONSTRAINT {shadow}_pkey TO {}_pkey",
                P::TABLE,
                P::TABLE
            ),
        ];
        for (name, _) in &indexes {
            statements.push(format!("ALTER INDEX {name}_rebuilt RENAME TO {name}"));
        }
        for statement in statements {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
        // every cached document of the view is now suspect (sent on commit)
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(platform::pg::VIEW_CHANGES_CHANNEL)
            .bind(platform::pg::ViewChange::whole_table(P::TABLE))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        None
    };
    let documents: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", P::TABLE))
        .fetch_one(&mut conn)
        .await?;
    let report = ReplayReport {
        projection: P::NAME,
        events,
        documents: documents.unsigned_abs(),
        dead_letters: letters.len() as u64,
        elapsed: started.elapsed(),
        differences,
    };
    progress.finish(&report);
    Ok(report)
}

/// Writes a full cache's documents on a connection of its own while the
/// scan goes on.
enum BackgroundWriter {
    Idle(PgConnection),
    Writing(tokio::task::JoinHandle<(PgConnection, Result<usize, sqlx::Error>)>),
    /// Only between taking the connection and handing it back.
    Gone,
}

impl BackgroundWriter {
    /// When the write under way has finished (with `wait`, after waiting
    /// for it), forgets the documents it wrote: they are in the table now.
    /// Does nothing while it is still running and `wait` is false.
    async fn settle<P: Projector>(&mut self, docs: &mut Documents<P>, wait: bool) -> Result<(), ReplayError> {
        if let Self::Writing(task) = self
            && (wait || task.is_finished())
        {
            let Self::Writing(task) = std::mem::replace(self, Self::Gone) else {
                unreachable!("matched above")
            };
            let (conn, written) = task.await?;
            *self = Self::Idle(conn);
            written?;
            docs.forget_clean();
        }
        Ok(())
    }

    fn is_idle(&self) -> bool {
        matches!(self, Self::Idle(_))
    }

    /// Starts writing `writes` on the idle connection; returns at once.
    fn start(&mut self, writes: Writes) -> Result<(), ReplayError> {
        match std::mem::replace(self, Self::Gone) {
            Self::Idle(mut conn) => {
                *self = Self::Writing(tokio::spawn(async move {
                    let written = writes.execute(&mut conn).await;
                    (conn, written)
                }));
                Ok(())
            }
            busy => {
                *self = busy;
                Err(ReplayError::WriterBusy)
            }
        }
    }
}

/// Builds the live table's secondary indexes on the filled shadow table,
/// before the swap (so the daemon's pause is only the catch-up and the
/// renames): in two lanes on connections of their own, the GIN indexes
/// (single-threaded builds, the longest) beside the B-trees, so both cores
/// work. A replay that fails afterwards leaves them with the shadow, which
/// the next replay drops.
async fn build_indexes(
    pool: &PgPool,
    indexes: &[(String, String)],
    live: &str,
    shadow: &str,
) -> Result<(), sqlx::Error> {
    // (name, definition) pairs
    type Lane<'a> = Vec<&'a (String, String)>;
    let (gin, other): (Lane<'_>, Lane<'_>) = indexes
        .iter()
        .partition(|(_, definition)| definition.contains(" USING gin"));
    tokio::try_join!(
        build_lane(pool, &gin, live, shadow),
        build_lane(pool, &other, live, shadow)
    )?;
    Ok(())
}

/// Builds `lane`'s indexes one after another on a connection of its own.
async fn build_lane(pool: &PgPool, lane: &[&(String, String)], live: &str, shadow: &str) -> Result<(), sqlx::Error> {
    if lane.is_empty() {
        return Ok(());
    }
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    for (name, definition) in lane {
        sqlx::query(&rebuilt_index(definition, name, live, shadow))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await
}

/// The live table's index definition, for the shadow table under a name of its own.
fn rebuilt_index(definition: &str, name: &str, live: &str, shadow: &str) -> String {
    definition
        .replacen(&format!("INDEX {name} ON"), &format!("INDEX {name}_rebuilt ON"), 1)
        .replacen(&format!(" {live} USING"), &format!(" {shadow} USING"), 1)
        .replacen(&format!(".{live} USING"), &format!(".{shadow} USING"), 1)
}

/// Applies stored events; returns how many were read.
async fn apply_envelopes<P: Projector>(
    conn: &mut PgConnection,
    docs: &mut Documents<P>,
    envelopes: &[events::EventEnvelope],
    letters: &mut Vec<crate::writer::DeadLetter>,
) -> Result<u64, sqlx::Error> {
    docs.load(conn, envelopes.iter().map(|e| e.aggregate_id.as_str()))
        .await?;
    for envelope in envelopes {
        let error = match docs.apply(conn, envelope).await? {
            Step::Applied | Step::Duplicate => continue,
            Step::Failed(error) => error.to_string(),
            // the scan reads committed events only, so a hole stays a hole
            Step::Gap { version } => format!("follows version {version}, earlier events missing"),
        };
        // a stored event no retry can change: the daemon dead-letters it too
        tracing::error!(projection = P::NAME, event_id = %envelope.event_id, %error, "event does not apply; skipped");
        letters.push(dead_letter(envelope, &error));
        docs.skip(envelope);
    }
    Ok(envelopes.len() as u64)
}

/// Compares a rebuilt view with the live one, document by document.
pub async fn compare(conn: &mut PgConnection, live: &str, rebuilt: &str) -> Result<Differences, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT count(*) FILTER (WHERE l.id IS NULL) AS missing_live,
                count(*) FILTER (WHERE r.id IS NULL) AS missing_replay,
                count(*) FILTER (WHERE l.id IS NOT NULL AND r.id IS NOT NULL
                                   AND (l.doc <> r.doc OR l.version <> r.version
                                        OR l.user_id IS DISTINCT FROM r.user_id
                                        OR l.merchant_id IS DISTINCT FROM r.merchant_id)) AS changed
           FROM {live} l FULL OUTER JOIN {rebuilt} r ON l.id = r.id"
    ))
    .fetch_one(&mut *conn)
    .await?;
    let sample: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT COALESCE(l.id, r.id) FROM {live} l FULL OUTER JOIN {rebuilt} r ON l.id = r.id
          WHERE l.id IS NULL OR r.id IS NULL OR l.doc <> r.doc OR l.version <> r.version
             OR l.user_id IS DISTINCT FROM r.user_id OR l.merchant_id IS DISTINCT FROM r.merchant_id
          ORDER BY 1 LIMIT 10"
    ))
    .fetch_all(&mut *conn)
    .await?;
    Ok(Differences {
        missing_live: row.try_get::<i64, _>("missing_live")?.unsigned_abs(),
        missing_replay: row.try_get::<i64, _>("missing_replay")?.unsigned_abs(),
        changed: row.try_get::<i64, _>("changed")?.unsigned_abs(),
        sample,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_definition_is_moved_to_the_shadow_under_its_own_name() {
        let definition = "CREATE INDEX order_view_doc_idx ON public.order_view USING gin (doc jsonb_path_ops)";
        assert_eq!(
            rebuilt_index(definition, "order_view_doc_idx", "order_view", "order_view_shadow"),
            "CREATE INDEX order_view_doc_idx_rebuilt ON public.order_view_shadow USING gin (doc jsonb_path_ops)"
        );
    }
}
