//! The JetStream layer every City Picks service shares.
//!
//! - [`topology`]: streams and durable consumers as code, created or updated
//!   idempotently by [`topology::ensure_topology`]. One stream per aggregate
//!   type with one literal subject, so no consumer ever needs a wildcard
//!   filter (measured: wildcard-filtered consumers run at a quarter of the speed).
//! - [`publisher`]: publishing with `Nats-Msg-Id` (server-side dedupe) and W3C
//!   trace headers, pipelined under `max_ack_inflight`, every ack awaited.
//! - [`consumer`]: the runner for durable pull consumers: ack after the handler
//!   commits, `Nak(Some(delay))` backoff on failure, and after `max_deliver`
//!   a copy to the dead-letter stream with the error and original headers;
//!   progress acks under a short ack wait, messages held (not failed) while
//!   the dependency is away, and given back (`Nak`) on shutdown.
//! - [`exhausted`]: messages a consumer's process died on `max_deliver`
//!   times (JetStream's max-deliveries advisories, captured in a stream),
//!   copied to the dead-letter stream with the reason.
//! - [`dead_letters`]: reading the dead-letter stream and re-driving an
//!   entry to its original subject (the `citypicks-dlq` CLI's JetStream part).

pub mod consumer;
pub mod dead_letters;
pub mod exhausted;
pub mod publisher;
pub mod topology;

pub use consumer::{
    BatchHandler, ConsumerRunner, Handler, HandlerError, OneByOne, Permanent, Probe, RunnerConfig, TimedOut,
    is_permanent, permanent, probe,
};
pub use exhausted::ExhaustedDeliveries;
pub use publisher::{Outgoing, PublishFailure, Publisher};
pub use topology::{ConsumerSpec, Topology, ensure_consumer, ensure_topology, ensure_topology_within};

/// How long a JetStream API request or publish ack may take. A publish sent
/// on a connection that then broke (its node of the cluster died) is never
/// acknowledged: without this bound the relay sat 30 s on such an ack (the
/// fault suite's NATS-node scenario) before it published again.
pub const JETSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects JetStream on top of a NATS client with the publish settings the
/// measured facts call for.
pub fn jetstream(client: async_nats::Client, max_ack_inflight: usize) -> async_nats::jetstream::Context {
    async_nats::jetstream::context::ContextBuilder::new()
        .timeout(JETSTREAM_TIMEOUT)
        .ack_timeout(JETSTREAM_TIMEOUT)
        .max_ack_inflight(max_ack_inflight)
        .backpressure_on_inflight(true)
        .build(client)
}
