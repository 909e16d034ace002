//! The seckill claim writer: the event store's final guard against oversell.
//!
//! It consumes `OrderRequested` (admitted at the edge) in batches, groups them
//! by voucher and runs each group as ONE `ProcessSeckillClaims` command
//! through the voucher aggregate, which decides every claim (accepted, or
//! rejected with a reason) and skips order ids it decided before. In the SAME
//! transaction it creates each newly decided order (`OrderPlaced` or
//! `OrderRejected`), so an admitted request ends as exactly one order whatever
//! crashes where:
//!
//! - crash before the commit: nothing was stored; the redelivery decides again;
//! - crash after the commit, before the ack: the redelivery finds the order
//!   ids decided and does nothing.
//!
//! Nothing admitted is lost to a bad payload: a request whose user id the
//! store cannot hold (a control character, say) is rejected by the voucher
//! with `invalid_request` and still becomes a rejected order (under a
//! storable form of the id), so the edge gives its unit back; a message that
//! is not an `OrderRequested` but names its order and voucher is treated the
//! same way; one that does not even name them is dead-lettered at once with
//! the reason. Failures are sorted: a store that is away is retried, a
//! decision that can never be stored is dead-lettered at once
//! ([`ClaimError::is_permanent`]).
//!
//! The voucher is a hot aggregate: it lives in an [`AggregateCache`], is
//! caught up from its cached sequence before each batch and appended with
//! that sequence as the optimistic lock. One writer per voucher is the design
//! (the process runs the reactor under an advisory lock); a concurrent writer
//! (e.g. a cancellation releasing stock) only costs a retry.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use cp_nats::{BatchHandler, HandlerError};
use events::{EventMetadata, OrderRejectionReason, OrderRequested, VoucherEvent};
use platform::{errors::DisplayChain, telemetry::TraceHeaders};
use uuid::Uuid;

use crate::{
    bus::{RetryPolicy, UnitError, unit_of_work},
    domain::{
        order::{Order, OrderCommand},
        voucher::{SeckillClaim, Voucher, VoucherCommand, VoucherError},
    },
};
use event_store::{AggregateCache, Append, Decided, EventStore, Loaded, StoreError, decide, load_cached};

/// Advisory lock key of the claim writer ("cpclaim1").
pub const CLAIM_WRITER_LOCK_KEY: i64 = 0x6370_636c_6169_6d31;

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("voucher {0} rejected the batch: {1}")]
    Voucher(Uuid, VoucherError),
    #[error("order {0} could not be recorded: {1}")]
    Order(Uuid, crate::domain::order::OrderError),
    #[error("voucher {0} kept conflicting")]
    Conflict(Uuid),
}

impl ClaimError {
    /// Whether retrying can never help: the batch's decision itself cannot
    /// be recorded (as opposed to a database that is away, or other writers).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Store(error) => error.is_permanent(),
            Self::Voucher(..) | Self::Order(..) => true,
            Self::Conflict(_) => false,
        }
    }
}

/// The sale's progress as the event store decides it, for the dashboard
/// (the edge counts admissions, not what became of them):
/// `seckill_claims_total{outcome}` ("placed" or "rejected", one per newly
/// decided order) and `seckill_stock_remaining`, the units still for sale
/// summed over the vouchers whose claims this writer decided and whose sale
/// has not ended, as of its last batch for each. No voucher label: one
/// series per voucher would grow without bound. Registered when a writer is
/// made, so the counters start at 0 rather than at their first increment.
struct SaleProgress {
    placed: metrics::Counter,
    rejected: metrics::Counter,
    remaining: metrics::Gauge,
    vouchers: Mutex<HashMap<Uuid, OnSale>>,
}

/// A voucher's units left and the end of its sale.
struct OnSale {
    left: u32,
    ends_at: Option<DateTime<Utc>>,
}

static SALE_PROGRESS: LazyLock<SaleProgress> = LazyLock::new(|| {
    // the handles belong to the recorder installed when they are made: the
    // process's (installed once, whoever asks first), not a no-op one
    platform::telemetry::metrics_handle();
    SaleProgress {
        placed: metrics::counter!("seckill_claims_total", "outcome" => "placed"),
        rejected: metrics::counter!("seckill_claims_total", "outcome" => "rejected"),
        remaining: metrics::gauge!("seckill_stock_remaining"),
        vouchers: Mutex::default(),
    }
});

