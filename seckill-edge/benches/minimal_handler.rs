//! The baseline of `./dev bench seckill_edge`: the least an HTTP server can do
//! to run the edge's admission script.
//!
//! A bare axum server, no middleware, no JWT verification, no metrics or
//! tracing: `POST /seckill/{voucher_id}` runs [`ADMIT_LUA`] with the edge's
//! KEYS layout ([`VoucherKeys`]) and ARGV (same rate-limit arguments) over one
//! multiplexed Redis connection, and answers 202 with the order id or 409/4xx
//! like the edge. The user id is the last 16 characters of the
//! `Authorization` header (the end of the JWT's signature, unique per token),
//! so wrk sends both servers byte-identical requests.
//!
//! `GET /ok` answers "ok" and nothing else: the bare axum handler of the
//! machine reference (what any HTTP request costs here).
//!
//! ```sh
//! minimal_handler --addr 127.0.0.1:18091 --redis-url redis://127.0.0.1:56379/ --prefix bench1234:
//! ```
//! Options mirror the edge's defaults: `--rate-limit-burst 10`,
//! `--rate-limit-per-sec 5`, `--idempotency-ttl-secs 86400`. Stops on SIGINT or
//! SIGTERM.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use platform::config::{RedisConfig, Secret};
use redis::{Script, aio::ConnectionManager};
use seckill_edge::{gate::ADMIT_LUA, keys::VoucherKeys};
use serde_json::json;
use uuid::Uuid;

struct Baseline {
    redis: ConnectionManager,
    script: Script,
    prefix: String,
    burst: u32,
    per_second: f64,
    idempotency_ttl_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addr = "127.0.0.1:18091".to_owned();
    let mut redis_url = "redis://127.0.0.1:56379/".to_owned();
    let mut prefix = "bench:".to_owned();
    let (mut burst, mut per_second, mut idempotency_ttl_secs) = (10_u32, 5.0_f64, 86_400_u64);
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => addr = value()?,
            "--redis-url" => redis_url = value()?,
            "--prefix" => prefix = value()?,
            "--rate-limit-burst" => burst = value()?.parse()?,
            "--rate-limit-per-sec" => per_second = value()?.parse()?,
            "--idempotency-ttl-secs" => idempotency_ttl_secs = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // the edge's connection: one multiplexed, auto-reconnecting connection
    let config = RedisConfig {
        redis_url: Secret::new(redis_url),
    };
    let redis = platform::kv::connect(&config, Duration::from_secs(10)).await?;
    let script = Script::new(ADMIT_LUA);
    script.prepare_invoke().load_async(&mut redis.clone()).await?;
    let state = Arc::new(Baseline {
        redis,
        script,
        prefix,
        burst: burst.max(1),
        per_second: per_second.max(0.0),
        idempotency_ttl_ms: idempotency_ttl_secs.saturating_mul(1_000),
    });
    let app = Router::new()
        .route("/seckill/{voucher_id}", post(attempt))
        .route("/ok", get(|| async { "ok" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("minimal handler listening on {addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(platform::shutdown::signal())
        .await?;
    Ok(())
}

async fn attempt(State(state): State<Arc<Baseline>>, Path(voucher_id): Path<Uuid>, headers: HeaderMap) -> Response {
    let authorization = headers.get(AUTHORIZATION).map_or(&b""[..], |v| v.as_bytes());
    let user_id = std::str::from_utf8(&authorization[authorization.len().saturating_sub(16)..]).unwrap_or("");
    if user_id.is_empty() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let keys = VoucherKeys::new(&state.prefix, voucher_id);
    let order_id = Uuid::now_v7();
    let mut invocation = state.script.prepare_invoke();
    invocation
        .key(&keys.meta)
        .key(&keys.users)
        .key(&keys.reservations)
        .key(&keys.stream)
        .key(keys.rate(user_id))
        .key(keys.no_idempotency())
        .arg(user_id)
        .arg(order_id.to_string())
        .arg("")
        .arg("")
        .arg(state.burst)
        .arg(state.per_second)
        .arg("0")
        .arg(state.idempotency_ttl_ms);
    let answer: Result<(String, String, i64), _> = invocation.invoke_async(&mut state.redis.clone()).await;
    let (status, code) = match answer.as_ref().map(|(status, ..)| status.as_str()) {
        Ok("admitted") => {
            let body = json!({"order_id": order_id, "status": "queued"});
            return (StatusCode::ACCEPTED, Json(body)).into_response();
        }
        Ok("sold_out") => (StatusCode::CONFLICT, "sold_out"),
        Ok("already_purchased") => (StatusCode::CONFLICT, "already_purchased"),
        Ok("sale_not_started") => (StatusCode::FORBIDDEN, "sale_not_started"),
        Ok("sale_ended") => (StatusCode::FORBIDDEN, "sale_ended"),
        Ok("rate_limited") => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        Ok("cold") => (StatusCode::NOT_FOUND, "voucher_not_found"),
        Ok(_) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "gate_unavailable"),
    };
    (status, Json(json!({"error": {"code": code, "message": code}}))).into_response()
}
