//! The payment provider adapter: a hosted checkout (the provider's page,
//! which reports back through the signed webhook), and the simulated provider
//! of the local stack and the tests: its checkout page is a URL on the
//! command API that, when POSTed to by the order's customer, calls
//! `POST /webhooks/payments` with a signed body like a real provider. The
//! simulated one exists only when `PAYMENT_PROVIDER=simulated`.

use uuid::Uuid;

/// What the command side needs from a payment provider.
pub trait PaymentProvider: std::fmt::Debug + Send + Sync {
    /// Recorded on the payment.
    fn name(&self) -> &'static str;
    /// Where the customer completes the payment.
    fn checkout_url(&self, payment_id: Uuid) -> String;
    /// Whether this is the local simulation, whose checkout route the
    /// command API serves itself (and only then).
    fn is_simulated(&self) -> bool {
        false
    }
}

/// Which provider the command API talks to (`PAYMENT_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// A provider hosting its own checkout page at `PAYMENT_CHECKOUT_URL`.
    Hosted,
    /// The local stack's fake provider: never for production.
    Simulated,
}

/// A provider that hosts the checkout page: the URL is its template with
/// `{payment_id}` filled in.
#[derive(Debug, Clone)]
pub struct HostedProvider {
    pub checkout_url_template: String,
}

impl PaymentProvider for HostedProvider {
    fn name(&self) -> &'static str {
        "hosted"
    }

    fn checkout_url(&self, payment_id: Uuid) -> String {
        self.checkout_url_template
            .replace("{payment_id}", &payment_id.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct SimulatedProvider {
    /// The command API as the customer reaches it, e.g. `http://127.0.0.1:8080`.
    pub public_url: String,
}

impl PaymentProvider for SimulatedProvider {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn checkout_url(&self, payment_id: Uuid) -> String {
        format!(
            "{}/provider/checkout/{payment_id}",
            self.public_url.trim_end_matches('/')
        )
    }

    fn is_simulated(&self) -> bool {
        true
    }
}

/// The webhook body of API.md "Payment webhook".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: WebhookKind,
    pub payment_id: Uuid,
    pub order_id: Uuid,
    pub amount_cents: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WebhookKind {
    #[serde(rename = "payment.succeeded")]
    Succeeded,
    #[serde(rename = "payment.failed")]
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_body_has_the_contracts_field_names() {
        let event = WebhookEvent {
            id: "evt_1".into(),
            kind: WebhookKind::Succeeded,
            payment_id: Uuid::from_u128(1),
            order_id: Uuid::from_u128(2),
            amount_cents: 990,
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "payment.succeeded");
        assert_eq!(json["amount_cents"], 990);
        let failed: WebhookEvent = serde_json::from_value(serde_json::json!({
            "id": "evt_2", "type": "payment.failed", "payment_id": Uuid::from_u128(1),
            "order_id": Uuid::from_u128(2), "amount_cents": 990
        }))
        .unwrap();
        assert_eq!(failed.kind, WebhookKind::Failed);
    }

    #[test]
    fn the_simulated_checkout_is_a_url_on_the_command_api() {
        let provider = SimulatedProvider {
            public_url: "http://127.0.0.1:8080/".into(),
        };
        assert_eq!(
            provider.checkout_url(Uuid::from_u128(1)),
            "http://127.0.0.1:8080/provider/checkout/00000000-0000-0000-0000-000000000001"
        );
    }
}
