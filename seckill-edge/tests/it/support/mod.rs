//! What the edge's tests share: a gate on the test Redis under a key prefix
//! of the test's own, the in-process router, tokens, voucher snapshots, and
//! reading what reached JetStream.
#![allow(dead_code)]

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream;
use chrono::{DateTime, Duration as Span, Utc};
use cp_nats::{Publisher, Topology};
use events::{Namespace, OrderRequested, VoucherEvent, VoucherKind};
use http::{Request, StatusCode};
use platform::{
    clock::{SharedClock, SystemClock},
    http::{Health, JwtKeys, Ops, Role},
    kv::{Kv, KvClient},
};
use seckill_edge::{
    AppState, Edge,
    flags::VoucherFlags,
    forwarder::{Forwarder, ForwarderConfig},
    gate::Gate,
    ledger::VoucherSnapshot,
    limiter::{AttemptLimiter, RateLimit},
    warmup::{Warmer, WarmerConfig},
};
use sqlx::PgPool;
use tower::ServiceExt as _;
use uuid::Uuid;

pub const SECRET: &str = "edge-test-secret";

pub const NO_RATE_LIMIT: RateLimit = RateLimit::OFF;

/// Everything a test drives, isolated by its own key prefix and namespace.
pub struct Harness {
    pub prefix: String,
    pub namespace: Namespace,
    pub redis: Kv,
    pub client: KvClient,
    pub gate: Gate,
    pub flags: Arc<VoucherFlags>,
    pub warmer: Arc<Warmer>,
    pub limiter: Arc<AttemptLimiter>,
    pub js: jetstream::Context,
    pub jwt: JwtKeys,
    pub pool: PgPool,
}

impl Harness {
    /// On the shared test Redis, with a pool that only a re-warm would use.
    pub async fn new(rate: RateLimit, pool: PgPool) -> anyhow::Result<Self> {
        Self::on(testkit::kv_client(), rate, pool).await
    }

    /// On the test Redis Cluster (three primaries, a replica each).
    pub async fn on_cluster(rate: RateLimit, pool: PgPool) -> anyhow::Result<Self> {
        Self::on(testkit::kv_cluster_client(), rate, pool).await
    }

    pub async fn on(client: KvClient, rate: RateLimit, pool: PgPool) -> anyhow::Result<Self> {
        Self::on_at(client, rate, pool, Arc::new(SystemClock)).await
    }

    /// With the gate stamping attempts by `clock`.
    pub async fn on_at(client: KvClient, rate: RateLimit, pool: PgPool, clock: SharedClock) -> anyhow::Result<Self> {
        let prefix = testkit::unique_prefix();
        let namespace = Namespace::new(testkit::unique_namespace())?;
        // generous: the whole suite shares two cores, and a timeout answers 503
        let redis = client.connect_with(Some(Duration::from_secs(10))).await?;
        let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
        cp_nats::ensure_topology(
            &js,
            &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
        )
        .await?;
        let gate = Gate::new(redis.clone(), prefix.clone(), Duration::from_secs(3_600), clock);
        gate.load_scripts().await?;
        let flags = Arc::new(VoucherFlags::new(
            Duration::from_millis(500),
            Duration::from_millis(500),
        ));
        let warmer = Arc::new(Warmer::new(
            gate.clone(),
            pool.clone(),
            js.clone(),
            namespace.clone(),
            WarmerConfig {
                drain_timeout: Duration::from_secs(10),
                wait: Duration::from_secs(5),
            },
        ));
        Ok(Self {
            prefix,
            namespace,
            redis,
            client,
            gate,
            flags,
            warmer,
            limiter: Arc::new(AttemptLimiter::new(rate)),
            js,
            jwt: JwtKeys::new(&platform::Secret::new(SECRET)),
            pool,
        })
    }

    pub fn router(&self) -> axum::Router {
        seckill_edge::router(AppState {
            edge: Arc::new(Edge {
                gate: self.gate.clone(),
                flags: self.flags.clone(),
                warmer: self.warmer.clone(),
                limiter: self.limiter.clone(),
            }),
            jwt: self.jwt.clone(),
            ops: Ops {
                health: Health::new(),
                metrics: platform::telemetry::metrics_handle(),
            },
        })
    }

    pub fn token(&self, user: &str) -> String {
        self.token_as(user, Role::Customer)
    }

    pub fn token_as(&self, user: &str, role: Role) -> String {
        self.jwt.issue(user, role, Duration::from_secs(600)).expect("token")
    }

