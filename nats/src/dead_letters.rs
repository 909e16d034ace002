//! Reading and re-driving the dead-letter stream (`<NS>_DLQ`).
//!
//! The runner ([`crate::consumer`]) parks a message it gave up on as a copy:
//! payload, original headers (its `Nats-Msg-Id` kept as
//! `Cp-Dlq-Original-Msg-Id`), and `Cp-Dlq-*` headers saying which consumer
//! failed, on which stream message, how often, and why. Entries are never
//! deleted here: what was done with one is the audit's business (the
//! `citypicks-dlq` CLI), and the stream's age limit ends them.
//!
//! A re-drive publishes the original payload and headers to the original
//! subject again under a new `Nats-Msg-Id`, `redrive:<dead-letter
//! sequence>:<original id>`: new, so the stream stores it although the
//! original id is inside its duplicate window, and the same for every
//! re-drive of one entry, so two operators re-driving it at once store it
//! once. Every consumer of that stream gets it again; their handlers are
//! idempotent. Whether it then succeeded is read off the failing consumer's
//! ack floor and the dead-letter stream ([`DeadLetters::outcome`]).

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        consumer::{DeliverPolicy, pull},
        stream::{DirectGetErrorKind, Stream},
    },
};
use bytes::Bytes;
use events::subjects::{HDR_EVENT_TYPE, MSG_ID, Namespace};
use futures::StreamExt as _;

use crate::{
    consumer::{
        HDR_DLQ_CONSUMER, HDR_DLQ_DELIVERED, HDR_DLQ_ERROR, HDR_DLQ_ORIGINAL_MSG_ID, HDR_DLQ_STREAM,
        HDR_DLQ_STREAM_SEQ, HDR_DLQ_SUBJECT,
    },
    publisher::{Outgoing, Publisher},
};

/// The longest a listing waits for the next entry it knows is there.
const SCAN_IDLE: Duration = Duration::from_secs(5);

/// On a re-driven message: the dead-letter entry it came from.
pub const HDR_REDRIVEN_FROM: &str = "Cp-Redriven-From";

/// One entry of the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream: its id.
    pub sequence: u64,
    /// When it was parked.
    pub time: chrono::DateTime<chrono::Utc>,
    /// The durable consumer that gave up on it.
    pub consumer: String,
    /// Where the original was: stream, sequence there, subject.
    pub stream: String,
    pub stream_sequence: u64,
    pub subject: String,
    /// Why the consumer gave up.
    pub error: String,
    /// Deliveries the consumer made before it gave up.
    pub delivered: i64,
    /// The original `Nats-Msg-Id` (an event id, an order id), without the
    /// `redrive:` prefixes of earlier re-drives.
    pub original_msg_id: Option<String>,
    /// `Cp-Event-Type` of the original, when it had one.
    pub event_type: Option<String>,
    /// The original's headers (neither the `Cp-Dlq-*` ones nor the dedupe id).
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// A re-drive that JetStream stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redriven {
    pub msg_id: String,
    /// Its sequence in the original stream.
    pub sequence: u64,
    /// JetStream had it already (an earlier re-drive of the same entry).
    pub duplicate: bool,
}

