//! `POST /seckill/{voucher_id}`: one attempt, answered in one Redis round
//! trip (or none, for a voucher this process knows is sold out, or a user
//! over this process's rate limit).

use std::{
    borrow::Cow,
    sync::{Arc, LazyLock},
};

use axum::{
    Json,
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, StatusCode, request::Parts},
};
use platform::{
    http::{ApiPath, Authorized, Customers, NoBody},
    telemetry::TraceHeaders,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    error::ApiError,
    flags::VoucherFlags,
    gate::{Admission, Gate},
    limiter::AttemptLimiter,
    warmup::{Warmer, Warmth},
};

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// What admission needs, shared by every request.
#[derive(Debug, Clone)]
pub struct Edge {
    pub gate: Gate,
    pub flags: Arc<VoucherFlags>,
    pub warmer: Arc<Warmer>,
    pub limiter: Arc<AttemptLimiter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub order_id: Uuid,
    /// Always "queued": borrowed, so an admission allocates nothing for it.
    pub status: Cow<'static, str>,
}

pub async fn attempt(
    State(edge): State<Arc<Edge>>,
    user: Authorized<Customers>,
    ApiPath(voucher_id): ApiPath<Uuid>,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    _: NoBody,
) -> Result<(StatusCode, Json<Queued>), ApiError> {
    let idempotency_key = idempotency_key.as_ref().map(|key| key.as_str());
    // A keyed retry must get its stored answer, which only Redis has.
    if idempotency_key.is_none() && edge.flags.is_sold_out(voucher_id) {
        ATTEMPTS.sold_out_cached.increment(1);
        return Err(ApiError::SoldOut);
    }
    if edge.flags.is_unknown(voucher_id) {
        return Err(ApiError::VoucherNotFound);
    }
    if let Err(retry_after) = edge.limiter.check(voucher_id, &user.sub) {
        ATTEMPTS.rate_limited.increment(1);
        return Err(ApiError::RateLimited { retry_after });
    }
    // time-ordered, so order ids sort by admission; the attempt's time
    let order_id = edge.gate.new_order_id();
    let trace = TraceHeaders::current();
    let admit = || {
        edge.gate
            .admit(voucher_id, &user.sub, order_id, idempotency_key, &trace)
    };
    let mut admission = admit().await.map_err(ApiError::unavailable)?;
    if admission == Admission::Cold {
        // Boxed: the warm-up's future (event store reads) is far larger than
        // the rest of the attempt, and every attempt's future would carry,
        // move and drop its space.
        admission = match Box::pin(edge.warmer.ensure(voucher_id))
            .await
            .map_err(ApiError::unavailable)?
        {
            Warmth::Ready => Box::pin(admit()).await.map_err(ApiError::unavailable)?,
            Warmth::Unknown => {
                edge.flags.mark_unknown(voucher_id);
                return Err(ApiError::VoucherNotFound);
            }
            Warmth::Busy => return Err(ApiError::WarmingUp),
        };
    }
    ATTEMPTS.of(&admission).increment(1);
    match admission {
        Admission::Admitted { order_id, .. } => Ok((
            StatusCode::ACCEPTED,
            Json(Queued {
                order_id,
                status: Cow::Borrowed("queued"),
            }),
        )),
        Admission::SoldOut => {
            edge.flags.mark_sold_out(voucher_id);
            Err(ApiError::SoldOut)
        }
        Admission::AlreadyPurchased => Err(ApiError::AlreadyPurchased),
        Admission::SaleNotStarted => Err(ApiError::SaleNotStarted),
        Admission::SaleEnded => Err(ApiError::SaleEnded),
        Admission::Cold => Err(ApiError::WarmingUp),
    }
}

/// `seckill_attempts_total{outcome}`, one handle per outcome registered
/// once: a lookup by labels in the recorder on every attempt cost more than
/// the counting.
struct Attempts {
    admitted: metrics::Counter,
    sold_out: metrics::Counter,
    sold_out_cached: metrics::Counter,
    already_purchased: metrics::Counter,
    sale_not_started: metrics::Counter,
    sale_ended: metrics::Counter,
    rate_limited: metrics::Counter,
    warming_up: metrics::Counter,
}

static ATTEMPTS: LazyLock<Attempts> = LazyLock::new(|| {
    let outcome = |label: &'static str| metrics::counter!("seckill_attempts_total", "outcome" => label);
    Attempts {
        admitted: outcome("admitted"),
        sold_out: outcome("sold_out"),
        sold_out_cached: outcome("sold_out_cached"),
        already_purchased: outcome("already_purchased"),
        sale_not_started: outcome("sale_not_started"),
        sale_ended: outcome("sale_ended"),
        rate_limited: outcome("rate_limited"),
        warming_up: outcome("warming_up"),
    }
});

impl Attempts {
    fn of(&self, admission: &Admission) -> &metrics::Counter {
        match admission {
            Admission::Admitted { .. } => &self.admitted,
            Admission::SoldOut => &self.sold_out,
            Admission::AlreadyPurchased => &self.already_purchased,
            Admission::SaleNotStarted => &self.sale_not_started,
            Admission::SaleEnded => &self.sale_ended,
            Admission::Cold => &self.warming_up,
        }
    }
}

/// The optional `Idempotency-Key` header, checked ([`idempotency_key`]).
/// Extracted on its own rather than through a `HeaderMap`, which would copy
/// every header of every attempt.
pub struct IdempotencyKey(pub Option<CheckedKey>);

/// A header value that is visible ASCII, 1–255 bytes.
pub struct CheckedKey(HeaderValue);

impl CheckedKey {
    pub fn as_str(&self) -> &str {
        // checked to be visible ASCII when extracted
        self.0.to_str().unwrap_or_default()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        idempotency_key(&parts.headers)?;
        Ok(Self(parts.headers.get(IDEMPOTENCY_KEY).cloned().map(CheckedKey)))
    }
}

/// The optional `Idempotency-Key`: visible ASCII only, as it becomes part of a Redis key.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| ApiError::InvalidIdempotencyKey)?;
    let valid = !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(Some(key))
    } else {
        Err(ApiError::InvalidIdempotencyKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(value: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).expect("header value"));
        headers
    }

    #[test]
    fn an_absent_key_is_fine_and_a_visible_ascii_key_is_taken() {
        assert_eq!(idempotency_key(&HeaderMap::new()).ok(), Some(None));
        let headers = with_key(b"order-7f3a_01");
        assert_eq!(idempotency_key(&headers).ok(), Some(Some("order-7f3a_01")));
    }

    #[test]
    fn keys_with_spaces_controls_non_ascii_or_too_long_are_refused() {
        let long = vec![b'a'; MAX_IDEMPOTENCY_KEY_LEN + 1];
        for value in [&b"has space"[..], b"tab\tkey", "caf\u{e9}".as_bytes(), &long] {
            assert!(
                matches!(idempotency_key(&with_key(value)), Err(ApiError::InvalidIdempotencyKey)),
                "{value:?}"
            );
        }
        let longest = vec![b'a'; MAX_IDEMPOTENCY_KEY_LEN];
        assert!(idempotency_key(&with_key(&longest)).is_ok());
    }
}