impl SaleProgress {
    /// Counts one voucher's newly decided claims and records what it has left.
    fn decided(&self, voucher_id: Uuid, decided: &Decided<Voucher>, now: DateTime<Utc>) {
        for event in &decided.events {
            match event {
                VoucherEvent::SeckillClaimAccepted { .. } => self.placed.increment(1),
                VoucherEvent::SeckillClaimRejected { .. } => self.rejected.increment(1),
                _ => {}
            }
        }
        let Ok(mut vouchers) = self.vouchers.lock() else {
            return;
        };
        let on_sale = OnSale {
            left: decided.aggregate.remaining(),
            ends_at: decided.aggregate.ends_at(),
        };
        vouchers.insert(voucher_id, on_sale);
        // an ended sale has nothing left for sale (and would stay here forever)
        vouchers.retain(|_, sale| sale.ends_at.is_none_or(|end| end > now));
        self.remaining
            .set(vouchers.values().map(|sale| f64::from(sale.left)).sum::<f64>());
    }
}

/// One admitted request with what the event store needs to record it.
#[derive(Debug, Clone)]
struct Request {
    index: usize,
    claim: SeckillClaim,
    trace: TraceHeaders,
}

#[derive(Clone)]
pub struct ClaimWriter {
    store: EventStore,
    vouchers: Arc<AggregateCache<Voucher>>,
    voucher_services: <Voucher as cqrs_es::Aggregate>::Services,
    order_services: <Order as cqrs_es::Aggregate>::Services,
}

impl std::fmt::Debug for ClaimWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimWriter")
            .field("cached_vouchers", &self.vouchers.len())
            .finish()
    }
}

impl ClaimWriter {
    pub fn new(
        store: EventStore,
        vouchers: Arc<AggregateCache<Voucher>>,
        voucher_services: <Voucher as cqrs_es::Aggregate>::Services,
        order_services: <Order as cqrs_es::Aggregate>::Services,
    ) -> Self {
        LazyLock::force(&SALE_PROGRESS);
        Self {
            store,
            vouchers,
            voucher_services,
            order_services,
        }
    }

    /// Forgets the cached vouchers (the store restarted and may have lost
    /// decisions they include).
    pub fn forget_cached(&self) {
        self.vouchers.clear();
    }

    /// Records a decision and an order for each claim of one voucher.
    /// Returns how many claims were newly decided (0 on a pure redelivery).
    pub async fn process(
        &self,
        voucher_id: Uuid,
        claims: &[SeckillClaim],
        traces: &HashMap<Uuid, TraceHeaders>,
    ) -> Result<usize, ClaimError> {
        let id = voucher_id.to_string();
        let _writer = self.vouchers.writer(&id).await;
        // after the last attempt the batch's messages go back to JetStream (nak)
        let retry = RetryPolicy {
            attempts: 8,
            ..RetryPolicy::default()
        };
        let outcome = unit_of_work(&self.store, retry, "Voucher", || async {
            let loaded = load_cached(&self.store, Some(&self.vouchers), &id).await?;
            let command = VoucherCommand::ProcessSeckillClaims {
                claims: claims.to_vec(),
            };
            let decided = match decide(&id, loaded, command, &self.voucher_services).await {
                Ok(decided) => decided,
                Err((VoucherError::NotFound, unchanged)) => {
                    self.vouchers.put(&id, unchanged);
                    return Ok((Vec::new(), None));
                }
                Err((error, unchanged)) => {
                    self.vouchers.put(&id, unchanged);
                    return Err(ClaimError::Voucher(voucher_id, error));
                }
            };
            let (appends, newly_decided) = self.orders_of(voucher_id, &decided, traces).await?;
            Ok((appends, Some((decided, newly_decided))))
        })
        .await
        .map_err(|error| match error {
            UnitError::Decide(error) => error,
            UnitError::Conflict { .. } => ClaimError::Conflict(voucher_id),
            UnitError::Store(error) => ClaimError::Store(error),
        })?;
        match outcome {
            Some((decided, newly_decided)) => {
                SALE_PROGRESS.decided(voucher_id, &decided, self.voucher_services.clock.now());
                self.vouchers.put(&id, decided.into_loaded());
                metrics::counter!("seckill_claims_decided_total").increment(newly_decided as u64);
                Ok(newly_decided)
            }
            None => {
                let recorded = self.reject_unknown_voucher(voucher_id, claims, traces).await?;
                SALE_PROGRESS.rejected.increment(recorded as u64);
                Ok(recorded)
            }
        }
    }

