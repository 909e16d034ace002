//! Events of the Payment aggregate: one payment attempt with a provider,
//! settled by the provider's webhook.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateEvents;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    PaymentCreated {
        payment_id: Uuid,
        order_id: Uuid,
        user_id: String,
        amount_cents: i64,
        provider: String,
        checkout_url: String,
        created_at: DateTime<Utc>,
    },
    /// `provider_event_id` is the webhook's id, kept so a redelivered
    /// webhook is recognised and changes nothing.
    PaymentSucceeded {
        provider_event_id: String,
        at: DateTime<Utc>,
    },
    PaymentFailed {
        provider_event_id: String,
        reason: String,
        at: DateTime<Utc>,
    },
    PaymentRefunded {
        amount_cents: i64,
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> String {
        match self {
            Self::PaymentCreated { .. } => "PaymentCreated",
            Self::PaymentSucceeded { .. } => "PaymentSucceeded",
            Self::PaymentFailed { .. } => "PaymentFailed",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl AggregateEvents for PaymentEvent {
    const AGGREGATE_TYPE: &'static str = "Payment";
}
