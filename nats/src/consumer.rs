//! Running a durable pull consumer.
//!
//! Per message: call the handler; on success ack (the handler has committed its
//! effects, so a crash before the ack means a redelivery the handler must treat
//! as a no-op). Failures are sorted: a transient one (a server away, a
//! conflict) is retried with `Nak(Some(delay))` and exponential backoff (a
//! plain NAK ignores the consumer's backoff), and dead-lettered on the
//! `max_deliver`-th failure; a [`Permanent`] one (a payload that can never
//! succeed) is dead-lettered at once. Dead-lettering publishes a copy to the
//! dead-letter stream — payload, original headers, the error and where it
//! came from — then `Term`s the message so the consumer moves on.
//!
//! Work resumes within seconds of any fault, not after an ack wait:
//! - a batch the handler takes long over gets progress acks every third of
//!   the consumer's ack wait, so the ack wait can be short ([`crate::topology::DEFAULT_ACK_WAIT`])
//!   and a dead process's messages come back quickly;
//! - a runner with a [`Probe`] asks it, after a transient failure, whether its
//!   dependency (the database) is away; if so it holds the failed messages
//!   (progress-acked, so no delivery attempt is spent) and retries them as
//!   soon as the probe answers again, instead of burning `max_deliver`
//!   attempts and dead-lettering messages that were never wrong;
//! - on shutdown (or lost leadership) it finishes the batch in hand and
//!   `Nak`s what it holds, so another instance gets them at once; what the
//!   pull had delivered but the runner had not taken yet (and everything a
//!   killed process held) comes back after the short ack wait.
//!
//! Nothing stays stuck: a batch that takes longer than
//! [`RunnerConfig::handler_timeout`] is abandoned as a transient failure
//! (progress acks would otherwise keep a hung handler's messages forever),
//! and a message whose process died on every delivery is dead-lettered from
//! JetStream's advisory by [`crate::exhausted`].

use std::{future::Future, pin::Pin, pin::pin, sync::Arc, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        consumer::{Consumer, pull},
        message::AckKind,
    },
};
use events::subjects::{MSG_ID, Namespace};
use futures::StreamExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::publisher::{Outgoing, Publisher};

pub const HDR_DLQ_ERROR: &str = "Cp-Dlq-Error";
pub const HDR_DLQ_CONSUMER: &str = "Cp-Dlq-Consumer";
pub const HDR_DLQ_STREAM: &str = "Cp-Dlq-Stream";
pub const HDR_DLQ_STREAM_SEQ: &str = "Cp-Dlq-Stream-Seq";
pub const HDR_DLQ_SUBJECT: &str = "Cp-Dlq-Subject";
pub const HDR_DLQ_DELIVERED: &str = "Cp-Dlq-Delivered";
/// The parked message's own `Nats-Msg-Id` (its event or order id).
pub const HDR_DLQ_ORIGINAL_MSG_ID: &str = "Cp-Dlq-Original-Msg-Id";

/// A handler failure; the runner retries it and finally dead-letters it,
/// unless it is [`Permanent`].
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A failure that no retry can cure (the payload does not decode, a value
/// the store can never hold): the runner dead-letters it at once, with its
/// reason, instead of retrying it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(#[source] pub HandlerError);

/// Marks `error` as [`Permanent`].
pub fn permanent(error: impl Into<HandlerError>) -> HandlerError {
    Box::new(Permanent(error.into()))
}

/// Whether the runner will dead-letter `error` without retrying it.
pub fn is_permanent(error: &HandlerError) -> bool {
    error.downcast_ref::<Permanent>().is_some()
}

/// Whether a runner's dependency (its database, say) answers: `true` when
/// it does. Asked after a transient failure; bounded by the runner to 1 s.
pub type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// A [`Probe`] from an async closure.
pub fn probe<F, Fut>(check: F) -> Probe
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Arc::new(move || Box::pin(check()))
}

pub trait Handler: Send + Sync + 'static {
    /// Handles one message. Must be idempotent: the same message may come again.
    fn handle(&self, message: &jetstream::Message) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<H: Handler> Handler for Arc<H> {
    fn handle(&self, message: &jetstream::Message) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(message)
    }
}

