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
//! Several comma-separated `--redis-url`s: a Redis Cluster (the cluster-aware
//! client, as the edge with `REDIS_CLUSTER=true`).
//!
//! `--jetstream NATS_URL`: the other way to make a 202 survive a Redis
//! failover (ARCHITECTURE.md "Admitted means durable"), measured against
//! the edge's `WAIT`: every admission is published to a JetStream stream
//! (file storage, created at start, deleted at exit) and answered 202 only
//! once JetStream acknowledged it. Stops on SIGINT or SIGTERM.

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
    /// `--jetstream`: where each admission is published before its 202.
    jetstream: Option<(async_nats::jetstream::Context, String)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addr = "127.0.0.1:18091".to_owned();
    let mut redis_url = "redis://127.0.0.1:56379/".to_owned();
    let mut prefix = "bench:".to_owned();
    let mut nats_url = None;
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => addr = value()?,
            "--redis-url" => redis_url = value()?,
            "--prefix" => prefix = value()?,
            "--jetstream" => nats_url = Some(value()?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    // the edge's connection: one multiplexed, auto-reconnecting connection
    let config = RedisConfig {
        redis_cluster: redis_url.contains(','),
        redis_url: Secret::new(redis_url),
    };
    let redis = platform::kv::connect(&config, Duration::from_secs(10)).await?;
    let script = Script::new(ADMIT_LUA);
    script.prepare_invoke().load_async(&mut redis.clone()).await?;
    let jetstream = match nats_url {
        Some(url) => Some(admissions_stream(&url, &prefix).await?),
        None => None,
    };
    let state = Arc::new(Baseline {
        redis,
        script,
        prefix,
        jetstream: jetstream.clone(),
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
    if let Some((js, stream)) = jetstream {
        js.delete_stream(&stream).await?;
    }
    Ok(())
}

/// A file-storage stream of its own for `--jetstream`; answers the
/// context and the stream's name (also its subject).
async fn admissions_stream(url: &str, prefix: &str) -> anyhow::Result<(async_nats::jetstream::Context, String)> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let name: String = format!("bench_admissions_{prefix}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![name.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok((js, name))
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
            if let Some((js, subject)) = &state.jetstream {
                let request = format!("{voucher_id} {user_id} {order_id}");
                let acked = match js.publish(subject.clone(), request.into()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if !acked {
                    return (StatusCode::SERVICE_UNAVAILABLE, "jetstream").into_response();
                }
            }
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
