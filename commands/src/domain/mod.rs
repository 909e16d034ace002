//! The pure domain layer: one cqrs-es aggregate per event enum of `events`.
//!
//! Rules every aggregate here keeps, because the in-memory aggregate cache and
//! the at-least-once reactors depend on them:
//! - `handle` validates everything before its first `sink.write`: a command
//!   either fails having written nothing, or succeeds. `sink.write` applies
//!   the event at once, so a command may write several events that build on
//!   each other, but never fails after the first one.
//! - `apply` is a pure fold that never panics, whatever order or repetition
//!   of events it is fed; counters are derived so a repeated event cannot
//!   skew them.
//! - Redelivered commands that would repeat a recorded fact succeed with no
//!   events (see each aggregate for which ones); a command that contradicts
//!   the recorded state is an error.
//! - No I/O: "now" comes from a [`Clock`] in the `Services`, ids and times to
//!   record come in the commands.
//!
//! Every error type implements [`DomainError`], which names the HTTP class
//! ([`ErrorKind`]) and the snake_case error code the API answers with.

pub mod coupon;
pub mod limits;
pub mod order;
pub mod payment;
pub mod product;
pub mod voucher;

pub use coupon::{Coupon, CouponCommand, CouponDetails, CouponError};
pub use order::{CancellerRole, Order, OrderCommand, OrderError};
pub use payment::{Payment, PaymentCommand, PaymentError, PaymentStatus};
pub use platform::clock::{Clock, FixedClock, SharedClock, SystemClock};
pub use product::{Product, ProductCommand, ProductDetails, ProductError};
pub use voucher::{Decision, SeckillClaim, Voucher, VoucherCommand, VoucherDetails, VoucherError, VoucherServices};

/// Which class of HTTP answer an error belongs to; the domain knows no HTTP
/// types, so the API maps this one enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The aggregate (or the thing inside it the command names) does not exist.
    NotFound,
    /// The request is well formed but contradicts the current state.
    Conflict,
    /// The command itself is invalid, whatever the state.
    Invalid,
    /// The caller may not do this to this aggregate.
    Forbidden,
}

impl ErrorKind {
    pub const fn http_status(self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Invalid => 422,
            Self::Forbidden => 403,
        }
    }
}

pub trait DomainError: std::error::Error {
    fn kind(&self) -> ErrorKind;
    /// The stable snake_case code clients switch on.
    fn code(&self) -> &'static str;
}

#[cfg(test)]
pub(crate) mod testing {
    use std::fmt::Debug;

    use chrono::{DateTime, Duration, TimeZone, Utc};
    use cqrs_es::Aggregate;
    use cqrs_es::event_sink::EventSink;
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use uuid::Uuid;

    /// A fixed origin, so tests read as offsets from it.
    pub fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
    }

    pub fn at_secs(seconds: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(seconds)
    }

    pub fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Runs one command the way the aggregate cache will (on the live state,
    /// keeping what `sink.write` applied) and checks the rules the cache
    /// relies on: an error leaves no events and an untouched state; success
    /// leaves exactly the state a replay of the events gives, which also
    /// survives a serde round trip.
    pub fn execute<A>(state: &mut A, command: A::Command, services: &A::Services) -> Result<Vec<A::Event>, A::Error>
    where
        A: Aggregate + Clone + PartialEq + Debug + Serialize + DeserializeOwned,
        A::Event: Clone,
    {
        let before = state.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let sink = EventSink::<A>::default();
        let result = runtime.block_on(state.handle(command, services, &sink));
        let events = runtime.block_on(sink.collect());
        match result {
            Err(error) => {
                assert!(
                    events.is_empty(),
                    "handle wrote {} event(s) and then failed",
                    events.len()
                );
                assert_eq!(*state, before, "a failed command changed the state");
                Err(error)
            }
            Ok(()) => {
                let mut replayed = before;
                for event in &events {
                    replayed.apply(event.clone());
                }
                assert_eq!(*state, replayed, "handle changed state other than through events");
                let json = serde_json::to_string(state).unwrap();
                let restored: A = serde_json::from_str(&json).unwrap();
                assert_eq!(*state, restored, "state does not survive a serde round trip");
                Ok(events)
            }
        }
    }

    /// The state a fresh load from the event store would give.
    pub fn replay<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> A {
        let mut state = A::default();
        for event in events {
            state.apply(event);
        }
        state
    }

    #[test]
    fn error_kinds_map_to_the_documented_statuses() {
        use super::ErrorKind;
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::Conflict.http_status(), 409);
        assert_eq!(ErrorKind::Invalid.http_status(), 422);
        assert_eq!(ErrorKind::Forbidden.http_status(), 403);
    }
}
