//! `{"error": {"code": "<snake_case>", "message": "..."}}` for every 4xx/5xx.
//!
//! Each service has its own error enum mapping variants to statuses in one
//! exhaustive match and rendering through [`error_response`]; the errors that
//! every service shares (auth, malformed input, routing) are [`CommonError`],
//! which service enums wrap.

use std::{
    collections::HashMap,
    sync::{LazyLock, RwLock},
};

use axum::{
    Json,
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The one way a service turns an error into a response.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// How long a client should wait before retrying after a dependency was
/// unavailable (the `Retry-After` of every such 503).
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// A 503 for a dependency that is away (the store, the gate), with
/// `Retry-After`: the service is alive and the request may be retried.
pub fn unavailable_response(code: &str, message: impl Into<String>) -> Response {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, code, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS));
    response
}

/// [`error_response`] for an error whose message never changes for its
/// code: the body is serialized on the first answer with that code and
/// shared afterwards, so a hot refusal (a sold-out sale) costs no JSON
/// encoding. `message` is only called on that first answer.
pub fn fixed_error_response(status: StatusCode, code: &'static str, message: impl FnOnce() -> String) -> Response {
    static BODIES: LazyLock<RwLock<HashMap<&'static str, Bytes>>> = LazyLock::new(RwLock::default);
    let cached = BODIES.read().ok().and_then(|bodies| bodies.get(code).cloned());
    let body = cached.unwrap_or_else(|| {
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message(),
            },
        };
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        if let Ok(mut bodies) = BODIES.write() {
            bodies.insert(code, bytes.clone());
        }
        bytes
    });
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    #[error("missing bearer token")]
    MissingToken,
    #[error("invalid token")]
    InvalidToken,
    #[error("token expired")]
    TokenExpired,
    #[error("this action needs one of the roles: {0}")]
    Forbidden(String),
    /// The role is right, but not for this: the message says why.
    #[error("{0}")]
    NotAllowed(String),
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidBody(String),
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A body sent to an endpoint that takes none (API.md: 413).
    #[error("this endpoint takes no request body")]
    UnexpectedBody,
    #[error("request URI longer than {limit} bytes")]
    UriTooLong { limit: usize },
    /// A request the HTTP layer could not take as it is (not a JSON problem).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error("a dependency is unavailable")]
    Unavailable,
    /// The request took longer than the server's request timeout.
    #[error("the request took too long; try again later")]
    RequestTimeout { retry_after_secs: u64 },
    /// The cause is logged, never sent.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl CommonError {
    pub fn internal(error: impl Into<anyhow::Error>) -> Self {
        Self::Internal(error.into())
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
            Self::InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            Self::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired"),
            Self::Forbidden(_) | Self::NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::InvalidBody(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            Self::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::PayloadTooLarge { .. } | Self::UnexpectedBody => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            Self::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            Self::RouteNotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::RequestTimeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "request_timeout"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for CommonError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Internal(cause) = &self {
            tracing::error!(error = ?cause, "internal error");
        }
        let mut response = error_response(status, code, self.to_string());
        if let Self::Unavailable = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS));
        }
        if let Self::RateLimited { retry_after_secs } | Self::RequestTimeout { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

/// The code and message for an error status that something other than our
/// handlers produced with no contract body: hyper's own parse errors and
/// axum's plain-text rejections. Their text is not passed on: it may name
/// internal types.
pub(crate) fn generic_error(status: StatusCode) -> (&'static str, &'static str) {
    match status.as_u16() {
        400 => ("bad_request", "the request could not be understood"),
        401 => ("unauthorized", "authentication required"),
        403 => ("forbidden", "not allowed"),
        404 => ("not_found", "no such route"),
        405 => ("method_not_allowed", "method not allowed"),
        408 => ("request_timeout", "the request took too long to arrive"),
        409 => ("conflict", "the request conflicts with the current state"),
        411 => ("length_required", "a Content-Length is required"),
        413 => ("payload_too_large", "request body too large"),
        414 => ("uri_too_long", "request URI too long"),
        415 => ("unsupported_media_type", "unsupported Content-Type"),
        422 => ("invalid_body", "the request body is not valid"),
        429 => ("rate_limited", "too many requests"),
        431 => ("headers_too_large", "request headers too large"),
        503 => ("unavailable", "service unavailable"),
        500..=599 => ("internal", "internal error"),
        _ => ("bad_request", "the request could not be handled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(response: Response) -> (StatusCode, ErrorBody) {
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not an error body: {e}")),
        )
    }

    #[tokio::test]
    async fn every_error_has_the_contract_body() {
        let (status, body) = body_of(CommonError::Forbidden("admin".into()).into_response()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body.error.code, "forbidden");
        assert!(!body.error.message.is_empty());
    }

    #[tokio::test]
    async fn internal_errors_hide_their_cause() {
        let error = CommonError::internal(anyhow::anyhow!("password=hunter2 connection refused"));
        let (status, body) = body_of(error.into_response()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body.error.code, "internal");
        assert!(!body.error.message.contains("hunter2"));
    }

    #[tokio::test]
    async fn rate_limited_sets_retry_after() {
        let response = CommonError::RateLimited { retry_after_secs: 3 }.into_response();
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(3u64))
        );
        let (status, body) = body_of(response).await;
        assert_eq!(
            (status, body.error.code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        );
    }
}