/// What became of a re-drive.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The failing consumer acknowledged it without parking it again.
    Processed,
    /// The consumer parked it again: the new entry.
    FailedAgain(Box<DeadLetter>),
    /// Not known within the wait: the consumer has not got past it (behind,
    /// stopped, or no longer exists).
    Unconfirmed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot open the dead-letter stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot read the dead-letter stream {stream}")]
    Read {
        stream: String,
        #[source]
        source: jetstream::stream::DirectGetError,
    },
    #[error("cannot list the dead-letter stream {stream}")]
    Scan {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot read the dead-letter stream's state")]
    Info(#[source] jetstream::stream::InfoError),
    #[error("dead-letter entry {0} has no original subject: it cannot be re-driven")]
    NoSubject(u64),
    #[error("cannot re-publish dead-letter entry {sequence} to {subject}")]
    Publish {
        sequence: u64,
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// The dead-letter stream of one namespace.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    namespace: Namespace,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, namespace: Namespace) -> Self {
        Self { js, namespace }
    }

    async fn stream(&self) -> Result<Stream, DeadLetterError> {
        let name = self.namespace.dead_letter_stream();
        self.js
            .get_stream(&name)
            .await
            .map_err(|source| DeadLetterError::Stream { stream: name, source })
    }

    /// The stream's last sequence (0 when it never held anything).
    pub async fn last_sequence(&self) -> Result<u64, DeadLetterError> {
        let mut stream = self.stream().await?;
        let info = stream.info().await.map_err(DeadLetterError::Info)?;
        Ok(info.state.last_sequence)
    }

    /// Every entry after `after` (0: all), oldest first, parked at or after `since`.
    pub async fn list_after(
        &self,
        after: u64,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<DeadLetter>, DeadLetterError> {
        Ok(self.scan(after, since).await?.into_iter().map(|p| p.letter).collect())
    }

    async fn scan(
        &self,
        after: u64,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<Parsed>, DeadLetterError> {
        let mut stream = self.stream().await?;
        let state = stream.info().await.map_err(DeadLetterError::Info)?.state.clone();
        let last = state.last_sequence;
        // (entries leave only from the front, by age: with any left after
        // `after`, the consumer below has one to deliver)
        if last <= after || state.messages == 0 {
            return Ok(Vec::new());
        }
        // One ordered consumer streams the entries in batches (no acks, gone
        // when dropped): a direct get per entry costs a round trip each, tens
        // of seconds for the 100,000 entries a bad month could keep.
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|source| self.scan_error(source))?;
        let mut messages = consumer.messages().await.map_err(|source| self.scan_error(source))?;
        let mut letters = Vec::new();
        loop {
            let next = tokio::time::timeout(SCAN_IDLE, messages.next())
                .await
                .map_err(|source| self.scan_error(source))?;
            let Some(message) = next else { break };
            let message = message.map_err(|source| self.scan_error(source))?;
            let (sequence, time, pending) = {
                let info = message.info().map_err(|source| self.scan_error(source))?;
                (info.stream_sequence, info.published, info.pending)
            };
            let message = message.split().0;
            let letter = parse_with_id(jetstream::message::StreamMessage {
                subject: message.subject,
                sequence,
                headers: message.headers.unwrap_or_default(),
                payload: message.payload,
                time,
            });
            if since.is_none_or(|since| letter.letter.time >= since) {
                letters.push(letter);
            }
            // the entries parked meanwhile are for the next listing
            if pending == 0 || sequence >= last {
                break;
            }
        }
        Ok(letters)
    }

    fn scan_error(&self, source: impl Into<async_nats::Error>) -> DeadLetterError {
        DeadLetterError::Scan {
            stream: self.namespace.dead_letter_stream(),
            source: source.into(),
        }
    }

    /// One entry by its sequence.
    pub async fn get(&self, sequence: u64) -> Result<Option<DeadLetter>, DeadLetterError> {
        let stream = self.stream().await?;
        match stream.direct_get(sequence).await {
            Ok(message) => Ok(Some(parse(message))),
            Err(error) if matches!(error.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(source) => Err(DeadLetterError::Read {
                stream: self.namespace.dead_letter_stream(),
                source,
            }),
        }
    }

    /// Publishes `letter`'s original again (see the module doc).
    pub async fn redrive(&self, letter: &DeadLetter) -> Result<Redriven, DeadLetterError> {
        if letter.subject.is_empty() {
            return Err(DeadLetterError::NoSubject(letter.sequence));
        }
        let original = letter
            .original_msg_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", letter.stream, letter.stream_sequence));
        let msg_id = format!("redrive:{}:{original}", letter.sequence);
        let mut headers = HeaderMap::new();
        for (name, value) in &letter.headers {
            headers.append(name.as_str(), value.as_str());
        }
        headers.insert(HDR_REDRIVEN_FROM, letter.sequence.to_string().as_str());
        let outgoing = Outgoing {
            subject: letter.subject.clone(),
            msg_id: msg_id.clone(),
            headers,
            payload: letter.payload.clone(),
        };
        let ack = Publisher::new(self.js.clone(), 1)
            .publish(outgoing)
            .await
            .map_err(|source| DeadLetterError::Publish {
                sequence: letter.sequence,
                subject: letter.subject.clone(),
                source,
            })?;
        Ok(Redriven {
            msg_id,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Waits up to `wait` for `letter`'s consumer to get past `redriven`,
    /// then tells whether it parked it again (an entry after `before`, the
    /// stream's last sequence before the re-drive).
    pub async fn outcome(
        &self,
        letter: &DeadLetter,
        redriven: &Redriven,
        before: u64,
        wait: Duration,
    ) -> Result<Outcome, DeadLetterError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.acked_past(letter, redriven.sequence).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(reason) if tokio::time::Instant::now() >= deadline => return Ok(Outcome::Unconfirmed(reason)),
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Outcome::Unconfirmed(format!(
                    "consumer {} has not got past stream sequence {} within {wait:?}",
                    letter.consumer, redriven.sequence
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // the runner parks a message before it terminates it, so once the
        // ack floor is past it, a new entry for it is already stored
        let parked_as = format!("dlq:{}:{}", letter.consumer, redriven.msg_id);
        let again = self
            .scan(before, None)
            .await?
            .into_iter()
            .find(|entry| entry.dlq_msg_id.as_deref() == Some(parked_as.as_str()));
        Ok(again.map_or(Outcome::Processed, |entry| Outcome::FailedAgain(Box::new(entry.letter))))
    }

    async fn acked_past(&self, letter: &DeadLetter, sequence: u64) -> Result<bool, String> {
        let stream = self
            .js
            .get_stream(&letter.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", letter.stream))?;
        let mut consumer = stream
            .get_consumer::<pull::Config>(&letter.consumer)
            .await
            .map_err(|e| format!("consumer {} on {}: {e}", letter.consumer, letter.stream))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| format!("consumer {} on {}: {e}", letter.consumer, letter.stream))?;
        Ok(info.ack_floor.stream_sequence >= sequence)
    }
}

/// An entry as parsed, with its own dedupe id (which tells a re-drive's
/// failure apart from others).
struct Parsed {
    letter: DeadLetter,
    dlq_msg_id: Option<String>,
}

fn parse(message: jetstream::message::StreamMessage) -> DeadLetter {
    parse_with_id(message).letter
}

fn parse_with_id(message: jetstream::message::StreamMessage) -> Parsed {
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    let headers = message
        .headers
        .iter()
        .filter(|(name, _)| {
            let name: &str = name.as_ref();
            !name.starts_with("Cp-Dlq-") && name != MSG_ID && name != HDR_REDRIVEN_FROM
        })
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |value| (name.to_owned(), value.as_str().to_owned()))
        })
        .collect();
    let time =
        chrono::DateTime::from_timestamp_nanos(i64::try_from(message.time.unix_timestamp_nanos()).unwrap_or(i64::MAX));
    Parsed {
        dlq_msg_id: header(MSG_ID),
        letter: DeadLetter {
            sequence: message.sequence,
            time,
            consumer: header(HDR_DLQ_CONSUMER).unwrap_or_default(),
            stream: header(HDR_DLQ_STREAM).unwrap_or_default(),
            stream_sequence: header(HDR_DLQ_STREAM_SEQ).and_then(|s| s.parse().ok()).unwrap_or(0),
            subject: header(HDR_DLQ_SUBJECT).unwrap_or_default(),
            error: header(HDR_DLQ_ERROR).unwrap_or_default(),
            delivered: header(HDR_DLQ_DELIVERED).and_then(|s| s.parse().ok()).unwrap_or(0),
            original_msg_id: header(HDR_DLQ_ORIGINAL_MSG_ID).map(|id| original_id(&id).to_owned()),
            event_type: header(HDR_EVENT_TYPE),
            headers,
            payload: message.payload,
        },
    }
}

/// `redrive:<n>:redrive:<m>:<id>` → `<id>`.
fn original_id(id: &str) -> &str {
    let mut id = id;
    while let Some(rest) = id.strip_prefix("redrive:")
        && let Some((number, rest)) = rest.split_once(':')
        && number.bytes().all(|b| b.is_ascii_digit())
    {
        id = rest;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::original_id;

    #[test]
    fn re_drive_prefixes_are_peeled_off_the_original_id() {
        assert_eq!(original_id("0191-abc"), "0191-abc");
        assert_eq!(original_id("redrive:5:0191-abc"), "0191-abc");
        assert_eq!(original_id("redrive:7:redrive:5:0191-abc"), "0191-abc");
        assert_eq!(original_id("redrive:x:0191"), "redrive:x:0191");
    }
}
