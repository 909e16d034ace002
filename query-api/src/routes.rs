//! The read endpoints of API.md "Query API": documents straight from the
//! view tables, authorized per caller, with read-your-writes waits.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use chrono::{DateTime, Utc};
use platform::http::{AnyRole, ApiPath, ApiQuery, Authorized, CommonError, Customers, MerchantsOrAdmins, NoBody, Role};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row as _;
use uuid::Uuid;

use crate::{
    AppState,
    cache::CachedDoc,
    error::ApiError,
    filter::{ListParams, OrderQuery},
    lookup::{LookupError, Scope},
    watch::Table,
};

pub const DEFAULT_WAIT_MS: u64 = 2_000;
pub const MAX_WAIT_MS: u64 = 10_000;
const ORDER_STATUSES: [&str; 7] = [
    "submitted",
    "pending_payment",
    "paid",
    "preparing",
    "completed",
    "cancelled",
    "rejected",
];
const COUPON_STATUSES: [&str; 4] = ["available", "reserved", "redeemed", "expired"];

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/orders", get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/users/me/coupons", get(my_coupons))
        .route("/kitchen/tickets", get(kitchen_tickets))
        .route("/vouchers/{id}", get(get_voucher))
        .route("/products/{id}", get(get_product))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

/// `?min_version=N&wait_ms=M`: read-your-writes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Freshness {
    min_version: Option<u64>,
    wait_ms: Option<u64>,
}

impl Freshness {
    fn wait(&self) -> Result<Duration, ApiError> {
        let wait_ms = self.wait_ms.unwrap_or(DEFAULT_WAIT_MS);
        if wait_ms > MAX_WAIT_MS {
            return Err(ApiError::InvalidParameter(format!(
                "wait_ms must be at most {MAX_WAIT_MS}"
            )));
        }
        Ok(Duration::from_millis(wait_ms))
    }
}

/// A stored document (its JSON text exactly as stored, answered without
/// decoding it; only the voucher route, which adds a time-dependent field,
/// parses it) with the owner columns a cached copy is checked against.
type Stored = Arc<CachedDoc>;

/// The views read by id.
#[derive(Debug, Clone, Copy)]
enum View {
    Orders,
    Vouchers,
    Products,
}

impl View {
    fn table(self) -> Table {
        match self {
            Self::Orders => Table::Orders,
            Self::Vouchers => Table::Vouchers,
            Self::Products => Table::Products,
        }
    }

    /// What the 404's code and message call it.
    fn noun(self) -> &'static str {
        match self {
            Self::Orders => "order",
            Self::Vouchers => "voucher",
            Self::Products => "product",
        }
    }
}

/// The document from Postgres, within the caller's scope (in SQL).
async fn fetch(state: &AppState, view: View, id: Uuid, scope: &Scope) -> Result<Option<Stored>, LookupError> {
    state.lookups.get(view.table(), &id.to_string(), scope).await
}

/// The document through the cache when there is one (loaded with the
/// caller's scope in SQL on a miss, checked against it in memory on a hit).
async fn read(state: &AppState, view: View, id: Uuid, scope: &Scope) -> Result<Option<Stored>, LookupError> {
    let Some(cache) = &state.cache else {
        return fetch(state, view, id, scope).await;
    };
    let cached = cache
        .get_or_load(view.table(), id, || fetch(state, view, id, scope))
        .await?;
    Ok(cached.filter(|doc| scope.allows(doc)))
}

/// Reads a document the caller may see, waiting up to the asked time for
/// `min_version`: 200 with it, or 202 with the current one when the version
/// was not reached in time. An unknown id and another's document are the
/// same 404, at once (API.md "Read-your-writes").
///
/// A cached copy below `min_version` is not the answer: Postgres is asked,
/// then the process's shared [`crate::watch::VersionWatch`] waits (one
/// lookup per tick for every waiting request, which hands over the document
/// once it is there). What is found goes into the cache, so no later read
/// of this process answers an older version.
async fn read_fresh(
    state: &AppState,
    view: View,
    id: Uuid,
    scope: &Scope,
    freshness: &Freshness,
) -> Result<(Stored, bool), ApiError> {
    let wait = freshness.wait()?;
    let mut stored = read(state, view, id, scope)
        .await?
        .ok_or(ApiError::NotFound(view.noun()))?;
    let Some(min_version) = freshness.min_version else {
        return Ok((stored, true));
    };
    if stored.version < min_version && state.cache.is_some() {
        // the cache may be behind the view
        stored = fetch(state, view, id, scope)
            .await?
            .ok_or(ApiError::NotFound(view.noun()))?;
        remember(state, view, id, &stored).await;
    }
    if stored.version >= min_version || wait.is_zero() {
        let fresh = stored.version >= min_version;
        return Ok((stored, fresh));
    }
    if let Some((version, doc)) = state.watch.wait(view.table(), &id.to_string(), min_version, wait).await {
        // the same document, later: its owners are the ones already checked
        let stored = Arc::new(CachedDoc::new(
            version,
            Bytes::from(doc),
            stored.user_id.clone(),
            stored.merchant_id.clone(),
        ));
        remember(state, view, id, &stored).await;
        return Ok((stored, true));
    }
    // out of time: the document as it is now, still in scope
    let stored = fetch(state, view, id, scope)
        .await?
        .ok_or(ApiError::NotFound(view.noun()))?;
    remember(state, view, id, &stored).await;
    let fresh = stored.version >= min_version;
    Ok((stored, fresh))
}

