//! The query API's one error type: every variant maps to a status in
//! [`ApiError::into_response`]'s single exhaustive match.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use platform::http::{CommonError, error_response};

use crate::filter::FilterError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Common(#[from] CommonError),
    /// Unknown, or not the caller's to see: the two look alike on purpose.
    #[error("no {0} with this id")]
    NotFound(&'static str),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{0}")]
    InvalidParameter(String),
    /// The cause is logged, never sent.
    #[error("the views are unavailable")]
    Store(#[from] sqlx::Error),
    /// A lookup by id that failed (its cause, shared by every lookup of the
    /// statement, is logged, never sent).
    #[error("the views are unavailable")]
    Lookup(#[from] crate::lookup::LookupError),
    /// A stored document that is not JSON (it cannot be: the column is
    /// jsonb); logged, never sent.
    #[error("a stored document does not decode")]
    StoredDocument(#[source] serde_json::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Common(error) => error.into_response(),
            Self::NotFound(what) => {
                let code = format!("{what}_not_found");
                error_response(StatusCode::NOT_FOUND, &code, format!("no {what} with this id"))
            }
            Self::Filter(ref error) => error_response(StatusCode::BAD_REQUEST, error.code(), self.to_string()),
            Self::InvalidParameter(ref message) => error_response(StatusCode::BAD_REQUEST, "invalid_query", message),
            Self::Store(ref cause) => {
                tracing::error!(error = ?cause, "view store failure");
                platform::http::error::unavailable_response("store_unavailable", self.to_string())
            }
            Self::Lookup(ref cause) => {
                tracing::error!(error = ?cause, "view lookup failure");
                platform::http::error::unavailable_response("store_unavailable", self.to_string())
            }
            Self::StoredDocument(ref cause) => {
                tracing::error!(error = ?cause, "stored document does not decode");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", self.to_string())
            }
        }
    }
}
