//! Documents in a view table, and events applied to them: the I/O the
//! daemon and the replay CLI share around the pure projectors.
//!
//! The version rule: an event is applied to a document only when its
//! sequence is the document's version + 1. A lower sequence is a redelivery
//! and skipped; a higher one means earlier events of that aggregate have not
//! been seen (redelivery reordered them, or a replay scan passed a slow
//! transaction) and they are read from the event store, which is the truth,
//! before the event is applied. So each event is applied exactly once, in
//! aggregate order, whatever order it arrives in.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use events::EventEnvelope;
use futures::TryStreamExt as _;
use sqlx::{PgConnection, Row as _};

use crate::views::{ApplyError, Projector};

/// One document as held in memory: `version` may run ahead of the
/// document's own when an event was dead-lettered (skipped).
#[derive(Debug, Clone)]
struct Doc<V> {
    view: Option<V>,
    version: u64,
    dirty: bool,
    /// A row for it is in the table (loaded, or written by this process).
    stored: bool,
}

/// What became of one event.
#[derive(Debug)]
pub enum Step {
    Applied,
    /// Already reflected (a redelivery).
    Duplicate,
    /// Earlier events of the aggregate are missing even from the event store
    /// (their transaction is not visible yet): retry later.
    Gap {
        version: u64,
    },
    /// The projector refused it; the document is unchanged.
    Failed(ApplyError),
}

/// An event given up on: recorded, skipped, and reported.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub event_id: uuid::Uuid,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    pub error: String,
}

/// The documents of one view table that a batch (or a replay) works on.
pub struct Documents<P: Projector> {
    table: String,
    docs: HashMap<String, Doc<P::View>>,
    /// Set for a table this process filled from empty (a replay's shadow):
    /// only documents it wrote and then forgot can be in the table, so only
    /// those are looked up.
    written_only: Option<HashSet<String>>,
    /// Events the projector refused in the event-store gap fill, which no
    /// retry can change: skipped and recorded like dead letters.
    pub dead_letters: Vec<DeadLetter>,
}

impl<P: Projector> std::fmt::Debug for Documents<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Documents")
            .field("table", &self.table)
            .field("held", &self.docs.len())
            .finish_non_exhaustive()
    }
}

impl<P: Projector> Documents<P> {
    /// Documents of `table` (the live view table or a replay's shadow).
    pub fn new(table: impl Into<String>) -> Self {
        Self {
            table: table.into(),
            docs: HashMap::new(),
            written_only: None,
            dead_letters: Vec::new(),
        }
    }

    /// Documents of a table that was empty when this process started
    /// filling it and that nobody else writes (a replay's shadow table).
    pub fn filling(table: impl Into<String>) -> Self {
        Self {
            written_only: Some(HashSet::new()),
            ..Self::new(table)
        }
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Loads the stored documents among `ids` that are not held yet; ids
    /// without a row start empty at version 0.
    pub async fn load<'a>(
        &mut self,
        conn: &mut PgConnection,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), sqlx::Error> {
        let mut missing: Vec<String> = ids
            .into_iter()
            .filter(|id| !self.docs.contains_key(*id))
            .map(str::to_owned)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if let Some(forgotten) = &self.written_only {
            // never written: nothing to read
            let (stored, new): (Vec<String>, Vec<String>) = missing.into_iter().partition(|id| forgotten.contains(id));
            for id in new {
                self.docs.insert(
                    id,
                    Doc {
                        view: None,
                        version: 0,
                        dirty: false,
                        stored: false,
                    },
                );
            }
            missing = stored;
        }
        if missing.is_empty() {
            return Ok(());
        }
        let query = format!("SELECT id, version, doc FROM {} WHERE id = ANY($1)", self.table);
        // Planned afresh each time (an unnamed statement), never from a
        // cached generic plan: one made while the table was empty (a new
        // deployment, a replay's shadow, a truncated view) is a sequential
        // scan, and it stayed in use as the table grew, each batch's load
        // then scanning every row (measured: 150-630 ms per batch instead of
        // ~7 ms, the daemon's "first round fast, later rounds at half speed").
        let mut rows = sqlx::query(&query).bind(&missing).persistent(false).fetch(&mut *conn);
        while let Some(row) = rows.try_next().await? {
            let id: String = row.try_get("id")?;
            let version: i64 = row.try_get("version")?;
            // straight from the stored JSON into the typed view
            let sqlx::types::Json(view) = row.try_get::<sqlx::types::Json<P::View>, _>("doc")?;
            self.docs.insert(
                id,
                Doc {
                    view: Some(view),
                    version: version.unsigned_abs(),
                    dirty: false,
                    stored: true,
                },
            );
        }
        drop(rows);
        for id in missing {
            self.docs.entry(id).or_insert(Doc {
                view: None,
                version: 0,
                dirty: false,
                stored: false,
            });
        }
        Ok(())
    }

