//! The edge's one error type: every variant maps to a status in
//! [`ApiError::into_response`]'s single exhaustive match.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use platform::http::{CommonError, fixed_error_response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("this voucher is sold out")]
    SoldOut,
    #[error("you already have an order for this voucher")]
    AlreadyPurchased,
    #[error("the sale has not started")]
    SaleNotStarted,
    #[error("the sale has ended")]
    SaleEnded,
    #[error("no seckill voucher with this id")]
    VoucherNotFound,
    #[error("too many attempts; retry later")]
    RateLimited { retry_after: Duration },
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    InvalidIdempotencyKey,
    /// Redis is being rebuilt for this voucher from the event store.
    #[error("the sale is being loaded; retry shortly")]
    WarmingUp,
    /// The cause is logged, never sent.
    #[error("the sale is unavailable; retry shortly")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn unavailable(cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(cause))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Common(error) => error.into_response(),
            other => other.render(),
        }
    }
}

impl ApiError {
    fn render(self) -> Response {
        let (status, code, retry_after) = match &self {
            Self::Common(_) => unreachable!("rendered by CommonError"),
            Self::SoldOut => (StatusCode::CONFLICT, "sold_out", None),
            Self::AlreadyPurchased => (StatusCode::CONFLICT, "already_purchased", None),
            Self::SaleNotStarted => (StatusCode::FORBIDDEN, "sale_not_started", None),
            Self::SaleEnded => (StatusCode::FORBIDDEN, "sale_ended", None),
            Self::VoucherNotFound => (StatusCode::NOT_FOUND, "voucher_not_found", None),
            Self::RateLimited { retry_after } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Some(*retry_after)),
            Self::InvalidIdempotencyKey => (StatusCode::BAD_REQUEST, "invalid_idempotency_key", None),
            Self::WarmingUp => (
                StatusCode::SERVICE_UNAVAILABLE,
                "warming_up",
                Some(Duration::from_secs(1)),
            ),
            Self::Unavailable(cause) => {
                tracing::error!(error = %cause, "seckill gate unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "gate_unavailable",
                    Some(Duration::from_secs(1)),
                )
            }
        };
        // every code here has one message: its body is encoded once
        let mut response = fixed_error_response(status, code, || self.to_string());
        if let Some(wait) = retry_after {
            // whole seconds, rounded up: "Retry-After: 0" would invite a hot loop
            let seconds = wait.as_millis().div_ceil(1000).max(1);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(u64::try_from(seconds).unwrap_or(u64::MAX)),
            );
        }
        response
    }
}
