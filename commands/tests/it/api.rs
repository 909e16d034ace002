//! The command API in-process against a real Postgres: auth, validation,
//! conflicts and versions.

use std::time::Duration;

use axum::{Router, body::Body};
use commands::AppState;
use http::{Request, StatusCode, header};
use platform::http::{Health, JwtKeys, Ops, Role};
use serde_json::{Value, json};
use tower::ServiceExt as _;

struct Api {
    router: Router,
    keys: JwtKeys,
    _db: testkit::TestDb,
}

async fn api() -> anyhow::Result<Api> {
    let db = testkit::TestDb::new().await?;
    let keys = JwtKeys::new(&platform::Secret::new("api-test-secret"));
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let router = commands::router(AppState::new(db.pool.clone(), keys.clone(), ops));
    Ok(Api { router, keys, _db: db })
}

impl Api {
    fn token(&self, sub: &str, role: Role) -> String {
        self.keys.issue(sub, role, Duration::from_secs(300)).unwrap_or_default()
    }

    async fn post(&self, path: &str, as_user: Option<(&str, Role)>, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::post(path);
        if let Some((sub, role)) = as_user {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", self.token(sub, role)));
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap_or_default())
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

const MERCHANT: Option<(&str, Role)> = Some(("m-1", Role::Merchant));
const ALICE: Option<(&str, Role)> = Some(("alice", Role::Customer));
const BOB: Option<(&str, Role)> = Some(("bob", Role::Customer));
const ADMIN: Option<(&str, Role)> = Some(("root", Role::Admin));

fn regular_voucher() -> Value {
    json!({
        "title": "10 off", "kind": "regular", "price_cents": 0, "value_cents": 1000, "min_spend_cents": 3000,
        "begins_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z"
    })
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn creating_needs_a_token_and_the_right_role() -> anyhow::Result<()> {
    let api = api().await?;
    let (status, body) = api.post("/vouchers", None, Some(regular_voucher())).await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "missing_token"));
    let (status, body) = api.post("/vouchers", ALICE, Some(regular_voucher())).await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, body) = api.post("/vouchers", MERCHANT, Some(regular_voucher())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], 1);
    assert!(
        body["voucher_id"]
            .as_str()
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
    );
    let (status, _) = api
        .post(
            "/products",
            ADMIN,
            Some(json!({"merchant_id": "m-1", "name": "Tea", "price_cents": 300, "stock": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    Ok(())
}

/// The role is checked before the body is read: a customer gets 403 on a
/// merchant endpoint whatever it sends (API.md "Auth").
#[tokio::test]
async fn the_role_is_checked_before_the_body_is_read() -> anyhow::Result<()> {
    let api = api().await?;
    for path in ["/vouchers", "/products"] {
        for body in [None, Some(json!({"nonsense": true})), Some(json!([1, 2, 3]))] {
            let (status, answer) = api.post(path, ALICE, body).await;
            assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "forbidden"), "{path}");
        }
    }
    let (status, answer) = api.post("/orders", MERCHANT, Some(json!({"x": 1}))).await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "forbidden"));
    Ok(())
}

