//! The event store as the write side uses it.
//!
//! Rows are the postgres-es `events` table's, written the way postgres-es
//! writes them (payload = the serialized event enum, event type and version
//! from `DomainEvent`), so postgres-es, cqrs-es replay and our relay all read
//! them alike. What this layer adds over cqrs-es' `PersistedEventStore`:
//!
//! - **one transaction across aggregates** ([`EventStore::append`]): the claim
//!   writer records a voucher's decisions and the orders they create
//!   atomically, so a crash can never leave an admitted claim without its order;
//! - **one statement per append** (`INSERT … SELECT FROM UNNEST`), so a batch
//!   of a thousand claims is one round trip and one `NOTIFY`;
//! - **the version after a command**, which responses carry for read-your-writes;
//! - **an aggregate cache** ([`AggregateCache`]) for hot aggregates: load once,
//!   catch up from the cached sequence, append with that sequence as the
//!   optimistic lock, drop the entry on conflict.
//!
//! The optimistic lock is the primary key `(aggregate_type, aggregate_id,
//! sequence)`: a second writer of the same sequence fails with a unique
//! violation, reported as [`StoreError::Conflict`]. An append must also start
//! right after the aggregate's last stored event: one that would leave a gap
//! in an aggregate's sequence (e.g. appending a refund decided on top of a
//! success that was never stored) is refused whole, as
//! [`StoreError::SequenceGap`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use cqrs_es::{Aggregate, DomainEvent, event_sink::EventSink};
use events::EventMetadata;
use futures::TryStreamExt as _;
use serde_json::Value;
use sqlx::{PgPool, Row as _};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to one of the aggregates first.
    #[error("optimistic lock conflict")]
    Conflict,
    /// The events were decided on a state the store does not have: a
    /// programming error, or a cached aggregate ahead of a store that lost
    /// commits (a Postgres crash with `synchronous_commit = off`, a failover
    /// to a lagging replica). Deciding again on the stored state cures the
    /// second, so it is retried like a conflict (`commands::bus::unit_of_work`).
    #[error(
        "appending {aggregate_type}/{aggregate_id} at sequence {sequence} would leave a gap: its previous event is not stored"
    )]
    SequenceGap {
        aggregate_type: &'static str,
        aggregate_id: String,
        sequence: u64,
    },
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The group-commit writer went away before answering (its runtime is
    /// shutting down): whether the append was stored is unknown to the
    /// caller, as after a lost connection.
    #[error("the group-commit writer stopped")]
    WriterStopped,
    #[error("cannot serialize an event")]
    Serialize(#[source] serde_json::Error),
    #[error("stored event {aggregate_type}/{aggregate_id}#{sequence} does not decode")]
    Corrupt {
        aggregate_type: &'static str,
        aggregate_id: String,
        sequence: i64,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Whether retrying can never help (as opposed to a conflict or a
    /// database that is away).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Conflict | Self::WriterStopped | Self::SequenceGap { .. } => false,
            Self::Database(error) => database_error_is_permanent(error),
            Self::Serialize(_) | Self::Corrupt { .. } => true,
        }
    }
}

/// A statement Postgres refused for what it holds (a value it cannot store,
/// a check that fails), not for the state of the server or the connection.
fn database_error_is_permanent(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // 22: data exception (e.g. a NUL in jsonb), 23: integrity
            // constraint (other than the optimistic lock, handled as Conflict)
            code.starts_with("22") || code.starts_with("23")
        }),
        sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// An aggregate as of `version` (the sequence of its last event; 0 = no events).
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub aggregate: A,
    pub version: u64,
}

/// An aggregate with no events yet: what a creation decides on.
impl<A: Default> Default for Loaded<A> {
    fn default() -> Self {
        Self {
            aggregate: A::default(),
            version: 0,
        }
    }
}

