//! The requests' reconciler: proves that every admitted request the claim
//! writer acknowledged has a decision (an order) in the event store, and
//! re-drives the ones that have none.
//!
//! The claim writer commits, then acknowledges the request on JetStream. A
//! commit that vanishes afterwards (a Postgres crash with `synchronous_commit
//! = off`, a failover to a lagging replica) leaves an admitted request with
//! no order and nothing left to redeliver it. So, every
//! [`ReconcilerConfig::every`], the reconciler reads the requests stream from
//! its cursor up to the claim writer's ack floor (everything at or below it
//! was acknowledged), asks the store which of those orders exist, and hands
//! the missing ones to the claim writer again ([`ClaimWriter::process`], the
//! same idempotent path: a voucher skips the order ids it decided before, so
//! nothing is decided twice). Each order created that way counts in
//! `reconciler_repairs_total{chain="requests"}`.
//!
//! It runs beside the claim writer, in the same leadership term and on the
//! same voucher cache. Its cursor starts [`START_WINDOW`] requests back from
//! the ack floor (a new leader proves the recent past again) and goes back
//! 60 s when Postgres restarted ([`event_store::reconcile::Cursor`]); then
//! the cached vouchers, which may include lost decisions, are forgotten too.
//!
//! A request the claim writer used up its deliveries on (JetStream's
//! advisories name those, `cp_nats::exhausted`, and the dead-letter stream
//! holds them) is not re-driven in process: if it killed the claim writer's
//! process every time, it would kill this one too. It gets one more chance
//! through the requests stream, and stays parked if it is exhausted again
//! ([`RequestReconciler`]'s `second_chance`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::DirectGetErrorKind};
use event_store::reconcile::{self, Cursor};
use events::{AggregateEvents as _, Namespace, OrderEvent};
use futures::StreamExt as _;
use platform::telemetry::TraceHeaders;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    CLAIM_WRITER_CONSUMER,
    claims::{ClaimWriter, decode_request, trace_of},
    domain::voucher::SeckillClaim,
};

/// Acknowledged requests before the ack floor that a new reconciler checks again.
pub const START_WINDOW: u64 = 50_000;

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub every: Duration,
    /// Requests read from the stream per query to the store.
    pub chunk: usize,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            chunk: 1_000,
        }
    }
}

/// One admitted request as the claim writer takes it.
#[derive(Debug, Clone)]
struct Request {
    /// As published: sent again as it was.
    payload: bytes::Bytes,
    voucher_id: Uuid,
    claim: SeckillClaim,
    trace: TraceHeaders,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub read_up_to: u64,
    pub checked: usize,
    pub missing: usize,
    pub repaired: usize,
    pub rewound: bool,
    /// Missing requests the claim writer used up its deliveries on once,
    /// sent through the requests stream once more.
    pub second_chances: usize,
    /// Missing requests it used up its deliveries on twice: not re-driven,
    /// left in the dead-letter stream.
    pub exhausted: usize,
}

#[derive(Debug)]
pub struct RequestReconciler {
    pool: PgPool,
    js: jetstream::Context,
    namespace: Namespace,
    writer: ClaimWriter,
    config: ReconcilerConfig,
    cursor: Option<Cursor>,
    /// Missing requests whose re-drive failed: tried again next pass.
    retry: Vec<Request>,
    /// Per order, how often the claim writer used up its deliveries on its
    /// request (JetStream's advisories, `cp_nats::exhausted`), and how far
    /// those were read.
    exhausted: HashMap<Uuid, u32>,
    advisories_read: u64,
    publisher: cp_nats::Publisher,
}

