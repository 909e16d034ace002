//! Paying for an order: `POST /orders/{id}/pay`, the provider's signed
//! `POST /webhooks/payments`, and the simulated provider's checkout
//! `POST /provider/checkout/{payment_id}`.
//!
//! The webhook records the payment's outcome and the order's in ONE
//! append: a payment that succeeds marks the order paid, or — if the order was
//! cancelled or timed out first — is refunded (both recorded as events).
//! A webhook delivered again changes nothing: the payment has settled, the
//! order is paid with that payment already, the refund is recorded.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use chrono::Utc;
use events::{CancellationReason, EventMetadata};
use platform::http::{ApiBytes, ApiPath, ApiQuery, Authorized, Customers, NoBody};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Api, ApiError, metadata};
use crate::{
    bus::{RetryPolicy, unit_of_work},
    domain::{CancellerRole, Order, OrderCommand, Payment, PaymentCommand, order::OrderError},
    payments::{
        PaymentSettings,
        provider::{WebhookEvent, WebhookKind},
        signature,
    },
};
use event_store::{Append, Loaded, StoreError, decide};

fn settings(api: &Api) -> Result<&PaymentSettings, ApiError> {
    api.payments.as_deref().ok_or(ApiError::PaymentsDisabled)
}

#[derive(Debug, Serialize)]
pub struct Checkout {
    payment_id: Uuid,
    amount_cents: i64,
    checkout_url: String,
}

pub async fn pay(
    State(api): State<Api>,
    user: Authorized<Customers>,
    ApiPath(order_id): ApiPath<Uuid>,
    _: NoBody,
) -> Result<Json<Checkout>, ApiError> {
    let settings = settings(&api)?;
    let id = order_id.to_string();
    let metadata = metadata(&user);
    let checkout = unit_of_work(&api.store, RetryPolicy::default(), "Order", || async {
        let order = api.store.load::<Order>(&id).await?;
        if order.aggregate.user_id() != Some(user.sub.as_str()) {
            // someone else's order is answered like a missing one
            return Err(ApiError::Order(OrderError::NotFound));
        }
        // A retried "pay" gets the payment it started, while the order still
        // awaits payment; a cancelled or paid order is refused below by
        // `StartPayment`, whatever sessions it had (409).
        if order.aggregate.status() == Some(events::OrderStatus::PendingPayment)
            && let Some(payment_id) = order.aggregate.payment_id()
        {
            let payment = api.store.load::<Payment>(&payment_id.to_string()).await?.aggregate;
            if let Some(checkout_url) = payment.checkout_url() {
                let checkout = Checkout {
                    payment_id,
                    amount_cents: payment.amount_cents(),
                    checkout_url: checkout_url.to_owned(),
                };
                return Ok((Vec::new(), checkout));
            }
        }
        let payment_id = Uuid::now_v7();
        let amount_cents = order.aggregate.total_cents();
        let checkout_url = settings.provider.checkout_url(payment_id);
        let started = decide(
            &id,
            order,
            OrderCommand::StartPayment {
                payment_id,
                amount_cents,
            },
            &(),
        )
        .await
        .map_err(|(error, _)| ApiError::Order(error))?;
        let create = PaymentCommand::Create {
            payment_id,
            order_id,
            user_id: user.sub.clone(),
            amount_cents,
            provider: settings.provider.name().to_owned(),
            checkout_url: checkout_url.clone(),
            at: api.clock.now(),
        };
        let created = decide(&payment_id.to_string(), Loaded::<Payment>::default(), create, &())
            .await
            .map_err(|(error, _)| ApiError::Payment(error))?;
        let appends = vec![started.to_append(&metadata)?, created.to_append(&metadata)?];
        let checkout = Checkout {
            payment_id,
            amount_cents,
            checkout_url,
        };
        Ok((appends, checkout))
    })
    .await?;
    Ok(Json(checkout))
}

pub async fn webhook(
    State(api): State<Api>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    let settings = settings(&api)?;
    let header = headers.get(signature::HEADER).and_then(|value| value.to_str().ok());
    signature::verify(
        settings.webhook_secret.expose().as_bytes(),
        header,
        &body,
        api.clock.now(),
    )
    .map_err(ApiError::Signature)?;
    let event: WebhookEvent =
        serde_json::from_slice(&body).map_err(|error| ApiError::InvalidWebhook(error.to_string()))?;
    if event.id.trim().is_empty() {
        return Err(ApiError::InvalidWebhook("id must not be empty".into()));
    }
    let metadata = EventMetadata::system("payment-webhook");
    let payment_key = event.payment_id.to_string();
    let order_key = event.order_id.to_string();
    unit_of_work(&api.store, RetryPolicy::default(), "Payment", || async {
        let payment = api.store.load::<Payment>(&payment_key).await?;
        if payment.aggregate.order_id() != Some(event.order_id)
            || payment.aggregate.amount_cents() != event.amount_cents
        {
            return Err(ApiError::InvalidWebhook(
                "no such payment for this order and amount".into(),
            ));
        }
        let order = api.store.load::<Order>(&order_key).await?;
        let decisions = match event.kind {
            WebhookKind::Succeeded => succeeded(&api, &event, payment, order).await?,
            WebhookKind::Failed => failed(&api, &event, payment, order).await?,
        };
        let appends: Vec<Append> = decisions
            .into_iter()
            .map(|decision| decision.to_append(&metadata))
            .collect::<Result<_, _>>()?;
        Ok((appends, ()))
    })
    .await?;
    Ok(StatusCode::OK)
}

