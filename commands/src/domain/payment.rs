//! The Payment aggregate: one payment attempt with a provider for one order,
//! settled by the provider's signed webhook.
//!
//! Rules it enforces:
//! - A payment is for a positive amount, through a named provider.
//! - It settles once: `pending` → `succeeded` or `failed`. Webhooks are
//!   delivered at least once and providers may resend the same outcome under
//!   a new event id, so repeating the outcome already recorded succeeds with
//!   no events whatever the provider event id. A success after a failure is
//!   recorded (providers do report a declined attempt that later went
//!   through, and money that arrived must be in the audit trail: the saga
//!   then refunds it); a failure after a success is an error, because money
//!   that arrived cannot un-arrive.
//! - A succeeded payment can be refunded once, for at most its amount
//!   (partial refunds are allowed, a second refund is a no-op).

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use events::{AggregateEvents, PaymentEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DomainError, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Failed,
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    /// Repeating it with the same fields succeeds with no events, so a
    /// retried "pay" request does not fail on its own first attempt.
    Create {
        payment_id: Uuid,
        order_id: Uuid,
        user_id: String,
        amount_cents: i64,
        provider: String,
        checkout_url: String,
        at: DateTime<Utc>,
    },
    Succeed {
        provider_event_id: String,
        at: DateTime<Utc>,
    },
    Fail {
        provider_event_id: String,
        reason: String,
        at: DateTime<Utc>,
    },
    Refund {
        amount_cents: i64,
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    #[error("payment not found")]
    NotFound,
    #[error("payment already exists")]
    AlreadyExists,
    #[error("amount_cents must be positive")]
    NonPositiveAmount,
    #[error("provider must not be blank")]
    MissingProvider,
    #[error("provider event id must not be blank")]
    MissingProviderEventId,
    #[error("payment already failed")]
    AlreadyFailed,
    #[error("payment already succeeded")]
    AlreadySucceeded,
    #[error("payment has not succeeded")]
    NotSucceeded,
    #[error("refund must be between 1 and {max} cents")]
    InvalidRefundAmount { max: i64 },
}

impl DomainError for PaymentError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists | Self::AlreadyFailed | Self::AlreadySucceeded | Self::NotSucceeded => {
                ErrorKind::Conflict
            }
            Self::NonPositiveAmount
            | Self::MissingProvider
            | Self::MissingProviderEventId
            | Self::InvalidRefundAmount { .. } => ErrorKind::Invalid,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "payment_not_found",
            Self::AlreadyExists => "payment_exists",
            Self::NonPositiveAmount => "non_positive_amount",
            Self::MissingProvider => "missing_provider",
            Self::MissingProviderEventId => "missing_provider_event_id",
            Self::AlreadyFailed => "payment_failed",
            Self::AlreadySucceeded => "payment_succeeded",
            Self::NotSucceeded => "payment_not_succeeded",
            Self::InvalidRefundAmount { .. } => "invalid_refund_amount",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    payment_id: Option<Uuid>,
    order_id: Option<Uuid>,
    user_id: String,
    amount_cents: i64,
    provider: String,
    checkout_url: String,
    status: Option<PaymentStatus>,
    /// The webhook that settled it, for diagnosis.
    settled_by: Option<String>,
    refunded_cents: i64,
}

impl Payment {
    pub fn exists(&self) -> bool {
        self.status.is_some()
    }

    pub fn status(&self) -> Option<PaymentStatus> {
        self.status
    }

    pub fn payment_id(&self) -> Option<Uuid> {
        self.payment_id
    }

    pub fn order_id(&self) -> Option<Uuid> {
        self.order_id
    }

    pub fn user_id(&self) -> Option<&str> {
        self.exists().then_some(self.user_id.as_str())
    }

    pub fn amount_cents(&self) -> i64 {
        self.amount_cents
    }

    pub fn provider(&self) -> Option<&str> {
        self.exists().then_some(self.provider.as_str())
    }

    pub fn checkout_url(&self) -> Option<&str> {
        self.exists().then_some(self.checkout_url.as_str())
    }

    pub fn settled_by(&self) -> Option<&str> {
        self.settled_by.as_deref()
    }

    pub fn refunded_cents(&self) -> i64 {
        self.refunded_cents
    }

