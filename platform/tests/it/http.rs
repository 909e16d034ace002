//! The HTTP basics every service inherits: auth, error bodies, limits, routing,
//! and the connection handling of `serve`, over real sockets.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::FromRef,
    routing::{get, post},
};
use http::{Method, Request, StatusCode, header};
use platform::{
    Secret,
    config::HttpConfig,
    http::{
        ApiBytes, ApiJson, ApiPath, ApiQuery, AuthUser, Authorized, CommonError, ErrorBody, Health, JwtKeys,
        MerchantsOrAdmins, NoBody, Ops, Role, serve, service_router,
    },
};
use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tower::ServiceExt as _;

#[derive(Clone, FromRef)]
struct State {
    jwt: JwtKeys,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Restock {
    quantity: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct CreateProduct {
    title: String,
    price_cents: i64,
    kind: Kind,
    merchant_id: Option<uuid::Uuid>,
    begins_at: Option<chrono::DateTime<chrono::Utc>>,
    items: Option<Vec<Restock>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Seckill,
    Regular,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ListQuery {
    limit: Option<i64>,
    status: Option<String>,
}

fn keys() -> JwtKeys {
    JwtKeys::new(&Secret::new("test-secret-0123456789"))
}

fn app(health: Health) -> Router {
    let routes = Router::new()
        .route(
            "/me",
            get(|user: AuthUser| async move { format!("{}:{}", user.sub, user.role) }),
        )
        .route(
            "/admin",
            get(|user: AuthUser| async move { user.require(&[Role::Admin, Role::Merchant]).map(|()| "ok") }),
        )
        .route("/restock", post(|ApiJson(_): ApiJson<Restock>| async { "ok" }))
        .route(
            "/items/{id}",
            get(|ApiPath(id): ApiPath<uuid::Uuid>| async move { id.to_string() }),
        )
        .route(
            "/boom",
            get(|| async { Err::<(), _>(CommonError::internal(anyhow::anyhow!("db password=x"))) }),
        )
        .route(
            "/products/{id}/restock",
            post(
                |user: Authorized<MerchantsOrAdmins>,
                 ApiPath(_): ApiPath<uuid::Uuid>,
                 ApiJson(body): ApiJson<Restock>| async move { format!("{}:{}", user.sub, body.quantity) },
            ),
        )
        .route("/products", post(|ApiJson(_): ApiJson<CreateProduct>| async { "ok" }))
        .route(
            "/list",
            get(|ApiQuery(query): ApiQuery<ListQuery>| async move { format!("{query:?}") }),
        )
        .route(
            "/claim",
            post(|user: AuthUser, _: NoBody| async move { user.sub }).get(|_: NoBody| async { "ok" }),
        )
        .route("/raw", post(|body: Bytes| async move { body.len().to_string() }))
        .route(
            "/api-raw",
            post(|ApiBytes(body): ApiBytes| async move { body.len().to_string() }),
        )
        .route(
            "/plain-error",
            get(|| async { (StatusCode::CONFLICT, "plain text from struct Internal") }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "done"
            }),
        )
        .with_state(State { jwt: keys() });
    service_router(
        routes,
        Ops {
            health,
            metrics: platform::telemetry::metrics_handle(),
        },
    )
}

async fn send(app: Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn get_with(path: &str, token: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path);
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(Body::empty()).unwrap_or_default()
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| b.error.code)
        .unwrap_or_else(|_| format!("not an error body: {body}"))
}

#[tokio::test]
async fn a_valid_token_authenticates_the_caller() {
    let token = keys()
        .issue("user-1", Role::Customer, Duration::from_secs(60))
        .unwrap_or_default();
    let (status, body) = send(app(Health::new()), get_with("/me", Some(&token))).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "user-1:customer"));
}

