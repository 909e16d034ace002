//! Scripted sales through the whole system, every part a real server: the
//! command API creates the voucher, its relay publishes it, the edge warms
//! up, admits, forwards; the claim writer decides in the event store.
//! Exactly `stock` orders are placed, each admitted request ends as exactly
//! one order, and Redis losing its data mid-sale changes none of that.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use chrono::{Duration as Span, Utc};
use clap::Parser as _;
use platform::http::{JwtKeys, Role};
use seckill_edge::keys::VoucherKeys;
use serde_json::json;
use testkit::eventually;
use testkit::{RedisServer, Server, TestDb, reqwest};
use uuid::Uuid;

/// Shared by the services this module starts and the tokens it signs.
const SECRET: &str = "sale-jwt-secret";
const WEBHOOK_SECRET: &str = "whsec_sale_test";

struct System {
    db: TestDb,
    redis: RedisServer,
    prefix: String,
    commands: Server,
    edge: Server,
    jwt: JwtKeys,
    http: reqwest::Client,
}

impl System {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with_payment_timeout(900).await
    }

    async fn start_with_payment_timeout(seconds: u64) -> anyhow::Result<Self> {
        let payment_timeout = seconds.to_string();
        let commands_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let commands_url = format!("http://{}", commands_listener.local_addr()?);
        let webhook_url = format!("{commands_url}/webhooks/payments");
        let db = TestDb::new().await?;
        let redis = RedisServer::start().await?;
        let namespace = testkit::unique_namespace();
        let prefix = testkit::unique_prefix();
        let nats_url = testkit::nats_url();
        let commands_config = commands::Config::try_parse_from([
            "command-api",
            "--database-url",
            &db.url,
            "--nats-url",
            &nats_url,
            "--nats-namespace",
            &namespace,
            "--jwt-secret",
            SECRET,
            "--payment-timeout-secs",
            &payment_timeout,
            "--payment-webhook-secret",
            WEBHOOK_SECRET,
            "--payment-public-url",
            &commands_url,
            "--payment-webhook-url",
            &webhook_url,
            "--payment-provider",
            "simulated",
        ])?;
        let commands = Server::start_on(commands_listener, |listener, shutdown| {
            commands::run(commands_config, listener, shutdown)
        })
        .await?;
        let redis_url = redis.url();
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
            "--rate-limit-per-sec",
            "0",
            "--forwarder-claim-idle-ms",
            "1000",
            "--rewarm-drain-timeout-ms",
            "15000",
        ])?;
        let edge = Server::start(|listener, shutdown| seckill_edge::run(edge_config, listener, shutdown)).await?;
        Ok(Self {
            db,
            redis,
            prefix,
            commands,
            edge,
            jwt: JwtKeys::new(&platform::Secret::new(SECRET)),
            http: reqwest::Client::new(),
        })
    }

    fn token(&self, sub: &str, role: Role) -> String {
        self.jwt.issue(sub, role, Duration::from_secs(600)).expect("token")
    }

    async fn create_sale(&self, stock: u32) -> anyhow::Result<Uuid> {
        let now = Utc::now();
        let response = self
            .http
            .post(self.commands.url("/vouchers"))
            .bearer_auth(self.token("shop-1", Role::Merchant))
            .json(&json!({
                "title": "Hotpot for two",
                "kind": "seckill",
                "price_cents": 990,
                "value_cents": 5_000,
                "min_spend_cents": 0,
                "stock": stock,
                "begins_at": now - Span::minutes(1),
                "ends_at": now + Span::hours(1),
            }))
            .send()
            .await?;
        anyhow::ensure!(response.status() == 201, "voucher not created: {}", response.status());
        let body: serde_json::Value = response.json().await?;
        Ok(body["voucher_id"].as_str().unwrap_or_default().parse()?)
    }

    async fn redis(&self) -> anyhow::Result<redis::aio::ConnectionManager> {
        self.redis.connect().await
    }

    async fn meta(&self, voucher: Uuid) -> anyhow::Result<HashMap<String, String>> {
        let keys = VoucherKeys::new(&self.prefix, voucher);
        Ok(redis::cmd("HGETALL")
            .arg(&keys.meta)
            .query_async(&mut self.redis().await?)
            .await?)
    }

    /// One attempt per user, 64 in flight; a `warming_up` answer is retried
    /// as its Retry-After asks (shortened for the test).
    async fn crowd(
        &self,
        voucher: Uuid,
        users: Vec<String>,
    ) -> anyhow::Result<Vec<(String, u16, String, Option<Uuid>)>> {
        let limit = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for user in users {
            let (limit, http) = (limit.clone(), self.http.clone());
            let url = self.edge.url(&format!("/seckill/{voucher}"));
            let token = self.token(&user, Role::Customer);
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await?;
                for _ in 0..200 {
                    let response = http.post(&url).bearer_auth(&token).send().await?;
                    let status = response.status().as_u16();
                    let body: serde_json::Value = response.json().await?;
                    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                    if status == 503 && code == "warming_up" {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    let order = body["order_id"].as_str().and_then(|id| id.parse().ok());
                    return Ok::<_, anyhow::Error>((user, status, code, order));
                }
                anyhow::bail!("{user}: the sale never warmed up")
            });
        }
        let mut answers = Vec::new();
        while let Some(answer) = tasks.join_next().await {
            answers.push(answer??);
        }
        Ok(answers)
    }

    /// Every order in the event store: id → (how it was decided, user).
    async fn orders(&self) -> anyhow::Result<HashMap<Uuid, (String, String)>> {
        e2e::chaos::orders(&self.db.pool).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.edge.stop().await?;
        self.commands.stop().await?;
        drop(self.redis);
        self.db.drop_database().await
    }
}