/// Handles the messages that are ready together (one transaction for many),
/// answering one outcome per message, in order, so one poison message does
/// not fail its neighbours.
pub trait BatchHandler: Send + Sync + 'static {
    fn handle_batch(
        &self,
        messages: &[jetstream::Message],
    ) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send;

    /// Whether the handler starts a span per message itself; otherwise the
    /// runner runs each batch in a span joined to the messages' traces
    /// ([`platform::telemetry::batch_span`]).
    fn traces_each_message(&self) -> bool {
        false
    }

    /// Whether the handler bounds each message by the runner's
    /// [`RunnerConfig::handler_timeout`] itself; otherwise the runner bounds
    /// each batch by it.
    fn bounds_each_message(&self) -> bool {
        false
    }
}

/// A handler that took longer than [`RunnerConfig::handler_timeout`]: the
/// attempt is abandoned, and counts as a transient failure.
#[derive(Debug, thiserror::Error)]
#[error("the handler took longer than {0:?}; attempt abandoned")]
pub struct TimedOut(pub Duration);

/// Adapts a per-message [`Handler`]: messages are handled one after another,
/// each bounded by its own timeout (one message that hangs does not fail
/// its neighbours, and many slow ones are not one long batch).
#[derive(Debug)]
pub struct OneByOne<H> {
    handler: H,
    timeout: Duration,
}

impl<H> OneByOne<H> {
    pub fn new(handler: H, timeout: Duration) -> Self {
        Self { handler, timeout }
    }
}

impl<H: Handler> BatchHandler for OneByOne<H> {
    fn traces_each_message(&self) -> bool {
        true
    }

    fn bounds_each_message(&self) -> bool {
        true
    }

    async fn handle_batch(&self, messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            // a span only when the message's trace is recorded; without one
            // the handler still passes the message's trace context on
            let parent = message
                .headers
                .as_ref()
                .map(platform::telemetry::extract_nats)
                .unwrap_or_default();
            let span = platform::telemetry::child_span(
                &parent,
                || tracing::info_span!("consume", otel.name = "consume", otel.kind = "consumer", subject = %message.subject),
            );
            let handled = platform::telemetry::with_remote_parent(parent, self.handler.handle(message));
            let outcome = tokio::time::timeout(self.timeout, handled.instrument(span))
                .await
                .unwrap_or_else(|_| Err(Box::new(TimedOut(self.timeout))));
            outcomes.push(outcome);
        }
        outcomes
    }
}

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Deliveries before dead-lettering; match the consumer's `max_deliver`.
    pub max_deliver: i64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Messages pulled per request, and the most handed to a batch handler.
    pub batch: usize,
    /// After the first message of a batch, how long to wait for more.
    pub linger: Duration,
    /// The longest a message may take (with [`ConsumerRunner::new`]'s
    /// per-message handlers), or a batch (batch handlers, whose batch is one
    /// unit of work). Progress acks keep messages in hand for as long as the
    /// handler works on them, so a handler that hangs would hold them (and
    /// its consumer) forever: past this bound the attempt is abandoned and
    /// counts as a transient failure ([`TimedOut`]) of each message in it:
    /// retried with backoff, dead-lettered after `max_deliver`. Handlers are
    /// idempotent, so an abandoned attempt that had committed part of its
    /// work is harmless.
    pub handler_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_deliver: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            batch: 256,
            linger: Duration::from_millis(2),
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
        }
    }
}

/// [`RunnerConfig::handler_timeout`]'s default: far beyond any batch seen
/// (a projection batch of 2,000 events takes well under a second; a
/// database that is away fails a handler within its pool's 5 s acquire
/// timeout).
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

impl RunnerConfig {
    /// Delay before the next delivery after the `delivered`-th failure.
    pub fn backoff(&self, delivered: i64) -> Duration {
        let exponent = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
        self.backoff_base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.backoff_max)
    }
}