    /// The version of a held document (0 when new or not held).
    pub fn version(&self, id: &str) -> u64 {
        self.docs.get(id).map_or(0, |doc| doc.version)
    }

    /// The held document, if it exists.
    pub fn view(&self, id: &str) -> Option<&P::View> {
        self.docs.get(id).and_then(|doc| doc.view.as_ref())
    }

    /// Applies `event` under the version rule, reading any missing earlier
    /// events of its aggregate from the event store first. The document must
    /// have been [`Self::load`]ed.
    pub async fn apply(&mut self, conn: &mut PgConnection, event: &EventEnvelope) -> Result<Step, sqlx::Error> {
        let version = self.version(&event.aggregate_id);
        if event.sequence <= version {
            return Ok(Step::Duplicate);
        }
        if event.sequence > version + 1 {
            self.fill_gap(conn, &event.aggregate_id, version, event.sequence)
                .await?;
            if event.sequence <= self.version(&event.aggregate_id) {
                return Ok(Step::Duplicate);
            }
        }
        Ok(match self.apply_next(event) {
            Ok(()) => Step::Applied,
            Err(error) => Step::Failed(error),
        })
    }

    /// Applies the event that directly follows the document's version.
    fn apply_next(&mut self, event: &EventEnvelope) -> Result<(), ApplyError> {
        let doc = self.docs.entry(event.aggregate_id.clone()).or_insert(Doc {
            view: None,
            version: 0,
            dirty: false,
            stored: false,
        });
        let view = P::apply(doc.view.clone(), event)?;
        doc.view = Some(view);
        doc.version = event.sequence;
        doc.dirty = true;
        Ok(())
    }

    /// Gives up on `event`: the document keeps its content, its version moves
    /// past the event so the aggregate's later events still apply.
    pub fn skip(&mut self, event: &EventEnvelope) {
        let doc = self.docs.entry(event.aggregate_id.clone()).or_insert(Doc {
            view: None,
            version: 0,
            dirty: false,
            stored: false,
        });
        if doc.version < event.sequence {
            doc.version = event.sequence;
            doc.dirty = true;
        }
    }

    async fn fill_gap(
        &mut self,
        conn: &mut PgConnection,
        id: &str,
        after: u64,
        before: u64,
    ) -> Result<(), sqlx::Error> {
        let missed = event_store::read::aggregate(&mut *conn, P::AGGREGATE_TYPE, id, after, Some(before)).await?;
        metrics::counter!("projection_gap_fills_total", "projection" => P::NAME).increment(1);
        for missing in missed {
            if missing.sequence != self.version(id) + 1 {
                // not visible yet: the event waits for a later attempt
                break;
            }
            if let Err(error) = self.apply_next(&missing) {
                tracing::error!(projection = P::NAME, event_id = %missing.event_id, %error, "stored event does not apply; skipped");
                self.dead_letters.push(dead_letter(&missing, &error));
                self.skip(&missing);
            }
        }
        Ok(())
    }

    /// Writes every changed document (never over a newer stored version),
    /// a few thousand per statement.
    pub async fn flush(&mut self, conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
        self.take_writes()?.execute(conn).await
    }