fn admitted(answers: &[(String, u16, String, Option<Uuid>)]) -> HashMap<Uuid, String> {
    answers
        .iter()
        .filter(|(_, status, _, _)| *status == 202)
        .map(|(user, _, _, order)| (order.expect("admitted with an order id"), user.clone()))
        .collect()
}

/// Each admitted request is exactly one placed order of its user, and
/// nothing else was placed.
fn assert_placed_exactly(orders: &HashMap<Uuid, (String, String)>, admitted: &HashMap<Uuid, String>) {
    let placed: HashMap<Uuid, String> = orders
        .iter()
        .filter(|(_, (event, _))| event == "OrderPlaced")
        .map(|(id, (_, user))| (*id, user.clone()))
        .collect();
    assert_eq!(&placed, admitted);
    let users: HashSet<&String> = placed.values().collect();
    assert_eq!(users.len(), placed.len(), "one order per user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_sale_leaves_exactly_stock_placed_orders() -> anyhow::Result<()> {
    const STOCK: u32 = 300;
    let system = System::start().await?;
    let voucher = system.create_sale(STOCK).await?;
    // warm-up: the creation travels relay → JetStream → edge, no attempt needed
    eventually(Duration::from_secs(15), || async {
        Ok(system.meta(voucher).await?.get("left").map(String::as_str) == Some("300"))
    })
    .await?;

    // 1,200 users, two attempts each, all at once
    let users: Vec<String> = (0..2_400).map(|i| format!("user-{}", i % 1_200)).collect();
    let answers = system.crowd(voucher, users).await?;
    let admitted = admitted(&answers);
    assert_eq!(admitted.len(), STOCK as usize);
    for (user, status, code, _) in &answers {
        assert!(
            *status == 202 || (*status == 409 && (code == "sold_out" || code == "already_purchased")),
            "{user}: {status} {code}"
        );
    }

    eventually(Duration::from_secs(30), || async {
        Ok(system.orders().await?.len() >= admitted.len())
    })
    .await?;
    let orders = system.orders().await?;
    assert_eq!(
        orders.len(),
        admitted.len(),
        "every admitted request is one order, nothing more"
    );
    assert_placed_exactly(&orders, &admitted);
    assert_eq!(system.meta(voucher).await?.get("left").map(String::as_str), Some("0"));
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_losing_its_data_mid_sale_is_rewarmed_from_the_event_store() -> anyhow::Result<()> {
    const STOCK: u32 = 200;
    let system = System::start().await?;
    let voucher = system.create_sale(STOCK).await?;
    let keys = VoucherKeys::new(&system.prefix, voucher);

    let first: Vec<String> = (0..100).map(|i| format!("early-{i}")).collect();
    let early = admitted(&system.crowd(voucher, first.clone()).await?);
    assert_eq!(early.len(), 100);
    // forwarded, but maybe not yet decided by the claim writer
    eventually(Duration::from_secs(15), || async {
        let length: u64 = redis::cmd("XLEN")
            .arg(&keys.stream)
            .query_async(&mut system.redis().await?)
            .await?;
        Ok(length == 0)
    })
    .await?;
    // ... and decided: the event store, which the gate is rebuilt from, has
    // every early buyer (a request still in flight is not the rewarm's to know)
    eventually(Duration::from_secs(30), || async {
        Ok(system.orders().await?.len() >= early.len())
    })
    .await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut system.redis().await?).await?;

    // the early buyers come back (before anyone could sell the sale out,
    // which would answer sold_out to everyone), then 400 newcomers
    let again = system.crowd(voucher, first.clone()).await?;
    for (user, status, code, _) in &again {
        assert_eq!(
            (*status, code.as_str()),
            (409, "already_purchased"),
            "{user}: the rebuilt gate knows the early buyers"
        );
    }
    let answers = system
        .crowd(voucher, (0..400).map(|i| format!("late-{i}")).collect())
        .await?;
    let late = admitted(&answers);
    assert_eq!(
        late.len(),
        100,
        "the rebuilt gate offers exactly what the store has left"
    );

    let mut all = early;
    all.extend(late);
    eventually(Duration::from_secs(30), || async {
        Ok(system.orders().await?.len() >= all.len())
    })
    .await?;
    let orders = system.orders().await?;
    assert_eq!(orders.len(), all.len());
    assert_placed_exactly(&orders, &all);
    // admitted + remaining == stock
    let left: i64 = system.meta(voucher).await?.get("left").map_or(Ok(-1), |v| v.parse())?;
    assert_eq!(left + i64::try_from(all.len())?, i64::from(STOCK));
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_callers_trace_reaches_jetstream_and_the_event_store() -> anyhow::Result<()> {
    let telemetry = seckill_edge::Config::try_parse_from(["seckill-edge", "--jwt-secret", "s"])?.telemetry;
    let _telemetry = platform::telemetry::init("sale-test", &telemetry)?;
    let system = System::start().await?;
    let voucher = system.create_sale(5).await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = system
        .http
        .post(system.edge.url(&format!("/seckill/{voucher}")))
        .bearer_auth(system.token("ann", Role::Customer))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    assert_eq!(status, 202, "{body}");
    let order_id = body["order_id"].as_str().unwrap_or_default().to_owned();

    eventually(Duration::from_secs(15), || async {
        Ok(!system.orders().await?.is_empty())
    })
    .await?;
    let metadata: serde_json::Value = sqlx::query_scalar(
        "SELECT metadata FROM events WHERE aggregate_type = 'Order' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(&order_id)
    .fetch_one(&system.db.pool)
    .await?;
    let traceparent = metadata["traceparent"].as_str().unwrap_or_default();
    assert!(
        traceparent.contains(trace_id),
        "the order's event carries the caller's trace, got {metadata}"
    );
    assert_eq!(metadata["correlation_id"].as_str(), Some(order_id.as_str()));
    system.stop().await
}

/// Events of one aggregate, in order: (event type, payload).
/// An aggregate's event types in order, checking that its sequence has no gap.
async fn history(pool: &sqlx::PgPool, aggregate_type: &str, id: &str) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT sequence, event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id)
    .fetch_all(pool)
    .await?;
    let sequences: Vec<i64> = rows.iter().map(|(sequence, _)| *sequence).collect();
    let expected: Vec<i64> = (1..=i64::try_from(rows.len())?).collect();
    anyhow::ensure!(
        sequences == expected,
        "{aggregate_type} {id} has a gap in its sequence: {sequences:?}"
    );
    Ok(rows.into_iter().map(|(_, event_type)| event_type).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unpaid_order_times_out_and_its_unit_goes_back_to_the_sale() -> anyhow::Result<()> {
    let system = System::start_with_payment_timeout(1).await?;
    let voucher = system.create_sale(1).await?;
    let answers = system.crowd(voucher, vec!["ann".to_owned()]).await?;
    let anns = admitted(&answers).into_keys().next().expect("ann admitted");
    let bob = system.crowd(voucher, vec!["bob".to_owned()]).await?;
    assert_eq!(bob[0].2, "sold_out");

    // nobody pays: the deadline fires, the voucher takes the unit back, the edge re-credits Redis
    eventually(Duration::from_secs(20), || async {
        Ok(history(&system.db.pool, "Order", &anns.to_string())
            .await?
            .contains(&"OrderTimedOut".to_owned()))
    })
    .await?;
    eventually(Duration::from_secs(20), || async {
        Ok(system.meta(voucher).await?.get("left").map(String::as_str) == Some("1"))
    })
    .await?;
    let voucher_events = history(&system.db.pool, "Voucher", &voucher.to_string()).await?;
    assert_eq!(
        voucher_events.iter().filter(|e| *e == "SeckillStockReleased").count(),
        1
    );

    // another user buys the unit; ann keeps her mark
    let answers = system.crowd(voucher, vec!["bob".to_owned(), "ann".to_owned()]).await?;
    let by_user: HashMap<&str, (u16, &str)> = answers
        .iter()
        .map(|(u, s, c, _)| (u.as_str(), (*s, c.as_str())))
        .collect();
    assert_eq!(by_user["bob"].0, 202);
    assert_eq!(by_user["ann"], (409, "already_purchased"));
    let bobs = admitted(&answers).into_keys().next().expect("bob admitted");
    eventually(Duration::from_secs(20), || async {
        Ok(history(&system.db.pool, "Order", &bobs.to_string())
            .await?
            .first()
            .map(String::as_str)
            == Some("OrderPlaced"))
    })
    .await?;
    system.stop().await
}

impl System {
    async fn post(&self, url: &str, token: Option<&str>) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut request = self.http.post(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(serde_json::Value::Null)))
    }

    /// One admitted, placed order of `user`.
    async fn placed_order(&self, voucher: Uuid, user: &str) -> anyhow::Result<Uuid> {
        let answers = self.crowd(voucher, vec![user.to_owned()]).await?;
        let order = admitted(&answers).into_keys().next().context("admitted")?;
        eventually(Duration::from_secs(15), || async {
            Ok(history(&self.db.pool, "Order", &order.to_string())
                .await?
                .first()
                .map(String::as_str)
                == Some("OrderPlaced"))
        })
        .await?;
        Ok(order)
    }

    /// `POST /orders/{id}/pay`: (payment id, amount, checkout URL).
    async fn pay(&self, order: Uuid, user: &str) -> anyhow::Result<(Uuid, i64, String)> {
        let token = self.token(user, Role::Customer);
        let (status, body) = self
            .post(&self.commands.url(&format!("/orders/{order}/pay")), Some(&token))
            .await?;
        anyhow::ensure!(status == 200, "pay answered {status}: {body}");
        Ok((
            body["payment_id"].as_str().context("payment_id")?.parse()?,
            body["amount_cents"].as_i64().context("amount")?,
            body["checkout_url"].as_str().context("checkout_url")?.to_owned(),
        ))
    }

    /// Delivers a webhook as the provider would, signed at `signed_at`.
    async fn webhook(&self, body: &serde_json::Value, signed_at: i64, secret: &str) -> anyhow::Result<u16> {
        let raw = serde_json::to_vec(body)?;
        let header = commands::payments::signature::sign(secret.as_bytes(), signed_at, &raw);
        let response = self
            .http
            .post(self.commands.url("/webhooks/payments"))
            .header("payment-signature", header)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await?;
        Ok(response.status().as_u16())
    }

    async fn count_events(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.db.pool)
            .await?)
    }

    /// Events of the aggregates a webhook writes (the reactors write others
    /// meanwhile, e.g. the coupon of a paid order).
    async fn count_payment_events(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type IN ('Payment', 'Order')")
                .fetch_one(&self.db.pool)
                .await?,
        )
    }
}

