//! The query API against a real Postgres: who may read what, read-your-writes
//! waits, order search over HTTP, coupons and vouchers. Documents are put in
//! the view tables directly; the projections' own tests cover how they get there.

use std::time::Duration;

use axum::body::Body;
use chrono::{Duration as Span, Utc};
use http::{Request, StatusCode};
use platform::http::{Health, JwtKeys, Ops, Role};
use query_api::AppState;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use uuid::Uuid;

const SECRET: &str = "query-secret";

struct Api {
    db: testkit::TestDb,
    router: axum::Router,
    jwt: JwtKeys,
}

/// The query API's state over `db`, as the service builds it (without the
/// document cache unless a test adds it).
fn state(db: &testkit::TestDb, jwt: &JwtKeys) -> AppState {
    AppState::new(
        db.pool.clone(),
        jwt.clone(),
        Ops {
            health: Health::new(),
            metrics: platform::telemetry::metrics_handle(),
        },
    )
}

impl Api {
    async fn new() -> anyhow::Result<Self> {
        let db = testkit::TestDb::new().await?;
        let jwt = JwtKeys::new(&platform::Secret::new(SECRET));
        let router = query_api::router(state(&db, &jwt));
        Ok(Self { db, router, jwt })
    }

    /// The API with a document cache, as the service runs it; the cache is
    /// returned for a test that follows announcements (`listen`).
    async fn cached() -> anyhow::Result<(Self, query_api::cache::DocCache)> {
        let db = testkit::TestDb::new().await?;
        let jwt = JwtKeys::new(&platform::Secret::new(SECRET));
        let cache = query_api::cache::DocCache::new(1 << 20, Duration::from_secs(60));
        let router = query_api::router(state(&db, &jwt).with_cache(cache.clone()));
        Ok((Self { db, router, jwt }, cache))
    }