    /// The voucher's decisions and the order each new one creates, as one
    /// unit's appends (the voucher's first), and how many are new.
    async fn orders_of(
        &self,
        voucher_id: Uuid,
        decided: &Decided<Voucher>,
        traces: &HashMap<Uuid, TraceHeaders>,
    ) -> Result<(Vec<Append>, usize), ClaimError> {
        let now = self.voucher_services.clock.now();
        let (title, price_cents, merchant_id) = (
            decided.aggregate.title().unwrap_or_default().to_owned(),
            decided.aggregate.price_cents().unwrap_or(0),
            decided.aggregate.merchant_id().unwrap_or_default().to_owned(),
        );
        let mut appends: Vec<Append> = Vec::with_capacity(decided.events.len() + 1);
        let mut voucher_append = decided.to_append(&EventMetadata::system("claim-writer"))?;
        let mut newly_decided = 0;
        for (event, pending) in decided.events.iter().zip(voucher_append.events.iter_mut()) {
            let (order_id, user_id, command) = match event {
                VoucherEvent::SeckillClaimAccepted { order_id, user_id, .. } => (
                    *order_id,
                    user_id.clone(),
                    OrderCommand::PlaceSeckillOrder {
                        order_id: *order_id,
                        user_id: user_id.clone(),
                        merchant_id: merchant_id.clone(),
                        voucher_id,
                        title: title.clone(),
                        price_cents,
                        placed_at: now,
                    },
                ),
                VoucherEvent::SeckillClaimRejected {
                    order_id,
                    user_id,
                    reason,
                } => (
                    *order_id,
                    user_id.clone(),
                    OrderCommand::RejectSeckillOrder {
                        order_id: *order_id,
                        user_id: user_id.clone(),
                        merchant_id: Some(merchant_id.clone()),
                        voucher_id,
                        reason: OrderRejectionReason::from(*reason),
                        rejected_at: now,
                    },
                ),
                _ => continue,
            };
            newly_decided += 1;
            // each decision carries its request's correlation (the order id) and trace
            let metadata = request_metadata(order_id, &user_id, traces.get(&order_id));
            pending.metadata = event_store::metadata_json(&metadata)?;
            let order = new_order(&order_id.to_string(), command, &self.order_services)
                .await
                .map_err(|e| ClaimError::Order(order_id, e))?;
            appends.push(order.to_append(&metadata)?);
        }
        appends.insert(0, voucher_append);
        Ok((appends, newly_decided))
    }

