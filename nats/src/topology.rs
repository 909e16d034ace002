//! Streams and consumers as code.
//!
//! Every name derives from a [`Namespace`] (`cp` in production, a random one
//! per test), so a test's streams never meet another's.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use events::subjects::{AGGREGATE_TYPES, Namespace};

/// How long JetStream remembers a `Nats-Msg-Id`: longer than any relay or
/// forwarder restart, so a re-publish after a crash is dropped as a duplicate.
pub const EVENT_DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);
pub const SECKILL_DUPLICATE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// JetStream is a transport, not the source of truth: views are rebuilt from
/// Postgres, so a week covers any consumer outage.
pub const EVENT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Topology {
    namespace: Namespace,
    replicas: usize,
}

/// What [`ensure_topology`] did to each stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamChange {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read stream {stream}: {source}")]
    Get {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create stream {stream}: {source}")]
    Create {
        stream: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot update stream {stream}: {source}")]
    Update {
        stream: String,
        source: jetstream::context::UpdateStreamError,
    },
    #[error("cannot create consumer {consumer} on {stream}: {source}")]
    Consumer {
        stream: String,
        consumer: String,
        source: stream::ConsumerError,
    },
    #[error("cannot update consumer {consumer} on {stream}: {source}")]
    ConsumerUpdate {
        stream: String,
        consumer: String,
        source: stream::ConsumerUpdateError,
    },
    #[error("cannot read stream info of {stream}: {source}")]
    Info {
        stream: String,
        source: jetstream::context::RequestError,
    },
}

impl Topology {
    pub fn new(namespace: Namespace) -> Self {
        Self { namespace, replicas: 1 }
    }

    /// R3 in a cluster (ARCHITECTURE.md "Scale beyond one machine").
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// Every stream City Picks uses.
    pub fn streams(&self) -> Vec<stream::Config> {
        let ns = &self.namespace;
        let mut streams: Vec<stream::Config> = AGGREGATE_TYPES
            .iter()
            .map(|aggregate| stream::Config {
                name: ns.events_stream(aggregate),
                description: Some(format!(
                    "{aggregate} events in commit order, published by the outbox relay"
                )),
                subjects: vec![ns.events_subject(aggregate)],
                max_age: EVENT_MAX_AGE,
                duplicate_window: EVENT_DUPLICATE_WINDOW,
                ..self.base()
            })
            .collect();
        streams.push(stream::Config {
            name: ns.seckill_requests_stream(),
            description: Some("OrderRequested from the seckill edge, keyed by order id".to_owned()),
            subjects: vec![ns.seckill_requests_subject()],
            max_age: EVENT_MAX_AGE,
            duplicate_window: SECKILL_DUPLICATE_WINDOW,
            ..self.base()
        });
        streams.push(stream::Config {
            name: ns.dead_letter_stream(),
            description: Some("messages a consumer gave up on, with the error and original headers".to_owned()),
            subjects: vec![ns.dead_letter_stream_subject()],
            max_age: DEAD_LETTER_MAX_AGE,
            duplicate_window: EVENT_DUPLICATE_WINDOW,
            ..self.base()
        });
        // every stream a consumer reads: the dead-letter stream has none
        let consumed: Vec<String> = streams
            .iter()
            .filter(|stream| stream.name != ns.dead_letter_stream())
            .map(|stream| crate::exhausted::max_deliveries_subject(&stream.name))
            .collect();
        streams.push(stream::Config {
            name: ns.advisories_stream(),
            description: Some(
                "JetStream's max-deliveries advisories for these streams, moved to the dead-letter stream".to_owned(),
            ),
            subjects: consumed,
            max_age: DEAD_LETTER_MAX_AGE,
            duplicate_window: EVENT_DUPLICATE_WINDOW,
            ..self.base()
        });
        streams
    }

    fn base(&self) -> stream::Config {
        stream::Config {
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            num_replicas: self.replicas,
            allow_direct: true,
            ..Default::default()
        }
    }
}

/// Creates missing streams and updates drifted ones; a second call changes nothing.
pub async fn ensure_topology(
    js: &jetstream::Context,
    topology: &Topology,
) -> Result<Vec<(String, StreamChange)>, TopologyError> {
    let mut report = Vec::new();
    for wanted in topology.streams() {
        let name = wanted.name.clone();
        let change = ensure_stream(js, wanted).await?;
        if change != StreamChange::Unchanged {
            tracing::info!(stream = %name, ?change, "stream ensured");
        }
        report.push((name, change));
    }
    Ok(report)
}

/// [`ensure_topology`], retried every 500 ms until it succeeds or `within`
/// has passed (the services' start-up timeout): a JetStream cluster that
/// has just started takes a while to place replicated streams (measured: a
/// fresh cluster of three under load answered a stream creation after more
/// than the 5 s a request may take), and a service should wait for it as it
/// waits for its other servers, not exit.
pub async fn ensure_topology_within(
    js: &jetstream::Context,
    topology: &Topology,
    within: Duration,
) -> Result<Vec<(String, StreamChange)>, TopologyError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match ensure_topology(js, topology).await {
            Ok(report) => return Ok(report),
            Err(error) if tokio::time::Instant::now() + Duration::from_millis(500) < deadline => {
                tracing::warn!(%error, "JetStream topology not in place yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

async fn ensure_stream(js: &jetstream::Context, wanted: stream::Config) -> Result<StreamChange, TopologyError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|source| TopologyError::Info {
                stream: name.clone(),
                source,
            })?;
            if same_settings(&info.config, &wanted) {
                return Ok(StreamChange::Unchanged);
            }
            js.update_stream(wanted)
                .await
                .map_err(|source| TopologyError::Update { stream: name, source })?;
            Ok(StreamChange::Updated)
        }
        Err(error)
            if matches!(
                error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(wanted)
                .await
                .map_err(|source| TopologyError::Create { stream: name, source })?;
            Ok(StreamChange::Created)
        }
        Err(source) => Err(TopologyError::Get { stream: name, source }),
    }
}

