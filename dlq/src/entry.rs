//! Dead letters from every place, in one shape ([`Entry`]), and what a
//! re-drive means in each place ([`Sources::redrive`]):
//! - `events`: the original is published again to its subject
//!   ([`cp_nats::dead_letters`]); every consumer of its stream gets it, their
//!   handlers dedupe. Entries the projection daemon parked because a
//!   projector refused an event are shown once, as `projections` entries
//!   (the daemon records them there too).
//! - `projections`: the document is rebuilt from the event store
//!   ([`projections::dead_letters::rebuild`]): whole again once the
//!   projector is fixed, untouched if the event still does not apply.
//! - `edge`: the entry goes back into its voucher's stream
//!   ([`seckill_edge::dead_letters`]); the forwarder publishes it (the claim
//!   writer dedupes by order id) or parks it again.
//! - `timeouts`: the payment deadline goes back in line with fresh attempts
//!   ([`commands::timeouts`]); the command API's poller fires it (the order
//!   aggregate refuses a second time-out) or sets it aside again.

use std::{collections::HashSet, time::Duration};

use chrono::{DateTime, Utc};
use commands::timeouts::{DeadlineLetter, DeadlineState};
use cp_nats::dead_letters::{DeadLetter, DeadLetters, Outcome as BusOutcome};
use platform::kv::Kv;
use projections::dead_letters::{ProjectionDeadLetter, Rebuild};
use seckill_edge::dead_letters::{EdgeDeadLetter, EdgeOutcome};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    audit::{self, Outcome, Record},
    id::{EntryId, Source},
};

/// Where an entry stands, from its latest audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Nothing done yet, or a re-drive that left it where it was.
    Open,
    /// Re-driven: processed, or (events, edge) handed back to its consumer,
    /// which parks a new entry if it fails again.
    Redriven,
    /// Dropped, with its reason.
    Dropped,
}

/// One dead letter, wherever it is parked.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub id: String,
    pub source: Source,
    pub state: State,
    pub parked_at: DateTime<Utc>,
    /// Deliveries before it was parked.
    pub attempts: i64,
    /// Why it failed.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// What refused it: a consumer, a projection, the edge's forwarder.
    pub place: String,
    /// What it is about: an aggregate id, an order id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_action: Option<Record>,
    #[serde(skip)]
    raw: Raw,
}

#[derive(Debug, Clone)]
enum Raw {
    Events(Box<DeadLetter>),
    Projections(ProjectionDeadLetter),
    Edge(EdgeDeadLetter),
    Timeouts(DeadlineLetter),
    /// No longer where it was parked: as the audit's snapshot kept it.
    Gone(serde_json::Value),
}

impl Entry {
    fn events(letter: DeadLetter) -> Self {
        Self {
            id: EntryId::Events {
                sequence: letter.sequence,
            }
            .to_string(),
            source: Source::Events,
            state: State::Open,
            parked_at: letter.time,
            attempts: letter.delivered,
            reason: letter.error.clone(),
            event_type: letter.event_type.clone(),
            place: format!("consumer {} on {}", letter.consumer, letter.stream),
            key: letter.original_msg_id.clone(),
            last_action: None,
            raw: Raw::Events(Box::new(letter)),
        }
    }

    fn projections(letter: ProjectionDeadLetter) -> Option<Self> {
        let projection = projections::Projection::named(&letter.projection)?;
        Some(Self {
            id: EntryId::Projections {
                projection,
                event_id: letter.event_id,
            }
            .to_string(),
            source: Source::Projections,
            state: State::Open,
            parked_at: letter.recorded_at,
            // a projector's refusal is final on the first delivery
            attempts: 1,
            reason: letter.error.clone(),
            event_type: Some(letter.event_type.clone()),
            place: format!("projection {}", letter.projection),
            key: Some(format!("{} #{}", letter.aggregate_id, letter.sequence)),
            last_action: None,
            raw: Raw::Projections(letter),
        })
    }