    async fn get(&self, path: &str, who: Option<(&str, Role)>) -> (StatusCode, Value) {
        let mut request = Request::get(path);
        if let Some((sub, role)) = who {
            let token = self.jwt.issue(sub, role, Duration::from_secs(60)).expect("token");
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn put(&self, table: &str, id: &str, version: i64, doc: Value) -> anyhow::Result<()> {
        let user = doc["user_id"].as_str().map(str::to_owned);
        let merchant = doc["merchant_id"].as_str().map(str::to_owned);
        let status = doc["status"].as_str().map(str::to_owned);
        sqlx::query(&format!(
            "INSERT INTO {table} (id, version, doc, user_id, status, created_at, updated_at, merchant_id)
             VALUES ($1, $2, $3, $4, $5, now(), now(), $6)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, doc = EXCLUDED.doc"
        ))
        .bind(id)
        .bind(version)
        .bind(&doc)
        .bind(user)
        .bind(status)
        .bind(merchant)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// An order of the merchant `shop`.
    async fn order(&self, user: &str, status: &str, total: i64) -> anyhow::Result<String> {
        self.order_of(user, "shop", status, total).await
    }

    async fn order_of(&self, user: &str, merchant: &str, status: &str, total: i64) -> anyhow::Result<String> {
        let id = Uuid::now_v7().to_string();
        let doc = json!({"order_id": id, "user_id": user, "merchant_id": merchant, "kind": "goods",
                         "status": status, "total_cents": total, "version": 1, "items": [], "history": []});
        self.put("order_view", &id, 1, doc).await?;
        Ok(id)
    }
}

const ANN: Option<(&str, Role)> = Some(("ann", Role::Customer));
const BOB: Option<(&str, Role)> = Some(("bob", Role::Customer));
const SHOP: Option<(&str, Role)> = Some(("shop", Role::Merchant));
const ADMIN: Option<(&str, Role)> = Some(("root", Role::Admin));

#[tokio::test]
async fn every_endpoint_checks_who_is_asking() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let anns = api.order("ann", "paid", 1_000).await?;
    let bobs = api.order("bob", "paid", 2_000).await?;
    let voucher = Uuid::now_v7().to_string();
    api.put(
        "voucher_view",
        &voucher,
        1,
        json!({"voucher_id": voucher, "sold_out": false,
        "begins_at": Utc::now() - Span::hours(1), "ends_at": Utc::now() + Span::hours(1)}),
    )
    .await?;
    let product = Uuid::now_v7().to_string();
    api.put(
        "product_view",
        &product,
        1,
        json!({"product_id": product, "stock_available": 3}),
    )
    .await?;

    for path in [
        format!("/orders/{anns}"),
        "/orders".to_owned(),
        "/users/me/coupons".to_owned(),
        format!("/vouchers/{voucher}"),
        format!("/products/{product}"),
    ] {
        let (status, body) = api.get(&path, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("missing_token")),
            "{path}"
        );
    }
    // an order: its owner, merchants and admins; another customer sees nothing
    assert_eq!(api.get(&format!("/orders/{anns}"), ANN).await.0, StatusCode::OK);
    let (status, body) = api.get(&format!("/orders/{anns}"), BOB).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("order_not_found"))
    );
    assert_eq!(api.get(&format!("/orders/{bobs}"), SHOP).await.0, StatusCode::OK);
    assert_eq!(api.get(&format!("/orders/{bobs}"), ADMIN).await.0, StatusCode::OK);
    // a search: customers get their own orders only
    let (_, mine) = api.get("/orders", ANN).await;
    let ids: Vec<&str> = mine["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(ids, [anns.as_str()]);
    let (status, body) = api.get("/orders?user_id=bob", ANN).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (_, all) = api.get("/orders", ADMIN).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2));
    let (_, bobs_only) = api.get("/orders?user_id=bob", SHOP).await;
    assert_eq!(bobs_only["items"][0]["order_id"].as_str(), Some(bobs.as_str()));
    // coupons are a customer's own list
    assert_eq!(api.get("/users/me/coupons", SHOP).await.0, StatusCode::FORBIDDEN);
    // vouchers and products: anyone signed in
    for who in [ANN, SHOP, ADMIN] {
        assert_eq!(api.get(&format!("/vouchers/{voucher}"), who).await.0, StatusCode::OK);
        assert_eq!(api.get(&format!("/products/{product}"), who).await.0, StatusCode::OK);
    }
    api.db.drop_database().await
}