/// Endpoints that take no body refuse one (413); bodies over 64 KiB are
/// refused everywhere, the signed webhook included; every such answer, and
/// every message about a bad body, is in the contract's format and in words.
#[tokio::test]
async fn bodies_are_bounded_and_every_refusal_speaks_the_contract() -> anyhow::Result<()> {
    let api = api().await?;
    let big = json!({ "padding": "x".repeat(70 * 1024) });
    let order = uuid::Uuid::now_v7();
    for (path, who) in [
        (format!("/orders/{order}/cancel"), ALICE),
        (format!("/orders/{order}/pay"), ALICE),
        (format!("/vouchers/{order}/claim"), ALICE),
        (format!("/orders/{order}/start-preparing"), MERCHANT),
        (format!("/orders/{order}/complete"), MERCHANT),
    ] {
        for body in [json!({}), big.clone()] {
            let (status, answer) = api.post(&path, who, Some(body)).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {answer}");
            assert!(answer["error"]["code"].is_string(), "{path}: {answer}");
        }
    }
    for (path, who) in [("/products", MERCHANT), ("/vouchers", MERCHANT), ("/orders", ALICE)] {
        let (status, answer) = api.post(path, who, Some(big.clone())).await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            "{path}"
        );
    }
    let (status, answer) = api.post("/webhooks/payments", None, Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"]["code"].is_string(), "{answer}");
    // messages name the field in words, never a Rust type
    for (body, field) in [
        (json!({"name": "Tea", "price_cents": "3", "stock": 1}), "price_cents"),
        (json!({"name": "Tea", "price_cents": 3, "stock": -1}), "stock"),
        (json!({"name": "Tea", "price_cents": 3}), "stock"),
        (
            json!({"name": "Tea", "price_cents": 3, "stock": 1, "colour": "red"}),
            "colour",
        ),
        (json!([1]), ""),
    ] {
        let (status, answer) = api.post("/products", MERCHANT, Some(body.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body} → {message}");
        for rust in ["struct", "CreateProduct", "u32", "i64", "Uuid", "DateTime"] {
            assert!(!message.contains(rust), "{body} → {message}");
        }
    }
    Ok(())
}

/// API.md "Tenancy": a merchant creates for itself, an admin for a named
/// merchant; a merchant acts only on what it owns, anything else is a 404.
#[tokio::test]
async fn merchants_act_only_on_what_they_own() -> anyhow::Result<()> {
    let api = api().await?;
    let other = Some(("m-2", Role::Merchant));
    // creating: for oneself, or (admins) for a named merchant
    let (status, body) = api
        .post(
            "/products",
            ADMIN,
            Some(json!({"name": "Tea", "price_cents": 300, "stock": 5})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("merchant_id"))
    );
    let (status, _) = api
        .post(
            "/products",
            MERCHANT,
            Some(json!({"merchant_id": "m-2", "name": "Tea", "price_cents": 300, "stock": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut voucher = regular_voucher();
    voucher["merchant_id"] = json!("m-2");
    let (status, _) = api.post("/vouchers", ADMIN, Some(voucher)).await;
    assert_eq!(status, StatusCode::CREATED);

    let (_, product) = api
        .post(
            "/products",
            MERCHANT,
            Some(json!({"name": "Tea", "price_cents": 300, "stock": 5})),
        )
        .await;
    let product_id = product["product_id"].as_str().unwrap_or_default().to_owned();
    let order = json!({"items": [{"product_id": product_id, "quantity": 1}], "coupon_id": null});
    let (status, submitted) = api.post("/orders", ALICE, Some(order)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{submitted}");
    let order_id = submitted["order_id"].as_str().unwrap_or_default().to_owned();

    // every merchant-facing command: another merchant's resource is missing
    let routes = [
        (
            format!("/products/{product_id}/restock"),
            Some(json!({"quantity": 1})),
            StatusCode::OK,
        ),
        (
            format!("/orders/{order_id}/start-preparing"),
            None,
            StatusCode::CONFLICT,
        ),
        (format!("/orders/{order_id}/complete"), None, StatusCode::CONFLICT),
    ];
    for (path, body, owner_status) in routes {
        let (status, answer) = api.post(&path, other, body.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {answer}");
        assert!(code(&answer).ends_with("_not_found"), "{path}: {answer}");
        // the owner and an admin get the real answer
        assert_eq!(api.post(&path, MERCHANT, body.clone()).await.0, owner_status, "{path}");
        assert_eq!(api.post(&path, ADMIN, body).await.0, owner_status, "{path}");
    }
    // another customer's order is missing too, not forbidden
    let (status, answer) = api.post(&format!("/orders/{order_id}/cancel"), BOB, None).await;
    assert_eq!((status, code(&answer)), (StatusCode::NOT_FOUND, "order_not_found"));
    let restocks: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'ProductRestocked'")
        .fetch_one(&api._db.pool)
        .await?;
    assert_eq!(restocks, 2, "only the owner's and the admin's restocks");
    Ok(())
}

#[tokio::test]
async fn a_goods_order_names_its_merchant_and_mixing_merchants_is_refused() -> anyhow::Result<()> {
    let api = api().await?;
    let product = |merchant: &'static str| {
        let api = &api;
        async move {
            let (_, body) = api
                .post(
                    "/products",
                    Some((merchant, Role::Merchant)),
                    Some(json!({"name": "Tea", "price_cents": 300, "stock": 5})),
                )
                .await;
            body["product_id"].clone()
        }
    };
    let (a1, a2, b) = (product("m-1").await, product("m-1").await, product("m-2").await);
    let items = |ids: &[&Value]| json!({"items": ids.iter().map(|id| json!({"product_id": id, "quantity": 1})).collect::<Vec<_>>()});
    let (status, body) = api.post("/orders", ALICE, Some(items(&[&a1, &b]))).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "mixed_merchants")
    );
    let (status, body) = api.post("/orders", ALICE, Some(items(&[&a1, &a2]))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let merchant: Option<String> = sqlx::query_scalar(
        "SELECT payload->'OrderSubmitted'->>'merchant_id' FROM events WHERE aggregate_type = 'Order'",
    )
    .fetch_one(&api._db.pool)
    .await?;
    assert_eq!(merchant.as_deref(), Some("m-1"));
    Ok(())
}

/// API.md "Limits": out-of-range money, quantities and text are 422s that
/// name the field, never a 5xx, and record nothing.
#[tokio::test]
async fn amounts_quantities_and_text_outside_the_limits_are_refused() -> anyhow::Result<()> {
    let api = api().await?;
    let product = |name: &str, price: i64, stock: i64| json!({"name": name, "price_cents": price, "stock": stock});
    for (body, field) in [
        (product("Tea", 100_000_000_001, 1), "price_cents"),
        (product("Tea", i64::MAX - 5, 1), "price_cents"),
        (product("Tea", -1, 1), "price_cents"),
        (product("Tea", 300, 0), "stock"),
        (product("Tea", 300, 1_000_001), "stock"),
        (product("T\0ea", 300, 1), "name"),
        (product("Tea\n", 300, 1), "name"),
        (product(&"x".repeat(201), 300, 1), "name"),
        (product("   ", 300, 1), "name"),
    ] {
        let (status, answer) = api.post("/products", MERCHANT, Some(body.clone())).await;
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{body} → {status} {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body} → {message}");
    }
    let mut voucher = regular_voucher();
    voucher["title"] = json!("Hot\0pot");
    let (status, _) = api.post("/vouchers", MERCHANT, Some(voucher)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut voucher = regular_voucher();
    voucher["value_cents"] = json!(100_000_000_001_i64);
    let (status, _) = api.post("/vouchers", MERCHANT, Some(voucher)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    for order in [
        json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1_000_001}]}),
        json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 0}]}),
        json!({"items": (0..51).map(|_| json!({"product_id": uuid::Uuid::now_v7(), "quantity": 1})).collect::<Vec<_>>()}),
    ] {
        let (status, answer) = api.post("/orders", ALICE, Some(order)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&api._db.pool)
        .await?;
    assert_eq!(events, 0, "a refused command recorded something");
    Ok(())
}