    fn edge(letter: EdgeDeadLetter) -> Self {
        Self {
            id: EntryId::Edge {
                voucher_id: letter.voucher_id,
                entry_id: letter.entry_id.clone(),
            }
            .to_string(),
            source: Source::Edge,
            state: State::Open,
            parked_at: letter.parked_at,
            // the forwarder parks an unreadable entry the first time it reads it
            attempts: 1,
            reason: "unreadable stream entry: not an OrderRequested".to_owned(),
            event_type: Some("OrderRequested".to_owned()),
            place: format!("edge forwarder of voucher {}", letter.voucher_id),
            key: letter.field("o").map(str::to_owned),
            last_action: None,
            raw: Raw::Edge(letter),
        }
    }

    fn timeouts(letter: DeadlineLetter) -> Option<Self> {
        let order_id = letter.order_id.parse().ok()?;
        Some(Self {
            id: EntryId::Timeouts { order_id }.to_string(),
            source: Source::Timeouts,
            state: State::Open,
            parked_at: letter.dead_lettered_at,
            attempts: i64::from(letter.attempts),
            reason: letter.last_error.clone(),
            event_type: Some("OrderTimedOut".to_owned()),
            place: "payment deadline of the command API".to_owned(),
            key: Some(letter.order_id.clone()),
            last_action: None,
            raw: Raw::Timeouts(letter),
        })
    }

    /// An entry its re-drive took away, from the audit's snapshot
    /// ([`Entry::snapshot`]).
    fn gone(id: String, record: Record, snapshot: &serde_json::Value) -> Option<Self> {
        let entry = &snapshot["entry"];
        let text = |field: &str| entry[field].as_str().map(str::to_owned);
        let source = match entry["source"].as_str()? {
            "events" => Source::Events,
            "projections" => Source::Projections,
            "edge" => Source::Edge,
            "timeouts" => Source::Timeouts,
            _ => return None,
        };
        Some(
            Self {
                id,
                source,
                state: State::Open,
                parked_at: text("parked_at")?.parse().ok()?,
                attempts: entry["attempts"].as_i64().unwrap_or(0),
                reason: text("reason").unwrap_or_default(),
                event_type: text("event_type"),
                place: text("place").unwrap_or_default(),
                key: text("key"),
                last_action: None,
                raw: Raw::Gone(snapshot["detail"].clone()),
            }
            .with_action(Some(record)),
        )
    }

    /// What the audit keeps of it: the entry as listed and everything it holds.
    pub fn snapshot(&self) -> serde_json::Value {
        json!({"entry": self, "detail": self.detail()})
    }

    /// Sets the state from the latest audit record.
    pub(crate) fn with_action(mut self, record: Option<Record>) -> Self {
        self.state = match record.as_ref().map(|r| r.outcome) {
            None => State::Open,
            Some(Outcome::Dropped) => State::Dropped,
            Some(Outcome::Redriven) => State::Redriven,
            // the original went back to its consumer: a new failure is a new entry
            Some(Outcome::FailedAgain | Outcome::Unconfirmed)
                if matches!(self.source, Source::Events | Source::Edge) =>
            {
                State::Redriven
            }
            Some(Outcome::FailedAgain | Outcome::Unconfirmed) => State::Open,
        };
        self.last_action = record;
        self
    }

    /// Everything it holds: what `show` prints and the audit keeps.
    pub fn detail(&self) -> serde_json::Value {
        match &self.raw {
            Raw::Events(letter) => json!({
                "consumer": letter.consumer,
                "stream": letter.stream,
                "stream_sequence": letter.stream_sequence,
                "subject": letter.subject,
                "delivered": letter.delivered,
                "error": letter.error,
                "original_msg_id": letter.original_msg_id,
                "headers": letter.headers,
                "payload": payload(&letter.payload),
            }),
            Raw::Projections(letter) => json!({
                "projection": letter.projection,
                "event_id": letter.event_id,
                "aggregate_id": letter.aggregate_id,
                "sequence": letter.sequence,
                "event_type": letter.event_type,
                "error": letter.error,
            }),
            Raw::Edge(letter) => json!({
                "voucher_id": letter.voucher_id,
                "stream_entry_id": letter.stream_entry_id,
                "fields": letter.fields,
            }),
            Raw::Gone(detail) => detail.clone(),
            Raw::Timeouts(letter) => json!({
                "order_id": letter.order_id,
                "due_at": letter.due_at,
                "attempts": letter.attempts,
                "last_error": letter.last_error,
                "set_aside_at": letter.dead_lettered_at,
            }),
        }
    }
}

