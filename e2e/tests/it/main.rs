//! Tests that drive the whole stack over HTTP: the command API (with the
//! simulated payment provider), the seckill edge, the projection daemon and
//! the query API, each started in-process on an ephemeral port against a
//! fresh database, a NATS namespace and Redis keys of the test's own.
//!
//! [`Stack`] starts and stops the services; [`Stack::seed`] creates a little
//! data through the public API (a merchant's product and vouchers, a
//! customer's coupon, a paid goods order and a pending seckill order) so
//! that the ids in paths exist.

mod chaos;
mod contract;
mod hostile_input;
mod observability;
mod sale;
mod traces;
mod workload;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{Duration as Span, Utc};
use clap::Parser as _;
use platform::http::{JwtKeys, Role};
use serde_json::{Value, json};
use testkit::{Server, TestDb};
use uuid::Uuid;

/// The JWT secret shared by the services and the tests' tokens.
const SECRET: &str = "e2e-jwt-secret";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret";

/// The merchant and the customer the seeded data belongs to.
pub const MERCHANT: &str = "shop-1";
pub const CUSTOMER: &str = "ann";

/// How long seeding waits for the asynchronous parts (saga, projections, warm-up).
const PATIENCE: Duration = Duration::from_secs(20);

/// Every service of the system, running.
pub struct Stack {
    pub db: TestDb,
    pub namespace: events::Namespace,
    pub js: async_nats::jetstream::Context,
    pub commands: Server,
    pub edge: Server,
    pub projections: Server,
    pub query: Server,
    jwt: JwtKeys,
    http: reqwest::Client,
}

