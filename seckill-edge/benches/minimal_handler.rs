//! The baseline of `./dev bench seckill_edge`: the least an HTTP server can do
//! to run the edge's admission script.
//!
//! A bare axum server, no middleware, no JWT verification, no metrics or
//! tracing, no rate limit: `POST /seckill/{voucher_id}` runs [`ADMIT_LUA`]
//! with the edge's KEYS layout ([`VoucherKeys`]) and ARGV (the time from the
//! system clock, no trace context) over one multiplexed Redis connection, and
//! answers 202 with the order id or 409/4xx like the edge. The user id is the last 16 characters of the
//! `Authorization` header (the end of the JWT's signature, unique per token),
//! so wrk sends both servers byte-identical requests.
//!
//! `GET /ok` answers "ok" and nothing else: the bare axum handler of the
//! machine reference (what any HTTP request costs here).
//!
//! ```sh
//! minimal_handler --addr 127.0.0.1:18091 --redis-url redis://127.0.0.1:56379/ --prefix bench1234:
//! ```
//! Stops on SIGINT or SIGTERM.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use platform::config::{RedisConfig, Secret};
use platform::kv::Kv;
use redis::Script;
use seckill_edge::{gate::ADMIT_LUA, keys::VoucherKeys};
use serde_json::json;
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Baseline {
    redis: Kv,
    script: Script,
    prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addr = "127.0.0.1:18091".to_owned();
    let mut redis_url = "redis://127.0.0.1:56379/".to_owned();
    let mut prefix = "bench:".to_owned();
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => addr = value()?,
            "--redis-url" => redis_url = value()?,
            "--prefix" => prefix = value()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // the edge's connection: one multiplexed, auto-reconnecting connection
    let config = RedisConfig {
        redis_url: Secret::new(redis_url),
        redis_cluster: false,
    };
    let redis = platform::kv::connect(&config, Duration::from_secs(10)).await?;
    let script = Script::new(ADMIT_LUA);
    script.prepare_invoke().load_async(&mut redis.clone()).await?;
    let state = Arc::new(Baseline { redis, script, prefix });
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
        .key(&keys.buyers)
        .key(&keys.stream)
        .arg(user_id)
        .arg(order_id.to_string())
        .arg(chrono::Utc::now().timestamp_millis())
        .arg("")
        .arg("");
    let answer: Result<i64, _> = invocation.invoke_async(&mut state.redis.clone()).await;
    // the codes of lua/admit.lua
    let (status, code) = match answer {
        Ok(0) => {
            let body = json!({"order_id": order_id, "status": "queued"});
            return (StatusCode::ACCEPTED, Json(body)).into_response();
        }
        Ok(1) => (StatusCode::NOT_FOUND, "voucher_not_found"),
        Ok(2) => (StatusCode::FORBIDDEN, "sale_not_started"),
        Ok(3) => (StatusCode::FORBIDDEN, "sale_ended"),
        Ok(4) => (StatusCode::CONFLICT, "already_purchased"),
        Ok(5) => (StatusCode::CONFLICT, "sold_out"),
        Ok(_) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "gate_unavailable"),
    };
    (status, Json(json!({"error": {"code": code, "message": code}}))).into_response()
}
