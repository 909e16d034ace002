//! Running commands against the event store.
//!
//! - [`unit_of_work`]: decide on one or several aggregates, append every
//!   decision in one transaction (one statement), and on an optimistic-lock
//!   conflict decide again from fresh state, a bounded number of times with
//!   jittered backoff, counting each conflict in `command_conflicts_total`.
//!   Every write path runs through it: the command API's multi-aggregate
//!   handlers (a claim and its coupon, a payment and its order), the claim
//!   writer's batches, and [`Commands`].
//! - [`Commands`]: one command against one aggregate: load (through the
//!   cache if the aggregate type has one), decide, append with the loaded
//!   version as the optimistic lock; [`CommandError::Conflict`] (a 409) once
//!   the retries are spent.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use cqrs_es::Aggregate;
use events::EventMetadata;
use rand::Rng as _;

use event_store::{AggregateCache, Append, Decided, EventStore, Loaded, StoreError, decide, group::GroupCommit};

#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// A business rule refused the command.
    #[error(transparent)]
    Domain(E),
    /// Other writers kept winning the optimistic lock.
    #[error("the aggregate kept changing; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    #[error(transparent)]
    Store(StoreError),
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(5),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay below base × 2^attempt, so writers that
    /// collided once do not collide again in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.base_delay.saturating_mul(2u32.saturating_pow(attempt.min(10)));
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(rand::rng().random_range(0..cap_us))
    }
}

/// Why a unit of work did not commit.
#[derive(Debug, thiserror::Error)]
pub enum UnitError<E> {
    /// The decision itself refused (a business rule, a missing aggregate):
    /// nothing was appended, nothing is retried.
    #[error(transparent)]
    Decide(E),
    /// Other writers kept winning the optimistic lock.
    #[error("the aggregates kept changing; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    #[error(transparent)]
    Store(StoreError),
}

/// Decides with `decide` and appends what it returns, all in one
/// transaction; on an optimistic-lock conflict calls `decide` again (it must
/// load fresh state each time) after a jittered backoff, up to
/// `retry.attempts` times. Each conflict is counted in
/// `command_conflicts_total{aggregate = label}` (a bounded set: the caller's
/// aggregate type or unit name). Returns what the successful decision
/// returned beside its appends.
pub async fn unit_of_work<T, E, F, Fut>(
    store: &EventStore,
    retry: RetryPolicy,
    label: &'static str,
    mut decide: F,
) -> Result<T, UnitError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Vec<Append>, T), E>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (appends, decided) = decide().await.map_err(UnitError::Decide)?;
        match store.append(&appends).await {
            Ok(()) => return Ok(decided),
            Err(error @ (StoreError::Conflict | StoreError::SequenceGap { .. })) => {
                if let StoreError::SequenceGap { .. } = error {
                    // decided on a cached state the store does not have (it
                    // lost commits): the next attempt loads what it has
                    tracing::warn!(%error, label, "decided on a state the store does not have; deciding again");
                }
                metrics::counter!("command_conflicts_total", "aggregate" => label).increment(1);
                if attempt >= retry.attempts {
                    return Err(UnitError::Conflict { attempts: attempt });
                }
                tokio::time::sleep(retry.delay(attempt)).await;
            }
            Err(error) => return Err(UnitError::Store(error)),
        }
    }
}

/// What a successful command left behind.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The aggregate's version after the command (unchanged if it emitted nothing).
    pub version: u64,
    pub events: Vec<A::Event>,
}

/// Command execution for one aggregate type.
pub struct Commands<A: Aggregate> {
    store: EventStore,
    cache: Option<Arc<AggregateCache<A>>>,
    services: A::Services,
    retry: RetryPolicy,
    /// Creations queue here and are appended with other callers' (see
    /// [`event_store::group`]); `None` appends each on its own.
    group: Option<GroupCommit>,
}

impl<A: Aggregate> std::fmt::Debug for Commands<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("aggregate", &A::TYPE)
            .field("cached", &self.cache.is_some())
            .field("group_commit", &self.group.is_some())
            .finish()
    }
}

impl<A: Aggregate> Commands<A> {
    pub fn new(store: EventStore, services: A::Services) -> Self {
        Self {
            store,
            cache: None,
            services,
            retry: RetryPolicy::default(),
            group: None,
        }
    }

    /// Creations through a group commit (many concurrent creators, such as
    /// goods orders being submitted).
    pub fn with_group_commit(mut self, group: GroupCommit) -> Self {
        self.group = Some(group);
        self
    }

    pub fn with_cache(mut self, cache: Arc<AggregateCache<A>>) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn services(&self) -> &A::Services {
        &self.services
    }

    /// The aggregate cache of this type, if it has one (hot types).
    pub fn cache(&self) -> Option<&Arc<AggregateCache<A>>> {
        self.cache.as_ref()
    }

    /// The aggregate as stored now, for a decision taken outside it (the goods
    /// saga prices its lines from products). Through the cache when there is
    /// one: a hot aggregate with thousands of events is caught up from its
    /// cached version instead of being folded from its first event every time.
    pub async fn read(&self, aggregate_id: &str) -> Result<Loaded<A>, StoreError>
    where
        A: Clone,
    {
        let start = self
            .cache
            .as_ref()
            .and_then(|cache| cache.peek(aggregate_id))
            .unwrap_or_default();
        let loaded = self.store.catch_up(aggregate_id, start).await?;
        if let Some(cache) = &self.cache {
            cache.put_if_newer(aggregate_id, loaded.clone());
        }
        Ok(loaded)
    }

