//! Messages a consumer was delivered `max_deliver` times without ever
//! settling them: its process crashed, hung or was killed on each delivery.
//!
//! The runner dead-letters a message on its last failed delivery, but only
//! when it lives to see the failure. A message that kills its consumer's
//! process every time is delivered `max_deliver` times, and then JetStream
//! stops delivering it, leaving nothing but an advisory on
//! `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`.
//! Advisories are plain NATS messages, lost when no one listens (and the
//! process that would listen is the one crash-looping), so the topology
//! captures them in a stream of their own (`<NS>_ADVISORIES`, one subject per
//! stream it defines). [`ExhaustedDeliveries`], a durable consumer of that
//! stream shared by every instance that runs it (the command API and the
//! projection daemon), copies each such message to the dead-letter stream as
//! the runner would have, with the reason. The copy's id is the runner's
//! (`dlq:<consumer>:<original id>`), so a message both dead-lettered by the
//! runner and reported by an advisory is kept once. From there the
//! dead-letter CLI shows it, re-drives it or drops it like any other.

use std::{future::Future, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, context::GetStreamErrorKind, stream::DirectGetErrorKind},
};
use bytes::Bytes;
use events::subjects::{MSG_ID, Namespace};
use serde::Deserialize;

use crate::{
    ConsumerRunner, ConsumerSpec, Handler, HandlerError, Publisher, RunnerConfig,
    consumer::{Failure, RunnerError, dead_letter_copy},
    ensure_consumer, permanent,
    topology::TopologyError,
};

/// The durable consumer on the advisories stream.
pub const EXHAUSTED_DELIVERIES_CONSUMER: &str = "exhausted-deliveries";

/// The subject JetStream announces `stream`'s exhausted messages on, any consumer.
pub fn max_deliveries_subject(stream: &str) -> String {
    advisory_subject(stream, "*")
}

fn advisory_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// The stream sequences of `stream`'s messages that `consumer` used up its
/// deliveries on, from the advisories kept after position `after` of the
/// advisories stream; with the last position read (the next call's `after`).
///
/// For a reader that re-drives messages by itself, around JetStream (the
/// claim writer's requests reconciler): a message that killed its consumer
/// every time would kill the reader too.
pub async fn exhausted_after(
    js: &jetstream::Context,
    namespace: &Namespace,
    stream: &str,
    consumer: &str,
    after: u64,
) -> Result<(Vec<u64>, u64), async_nats::Error> {
    let advisories = js.get_stream(namespace.advisories_stream()).await?;
    let subject = advisory_subject(stream, consumer);
    let (mut sequences, mut last) = (Vec::new(), after);
    loop {
        match advisories
            .direct_get_next_for_subject(subject.as_str(), Some(last + 1))
            .await
        {
            Ok(message) => {
                last = message.sequence;
                if let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&message.payload) {
                    sequences.push(advisory.stream_seq);
                }
            }
            Err(error) if matches!(error.kind(), DirectGetErrorKind::NotFound) => return Ok((sequences, last)),
            Err(error) => return Err(error.into()),
        }
    }
}