    /// A request for a voucher the store does not know still ends as an order.
    async fn reject_unknown_voucher(
        &self,
        voucher_id: Uuid,
        claims: &[SeckillClaim],
        traces: &HashMap<Uuid, TraceHeaders>,
    ) -> Result<usize, ClaimError> {
        let mut recorded = 0;
        for claim in claims {
            let id = claim.order_id.to_string();
            let loaded = self.store.load::<Order>(&id).await?;
            let command = OrderCommand::RejectSeckillOrder {
                order_id: claim.order_id,
                user_id: crate::domain::limits::storable_user_id(&claim.user_id),
                merchant_id: None,
                voucher_id,
                reason: OrderRejectionReason::VoucherNotFound,
                rejected_at: self.voucher_services.clock.now(),
            };
            let decided = decide(&id, loaded, command, &self.order_services)
                .await
                .map_err(|(e, _)| ClaimError::Order(claim.order_id, e))?;
            let metadata = request_metadata(claim.order_id, &claim.user_id, traces.get(&claim.order_id));
            match self.store.append(&[decided.to_append(&metadata)?]).await {
                Ok(()) => recorded += decided.events.len(),
                // a redelivery racing itself: the order exists, which is all we want
                Err(StoreError::Conflict) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(recorded)
    }
}

async fn new_order(
    order_id: &str,
    command: OrderCommand,
    services: &<Order as cqrs_es::Aggregate>::Services,
) -> Result<Decided<Order>, crate::domain::order::OrderError> {
    decide(order_id, Loaded::<Order>::default(), command, services)
        .await
        .map_err(|(e, _)| e)
}

fn request_metadata(order_id: Uuid, user_id: &str, trace: Option<&TraceHeaders>) -> EventMetadata {
    let mut metadata = EventMetadata::for_user(user_id, "customer");
    metadata.correlation_id = order_id;
    if let Some(trace) = trace {
        metadata.traceparent.clone_from(&trace.traceparent);
        metadata.tracestate.clone_from(&trace.tracestate);
    }
    metadata
}

/// The JetStream side: decode, group by voucher, process, one outcome per message.
impl BatchHandler for ClaimWriter {
    async fn handle_batch(&self, messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        let mut outcomes: Vec<Result<(), HandlerError>> = (0..messages.len()).map(|_| Ok(())).collect();
        let mut by_voucher: HashMap<Uuid, Vec<Request>> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            match decode_request(&message.payload) {
                Ok((voucher_id, claim)) => {
                    let trace = message.headers.as_ref().map(trace_of).unwrap_or_default();
                    by_voucher
                        .entry(voucher_id)
                        .or_default()
                        .push(Request { index, claim, trace });
                }
                Err(error) => outcomes[index] = Err(cp_nats::permanent(error)),
            }
        }
        for (voucher_id, requests) in by_voucher {
            let claims: Vec<SeckillClaim> = requests.iter().map(|r| r.claim.clone()).collect();
            let traces: HashMap<Uuid, TraceHeaders> =
                requests.iter().map(|r| (r.claim.order_id, r.trace.clone())).collect();
            let span = tracing::info_span!("claim_batch", %voucher_id, claims = claims.len());
            let result = tracing::Instrument::instrument(self.process(voucher_id, &claims, &traces), span).await;
            if let Err(error) = result {
                let permanent = error.is_permanent();
                tracing::warn!(%voucher_id, error = %DisplayChain(&error), permanent, "claim batch failed");
                let text = DisplayChain(&error).to_string();
                for request in &requests {
                    outcomes[request.index] = Err(if permanent {
                        cp_nats::permanent(text.clone())
                    } else {
                        text.clone().into()
                    });
                }
            }
        }
        outcomes
    }
}

/// An admitted request that does not decode as an `OrderRequested`.
#[derive(Debug, thiserror::Error)]
#[error("not an OrderRequested, and it names no order and voucher: {0}")]
pub struct UnreadableRequest(#[source] serde_json::Error);

/// What a request that is not a valid `OrderRequested` still tells.
#[derive(serde::Deserialize)]
struct RequestIds {
    order_id: Uuid,
    voucher_id: Uuid,
}

/// Decodes a request. One that is not a valid `OrderRequested` but names its
/// order and voucher becomes a claim with no usable user id, which the
/// voucher refuses as `invalid_request`: the admitted request still ends as
/// one (rejected) order and its unit goes back to the sale.
pub(crate) fn decode_request(payload: &[u8]) -> Result<(Uuid, SeckillClaim), UnreadableRequest> {
    match serde_json::from_slice::<OrderRequested>(payload) {
        Ok(request) => Ok((
            request.voucher_id,
            SeckillClaim {
                order_id: request.order_id,
                user_id: request.user_id,
                requested_at: request.requested_at,
            },
        )),
        Err(error) => {
            let ids: RequestIds = serde_json::from_slice(payload).map_err(|_| UnreadableRequest(error))?;
            Ok((
                ids.voucher_id,
                SeckillClaim {
                    order_id: ids.order_id,
                    user_id: String::new(),
                    requested_at: DateTime::<Utc>::UNIX_EPOCH,
                },
            ))
        }
    }
}

pub(crate) fn trace_of(headers: &async_nats::HeaderMap) -> TraceHeaders {
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    TraceHeaders {
        traceparent: get(events::subjects::TRACEPARENT),
        tracestate: get(events::subjects::TRACESTATE),
    }
}