    fn decide(&self, command: PaymentCommand) -> Result<Option<PaymentEvent>, PaymentError> {
        match command {
            PaymentCommand::Create {
                payment_id,
                order_id,
                user_id,
                amount_cents,
                provider,
                checkout_url,
                at,
            } => {
                if self.exists() {
                    let same = self.payment_id == Some(payment_id)
                        && self.order_id == Some(order_id)
                        && self.user_id == user_id
                        && self.amount_cents == amount_cents
                        && self.provider == provider
                        && self.checkout_url == checkout_url;
                    return if same {
                        Ok(None)
                    } else {
                        Err(PaymentError::AlreadyExists)
                    };
                }
                if amount_cents <= 0 {
                    return Err(PaymentError::NonPositiveAmount);
                }
                if provider.trim().is_empty() {
                    return Err(PaymentError::MissingProvider);
                }
                Ok(Some(PaymentEvent::PaymentCreated {
                    payment_id,
                    order_id,
                    user_id,
                    amount_cents,
                    provider,
                    checkout_url,
                    created_at: at,
                }))
            }
            PaymentCommand::Succeed { provider_event_id, at } => {
                let status = self.status.ok_or(PaymentError::NotFound)?;
                if provider_event_id.trim().is_empty() {
                    return Err(PaymentError::MissingProviderEventId);
                }
                match status {
                    PaymentStatus::Pending | PaymentStatus::Failed => {
                        Ok(Some(PaymentEvent::PaymentSucceeded { provider_event_id, at }))
                    }
                    PaymentStatus::Succeeded | PaymentStatus::Refunded => Ok(None),
                }
            }
            PaymentCommand::Fail {
                provider_event_id,
                reason,
                at,
            } => {
                let status = self.status.ok_or(PaymentError::NotFound)?;
                if provider_event_id.trim().is_empty() {
                    return Err(PaymentError::MissingProviderEventId);
                }
                match status {
                    PaymentStatus::Pending => Ok(Some(PaymentEvent::PaymentFailed {
                        provider_event_id,
                        reason,
                        at,
                    })),
                    PaymentStatus::Failed => Ok(None),
                    PaymentStatus::Succeeded | PaymentStatus::Refunded => Err(PaymentError::AlreadySucceeded),
                }
            }
            PaymentCommand::Refund {
                amount_cents,
                reason,
                at,
            } => {
                let status = self.status.ok_or(PaymentError::NotFound)?;
                match status {
                    PaymentStatus::Succeeded => {}
                    PaymentStatus::Refunded => return Ok(None),
                    PaymentStatus::Pending => return Err(PaymentError::NotSucceeded),
                    PaymentStatus::Failed => return Err(PaymentError::AlreadyFailed),
                }
                if amount_cents <= 0 || amount_cents > self.amount_cents {
                    return Err(PaymentError::InvalidRefundAmount { max: self.amount_cents });
                }
                Ok(Some(PaymentEvent::PaymentRefunded {
                    amount_cents,
                    reason,
                    at,
                }))
            }
        }
    }
}

