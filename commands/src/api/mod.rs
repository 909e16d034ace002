//! The command API (API.md "Command API"): HTTP in, one command out.
//!
//! Handlers authenticate and authorise (JWT roles, ownership through the
//! aggregate), build a command with ids and times from the edge of the
//! system, run it through the command bus (bounded retries on conflicts), and
//! answer with the aggregate's new `version` for read-your-writes.

pub mod error;
pub mod payments;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http,
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use events::{CancellationReason, CouponSource, EventMetadata, RequestedItem, VoucherKind};
use platform::{
    http::{
        ApiJson, ApiPath, AuthUser, Authorized, CommonError, Customers, CustomersOrAdmins, JwtKeys, MerchantsOrAdmins,
        NoBody, Role,
    },
    limits::{self, LimitError},
    telemetry::TraceHeaders,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::error::{ApiError, from_command};
use crate::{
    bus::{Commands, RetryPolicy, unit_of_work},
    domain::{
        CancellerRole, Coupon, CouponCommand, Order, OrderCommand, Product, ProductCommand, SharedClock, Voucher,
        VoucherCommand,
    },
};
use event_store::{AggregateCache, EventStore, Loaded, decide, load_cached};

/// How long a claimed regular-voucher coupon stays spendable.
pub const COUPON_VALIDITY: chrono::Duration = chrono::Duration::days(30);

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub store: EventStore,
    pub vouchers: Arc<Commands<Voucher>>,
    pub voucher_cache: Arc<AggregateCache<Voucher>>,
    pub orders: Arc<Commands<Order>>,
    pub products: Arc<Commands<Product>>,
    pub coupons: Arc<Commands<Coupon>>,
    pub clock: SharedClock,
    pub jwt: JwtKeys,
    /// `None` when no webhook secret is configured: the payment routes answer 503.
    pub payments: Option<Arc<crate::payments::PaymentSettings>>,
    /// The in-flight limit per product in front of the reservation saga.
    pub hot_products: Option<crate::hot::ProductSemaphore>,
}