    /// [`Commands::read`] for several aggregates in one query.
    pub async fn read_many(&self, aggregate_ids: &[String]) -> Result<HashMap<String, Loaded<A>>, StoreError>
    where
        A: Clone,
    {
        let from: HashMap<String, Loaded<A>> = aggregate_ids
            .iter()
            .map(|id| {
                let cached = self.cache.as_ref().and_then(|cache| cache.peek(id)).unwrap_or_default();
                (id.clone(), cached)
            })
            .collect();
        let before: HashMap<String, u64> = from.iter().map(|(id, l)| (id.clone(), l.version)).collect();
        let loaded = self.store.catch_up_many(from).await?;
        if let Some(cache) = &self.cache {
            // only what moved on is copied back
            for (id, loaded) in &loaded {
                if before.get(id).is_none_or(|version| loaded.version > *version) {
                    cache.put_if_newer(id, loaded.clone());
                }
            }
        }
        Ok(loaded)
    }

    /// Runs a command that creates the aggregate under a fresh id (a UUIDv7
    /// the caller just generated): nothing can be stored under it yet, so the
    /// load is skipped and the append's primary key is the existence check.
    /// Should the id exist after all, the command runs the normal way and the
    /// aggregate answers (e.g. `AlreadyExists`, or an idempotent no-op).
    pub async fn create(
        &self,
        aggregate_id: &str,
        make: impl Fn() -> A::Command,
        metadata: &EventMetadata,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        let fresh = Loaded::default();
        let decided = match decide(aggregate_id, fresh, make(), &self.services).await {
            Ok(decided) => decided,
            Err((error, _)) => return Err(CommandError::Domain(error)),
        };
        let append = decided.to_append(metadata).map_err(CommandError::Store)?;
        let stored = match &self.group {
            Some(group) => group.append(vec![append]).await,
            None => self.store.append(std::slice::from_ref(&append)).await,
        };
        match stored {
            Ok(()) => Ok(self.stored(aggregate_id, decided)),
            Err(StoreError::Conflict) => self.execute(aggregate_id, make, metadata).await,
            Err(error) => Err(CommandError::Store(error)),
        }
    }

    /// Runs the command `make()` builds (called again on every retry).
    pub async fn execute(
        &self,
        aggregate_id: &str,
        make: impl Fn() -> A::Command,
        metadata: &EventMetadata,
    ) -> Result<Executed<A>, CommandError<A::Error>> {
        // hot aggregates: queue behind this process's other writers of the same id
        let _writer = match &self.cache {
            Some(cache) => Some(cache.writer(aggregate_id).await),
            None => None,
        };
        // A cached entry is decided on as it is, without asking the store
        // for newer events: when the decision has events, the append at the
        // cached version is the check (a newer event in the store makes it a
        // conflict, the entry is gone, and the retry loads from the store).
        // A decision without events has no append to check it, so it is
        // confirmed by catching up first, and decided again on what came.
        let decided = unit_of_work(&self.store, self.retry, A::TYPE, || async {
            let cached = self.cache.as_deref().and_then(|cache| cache.take(aggregate_id));
            let mut confirmed = cached.is_none();
            let mut loaded = match cached {
                Some(loaded) => loaded,
                None => self.store.load(aggregate_id).await.map_err(CommandError::Store)?,
            };
            loop {
                let (outcome, unchanged) = match decide(aggregate_id, loaded, make(), &self.services).await {
                    Ok(decided) if confirmed || !decided.events.is_empty() => {
                        let append = decided.to_append(metadata).map_err(CommandError::Store)?;
                        return Ok((vec![append], decided));
                    }
                    Ok(decided) => (None, decided.into_loaded()),
                    Err((error, unchanged)) => (Some(error), unchanged),
                };
                let version = unchanged.version;
                let current = if confirmed {
                    unchanged
                } else {
                    self.store
                        .catch_up(aggregate_id, unchanged)
                        .await
                        .map_err(CommandError::Store)?
                };
                if current.version != version {
                    // the cache was behind: decide again on the store's state
                    loaded = current;
                    confirmed = true;
                    continue;
                }
                return match outcome {
                    None => Ok((Vec::new(), Decided::unchanged(aggregate_id, current))),
                    Some(error) => {
                        self.keep(aggregate_id, current);
                        Err(CommandError::Domain(error))
                    }
                };
            }
        })
        .await
        .map_err(|error| match error {
            UnitError::Decide(error) => error,
            UnitError::Conflict { attempts } => CommandError::Conflict { attempts },
            UnitError::Store(error) => CommandError::Store(error),
        })?;
        Ok(self.stored(aggregate_id, decided))
    }

    /// After a successful append: the outcome, and the new state cached.
    fn stored(&self, aggregate_id: &str, decided: Decided<A>) -> Executed<A> {
        let executed = Executed {
            version: decided.version(),
            events: decided.events.clone(),
        };
        self.keep(aggregate_id, decided.into_loaded());
        executed
    }

    fn keep(&self, aggregate_id: &str, loaded: Loaded<A>) {
        if let Some(cache) = &self.cache {
            cache.put(aggregate_id, loaded);
        }
    }
}
