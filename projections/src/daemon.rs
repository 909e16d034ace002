//! The live side: one durable pull consumer per projection on its
//! aggregate's events stream (no filter). Each pulled batch is split by
//! aggregate id among `workers` Postgres transactions that run side by side
//! (each document belongs to one worker, so it is still written in event
//! order, and batches follow each other); the messages are acknowledged
//! after their worker committed, and the projection's checkpoint moves on
//! after the batch.
//!
//! Redelivery changes nothing (the version rule of [`crate::writer`]).
//! Failures are sorted: a database that is away fails a worker's share of
//! the batch, which is retried with backoff (the other workers' commits
//! stand); an event its earlier events have not reached yet (a gap) is
//! retried too. An event the projector refuses can never apply —
//! the stored event is what it is — so it is dead-lettered at once: recorded
//! in `projection_dead_letters`, skipped (its document's version moves past
//! it, so the aggregate's later events still apply), and copied by the
//! consumer runner to the dead-letter stream with its reason, a log line and
//! a counter. A message that is not an event envelope at all goes to the
//! dead-letter stream at once as well. The projection keeps going.

use std::{
    collections::HashSet,
    hash::{Hash as _, Hasher as _},
    marker::PhantomData,
    time::Instant,
};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use cp_nats::{BatchHandler, HandlerError};
use events::EventEnvelope;
use sqlx::PgPool;

use crate::{
    views::Projector,
    writer::{Documents, Step, dead_letter, record_dead_letters},
};

/// The durable consumer of a projection.
pub fn consumer_name(projection: &str) -> String {
    format!("projection-{projection}")
}

pub struct ProjectionHandler<P> {
    pool: PgPool,
    /// Transactions a batch is split into, by aggregate id.
    workers: usize,
    _projector: PhantomData<fn() -> P>,
}

impl<P> std::fmt::Debug for ProjectionHandler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandler")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

type Outcome = Result<(), HandlerError>;

/// What one worker's transaction did with its share of a batch.
struct Share {
    /// Positions in the batch and their outcomes.
    outcomes: Vec<(usize, Outcome)>,
    applied: u64,
    /// The latest event it got through (stream sequence, global position, recorded).
    last: Option<(u64, i64, DateTime<Utc>)>,
}

impl<P: Projector> ProjectionHandler<P> {
    /// A handler committing each batch in `workers` transactions side by side.
    pub fn new(pool: PgPool, workers: usize) -> Self {
        Self {
            pool,
            workers: workers.max(1),
            _projector: PhantomData,
        }
    }

    /// Which worker owns an aggregate: every event of a document goes to the
    /// same one, so each document is still written in order.
    fn worker_of(&self, aggregate_id: &str) -> usize {
        let mut hasher = std::hash::DefaultHasher::new();
        aggregate_id.hash(&mut hasher);
        usize::try_from(hasher.finish() % self.workers as u64).unwrap_or(0)
    }