pub struct ConsumerRunner<H> {
    name: String,
    consumer: Consumer<pull::Config>,
    handler: Arc<H>,
    dead_letters: Publisher,
    namespace: Namespace,
    config: RunnerConfig,
    /// `nats_consumer_messages_total{outcome="processed"}`, registered once:
    /// it is counted for every message.
    processed: metrics::Counter,
    /// `nats_consumer_handle_seconds`, registered once.
    handle_seconds: metrics::Histogram,
    /// Asked after a transient failure: is the dependency away?
    probe: Option<Probe>,
    /// How often held or long-handled messages get a progress ack.
    progress_every: Duration,
}

impl<H> std::fmt::Debug for ConsumerRunner<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerRunner")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("probe", &self.probe.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot pull from consumer {consumer}: {source}")]
    Pull { consumer: String, source: HandlerError },
}

impl<H: Handler> ConsumerRunner<OneByOne<H>> {
    /// A runner that hands messages to `handler` one at a time.
    pub fn new(
        consumer: Consumer<pull::Config>,
        handler: H,
        dead_letters: Publisher,
        namespace: Namespace,
        config: RunnerConfig,
    ) -> Self {
        let handler = OneByOne::new(handler, config.handler_timeout);
        Self::batched(consumer, handler, dead_letters, namespace, config)
    }
}

impl<H: BatchHandler> ConsumerRunner<H> {
    /// A runner that hands every ready message (up to `config.batch`) to `handler` at once.
    pub fn batched(
        consumer: Consumer<pull::Config>,
        handler: H,
        dead_letters: Publisher,
        namespace: Namespace,
        config: RunnerConfig,
    ) -> Self {
        let name = consumer.cached_info().name.clone();
        let progress_every = (consumer.cached_info().config.ack_wait / 3).max(Duration::from_millis(100));
        Self {
            probe: None,
            progress_every,
            processed: metrics::counter!("nats_consumer_messages_total", "consumer" => name.clone(), "outcome" => "processed"),
            handle_seconds: metrics::histogram!("nats_consumer_handle_seconds", "consumer" => name.clone()),
            name,
            consumer,
            handler: Arc::new(handler),
            dead_letters,
            namespace,
            config,
        }
    }

    /// Holds messages while `probe` says the dependency is away (see the module doc).
    pub fn with_probe(mut self, probe: Probe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Processes messages until `shutdown` resolves, then finishes the batch
    /// in hand and gives back (`Nak`) the messages it holds. A lost
    /// connection is retried; only a consumer that cannot be pulled at all
    /// is an error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunnerError> {
        let stop = CancellationToken::new();
        let running = pin!(self.run_until(stop.clone()));
        tokio::select! {
            biased;
            result = running => result,
            // never completes: the runner returns once it has settled what it holds
            never = async {
                shutdown.await;
                stop.cancel();
                std::future::pending::<Result<(), RunnerError>>().await
            } => never,
        }
    }

