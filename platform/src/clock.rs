//! Time as a service, shared by every crate. Domain code never reads the
//! system clock itself: aggregates that judge "now" (a regular voucher's sale
//! window) receive a [`Clock`] through their `Services`, and the seckill edge
//! stamps attempts with the one it is given, so tests pin time with
//! [`FixedClock`] and a replay never depends on when it runs. Commands that
//! record a time carry it in their fields instead, decided once by whoever
//! issues the command.

use std::fmt::Debug;
use std::sync::Arc;

use chrono::{DateTime, Utc};

pub trait Clock: Debug + Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// A clock shared by every aggregate instance of one framework.
pub type SharedClock = Arc<dyn Clock>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Always answers the same instant, so window edges can be tested exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn fixed_clock_answers_its_instant() {
        let at = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        let clock: SharedClock = Arc::new(FixedClock(at));
        assert_eq!(clock.now(), at);
        assert_eq!(clock.now(), at);
    }

    #[test]
    fn system_clock_moves_forward() {
        let first = SystemClock.now();
        assert!(SystemClock.now() >= first);
    }
}