/// One aggregate's new events, either kind.
enum Decision {
    Payment(event_store::Decided<Payment>),
    Order(event_store::Decided<Order>),
}

impl Decision {
    fn to_append(&self, metadata: &EventMetadata) -> Result<Append, StoreError> {
        match self {
            Self::Payment(decided) => decided.to_append(metadata),
            Self::Order(decided) => decided.to_append(metadata),
        }
    }
}

async fn succeeded(
    api: &Api,
    event: &WebhookEvent,
    payment: Loaded<Payment>,
    order: Loaded<Order>,
) -> Result<Vec<Decision>, ApiError> {
    let at = api.clock.now();
    let id = event.payment_id.to_string();
    let settled = decide(
        &id,
        payment,
        PaymentCommand::Succeed {
            provider_event_id: event.id.clone(),
            at,
        },
        &(),
    )
    .await
    .map_err(|(error, _)| ApiError::Payment(error))?;
    let order_id = event.order_id.to_string();
    let paid = OrderCommand::MarkPaid {
        payment_id: event.payment_id,
        amount_cents: event.amount_cents,
        paid_at: at,
    };
    match decide(&order_id, order.clone(), paid, &()).await {
        Ok(paid) => Ok(vec![Decision::Payment(settled), Decision::Order(paid)]),
        // Cancelled or timed out first (a failed payment cancels too): the
        // success is recorded, then the money goes back, in one decision so
        // the refund is never stored without the success before it.
        Err((OrderError::Cancelled, _)) => {
            let reason = "paid after the order was cancelled".to_owned();
            let refund = PaymentCommand::Refund {
                amount_cents: event.amount_cents,
                reason: reason.clone(),
                at,
            };
            let refunded_payment = settled
                .then(refund, &())
                .await
                .map_err(|(error, _)| ApiError::Payment(error))?;
            let refund_order = OrderCommand::Refund {
                payment_id: event.payment_id,
                amount_cents: event.amount_cents,
                reason,
                at,
            };
            let refunded_order = decide(&order_id, order, refund_order, &())
                .await
                .map_err(|(error, _)| ApiError::Order(error))?;
            metrics::counter!("payments_refunded_total").increment(1);
            Ok(vec![
                Decision::Payment(refunded_payment),
                Decision::Order(refunded_order),
            ])
        }
        Err((error, _)) => Err(ApiError::Order(error)),
    }
}

async fn failed(
    api: &Api,
    event: &WebhookEvent,
    payment: Loaded<Payment>,
    order: Loaded<Order>,
) -> Result<Vec<Decision>, ApiError> {
    let at = api.clock.now();
    let failed = PaymentCommand::Fail {
        provider_event_id: event.id.clone(),
        reason: "declined by the provider".into(),
        at,
    };
    let settled = decide(&event.payment_id.to_string(), payment, failed, &())
        .await
        .map_err(|(error, _)| ApiError::Payment(error))?;
    let cancel = OrderCommand::Cancel {
        by: "payment-provider".into(),
        by_role: CancellerRole::System,
        reason: CancellationReason::PaymentFailed,
        at,
    };
    // an order no longer awaiting payment keeps its state
    let mut decisions = vec![Decision::Payment(settled)];
    if let Ok(cancelled) = decide(&event.order_id.to_string(), order, cancel, &()).await {
        decisions.push(Decision::Order(cancelled));
    }
    Ok(decisions)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutQuery {
    /// `fail` makes the simulated provider report a declined payment.
    outcome: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Delivered {
    webhook_status: u16,
}

/// The simulated provider's checkout: it sends the signed webhook to the
/// configured URL, as a real provider would after the customer paid. Only
/// the order's customer may use it; anyone else's payment is answered as
/// missing.
pub async fn simulated_checkout(
    State(api): State<Api>,
    user: Authorized<Customers>,
    ApiPath(payment_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<CheckoutQuery>,
    _: NoBody,
) -> Result<Json<Delivered>, ApiError> {
    let settings = settings(&api)?;
    let kind = match query.outcome.as_deref() {
        None | Some("succeed") => WebhookKind::Succeeded,
        Some("fail") => WebhookKind::Failed,
        Some(other) => return Err(ApiError::InvalidWebhook(format!("unknown outcome {other:?}"))),
    };
    let payment = api.store.load::<Payment>(&payment_id.to_string()).await?.aggregate;
    let (Some(order_id), Some(owner)) = (payment.order_id(), payment.user_id()) else {
        return Err(ApiError::Payment(crate::domain::PaymentError::NotFound));
    };
    if owner != user.sub {
        return Err(ApiError::Payment(crate::domain::PaymentError::NotFound));
    }
    let amount_cents = payment.amount_cents();
    let event = WebhookEvent {
        id: format!("evt_{}", Uuid::now_v7().simple()),
        kind,
        payment_id,
        order_id,
        amount_cents,
    };
    let body = serde_json::to_vec(&event).map_err(|error| ApiError::InvalidWebhook(error.to_string()))?;
    let header = signature::sign(
        settings.webhook_secret.expose().as_bytes(),
        Utc::now().timestamp(),
        &body,
    );
    let response = settings
        .http
        .post(&settings.webhook_url)
        .header(signature::HEADER, header)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|error| ApiError::Provider(error.to_string()))?;
    Ok(Json(Delivered {
        webhook_status: response.status().as_u16(),
    }))
}