impl Api {
    /// Forgets every cached aggregate: after the store restarted it may have
    /// lost commits the cached states include, and deciding on those would
    /// write on a state the store does not have.
    pub fn forget_cached(&self) {
        self.voucher_cache.clear();
        if let Some(cache) = self.products.cache() {
            cache.clear();
        }
        if let Some(cache) = self.orders.cache() {
            cache.clear();
        }
        if let Some(cache) = self.coupons.cache() {
            cache.clear();
        }
    }
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

impl axum::extract::FromRef<Api> for JwtKeys {
    fn from_ref(api: &Api) -> Self {
        api.jwt.clone()
    }
}

pub fn routes(api: Api) -> Router {
    // the simulated provider's checkout exists only when it is the provider
    let simulated = api.payments.as_ref().is_some_and(|p| p.provider.is_simulated());
    let router = Router::new()
        .route("/vouchers", post(create_voucher))
        .route("/vouchers/{id}/claim", post(claim_voucher))
        .route("/products", post(create_product))
        .route("/products/{id}/restock", post(restock_product))
        .route("/orders", post(submit_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .route("/orders/{id}/pay", post(payments::pay))
        .route("/webhooks/payments", post(payments::webhook))
        .route("/orders/{id}/start-preparing", post(start_preparing))
        .route("/orders/{id}/complete", post(complete_order))
        .route("/openapi.json", get(openapi));
    let router = if simulated {
        router.route("/provider/checkout/{payment_id}", post(payments::simulated_checkout))
    } else {
        router
    };
    router.with_state(api)
}

async fn openapi() -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

pub const OPENAPI: &str = include_str!("openapi.json");

/// Who did it and under which trace: recorded on every event.
fn metadata(user: &AuthUser) -> EventMetadata {
    let trace = TraceHeaders::current();
    let metadata = EventMetadata::for_user(&user.sub, user.role.as_str());
    match trace.traceparent {
        Some(traceparent) => metadata.with_trace(traceparent, trace.tracestate),
        None => metadata,
    }
}

#[derive(Debug, Serialize)]
struct Created {
    #[serde(skip_serializing_if = "Option::is_none")]
    voucher_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    product_id: Option<Uuid>,
    version: u64,
}

#[derive(Debug, Serialize)]
struct Versioned {
    version: u64,
}

/// The merchant a new product or voucher belongs to: a merchant creates for
/// itself; an admin names the merchant (API.md "Tenancy").
fn owner_for(user: &AuthUser, merchant_id: Option<String>) -> Result<String, ApiError> {
    match (user.role, merchant_id) {
        (Role::Merchant, None) => Ok(user.sub.clone()),
        (Role::Merchant, Some(merchant_id)) if merchant_id == user.sub => Ok(merchant_id),
        (Role::Merchant, Some(_)) => Err(CommonError::NotAllowed(
            "a merchant creates products and vouchers for itself only; leave out merchant_id".into(),
        )
        .into()),
        (Role::Admin, Some(merchant_id)) => Ok(merchant_id),
        (Role::Admin, None) => {
            Err(CommonError::InvalidBody("merchant_id: required when an admin creates for a merchant".into()).into())
        }
        (Role::Customer, _) => Err(CommonError::Forbidden(Role::Merchant.as_str().into()).into()),
    }
}

/// The merchant an acting user stands for: `None` for an admin, who acts
/// on every merchant's behalf.
fn acting_merchant(user: &AuthUser) -> Option<String> {
    (user.role == Role::Merchant).then(|| user.sub.clone())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVoucher {
    /// Admins only: whose voucher it is.
    #[serde(default)]
    merchant_id: Option<String>,
    title: String,
    kind: VoucherKind,
    price_cents: i64,
    value_cents: i64,
    #[serde(default)]
    min_spend_cents: i64,
    #[serde(default)]
    stock: Option<u32>,
    begins_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
}

impl CreateVoucher {
    /// API.md "Limits", each failure naming its field.
    fn check(&self) -> Result<(), LimitError> {
        if let Some(merchant_id) = &self.merchant_id {
            limits::text("merchant_id", merchant_id, platform::http::auth::MAX_SUB_CHARS)?;
        }
        limits::text("title", &self.title, limits::MAX_TITLE_CHARS)?;
        limits::cents("price_cents", self.price_cents)?;
        limits::cents("value_cents", self.value_cents)?;
        limits::cents("min_spend_cents", self.min_spend_cents)?;
        if let Some(stock) = self.stock {
            limits::quantity("stock", stock)?;
        }
        Ok(())
    }
}

async fn create_voucher(
    State(api): State<Api>,
    user: Authorized<MerchantsOrAdmins>,
    ApiJson(body): ApiJson<CreateVoucher>,
) -> Result<impl IntoResponse, ApiError> {
    body.check()?;
    let merchant_id = owner_for(&user, body.merchant_id.clone())?;
    let voucher_id = Uuid::now_v7();
    let executed = api
        .vouchers
        .create(
            &voucher_id.to_string(),
            || VoucherCommand::Create {
                voucher_id,
                merchant_id: merchant_id.clone(),
                title: body.title.clone(),
                kind: body.kind,
                price_cents: body.price_cents,
                value_cents: body.value_cents,
                min_spend_cents: body.min_spend_cents,
                stock: body.stock,
                begins_at: body.begins_at,
                ends_at: body.ends_at,
            },
            &metadata(&user),
        )
        .await
        .map_err(|e| from_command(e, ApiError::Voucher))?;
    let body = Created {
        voucher_id: Some(voucher_id),
        product_id: None,
        version: executed.version,
    };
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Debug, Serialize)]
struct Claimed {
    coupon_id: Uuid,
    version: u64,
}

/// A regular voucher claimed once per user issues a coupon: the claim and
/// the coupon are one transaction, so there is never one without the other.
async fn claim_voucher(
    State(api): State<Api>,
    user: Authorized<Customers>,
    ApiPath(voucher_id): ApiPath<Uuid>,
    _: NoBody,
) -> Result<impl IntoResponse, ApiError> {
    let id = voucher_id.to_string();
    let coupon_id = Uuid::now_v7();
    let metadata = metadata(&user);
    let _writer = api.voucher_cache.writer(&id).await;
    let claimed = unit_of_work(&api.store, RetryPolicy::default(), "Voucher", || async {
        let loaded = load_cached(&api.store, Some(&api.voucher_cache), &id).await?;
        let command = VoucherCommand::ClaimRegular {
            user_id: user.sub.clone(),
            coupon_id,
        };
        let claimed = match decide(&id, loaded, command, api.vouchers.services()).await {
            Ok(decided) => decided,
            Err((error, unchanged)) => {
                api.voucher_cache.put(&id, unchanged);
                return Err(ApiError::Voucher(error));
            }
        };
        let issue = CouponCommand::Issue {
            coupon_id,
            user_id: user.sub.clone(),
            merchant_id: claimed.aggregate.merchant_id().map(str::to_owned),
            voucher_id,
            value_cents: claimed.aggregate.value_cents().unwrap_or(0),
            min_spend_cents: claimed.aggregate.min_spend_cents().unwrap_or(0),
            expires_at: api.clock.now() + COUPON_VALIDITY,
            source: CouponSource::RegularClaim,
        };
        let coupon = decide(&coupon_id.to_string(), Loaded::<Coupon>::default(), issue, &())
            .await
            .map_err(|(error, _)| ApiError::Coupon(error))?;
        let appends = vec![claimed.to_append(&metadata)?, coupon.to_append(&metadata)?];
        Ok((appends, claimed))
    })
    .await?;
    let version = claimed.version();
    api.voucher_cache.put(&id, claimed.into_loaded());
    Ok((StatusCode::CREATED, Json(Claimed { coupon_id, version })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    /// Admins only: whose product it is.
    #[serde(default)]
    merchant_id: Option<String>,
    name: String,
    price_cents: i64,
    stock: u32,
}

impl CreateProduct {
    /// API.md "Limits", each failure naming its field.
    fn check(&self) -> Result<(), LimitError> {
        if let Some(merchant_id) = &self.merchant_id {
            limits::text("merchant_id", merchant_id, platform::http::auth::MAX_SUB_CHARS)?;
        }
        limits::text("name", &self.name, limits::MAX_TITLE_CHARS)?;
        limits::cents("price_cents", self.price_cents)?;
        limits::quantity("stock", self.stock)
    }
}

async fn create_product(
    State(api): State<Api>,
    user: Authorized<MerchantsOrAdmins>,
    ApiJson(body): ApiJson<CreateProduct>,
) -> Result<impl IntoResponse, ApiError> {
    body.check()?;
    let merchant_id = owner_for(&user, body.merchant_id.clone())?;
    let product_id = Uuid::now_v7();
    let executed = api
        .products
        .create(
            &product_id.to_string(),
            || ProductCommand::Create {
                product_id,
                merchant_id: merchant_id.clone(),
                name: body.name.clone(),
                price_cents: body.price_cents,
                stock: body.stock,
            },
            &metadata(&user),
        )
        .await
        .map_err(|e| from_command(e, ApiError::Product))?;
    let body = Created {
        voucher_id: None,
        product_id: Some(product_id),
        version: executed.version,
    };
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Restock {
    quantity: u32,
}

async fn restock_product(
    State(api): State<Api>,
    user: Authorized<MerchantsOrAdmins>,
    ApiPath(product_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<Restock>,
) -> Result<Json<Versioned>, ApiError> {
    limits::quantity("quantity", body.quantity)?;
    let executed = api
        .products
        .execute(
            &product_id.to_string(),
            || ProductCommand::Restock {
                quantity: body.quantity,
                merchant: acting_merchant(&user),
            },
            &metadata(&user),
        )
        .await
        .map_err(|e| from_command(e, ApiError::Product))?;
    Ok(Json(Versioned {
        version: executed.version,
    }))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    product_id: Uuid,
    quantity: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitOrder {
    items: Vec<Item>,
    #[serde(default)]
    coupon_id: Option<Uuid>,
}

impl SubmitOrder {
    /// API.md "Limits": a bounded number of lines, each quantity in range, so
    /// that any total of them at any allowed price fits (checked again,
    /// with checked arithmetic, where the order is priced).
    fn check(&self) -> Result<(), LimitError> {
        if self.items.is_empty() || self.items.len() > crate::domain::order::MAX_ITEMS {
            return Err(LimitError {
                field: "items".into(),
                problem: limits::LimitProblem::OutOfRange {
                    min: 1,
                    max: crate::domain::order::MAX_ITEMS as i128,
                },
            });
        }
        for (index, item) in self.items.iter().enumerate() {
            limits::quantity(format!("items[{index}].quantity"), item.quantity)?;
        }
        Ok(())
    }
}

#[derive(Debug, Serialize)]
struct Submitted {
    order_id: Uuid,
    version: u64,
}

/// Records a goods order; reserving its stock and coupon is the lifecycle saga's job.
async fn submit_order(
    State(api): State<Api>,
    user: Authorized<Customers>,
    ApiJson(body): ApiJson<SubmitOrder>,
) -> Result<impl IntoResponse, ApiError> {
    body.check()?;
    // one unit of the gate per distinct product, given back the same way
    let mut products: Vec<Uuid> = body.items.iter().map(|item| item.product_id).collect();
    products.sort_unstable();
    products.dedup();
    if let Some(gate) = &api.hot_products {
        gate.acquire(&products)
            .await
            .map_err(|busy| ApiError::ProductBusy(busy.0))?;
    }
    let merchant_id = match merchant_of(&api, &products).await {
        Ok(merchant_id) => merchant_id,
        Err(error) => {
            if let Some(gate) = &api.hot_products {
                gate.release(&products).await;
            }
            return Err(error);
        }
    };
    let order_id = Uuid::now_v7();
    let submitted_at = api.clock.now();
    let executed = api
        .orders
        .create(
            &order_id.to_string(),
            || OrderCommand::SubmitGoodsOrder {
                order_id,
                user_id: user.sub.clone(),
                merchant_id: merchant_id.clone(),
                items: body
                    .items
                    .iter()
                    .map(|item| RequestedItem {
                        product_id: item.product_id,
                        quantity: item.quantity,
                    })
                    .collect(),
                coupon_id: body.coupon_id,
                submitted_at,
            },
            &metadata(&user),
        )
        .await;
    let executed = match executed {
        Ok(executed) => executed,
        Err(error) => {
            // no saga will run for an order that was not recorded
            if let Some(gate) = &api.hot_products {
                gate.release(&products).await;
            }
            return Err(from_command(error, ApiError::Order));
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            order_id,
            version: executed.version,
        }),
    ))
}

/// The one merchant whose products an order asks for (422 `mixed_merchants`
/// for several). Products not known yet are left to the saga, which rejects
/// the order for them. A product's owner never changes once it is created,
/// so a cached product answers without a round trip to the store.
async fn merchant_of(api: &Api, products: &[Uuid]) -> Result<Option<String>, ApiError> {
    let mut merchant: Option<String> = None;
    for product_id in products {
        let key = product_id.to_string();
        let cached = api
            .products
            .cache()
            .and_then(|cache| cache.inspect(&key, |p| p.aggregate.merchant_id().map(str::to_owned)))
            .flatten();
        let owner = match cached {
            Some(owner) => Some(owner),
            None => api
                .products
                .read(&key)
                .await?
                .aggregate
                .merchant_id()
                .map(str::to_owned),
        };
        match (owner, &merchant) {
            (None, _) => {}
            (Some(owner), None) => merchant = Some(owner),
            (Some(owner), Some(first)) if &owner == first => {}
            (Some(_), Some(_)) => return Err(ApiError::MixedMerchants),
        }
    }
    Ok(merchant)
}

async fn cancel_order(
    State(api): State<Api>,
    user: Authorized<CustomersOrAdmins>,
    ApiPath(order_id): ApiPath<Uuid>,
    _: NoBody,
) -> Result<Json<Versioned>, ApiError> {
    let (by_role, reason) = match user.role {
        Role::Admin => (CancellerRole::Admin, CancellationReason::AdminRequested),
        _ => (CancellerRole::Customer, CancellationReason::CustomerRequested),
    };
    let at = api.clock.now();
    order_command(&api, &user, order_id, || OrderCommand::Cancel {
        by: user.sub.clone(),
        by_role,
        reason,
        at,
    })
    .await
}

async fn start_preparing(
    State(api): State<Api>,
    user: Authorized<MerchantsOrAdmins>,
    ApiPath(order_id): ApiPath<Uuid>,
    _: NoBody,
) -> Result<Json<Versioned>, ApiError> {
    let at = api.clock.now();
    let merchant = acting_merchant(&user);
    order_command(&api, &user, order_id, || OrderCommand::StartPreparing {
        merchant: merchant.clone(),
        at,
    })
    .await
}

async fn complete_order(
    State(api): State<Api>,
    user: Authorized<MerchantsOrAdmins>,
    ApiPath(order_id): ApiPath<Uuid>,
    _: NoBody,
) -> Result<Json<Versioned>, ApiError> {
    let at = api.clock.now();
    let merchant = acting_merchant(&user);
    order_command(&api, &user, order_id, || OrderCommand::Complete {
        merchant: merchant.clone(),
        at,
    })
    .await
}

async fn order_command(
    api: &Api,
    user: &AuthUser,
    order_id: Uuid,
    make: impl Fn() -> OrderCommand,
) -> Result<Json<Versioned>, ApiError> {
    let executed = api
        .orders
        .execute(&order_id.to_string(), make, &metadata(user))
        .await
        .map_err(|e| from_command(e, ApiError::Order))?;
    Ok(Json(Versioned {
        version: executed.version,
    }))
}