/// A payload as JSON when it is JSON, else as text.
fn payload(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Which entries `list` and `redrive --all-matching` take.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sources: Vec<Source>,
    pub since: Option<DateTime<Utc>>,
    pub event_type: Option<String>,
    /// `None`: every state.
    pub state: Option<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("postgres")]
    Postgres(#[from] sqlx::Error),
    #[error("jetstream")]
    Nats(#[from] cp_nats::dead_letters::DeadLetterError),
    #[error("redis")]
    Redis(#[from] redis::RedisError),
}

/// A source that could not be read; the others still are.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the {source_name} dead letters")]
pub struct Unreadable {
    pub source_name: Source,
    #[source]
    pub error: SourceError,
}

/// What a re-drive did, before it is audited.
#[derive(Debug, Clone)]
pub struct Redrive {
    pub outcome: Outcome,
    pub detail: String,
}

/// The places dead letters are parked, connected.
#[derive(Clone)]
pub struct Sources {
    pub pool: PgPool,
    pub dead_letters: DeadLetters,
    pub kv: Kv,
    /// The edge's Redis key prefix (`SECKILL_KEY_PREFIX`).
    pub prefix: String,
}

impl Sources {
    /// The entries `filter` takes, oldest first, and the sources that could
    /// not be read.
    pub async fn list(&self, filter: &Filter) -> Result<(Vec<Entry>, Vec<Unreadable>), sqlx::Error> {
        let mut entries = Vec::new();
        let mut unreadable = Vec::new();
        let wanted = |source: Source| filter.sources.is_empty() || filter.sources.contains(&source);
        // read for `events` too: they hide their projection twins
        let needed = wanted(Source::Events) || wanted(Source::Projections);
        let read = if needed {
            projections::dead_letters::list(&self.pool, filter.since).await
        } else {
            Ok(Vec::new())
        };
        let projection_letters = match read {
            Ok(letters) => letters,
            Err(error) => {
                unreadable.push(Unreadable {
                    source_name: Source::Projections,
                    error: error.into(),
                });
                Vec::new()
            }
        };
        if wanted(Source::Events) {
            let twins: HashSet<(String, String)> = projection_letters
                .iter()
                .map(|l| {
                    (
                        projections::daemon::consumer_name(&l.projection),
                        l.event_id.to_string(),
                    )
                })
                .collect();
            match self.dead_letters.list_after(0, filter.since).await {
                Ok(letters) => entries.extend(
                    letters
                        .into_iter()
                        .filter(|l| {
                            !twins.contains(&(l.consumer.clone(), l.original_msg_id.clone().unwrap_or_default()))
                        })
                        .map(Entry::events),
                ),
                Err(error) => unreadable.push(Unreadable {
                    source_name: Source::Events,
                    error: error.into(),
                }),
            }
        }
        if wanted(Source::Projections) {
            entries.extend(projection_letters.into_iter().filter_map(Entry::projections));
        }
        if wanted(Source::Edge) {
            let mut kv = self.kv.clone();
            match seckill_edge::dead_letters::list(&mut kv, &self.prefix, filter.since).await {
                Ok(letters) => entries.extend(letters.into_iter().map(Entry::edge)),
                Err(error) => unreadable.push(Unreadable {
                    source_name: Source::Edge,
                    error: error.into(),
                }),
            }
        }
        if wanted(Source::Timeouts) {
            match commands::timeouts::dead_letters(&self.pool, filter.since).await {
                Ok(letters) => entries.extend(letters.into_iter().filter_map(Entry::timeouts)),
                Err(error) => unreadable.push(Unreadable {
                    source_name: Source::Timeouts,
                    error: error.into(),
                }),
            }
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        if filter.state.is_none_or(|state| state == State::Redriven) {
            // re-driven away from where they were parked: from the audit
            let sources: Vec<Source> = Source::ALL.into_iter().filter(|s| wanted(*s)).collect();
            for (id, record, snapshot) in audit::gone(&self.pool, &sources, &ids, filter.since).await? {
                entries.extend(Entry::gone(id, record, &snapshot).filter(|e| e.state == State::Redriven));
            }
        }
        let mut latest = audit::latest(&self.pool, &ids).await?;
        let mut entries: Vec<Entry> = entries
            .into_iter()
            .map(|entry| match latest.remove(&entry.id) {
                Some(record) => entry.with_action(Some(record)),
                // a gone entry carries its record already
                None if entry.last_action.is_some() => entry,
                None => entry.with_action(None),
            })
            .filter(|entry| filter.state.is_none_or(|state| entry.state == state))
            .filter(|entry| {
                filter
                    .event_type
                    .as_deref()
                    .is_none_or(|wanted| entry.event_type.as_deref() == Some(wanted))
            })
            .collect();
        entries.sort_by(|a, b| a.parked_at.cmp(&b.parked_at).then_with(|| a.id.cmp(&b.id)));
        Ok((entries, unreadable))
    }

    /// One entry where it is parked now (an edge entry re-driven is gone).
    pub async fn get(&self, id: &EntryId) -> Result<Option<Entry>, SourceError> {
        let entry = match id {
            EntryId::Events { sequence } => match self.dead_letters.get(*sequence).await? {
                // a projector's refusal is handled as its projections entry
                // (a re-drive rebuilds the document; publishing the event
                // again would find the document's version past it)
                Some(letter) => match self.projection_twin(&letter).await? {
                    Some(twin) => Some(twin),
                    None => Some(Entry::events(letter)),
                },
                None => None,
            },
            EntryId::Projections { projection, event_id } => {
                projections::dead_letters::get(&self.pool, projection.name(), *event_id)
                    .await?
                    .and_then(Entry::projections)
            }
            EntryId::Edge { voucher_id, entry_id } => {
                let mut kv = self.kv.clone();
                seckill_edge::dead_letters::get(&mut kv, &self.prefix, *voucher_id, entry_id)
                    .await?
                    .map(Entry::edge)
            }
            EntryId::Timeouts { order_id } => commands::timeouts::dead_letter(&self.pool, &order_id.to_string())
                .await?
                .and_then(Entry::timeouts),
        };
        let Some(entry) = entry else { return Ok(None) };
        let record = audit::latest(&self.pool, std::slice::from_ref(&entry.id))
            .await?
            .remove(&entry.id);
        Ok(Some(entry.with_action(record)))
    }

    /// The `projections` entry a JetStream dead letter of the projection
    /// daemon stands for, if the daemon recorded one.
    async fn projection_twin(&self, letter: &DeadLetter) -> Result<Option<Entry>, SourceError> {
        let Some(projection) = projections::Projection::of_consumer(&letter.consumer) else {
            return Ok(None);
        };
        let Some(event_id) = letter.original_msg_id.as_deref().and_then(|id| id.parse().ok()) else {
            return Ok(None);
        };
        Ok(projections::dead_letters::get(&self.pool, projection.name(), event_id)
            .await?
            .and_then(Entry::projections))
    }

    /// Re-drives `entry` (see the module doc), waiting up to `wait` to see
    /// how it ended where that is not known at once.
    pub async fn redrive(&self, entry: &Entry, wait: Duration) -> Result<Redrive, SourceError> {
        Ok(match &entry.raw {
            Raw::Events(letter) => {
                let before = self.dead_letters.last_sequence().await?;
                let redriven = self.dead_letters.redrive(letter).await?;
                let published = format!("published to {} as {}", letter.subject, redriven.msg_id);
                match self.dead_letters.outcome(letter, &redriven, before, wait).await? {
                    BusOutcome::Processed => Redrive {
                        outcome: Outcome::Redriven,
                        detail: format!("{published}; {} acknowledged it", letter.consumer),
                    },
                    BusOutcome::FailedAgain(again) => Redrive {
                        outcome: Outcome::FailedAgain,
                        detail: format!(
                            "{published}; parked again as events:{}: {}",
                            again.sequence, again.error
                        ),
                    },
                    BusOutcome::Unconfirmed(why) => Redrive {
                        outcome: Outcome::Unconfirmed,
                        detail: format!("{published}; {why}"),
                    },
                }
            }
            Raw::Projections(letter) => {
                let projection = projections::Projection::named(&letter.projection)
                    .ok_or_else(|| sqlx::Error::Protocol(format!("unknown projection {}", letter.projection)))?;
                match projections::dead_letters::rebuild(&self.pool, projection, &letter.aggregate_id).await? {
                    Rebuild::Rebuilt { version } => Redrive {
                        outcome: Outcome::Redriven,
                        detail: format!(
                            "document {} rebuilt from the event store up to version {version}",
                            letter.aggregate_id
                        ),
                    },
                    Rebuild::FailedAgain {
                        event_id,
                        sequence,
                        error,
                    } => Redrive {
                        outcome: Outcome::FailedAgain,
                        detail: format!(
                            "event {event_id} (#{sequence}) still does not apply: {error}; document unchanged"
                        ),
                    },
                    Rebuild::NoEvents => Redrive {
                        outcome: Outcome::FailedAgain,
                        detail: format!("the event store has no events for {}", letter.aggregate_id),
                    },
                }
            }
            Raw::Edge(letter) => {
                let mut kv = self.kv.clone();
                let moved =
                    seckill_edge::dead_letters::redrive(&mut kv, &self.prefix, letter.voucher_id, &letter.entry_id)
                        .await?;
                let Some(stream_id) = moved else {
                    return Ok(Redrive {
                        outcome: Outcome::Unconfirmed,
                        detail: "no longer parked: moved by another re-drive meanwhile".to_owned(),
                    });
                };
                let moved = format!("back in the voucher's stream as {stream_id}");
                match seckill_edge::dead_letters::outcome(&mut kv, &self.prefix, letter.voucher_id, &stream_id, wait)
                    .await?
                {
                    EdgeOutcome::Forwarded => Redrive {
                        outcome: Outcome::Redriven,
                        detail: format!("{moved}; the forwarder published it"),
                    },
                    EdgeOutcome::FailedAgain(again) => Redrive {
                        outcome: Outcome::FailedAgain,
                        detail: format!("{moved}; parked again as edge:{}:{}", again.voucher_id, again.entry_id),
                    },
                    EdgeOutcome::Unconfirmed => Redrive {
                        outcome: Outcome::Unconfirmed,
                        detail: format!("{moved}; still unread after {wait:?} (is a forwarder running?)"),
                    },
                }
            }
            Raw::Gone(_) => Redrive {
                outcome: Outcome::Unconfirmed,
                detail: "no longer parked".to_owned(),
            },
            Raw::Timeouts(letter) => {
                if !commands::timeouts::redrive_dead_letter(&self.pool, &letter.order_id).await? {
                    return Ok(Redrive {
                        outcome: Outcome::Unconfirmed,
                        detail: "no longer set aside: fired or re-driven meanwhile".to_owned(),
                    });
                }
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    match commands::timeouts::deadline_state(&self.pool, &letter.order_id).await? {
                        DeadlineState::Fired => {
                            break Redrive {
                                outcome: Outcome::Redriven,
                                detail: "back in line; the poller fired it".to_owned(),
                            };
                        }
                        DeadlineState::SetAside(error) => {
                            break Redrive {
                                outcome: Outcome::FailedAgain,
                                detail: format!("back in line; set aside again: {error}"),
                            };
                        }
                        DeadlineState::Waiting if tokio::time::Instant::now() >= deadline => {
                            break Redrive {
                                outcome: Outcome::Unconfirmed,
                                detail: format!("back in line; not fired within {wait:?} (is a command API running?)"),
                            };
                        }
                        DeadlineState::Waiting => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        })
    }
}