    /// Takes every changed document out as rows to write, marking them
    /// written: the writing ([`Writes::execute`]) may then happen on another
    /// connection while these documents move on.
    pub fn take_writes(&mut self) -> Result<Writes, sqlx::Error> {
        const CHUNK: usize = 5_000;
        let mut dirty: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, doc)| doc.dirty)
            .map(|(id, _)| id.clone())
            .collect();
        // rows locked in one order by every writer: concurrent writers of
        // the same documents wait for each other instead of deadlocking
        dirty.sort_unstable();
        let mut writes = Writes {
            table: self.table.clone(),
            copy: Vec::new(),
            copied: 0,
            upserts: Vec::new(),
            announce: self.written_only.is_none(),
        };
        if self.written_only.is_some() {
            // a table only this process fills: documents never written go in
            // with one COPY, no conflict to check
            let (fresh, stored): (Vec<String>, Vec<String>) = dirty
                .into_iter()
                .partition(|id| self.docs.get(id).is_some_and(|doc| !doc.stored));
            self.copy_rows(&fresh, &mut writes)?;
            dirty = stored;
        }
        for chunk in dirty.chunks(CHUNK) {
            let rows = self.rows(chunk)?;
            if !rows.ids.is_empty() {
                writes.upserts.push(rows);
            }
        }
        Ok(writes)
    }

    /// The upsert rows of `chunk`'s documents (those with content).
    fn rows(&mut self, chunk: &[String]) -> Result<Rows, sqlx::Error> {
        let mut rows = Rows::with_capacity(chunk.len());
        for id in chunk {
            let Some(doc) = self.docs.get_mut(id) else { continue };
            doc.dirty = false;
            let Some(view) = &doc.view else { continue };
            doc.stored = true;
            let columns = P::columns(view);
            rows.ids.push(id.clone());
            rows.versions.push(i64::try_from(doc.version).unwrap_or(i64::MAX));
            // JSON text, cast to jsonb by the statement: no `Value` in between
            rows.docs
                .push(serde_json::to_string(view).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
            rows.users.push(columns.user_id);
            rows.merchants.push(columns.merchant_id);
            rows.statuses.push(columns.status);
            rows.created.push(columns.created_at);
            rows.updated.push(columns.updated_at);
        }
        Ok(rows)
    }

    /// COPY text rows (text format) for documents that have no row yet.
    fn copy_rows(&mut self, ids: &[String], writes: &mut Writes) -> Result<(), sqlx::Error> {
        let data = &mut writes.copy;
        data.reserve(ids.len() * 1_024);
        for id in ids {
            let Some(doc) = self.docs.get_mut(id) else { continue };
            doc.dirty = false;
            let Some(view) = &doc.view else { continue };
            doc.stored = true;
            let columns = P::columns(view);
            let json = serde_json::to_string(view).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            let time = |at: Option<DateTime<Utc>>| at.map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
            let fields = [
                Some(id.clone()),
                Some(doc.version.to_string()),
                Some(json),
                columns.user_id,
                columns.status,
                time(columns.created_at),
                time(columns.updated_at),
                columns.merchant_id,
            ];
            for (i, field) in fields.iter().enumerate() {
                if i > 0 {
                    data.push(b'\t');
                }
                match field {
                    Some(text) => copy_text(data, text),
                    None => data.extend_from_slice(b"\\N"),
                }
            }
            data.push(b'\n');
            writes.copied += 1;
        }
        Ok(())
    }

    /// Forgets every held document that is stored (a bounded cache for the replay).
    pub fn forget_clean(&mut self) {
        let forgotten = &mut self.written_only;
        self.docs.retain(|id, doc| {
            if !doc.dirty
                && let Some(forgotten) = forgotten.as_mut()
            {
                forgotten.insert(id.clone());
            }
            doc.dirty
        });
    }
}

/// Upsert rows as the statement's arrays.
struct Rows {
    ids: Vec<String>,
    versions: Vec<i64>,
    docs: Vec<String>,
    users: Vec<Option<String>>,
    statuses: Vec<Option<String>>,
    created: Vec<Option<DateTime<Utc>>>,
    updated: Vec<Option<DateTime<Utc>>>,
    merchants: Vec<Option<String>>,
}

impl Rows {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            docs: Vec::with_capacity(n),
            users: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            merchants: Vec::with_capacity(n),
        }
    }
}