    async fn run_until(&self, stop: CancellationToken) -> Result<(), RunnerError> {
        loop {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(self.config.batch)
                // a pull whose requests died with a node of the cluster is
                // noticed after two missed heartbeats: keep that short
                .heartbeat(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|source| RunnerError::Pull {
                    consumer: self.name.clone(),
                    source: Box::new(source),
                })?;
            // boxed so it can be dropped before what it held is given back
            let mut stream = Box::pin(stream);
            loop {
                let first = tokio::select! {
                    // What the pull delivered but the runner has not taken comes
                    // back after the (short) ack wait: polling the stream to take
                    // it would pull more.
                    () = stop.cancelled() => return Ok(()),
                    next = stream.next() => next,
                };
                let mut batch = match first {
                    Some(Ok(message)) => vec![message],
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %self.name, %error, "pull stream error; re-subscribing");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                    None => break,
                };
                // Whatever else is ready joins the batch; a short linger lets a
                // burst fill it without delaying a lone message noticeably.
                while batch.len() < self.config.batch {
                    match tokio::time::timeout(self.config.linger, stream.next()).await {
                        Ok(Some(Ok(message))) => batch.push(message),
                        _ => break,
                    }
                }
                let mut held = self.process(batch).await;
                while !held.is_empty() {
                    if !self.hold(&mut held, &mut stream.as_mut(), &stop).await {
                        // The pull goes first: while it is open, JetStream sends
                        // a Nak'd message straight back to it, and it would
                        // leave with this process, back only after the ack wait
                        // (measured: the first messages given back went missing
                        // for the next runner). Unsubscribing is sent before the
                        // Naks on the same connection, so the server has it first.
                        drop(stream);
                        for message in &held {
                            give_back(message).await;
                        }
                        return Ok(());
                    }
                    // the dependency answers again: retry in batches, in order
                    let mut retry = std::mem::take(&mut held).into_iter();
                    loop {
                        let chunk: Vec<_> = retry.by_ref().take(self.config.batch).collect();
                        if chunk.is_empty() {
                            break;
                        }
                        held = self.process(chunk).await;
                        if !held.is_empty() {
                            held.extend(retry);
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Handles `batch` and settles it, except the messages that failed while
    /// the dependency is away: those are returned, still unsettled, to hold.
    async fn process(&self, batch: Vec<jetstream::Message>) -> Vec<jetstream::Message> {
        let started = Instant::now();
        let outcomes = self.handle_with_progress(&batch).await;
        self.handle_seconds.record(started.elapsed().as_secs_f64());
        let mut outcomes = outcomes.into_iter();
        let mut failed = Vec::new();
        for message in batch {
            match outcomes
                .next()
                .unwrap_or_else(|| Err("the handler returned no outcome".into()))
            {
                Err(error) if !is_permanent(&error) => failed.push((message, error)),
                outcome => self.settle(message, outcome).await,
            }
        }
        if failed.is_empty() {
            return Vec::new();
        }
        if self.dependency_answers().await {
            for (message, error) in failed {
                self.settle(message, Err(error)).await;
            }
            return Vec::new();
        }
        // The dependency is away: these messages are not at fault.
        tracing::warn!(
            consumer = %self.name, held = failed.len(), error = %failed[0].1,
            "dependency unavailable; holding messages until it answers"
        );
        failed.into_iter().map(|(message, _)| message).collect()
    }

    /// Holds `held` until the probe answers (`true`) or `stop` (`false`):
    /// progress acks keep them (and whatever else the pull delivers, which
    /// joins them) from being redelivered, so no delivery attempt is spent.
    async fn hold<S>(
        &self,
        held: &mut Vec<jetstream::Message>,
        stream: &mut Pin<&mut S>,
        stop: &CancellationToken,
    ) -> bool
    where
        S: futures::Stream<Item = Result<jetstream::Message, pull::MessagesError>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut next_probe = Instant::now() + delay;
        let mut next_keep_alive = Instant::now() + self.progress_every;
        let mut pulling = true;
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    self.count_held(0);
                    return false;
                }
                next = stream.next(), if pulling => match next {
                    Some(Ok(message)) => held.push(message),
                    // a broken pull would answer at once, again and again: stop
                    // pulling (what it would have delivered comes back later)
                    Some(Err(error)) => {
                        tracing::debug!(consumer = %self.name, %error, "pull error while holding; no longer pulling");
                        pulling = false;
                    }
                    None => pulling = false,
                },
                () = tokio::time::sleep_until(next_keep_alive) => {
                    keep_alive(held).await;
                    next_keep_alive = Instant::now() + self.progress_every;
                }
                () = tokio::time::sleep_until(next_probe) => {
                    if self.dependency_answers().await {
                        tracing::info!(consumer = %self.name, held = held.len(), "dependency answers again; retrying held messages");
                        self.count_held(0);
                        return true;
                    }
                    self.count_held(held.len());
                    delay = (delay * 2).min(Duration::from_secs(1));
                    next_probe = Instant::now() + delay;
                }
            }
        }
    }

    fn count_held(&self, held: usize) {
        metrics::gauge!("nats_consumer_held_messages", "consumer" => self.name.clone()).set(held as f64);
    }

    /// The handler's outcomes, with progress acks while it takes long.
    async fn handle_with_progress(&self, batch: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        let span = if self.handler.traces_each_message() || !platform::telemetry::exporting() {
            tracing::Span::none()
        } else {
            let parents: Vec<_> = batch
                .iter()
                .filter_map(|message| message.headers.as_ref().map(platform::telemetry::extract_nats))
                .collect();
            platform::telemetry::batch_span(&parents, || {
                tracing::info_span!(
                    "consume_batch",
                    otel.name = "consume_batch",
                    otel.kind = "consumer",
                    consumer = %self.name,
                    messages = batch.len()
                )
            })
        };
        let mut handling = pin!(self.handler.handle_batch(batch).instrument(span));
        let mut tick = tokio::time::interval_at(Instant::now() + self.progress_every, self.progress_every);
        // a handler that bounds each message is given as long as it takes
        let timeout = self.config.handler_timeout;
        let bound = if self.handler.bounds_each_message() {
            None
        } else {
            Some(timeout)
        };
        let mut deadline = pin!(tokio::time::sleep(bound.unwrap_or(Duration::MAX)));
        let outcomes = loop {
            tokio::select! {
                outcomes = &mut handling => break outcomes,
                _ = tick.tick() => keep_alive(batch).await,
                () = &mut deadline, if bound.is_some() => {
                    break batch.iter().map(|_| Err(Box::new(TimedOut(timeout)) as HandlerError)).collect();
                }
            }
        };
        let timed_out = outcomes
            .iter()
            .filter(|outcome| outcome.as_ref().is_err_and(|error| error.is::<TimedOut>()))
            .count();
        if timed_out > 0 {
            tracing::error!(
                consumer = %self.name, timed_out, timeout_ms = timeout.as_millis() as u64,
                "handler took too long; attempt abandoned"
            );
            metrics::counter!("nats_consumer_messages_total", "consumer" => self.name.clone(), "outcome" => "timed_out")
                .increment(timed_out as u64);
        }
        outcomes
    }

    /// Whether the probe (if any) answers within 1 s.
    async fn dependency_answers(&self) -> bool {
        let Some(probe) = &self.probe else { return true };
        tokio::time::timeout(Duration::from_secs(1), probe())
            .await
            .unwrap_or(false)
    }

    async fn settle(&self, message: jetstream::Message, outcome: Result<(), HandlerError>) {
        let (stream_name, stream_sequence, delivered) = match message.info() {
            Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::error!(consumer = %self.name, %error, "message without JetStream info; terminating it");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        match outcome {
            Ok(()) => {
                self.processed.increment(1);
                if let Err(error) = message.ack().await {
                    // The effects are committed; the redelivery will be a no-op.
                    tracing::warn!(consumer = %self.name, %error, "ack failed");
                }
            }
            Err(error) if is_permanent(&error) => {
                tracing::error!(
                    consumer = %self.name, %error, msg_id = msg_id(&message), stream_sequence,
                    "message can never succeed; dead-lettering it at once"
                );
                self.count("permanent_failure");
                self.dead_letter(&message, &stream_name, stream_sequence, delivered, &error)
                    .await;
            }
            Err(error) if delivered >= self.config.max_deliver => {
                tracing::error!(
                    consumer = %self.name, %error, msg_id = msg_id(&message), stream_sequence,
                    "giving up on message; dead-lettering it"
                );
                self.dead_letter(&message, &stream_name, stream_sequence, delivered, &error)
                    .await;
            }
            Err(error) => {
                let delay = self.config.backoff(delivered);
                tracing::warn!(
                    consumer = %self.name, %error, msg_id = msg_id(&message), delivered,
                    retry_in_ms = delay.as_millis() as u64, "handler failed; will retry"
                );
                self.count("retried");
                if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(%error, "nak failed; redelivery after ack_wait");
                }
            }
        }
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        stream_name: &str,
        stream_sequence: u64,
        delivered: i64,
        error: &HandlerError,
    ) {
        let outgoing = dead_letter_copy(
            &self.namespace,
            &Failure {
                consumer: &self.name,
                stream: stream_name,
                stream_sequence,
                subject: message.subject.as_str(),
                delivered,
                error: &error.to_string(),
            },
            message.headers.as_ref(),
            message.payload.clone(),
        );
        match self.dead_letters.publish(outgoing).await {
            Ok(_) => {
                self.count("dead_lettered");
                if let Err(error) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(%error, "term failed; the message will come once more and be deduped");
                }
            }
            Err(error) => {
                // Not stored anywhere yet: leave it to redelivery rather than lose it.
                tracing::error!(%error, "dead-letter publish failed; message stays pending");
                let _ = message.ack_with(AckKind::Nak(Some(self.config.backoff_max))).await;
            }
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("nats_consumer_messages_total", "consumer" => self.name.clone(), "outcome" => outcome)
            .increment(1);
    }
}

/// Where and why a message failed, for its dead-letter copy.
#[derive(Debug)]
pub(crate) struct Failure<'a> {
    pub consumer: &'a str,
    pub stream: &'a str,
    pub stream_sequence: u64,
    /// The message's own subject (where a re-drive publishes it again).
    pub subject: &'a str,
    pub delivered: i64,
    pub error: &'a str,
}

