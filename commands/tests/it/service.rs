//! The command API process: starts against real Postgres and NATS, reports
//! its dependencies on /health, serves /metrics, and stops on request.

use clap::Parser as _;
use commands::{AppState, Config};
use platform::http::{Health, JwtKeys, Ops};

#[tokio::test]
async fn starts_reports_health_and_metrics_and_shuts_down_gracefully() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let nats_url = testkit::nats_url();
    let args = [
        "command-api",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats_url,
        "--jwt-secret",
        "s3cret",
    ];
    let config = Config::try_parse_from(args)?;
    let server = testkit::Server::start(|listener, shutdown| commands::run(config, listener, shutdown)).await?;
    testkit::assert_service_lifecycle(server, &["postgres", "nats"]).await
}

#[tokio::test]
async fn health_is_503_while_postgres_or_nats_is_down() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let nats = testkit::nats().await?;
    let state = |pool: sqlx::PgPool, nats: async_nats::Client| {
        let ops = Ops {
            health: Health::new().postgres(pool.clone()).nats(nats),
            metrics: platform::telemetry::metrics_handle(),
        };
        AppState::new(pool, JwtKeys::new(&platform::Secret::new("s")), ops)
    };
    let up = commands::router(state(db.pool.clone(), nats.clone()));
    assert_eq!(testkit::status_of(up, "/health").await, 200);
    let pg_down = commands::router(state(testkit::unreachable_pool(), nats));
    assert_eq!(testkit::status_of(pg_down, "/health").await, 503);
    let nats_down = commands::router(state(db.pool.clone(), testkit::unreachable_nats().await));
    assert_eq!(testkit::status_of(nats_down, "/health").await, 503);
    Ok(())
}

/// The whole process: HTTP command → event store → relay → JetStream, and
/// OrderRequested on JetStream → claim writer → order in the event store.
#[tokio::test]
async fn a_command_reaches_jetstream_and_an_admitted_request_becomes_an_order() -> anyhow::Result<()> {
    use std::time::Duration;

    use events::{Namespace, OrderRequested};
    use platform::http::Role;

    let db = testkit::TestDb::new().await?;
    let namespace = Namespace::new(testkit::unique_namespace())?;
    let nats_url = testkit::nats_url();
    let args = [
        "command-api",
        "--database-url",
        &db.url,
        "--nats-url",
        &nats_url,
        "--nats-namespace",
        namespace.as_str(),
        "--jwt-secret",
        "s3cret",
    ];
    let config = Config::try_parse_from(args)?;
    let server = testkit::Server::start(|listener, shutdown| commands::run(config, listener, shutdown)).await?;
    let token = JwtKeys::new(&platform::Secret::new("s3cret")).issue("m-1", Role::Merchant, Duration::from_secs(60))?;
    let client = reqwest::Client::new();

    let now = chrono::Utc::now();
    let created: serde_json::Value = client
        .post(server.url("/vouchers"))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "title": "Flash hotpot", "kind": "seckill", "price_cents": 990, "value_cents": 5000,
            "stock": 2, "begins_at": now - chrono::Duration::minutes(1), "ends_at": now + chrono::Duration::hours(1)
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let voucher_id: uuid::Uuid = created["voucher_id"].as_str().unwrap_or_default().parse()?;

    let js = cp_nats::jetstream(testkit::nats().await?, 1_000);
    let vouchers = js.get_stream(namespace.events_stream("Voucher")).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while vouchers.get_info().await?.state.messages < 1 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "VoucherCreated never reached JetStream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let request = OrderRequested {
        order_id: uuid::Uuid::now_v7(),
        voucher_id,
        user_id: "alice".into(),
        requested_at: now,
    };
    cp_nats::Publisher::new(js.clone(), 16)
        .publish(cp_nats::Outgoing::new(
            namespace.seckill_requests_subject(),
            request.order_id.to_string(),
            serde_json::to_vec(&request)?,
        ))
        .await?;
    let orders = js.get_stream(namespace.events_stream("Order")).await?;
    while orders.get_info().await?.state.messages < 1 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the admitted request never became an order"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let placed = orders.get_raw_message(1).await?;
    let envelope: events::EventEnvelope = serde_json::from_slice(&placed.payload)?;
    assert_eq!(
        (envelope.aggregate_id, envelope.event_type.as_str()),
        (request.order_id.to_string(), "OrderPlaced")
    );
    server.stop().await
}

/// What a client sees while Postgres is away: 503 `store_unavailable` with
/// `Retry-After`, within the pool's acquire timeout (never a hang, never a 500).
#[tokio::test]
async fn a_command_while_postgres_is_away_is_503_with_retry_after() -> anyhow::Result<()> {
    use platform::http::Role;

    let keys = JwtKeys::new(&platform::Secret::new("s"));
    let ops = Ops {
        health: Health::new().postgres(testkit::unreachable_pool()),
        metrics: platform::telemetry::metrics_handle(),
    };
    let state = AppState::new(testkit::unreachable_pool(), keys.clone(), ops);
    let token = keys.issue("shop-1", Role::Merchant, std::time::Duration::from_secs(60))?;
    let body = serde_json::json!({
        "title": "Hotpot for two", "kind": "seckill", "price_cents": 990, "value_cents": 5000,
        "min_spend_cents": 0, "stock": 10,
        "begins_at": "2030-01-01T00:00:00Z", "ends_at": "2030-01-02T00:00:00Z",
    });
    let request = http::Request::post("/vouchers")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(serde_json::to_vec(&body)?))?;
    let started = std::time::Instant::now();
    let (status, headers, body) = testkit::respond(commands::router(state), request).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert_eq!(headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    Ok(())
}