    pub fn forwarder(&self, consumer: &str, claim_idle: Duration) -> anyhow::Result<Forwarder> {
        let publisher = Publisher::new(self.js.clone(), 1_000);
        Ok(Forwarder::new(
            self.client.clone(),
            self.prefix.clone(),
            publisher,
            self.namespace.clone(),
            ForwarderConfig {
                claim_idle,
                block: Duration::from_millis(100),
                discovery: Duration::from_millis(100),
                ..ForwarderConfig::new(consumer)
            },
        ))
    }

    /// Loads an open sale straight into Redis.
    pub async fn open_sale(&self, stock: u32) -> anyhow::Result<Uuid> {
        let voucher_id = Uuid::now_v7();
        let now = Utc::now();
        self.gate
            .load(&snapshot(
                voucher_id,
                stock,
                now - Span::minutes(1),
                now + Span::hours(1),
            ))
            .await?;
        Ok(voucher_id)
    }

    /// Messages stored on the seckill requests stream.
    pub async fn requests_on_jetstream(&self) -> anyhow::Result<Vec<OrderRequested>> {
        let mut stream = self.js.get_stream(self.namespace.seckill_requests_stream()).await?;
        let state = stream.info().await?.state.clone();
        let mut requests = Vec::new();
        for sequence in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            let message = stream.get_raw_message(sequence).await?;
            requests.push(serde_json::from_slice(&message.payload)?);
        }
        Ok(requests)
    }

    pub async fn stream_length(&self, voucher_id: Uuid) -> anyhow::Result<u64> {
        let keys = self.gate.keys(voucher_id);
        Ok(redis::cmd("XLEN")
            .arg(&keys.stream)
            .query_async(&mut self.redis.clone())
            .await?)
    }

    /// Deletes every key under this test's prefix: Redis "losing its data"
    /// without disturbing the other tests on the shared server.
    pub async fn forget_everything(&self) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut redis)
            .await?;
        for key in keys {
            let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut redis).await?;
        }
        Ok(())
    }
}

/// A seckill voucher of `stock`, on sale from 5 minutes ago for an hour.
pub fn created(voucher_id: Uuid, stock: u32) -> VoucherEvent {
    let now = Utc::now();
    VoucherEvent::VoucherCreated {
        voucher_id,
        merchant_id: "m-1".into(),
        title: "Hotpot for two".into(),
        kind: VoucherKind::Seckill,
        price_cents: 990,
        value_cents: 5_000,
        min_spend_cents: 0,
        stock: Some(stock),
        begins_at: now - Span::minutes(5),
        ends_at: now + Span::hours(1),
    }
}

/// The store's acceptance of `user`'s claim.
pub fn accepted(order_id: Uuid, user: &str) -> VoucherEvent {
    VoucherEvent::SeckillClaimAccepted {
        order_id,
        user_id: user.into(),
        requested_at: Utc::now(),
    }
}

pub fn snapshot(voucher_id: Uuid, stock: u32, begins_at: DateTime<Utc>, ends_at: DateTime<Utc>) -> VoucherSnapshot {
    VoucherSnapshot {
        voucher_id,
        stock,
        begins_at,
        ends_at,
        version: 1,
        buyers: Vec::new(),
    }
}

/// One attempt through the router: status, JSON body and `Retry-After`.
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub retry_after: Option<u64>,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn order_id(&self) -> Option<Uuid> {
        self.body["order_id"].as_str().and_then(|id| id.parse().ok())
    }
}

pub async fn attempt(router: &axum::Router, voucher: &str, token: Option<&str>, key: Option<&str>) -> Answer {
    let mut request = Request::post(format!("/seckill/{voucher}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = router
        .clone()
        .oneshot(request.body(axum::body::Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        body,
        retry_after,
    }
}

/// Appends a voucher's events to the event store as the command side would.
pub async fn record_voucher_events(pool: &PgPool, voucher_id: Uuid, events: &[VoucherEvent]) -> anyhow::Result<()> {
    use cqrs_es::DomainEvent as _;
    let start: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(sequence), 0) FROM events WHERE aggregate_type = 'Voucher' AND aggregate_id = $1",
    )
    .bind(voucher_id.to_string())
    .fetch_one(pool)
    .await?;
    for (offset, event) in (1..).zip(events) {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('Voucher', $1, $2, $3, $4, $5, '{}')",
        )
        .bind(voucher_id.to_string())
        .bind(start + offset)
        .bind(event.event_type())
        .bind(event.event_version())
        .bind(serde_json::to_value(event)?)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Counts how often each order id occurs.
pub fn occurrences(requests: &[OrderRequested]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for request in requests {
        *counts.entry(request.order_id).or_default() += 1;
    }
    counts
}
