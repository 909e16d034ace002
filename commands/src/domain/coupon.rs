//! The Coupon aggregate: a user's coupon, used by a goods order as a
//! try/confirm/cancel resource.
//!
//! Rules it enforces:
//! - Issued once (repeating the identical issue is a no-op) with a positive
//!   value and a non-negative minimum spend.
//! - Reserve (try): only by its owner, only while available and before it
//!   expires (`at >= expires_at` is expired), only for an order whose
//!   subtotal reaches the minimum spend. Reserving again for the same order
//!   is a no-op.
//! - Redeem (confirm): only by the order that holds it; again is a no-op.
//! - Release (cancel): puts a coupon reserved by the order back; for an
//!   order that does not hold it (or a coupon that does not exist) it is a
//!   no-op, because compensations are delivered at least once and may race
//!   ahead of, or replace, a failed reservation. Releasing a redeemed coupon
//!   is an error: a paid order cannot be cancelled, so it means a saga bug.
//! - Expire: only an available coupon at or after its expiry; again is a no-op.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use events::{AggregateEvents, CouponEvent, CouponSource, CouponStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DomainError, ErrorKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CouponCommand {
    Issue {
        coupon_id: Uuid,
        user_id: String,
        /// The voucher's merchant.
        merchant_id: Option<String>,
        voucher_id: Uuid,
        value_cents: i64,
        min_spend_cents: i64,
        expires_at: DateTime<Utc>,
        source: CouponSource,
    },
    Reserve {
        order_id: Uuid,
        user_id: String,
        subtotal_cents: i64,
        at: DateTime<Utc>,
    },
    Redeem {
        order_id: Uuid,
    },
    Release {
        order_id: Uuid,
    },
    Expire {
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CouponError {
    #[error("coupon not found")]
    NotFound,
    #[error("coupon already issued")]
    AlreadyIssued,
    #[error("value_cents must be positive")]
    NonPositiveValue,
    #[error("min_spend_cents must not be negative")]
    NegativeMinSpend,
    #[error("the coupon belongs to another user")]
    NotOwner,
    #[error("the coupon is {}", status.as_str())]
    NotAvailable { status: CouponStatus },
    #[error("the coupon has expired")]
    Expired,
    #[error("the order does not reach the minimum spend of {min_spend_cents}")]
    MinSpendNotMet { min_spend_cents: i64 },
    #[error("the coupon is not held by this order")]
    NotHeldByOrder,
    #[error("the coupon was already redeemed")]
    AlreadyRedeemed,
    #[error("the coupon has not reached its expiry")]
    NotYetExpired,
}

impl DomainError for CouponError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::NotOwner => ErrorKind::Forbidden,
            Self::AlreadyIssued
            | Self::NotAvailable { .. }
            | Self::Expired
            | Self::NotHeldByOrder
            | Self::AlreadyRedeemed => ErrorKind::Conflict,
            Self::NonPositiveValue | Self::NegativeMinSpend | Self::MinSpendNotMet { .. } | Self::NotYetExpired => {
                ErrorKind::Invalid
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "coupon_not_found",
            Self::AlreadyIssued => "coupon_exists",
            Self::NonPositiveValue => "non_positive_value",
            Self::NegativeMinSpend => "negative_min_spend",
            Self::NotOwner => "not_owner",
            Self::NotAvailable { .. } => "coupon_unavailable",
            Self::Expired => "coupon_expired",
            Self::MinSpendNotMet { .. } => "coupon_min_spend_not_met",
            Self::NotHeldByOrder => "coupon_not_held_by_order",
            Self::AlreadyRedeemed => "coupon_already_redeemed",
            Self::NotYetExpired => "coupon_not_yet_expired",
        }
    }
}

/// What `CouponIssued` fixed about the coupon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponDetails {
    pub coupon_id: Uuid,
    pub user_id: String,
    pub merchant_id: Option<String>,
    pub voucher_id: Uuid,
    pub value_cents: i64,
    pub min_spend_cents: i64,
    pub expires_at: DateTime<Utc>,
    pub source: CouponSource,
}

