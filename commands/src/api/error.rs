//! The command API's one error type: every variant maps to a status in
//! [`ApiError::into_response`]'s single exhaustive match.

use axum::http::{self, StatusCode};
use axum::response::{IntoResponse, Response};
use platform::http::{CommonError, error_response};

use crate::{
    bus::CommandError,
    domain::{CouponError, DomainError, ErrorKind, OrderError, PaymentError, ProductError, VoucherError},
};
use event_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Voucher(VoucherError),
    #[error(transparent)]
    Order(OrderError),
    #[error(transparent)]
    Product(ProductError),
    #[error(transparent)]
    Coupon(CouponError),
    #[error(transparent)]
    Payment(PaymentError),
    /// `PAYMENT_WEBHOOK_SECRET` is not set: payments are off in this process.
    #[error("payments are not configured")]
    PaymentsDisabled,
    #[error(transparent)]
    Signature(crate::payments::signature::SignatureError),
    #[error("invalid webhook: {0}")]
    InvalidWebhook(String),
    /// The simulated provider could not deliver its webhook.
    #[error("the payment provider failed: {0}")]
    Provider(String),
    /// Too many orders for this product are waiting for their reservation.
    #[error("product {0} has too many orders in flight; retry shortly")]
    ProductBusy(uuid::Uuid),
    /// A goods order's products belong to more than one merchant.
    #[error("an order's products must all belong to one merchant")]
    MixedMerchants,
    /// Optimistic-lock conflicts outlasted the retries.
    #[error("the resource is being changed by others; try again")]
    Contended,
    /// The cause is logged, never sent.
    #[error("the event store is unavailable")]
    Store(#[source] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Common(error) => error.into_response(),
            Self::Voucher(error) => domain(&error),
            Self::Order(error) => domain(&error),
            Self::Product(error) => domain(&error),
            Self::Coupon(error) => domain(&error),
            Self::Payment(error) => domain(&error),
            Self::Contended => error_response(StatusCode::CONFLICT, "concurrent_modification", self.to_string()),
            Self::MixedMerchants => {
                error_response(StatusCode::UNPROCESSABLE_ENTITY, "mixed_merchants", self.to_string())
            }
            Self::ProductBusy(_) => {
                let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, "product_busy", self.to_string());
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                response
            }
            Self::PaymentsDisabled => {
                error_response(StatusCode::SERVICE_UNAVAILABLE, "payments_disabled", self.to_string())
            }
            Self::Signature(_) => error_response(StatusCode::BAD_REQUEST, "invalid_signature", self.to_string()),
            Self::InvalidWebhook(_) => error_response(StatusCode::BAD_REQUEST, "invalid_webhook", self.to_string()),
            Self::Provider(ref cause) => {
                tracing::error!(%cause, "simulated provider failed");
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "provider_failed",
                    "the payment provider failed",
                )
            }
            Self::Store(ref cause) => {
                tracing::error!(error = ?cause, "event store failure");
                platform::http::error::unavailable_response("store_unavailable", self.to_string())
            }
        }
    }
}

fn domain(error: &impl DomainError) -> Response {
    let status = match error.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
    };
    error_response(status, error.code(), error.to_string())
}

/// Lifts a bus error given how to wrap the aggregate's own errors.
pub fn from_command<E: std::error::Error>(error: CommandError<E>, wrap: impl FnOnce(E) -> ApiError) -> ApiError {
    match error {
        CommandError::Domain(error) => wrap(error),
        CommandError::Conflict { .. } => ApiError::Contended,
        CommandError::Store(error) => ApiError::Store(error),
    }
}

impl From<platform::limits::LimitError> for ApiError {
    fn from(error: platform::limits::LimitError) -> Self {
        Self::Common(error.into())
    }
}

impl From<crate::bus::UnitError<ApiError>> for ApiError {
    fn from(error: crate::bus::UnitError<ApiError>) -> Self {
        match error {
            crate::bus::UnitError::Decide(error) => error,
            crate::bus::UnitError::Conflict { .. } => Self::Contended,
            crate::bus::UnitError::Store(error) => Self::Store(error),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict => Self::Contended,
            other => Self::Store(other),
        }
    }
}