#[tokio::test]
async fn invalid_input_is_refused_and_records_nothing() -> anyhow::Result<()> {
    let api = api().await?;
    let mut seckill_without_stock = regular_voucher();
    seckill_without_stock["kind"] = json!("seckill");
    let mut backwards = regular_voucher();
    backwards["ends_at"] = json!("2019-01-01T00:00:00Z");
    let mut unknown_field = regular_voucher();
    unknown_field["discount"] = json!(5);
    let mut negative_stock = regular_voucher();
    negative_stock["stock"] = json!(-1);
    let cases = [
        (seckill_without_stock, StatusCode::UNPROCESSABLE_ENTITY),
        (backwards, StatusCode::UNPROCESSABLE_ENTITY),
        (unknown_field, StatusCode::UNPROCESSABLE_ENTITY),
        (negative_stock, StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"title": "x"}), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (body, expected) in cases {
        let (status, answer) = api.post("/vouchers", MERCHANT, Some(body.clone())).await;
        assert_eq!(status, expected, "{body} → {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body) = api
        .post(
            "/products",
            MERCHANT,
            Some(json!({"name": "", "price_cents": 1, "stock": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = api.post("/orders", ALICE, Some(json!({"items": []}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = api.post("/orders/not-a-uuid/cancel", ALICE, None).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_path"));

    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&api._db.pool)
        .await?;
    assert_eq!(events, 0, "a refused command recorded something");
    Ok(())
}

#[tokio::test]
async fn a_regular_voucher_is_claimed_once_per_user_and_issues_a_coupon() -> anyhow::Result<()> {
    let api = api().await?;
    let (_, created) = api.post("/vouchers", MERCHANT, Some(regular_voucher())).await;
    let path = format!("/vouchers/{}/claim", created["voucher_id"].as_str().unwrap_or_default());
    let (status, first) = api.post(&path, ALICE, None).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["version"], 2);
    let (status, again) = api.post(&path, ALICE, None).await;
    assert_eq!((status, code(&again)), (StatusCode::CONFLICT, "already_claimed"));
    let (status, _) = api.post(&path, BOB, None).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api.post(&path, MERCHANT, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = api
        .post(&format!("/vouchers/{}/claim", uuid::Uuid::now_v7()), ALICE, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let coupon_id = first["coupon_id"].as_str().unwrap_or_default();
    let issued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Coupon' AND aggregate_id = $1 AND event_type = 'CouponIssued'",
    )
    .bind(coupon_id)
    .fetch_one(&api._db.pool)
    .await?;
    assert_eq!(issued, 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_claims_on_one_voucher_are_retried_not_lost() -> anyhow::Result<()> {
    let api = api().await?;
    let (_, created) = api.post("/vouchers", MERCHANT, Some(regular_voucher())).await;
    let path = format!("/vouchers/{}/claim", created["voucher_id"].as_str().unwrap_or_default());
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let results = futures::future::join_all(users.iter().map(|user| {
        let api = &api;
        let path = path.clone();
        async move { api.post(&path, Some((user.as_str(), Role::Customer)), None).await.0 }
    }))
    .await;
    let created = results.iter().filter(|s| **s == StatusCode::CREATED).count();
    let contended = results.iter().filter(|s| **s == StatusCode::CONFLICT).count();
    assert_eq!(created + contended, 40, "{results:?}");
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'VoucherClaimed'")
        .fetch_one(&api._db.pool)
        .await?;
    assert_eq!(claims, i64::try_from(created)?, "answers and the store disagree");
    assert_eq!(
        created, 40,
        "writers of one voucher in one process queue instead of colliding"
    );
    Ok(())
}

#[tokio::test]
async fn order_transitions_follow_the_lifecycle_and_illegal_ones_are_409() -> anyhow::Result<()> {
    let api = api().await?;
    let (_, product) = api
        .post(
            "/products",
            MERCHANT,
            Some(json!({"name": "Tea", "price_cents": 300, "stock": 5})),
        )
        .await;
    let product_id = product["product_id"].clone();
    let order = json!({"items": [{"product_id": product_id, "quantity": 2}], "coupon_id": null});
    let (status, submitted) = api.post("/orders", ALICE, Some(order)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{submitted}");
    let order_id = submitted["order_id"].as_str().unwrap_or_default().to_owned();

    let (status, body) = api
        .post(&format!("/orders/{order_id}/start-preparing"), MERCHANT, None)
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an unpaid order cannot be prepared: {body}"
    );
    let (status, body) = api.post(&format!("/orders/{order_id}/complete"), MERCHANT, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = api.post(&format!("/orders/{order_id}/cancel"), BOB, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another user's order: {body}");
    let (status, body) = api.post(&format!("/orders/{order_id}/cancel"), MERCHANT, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.post(&format!("/orders/{order_id}/cancel"), ALICE, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    let (status, body) = api.post(&format!("/orders/{order_id}/cancel"), ALICE, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "cancelling twice: {body}");
    let (status, body) = api
        .post(&format!("/orders/{}/cancel", uuid::Uuid::now_v7()), ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, body) = api
        .post(
            &format!("/products/{}/restock", product_id.as_str().unwrap_or_default()),
            MERCHANT,
            Some(json!({"quantity": 3})),
        )
        .await;
    assert_eq!((status, body["version"].as_u64()), (StatusCode::OK, Some(2)));
    Ok(())
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() -> anyhow::Result<()> {
    let doc: Value = serde_json::from_str(commands::api::OPENAPI)?;
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
    let source = include_str!("../../src/api/mod.rs");
    for part in source.split(".route(\"").skip(1) {
        let path = part.split('"').next().unwrap_or_default();
        assert!(doc["paths"].get(path).is_some(), "{path} is served but not documented");
    }
    for path in ["/health", "/metrics"] {
        assert!(doc["paths"].get(path).is_some());
    }
    Ok(())
}

/// A creation skips the load; a repeated id must still be refused by the aggregate.
#[tokio::test]
async fn creating_under_an_existing_id_falls_back_to_the_aggregate_rules() -> anyhow::Result<()> {
    use commands::{
        bus::CommandError,
        domain::{ProductCommand, ProductError},
    };
    let db = testkit::TestDb::new().await?;
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState::new(db.pool.clone(), JwtKeys::new(&platform::Secret::new("s")), ops);
    let id = uuid::Uuid::now_v7();
    let create = || ProductCommand::Create {
        product_id: id,
        merchant_id: "m".into(),
        name: "Tea".into(),
        price_cents: 300,
        stock: 1,
    };
    let metadata = events::EventMetadata::system("test");
    let first = state.api.products.create(&id.to_string(), create, &metadata).await?;
    assert_eq!(first.version, 1);
    let second = state.api.products.create(&id.to_string(), create, &metadata).await;
    assert!(
        matches!(second, Err(CommandError::Domain(ProductError::AlreadyExists))),
        "{second:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_hot_product_answers_503_once_its_in_flight_limit_is_reached() -> anyhow::Result<()> {
    hot_product_limit(testkit::kv_client()).await
}

#[tokio::test]
async fn a_hot_product_is_limited_on_a_redis_cluster_too() -> anyhow::Result<()> {
    hot_product_limit(testkit::kv_cluster_client()).await
}

async fn hot_product_limit(redis: platform::kv::KvClient) -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let keys = JwtKeys::new(&platform::Secret::new("api-test-secret"));
    let ops = Ops {
        health: Health::new(),
        metrics: platform::telemetry::metrics_handle(),
    };
    let gate = commands::hot::ProductSemaphore::with_connection(
        redis.connect().await?,
        testkit::unique_prefix(),
        2,
        Duration::from_secs(10),
    );
    let router = commands::router(AppState::new(db.pool.clone(), keys.clone(), ops).with_hot_products(gate.clone()));
    let api = Api { router, keys, _db: db };
    let (hot, cold) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let order =
        |product: uuid::Uuid| Some(json!({"items": [{"product_id": product, "quantity": 1}], "coupon_id": null}));
    let ann = Some(("ann", Role::Customer));

    // no saga runs here: the first two orders stay in flight
    assert_eq!(api.post("/orders", ann, order(hot)).await.0, StatusCode::ACCEPTED);
    assert_eq!(api.post("/orders", ann, order(hot)).await.0, StatusCode::ACCEPTED);
    let (status, body) = api.post("/orders", ann, order(hot)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("product_busy"))
    );
    // other products are not held up
    assert_eq!(api.post("/orders", ann, order(cold)).await.0, StatusCode::ACCEPTED);
    // the saga gives a unit back once it has tried the product
    gate.release(&[hot]).await;
    assert_eq!(api.post("/orders", ann, order(hot)).await.0, StatusCode::ACCEPTED);
    // an order of both products takes a unit of each, or none: hot is full again
    let both = Some(
        json!({"items": [{"product_id": hot, "quantity": 1}, {"product_id": cold, "quantity": 1}], "coupon_id": null}),
    );
    assert_eq!(api.post("/orders", ann, both).await.0, StatusCode::SERVICE_UNAVAILABLE);
    gate.release(&[hot, cold]).await;
    let both = Some(
        json!({"items": [{"product_id": hot, "quantity": 1}, {"product_id": cold, "quantity": 1}], "coupon_id": null}),
    );
    assert_eq!(api.post("/orders", ann, both).await.0, StatusCode::ACCEPTED);
    Ok(())
}