/// What the advisory says (`io.nats.jetstream.advisory.v1.max_deliver`).
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExhaustedError {
    #[error("cannot set up the consumer of exhausted deliveries")]
    Consumer(#[source] TopologyError),
    #[error("the consumer of exhausted deliveries stopped")]
    Runner(#[source] RunnerError),
}

/// Copies the messages named by max-deliveries advisories to the dead-letter
/// stream (see the module doc).
#[derive(Debug, Clone)]
pub struct ExhaustedDeliveries {
    js: jetstream::Context,
    dead_letters: Publisher,
    namespace: Namespace,
}

impl ExhaustedDeliveries {
    pub fn new(js: jetstream::Context, dead_letters: Publisher, namespace: Namespace) -> Self {
        Self {
            js,
            dead_letters,
            namespace,
        }
    }

    /// Consumes the advisories until `shutdown` resolves. A failure (the
    /// consumer cannot be created, the pull breaks for good) is retried
    /// with backoff, never left stopped: nobody else would park these.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop = tokio_util::sync::CancellationToken::new();
        let watching = stop.clone();
        let work = async move {
            let mut delay = Duration::from_secs(1);
            loop {
                match self.clone().run_once(watching.clone().cancelled_owned()).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::error!(
                            error = %platform::errors::DisplayChain(&error), retry_in_s = delay.as_secs(),
                            "the consumer of exhausted deliveries stopped; starting it again"
                        );
                    }
                }
                if watching.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        };
        tokio::join!(work, async move {
            shutdown.await;
            stop.cancel();
        });
    }

    async fn run_once(self, shutdown: impl Future<Output = ()>) -> Result<(), ExhaustedError> {
        let spec = ConsumerSpec::new(self.namespace.advisories_stream(), EXHAUSTED_DELIVERIES_CONSUMER).max_deliver(10);
        let consumer = ensure_consumer(&self.js, &spec)
            .await
            .map_err(ExhaustedError::Consumer)?;
        let (publisher, namespace) = (self.dead_letters.clone(), self.namespace.clone());
        let config = RunnerConfig {
            max_deliver: 10,
            ..RunnerConfig::default()
        };
        ConsumerRunner::new(consumer, self, publisher, namespace, config)
            .run(shutdown)
            .await
            .map_err(ExhaustedError::Runner)
    }
}

impl Handler for ExhaustedDeliveries {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandlerError> {
        let advisory: MaxDeliveries = serde_json::from_slice(&message.payload)
            .map_err(|error| permanent(format!("not a max-deliveries advisory: {error}")))?;
        let stream = match self.js.get_stream(&advisory.stream).await {
            Ok(stream) => stream,
            Err(error)
                if matches!(
                    error.kind(),
                    GetStreamErrorKind::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return Err(permanent(format!("stream {} is gone", advisory.stream)));
            }
            Err(error) => return Err(error.into()),
        };
        let original = match stream.direct_get(advisory.stream_seq).await {
            Ok(original) => Some(original),
            Err(error) if matches!(error.kind(), DirectGetErrorKind::NotFound) => None,
            Err(error) => return Err(error.into()),
        };
        let why = format!(
            "delivered {} times without an outcome: the consumer's process crashed, hung or was stopped on it each time",
            advisory.deliveries
        );
        let headers = original.as_ref().map(|original| published_headers(&original.headers));
        let (subject, payload, error) = match &original {
            Some(original) => (original.subject.to_string(), original.payload.clone(), why),
            // aged out of its stream since: the entry still says what was lost
            None => (
                String::new(),
                Bytes::new(),
                format!("{why}; it is no longer in its stream"),
            ),
        };
        let copy = dead_letter_copy(
            &self.namespace,
            &Failure {
                consumer: &advisory.consumer,
                stream: &advisory.stream,
                stream_sequence: advisory.stream_seq,
                subject: &subject,
                delivered: advisory.deliveries,
                error: &error,
            },
            headers.as_ref(),
            payload,
        );
        self.dead_letters.publish(copy).await?;
        tracing::error!(
            consumer = %advisory.consumer, stream = %advisory.stream, stream_sequence = advisory.stream_seq,
            deliveries = advisory.deliveries, "message exhausted its deliveries; dead-lettered"
        );
        // counted as the runner counts its dead letters: the same alert fires
        metrics::counter!("nats_consumer_messages_total", "consumer" => advisory.consumer, "outcome" => "dead_lettered")
            .increment(1);
        Ok(())
    }
}

/// The headers the message was published with: a direct get adds the
/// server's own (`Nats-Stream`, `Nats-Sequence`, `Nats-Time-Stamp`,
/// `Nats-Subject`), which a re-drive must not publish again.
fn published_headers(headers: &HeaderMap) -> HeaderMap {
    let mut published = HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("Nats-") && name != MSG_ID {
            continue;
        }
        for value in values {
            published.append(name.to_owned(), value.as_str());
        }
    }
    published
}