async fn remember(state: &AppState, view: View, id: Uuid, stored: &Stored) {
    if let Some(cache) = &state.cache {
        cache.put_if_newer(view.table(), id, Arc::clone(stored)).await;
    }
}

/// 200 with the document, or 202 with the current one (same schema) when
/// `min_version` was not reached in time.
fn answer((stored, fresh): (Stored, bool)) -> Response {
    respond(stored.doc.clone(), fresh)
}

fn respond(body: Bytes, fresh: bool) -> Response {
    let status = if fresh { StatusCode::OK } else { StatusCode::ACCEPTED };
    (status, [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn get_order(
    State(state): State<AppState>,
    user: Authorized<AnyRole>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(freshness): ApiQuery<Freshness>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let read = read_fresh(&state, View::Orders, id, &Scope::orders(&user), &freshness).await?;
    Ok(answer(read))
}

async fn get_voucher(
    State(state): State<AppState>,
    _user: Authorized<AnyRole>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(freshness): ApiQuery<Freshness>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let (stored, fresh) = read_fresh(&state, View::Vouchers, id, &Scope::everyone(), &freshness).await?;
    // decoded once per cached copy
    let clock = stored
        .sale
        .get_or_init(|| serde_json::from_slice::<SaleClock>(&stored.doc).ok())
        .as_ref()
        .ok_or_else(|| {
            ApiError::StoredDocument(serde::de::Error::custom("a voucher document without its sale's clock"))
        })?;
    let now = Utc::now();
    let page = &stored.pages[sale_status_index(voucher_status(clock, now))];
    let body = match page.get() {
        Some(body) => body.clone(),
        None => {
            let body = with_status(&stored.doc, clock, now)?;
            let _ = page.set(body.clone());
            body
        }
    };
    Ok(respond(body, fresh))
}

/// How many values [`voucher_status`] has.
pub const SALE_STATUSES: usize = 4;

fn sale_status_index(status: &str) -> usize {
    match status {
        "upcoming" => 0,
        "ended" => 1,
        "sold_out" => 2,
        _ => 3,
    }
}

/// What a voucher's status is computed from (the rest of the document is
/// not decoded).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SaleClock {
    begins_at: Option<DateTime<Utc>>,
    ends_at: Option<DateTime<Utc>>,
    sold_out: Option<bool>,
    /// A stored `status` (there is none: see [`voucher_status`]) would be
    /// overwritten, never answered twice.
    status: Option<Value>,
}

/// The stored voucher document with its `status` now: spliced in front of
/// the stored JSON text, which is otherwise answered as stored (a hot
/// sale's page is read tens of thousands of times a second).
fn with_status(doc: &Bytes, clock: &SaleClock, now: DateTime<Utc>) -> Result<Bytes, ApiError> {
    let status = voucher_status(clock, now);
    match doc.strip_prefix(b"{") {
        Some(rest) if clock.status.is_none() => {
            let separator: &[u8] = if rest.trim_ascii_start().starts_with(b"}") {
                b""
            } else {
                b","
            };
            let mut body = Vec::with_capacity(doc.len() + 32);
            body.extend_from_slice(b"{\"status\":\"");
            body.extend_from_slice(status.as_bytes());
            body.extend_from_slice(b"\"");
            body.extend_from_slice(separator);
            body.extend_from_slice(rest);
            Ok(Bytes::from(body))
        }
        _ => {
            let mut value: Value = serde_json::from_slice(doc).map_err(ApiError::StoredDocument)?;
            value["status"] = json!(status);
            Ok(Bytes::from(value.to_string()))
        }
    }
}

/// The sale's state now: a view stores no clock-dependent field (it must
/// equal a replay at any moment), so time is applied at read time.
fn voucher_status(clock: &SaleClock, now: DateTime<Utc>) -> &'static str {
    if clock.begins_at.is_some_and(|begins| now < begins) {
        "upcoming"
    } else if clock.ends_at.is_some_and(|ends| now >= ends) {
        "ended"
    } else if clock.sold_out == Some(true) {
        "sold_out"
    } else {
        "on_sale"
    }
}

async fn get_product(
    State(state): State<AppState>,
    _user: Authorized<AnyRole>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(freshness): ApiQuery<Freshness>,
    _: NoBody,
) -> Result<Response, ApiError> {
    let read = read_fresh(&state, View::Products, id, &Scope::everyone(), &freshness).await?;
    Ok(answer(read))
}

#[derive(Debug, Deserialize)]
struct OrdersQuery {
    status: Option<String>,
    user_id: Option<String>,
    #[serde(flatten)]
    list: ListParams,
}

async fn list_orders(
    State(state): State<AppState>,
    user: Authorized<AnyRole>,
    ApiQuery(query): ApiQuery<OrdersQuery>,
    _: NoBody,
) -> Result<Json<Value>, ApiError> {
    let listing = OrderQuery::parse(&query.list)?;
    // the caller's scope: fixed SQL, values bound first
    let mut scope: Vec<String> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    // bound into SQL below: one that no user id can be (a NUL, which
    // Postgres text cannot hold, included) is the client's mistake
    if let Some(user_id) = &query.user_id
        && platform::http::validate_sub(user_id).is_err()
    {
        return Err(ApiError::InvalidParameter(
            "user_id must be a user id: 1 to 128 printable characters".into(),
        ));
    }
    if user.role == Role::Customer
        && let Some(other) = &query.user_id
        && *other != user.sub
    {
        return Err(CommonError::NotAllowed("a customer sees only its own orders; leave out user_id".into()).into());
    }
    // the caller's tenancy first, then the narrowing it asked for
    let tenancy = Scope::orders(&user);
    for (column, value) in [
        ("user_id", tenancy.user_id.or(query.user_id)),
        ("merchant_id", tenancy.merchant_id),
    ] {
        if let Some(value) = value {
            values.push(value);
            scope.push(format!("{column} = ${}", values.len()));
        }
    }
    if let Some(status) = query.status {
        if !ORDER_STATUSES.contains(&status.as_str()) {
            return Err(ApiError::InvalidParameter(format!(
                "status must be one of {}",
                ORDER_STATUSES.join(", ")
            )));
        }
        values.push(status);
        scope.push(format!("status = ${}", values.len()));
    }
    let sql = listing.to_sql(values.len());
    let scope = (!scope.is_empty()).then(|| scope.join(" AND "));
    let statement = sql.statement(scope.as_deref());
    let mut select = sqlx::query(&statement);
    for value in values {
        select = select.bind(value);
    }
    let rows = sql.bind(select).fetch_all(&state.pool).await?;
    let page = listing.page(rows)?;
    let items = page
        .rows
        .iter()
        .map(|row| row.try_get::<Value, _>("doc"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "items": items, "next_cursor": page.next_cursor })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CouponsQuery {
    status: Option<String>,
}

/// The most coupons one answer lists; nobody holds more in practice.
const MAX_COUPONS: i64 = 1_000;

async fn my_coupons(
    State(state): State<AppState>,
    user: Authorized<Customers>,
    ApiQuery(query): ApiQuery<CouponsQuery>,
    _: NoBody,
) -> Result<Json<Value>, ApiError> {
    if let Some(status) = &query.status
        && !COUPON_STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::InvalidParameter(format!(
            "status must be one of {}",
            COUPON_STATUSES.join(", ")
        )));
    }
    let items: Vec<Value> = sqlx::query_scalar(
        "SELECT doc FROM coupon_view WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
          ORDER BY created_at DESC, id DESC LIMIT $3",
    )
    .bind(&user.sub)
    .bind(query.status)
    .bind(MAX_COUPONS)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketsQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// The kitchen's queue: the merchant's paid orders waiting to be prepared,
/// oldest payment first, as tickets (what to cook, for whom, since when),
/// a page at a time (`limit`, `cursor`). A view over `order_view`: an order
/// leaves the queue when preparation starts. An admin sees every merchant's.
async fn kitchen_tickets(
    State(state): State<AppState>,
    user: Authorized<MerchantsOrAdmins>,
    ApiQuery(query): ApiQuery<TicketsQuery>,
    _: NoBody,
) -> Result<Json<Value>, ApiError> {
    // the order listing's keyset pagination, sorted by when the order
    // became paid (its last change while it waits)
    let listing = OrderQuery::parse(&ListParams {
        filter: None,
        sort: Some("updated_at".into()),
        limit: query.limit,
        cursor: query.cursor,
    })?;
    let mut values = Vec::new();
    let mut scope = vec!["status = 'paid'".to_owned()];
    if let Some(merchant_id) = Scope::orders(&user).merchant_id {
        values.push(merchant_id);
        scope.push(format!("merchant_id = ${}", values.len()));
    }
    let sql = listing.to_sql(values.len());
    let statement = sql.statement(Some(&scope.join(" AND ")));
    let mut select = sqlx::query(&statement);
    for value in values {
        select = select.bind(value);
    }
    let rows = sql.bind(select).fetch_all(&state.pool).await?;
    let page = listing.page(rows)?;
    let tickets = page
        .rows
        .iter()
        .map(|row| row.try_get::<Value, _>("doc").map(|order| ticket(&order)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "items": tickets, "next_cursor": page.next_cursor })))
}