/// Every merchant-facing read, for a merchant that owns the order and one
/// that does not: the other's is answered like a missing one, and never
/// appears in a listing, whatever the filter asks for.
#[tokio::test]
async fn a_merchant_reads_only_its_own_orders_on_every_endpoint() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let a = api.order_of("ann", "shop-a", "paid", 1_000).await?;
    let b = api.order_of("ann", "shop-b", "paid", 2_000).await?;
    let shop_a = Some(("shop-a", Role::Merchant));
    let shop_b = Some(("shop-b", Role::Merchant));
    let listed = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|o| o["order_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (me, mine, theirs, their_shop) in [(shop_a, &a, &b, "shop-b"), (shop_b, &b, &a, "shop-a")] {
        // by id (also while waiting for a version)
        assert_eq!(api.get(&format!("/orders/{mine}"), me).await.0, StatusCode::OK);
        for path in [format!("/orders/{theirs}"), format!("/orders/{theirs}?min_version=1")] {
            let (status, body) = api.get(&path, me).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::NOT_FOUND, Some("order_not_found")),
                "{path}"
            );
        }
        // listings, with every way of asking for the other's
        let filter = urlencode(&format!(r#"{{"merchant_id": "{their_shop}"}}"#));
        for path in [
            "/orders".to_owned(),
            "/orders?user_id=ann".to_owned(),
            "/orders?status=paid".to_owned(),
            format!("/orders?filter={filter}"),
            format!(
                "/orders?filter={}",
                urlencode(&format!(r#"{{"order_id": "{theirs}"}}"#))
            ),
            "/kitchen/tickets".to_owned(),
        ] {
            let (status, body) = api.get(&path, me).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let ids = listed(&body);
            assert!(!ids.contains(theirs), "{path} showed another merchant's order");
            if !path.contains("filter") {
                assert_eq!(ids, std::slice::from_ref(mine), "{path}");
            }
        }
    }
    // the admin sees both, and may narrow to one merchant
    let (_, all) = api.get("/orders", ADMIN).await;
    assert_eq!(listed(&all).len(), 2);
    let (_, only_a) = api
        .get(
            &format!("/orders?filter={}", urlencode(r#"{"merchant_id": "shop-a"}"#)),
            ADMIN,
        )
        .await;
    assert_eq!(listed(&only_a), std::slice::from_ref(&a));
    api.db.drop_database().await
}

#[tokio::test]
async fn unknown_ids_and_bad_parameters_are_4xx_in_the_error_format() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let missing = Uuid::now_v7();
    for (path, code) in [
        (format!("/orders/{missing}"), "order_not_found"),
        (format!("/vouchers/{missing}"), "voucher_not_found"),
        (format!("/products/{missing}"), "product_not_found"),
    ] {
        let (status, body) = api.get(&path, ADMIN).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some(code))
        );
    }
    for (path, status, code) in [
        ("/orders/not-a-uuid", StatusCode::BAD_REQUEST, "invalid_path"),
        ("/orders?status=lost", StatusCode::BAD_REQUEST, "invalid_query"),
        // a NUL no user id has (Postgres text cannot even hold it): not a 503
        ("/orders?user_id=a%00b", StatusCode::BAD_REQUEST, "invalid_query"),
        (
            "/orders?filter=%7B%22%24where%22%3A1%7D",
            StatusCode::BAD_REQUEST,
            "invalid_filter",
        ),
        ("/orders?filter=not-json", StatusCode::BAD_REQUEST, "invalid_filter"),
        ("/orders?sort=-password", StatusCode::BAD_REQUEST, "invalid_sort"),
        ("/orders?limit=0", StatusCode::BAD_REQUEST, "invalid_limit"),
        ("/orders?cursor=AAAA", StatusCode::BAD_REQUEST, "invalid_cursor"),
        (
            "/users/me/coupons?status=gone",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ] {
        let who = if path.starts_with("/users") { ANN } else { ADMIN };
        let (got, body) = api.get(path, who).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{path}");
    }
    let (status, _) = api
        .get(&format!("/orders/{missing}?wait_ms=20000&min_version=1"), ADMIN)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    api.db.drop_database().await
}

#[tokio::test]
async fn min_version_waits_for_the_view_or_answers_202_with_what_there_is() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let id = api.order("ann", "pending_payment", 990).await?;

    // not reached in time: 202 and the current document
    let (status, body) = api.get(&format!("/orders/{id}?min_version=2&wait_ms=100"), ANN).await;
    assert_eq!((status, body["version"].as_i64()), (StatusCode::ACCEPTED, Some(1)));

    // reached while waiting: 200 with the new document
    let pool = api.db.pool.clone();
    let later = id.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        sqlx::query("UPDATE order_view SET version = 2, doc = jsonb_set(jsonb_set(doc, '{version}', '2'), '{status}', '\"paid\"') WHERE id = $1")
            .bind(later)
            .execute(&pool)
            .await
    });
    let (status, body) = api.get(&format!("/orders/{id}?min_version=2&wait_ms=3000"), ANN).await;
    writer.await??;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("paid")));

    // an unknown id, and another's order, are the same 404 at once: no wait,
    // no stub outside the documented schema, nothing told apart
    for (path, who) in [
        (format!("/orders/{}?min_version=1&wait_ms=5000", Uuid::now_v7()), ANN),
        (format!("/orders/{id}?min_version=5&wait_ms=5000"), BOB),
        (
            format!("/orders/{id}?min_version=5&wait_ms=5000"),
            Some(("other-shop", Role::Merchant)),
        ),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = api.get(&path, who).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("order_not_found")),
            "{path}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{path} waited");
    }
    api.db.drop_database().await
}