impl From<CouponDetails> for CouponEvent {
    fn from(details: CouponDetails) -> Self {
        Self::CouponIssued {
            coupon_id: details.coupon_id,
            user_id: details.user_id,
            merchant_id: details.merchant_id,
            voucher_id: details.voucher_id,
            value_cents: details.value_cents,
            min_spend_cents: details.min_spend_cents,
            expires_at: details.expires_at,
            source: details.source,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Coupon {
    details: Option<CouponDetails>,
    status: Option<CouponStatus>,
    /// The order holding it while reserved or redeemed.
    order_id: Option<Uuid>,
}

impl Coupon {
    pub fn exists(&self) -> bool {
        self.details.is_some()
    }

    pub fn details(&self) -> Option<&CouponDetails> {
        self.details.as_ref()
    }

    pub fn status(&self) -> Option<CouponStatus> {
        self.status
    }

    pub fn order_id(&self) -> Option<Uuid> {
        self.order_id
    }

    pub fn user_id(&self) -> Option<&str> {
        self.details.as_ref().map(|d| d.user_id.as_str())
    }

    pub fn value_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.value_cents)
    }

    pub fn min_spend_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.min_spend_cents)
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        self.details.as_ref().map(|d| d.expires_at)
    }

    fn held_by(&self, order_id: Uuid) -> bool {
        self.order_id == Some(order_id)
    }

    fn decide(&self, command: CouponCommand) -> Result<Option<CouponEvent>, CouponError> {
        match command {
            CouponCommand::Issue {
                coupon_id,
                user_id,
                merchant_id,
                voucher_id,
                value_cents,
                min_spend_cents,
                expires_at,
                source,
            } => {
                let details = CouponDetails {
                    coupon_id,
                    user_id,
                    merchant_id,
                    voucher_id,
                    value_cents,
                    min_spend_cents,
                    expires_at,
                    source,
                };
                if let Some(existing) = &self.details {
                    return if *existing == details {
                        Ok(None)
                    } else {
                        Err(CouponError::AlreadyIssued)
                    };
                }
                if value_cents <= 0 {
                    return Err(CouponError::NonPositiveValue);
                }
                if min_spend_cents < 0 {
                    return Err(CouponError::NegativeMinSpend);
                }
                Ok(Some(details.into()))
            }
            CouponCommand::Reserve {
                order_id,
                user_id,
                subtotal_cents,
                at,
            } => {
                let details = self.details.as_ref().ok_or(CouponError::NotFound)?;
                if details.user_id != user_id {
                    return Err(CouponError::NotOwner);
                }
                match self.status {
                    Some(CouponStatus::Reserved | CouponStatus::Redeemed) if self.held_by(order_id) => {
                        return Ok(None);
                    }
                    Some(CouponStatus::Expired) => return Err(CouponError::Expired),
                    Some(status @ (CouponStatus::Reserved | CouponStatus::Redeemed)) => {
                        return Err(CouponError::NotAvailable { status });
                    }
                    Some(CouponStatus::Available) | None => {}
                }
                if at >= details.expires_at {
                    return Err(CouponError::Expired);
                }
                if subtotal_cents < details.min_spend_cents {
                    return Err(CouponError::MinSpendNotMet {
                        min_spend_cents: details.min_spend_cents,
                    });
                }
                Ok(Some(CouponEvent::CouponReserved { order_id }))
            }
            CouponCommand::Redeem { order_id } => {
                let status = self.status.ok_or(CouponError::NotFound)?;
                match status {
                    CouponStatus::Reserved if self.held_by(order_id) => {
                        Ok(Some(CouponEvent::CouponRedeemed { order_id }))
                    }
                    CouponStatus::Redeemed if self.held_by(order_id) => Ok(None),
                    _ => Err(CouponError::NotHeldByOrder),
                }
            }
            CouponCommand::Release { order_id } => match self.status {
                Some(CouponStatus::Reserved) if self.held_by(order_id) => {
                    Ok(Some(CouponEvent::CouponReleased { order_id }))
                }
                Some(CouponStatus::Redeemed) if self.held_by(order_id) => Err(CouponError::AlreadyRedeemed),
                _ => Ok(None),
            },
            CouponCommand::Expire { at } => {
                let details = self.details.as_ref().ok_or(CouponError::NotFound)?;
                match self.status {
                    Some(CouponStatus::Expired) => return Ok(None),
                    Some(status @ (CouponStatus::Reserved | CouponStatus::Redeemed)) => {
                        return Err(CouponError::NotAvailable { status });
                    }
                    Some(CouponStatus::Available) | None => {}
                }
                if at < details.expires_at {
                    return Err(CouponError::NotYetExpired);
                }
                Ok(Some(CouponEvent::CouponExpired { at }))
            }
        }
    }
}