/// Ids of what [`Stack::seed`] created.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub product_id: Uuid,
    pub seckill_voucher_id: Uuid,
    pub regular_voucher_id: Uuid,
    pub coupon_id: Uuid,
    /// The customer's goods order, paid (a kitchen ticket of the merchant).
    pub goods_order_id: Uuid,
    /// The goods order's payment.
    pub payment_id: Uuid,
    /// The customer's seckill order, awaiting payment.
    pub seckill_order_id: Uuid,
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        testkit::init_logs();
        let db = TestDb::new().await?;
        let namespace = testkit::unique_namespace();
        let nats_url = testkit::nats_url();
        let redis_url = testkit::redis_url();

        // the simulated provider's checkout URLs and webhooks point at the command API itself
        let commands_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let commands_url = format!("http://{}", commands_listener.local_addr()?);
        let webhook_url = format!("{commands_url}/webhooks/payments");
        let commands_config = commands::Config::try_parse_from([
            "command-api",
            "--database-url",
            &db.url,
            "--redis-url",
            &redis_url,
            "--nats-url",
            &nats_url,
            "--nats-namespace",
            &namespace,
            "--jwt-secret",
            SECRET,
            "--payment-webhook-secret",
            WEBHOOK_SECRET,
            "--payment-provider",
            "simulated",
            "--payment-public-url",
            &commands_url,
            "--payment-webhook-url",
            &webhook_url,
        ])?;
        let commands = Server::start_on(commands_listener, |listener, shutdown| {
            commands::run(commands_config, listener, shutdown)
        })
        .await
        .context("command API")?;

        let prefix = testkit::unique_prefix();
        let edge_config = seckill_edge::Config::try_parse_from([
            "seckill-edge",
            "--database-url",
            &db.url,
            "--redis-url",
            &redis_url,
            "--nats-url",
            &nats_url,
            "--nats-namespace",
            &namespace,
            "--jwt-secret",
            SECRET,
            "--key-prefix",
            &prefix,
        ])?;
        let edge = Server::start(|listener, shutdown| seckill_edge::run(edge_config, listener, shutdown))
            .await
            .context("seckill edge")?;

        let projections_config = projections::Config::try_parse_from([
            "projection-daemon",
            "--database-url",
            &db.url,
            "--nats-url",
            &nats_url,
            "--nats-namespace",
            &namespace,
        ])?;
        let projections = Server::start(|listener, shutdown| projections::run(projections_config, listener, shutdown))
            .await
            .context("projection daemon")?;

        let query_config =
            query_api::Config::try_parse_from(["query-api", "--database-url", &db.url, "--jwt-secret", SECRET])?;
        let query = Server::start(|listener, shutdown| query_api::run(query_config, listener, shutdown))
            .await
            .context("query API")?;

        Ok(Self {
            db,
            namespace: events::Namespace::new(&namespace)?,
            js: cp_nats::jetstream(testkit::nats().await?, 5_000),
            commands,
            edge,
            projections,
            query,
            jwt: JwtKeys::new(&platform::Secret::new(SECRET)),
            http: reqwest::Client::new(),
        })
    }

    /// A token the services accept, valid long enough for a whole run.
    pub fn token(&self, sub: &str, role: Role) -> anyhow::Result<String> {
        Ok(self.jwt.issue(sub, role, Duration::from_secs(3_600))?)
    }

    /// POST `body` (or nothing) to `url` as `sub`; the status and the JSON body.
    async fn post(&self, url: &str, sub: &str, role: Role, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.post(url).bearer_auth(self.token(sub, role)?);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// POST to the command API, expecting `expected`; the named id of the answer.
    async fn command(
        &self,
        path: &str,
        role: Role,
        body: Option<Value>,
        expected: u16,
        id_field: &str,
    ) -> anyhow::Result<Uuid> {
        let sub = if role == Role::Customer { CUSTOMER } else { MERCHANT };
        let (status, answer) = self.post(&self.commands.url(path), sub, role, body).await?;
        anyhow::ensure!(status == expected, "POST {path}: {status} {answer}");
        answer[id_field]
            .as_str()
            .with_context(|| format!("POST {path}: no {id_field} in {answer}"))?
            .parse()
            .with_context(|| format!("POST {path}: {id_field} is not a UUID"))
    }

    /// The query API's document at `path` once `ready` holds for it.
    async fn document(&self, path: &str, role: Role, ready: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let sub = if role == Role::Customer { CUSTOMER } else { MERCHANT };
        let token = self.token(sub, role)?;
        let deadline = Instant::now() + PATIENCE;
        let mut last = Value::Null;
        loop {
            let response = self.http.get(self.query.url(path)).bearer_auth(&token).send().await?;
            let status = response.status();
            last = response.json().await.unwrap_or(last);
            if status == 200 && ready(&last) {
                return Ok(last);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "GET {path}: not ready within {PATIENCE:?}, last seen {status} {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A merchant's product and vouchers, a customer's coupon, a paid goods
    /// order and a seckill order awaiting payment, all visible in the query API.
    pub async fn seed(&self) -> anyhow::Result<Seeded> {
        let now = Utc::now();
        let product_id = self
            .command(
                "/products",
                Role::Merchant,
                Some(json!({"name": "Dumplings", "price_cents": 1_200, "stock": 1_000})),
                201,
                "product_id",
            )
            .await?;
        let seckill_voucher_id = self
            .command(
                "/vouchers",
                Role::Merchant,
                Some(json!({
                    "title": "Hotpot for two", "kind": "seckill", "price_cents": 990, "value_cents": 5_000,
                    "stock": 100, "begins_at": now - Span::minutes(1), "ends_at": now + Span::hours(2),
                })),
                201,
                "voucher_id",
            )
            .await?;
        let regular_voucher_id = self
            .command(
                "/vouchers",
                Role::Merchant,
                Some(json!({
                    "title": "5 off", "kind": "regular", "price_cents": 0, "value_cents": 500,
                    "min_spend_cents": 1_000, "begins_at": now - Span::minutes(1), "ends_at": now + Span::hours(2),
                })),
                201,
                "voucher_id",
            )
            .await?;
        let coupon_id = self
            .command(
                &format!("/vouchers/{regular_voucher_id}/claim"),
                Role::Customer,
                None,
                201,
                "coupon_id",
            )
            .await?;

        // a goods order, reserved by the lifecycle saga, paid through the simulated provider
        let goods_order_id = self
            .command(
                "/orders",
                Role::Customer,
                Some(json!({"items": [{"product_id": product_id, "quantity": 2}]})),
                202,
                "order_id",
            )
            .await?;
        self.document(&format!("/orders/{goods_order_id}"), Role::Customer, |order| {
            order["status"] == "pending_payment"
        })
        .await?;
        let payment_id = self
            .command(
                &format!("/orders/{goods_order_id}/pay"),
                Role::Customer,
                None,
                200,
                "payment_id",
            )
            .await?;
        let (status, delivered) = self
            .post(
                &self.commands.url(&format!("/provider/checkout/{payment_id}")),
                CUSTOMER,
                Role::Customer,
                None,
            )
            .await?;
        anyhow::ensure!(
            status == 200 && delivered["webhook_status"] == 200,
            "checkout: {status} {delivered}"
        );
        self.document(&format!("/orders/{goods_order_id}"), Role::Customer, |order| {
            order["status"] == "paid"
        })
        .await?;

        // a seckill order, once the edge has warmed the sale up
        let attempt = self.edge.url(&format!("/seckill/{seckill_voucher_id}"));
        let deadline = Instant::now() + PATIENCE;
        let seckill_order_id: Uuid = loop {
            let (status, answer) = self.post(&attempt, CUSTOMER, Role::Customer, None).await?;
            match status {
                202 => {
                    break answer["order_id"]
                        .as_str()
                        .with_context(|| format!("seckill attempt: {answer}"))?
                        .parse()?;
                }
                // warming up
                503 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => anyhow::bail!("seckill attempt: {status} {answer}"),
            }
        };
        self.document(&format!("/orders/{seckill_order_id}"), Role::Customer, |order| {
            order["status"] == "pending_payment"
        })
        .await?;

        self.document(&format!("/products/{product_id}"), Role::Customer, |_| true)
            .await?;
        self.document(&format!("/vouchers/{seckill_voucher_id}"), Role::Customer, |_| true)
            .await?;
        self.document(&format!("/vouchers/{regular_voucher_id}"), Role::Customer, |_| true)
            .await?;
        self.document("/users/me/coupons", Role::Customer, |coupons| {
            coupons["items"].as_array().is_some_and(|items| !items.is_empty())
        })
        .await?;
        Ok(Seeded {
            product_id,
            seckill_voucher_id,
            regular_voucher_id,
            coupon_id,
            goods_order_id,
            payment_id,
            seckill_order_id,
        })
    }

    /// Whether everything is quiet: every admitted request decided, every
    /// reaction done, everything stored published and projected.
    pub async fn quiet(&self) -> anyhow::Result<bool> {
        let mut consumers = vec![
            (
                self.namespace.seckill_requests_stream(),
                events::subjects::CLAIM_WRITER_CONSUMER.to_owned(),
            ),
            (
                self.namespace.events_stream("Order"),
                commands::lifecycle::LIFECYCLE_CONSUMER.to_owned(),
            ),
        ];
        for projection in projections::Projection::ALL {
            consumers.push((
                self.namespace.events_stream(projection.aggregate_type()),
                projections::daemon::consumer_name(projection.name()),
            ));
        }
        for (stream, consumer) in consumers {
            let stream = self.js.get_stream(stream).await?;
            let last = stream.get_info().await?.state.last_sequence;
            match stream.consumer_info(&consumer).await {
                Ok(info) if info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= last => {}
                Ok(_) => return Ok(false),
                // a consumer not created yet has nothing to catch up on only
                // while its stream is empty
                Err(_) if last == 0 => {}
                Err(_) => return Ok(false),
            }
        }
        let unpublished: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events e, relay_cursor c
                             WHERE (e.tx_id, e.global_position) > (c.last_tx_id, c.last_position))",
        )
        .fetch_one(&self.db.pool)
        .await?;
        Ok(!unpublished)
    }

    /// Stops every service gracefully, the readers first.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.query.stop().await?;
        self.edge.stop().await?;
        self.projections.stop().await?;
        self.commands.stop().await
    }
}
