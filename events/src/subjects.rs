//! NATS names: subjects, streams and message headers.
//!
//! Measured here, a wildcard-filtered consumer runs at about a quarter of
//! the speed of an unfiltered one, so every stream has exactly one literal
//! subject and no hot-path consumer needs a filter: one events stream per
//! aggregate type, the aggregate id in a header rather than the subject.
//! The dead-letter stream is the only wildcard, and it is not on a hot path.
//!
//! Everything sits under a [`Namespace`] so tests can run side by side on
//! one server.

use std::fmt;
use std::str::FromStr;

use crate::{AggregateEvents, CouponEvent, OrderEvent, PaymentEvent, ProductEvent, VoucherEvent};

/// Every aggregate type that has an events stream.
pub const AGGREGATE_TYPES: [&str; 5] = [
    VoucherEvent::AGGREGATE_TYPE,
    OrderEvent::AGGREGATE_TYPE,
    PaymentEvent::AGGREGATE_TYPE,
    CouponEvent::AGGREGATE_TYPE,
    ProductEvent::AGGREGATE_TYPE,
];

pub const HDR_EVENT_TYPE: &str = "Cp-Event-Type";
pub const HDR_EVENT_VERSION: &str = "Cp-Event-Version";
pub const HDR_AGGREGATE_TYPE: &str = "Cp-Aggregate-Type";
pub const HDR_AGGREGATE_ID: &str = "Cp-Aggregate-Id";
pub const HDR_SEQUENCE: &str = "Cp-Sequence";
pub const HDR_GLOBAL_POSITION: &str = "Cp-Global-Position";
pub const HDR_CORRELATION_ID: &str = "Cp-Correlation-Id";
/// JetStream's dedupe header.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Durable consumer of the claim writer (commands) on the seckill requests
/// stream; the edge watches its ack floor before a re-warm.
pub const CLAIM_WRITER_CONSUMER: &str = "claim-writer";
/// Durable consumer of the seckill edge on the Voucher events stream
/// (warm-up and re-credit), shared by every edge instance.
pub const SECKILL_EDGE_CONSUMER: &str = "seckill-edge";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace is empty")]
    Empty,
    #[error("namespace is {0} characters long, at most {max} allowed", max = Namespace::MAX_LEN)]
    TooLong(usize),
    #[error("namespace contains {0:?}; only a-z, 0-9 and _ are allowed")]
    InvalidChar(char),
}

/// The prefix of every subject and stream name: lowercase ASCII letters,
/// digits and `_`, 1 to 32 characters, so it is a single subject token and
/// valid in stream names in either case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub const DEFAULT: &str = "cp";
    pub const MAX_LEN: usize = 32;

    pub fn new(name: impl Into<String>) -> Result<Self, NamespaceError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NamespaceError::Empty);
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            return Err(NamespaceError::InvalidChar(bad));
        }
        if name.len() > Self::MAX_LEN {
            return Err(NamespaceError::TooLong(name.len()));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `cp.evt.order` for `"Order"`.
    pub fn events_subject(&self, aggregate_type: &str) -> String {
        format!("{}.evt.{}", self.0, aggregate_type.to_ascii_lowercase())
    }

    /// `CP_EVT_ORDER` for `"Order"`.
    pub fn events_stream(&self, aggregate_type: &str) -> String {
        format!("{}_EVT_{}", self.upper(), aggregate_type.to_ascii_uppercase())
    }

    pub fn seckill_requests_subject(&self) -> String {
        format!("{}.seckill.requested", self.0)
    }

    pub fn seckill_requests_stream(&self) -> String {
        format!("{}_SECKILL_REQUESTS", self.upper())
    }

    /// Where `consumer` (its durable name) parks messages it gave up on.
    pub fn dead_letter_subject(&self, consumer: &str) -> String {
        format!("{}.dlq.{consumer}", self.0)
    }

    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.upper())
    }

    /// Where JetStream's max-deliveries advisories for this namespace's
    /// streams are kept (`cp_nats::exhausted`).
    pub fn advisories_stream(&self) -> String {
        format!("{}_ADVISORIES", self.upper())
    }

    /// The dead-letter stream's one (wildcard) subject.
    pub fn dead_letter_stream_subject(&self) -> String {
        format!("{}.dlq.>", self.0)
    }

    fn upper(&self) -> String {
        self.0.to_ascii_uppercase()
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl FromStr for Namespace {
    type Err = NamespaceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