impl Aggregate for Coupon {
    const TYPE: &'static str = CouponEvent::AGGREGATE_TYPE;
    type Command = CouponCommand;
    type Event = CouponEvent;
    type Error = CouponError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if let Some(event) = self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            CouponEvent::CouponIssued {
                coupon_id,
                user_id,
                merchant_id,
                voucher_id,
                value_cents,
                min_spend_cents,
                expires_at,
                source,
            } => {
                self.details = Some(CouponDetails {
                    coupon_id,
                    user_id,
                    merchant_id,
                    voucher_id,
                    value_cents,
                    min_spend_cents,
                    expires_at,
                    source,
                });
                self.status = Some(CouponStatus::Available);
            }
            CouponEvent::CouponReserved { order_id } => {
                self.status = Some(CouponStatus::Reserved);
                self.order_id = Some(order_id);
            }
            CouponEvent::CouponRedeemed { order_id } => {
                self.status = Some(CouponStatus::Redeemed);
                self.order_id = Some(order_id);
            }
            CouponEvent::CouponReleased { .. } => {
                self.status = Some(CouponStatus::Available);
                self.order_id = None;
            }
            CouponEvent::CouponExpired { .. } => {
                self.status = Some(CouponStatus::Expired);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::domain::testing::{at_secs, execute, id, replay};

    const COUPON: u128 = 0xC0;
    const ORDER: u128 = 0x0D;
    const OTHER_ORDER: u128 = 0x0E;
    const EXPIRES: i64 = 86_400;

    fn framework() -> TestFramework<Coupon> {
        TestFramework::with(())
    }

    fn issue(value_cents: i64, min_spend_cents: i64) -> CouponCommand {
        CouponCommand::Issue {
            coupon_id: id(COUPON),
            user_id: "alice".into(),
            merchant_id: Some("shop-1".into()),
            voucher_id: id(0xF00D),
            value_cents,
            min_spend_cents,
            expires_at: at_secs(EXPIRES),
            source: CouponSource::SeckillOrder { order_id: id(0x5EC) },
        }
    }

    fn issued() -> CouponEvent {
        CouponEvent::CouponIssued {
            coupon_id: id(COUPON),
            user_id: "alice".into(),
            merchant_id: Some("shop-1".into()),
            voucher_id: id(0xF00D),
            value_cents: 1500,
            min_spend_cents: 3000,
            expires_at: at_secs(EXPIRES),
            source: CouponSource::SeckillOrder { order_id: id(0x5EC) },
        }
    }

    fn reserve(order: u128, user: &str, subtotal_cents: i64, at: i64) -> CouponCommand {
        CouponCommand::Reserve {
            order_id: id(order),
            user_id: user.into(),
            subtotal_cents,
            at: at_secs(at),
        }
    }

    fn reserved(order: u128) -> CouponEvent {
        CouponEvent::CouponReserved { order_id: id(order) }
    }

    fn redeemed(order: u128) -> CouponEvent {
        CouponEvent::CouponRedeemed { order_id: id(order) }
    }

    fn released(order: u128) -> CouponEvent {
        CouponEvent::CouponReleased { order_id: id(order) }
    }

    fn expired() -> CouponEvent {
        CouponEvent::CouponExpired { at: at_secs(EXPIRES) }
    }

    // ---- Issue ----

    #[test]
    fn issue_a_coupon() {
        framework()
            .given_no_previous_events()
            .when(issue(1500, 3000))
            .then_expect_events(vec![issued()]);
    }

    #[test]
    fn issue_identically_again_is_a_no_op() {
        framework()
            .given(vec![issued()])
            .when(issue(1500, 3000))
            .then_expect_events(vec![]);
    }

    #[test]
    fn issue_differently_again_is_a_conflict() {
        framework()
            .given(vec![issued()])
            .when(issue(1600, 3000))
            .then_expect_error(CouponError::AlreadyIssued);
    }

    #[test]
    fn issue_validates_the_amounts() {
        for value in [0, -1] {
            framework()
                .given_no_previous_events()
                .when(issue(value, 0))
                .then_expect_error(CouponError::NonPositiveValue);
        }
        framework()
            .given_no_previous_events()
            .when(issue(1500, -1))
            .then_expect_error(CouponError::NegativeMinSpend);
    }

    // ---- Reserve ----

    #[test]
    fn reserve_an_available_coupon() {
        framework()
            .given(vec![issued()])
            .when(reserve(ORDER, "alice", 3000, EXPIRES - 1))
            .then_expect_events(vec![reserved(ORDER)]);
    }

    #[test]
    fn reserve_a_released_coupon_again() {
        framework()
            .given(vec![issued(), reserved(OTHER_ORDER), released(OTHER_ORDER)])
            .when(reserve(ORDER, "alice", 3000, 0))
            .then_expect_events(vec![reserved(ORDER)]);
    }

    #[test]
    fn reserve_again_for_the_same_order_is_a_no_op() {
        for history in [
            vec![issued(), reserved(ORDER)],
            vec![issued(), reserved(ORDER), redeemed(ORDER)],
        ] {
            framework()
                .given(history)
                .when(reserve(ORDER, "alice", 3000, 0))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn reserve_someone_else_s_coupon_is_forbidden() {
        framework()
            .given(vec![issued()])
            .when(reserve(ORDER, "mallory", 3000, 0))
            .then_expect_error(CouponError::NotOwner);
    }

    #[test]
    fn reserve_a_coupon_held_by_another_order_is_a_conflict() {
        framework()
            .given(vec![issued(), reserved(OTHER_ORDER)])
            .when(reserve(ORDER, "alice", 3000, 0))
            .then_expect_error(CouponError::NotAvailable {
                status: CouponStatus::Reserved,
            });
        framework()
            .given(vec![issued(), reserved(OTHER_ORDER), redeemed(OTHER_ORDER)])
            .when(reserve(ORDER, "alice", 3000, 0))
            .then_expect_error(CouponError::NotAvailable {
                status: CouponStatus::Redeemed,
            });
    }

    #[test]
    fn reserve_an_expired_coupon_is_refused() {
        framework()
            .given(vec![issued()])
            .when(reserve(ORDER, "alice", 3000, EXPIRES))
            .then_expect_error(CouponError::Expired);
        framework()
            .given(vec![issued(), expired()])
            .when(reserve(ORDER, "alice", 3000, 0))
            .then_expect_error(CouponError::Expired);
    }

    #[test]
    fn reserve_below_the_minimum_spend_is_refused() {
        framework()
            .given(vec![issued()])
            .when(reserve(ORDER, "alice", 2999, 0))
            .then_expect_error(CouponError::MinSpendNotMet { min_spend_cents: 3000 });
    }

    #[test]
    fn reserve_a_missing_coupon_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(reserve(ORDER, "alice", 3000, 0))
            .then_expect_error(CouponError::NotFound);
    }

    // ---- Redeem ----

    #[test]
    fn redeem_a_reserved_coupon() {
        framework()
            .given(vec![issued(), reserved(ORDER)])
            .when(CouponCommand::Redeem { order_id: id(ORDER) })
            .then_expect_events(vec![redeemed(ORDER)]);
    }

    #[test]
    fn redeem_again_is_a_no_op() {
        framework()
            .given(vec![issued(), reserved(ORDER), redeemed(ORDER)])
            .when(CouponCommand::Redeem { order_id: id(ORDER) })
            .then_expect_events(vec![]);
    }

    #[test]
    fn redeem_without_holding_it_is_a_conflict() {
        for history in [
            vec![issued()],
            vec![issued(), reserved(OTHER_ORDER)],
            vec![issued(), reserved(OTHER_ORDER), redeemed(OTHER_ORDER)],
            vec![issued(), reserved(ORDER), released(ORDER)],
            vec![issued(), expired()],
        ] {
            framework()
                .given(history)
                .when(CouponCommand::Redeem { order_id: id(ORDER) })
                .then_expect_error(CouponError::NotHeldByOrder);
        }
        framework()
            .given_no_previous_events()
            .when(CouponCommand::Redeem { order_id: id(ORDER) })
            .then_expect_error(CouponError::NotFound);
    }

    // ---- Release ----

    #[test]
    fn release_a_reserved_coupon() {
        framework()
            .given(vec![issued(), reserved(ORDER)])
            .when(CouponCommand::Release { order_id: id(ORDER) })
            .then_expect_events(vec![released(ORDER)]);
    }

    #[test]
    fn release_for_an_order_that_does_not_hold_it_is_a_no_op() {
        for history in [
            vec![],
            vec![issued()],
            vec![issued(), reserved(OTHER_ORDER)],
            vec![issued(), reserved(ORDER), released(ORDER)],
            vec![issued(), expired()],
        ] {
            framework()
                .given(history)
                .when(CouponCommand::Release { order_id: id(ORDER) })
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn release_a_redeemed_coupon_is_a_conflict() {
        framework()
            .given(vec![issued(), reserved(ORDER), redeemed(ORDER)])
            .when(CouponCommand::Release { order_id: id(ORDER) })
            .then_expect_error(CouponError::AlreadyRedeemed);
    }

    // ---- Expire ----

    #[test]
    fn expire_an_available_coupon_at_its_expiry() {
        framework()
            .given(vec![issued()])
            .when(CouponCommand::Expire { at: at_secs(EXPIRES) })
            .then_expect_events(vec![expired()]);
    }

    #[test]
    fn expire_again_is_a_no_op() {
        framework()
            .given(vec![issued(), expired()])
            .when(CouponCommand::Expire {
                at: at_secs(EXPIRES + 10),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn expire_before_the_expiry_is_refused() {
        framework()
            .given(vec![issued()])
            .when(CouponCommand::Expire {
                at: at_secs(EXPIRES - 1),
            })
            .then_expect_error(CouponError::NotYetExpired);
    }

    #[test]
    fn expire_a_reserved_or_redeemed_coupon_is_a_conflict() {
        for (history, status) in [
            (vec![issued(), reserved(ORDER)], CouponStatus::Reserved),
            (vec![issued(), reserved(ORDER), redeemed(ORDER)], CouponStatus::Redeemed),
        ] {
            framework()
                .given(history)
                .when(CouponCommand::Expire { at: at_secs(EXPIRES) })
                .then_expect_error(CouponError::NotAvailable { status });
        }
        framework()
            .given_no_previous_events()
            .when(CouponCommand::Expire { at: at_secs(EXPIRES) })
            .then_expect_error(CouponError::NotFound);
    }

    // ---- state ----

    #[test]
    fn a_try_cancel_try_confirm_cycle_runs_through_the_cache_rules() {
        let mut coupon = Coupon::default();
        let steps = [
            issue(1500, 3000),
            reserve(OTHER_ORDER, "alice", 5000, 0),
            CouponCommand::Release {
                order_id: id(OTHER_ORDER),
            },
            reserve(ORDER, "alice", 5000, 1),
            CouponCommand::Redeem { order_id: id(ORDER) },
        ];
        for step in steps {
            assert_eq!(execute(&mut coupon, step, &()).unwrap().len(), 1);
        }
        assert_eq!(coupon.status(), Some(CouponStatus::Redeemed));
        assert_eq!(coupon.order_id(), Some(id(ORDER)));
        assert_eq!(coupon.user_id(), Some("alice"));
        assert_eq!(coupon.value_cents(), Some(1500));
        assert_eq!(coupon.min_spend_cents(), Some(3000));
        assert_eq!(coupon.expires_at(), Some(at_secs(EXPIRES)));
        assert_eq!(
            coupon,
            replay(vec![
                issued(),
                reserved(OTHER_ORDER),
                released(OTHER_ORDER),
                reserved(ORDER),
                redeemed(ORDER)
            ])
        );
    }

    #[test]
    fn every_error_has_a_distinct_code() {
        let all = [
            CouponError::NotFound,
            CouponError::AlreadyIssued,
            CouponError::NonPositiveValue,
            CouponError::NegativeMinSpend,
            CouponError::NotOwner,
            CouponError::NotAvailable {
                status: CouponStatus::Reserved,
            },
            CouponError::Expired,
            CouponError::MinSpendNotMet { min_spend_cents: 0 },
            CouponError::NotHeldByOrder,
            CouponError::AlreadyRedeemed,
            CouponError::NotYetExpired,
        ];
        let codes: BTreeSet<_> = all.iter().map(DomainError::code).collect();
        assert_eq!(codes.len(), all.len());
    }
}