    async fn apply_batch(&self, messages: &[jetstream::Message]) -> Vec<Outcome> {
        let started = Instant::now();
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(messages.len());
        let mut shares: Vec<Vec<(usize, u64, EventEnvelope)>> = (0..self.workers).map(|_| Vec::new()).collect();
        for (index, message) in messages.iter().enumerate() {
            let stream_sequence = message.info().map_or(0, |info| info.stream_sequence);
            match serde_json::from_slice::<EventEnvelope>(&message.payload) {
                Ok(envelope) if envelope.aggregate_type == P::AGGREGATE_TYPE => {
                    outcomes.push(None);
                    shares[self.worker_of(&envelope.aggregate_id)].push((index, stream_sequence, envelope));
                }
                Ok(_) => outcomes.push(Some(Ok(()))),
                Err(error) => outcomes.push(Some(Err(cp_nats::permanent(format!("not an event envelope: {error}"))))),
            }
        }
        let results = futures::future::join_all(
            shares
                .iter()
                .filter(|share| !share.is_empty())
                .map(|share| self.apply_share(share)),
        )
        .await;
        let mut applied = 0;
        let mut last: Option<(u64, i64, DateTime<Utc>)> = None;
        for (share, result) in shares.iter().filter(|share| !share.is_empty()).zip(results) {
            match result {
                Ok(done) => {
                    applied += done.applied;
                    last = last.max(done.last);
                    for (index, outcome) in done.outcomes {
                        outcomes[index] = Some(outcome);
                    }
                }
                Err(error) => {
                    // nothing of this share was committed: its messages are retried
                    // (other shares' commits stand; their redelivery would be a no-op)
                    tracing::warn!(projection = P::NAME, %error, "projection batch failed");
                    let text = error.to_string();
                    for (index, _, _) in share {
                        outcomes[*index] = Some(Err(text.clone().into()));
                    }
                }
            }
        }
        if let Some((stream_sequence, global_position, recorded_at)) = last {
            // bookkeeping only (lag): a failure here loses nothing
            if let Err(error) =
                event_store::checkpoint::advance(&self.pool, P::NAME, stream_sequence, global_position, recorded_at)
                    .await
            {
                tracing::warn!(projection = P::NAME, %error, "checkpoint not advanced");
            }
        }
        metrics::counter!("projection_events_applied_total", "projection" => P::NAME).increment(applied);
        metrics::histogram!("projection_batch_seconds", "projection" => P::NAME)
            .record(started.elapsed().as_secs_f64());
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Err("no outcome".into())))
            .collect()
    }

    /// One worker's transaction: its documents loaded, its events applied
    /// in batch order, the changed documents written, all committed at once.
    async fn apply_share(&self, share: &[(usize, u64, EventEnvelope)]) -> Result<Share, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        event_store::checkpoint::lock_shared(&mut tx, P::NAME).await?;
        let mut docs = Documents::<P>::new(P::TABLE);
        docs.load(
            &mut tx,
            share.iter().map(|(_, _, envelope)| envelope.aggregate_id.as_str()),
        )
        .await?;
        let mut done = Share {
            outcomes: Vec::with_capacity(share.len()),
            applied: 0,
            last: None,
        };
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut letters = Vec::new();
        for (index, stream_sequence, envelope) in share {
            if blocked.contains(envelope.aggregate_id.as_str()) {
                done.outcomes.push((
                    *index,
                    Err("an earlier event of this aggregate failed in this batch".into()),
                ));
                continue;
            }
            let outcome = match docs.apply(&mut tx, envelope).await? {
                Step::Applied => {
                    done.applied += 1;
                    Ok(())
                }
                Step::Duplicate => Ok(()),
                Step::Gap { version } => {
                    blocked.insert(&envelope.aggregate_id);
                    Err(format!(
                        "event {} of {} follows version {version}: earlier events not visible yet",
                        envelope.sequence, envelope.aggregate_id
                    )
                    .into())
                }
                Step::Failed(error) => {
                    tracing::error!(
                        projection = P::NAME, event_id = %envelope.event_id, aggregate_id = %envelope.aggregate_id,
                        sequence = envelope.sequence, %error, "event can never apply: dead-lettered, its document skips it"
                    );
                    metrics::counter!("projection_dead_letters_total", "projection" => P::NAME).increment(1);
                    letters.push(dead_letter(envelope, &error));
                    docs.skip(envelope);
                    Err(cp_nats::permanent(error))
                }
            };
            done.outcomes.push((*index, outcome));
            done.last = done
                .last
                .max(Some((*stream_sequence, envelope.global_position, envelope.recorded_at)));
        }
        docs.flush(&mut tx).await?;
        letters.append(&mut docs.dead_letters);
        record_dead_letters(&mut tx, P::NAME, &letters).await?;
        tx.commit().await?;
        Ok(done)
    }
}

impl<P: Projector> BatchHandler for ProjectionHandler<P> {
    async fn handle_batch(&self, messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        self.apply_batch(messages).await
    }
}

/// Publishes how far a projection is behind the head of its stream:
/// `projection_lag_events` (not yet acknowledged) and
/// `projection_lag_seconds` (age of the last applied event while behind).
pub async fn report_lag(pool: &PgPool, stream: &jetstream::stream::Stream, projection: &str) -> anyhow::Result<()> {
    let info = stream.consumer_info(consumer_name(projection)).await?;
    let behind = info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0);
    let recorded_at = event_store::checkpoint::recorded_at(pool, projection).await?;
    let seconds = match (behind, recorded_at) {
        (0, _) | (_, None) => 0.0,
        (_, Some(at)) => (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0,
    };
    metrics::gauge!("projection_lag_events", "projection" => projection.to_owned()).set(behind as f64);
    metrics::gauge!("projection_lag_seconds", "projection" => projection.to_owned()).set(seconds);
    Ok(())
}