/// Compares only what we set: the server fills in the rest.
fn same_settings(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects == wanted.subjects
        && current.max_age == wanted.max_age
        && current.duplicate_window == wanted.duplicate_window
        && current.storage == wanted.storage
        && current.retention == wanted.retention
        && current.discard == wanted.discard
        && current.num_replicas == wanted.num_replicas
        && current.allow_direct == wanted.allow_direct
        && current.description == wanted.description
}

/// How long a delivered message may go unacknowledged before JetStream
/// delivers it again. Short, so the messages a crashed process held come back
/// within seconds; the runner sends progress acks while it works on them.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(3);

/// A durable pull consumer. No filter: each stream carries exactly one subject.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub durable_name: String,
    pub max_deliver: i64,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    pub deliver_policy: DeliverPolicy,
}

impl ConsumerSpec {
    pub fn new(stream: impl Into<String>, durable_name: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable_name: durable_name.into(),
            max_deliver: 5,
            ack_wait: DEFAULT_ACK_WAIT,
            max_ack_pending: 10_000,
            deliver_policy: DeliverPolicy::All,
        }
    }

    pub fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = max_deliver;
        self
    }

    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    pub fn max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = max_ack_pending;
        self
    }
}

/// Creates the consumer, or updates the settings an existing one may change.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<jetstream::consumer::Consumer<pull::Config>, TopologyError> {
    let consumer_error = |source| TopologyError::Consumer {
        stream: spec.stream.clone(),
        consumer: spec.durable_name.clone(),
        source,
    };
    let stream = js.get_stream(&spec.stream).await.map_err(|source| TopologyError::Get {
        stream: spec.stream.clone(),
        source,
    })?;
    let config = pull::Config {
        durable_name: Some(spec.durable_name.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        deliver_policy: spec.deliver_policy,
        ..Default::default()
    };
    match stream.get_consumer::<pull::Config>(&spec.durable_name).await {
        Ok(existing) => {
            let current = &existing.cached_info().config;
            if current.max_deliver == config.max_deliver
                && current.ack_wait == config.ack_wait
                && current.max_ack_pending == config.max_ack_pending
            {
                Ok(existing)
            } else {
                stream
                    .update_consumer(config)
                    .await
                    .map_err(|source| TopologyError::ConsumerUpdate {
                        stream: spec.stream.clone(),
                        consumer: spec.durable_name.clone(),
                        source,
                    })
            }
        }
        Err(_) => stream.create_consumer(config).await.map_err(consumer_error),
    }
}
