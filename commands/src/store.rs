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
//! violation, reported as [`StoreError::Conflict`].

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
    #[error("database error")]
    Database(#[from] sqlx::Error),
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

/// An aggregate as of `version` (the sequence of its last event; 0 = no events).
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub aggregate: A,
    pub version: u64,
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
            let sequence: i64 = row.try_get("sequence")?;
            let event_type: String = row.try_get("event_type")?;
            let event_version: String = row.try_get("event_version")?;
            let payload: Value = row.try_get("payload")?;
            let (_, payload) = events::upcast::upcast(&event_type, &event_version, payload);
            let event: A::Event = serde_json::from_value(payload).map_err(|source| StoreError::Corrupt {
                aggregate_type: A::TYPE,
                aggregate_id: aggregate_id.to_owned(),
                sequence,
                source,
            })?;
            aggregate.apply(event);
            version = sequence.unsigned_abs();
        }
        Ok(Loaded { aggregate, version })
    }

    pub async fn load<A: Aggregate>(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError> {
        self.catch_up(
            aggregate_id,
            Loaded {
                aggregate: A::default(),
                version: 0,
            },
        )
        .await
    }

    /// Stores every append in one transaction and one statement: all or none.
    pub async fn append(&self, appends: &[Append]) -> Result<(), StoreError> {
        let total: usize = appends.iter().map(|a| a.events.len()).sum();
        if total == 0 {
            return Ok(());
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
        let result = sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .bind(&event_types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&metadata)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(StoreError::Conflict),
            Err(error) => Err(error.into()),
        }
    }
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

    pub fn put(&self, aggregate_id: &str, loaded: Loaded<A>) {
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
    let start = cache.and_then(|c| c.take(aggregate_id)).unwrap_or_else(|| Loaded {
        aggregate: A::default(),
        version: 0,
    });
    store.catch_up(aggregate_id, start).await
}
