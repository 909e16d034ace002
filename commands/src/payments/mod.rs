//! Payments: the provider adapter and the simulated local provider
//! ([`provider`]), and the signed webhook's verification ([`signature`]).
//! The HTTP side is in `api::payments`.

pub mod provider;
pub mod signature;

use std::sync::Arc;

use platform::Secret;

/// Payments as the command API runs them.
#[derive(Debug, Clone)]
pub struct PaymentSettings {
    pub provider: Arc<dyn provider::PaymentProvider>,
    /// Verifies (and, for the simulated provider, signs) webhooks.
    pub webhook_secret: Secret,
    /// Where the simulated provider delivers its webhook.
    pub webhook_url: String,
    /// The simulated provider's HTTP client.
    pub http: reqwest::Client,
}