/// The dead-letter stream's copy of a message: its payload and headers (its
/// `Nats-Msg-Id` kept under [`HDR_DLQ_ORIGINAL_MSG_ID`]), and the failure.
/// Its own id is `dlq:<consumer>:<original id>`, the same however often and
/// by whoever it is written, so the dead-letter stream keeps one copy.
pub(crate) fn dead_letter_copy(
    namespace: &Namespace,
    failure: &Failure<'_>,
    headers: Option<&HeaderMap>,
    payload: bytes::Bytes,
) -> Outgoing {
    let original = headers.and_then(|headers| headers.get(MSG_ID)).map_or_else(
        || format!("{}:{}", failure.stream, failure.stream_sequence),
        |id| id.as_str().to_owned(),
    );
    let mut headers = headers.cloned().unwrap_or_default();
    headers.insert(HDR_DLQ_ERROR, header_safe(failure.error).as_str());
    headers.insert(HDR_DLQ_CONSUMER, failure.consumer);
    headers.insert(HDR_DLQ_STREAM, failure.stream);
    headers.insert(HDR_DLQ_STREAM_SEQ, failure.stream_sequence.to_string().as_str());
    headers.insert(HDR_DLQ_SUBJECT, failure.subject);
    headers.insert(HDR_DLQ_DELIVERED, failure.delivered.to_string().as_str());
    Outgoing {
        subject: namespace.dead_letter_subject(failure.consumer),
        msg_id: format!("dlq:{}:{original}", failure.consumer),
        headers: strip_msg_id(headers),
        payload,
    }
}