#[tokio::test]
async fn many_waiters_share_one_watch_and_each_sees_its_own_version() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let jwt = JwtKeys::new(&platform::Secret::new(SECRET));
    let state = state(&db, &jwt);
    let watch = state.watch.clone();
    let api = Api {
        db,
        router: query_api::router(state),
        jwt,
    };
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(api.order("ann", "pending_payment", 990).await?);
    }
    let api = std::sync::Arc::new(api);
    let mut waiting = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let api = api.clone();
        waiting.spawn(async move {
            let (status, body) = api.get(&format!("/orders/{id}?min_version=3&wait_ms=5000"), ANN).await;
            (id, status, body["version"].as_i64())
        });
    }
    // every request is parked in the one registry before anything changes
    let parked = std::time::Instant::now();
    while watch.waiting() < ids.len() {
        anyhow::ensure!(
            parked.elapsed() < Duration::from_secs(5),
            "only {} waiting",
            watch.waiting()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // version 2 is not enough for anyone; 3 is, for the first half only
    sqlx::query("UPDATE order_view SET version = 2, doc = jsonb_set(doc, '{version}', '2')")
        .execute(&api.db.pool)
        .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(watch.waiting(), ids.len(), "a waiter left below its min_version");
    let (woken, asleep) = ids.split_at(ids.len() / 2);
    sqlx::query("UPDATE order_view SET version = 3, doc = jsonb_set(doc, '{version}', '3') WHERE id = ANY($1)")
        .bind(woken)
        .execute(&api.db.pool)
        .await?;
    let started = std::time::Instant::now();
    for _ in 0..woken.len() {
        let Some(done) = waiting.join_next().await else { break };
        let (id, status, version) = done?;
        assert!(woken.contains(&id), "{id} answered before its version or deadline");
        assert_eq!((status, version), (StatusCode::OK, Some(3)), "{id}");
    }
    assert!(started.elapsed() < Duration::from_secs(2), "woken late");
    // the rest time out with 202 and what there is
    while let Some(done) = waiting.join_next().await {
        let (id, status, version) = done?;
        assert!(asleep.contains(&id));
        assert_eq!((status, version), (StatusCode::ACCEPTED, Some(2)), "{id}");
    }
    assert_eq!(watch.waiting(), 0, "the registry forgets finished waits");
    match std::sync::Arc::try_unwrap(api) {
        Ok(api) => api.db.drop_database().await,
        Err(_) => anyhow::bail!("api still shared"),
    }
}

#[tokio::test]
async fn orders_are_searched_sorted_and_paged_over_http() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let mut expected = Vec::new();
    for total in [500, 1_500, 2_500, 3_500, 4_500] {
        expected.push(api.order("ann", "paid", total).await?);
    }
    api.order("ann", "cancelled", 9_000).await?;
    let filter = urlencode(r#"{"total_cents": {"$gte": 1000}, "status": {"$in": ["paid", "preparing"]}}"#);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/orders?filter={filter}&sort=total_cents&limit=2");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = api.get(&path, ANN).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|o| o["total_cents"].as_i64().unwrap_or(0)),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, [1_500, 2_500, 3_500, 4_500]);
    let (_, paid) = api.get("/orders?status=cancelled", ANN).await;
    assert_eq!(paid["items"][0]["total_cents"].as_i64(), Some(9_000));
    api.db.drop_database().await
}

#[tokio::test]
async fn coupons_are_listed_per_user_and_status_and_vouchers_carry_a_live_status() -> anyhow::Result<()> {
    let api = Api::new().await?;
    for (user, status) in [("ann", "available"), ("ann", "redeemed"), ("bob", "available")] {
        let id = Uuid::now_v7().to_string();
        api.put(
            "coupon_view",
            &id,
            1,
            json!({"coupon_id": id, "user_id": user, "status": status}),
        )
        .await?;
    }
    let (_, all) = api.get("/users/me/coupons", ANN).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(2));
    let (_, available) = api.get("/users/me/coupons?status=available", ANN).await;
    let items = available["items"].as_array().expect("items");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["user_id"], "ann");

    let now = Utc::now();
    for (begins, ends, sold_out, status) in [
        (now + Span::hours(1), now + Span::hours(2), false, "upcoming"),
        (now - Span::hours(1), now + Span::hours(1), false, "on_sale"),
        (now - Span::hours(1), now + Span::hours(1), true, "sold_out"),
        (now - Span::hours(2), now - Span::hours(1), false, "ended"),
    ] {
        let id = Uuid::now_v7().to_string();
        api.put(
            "voucher_view",
            &id,
            1,
            json!({"voucher_id": id, "begins_at": begins, "ends_at": ends, "sold_out": sold_out}),
        )
        .await?;
        let (_, doc) = api.get(&format!("/vouchers/{id}"), BOB).await;
        assert_eq!(doc["status"], status);
    }
    api.db.drop_database().await
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn the_kitchen_sees_paid_orders_waiting_oldest_first() -> anyhow::Result<()> {
    let api = Api::new().await?;
    let first = api.order("ann", "paid", 1_000).await?;
    api.order("bob", "preparing", 2_000).await?;
    api.order("cat", "pending_payment", 3_000).await?;
    let second = api.order("dan", "paid", 4_000).await?;
    sqlx::query("UPDATE order_view SET updated_at = now() - interval '1 minute' WHERE id = $1")
        .bind(&first)
        .execute(&api.db.pool)
        .await?;

    // another merchant's paid order is not in this kitchen
    let elsewhere = api.order_of("eve", "other-shop", "paid", 5_000).await?;

    let (status, body) = api.get("/kitchen/tickets", SHOP).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|t| t["order_id"].as_str())
        .collect();
    assert_eq!(ids, [first.as_str(), second.as_str()]);
    assert_eq!(body["items"][0]["merchant_id"], "shop");
    let (_, all) = api.get("/kitchen/tickets", ADMIN).await;
    assert_eq!(all["items"].as_array().map(Vec::len), Some(3));
    let (_, theirs) = api.get("/kitchen/tickets", Some(("other-shop", Role::Merchant))).await;
    assert_eq!(theirs["items"][0]["order_id"].as_str(), Some(elsewhere.as_str()));

    // beyond one page, the cursor walks the whole queue
    let mut queue = vec![first.clone(), second.clone()];
    for i in 0..5 {
        let id = api.order(&format!("late-{i}"), "paid", 100).await?;
        sqlx::query("UPDATE order_view SET updated_at = now() + make_interval(secs => $2) WHERE id = $1")
            .bind(&id)
            .bind(f64::from(i + 1))
            .execute(&api.db.pool)
            .await?;
        queue.push(id);
    }
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/kitchen/tickets?limit=3&cursor={cursor}"),
            None => "/kitchen/tickets?limit=3".to_owned(),
        };
        let (status, page) = api.get(&path, SHOP).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        walked.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter_map(|t| t["order_id"].as_str().map(str::to_owned)),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, queue);
    assert_eq!(api.get("/kitchen/tickets", ANN).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        api.get("/kitchen/tickets?limit=0", ADMIN).await.0,
        StatusCode::BAD_REQUEST
    );
    api.db.drop_database().await
}

