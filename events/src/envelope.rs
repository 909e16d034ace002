//! [`EventEnvelope`]: one stored event with everything a consumer needs,
//! the body of every JetStream event message and the unit replay reads.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::metadata::EventMetadata;
use crate::{AggregateEvents, CouponEvent, OrderEvent, PaymentEvent, ProductEvent, VoucherEvent, upcast};

/// UUIDv5 namespace of [`event_id`]. Changing it changes every event id and
/// defeats JetStream dedupe of re-published events: never change it.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2a7f_acdd_70ed_446d_9972_eb2d_8ef1_2bf4);

/// The id of the event at `sequence` of an aggregate instance.
///
/// Derived rather than stored because cqrs-es gives every event of one
/// command the same metadata map. Being deterministic, it makes a relay that
/// re-publishes after a crash send the same `Nats-Msg-Id`, which JetStream
/// dedupes.
pub fn event_id(aggregate_type: &str, aggregate_id: &str, sequence: u64) -> Uuid {
    let name = format!("{aggregate_type}/{aggregate_id}/{sequence}");
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("cannot encode event payload")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode {event_type} payload")]
    Decode {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown aggregate type {0:?}")]
    UnknownAggregateType(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Position within the aggregate instance, from 1 (cqrs-es sequence).
    pub sequence: u64,
    /// Commit-order position across all aggregates (the `events` table's
    /// identity column); replay and the relay cursor follow it.
    pub global_position: i64,
    pub event_type: String,
    /// The version the payload was written with; [`Self::decode`] upcasts.
    pub event_version: String,
    /// The serialized event enum as stored, e.g. `{"OrderPaid": {...}}`.
    pub payload: Value,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
}

impl EventEnvelope {
    /// Wraps a current-version event, as the event store would record it.
    pub fn new<E: AggregateEvents>(
        aggregate_id: impl Into<String>,
        sequence: u64,
        global_position: i64,
        event: &E,
        metadata: EventMetadata,
        recorded_at: DateTime<Utc>,
    ) -> Result<Self, EnvelopeError> {
        let aggregate_id = aggregate_id.into();
        Ok(Self {
            event_id: event_id(E::AGGREGATE_TYPE, &aggregate_id, sequence),
            aggregate_type: E::AGGREGATE_TYPE.to_owned(),
            aggregate_id,
            sequence,
            global_position,
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: serde_json::to_value(event).map_err(EnvelopeError::Encode)?,
            metadata,
            recorded_at,
        })
    }

    /// The payload as an event enum, upcast first if it is an old version.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, EnvelopeError> {
        decode_payload(&self.event_type, &self.event_version, &self.payload)
    }
}

/// A stored payload as an event enum, upcast first if it is an old version:
/// for readers of the `events` table that do not build whole envelopes.
pub fn decode_payload<E: DeserializeOwned>(
    event_type: &str,
    event_version: &str,
    payload: &Value,
) -> Result<E, EnvelopeError> {
    let decoded = if upcast::needs_upcast(event_type, event_version) {
        let (_, payload) = upcast::upcast(event_type, event_version, payload.clone());
        serde_json::from_value(payload)
    } else {
        E::deserialize(payload)
    };
    decoded.map_err(|source| EnvelopeError::Decode {
        event_type: event_type.to_owned(),
        source,
    })
}

/// An event of any aggregate, for consumers that read more than one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    Voucher(VoucherEvent),
    Order(OrderEvent),
    Payment(PaymentEvent),
    Coupon(CouponEvent),
    Product(ProductEvent),
}

impl AnyEvent {
    /// Decodes by the envelope's `aggregate_type`.
    pub fn decode(envelope: &EventEnvelope) -> Result<Self, EnvelopeError> {
        match envelope.aggregate_type.as_str() {
            VoucherEvent::AGGREGATE_TYPE => envelope.decode().map(Self::Voucher),
            OrderEvent::AGGREGATE_TYPE => envelope.decode().map(Self::Order),
            PaymentEvent::AGGREGATE_TYPE => envelope.decode().map(Self::Payment),
            CouponEvent::AGGREGATE_TYPE => envelope.decode().map(Self::Coupon),
            ProductEvent::AGGREGATE_TYPE => envelope.decode().map(Self::Product),
            other => Err(EnvelopeError::UnknownAggregateType(other.to_owned())),
        }
    }
}