/// The events one command produced, ready to append. `aggregate` already has
/// them applied (cqrs-es' `EventSink` applies on write).
#[derive(Debug)]
pub struct Decided<A: Aggregate> {
    pub aggregate_id: String,
    pub aggregate: A,
    pub base_version: u64,
    pub events: Vec<A::Event>,
}

impl<A: Aggregate> Decided<A> {
    /// The aggregate's version once these events are stored.
    pub fn version(&self) -> u64 {
        self.base_version + self.events.len() as u64
    }

    /// Serializes the events, each with `metadata`.
    pub fn to_append(&self, metadata: &EventMetadata) -> Result<Append, StoreError> {
        let metadata = metadata_json(metadata)?;
        let events = self
            .events
            .iter()
            .map(|event| {
                Ok(PendingEvent {
                    event_type: event.event_type(),
                    event_version: event.event_version(),
                    payload: serde_json::to_value(event).map_err(StoreError::Serialize)?,
                    metadata: metadata.clone(),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Append {
            aggregate_type: A::TYPE,
            aggregate_id: self.aggregate_id.clone(),
            base_version: self.base_version,
            events,
        })
    }

    /// No events yet on `loaded`: the start of a decision that
    /// [`Decided::then`] extends.
    pub fn unchanged(aggregate_id: &str, loaded: Loaded<A>) -> Self {
        Self {
            aggregate_id: aggregate_id.to_owned(),
            aggregate: loaded.aggregate,
            base_version: loaded.version,
            events: Vec::new(),
        }
    }

    /// Decides `command` on top of these events, as one decision: the
    /// events of both are appended together, so nothing decided on the
    /// first can be stored without it. On `Err` the decision is handed back
    /// unchanged.
    pub async fn then(self, command: A::Command, services: &A::Services) -> Result<Self, (A::Error, Self)> {
        let Self {
            aggregate_id,
            aggregate,
            base_version,
            mut events,
        } = self;
        let version = base_version + events.len() as u64;
        match decide(&aggregate_id, Loaded { aggregate, version }, command, services).await {
            Ok(next) => {
                events.extend(next.events);
                Ok(Self {
                    aggregate_id,
                    aggregate: next.aggregate,
                    base_version,
                    events,
                })
            }
            Err((error, unchanged)) => Err((
                error,
                Self {
                    aggregate_id,
                    aggregate: unchanged.aggregate,
                    base_version,
                    events,
                },
            )),
        }
    }

    pub fn into_loaded(self) -> Loaded<A> {
        let version = self.version();
        Loaded {
            aggregate: self.aggregate,
            version,
        }
    }
}

/// Runs `command` against `loaded`. The domain layer validates before its
/// first write, so on `Err` the aggregate is unchanged and is handed back.
pub async fn decide<A: Aggregate>(
    aggregate_id: &str,
    loaded: Loaded<A>,
    command: A::Command,
    services: &A::Services,
) -> Result<Decided<A>, (A::Error, Loaded<A>)> {
    let Loaded { mut aggregate, version } = loaded;
    let sink = EventSink::<A>::default();
    match aggregate.handle(command, services, &sink).await {
        Ok(()) => Ok(Decided {
            aggregate_id: aggregate_id.to_owned(),
            aggregate,
            base_version: version,
            events: sink.collect().await,
        }),
        Err(error) => Err((error, Loaded { aggregate, version })),
    }
}

/// Serialized events of one aggregate, to be stored after `base_version`.
#[derive(Debug, Clone)]
pub struct Append {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub base_version: u64,
    pub events: Vec<PendingEvent>,
}

#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    /// The `EventMetadata` map as JSON: per event, because one batch can
    /// carry the requests of many users, each with its own trace.
    pub metadata: Value,
}

pub fn metadata_json(metadata: &EventMetadata) -> Result<Value, StoreError> {
    serde_json::to_value(metadata.to_map()).map_err(StoreError::Serialize)
}

#[derive(Debug, Clone)]
pub struct EventStore {
    pool: PgPool,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Folds the events after `from.version` into `from` (catching a cached
    /// aggregate up, or loading from scratch with `Loaded::default`).
    pub async fn catch_up<A: Aggregate>(&self, aggregate_id: &str, from: Loaded<A>) -> Result<Loaded<A>, StoreError> {
        let Loaded {
            mut aggregate,
            mut version,
        } = from;
        let mut rows = sqlx::query(
            "SELECT sequence, event_type, event_version, payload FROM events
              WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
              ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let (sequence, event) = decode_row::<A>(aggregate_id, &row)?;
            aggregate.apply(event);
            version = sequence;
        }
        Ok(Loaded { aggregate, version })
    }

    pub async fn load<A: Aggregate>(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        self.catch_up(aggregate_id, Loaded::default()).await
    }

    /// Loads several aggregates of one type in one query; an id with no
    /// events comes back as `Loaded::default()`.
    pub async fn load_many<A: Aggregate>(
        &self,
        aggregate_ids: &[String],
    ) -> Result<HashMap<String, Loaded<A>>, StoreError> {
        self.catch_up_many(aggregate_ids.iter().map(|id| (id.clone(), Loaded::default())).collect())
            .await
    }

    /// [`EventStore::catch_up`] for several aggregates of one type in one
    /// query, each from its own version (cached copies of hot aggregates).
    pub async fn catch_up_many<A: Aggregate>(
        &self,
        from: HashMap<String, Loaded<A>>,
    ) -> Result<HashMap<String, Loaded<A>>, StoreError> {
        let mut loaded = from;
        let (ids, after): (Vec<&str>, Vec<i64>) = loaded
            .iter()
            .map(|(id, l)| (id.as_str(), i64::try_from(l.version).unwrap_or(i64::MAX)))
            .unzip();
        let mut newer: Vec<(String, u64, A::Event)> = Vec::new();
        {
            let mut rows = sqlx::query(
                "SELECT e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload
                   FROM UNNEST($2::text[], $3::bigint[]) AS c(aggregate_id, after)
                   JOIN events e ON e.aggregate_type = $1 AND e.aggregate_id = c.aggregate_id AND e.sequence > c.after
                  ORDER BY e.aggregate_id, e.sequence",
            )
            .bind(A::TYPE)
            .bind(&ids)
            .bind(&after)
            .fetch(&self.pool);
            while let Some(row) = rows.try_next().await? {
                let aggregate_id: String = row.try_get("aggregate_id")?;
                let (sequence, event) = decode_row::<A>(&aggregate_id, &row)?;
                newer.push((aggregate_id, sequence, event));
            }
        }
        for (aggregate_id, sequence, event) in newer {
            let entry = loaded.entry(aggregate_id).or_default();
            entry.aggregate.apply(event);
            entry.version = sequence;
        }
        Ok(loaded)
    }

    /// Names the first predecessor that is not stored (the error path only).
    async fn gap(&self, types: &[&'static str], ids: &[&str], sequences: &[i64]) -> StoreError {
        for ((aggregate_type, aggregate_id), sequence) in types.iter().zip(ids).zip(sequences) {
            let stored: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
                "SELECT sequence FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_optional(&self.pool)
            .await;
            match stored {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return StoreError::SequenceGap {
                        aggregate_type,
                        aggregate_id: (*aggregate_id).to_owned(),
                        sequence: sequence.unsigned_abs() + 1,
                    };
                }
                Err(error) => return error.into(),
            }
        }
        StoreError::SequenceGap {
            aggregate_type: types.first().copied().unwrap_or("unknown"),
            aggregate_id: ids.first().map(|id| (*id).to_owned()).unwrap_or_default(),
            sequence: sequences.first().map_or(0, |s| s.unsigned_abs() + 1),
        }
    }

    /// Stores every append in one transaction and one statement: all or none.
    pub async fn append(&self, appends: &[Append]) -> Result<(), StoreError> {
        let total: usize = appends.iter().map(|a| a.events.len()).sum();
        if total == 0 {
            return Ok(());
        }
        // Each append's predecessor: stored already, or earlier in this call.
        let mut new_sequences = std::collections::HashSet::with_capacity(total);
        let (mut before_types, mut before_ids, mut before_sequences) = (Vec::new(), Vec::new(), Vec::new());
        for append in appends {
            let first = append.base_version;
            if first > 0 && !new_sequences.contains(&(append.aggregate_type, append.aggregate_id.as_str(), first)) {
                before_types.push(append.aggregate_type);
                before_ids.push(append.aggregate_id.as_str());
                before_sequences.push(i64::try_from(first).unwrap_or(i64::MAX));
            }
            for offset in 1..=append.events.len() as u64 {
                new_sequences.insert((append.aggregate_type, append.aggregate_id.as_str(), first + offset));
            }
        }
        let mut types = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        let mut sequences = Vec::with_capacity(total);
        let mut event_types = Vec::with_capacity(total);
        let mut versions = Vec::with_capacity(total);
        let mut payloads = Vec::with_capacity(total);
        let mut metadata = Vec::with_capacity(total);
        for append in appends {
            for (offset, event) in append.events.iter().enumerate() {
                types.push(append.aggregate_type);
                ids.push(append.aggregate_id.as_str());
                sequences.push(i64::try_from(append.base_version + offset as u64 + 1).unwrap_or(i64::MAX));
                event_types.push(event.event_type.as_str());
                versions.push(event.event_version.as_str());
                payloads.push(&event.payload);
                metadata.push(&event.metadata);
            }
        }
        // The predecessors are checked in the same statement; a committed
        // predecessor is always visible, since the caller decided on it.
        let result = sqlx::query(
            "WITH missing AS (
                 SELECT 1 FROM UNNEST($8::text[], $9::text[], $10::bigint[]) AS p(aggregate_type, aggregate_id, sequence)
                  WHERE NOT EXISTS (SELECT 1 FROM events e
                                     WHERE e.aggregate_type = p.aggregate_type AND e.aggregate_id = p.aggregate_id
                                       AND e.sequence = p.sequence))
             INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
              WHERE NOT EXISTS (SELECT 1 FROM missing)",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&event_types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .bind(&before_types)
        .bind(&before_ids)
        .bind(&before_sequences)
        .execute(&self.pool)
        .await;
        match result {
            Ok(done) if done.rows_affected() == total as u64 => Ok(()),
            Ok(_) => Err(self.gap(&before_types, &before_ids, &before_sequences).await),
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(StoreError::Conflict),
            Err(error) => Err(error.into()),
        }
    }
}

/// One stored event of an aggregate (columns `sequence, event_type,
/// event_version, payload`), upcast and decoded, with its sequence.
fn decode_row<A: Aggregate>(aggregate_id: &str, row: &sqlx::postgres::PgRow) -> Result<(u64, A::Event), StoreError> {
    let sequence: i64 = row.try_get("sequence")?;
    let event_type: String = row.try_get("event_type")?;
    let event_version: String = row.try_get("event_version")?;
    let payload: Value = row.try_get("payload")?;
    let (_, payload) = events::upcast::upcast(&event_type, &event_version, payload);
    let event = serde_json::from_value(payload).map_err(|source| StoreError::Corrupt {
        aggregate_type: A::TYPE,
        aggregate_id: aggregate_id.to_owned(),
        sequence,
        source,
    })?;
    Ok((sequence.unsigned_abs(), event))
}

/// In-memory aggregates of one type for a hot path (vouchers).
///
/// An entry is *taken* while a command works on it and *put* back only after
/// its events are stored, so a failed append can never leave a cached state
/// the store does not have.
///
/// Writers of one aggregate in this process queue on [`Self::writer`]
/// instead of racing: blind concurrent retries on one hot aggregate mostly
/// lose to each other (measured: ~380 commands/s serially, far worse
/// concurrently). Writers in other processes are still possible; they find
/// the cached version stale, catch up, and the optimistic lock decides.
#[derive(Debug)]
pub struct AggregateCache<A> {
    entries: Mutex<HashMap<String, Loaded<A>>>,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    capacity: usize,
}

/// Exclusive right to write one aggregate in this process.
#[derive(Debug)]
pub struct WriterGuard<A> {
    cache: Arc<AggregateCache<A>>,
    aggregate_id: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl<A> Drop for WriterGuard<A> {
    fn drop(&mut self) {
        if let Ok(mut writers) = self.cache.writers.lock()
            && let Some(lock) = writers.get(&self.aggregate_id)
            // the map's handle and ours: nobody else is waiting, forget the lock
            && Arc::strong_count(lock) == 2
        {
            writers.remove(&self.aggregate_id);
        }
    }
}

impl<A> AggregateCache<A> {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            writers: Mutex::default(),
            capacity: capacity.max(1),
        })
    }

    /// Waits for the other writers of `aggregate_id` in this process.
    pub async fn writer(self: &Arc<Self>, aggregate_id: &str) -> WriterGuard<A> {
        let lock = match self.writers.lock() {
            Ok(mut writers) => writers.entry(aggregate_id.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        WriterGuard {
            cache: self.clone(),
            aggregate_id: aggregate_id.to_owned(),
            _guard: lock.lock_owned().await,
        }
    }

    pub fn take(&self, aggregate_id: &str) -> Option<Loaded<A>> {
        self.entries.lock().ok()?.remove(aggregate_id)
    }

    /// A copy of the entry, left in place for its writers.
    pub fn peek(&self, aggregate_id: &str) -> Option<Loaded<A>>
    where
        A: Clone,
    {
        self.entries.lock().ok()?.get(aggregate_id).cloned()
    }

    /// Looks at the entry in place, without copying it (a product with
    /// thousands of reservations is expensive to clone): for facts that
    /// never change once stored, such as who owns the aggregate.
    pub fn inspect<R>(&self, aggregate_id: &str, look: impl FnOnce(&Loaded<A>) -> R) -> Option<R> {
        self.entries.lock().ok()?.get(aggregate_id).map(look)
    }

    /// Stores `loaded` unless the entry already holds the same or a later version.
    pub fn put_if_newer(&self, aggregate_id: &str, loaded: Loaded<A>) {
        let newer = self
            .entries
            .lock()
            .map(|entries| {
                entries
                    .get(aggregate_id)
                    .is_none_or(|cached| cached.version < loaded.version)
            })
            .unwrap_or(false);
        if newer {
            self.put(aggregate_id, loaded);
        }
    }

    /// Caches `loaded`, unless it has no events: anyone can name ids nobody
    /// wrote (a random product id, a restock of nothing), and those must not
    /// push the hot aggregates out; loading one again is a single query.
    pub fn put(&self, aggregate_id: &str, loaded: Loaded<A>) {
        if loaded.version == 0 {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= self.capacity && !entries.contains_key(aggregate_id) {
                // Bounded memory beats hit rate: the hot set is a handful of
                // live sales, anything evicted is reloaded from the store.
                if let Some(victim) = entries.keys().next().cloned() {
                    entries.remove(&victim);
                }
            }
            entries.insert(aggregate_id.to_owned(), loaded);
        }
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Forgets every entry: the store may have lost commits the entries
    /// include (it restarted), so each is loaded again from what it holds.
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Loads an aggregate through an optional cache: a cached entry is caught up
/// from its version, a missing one is loaded from the start.
pub async fn load_cached<A: Aggregate>(
    store: &EventStore,
    cache: Option<&AggregateCache<A>>,
    aggregate_id: &str,
) -> Result<Loaded<A>, StoreError> {
    let start = cache.and_then(|c| c.take(aggregate_id)).unwrap_or_default();
    store.catch_up(aggregate_id, start).await
}