#[tokio::test]
async fn equality_filters_on_order_documents_are_served_by_the_gin_index() -> anyhow::Result<()> {
    let api = Api::new().await?;
    for n in 0..50 {
        api.order(&format!("user-{n}"), "pending_payment", 990 + n).await?;
    }
    // the expression the filter emits for `{"kind": "goods"}` (filter.rs DOC_INDEXED)
    let mut conn = api.db.pool.acquire().await?;
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await?;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id FROM order_view WHERE (doc - 'items' - 'history') @> '{\"kind\": \"goods\"}'::jsonb",
    )
    .fetch_all(&mut *conn)
    .await?;
    assert!(plan.iter().any(|line| line.contains("order_view_doc_idx")), "{plan:#?}");
    drop(conn);
    let (status, body) = api.get("/orders?filter=%7B%22total_cents%22%3A1000%7D", ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"].as_array().map(Vec::len), Some(1), "{body}");
    api.db.drop_database().await
}

#[tokio::test]
async fn cached_documents_follow_the_projections_announcements_and_never_go_back() -> anyhow::Result<()> {
    let (api, cache) = Api::cached().await?;
    let listening = cache.listen(api.db.pool.clone());
    let id = api.order("ann", "pending_payment", 990).await?;
    let set_version = |version: i64, announce: bool| {
        let (pool, id) = (api.db.pool.clone(), id.clone());
        async move {
            sqlx::query(
                "UPDATE order_view SET version = $2, doc = jsonb_set(doc, '{version}', to_jsonb($2)) WHERE id = $1",
            )
            .bind(&id)
            .bind(version)
            .execute(&pool)
            .await?;
            if announce {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(platform::pg::VIEW_CHANGES_CHANNEL)
                    .bind(format!("order_view\n{id} {version}"))
                    .execute(&pool)
                    .await?;
            }
            anyhow::Ok(())
        }
    };
    let read = |query: &'static str| {
        let (api, id) = (&api, id.clone());
        async move {
            let (status, body) = api.get(&format!("/orders/{id}{query}"), ANN).await;
            (status, body["version"].as_i64())
        }
    };
    // wait until the listener follows (it forgets everything when it starts)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read("").await, (StatusCode::OK, Some(1)));

    // a change nobody announced is not seen: the copy is served from memory
    set_version(2, false).await?;
    assert_eq!(read("").await, (StatusCode::OK, Some(1)), "served from the cache");
    // another customer is refused by the cached copy's owner, as by SQL
    let (status, _) = api.get(&format!("/orders/{id}"), BOB).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // min_version above the cached copy asks Postgres, and what it finds
    // becomes what everyone reads next: never an older version again
    assert_eq!(read("?min_version=2&wait_ms=0").await, (StatusCode::OK, Some(2)));
    assert_eq!(read("").await, (StatusCode::OK, Some(2)));

    // an announced change reaches readers within milliseconds
    set_version(3, true).await?;
    let announced = std::time::Instant::now();
    loop {
        if read("").await == (StatusCode::OK, Some(3)) {
            break;
        }
        anyhow::ensure!(
            announced.elapsed() < Duration::from_secs(2),
            "the announcement was not followed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("announced change visible after {:?}", announced.elapsed());

    // a replay's swap announces the whole table
    set_version(4, false).await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(platform::pg::VIEW_CHANGES_CHANNEL)
        .bind(platform::pg::ViewChange::whole_table("order_view"))
        .execute(&api.db.pool)
        .await?;
    testkit::eventually(Duration::from_secs(2), || async {
        Ok(read("").await == (StatusCode::OK, Some(4)))
    })
    .await?;
    listening.abort();
    api.db.drop_database().await
}

/// Lookups that arrive while the statements in flight run go together in
/// one statement, and each still gets only what its own scope allows: the
/// owner predicates are in that statement, per lookup.
#[tokio::test]
async fn lookups_gathered_in_one_statement_keep_each_callers_scope() -> anyhow::Result<()> {
    use query_api::{
        lookup::{BatchOptions, LookupError, Lookups, Scope},
        watch::Table,
    };
    let api = Api::new().await?;
    let anns = api.order_of("ann", "shop", "paid", 1_000).await?;
    let bobs = api.order_of("bob", "other-shop", "paid", 2_000).await?;
    let customer = |id: &str| Scope {
        user_id: Some(id.to_owned()),
        merchant_id: None,
    };
    let merchant = |id: &str| Scope {
        user_id: None,
        merchant_id: Some(id.to_owned()),
    };
    let missing = Uuid::now_v7().to_string();
    // (id, scope, the version it may see)
    let cases = [
        (&anns, customer("ann"), Some(1)),
        (&anns, customer("bob"), None),
        (&bobs, customer("bob"), Some(1)),
        (&bobs, customer("ann"), None),
        (&anns, merchant("shop"), Some(1)),
        (&bobs, merchant("shop"), None),
        (&bobs, merchant("other-shop"), Some(1)),
        (&anns, Scope::everyone(), Some(1)),
        (&missing, Scope::everyone(), None),
    ];
    let lookups = Lookups::new(
        api.db.pool.clone(),
        BatchOptions {
            max_batch: 64,
            concurrency: 1,
        },
    );
    // three rounds of every case, all asked before the statement task runs
    // (this test's runtime has one thread): one statement answers them all
    let asked = cases.iter().cycle().take(3 * cases.len()).map(|(id, scope, _)| {
        let lookups = lookups.clone();
        async move { lookups.get(Table::Orders, id, scope).await }
    });
    let answers = futures::future::join_all(asked).await;
    for (answer, (id, scope, expected)) in answers.into_iter().zip(cases.iter().cycle()) {
        let seen = answer?;
        assert_eq!(seen.as_ref().map(|doc| doc.version), *expected, "{id} as {scope:?}");
        if let Some(doc) = seen {
            let doc: Value = serde_json::from_slice(&doc.doc)?;
            assert_eq!(
                doc["order_id"].as_str(),
                Some(id.as_str()),
                "each lookup gets its own document"
            );
        }
    }
    assert_eq!(lookups.statements(), 1, "27 lookups asked together, one statement");

    // a smaller batch limit splits them
    let small = Lookups::new(
        api.db.pool.clone(),
        BatchOptions {
            max_batch: 4,
            concurrency: 1,
        },
    );
    let asked = cases.iter().map(|(id, scope, _)| {
        let small = small.clone();
        async move { small.get(Table::Orders, id, scope).await }
    });
    let answers = futures::future::join_all(asked).await;
    assert_eq!(answers.len(), cases.len());
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(small.statements(), 3, "9 lookups of at most 4 each");

    // a failed statement fails every lookup it carried, with its cause
    let pool = api.db.pool.clone();
    let failing = Lookups::new(pool.clone(), BatchOptions::default());
    pool.close().await;
    let asked = (0..5).map(|_| {
        let failing = failing.clone();
        let anns = anns.clone();
        async move { failing.get(Table::Orders, &anns, &Scope::everyone()).await }
    });
    for answer in futures::future::join_all(asked).await {
        assert!(
            matches!(answer, Err(LookupError::Store(ref cause)) if matches!(**cause, sqlx::Error::PoolClosed)),
            "{answer:?}"
        );
    }
    api.db.drop_database().await
}

/// A cached voucher copy answers the status of the moment it is read, not
/// the one it was first answered with.
#[tokio::test]
async fn a_cached_voucher_moves_from_upcoming_to_on_sale_as_its_sale_opens() -> anyhow::Result<()> {
    let (api, _cache) = Api::cached().await?;
    let id = Uuid::now_v7().to_string();
    let begins = Utc::now() + Span::milliseconds(400);
    api.put(
        "voucher_view",
        &id,
        1,
        json!({"voucher_id": id, "begins_at": begins, "ends_at": begins + Span::hours(1), "sold_out": false}),
    )
    .await?;
    let (status, doc) = api.get(&format!("/vouchers/{id}"), BOB).await;
    assert_eq!((status, doc["status"].as_str()), (StatusCode::OK, Some("upcoming")));
    // the row changes behind the cache: reads below keep using the cached copy
    sqlx::query("UPDATE voucher_view SET doc = jsonb_set(doc, '{title}', '\"changed\"') WHERE id = $1")
        .bind(&id)
        .execute(&api.db.pool)
        .await?;
    let wait = (begins - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50);
    tokio::time::sleep(wait).await;
    let (status, doc) = api.get(&format!("/vouchers/{id}"), BOB).await;
    assert_eq!((status, doc["status"].as_str()), (StatusCode::OK, Some("on_sale")));
    assert_eq!(doc["title"], Value::Null, "still the cached copy");
    api.db.drop_database().await
}
