//! The HTTP basics every service inherits: auth, error bodies, limits, routing.

use std::time::Duration;

use axum::{
    Router,
    body::Body,
    extract::FromRef,
    routing::{get, post},
};
use http::{Request, StatusCode, header};
use platform::{
    Secret,
    http::{ApiJson, ApiPath, AuthUser, CommonError, ErrorBody, Health, JwtKeys, Ops, Role, service_router},
};
use serde::Deserialize;
use tower::ServiceExt as _;

#[derive(Clone, FromRef)]
struct State {
    jwt: JwtKeys,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Restock {
    #[allow(dead_code)]
    quantity: u32,
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