impl RequestReconciler {
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        namespace: Namespace,
        writer: ClaimWriter,
        config: ReconcilerConfig,
    ) -> Self {
        let publisher = cp_nats::Publisher::new(js.clone(), 256);
        Self {
            pool,
            js,
            namespace,
            writer,
            config,
            cursor: None,
            retry: Vec::new(),
            exhausted: HashMap::new(),
            advisories_read: 0,
            publisher,
        }
    }

    /// Starts the cursor at stream sequence `sequence` instead of
    /// [`START_WINDOW`] before the ack floor.
    pub fn starting_at(mut self, sequence: u64) -> Self {
        self.cursor = Some(Cursor::new(i64::try_from(sequence).unwrap_or(i64::MAX), Instant::now()));
        self
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.config.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.run_until_cancelled(every.tick()).await.is_some() {
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "request reconciliation pass failed; next one retries");
            }
        }
    }

    /// One pass: the acknowledged requests after the cursor, checked against
    /// the store; the missing ones re-driven.
    pub async fn pass(&mut self) -> Result<PassReport, ReconcileError> {
        let now = Instant::now();
        let mut report = PassReport::default();
        let started = reconcile::server_started(&self.pool).await?;
        let stream = self.js.get_stream(self.namespace.seckill_requests_stream()).await?;
        let floor = match stream
            .get_consumer::<jetstream::consumer::pull::Config>(CLAIM_WRITER_CONSUMER)
            .await
        {
            Ok(mut consumer) => consumer.info().await?.ack_floor.stream_sequence,
            // no claim writer yet: nothing was acknowledged
            Err(_) => 0,
        };
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        let cursor = self.cursor.get_or_insert_with(|| {
            Cursor::new(
                floor
                    .saturating_sub(i64::try_from(START_WINDOW).unwrap_or(i64::MAX))
                    .max(0),
                now,
            )
        });
        if let Some(left) = cursor.observe_server(started, now) {
            tracing::warn!(
                left,
                back_to = cursor.position(),
                "Postgres restarted: checking the acknowledged requests again from before the restart"
            );
            metrics::counter!("reconciler_rewinds_total", "chain" => "requests").increment(1);
            // the cached vouchers may hold decisions the store lost
            self.writer.forget_cached();
            report.rewound = true;
        }
        let from = cursor.position();
        let mut missing = Vec::new();
        if floor > from {
            let requests = read_requests(&stream, from.unsigned_abs() + 1, floor.unsigned_abs()).await?;
            report.checked = requests.len();
            for chunk in requests.chunks(self.config.chunk.max(1)) {
                let ids: Vec<String> = chunk.iter().map(|r| r.claim.order_id.to_string()).collect();
                let existing = reconcile::existing(&self.pool, OrderEvent::AGGREGATE_TYPE, &ids).await?;
                missing.extend(
                    chunk
                        .iter()
                        .filter(|r| !existing.contains(&r.claim.order_id.to_string()))
                        .cloned(),
                );
            }
            cursor.advance(floor, now);
        }
        // taken only now: a read above that failed left them in place
        missing.append(&mut self.retry);
        // one order's request may be in the stream twice (a second chance)
        let mut seen = std::collections::HashSet::new();
        missing.retain(|request| seen.insert(request.claim.order_id));
        report.read_up_to = cursor.position().unsigned_abs();
        report.missing = missing.len();
        if !missing.is_empty() {
            // Read after the ack floor: the floor passes a request only once it
            // is settled or exhausted, and the advisory is kept at exhaustion.
            if let Err(error) = self.read_exhausted(&stream).await {
                self.retry = missing;
                return Err(error);
            }
            let (exhausted, redrivable): (Vec<Request>, Vec<Request>) = missing
                .into_iter()
                .partition(|request| self.exhausted.contains_key(&request.claim.order_id));
            missing = redrivable;
            self.second_chance(exhausted, &mut report).await;
        }
        if !missing.is_empty() {
            tracing::warn!(
                missing = missing.len(),
                "acknowledged requests without an order in the store: re-driving them"
            );
            // the cached vouchers hold the decisions the store lost (a
            // restart may not have been seen: a failover to another server)
            self.writer.forget_cached();
            report.repaired = self.redrive(missing).await;
        }
        Ok(report)
    }

    /// Counts, per order, the requests the claim writer used up its
    /// deliveries on, from the advisories not read yet. All or nothing: a
    /// failure leaves the count and the position as they were.
    async fn read_exhausted(&mut self, stream: &jetstream::stream::Stream) -> Result<(), ReconcileError> {
        let (sequences, read) = cp_nats::exhausted::exhausted_after(
            &self.js,
            &self.namespace,
            &self.namespace.seckill_requests_stream(),
            CLAIM_WRITER_CONSUMER,
            self.advisories_read,
        )
        .await
        .map_err(ReconcileError::Stream)?;
        let mut counted: HashMap<Uuid, u32> = HashMap::new();
        for sequence in sequences {
            match stream.direct_get(sequence).await {
                Ok(message) => {
                    if let Ok((_, claim)) = decode_request(&message.payload) {
                        *counted.entry(claim.order_id).or_default() += 1;
                    }
                }
                // aged out of the stream: nothing left to re-drive
                Err(error) if matches!(error.kind(), DirectGetErrorKind::NotFound) => {}
                Err(error) => return Err(error.into()),
            }
        }
        for (order_id, times) in counted {
            *self.exhausted.entry(order_id).or_default() += times;
        }
        self.advisories_read = read;
        Ok(())
    }

    /// Requests the claim writer used up its deliveries on are not re-driven
    /// here, in process: if their message killed the claim writer's process
    /// every time, it would kill this one too, after every restart. A request
    /// exhausted once (its deliveries may have been spent by restarts and
    /// hand-backs, not by a fault of its own) gets one more chance, through
    /// the requests stream under `exhausted-retry:<order id>`. One exhausted
    /// twice stays in the dead-letter stream for an operator.
    async fn second_chance(&mut self, exhausted: Vec<Request>, report: &mut PassReport) {
        if exhausted.is_empty() {
            return;
        }
        let (once, twice): (Vec<Request>, Vec<Request>) = exhausted
            .into_iter()
            .partition(|request| self.exhausted.get(&request.claim.order_id).copied().unwrap_or(0) < 2);
        report.exhausted = twice.len();
        if !twice.is_empty() {
            tracing::warn!(
                parked = twice.len(),
                "requests without an order that the claim writer used up its deliveries on twice: left in the dead-letter stream"
            );
        }
        if once.is_empty() {
            return;
        }
        let subject = self.namespace.seckill_requests_subject();
        let messages: Vec<cp_nats::Outgoing> = once
            .iter()
            .map(|request| {
                let mut message = cp_nats::Outgoing::new(
                    &subject,
                    format!("exhausted-retry:{}", request.claim.order_id),
                    request.payload.clone(),
                );
                if let Some(traceparent) = &request.trace.traceparent {
                    message = message.header(events::subjects::TRACEPARENT, traceparent);
                }
                if let Some(tracestate) = &request.trace.tracestate {
                    message = message.header(events::subjects::TRACESTATE, tracestate);
                }
                message
            })
            .collect();
        match self.publisher.publish_all(messages).await {
            Ok(_) => {
                tracing::warn!(
                    requests = once.len(),
                    "requests without an order that the claim writer used up its deliveries on: sent through it once more"
                );
                report.second_chances = once.len();
            }
            Err(error) => {
                tracing::warn!(%error, "sending exhausted requests again failed; next pass retries");
                self.retry.extend(once);
            }
        }
    }

    /// Hands missing requests to the claim writer, voucher by voucher; keeps
    /// the ones that failed for the next pass. Returns the orders created.
    async fn redrive(&mut self, missing: Vec<Request>) -> usize {
        let mut by_voucher: HashMap<Uuid, Vec<Request>> = HashMap::new();
        for request in missing {
            by_voucher.entry(request.voucher_id).or_default().push(request);
        }
        let mut repaired = 0;
        for (voucher_id, requests) in by_voucher {
            let claims: Vec<SeckillClaim> = requests.iter().map(|r| r.claim.clone()).collect();
            let traces: HashMap<Uuid, TraceHeaders> =
                requests.iter().map(|r| (r.claim.order_id, r.trace.clone())).collect();
            match self.writer.process(voucher_id, &claims, &traces).await {
                Ok(decided) => {
                    repaired += decided;
                    metrics::counter!("reconciler_repairs_total", "chain" => "requests").increment(decided as u64);
                }
                Err(error) => {
                    tracing::warn!(%voucher_id, %error, "re-driving requests failed; next pass retries");
                    self.retry.extend(requests);
                }
            }
        }
        repaired
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("event store")]
    Store(#[from] sqlx::Error),
    #[error("requests stream")]
    Stream(#[source] async_nats::Error),
}

impl<K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static>
    From<async_nats::error::Error<K>> for ReconcileError
{
    fn from(error: async_nats::error::Error<K>) -> Self {
        Self::Stream(Box::new(error))
    }
}

/// The requests in stream sequences `first..=last`, through an ordered
/// consumer of their own (no acks, gone when dropped). Messages that are not
/// requests were dead-lettered by the claim writer and are skipped.
async fn read_requests(
    stream: &jetstream::stream::Stream,
    first: u64,
    last: u64,
) -> Result<Vec<Request>, ReconcileError> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: first },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut requests = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|elapsed| ReconcileError::Stream(Box::new(elapsed)))?;
        let Some(message) = next else { break };
        let message = message.map_err(|error| ReconcileError::Stream(Box::new(error)))?;
        let sequence = message
            .info()
            .map(|info| info.stream_sequence)
            .map_err(ReconcileError::Stream)?;
        if sequence > last {
            break;
        }
        if let Ok((voucher_id, claim)) = decode_request(&message.payload) {
            let trace = message.headers.as_ref().map(trace_of).unwrap_or_default();
            requests.push(Request {
                payload: message.payload.clone(),
                voucher_id,
                claim,
                trace,
            });
        }
        if sequence == last {
            break;
        }
    }
    Ok(requests)
}