#[tokio::test]
async fn missing_expired_and_forged_tokens_are_401() {
    let (status, body) = send(app(Health::new()), get_with("/me", None)).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "missing_token")
    );

    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &platform::http::auth::Claims {
            sub: "u".into(),
            role: Role::Customer,
            exp: (chrono::Utc::now().timestamp() - 3600).unsigned_abs(),
            nbf: None,
        },
        &jsonwebtoken::EncodingKey::from_secret(b"test-secret-0123456789"),
    )
    .unwrap_or_default();
    let (status, body) = send(app(Health::new()), get_with("/me", Some(&expired))).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "token_expired")
    );

    let forged = JwtKeys::new(&Secret::new("another-secret"))
        .issue("u", Role::Admin, Duration::from_secs(60))
        .unwrap_or_default();
    let (status, body) = send(app(Health::new()), get_with("/me", Some(&forged))).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );

    let (status, body) = send(app(Health::new()), get_with("/me", Some("not.a.jwt"))).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
}

#[tokio::test]
async fn a_token_with_an_unknown_role_is_rejected() {
    #[derive(serde::Serialize)]
    struct Loose {
        sub: &'static str,
        role: &'static str,
        exp: u64,
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Loose {
            sub: "u",
            role: "superuser",
            exp: (chrono::Utc::now().timestamp() + 60).unsigned_abs(),
        },
        &jsonwebtoken::EncodingKey::from_secret(b"test-secret-0123456789"),
    )
    .unwrap_or_default();
    let (status, _) = send(app(Health::new()), get_with("/me", Some(&token))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_wrong_role_is_403() {
    let customer = keys()
        .issue("u", Role::Customer, Duration::from_secs(60))
        .unwrap_or_default();
    let (status, body) = send(app(Health::new()), get_with("/admin", Some(&customer))).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );

    let merchant = keys()
        .issue("m", Role::Merchant, Duration::from_secs(60))
        .unwrap_or_default();
    let (status, _) = send(app(Health::new()), get_with("/admin", Some(&merchant))).await;
    assert_eq!(status, StatusCode::OK);
}

fn post_json(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_bodies_get_contract_errors() {
    let cases = [
        (
            post_json("/restock", "{not json"),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            post_json("/restock", r#"{"quantity": -1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            post_json("/restock", r#"{"quantity": 1, "x": 2}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            post_json("/restock", r#"{"quantity": "many"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Request::post("/restock")
                .body(Body::from(r#"{"quantity": 1}"#))
                .unwrap_or_default(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post_json(
                "/restock",
                format!(r#"{{"quantity": 1, "pad": "{}"}}"#, "x".repeat(70_000)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            get_with("/items/not-a-uuid", None),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (get_with("/nowhere", None), StatusCode::NOT_FOUND, "not_found"),
        (
            post_json("/me", "{}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (get_with("/boom", None), StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    ];
    for (request, want_status, want_code) in cases {
        let path = request.uri().to_string();
        let (status, body) = send(app(Health::new()), request).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (want_status, want_code),
            "{path}: {body}"
        );
        assert!(!body.contains("password"), "internal cause leaked: {body}");
    }
    let (status, _) = send(app(Health::new()), post_json("/restock", r#"{"quantity": 3}"#)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn health_is_503_while_a_dependency_is_down() {
    let (status, _) = send(
        app(Health::new().with("ok", || async { Ok(()) })),
        get_with("/health", None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let down = Health::new()
        .with("ok", || async { Ok(()) })
        .with("db", || async { Err("refused".to_owned()) });
    let (status, body) = send(app(down), get_with("/health", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!body.contains("refused"), "probe errors stay in the log: {body}");
}

#[tokio::test]
async fn a_scrape_runs_the_dependency_probes_and_exports_whether_each_answers() {
    let health = Health::new()
        .with("scrape_ok", || async { Ok(()) })
        .with("scrape_refused", || async { Err("refused".to_owned()) })
        .with("scrape_hanging", || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        });
    let started = Instant::now();
    let (status, body) = send(app(health), get_with("/metrics", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a hanging probe is cut short"
    );
    for (dependency, up) in [("scrape_ok", 1), ("scrape_refused", 0), ("scrape_hanging", 0)] {
        assert!(
            body.contains(&format!(r#"dependency_up{{dependency="{dependency}"}} {up}"#)),
            "{dependency}: {body}"
        );
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route() {
    let app = app(Health::new());
    let _ = send(
        app.clone(),
        get_with("/items/3fa85f64-5717-4562-b3fc-2c963f66afa6", None),
    )
    .await;
    let (status, body) = send(app, get_with("/metrics", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(r#"route="/items/{id}""#), "{body}");
    assert!(body.contains("http_request_duration_seconds_bucket"), "{body}");
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A token with any claims, signed with the test secret.
fn signed(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(b"test-secret-0123456789"),
    )
    .unwrap_or_default()
}

fn token(sub: &str, role: Role) -> String {
    keys().issue(sub, role, Duration::from_secs(60)).unwrap_or_default()
}

fn error_of(body: &str) -> (String, String) {
    serde_json::from_str::<ErrorBody>(body)
        .map(|b| (b.error.code, b.error.message))
        .unwrap_or_else(|_| (format!("not an error body: {body}"), String::new()))
}

#[tokio::test]
async fn a_sub_outside_the_identity_rules_is_401() {
    let too_long = "u".repeat(129);
    for sub in [
        "",
        "a\0b",
        "tab\there",
        too_long.as_str(),
        " padded",
        "padded ",
        "ad\u{202E}nim",
    ] {
        let token = signed(&serde_json::json!({"sub": sub, "role": "customer", "exp": now() + 60}));
        let (status, body) = send(app(Health::new()), get_with("/me", Some(&token))).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (StatusCode::UNAUTHORIZED, "invalid_token"),
            "sub {sub:?}: {body}"
        );
    }
    let longest = "u".repeat(128);
    for sub in [longest.as_str(), "shop 1", "名前"] {
        let (status, body) = send(app(Health::new()), get_with("/me", Some(&token(sub, Role::Customer)))).await;
        assert_eq!(status, StatusCode::OK, "sub {sub:?}: {body}");
    }
}

#[tokio::test]
async fn a_token_before_its_nbf_is_401() {
    let early = signed(&serde_json::json!({"sub": "u", "role": "customer", "exp": now() + 7200, "nbf": now() + 3600}));
    let (status, body) = send(app(Health::new()), get_with("/me", Some(&early))).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_token")
    );
    let current = signed(&serde_json::json!({"sub": "u", "role": "customer", "exp": now() + 60, "nbf": now() - 10}));
    let (status, _) = send(app(Health::new()), get_with("/me", Some(&current))).await;
    assert_eq!(status, StatusCode::OK);
    // issue_claims round-trips nbf
    let claims = platform::http::auth::Claims {
        sub: "u".into(),
        role: Role::Customer,
        exp: (now() + 60).unsigned_abs(),
        nbf: Some((now() + 600).unsigned_abs()),
    };
    let early = keys().issue_claims(&claims).unwrap_or_default();
    assert!(matches!(keys().verify(&early), Err(CommonError::InvalidToken)));
}

#[tokio::test]
async fn the_role_is_checked_before_the_body_is_read() {
    const PATH: &str = "/products/3fa85f64-5717-4562-b3fc-2c963f66afa6/restock";
    let customer = token("c", Role::Customer);
    let merchant = token("m", Role::Merchant);
    let request = |token: Option<&str>, content_type: Option<&str>, body: &str| {
        let mut builder = Request::post(PATH);
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        builder.body(Body::from(body.to_owned())).unwrap_or_default()
    };
    let json = Some("application/json");
    let cases = [
        (request(Some(&customer), json, "{not json"), StatusCode::FORBIDDEN),
        (
            request(Some(&customer), json, r#"{"quantity": -1}"#),
            StatusCode::FORBIDDEN,
        ),
        (request(Some(&customer), None, "x"), StatusCode::FORBIDDEN),
        (
            request(Some(&customer), json, r#"{"quantity": 1}"#),
            StatusCode::FORBIDDEN,
        ),
        (request(None, None, "x"), StatusCode::UNAUTHORIZED),
        (
            request(Some(&merchant), json, r#"{"quantity": -1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (request(Some(&merchant), None, "x"), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (request(Some(&merchant), json, r#"{"quantity": 4}"#), StatusCode::OK),
    ];
    for (i, (request, want)) in cases.into_iter().enumerate() {
        let (status, body) = send(app(Health::new()), request).await;
        assert_eq!(status, want, "case {i}: {body}");
        if status == StatusCode::OK {
            assert_eq!(body, "m:4");
        }
    }
}

#[tokio::test]
async fn a_body_on_an_endpoint_that_takes_none_is_413() {
    let customer = token("c", Role::Customer);
    let claim = |body: Body, length: Option<&str>| {
        let mut builder = Request::post("/claim").header(header::AUTHORIZATION, format!("Bearer {customer}"));
        if let Some(length) = length {
            builder = builder.header(header::CONTENT_LENGTH, length);
        }
        builder.body(body).unwrap_or_default()
    };
    let chunked = || {
        Body::from_stream(futures::stream::iter([
            Ok::<_, std::io::Error>(Bytes::new()),
            Ok(Bytes::from_static(b"x")),
        ]))
    };
    let empty_stream = || Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(Bytes::new())]));
    let cases = [
        (claim(Body::from("hello"), Some("5")), StatusCode::PAYLOAD_TOO_LARGE),
        (claim(chunked(), None), StatusCode::PAYLOAD_TOO_LARGE),
        (claim(Body::empty(), None), StatusCode::OK),
        (claim(Body::empty(), Some("0")), StatusCode::OK),
        (claim(empty_stream(), None), StatusCode::OK),
    ];
    for (i, (request, want)) in cases.into_iter().enumerate() {
        let (status, body) = send(app(Health::new()), request).await;
        assert_eq!(status, want, "case {i}: {body}");
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            assert_eq!(error_code(&body), "payload_too_large", "{body}");
        }
    }
}

/// What no client should ever read in an error message.
fn names_a_rust_type(message: &str) -> bool {
    [
        "struct ",
        "enum ",
        "u32",
        "i64",
        "u64",
        "Uuid",
        "DateTime",
        "Utc",
        "::",
        "Failed to",
        "CreateProduct",
        "Restock",
        "ListQuery",
        "`",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

#[tokio::test]
async fn body_errors_name_the_field_in_words() {
    const VALID: &str = r#""title": "t", "price_cents": 1, "kind": "regular""#;
    let cases = [
        (
            format!(r#"{{{VALID}, "items": [{{"quantity": -3}}]}}"#),
            "invalid_body",
            "items[0].quantity: expected a whole number from 0 to 4294967295, got -3",
        ),
        (
            r#"{"title": "t", "price_cents": "ten", "kind": "regular"}"#.to_owned(),
            "invalid_body",
            "price_cents: expected an integer, got a string",
        ),
        (
            format!(r#"{{{VALID}, "foo": 1}}"#),
            "invalid_body",
            r#"unknown field "foo""#,
        ),
        (
            r#"{"price_cents": 1, "kind": "regular"}"#.to_owned(),
            "invalid_body",
            "title: missing",
        ),
        (
            r#"{"title": "t", "price_cents": 1, "kind": "flash"}"#.to_owned(),
            "invalid_body",
            r#"kind: expected "seckill" or "regular", got "flash""#,
        ),
        (
            r#"{"title": "t", "price_cents": 1, "kind": 7}"#.to_owned(),
            "invalid_body",
            "kind: expected one of the allowed values",
        ),
        (
            format!(r#"{{{VALID}, "merchant_id": "m-1"}}"#),
            "invalid_body",
            "merchant_id: expected a UUID",
        ),
        (
            format!(r#"{{{VALID}, "begins_at": "tomorrow"}}"#),
            "invalid_body",
            "begins_at: expected an RFC 3339 date and time such as 2025-01-31T12:00:00Z",
        ),
        ("[true]".to_owned(), "invalid_body", "[0]: expected a string, got true"),
        ("{\"title\": ".to_owned(), "malformed_json", ""),
    ];
    for (json, want_code, want_message) in cases {
        let (status, body) = send(app(Health::new()), post_json("/products", json.clone())).await;
        let (code, message) = error_of(&body);
        assert_eq!(code, want_code, "{json}: {body}");
        if !want_message.is_empty() {
            assert_eq!(message, want_message, "{json}");
        }
        assert!(status.is_client_error());
        assert!(!names_a_rust_type(&message), "{json}: {message}");
    }

    let (status, body) = send(app(Health::new()), get_with("/items/not-a-uuid", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error_of(&body),
        ("invalid_path".to_owned(), "id: expected a UUID".to_owned())
    );

    for (query, want) in [
        ("limit=abc", "limit: expected an integer"),
        ("limit=99999999999999999999", "limit: number out of range"),
        ("limit=1&sort=asc", r#"unknown field "sort""#),
    ] {
        let (status, body) = send(app(Health::new()), get_with(&format!("/list?{query}"), None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(
            error_of(&body),
            ("invalid_query".to_owned(), want.to_owned()),
            "{query}"
        );
    }
    let (status, _) = send(app(Health::new()), get_with("/list?limit=5&status=paid", None)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn every_error_from_the_http_layer_has_the_contract_body() {
    let oversized = "x".repeat(70_000);
    let cases = [
        // axum's raw Bytes extractor answers in plain text
        (
            Request::post("/raw")
                .body(Body::from(oversized.clone()))
                .unwrap_or_default(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Request::post("/api-raw")
                .body(Body::from(oversized))
                .unwrap_or_default(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (get_with("/plain-error", None), StatusCode::CONFLICT, "conflict"),
        (
            get_with(&format!("/me?pad={}", "p".repeat(9_000)), None),
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
        ),
    ];
    for (request, want_status, want_code) in cases {
        let path: String = request.uri().path().to_owned();
        let response = app(Health::new()).oneshot(request).await.unwrap_or_else(|e| match e {});
        let json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&bytes);
        assert!(json, "{path}: not JSON");
        assert_eq!(
            (status, error_code(&body).as_str()),
            (want_status, want_code),
            "{path}: {body}"
        );
        assert!(!body.contains("struct Internal"), "{body}");
    }
    let (status, body) = send(
        app(Health::new()),
        Request::post("/raw").body(Body::from("ok")).unwrap_or_default(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "2"));
}

#[tokio::test]
async fn invented_methods_share_one_metric_label() {
    let app = app(Health::new());
    for i in 0..30 {
        let method = Method::from_bytes(format!("INVENT{i}").as_bytes()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri("/me")
            .body(Body::empty())
            .unwrap_or_default();
        let (status, _) = send(app.clone(), request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
    let (_, metrics) = send(app, get_with("/metrics", None)).await;
    let methods: BTreeSet<&str> = metrics
        .split("method=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let allowed = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"];
    assert!(methods.contains("other"), "{methods:?}");
    assert!(methods.iter().all(|m| allowed.contains(m)), "{methods:?}");
}

// ---- over real sockets: what `serve` does with connections ----

struct Served {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(config: HttpConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, app(Health::new()), &config, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            address,
            stop: Some(stop),
            task,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.address)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "serve did not end cleanly: {ended:?}");
    }
}

#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn code(&self) -> String {
        error_code(&self.body)
    }
}

/// Reads one response (Content-Length framed) within 5 s.
async fn read_response(stream: &mut TcpStream) -> Option<Raw> {
    let read = async {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next()?.get(9..12)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buffer[head_end + 4..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(Raw {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.ok().flatten()
}

async fn exchange(served: &Served, request: &[u8]) -> Raw {
    let mut stream = served.connect().await;
    let _ = stream.write_all(request).await;
    read_response(&mut stream).await.unwrap_or_else(|| {
        panic!(
            "no response to {:?}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        )
    })
}

/// Whether the server closes `stream` (EOF or reset) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn requests_hyper_cannot_parse_get_the_contract_body() {
    let served = Served::start(HttpConfig::default()).await;

    let long = format!("GET /me?q={} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let control = b"GET /me HTTP/1.1\r\nhost: x\r\nx-bad: a\x01b\r\n\r\n".to_vec();
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = format!("GET /me HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let garbage = b"\x16\x03\x01 hello\r\n\r\n".to_vec();
    for (request, status, code) in [
        (long.into_bytes(), 414, "uri_too_long"),
        (control, 400, "bad_request"),
        (many.into_bytes(), 431, "headers_too_large"),
        (garbage, 400, "bad_request"),
    ] {
        let response = exchange(&served, &request).await;
        assert_eq!(
            (response.status, response.code().as_str()),
            (status, code),
            "{response:?}"
        );
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{response:?}"
        );
        assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    }

    // a long but parseable URI never reaches a handler either
    let response = exchange(
        &served,
        format!("GET /me?q={} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(10_000)).as_bytes(),
    )
    .await;
    assert_eq!((response.status, response.code().as_str()), (414, "uri_too_long"));

    // a chunked body on an endpoint that takes none
    let response = exchange(
        &served,
        b"GET /claim HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!((response.status, response.code().as_str()), (413, "payload_too_large"));

    // ordinary requests keep the connection alive
    let mut stream = served.connect().await;
    for _ in 0..2 {
        let _ = stream.write_all(b"GET /claim HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let response = read_response(&mut stream).await;
        assert_eq!(response.map(|r| (r.status, r.body)), Some((200, "ok".to_owned())));
    }
    served.stop().await;
}

#[tokio::test]
async fn a_connection_that_does_not_finish_its_headers_is_closed() {
    let served = Served::start(HttpConfig {
        http_header_read_timeout_ms: 300,
        ..HttpConfig::default()
    })
    .await;
    let started = Instant::now();
    let mut half = served.connect().await;
    let _ = half.write_all(b"GET /me HTTP/1.1\r\nhost: x\r\nx-slow: ").await;
    assert!(closed_within(&mut half, Duration::from_secs(3)).await, "still open");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // an idle connection too
    let mut idle = served.connect().await;
    assert!(
        closed_within(&mut idle, Duration::from_secs(3)).await,
        "idle still open"
    );
    served.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let served = Served::start(HttpConfig {
        http_max_connections: 2,
        http_header_read_timeout_ms: 20_000,
        ..HttpConfig::default()
    })
    .await;
    let mut first = served.connect().await;
    let _second = served.connect().await;
    // both are accepted and served
    let _ = first.write_all(b"GET /claim HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(read_response(&mut first).await.map(|r| r.status), Some(200));

    // a third waits in the backlog: not served while the two stay open
    let mut third = served.connect().await;
    let _ = third.write_all(b"GET /claim HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served at the cap: {early:?}");

    // once one closes, the third is accepted and answered
    drop(first);
    let mut rest = Vec::new();
    let late = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = [0u8; 1024];
        while !rest.windows(2).any(|w| w == b"ok") {
            match third.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(late.is_ok(), "not served after a slot freed");
    assert!(
        String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    served.stop().await;
}

#[tokio::test]
async fn a_request_over_the_timeout_is_503_with_retry_after() {
    let served = Served::start(HttpConfig {
        http_request_timeout_ms: 100,
        ..HttpConfig::default()
    })
    .await;
    let response = exchange(&served, b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!((response.status, response.code().as_str()), (503, "request_timeout"));
    assert_eq!(response.header("retry-after"), Some("1"));
    served.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let served = Served::start(HttpConfig::default()).await;
    let mut stream = served.connect().await;
    let _ = stream.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let address = served.address;
    let stopping = tokio::spawn(served.stop());
    let response = read_response(&mut stream).await;
    assert_eq!(response.map(|r| (r.status, r.body)), Some((200, "done".to_owned())));
    let _ = stopping.await;
    assert!(
        TcpStream::connect(address).await.is_err(),
        "still accepting after shutdown"
    );
}