/// Documents taken out of [`Documents`] to be written ([`Documents::take_writes`]).
pub struct Writes {
    table: String,
    /// `COPY` text rows of documents the table has no row for (a table
    /// this process alone fills).
    copy: Vec<u8>,
    copied: usize,
    upserts: Vec<Rows>,
    /// A live table: the query API's caches are told what moved on.
    announce: bool,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("table", &self.table)
            .field("copied", &self.copied)
            .field(
                "upserts",
                &self.upserts.iter().map(|rows| rows.ids.len()).sum::<usize>(),
            )
            .finish()
    }
}

impl Writes {
    /// Writes the rows on `conn`; returns how many documents were written.
    pub async fn execute(self, conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
        let mut written = 0;
        if self.copied > 0 {
            let mut copy = conn
                .copy_in_raw(&format!(
                    "COPY {} (id, version, doc, user_id, status, created_at, updated_at, merchant_id) FROM STDIN",
                    self.table
                ))
                .await?;
            if let Err(error) = copy.send(self.copy).await {
                let _ = copy.abort(error.to_string()).await;
                return Err(error);
            }
            copy.finish().await?;
            written += self.copied;
        }
        let query = upsert_statement(&self.table);
        for rows in &self.upserts {
            sqlx::query(&query)
                .bind(&rows.ids)
                .bind(&rows.versions)
                .bind(&rows.docs)
                .bind(&rows.users)
                .bind(&rows.statuses)
                .bind(&rows.created)
                .bind(&rows.updated)
                .bind(&rows.merchants)
                .execute(&mut *conn)
                .await?;
            if self.announce {
                // tell the query API's caches which documents moved on
                // (delivered when this transaction commits)
                let changed: Vec<(String, u64)> = rows
                    .ids
                    .iter()
                    .cloned()
                    .zip(rows.versions.iter().map(|v| v.unsigned_abs()))
                    .collect();
                sqlx::query("SELECT pg_notify($1, payload) FROM UNNEST($2::text[]) AS payload")
                    .bind(platform::pg::VIEW_CHANGES_CHANNEL)
                    .bind(platform::pg::ViewChange::payloads(&self.table, &changed))
                    .execute(&mut *conn)
                    .await?;
            }
            written += rows.ids.len();
        }
        Ok(written)
    }
}

/// The statement every document write uses: rows as arrays in the order
/// id, version, doc (JSON text), user_id, status, created_at, updated_at,
/// merchant_id; a row never goes over a newer stored version. Public so the
/// benchmarks' best-case writer runs the very same statement.
pub fn upsert_statement(table: &str) -> String {
    format!(
        "INSERT INTO {table} (id, version, doc, user_id, status, created_at, updated_at, merchant_id)
         SELECT u.id, u.version, u.doc::jsonb, u.user_id, u.status, u.created_at, u.updated_at, u.merchant_id
           FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                       $6::timestamptz[], $7::timestamptz[], $8::text[])
                AS u(id, version, doc, user_id, status, created_at, updated_at, merchant_id)
         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, doc = EXCLUDED.doc,
             user_id = EXCLUDED.user_id, status = EXCLUDED.status, merchant_id = EXCLUDED.merchant_id,
             created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at
         WHERE {table}.version < EXCLUDED.version"
    )
}

/// A field in COPY's text format: backslash, and the separators it uses
/// (tab, newline, carriage return), escaped with a backslash.
fn copy_text(out: &mut Vec<u8>, text: &str) {
    for byte in text.bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
}

pub fn dead_letter(event: &EventEnvelope, error: &dyn std::fmt::Display) -> DeadLetter {
    DeadLetter {
        event_id: event.event_id,
        aggregate_id: event.aggregate_id.clone(),
        sequence: event.sequence,
        event_type: event.event_type.clone(),
        error: error.to_string(),
    }
}

/// Records dead letters of `projection` (idempotent per event).
pub async fn record_dead_letters(
    conn: &mut PgConnection,
    projection: &str,
    letters: &[DeadLetter],
) -> Result<(), sqlx::Error> {
    for letter in letters {
        sqlx::query(
            "INSERT INTO projection_dead_letters (projection, event_id, aggregate_id, sequence, event_type, error)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(projection)
        .bind(letter.event_id)
        .bind(&letter.aggregate_id)
        .bind(i64::try_from(letter.sequence).unwrap_or(i64::MAX))
        .bind(&letter.event_type)
        .bind(&letter.error)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