fn succeeded(id: &str, payment: Uuid, order: Uuid, amount: i64) -> serde_json::Value {
    json!({"id": id, "type": "payment.succeeded", "payment_id": payment, "order_id": order, "amount_cents": amount})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seckill_order_paid_through_the_simulated_provider_issues_its_coupon() -> anyhow::Result<()> {
    let system = System::start().await?;
    let voucher = system.create_sale(5).await?;
    let order = system.placed_order(voucher, "ann").await?;
    let (payment, amount, checkout_url) = system.pay(order, "ann").await?;
    assert_eq!(amount, 990);
    // a retried "pay" gets the same payment
    assert_eq!(system.pay(order, "ann").await?.0, payment);
    // someone else cannot pay ann's order
    let (status, _) = system
        .post(
            &system.commands.url(&format!("/orders/{order}/pay")),
            Some(&system.token("bob", Role::Customer)),
        )
        .await?;
    assert_eq!(status, 404);

    // the simulated checkout is the order's customer's only
    let (status, _) = system.post(&checkout_url, None).await?;
    assert_eq!(status, 401);
    let (status, _) = system
        .post(&checkout_url, Some(&system.token("bob", Role::Customer)))
        .await?;
    assert_eq!(status, 404);
    let (status, _) = system
        .post(&checkout_url, Some(&system.token("shop-1", Role::Merchant)))
        .await?;
    assert_eq!(status, 403);
    assert_eq!(
        history(&system.db.pool, "Payment", &payment.to_string()).await?,
        ["PaymentCreated"]
    );
    // the customer completes the checkout: the provider calls the signed webhook
    let (status, delivered) = system
        .post(&checkout_url, Some(&system.token("ann", Role::Customer)))
        .await?;
    assert_eq!(
        (status, delivered["webhook_status"].as_u64()),
        (200, Some(200)),
        "{delivered}"
    );
    let order_events = history(&system.db.pool, "Order", &order.to_string()).await?;
    assert_eq!(order_events, ["OrderPlaced", "OrderPaymentStarted", "OrderPaid"]);
    assert_eq!(
        history(&system.db.pool, "Payment", &payment.to_string()).await?,
        ["PaymentCreated", "PaymentSucceeded"]
    );

    let coupon = commands::lifecycle::coupon_id_for(order);
    eventually(Duration::from_secs(15), || async {
        Ok(history(&system.db.pool, "Coupon", &coupon.to_string()).await? == ["CouponIssued"])
    })
    .await?;
    let payload: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM events WHERE aggregate_type = 'Coupon' AND aggregate_id = $1")
            .bind(coupon.to_string())
            .fetch_one(&system.db.pool)
            .await?;
    assert_eq!(payload["CouponIssued"]["user_id"], "ann");
    assert_eq!(
        payload["CouponIssued"]["merchant_id"], "shop-1",
        "the voucher's merchant"
    );
    assert_eq!(payload["CouponIssued"]["value_cents"], 5_000);
    system.stop().await
}

fn failed(id: &str, payment: Uuid, order: Uuid, amount: i64) -> serde_json::Value {
    json!({"id": id, "type": "payment.failed", "payment_id": payment, "order_id": order, "amount_cents": amount})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_success_after_a_failure_is_recorded_then_refunded_and_a_cancelled_order_cannot_be_paid() -> anyhow::Result<()>
{
    let system = System::start().await?;
    let voucher = system.create_sale(5).await?;
    let order = system.placed_order(voucher, "ann").await?;
    let (payment, amount, _) = system.pay(order, "ann").await?;
    let now = Utc::now().timestamp();
    // declined: the order is cancelled
    assert_eq!(
        system
            .webhook(&failed("evt_f", payment, order, amount), now, WEBHOOK_SECRET)
            .await?,
        200
    );
    // paying a cancelled order is refused, although it had a payment session
    let (status, body) = system
        .post(
            &system.commands.url(&format!("/orders/{order}/pay")),
            Some(&system.token("ann", Role::Customer)),
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("order_cancelled")),
        "{body}"
    );
    // the provider then reports the money arrived after all: recorded, then refunded
    assert_eq!(
        system
            .webhook(&succeeded("evt_s", payment, order, amount), now, WEBHOOK_SECRET)
            .await?,
        200
    );
    assert_eq!(
        history(&system.db.pool, "Payment", &payment.to_string()).await?,
        ["PaymentCreated", "PaymentFailed", "PaymentSucceeded", "PaymentRefunded"]
    );
    assert_eq!(
        history(&system.db.pool, "Order", &order.to_string()).await?,
        ["OrderPlaced", "OrderPaymentStarted", "OrderCancelled", "OrderRefunded"]
    );
    // delivered again: nothing more
    let before = system.count_payment_events().await?;
    assert_eq!(
        system
            .webhook(&succeeded("evt_s", payment, order, amount), now, WEBHOOK_SECRET)
            .await?,
        200
    );
    assert_eq!(system.count_payment_events().await?, before);
    system.stop().await
}

/// The money that came in after a timeout is recorded before it goes back:
/// `PaymentSucceeded` then `PaymentRefunded`, sequences 1, 2, 3 (the store
/// once accepted 1 and 3 with no 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_after_the_timeout_is_recorded_then_refunded_with_no_gap() -> anyhow::Result<()> {
    let system = System::start_with_payment_timeout(1).await?;
    let voucher = system.create_sale(5).await?;
    let order = system.placed_order(voucher, "ann").await?;
    let (payment, amount, _) = system.pay(order, "ann").await?;
    eventually(Duration::from_secs(20), || async {
        Ok(history(&system.db.pool, "Order", &order.to_string())
            .await?
            .contains(&"OrderTimedOut".to_owned()))
    })
    .await?;
    let now = Utc::now().timestamp();
    assert_eq!(
        system
            .webhook(&succeeded("evt_late", payment, order, amount), now, WEBHOOK_SECRET)
            .await?,
        200
    );
    assert_eq!(
        history(&system.db.pool, "Payment", &payment.to_string()).await?,
        ["PaymentCreated", "PaymentSucceeded", "PaymentRefunded"]
    );
    assert_eq!(
        history(&system.db.pool, "Order", &order.to_string()).await?,
        ["OrderPlaced", "OrderPaymentStarted", "OrderTimedOut", "OrderRefunded"]
    );
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_delivered_twice_is_one_payment_and_forged_or_stale_ones_record_nothing() -> anyhow::Result<()> {
    let system = System::start().await?;
    let voucher = system.create_sale(5).await?;
    let order = system.placed_order(voucher, "ann").await?;
    let (payment, amount, _) = system.pay(order, "ann").await?;
    let now = Utc::now().timestamp();

    let before = system.count_events().await?;
    let body = succeeded("evt_1", payment, order, amount);
    for (signed_at, secret) in [
        (now, "not-the-secret"),
        (now - 301, WEBHOOK_SECRET),
        (now + 301, WEBHOOK_SECRET),
    ] {
        assert_eq!(system.webhook(&body, signed_at, secret).await?, 400);
    }
    let unsigned = system
        .http
        .post(system.commands.url("/webhooks/payments"))
        .json(&body)
        .send()
        .await?;
    assert_eq!(unsigned.status(), 400);
    let tampered = succeeded("evt_1", payment, order, amount - 1);
    assert_eq!(
        system.webhook(&tampered, now, WEBHOOK_SECRET).await?,
        400,
        "not this payment's amount"
    );
    assert_eq!(system.count_events().await?, before, "nothing recorded");

    assert_eq!(system.webhook(&body, now, WEBHOOK_SECRET).await?, 200);
    let after_first = system.count_payment_events().await?;
    assert_eq!(system.webhook(&body, now, WEBHOOK_SECRET).await?, 200);
    assert_eq!(
        system.count_payment_events().await?,
        after_first,
        "the same webhook again changes nothing"
    );
    assert_eq!(
        history(&system.db.pool, "Payment", &payment.to_string()).await?,
        ["PaymentCreated", "PaymentSucceeded"]
    );
    let paid = history(&system.db.pool, "Order", &order.to_string()).await?;
    assert_eq!(paid.iter().filter(|e| *e == "OrderPaid").count(), 1);
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_racing_the_timeout_end_with_exactly_one_outcome_each() -> anyhow::Result<()> {
    let system = System::start_with_payment_timeout(1).await?;
    let voucher = system.create_sale(20).await?;
    let mut orders = Vec::new();
    for i in 0..6 {
        let user = format!("racer-{i}");
        let order = system.placed_order(voucher, &user).await?;
        let (payment, amount, _) = system.pay(order, &user).await?;
        orders.push((order, payment, amount));
    }
    // the webhooks arrive around the deadlines, some before, some after
    let mut deliveries = Vec::new();
    let system_ref = &system;
    for (i, (order, payment, amount)) in orders.iter().enumerate() {
        let wait = Duration::from_millis(200 * i as u64);
        let body = succeeded(&format!("evt_race_{i}"), *payment, *order, *amount);
        deliveries.push(async move {
            tokio::time::sleep(wait).await;
            system_ref.webhook(&body, Utc::now().timestamp(), WEBHOOK_SECRET).await
        });
    }
    for status in futures::future::join_all(deliveries).await {
        assert_eq!(status?, 200);
    }
    eventually(Duration::from_secs(20), || async {
        for (order, ..) in &orders {
            let events = history(&system.db.pool, "Order", &order.to_string()).await?;
            if !events.iter().any(|e| e == "OrderPaid" || e == "OrderTimedOut") {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut refunded = 0;
    for (order, payment, _) in &orders {
        let events = history(&system.db.pool, "Order", &order.to_string()).await?;
        let paid = events.iter().any(|e| e == "OrderPaid");
        let timed_out = events.iter().any(|e| e == "OrderTimedOut");
        assert!(paid != timed_out, "exactly one outcome for {order}: {events:?}");
        let payment_events = history(&system.db.pool, "Payment", &payment.to_string()).await?;
        if timed_out {
            // the money came back, recorded on both sides, once
            refunded += 1;
            assert_eq!(events.iter().filter(|e| *e == "OrderRefunded").count(), 1, "{events:?}");
            assert_eq!(
                payment_events,
                ["PaymentCreated", "PaymentSucceeded", "PaymentRefunded"]
            );
        } else {
            assert!(!events.iter().any(|e| e == "OrderRefunded"));
            assert_eq!(payment_events, ["PaymentCreated", "PaymentSucceeded"]);
        }
    }
    // units held = orders paid; released = orders timed out
    let voucher_events = history(&system.db.pool, "Voucher", &voucher.to_string()).await?;
    eventually(Duration::from_secs(15), || async {
        let events = history(&system.db.pool, "Voucher", &voucher.to_string()).await?;
        Ok(events.iter().filter(|e| *e == "SeckillStockReleased").count() == refunded)
    })
    .await?;
    assert_eq!(
        voucher_events.iter().filter(|e| *e == "SeckillClaimAccepted").count(),
        orders.len()
    );
    system.stop().await
}

impl System {
    async fn post_json(
        &self,
        path: &str,
        sub: &str,
        role: Role,
        body: serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = self
            .http
            .post(self.commands.url(path))
            .bearer_auth(self.token(sub, role))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(serde_json::Value::Null)))
    }

    async fn create_product(&self, name: &str, price_cents: i64, stock: u32) -> anyhow::Result<Uuid> {
        let body = json!({"name": name, "price_cents": price_cents, "stock": stock});
        let (status, body) = self.post_json("/products", "shop-1", Role::Merchant, body).await?;
        anyhow::ensure!(status == 201, "product not created: {status} {body}");
        Ok(body["product_id"].as_str().context("product_id")?.parse()?)
    }

    /// Submits a goods order and waits until the saga decided it; returns
    /// the order id and its deciding event's payload.
    async fn goods_order(
        &self,
        user: &str,
        items: &[(Uuid, u32)],
        coupon: Option<Uuid>,
    ) -> anyhow::Result<(Uuid, String, serde_json::Value)> {
        let items: Vec<serde_json::Value> = items
            .iter()
            .map(|(product, quantity)| json!({"product_id": product, "quantity": quantity}))
            .collect();
        let body = json!({"items": items, "coupon_id": coupon});
        let (status, body) = self.post_json("/orders", user, Role::Customer, body).await?;
        anyhow::ensure!(status == 202, "order not accepted: {status} {body}");
        let order: Uuid = body["order_id"].as_str().context("order_id")?.parse()?;
        eventually(Duration::from_secs(15), || async {
            Ok(history(&self.db.pool, "Order", &order.to_string()).await?.len() >= 2)
        })
        .await?;
        let (event_type, payload): (String, serde_json::Value) = sqlx::query_as(
            "SELECT event_type, payload FROM events WHERE aggregate_type = 'Order' AND aggregate_id = $1 AND sequence = 2",
        )
        .bind(order.to_string())
        .fetch_one(&self.db.pool)
        .await?;
        let payload = payload[&event_type].clone();
        Ok((order, event_type, payload))
    }

    /// Pays an order through the simulated provider.
    async fn pay_and_check_out(&self, order: Uuid, user: &str) -> anyhow::Result<()> {
        let (_, _, checkout_url) = self.pay(order, user).await?;
        let token = self.token(user, Role::Customer);
        let (status, delivered) = self.post(&checkout_url, Some(&token)).await?;
        anyhow::ensure!(
            status == 200 && delivered["webhook_status"] == 200,
            "checkout failed: {delivered}"
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seckill_coupon_is_spent_on_a_goods_order_and_redeemed_when_it_is_paid() -> anyhow::Result<()> {
    let system = System::start().await?;
    let voucher = system.create_sale(5).await?;
    let seckill_order = system.placed_order(voucher, "ann").await?;
    system.pay_and_check_out(seckill_order, "ann").await?;
    let coupon = commands::lifecycle::coupon_id_for(seckill_order);
    eventually(Duration::from_secs(15), || async {
        Ok(!history(&system.db.pool, "Coupon", &coupon.to_string())
            .await?
            .is_empty())
    })
    .await?;

    let dumplings = system.create_product("Dumplings", 3_000, 10).await?;
    let tea = system.create_product("Jasmine tea", 1_000, 10).await?;
    let (order, decided, placed) = system
        .goods_order("ann", &[(dumplings, 2), (tea, 1)], Some(coupon))
        .await?;
    assert_eq!(decided, "OrderPlaced", "{placed}");
    assert_eq!(
        (
            placed["subtotal_cents"].as_i64(),
            placed["discount_cents"].as_i64(),
            placed["total_cents"].as_i64()
        ),
        (Some(7_000), Some(5_000), Some(2_000))
    );
    assert_eq!(
        history(&system.db.pool, "Coupon", &coupon.to_string()).await?,
        ["CouponIssued", "CouponReserved"]
    );

    system.pay_and_check_out(order, "ann").await?;
    eventually(Duration::from_secs(15), || async {
        Ok(history(&system.db.pool, "Coupon", &coupon.to_string()).await?
            == ["CouponIssued", "CouponReserved", "CouponRedeemed"])
    })
    .await?;
    for product in [dumplings, tea] {
        assert_eq!(
            history(&system.db.pool, "Product", &product.to_string()).await?,
            ["ProductCreated", "ProductStockReserved"]
        );
    }
    system.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_goods_order_short_of_stock_is_rejected_holding_nothing_and_a_cancel_releases_what_it_holds()
-> anyhow::Result<()> {
    let system = System::start().await?;
    let now = Utc::now();
    let body = json!({
        "title": "5 off 10", "kind": "regular", "price_cents": 0, "value_cents": 500, "min_spend_cents": 1_000,
        "begins_at": now - Span::minutes(1), "ends_at": now + Span::hours(1),
    });
    let (status, created) = system.post_json("/vouchers", "shop-1", Role::Merchant, body).await?;
    assert_eq!(status, 201, "{created}");
    let voucher = created["voucher_id"].as_str().context("voucher_id")?;
    let (status, claimed) = system
        .post(
            &system.commands.url(&format!("/vouchers/{voucher}/claim")),
            Some(&system.token("ann", Role::Customer)),
        )
        .await?;
    assert_eq!(status, 201, "{claimed}");
    let coupon: Uuid = claimed["coupon_id"].as_str().context("coupon_id")?.parse()?;
    let plenty = system.create_product("Noodles", 2_000, 5).await?;
    let scarce = system.create_product("Truffle", 1_000, 1).await?;

    let (order, decided, rejected) = system
        .goods_order("ann", &[(plenty, 2), (scarce, 3)], Some(coupon))
        .await?;
    assert_eq!(decided, "OrderRejected", "{rejected}");
    assert_eq!(rejected["reason"]["code"], "out_of_stock");
    assert_eq!(rejected["reason"]["product_id"], scarce.to_string());
    // decided in one append: refused, the order held nothing at any moment,
    // so nothing had to be given back
    assert_eq!(
        history(&system.db.pool, "Coupon", &coupon.to_string()).await?,
        ["CouponIssued"]
    );
    assert_eq!(
        history(&system.db.pool, "Product", &plenty.to_string()).await?,
        ["ProductCreated"]
    );
    assert_eq!(
        history(&system.db.pool, "Product", &scarce.to_string()).await?,
        ["ProductCreated"]
    );

    // the coupon is available again; a smaller order gets it
    let (second, decided, _) = system.goods_order("ann", &[(plenty, 1)], Some(coupon)).await?;
    assert_eq!(decided, "OrderPlaced");
    // cancelling a placed goods order gives back its stock and coupon
    let (status, _) = system
        .post(
            &system.commands.url(&format!("/orders/{second}/cancel")),
            Some(&system.token("ann", Role::Customer)),
        )
        .await?;
    assert_eq!(status, 200);
    eventually(Duration::from_secs(15), || async {
        Ok(history(&system.db.pool, "Coupon", &coupon.to_string())
            .await?
            .last()
            .map(String::as_str)
            == Some("CouponReleased")
            && history(&system.db.pool, "Product", &plenty.to_string()).await?
                == ["ProductCreated", "ProductStockReserved", "ProductStockReleased"])
    })
    .await?;
    assert_ne!(order, second);
    system.stop().await
}