/// Resets the ack wait of messages still being worked on.
async fn keep_alive(messages: &[jetstream::Message]) {
    for message in messages {
        if let Err(error) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "progress ack failed");
        }
    }
}

/// Hands a message back for immediate redelivery (to this or another instance).
async fn give_back(message: &jetstream::Message) {
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(%error, "nak failed; redelivery after the ack wait");
    }
}

fn msg_id(message: &jetstream::Message) -> Option<&str> {
    message
        .headers
        .as_ref()?
        .get(MSG_ID)
        .map(async_nats::HeaderValue::as_str)
}

/// The original id goes back in under its own name so the DLQ entry keeps it.
fn strip_msg_id(headers: HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in headers.iter() {
        let key: &str = name.as_ref();
        let key = if key == MSG_ID { HDR_DLQ_ORIGINAL_MSG_ID } else { key };
        for value in values {
            out.append(key.to_owned(), value.as_str());
        }
    }
    out
}

/// Header values may not hold CR/LF, and an error chain can be long.
fn header_safe(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    flat.chars().take(1024).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let config = RunnerConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..RunnerConfig::default()
        };
        assert_eq!(config.backoff(1), Duration::from_millis(100));
        assert_eq!(config.backoff(2), Duration::from_millis(200));
        assert_eq!(config.backoff(4), Duration::from_millis(800));
        assert_eq!(config.backoff(5), Duration::from_secs(1));
        assert_eq!(config.backoff(1_000), Duration::from_secs(1));
    }

    #[test]
    fn permanent_errors_are_told_apart_from_transient_ones() {
        let transient: HandlerError = "connection refused".into();
        assert!(!is_permanent(&transient));
        let poison = permanent("not an OrderRequested: missing field `order_id`");
        assert!(is_permanent(&poison));
        assert_eq!(poison.to_string(), "not an OrderRequested: missing field `order_id`");
    }

    #[test]
    fn header_values_lose_line_breaks_and_length() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        assert_eq!(header_safe(&"x".repeat(5000)).len(), 1024);
    }
}