fn ticket(order: &Value) -> Value {
    let paid_at = order["history"]
        .as_array()
        .and_then(|history| history.iter().rev().find(|entry| entry["status"] == "paid"))
        .map(|entry| entry["at"].clone())
        .unwrap_or(Value::Null);
    let lines: Vec<Value> = order["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| json!({ "name": item["name"], "quantity": item["quantity"] }))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "order_id": order["order_id"],
        "user_id": order["user_id"],
        "merchant_id": order["merchant_id"],
        "kind": order["kind"],
        "items": lines,
        "paid_at": paid_at,
        "version": order["version"],
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    #[test]
    fn a_ticket_says_what_to_cook_and_since_when() {
        let order = json!({
            "order_id": "o-1", "user_id": "ann", "merchant_id": "shop-1", "kind": "goods", "version": 4,
            "items": [{"name": "Dumplings", "quantity": 2, "unit_price_cents": 3000, "product_id": "p"}],
            "history": [{"status": "pending_payment", "at": "2030-01-01T10:00:00Z"},
                        {"status": "paid", "at": "2030-01-01T10:05:00Z"}],
        });
        assert_eq!(
            ticket(&order),
            json!({"order_id": "o-1", "user_id": "ann", "merchant_id": "shop-1", "kind": "goods", "version": 4,
                   "items": [{"name": "Dumplings", "quantity": 2}], "paid_at": "2030-01-01T10:05:00Z"})
        );
    }

    #[test]
    fn a_vouchers_status_follows_the_clock_and_its_stock() {
        let clock = |sold_out: bool| -> SaleClock {
            serde_json::from_value(
                json!({"begins_at": "2030-01-01T10:00:00Z", "ends_at": "2030-01-01T12:00:00Z", "sold_out": sold_out}),
            )
            .expect("clock")
        };
        let at = |h: u32| Utc.with_ymd_and_hms(2030, 1, 1, h, 0, 0).unwrap();
        assert_eq!(voucher_status(&clock(false), at(9)), "upcoming");
        assert_eq!(voucher_status(&clock(false), at(11)), "on_sale");
        assert_eq!(voucher_status(&clock(false), at(12)), "ended");
        assert_eq!(voucher_status(&clock(true), at(11)), "sold_out");
        assert_eq!(voucher_status(&clock(true), at(13)), "ended");
    }

    #[test]
    fn the_status_is_spliced_into_the_stored_text_and_the_result_is_the_same_document() {
        let at = Utc.with_ymd_and_hms(2030, 1, 1, 11, 0, 0).unwrap();
        for stored in [
            json!({"voucher_id": "v", "begins_at": "2030-01-01T10:00:00Z", "ends_at": null, "sold_out": false}),
            json!({}),
            // a stored status is replaced, never answered twice
            json!({"status": "stale", "sold_out": true}),
        ] {
            let text = Bytes::from(stored.to_string());
            let clock: SaleClock = serde_json::from_value(stored.clone()).expect("clock");
            let answered: Value =
                serde_json::from_slice(&with_status(&text, &clock, at).expect("status")).expect("json");
            let mut expected = stored.clone();
            expected["status"] = json!(voucher_status(&clock, at));
            assert_eq!(answered, expected);
        }
        // the answer carries one status key
        let text = Bytes::from(r#"{"status": "stale", "sold_out": true}"#);
        let clock: SaleClock = serde_json::from_slice(&text).expect("clock");
        let body = String::from_utf8(with_status(&text, &clock, at).expect("status").to_vec()).expect("utf-8");
        assert_eq!(body.matches("status").count(), 1, "{body}");
    }
}
