//! The live side: one durable pull consumer per projection on its
//! aggregate's events stream (no filter), each batch applied and committed
//! with the projection's checkpoint in one Postgres transaction.
//!
//! Redelivery changes nothing (the version rule of [`crate::writer`]).
//! Failures are sorted: a database that is away fails the whole batch, which
//! is retried with backoff; an event its earlier events have not reached yet
//! (a gap) is retried too. An event the projector refuses can never apply —
//! the stored event is what it is — so it is dead-lettered at once: recorded
//! in `projection_dead_letters`, skipped (its document's version moves past
//! it, so the aggregate's later events still apply), and copied by the
//! consumer runner to the dead-letter stream with its reason, a log line and
//! a counter. A message that is not an event envelope at all goes to the
//! dead-letter stream at once as well. The projection keeps going.

use std::{collections::HashSet, marker::PhantomData, time::Instant};

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
    _projector: PhantomData<fn() -> P>,
}

impl<P> std::fmt::Debug for ProjectionHandler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandler").finish_non_exhaustive()
    }
}

impl<P: Projector> ProjectionHandler<P> {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            _projector: PhantomData,
        }
    }

    async fn apply_batch(&self, messages: &[jetstream::Message]) -> Result<Vec<Result<(), HandlerError>>, sqlx::Error> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        event_store::checkpoint::lock(&mut tx, P::NAME).await?;

        let decoded: Vec<Result<EventEnvelope, String>> = messages
            .iter()
            .map(|message| serde_json::from_slice(&message.payload).map_err(|e| format!("not an event envelope: {e}")))
            .collect();
        let mut docs = Documents::<P>::new(P::TABLE);
        let ids = decoded.iter().flatten().map(|envelope| envelope.aggregate_id.as_str());
        docs.load(&mut tx, ids).await?;

        let mut outcomes: Vec<Result<(), HandlerError>> = Vec::with_capacity(messages.len());
        let mut blocked: HashSet<String> = HashSet::new();
        let mut letters = Vec::new();
        let mut applied = 0u64;
        let mut last: Option<(u64, i64, DateTime<Utc>)> = None;
        for (message, envelope) in messages.iter().zip(&decoded) {
            let info = message.info().ok();
            let stream_sequence = info.as_ref().map_or(0, |i| i.stream_sequence);
            let envelope = match envelope {
                Ok(envelope) if envelope.aggregate_type == P::AGGREGATE_TYPE => envelope,
                Ok(_) => {
                    outcomes.push(Ok(()));
                    continue;
                }
                Err(error) => {
                    outcomes.push(Err(cp_nats::permanent(error.clone())));
                    continue;
                }
            };
            if blocked.contains(&envelope.aggregate_id) {
                outcomes.push(Err("an earlier event of this aggregate failed in this batch".into()));
                continue;
            }
            match docs.apply(&mut tx, envelope).await? {
                Step::Applied => {
                    applied += 1;
                    outcomes.push(Ok(()));
                }
                Step::Duplicate => outcomes.push(Ok(())),
                Step::Gap { version } => {
                    blocked.insert(envelope.aggregate_id.clone());
                    outcomes.push(Err(format!(
                        "event {} of {} follows version {version}: earlier events not visible yet",
                        envelope.sequence, envelope.aggregate_id
                    )
                    .into()));
                }
                Step::Failed(error) => {
                    tracing::error!(
                        projection = P::NAME, event_id = %envelope.event_id, aggregate_id = %envelope.aggregate_id,
                        sequence = envelope.sequence, %error, "event can never apply: dead-lettered, its document skips it"
                    );
                    metrics::counter!("projection_dead_letters_total", "projection" => P::NAME).increment(1);
                    letters.push(dead_letter(envelope, &error));
                    docs.skip(envelope);
                    outcomes.push(Err(cp_nats::permanent(error)));
                }
            }
            last = Some((stream_sequence, envelope.global_position, envelope.recorded_at));
        }
        docs.flush(&mut tx).await?;
        letters.append(&mut docs.dead_letters);
        record_dead_letters(&mut tx, P::NAME, &letters).await?;
        if let Some((stream_sequence, global_position, recorded_at)) = last {
            event_store::checkpoint::advance(&mut tx, P::NAME, stream_sequence, global_position, recorded_at).await?;
        }
        tx.commit().await?;
        metrics::counter!("projection_events_applied_total", "projection" => P::NAME).increment(applied);
        metrics::histogram!("projection_batch_seconds", "projection" => P::NAME)
            .record(started.elapsed().as_secs_f64());
        Ok(outcomes)
    }
}

impl<P: Projector> BatchHandler for ProjectionHandler<P> {
    async fn handle_batch(&self, messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        match self.apply_batch(messages).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // nothing was committed: every message is retried
                tracing::warn!(projection = P::NAME, %error, "projection batch failed");
                let text = error.to_string();
                messages.iter().map(|_| Err(text.clone().into())).collect()
            }
        }
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
