//! The City Picks event catalogue: every fact the system records, and the
//! names and shapes they travel under. Pure data and pure functions, no I/O.
//!
//! Layout:
//! - [`voucher`], [`order`], [`payment`], [`coupon`], [`product`]: one event
//!   enum per aggregate, implementing [`cqrs_es::DomainEvent`] and
//!   [`AggregateEvents`].
//! - [`integration`]: [`OrderRequested`], the seckill edge's message. It is
//!   not an aggregate event and never enters the event store.
//! - [`metadata`]: [`EventMetadata`], carried by cqrs-es as a string map.
//! - [`envelope`]: [`EventEnvelope`], the unit on JetStream and in replay,
//!   with the deterministic [`event_id`] and the [`AnyEvent`] dispatcher.
//! - [`subjects`]: NATS namespace, subject, stream and header names.
//! - [`upcast`]: upgrades of old stored payloads, shared by the event store
//!   and envelope decoding.

pub mod coupon;
pub mod envelope;
pub mod integration;
pub mod metadata;
pub mod order;
pub mod payment;
pub mod product;
pub mod subjects;
pub mod upcast;
pub mod voucher;

/// Re-exported so consumers can call `event_type()` without depending on
/// cqrs-es themselves.
pub use cqrs_es::DomainEvent;

pub use coupon::{CouponEvent, CouponSource, CouponStatus};
pub use envelope::{AnyEvent, EVENT_ID_NAMESPACE, EnvelopeError, EventEnvelope, decode_payload, event_id};
pub use integration::OrderRequested;
pub use metadata::{Actor, ActorKind, EventMetadata, MetadataError};
pub use order::{
    CancellationReason, OrderEvent, OrderItem, OrderKind, OrderRejectionReason, OrderStatus, RequestedItem,
};
pub use payment::PaymentEvent;
pub use product::ProductEvent;
pub use subjects::{AGGREGATE_TYPES, Namespace, NamespaceError};
pub use voucher::{ClaimRejection, VoucherEvent, VoucherKind};

/// An aggregate's event enum, tied to the aggregate type it is stored under.
///
/// The aggregates in `commands` use the same constant as their
/// `Aggregate::TYPE`, so events, subjects and envelopes agree on the name.
pub trait AggregateEvents: DomainEvent {
    const AGGREGATE_TYPE: &'static str;
}
