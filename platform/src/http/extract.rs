//! Extractors whose rejections answer in the contract's error format, with
//! messages that name the field in words (never a Rust type, API.md
//! "Errors"), instead of axum's plain-text bodies.
//!
//! - [`ApiJson`]: a JSON body; 415 without a JSON content type, 413 over the
//!   body limit, 400 `malformed_json` for bad syntax, 422 `invalid_body` for
//!   data that does not fit (`items[0].quantity: expected a whole number …`).
//! - [`ApiPath`], [`ApiQuery`]: 400 `invalid_path` / `invalid_query`
//!   (`id: expected a UUID`).
//! - [`ApiBytes`]: a raw body (a webhook verifying a signature) with the same
//!   413.
//! - [`NoBody`]: for endpoints that take no body: any body bytes are a 413.

use axum::{
    body::{Bytes, HttpBody as _},
    extract::{
        FromRequest, FromRequestParts, RawPathParams, Request,
        path::ErrorKind,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::request::Parts,
};
use futures::StreamExt as _;
use http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::{
    describe::{describe, expected_words, field_path, parse_json},
    error::CommonError,
    server::BODY_LIMIT_BYTES,
};

/// A JSON request body. Request types should use `#[serde(deny_unknown_fields)]`.
///
/// ```ignore
/// async fn create(user: Authorized<MerchantsOrAdmins>, ApiJson(body): ApiJson<CreateProduct>) -> … {}
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> ApiJson<T> {
    /// Parses `bytes` with the same errors as the extractor, for handlers that
    /// need the raw bytes first (a signed webhook).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CommonError> {
        parse_json(bytes).map(Self)
    }
}

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = CommonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(CommonError::UnsupportedMediaType);
        }
        let ApiBytes(bytes) = ApiBytes::from_request(req, state).await?;
        Self::from_bytes(&bytes)
    }
}

/// `application/json`, or any `application/…+json`, with or without parameters.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A raw request body, within the service's body limit.
///
/// ```ignore
/// async fn webhook(State(api): State<Api>, headers: HeaderMap, ApiBytes(body): ApiBytes) -> … {}
/// ```
#[derive(Debug, Clone, Default)]
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = CommonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(Self)
            .map_err(|rejection: BytesRejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    CommonError::PayloadTooLarge {
                        limit: BODY_LIMIT_BYTES,
                    }
                } else {
                    // The client went away or sent a broken chunked body.
                    CommonError::BadRequest("the request body could not be read".to_owned())
                }
            })
    }
}

/// For endpoints that take no body: a request that carries one is refused
/// with 413 (API.md "Errors") rather than silently ignored. Goes last, like
/// any body extractor.
///
/// ```ignore
/// async fn claim(user: Authorized<Customers>, ApiPath(id): ApiPath<Uuid>, _: NoBody) -> … {}
/// ```
///
/// A `Content-Length` decides without reading; a chunked body is read up to
/// its first non-empty chunk, never further.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = CommonError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Some(length) = req.headers().get(header::CONTENT_LENGTH) {
            let empty = length
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .is_some_and(|n| n == 0);
            return if empty {
                Ok(Self)
            } else {
                Err(CommonError::UnexpectedBody)
            };
        }
        let body = req.into_body();
        if body.is_end_stream() {
            return Ok(Self);
        }
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) if chunk.is_empty() => {}
                Ok(_) => return Err(CommonError::UnexpectedBody),
                Err(_) => return Err(CommonError::BadRequest("the request body could not be read".to_owned())),
            }
        }
        Ok(Self)
    }
}

/// Path parameters (e.g. a UUID id): a malformed one is a 400, not a 404.
///
/// ```ignore
/// async fn order(user: Authorized<AnyRole>, ApiPath(id): ApiPath<Uuid>) -> … {}
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = CommonError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_error(rejection, parts).await),
        }
    }
}

async fn path_error(rejection: PathRejection, parts: &mut Parts) -> CommonError {
    let PathRejection::FailedToDeserializePathParams(error) = rejection else {
        // The route and the extractor disagree: our bug, not the client's.
        return CommonError::internal(anyhow::anyhow!("path parameters: {rejection}"));
    };
    let message = match error.kind() {
        ErrorKind::ParseErrorAtKey { key, expected_type, .. } => {
            format!("{key}: expected {}", expected_words(expected_type))
        }
        ErrorKind::ParseErrorAtIndex {
            index, expected_type, ..
        } => format!(
            "{}: expected {}",
            key_at(parts, *index).await,
            expected_words(expected_type)
        ),
        ErrorKind::ParseError { expected_type, .. } => {
            format!("{}: expected {}", key_at(parts, 0).await, expected_words(expected_type))
        }
        ErrorKind::DeserializeError { key, message, .. } => describe(key, message),
        ErrorKind::InvalidUtf8InPathParam { key } => format!("{key}: not valid UTF-8"),
        ErrorKind::Message(message) => describe(&key_at(parts, 0).await, message),
        _ => return CommonError::internal(anyhow::anyhow!("path parameters: {error}")),
    };
    CommonError::InvalidPath(message)
}

/// The name of the `index`th path parameter: errors on a single value do not
/// carry it, the route does.
async fn key_at(parts: &mut Parts, index: usize) -> String {
    RawPathParams::from_request_parts(parts, &())
        .await
        .ok()
        .and_then(|params| params.iter().nth(index).map(|(key, _)| key.to_owned()))
        .unwrap_or_else(|| format!("path segment {}", index + 1))
}

/// Query-string parameters.
///
/// ```ignore
/// async fn list(user: Authorized<MerchantsOrAdmins>, ApiQuery(query): ApiQuery<OrdersQuery>) -> … {}
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = CommonError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| query_error(&rejection))
    }
}

/// axum deserializes queries through serde_path_to_error already; its error,
/// with the field path, is in the rejection's source chain.
fn query_error(rejection: &QueryRejection) -> CommonError {
    type PathError = serde_path_to_error::Error<serde::de::value::Error>;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if let Some(error) = error.downcast_ref::<PathError>() {
            let message = error.inner().to_string();
            return CommonError::InvalidQuery(describe(&field_path(error.path()), &message));
        }
        source = error.source();
    }
    CommonError::InvalidQuery("the query string is not valid".to_owned())
}