impl Aggregate for Payment {
    const TYPE: &'static str = PaymentEvent::AGGREGATE_TYPE;
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
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
            PaymentEvent::PaymentCreated {
                payment_id,
                order_id,
                user_id,
                amount_cents,
                provider,
                checkout_url,
                ..
            } => {
                self.payment_id = Some(payment_id);
                self.order_id = Some(order_id);
                self.user_id = user_id;
                self.amount_cents = amount_cents;
                self.provider = provider;
                self.checkout_url = checkout_url;
                self.status = Some(PaymentStatus::Pending);
            }
            PaymentEvent::PaymentSucceeded { provider_event_id, .. } => {
                self.status = Some(PaymentStatus::Succeeded);
                self.settled_by = Some(provider_event_id);
            }
            PaymentEvent::PaymentFailed { provider_event_id, .. } => {
                self.status = Some(PaymentStatus::Failed);
                self.settled_by = Some(provider_event_id);
            }
            PaymentEvent::PaymentRefunded { amount_cents, .. } => {
                self.status = Some(PaymentStatus::Refunded);
                self.refunded_cents = amount_cents;
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

    fn framework() -> TestFramework<Payment> {
        TestFramework::with(())
    }

    fn create(amount_cents: i64, provider: &str) -> PaymentCommand {
        PaymentCommand::Create {
            payment_id: id(0xBA7),
            order_id: id(0x0D),
            user_id: "alice".into(),
            amount_cents,
            provider: provider.into(),
            checkout_url: "http://localhost:8080/checkout/ba7".into(),
            at: at_secs(0),
        }
    }

    fn created() -> PaymentEvent {
        PaymentEvent::PaymentCreated {
            payment_id: id(0xBA7),
            order_id: id(0x0D),
            user_id: "alice".into(),
            amount_cents: 990,
            provider: "local".into(),
            checkout_url: "http://localhost:8080/checkout/ba7".into(),
            created_at: at_secs(0),
        }
    }

    fn succeed(provider_event_id: &str) -> PaymentCommand {
        PaymentCommand::Succeed {
            provider_event_id: provider_event_id.into(),
            at: at_secs(10),
        }
    }

    fn succeeded(provider_event_id: &str) -> PaymentEvent {
        PaymentEvent::PaymentSucceeded {
            provider_event_id: provider_event_id.into(),
            at: at_secs(10),
        }
    }

    fn fail(provider_event_id: &str) -> PaymentCommand {
        PaymentCommand::Fail {
            provider_event_id: provider_event_id.into(),
            reason: "card declined".into(),
            at: at_secs(10),
        }
    }

    fn failed(provider_event_id: &str) -> PaymentEvent {
        PaymentEvent::PaymentFailed {
            provider_event_id: provider_event_id.into(),
            reason: "card declined".into(),
            at: at_secs(10),
        }
    }

    fn refund(amount_cents: i64) -> PaymentCommand {
        PaymentCommand::Refund {
            amount_cents,
            reason: "order cancelled".into(),
            at: at_secs(20),
        }
    }

    fn refunded(amount_cents: i64) -> PaymentEvent {
        PaymentEvent::PaymentRefunded {
            amount_cents,
            reason: "order cancelled".into(),
            at: at_secs(20),
        }
    }

    // ---- Create ----

    #[test]
    fn create_a_payment() {
        framework()
            .given_no_previous_events()
            .when(create(990, "local"))
            .then_expect_events(vec![created()]);
    }

    #[test]
    fn create_again_with_the_same_fields_is_a_no_op() {
        framework()
            .given(vec![created()])
            .when(create(990, "local"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn create_again_with_other_fields_is_a_conflict() {
        framework()
            .given(vec![created()])
            .when(create(991, "local"))
            .then_expect_error(PaymentError::AlreadyExists);
    }

    #[test]
    fn create_needs_a_positive_amount() {
        for amount in [0, -1] {
            framework()
                .given_no_previous_events()
                .when(create(amount, "local"))
                .then_expect_error(PaymentError::NonPositiveAmount);
        }
    }

    #[test]
    fn create_needs_a_provider() {
        framework()
            .given_no_previous_events()
            .when(create(990, " "))
            .then_expect_error(PaymentError::MissingProvider);
    }

    // ---- Succeed ----

    #[test]
    fn succeed_a_pending_payment() {
        framework()
            .given(vec![created()])
            .when(succeed("evt_1"))
            .then_expect_events(vec![succeeded("evt_1")]);
    }

    #[test]
    fn succeed_again_is_a_no_op_whatever_the_provider_event_id() {
        for id in ["evt_1", "evt_2"] {
            framework()
                .given(vec![created(), succeeded("evt_1")])
                .when(succeed(id))
                .then_expect_events(vec![]);
        }
        framework()
            .given(vec![created(), succeeded("evt_1"), refunded(990)])
            .when(succeed("evt_1"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn succeed_after_failure_records_the_money_that_came_in() {
        framework()
            .given(vec![created(), failed("evt_1")])
            .when(succeed("evt_2"))
            .then_expect_events(vec![succeeded("evt_2")]);
        // and it can then be refunded
        framework()
            .given(vec![created(), failed("evt_1"), succeeded("evt_2")])
            .when(refund(990))
            .then_expect_events(vec![refunded(990)]);
    }

    #[test]
    fn succeed_needs_a_provider_event_id() {
        framework()
            .given(vec![created()])
            .when(succeed(""))
            .then_expect_error(PaymentError::MissingProviderEventId);
    }

    #[test]
    fn succeed_a_missing_payment_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(succeed("evt_1"))
            .then_expect_error(PaymentError::NotFound);
    }

    // ---- Fail ----

    #[test]
    fn fail_a_pending_payment() {
        framework()
            .given(vec![created()])
            .when(fail("evt_1"))
            .then_expect_events(vec![failed("evt_1")]);
    }

    #[test]
    fn fail_again_is_a_no_op() {
        framework()
            .given(vec![created(), failed("evt_1")])
            .when(fail("evt_1"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn fail_after_success_is_a_conflict() {
        for history in [
            vec![created(), succeeded("evt_1")],
            vec![created(), succeeded("evt_1"), refunded(990)],
        ] {
            framework()
                .given(history)
                .when(fail("evt_2"))
                .then_expect_error(PaymentError::AlreadySucceeded);
        }
    }

    #[test]
    fn fail_needs_a_provider_event_id_and_a_payment() {
        framework()
            .given(vec![created()])
            .when(fail(" "))
            .then_expect_error(PaymentError::MissingProviderEventId);
        framework()
            .given_no_previous_events()
            .when(fail("evt_1"))
            .then_expect_error(PaymentError::NotFound);
    }

    // ---- Refund ----

    #[test]
    fn refund_a_succeeded_payment_in_full_or_in_part() {
        for amount in [990, 1] {
            framework()
                .given(vec![created(), succeeded("evt_1")])
                .when(refund(amount))
                .then_expect_events(vec![refunded(amount)]);
        }
    }

    #[test]
    fn refund_twice_is_a_no_op() {
        framework()
            .given(vec![created(), succeeded("evt_1"), refunded(990)])
            .when(refund(990))
            .then_expect_events(vec![]);
    }

    #[test]
    fn refund_before_success_or_after_failure_is_a_conflict() {
        framework()
            .given(vec![created()])
            .when(refund(990))
            .then_expect_error(PaymentError::NotSucceeded);
        framework()
            .given(vec![created(), failed("evt_1")])
            .when(refund(990))
            .then_expect_error(PaymentError::AlreadyFailed);
        framework()
            .given_no_previous_events()
            .when(refund(990))
            .then_expect_error(PaymentError::NotFound);
    }

    #[test]
    fn refund_amount_must_be_within_the_payment() {
        for amount in [0, -1, 991] {
            framework()
                .given(vec![created(), succeeded("evt_1")])
                .when(refund(amount))
                .then_expect_error(PaymentError::InvalidRefundAmount { max: 990 });
        }
    }

    // ---- state ----

    #[test]
    fn a_payment_runs_through_the_cache_rules() {
        let mut payment = Payment::default();
        for command in [create(990, "local"), succeed("evt_1"), succeed("evt_1"), refund(990)] {
            execute(&mut payment, command, &()).unwrap();
        }
        assert_eq!(payment.status(), Some(PaymentStatus::Refunded));
        assert_eq!(payment.refunded_cents(), 990);
        assert_eq!(payment.settled_by(), Some("evt_1"));
        assert_eq!(payment.order_id(), Some(id(0x0D)));
        assert_eq!(payment.user_id(), Some("alice"));
        assert_eq!(payment.amount_cents(), 990);
        assert_eq!(payment.provider(), Some("local"));
        assert_eq!(payment, replay(vec![created(), succeeded("evt_1"), refunded(990)]));
        assert_eq!(PaymentStatus::Refunded.as_str(), "refunded");
    }

    #[test]
    fn every_error_has_a_distinct_code() {
        let all = [
            PaymentError::NotFound,
            PaymentError::AlreadyExists,
            PaymentError::NonPositiveAmount,
            PaymentError::MissingProvider,
            PaymentError::MissingProviderEventId,
            PaymentError::AlreadyFailed,
            PaymentError::AlreadySucceeded,
            PaymentError::NotSucceeded,
            PaymentError::InvalidRefundAmount { max: 0 },
        ];
        let codes: BTreeSet<_> = all.iter().map(DomainError::code).collect();
        assert_eq!(codes.len(), all.len());
    }
}
