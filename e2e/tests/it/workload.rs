//! After a randomized workload through the command API (relay, claim writer,
//! lifecycle reactor and projection daemon all running), every live view
//! equals a replay from scratch, document by document.

use std::time::Duration;

use crate::Stack;
use chrono::{Duration as Span, Utc};
use cp_nats::{Outgoing, Publisher};
use events::OrderRequested;
use platform::http::{JwtKeys, Role};
use projections::{
    Projection,
    replay::{ReplayOptions, Silent},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::reqwest;
use uuid::Uuid;

struct Api {
    http: reqwest::Client,
    base: String,
    jwt: JwtKeys,
}

impl Api {
    async fn post(&self, path: &str, sub: &str, role: Role, body: Value) -> anyhow::Result<(u16, Value)> {
        let token = self.jwt.issue(sub, role, Duration::from_secs(600))?;
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

fn id_of(body: &Value, field: &str) -> Option<String> {
    body[field].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_view_equals_a_replay_from_scratch_after_a_random_workload() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: stack.commands.url(""),
        jwt: JwtKeys::new(&platform::Secret::new(crate::SECRET)),
    };
    let seed: u64 = rand::random();
    eprintln!("workload seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let users: Vec<String> = (0..15).map(|i| format!("user-{i}")).collect();
    let now = Utc::now();

    let mut products = Vec::new();
    for i in 0..6 {
        let body = json!({"name": format!("Dish {i}"), "price_cents": rng.random_range(100..5_000), "stock": rng.random_range(1..40)});
        let (status, body) = api.post("/products", "shop-1", Role::Merchant, body).await?;
        assert_eq!(status, 201, "{body}");
        products.extend(id_of(&body, "product_id"));
    }
    let mut regular = Vec::new();
    let mut seckill = Vec::new();
    for i in 0..5 {
        let kind = if i < 3 { "regular" } else { "seckill" };
        let mut body = json!({
            "title": format!("Voucher {i}"), "kind": kind, "price_cents": 500, "value_cents": 1_000,
            "min_spend_cents": rng.random_range(0..3_000),
            "begins_at": now - Span::minutes(5), "ends_at": now + Span::hours(1),
        });
        if kind == "seckill" {
            body["stock"] = json!(rng.random_range(3..12));
        }
        let (status, body) = api.post("/vouchers", "shop-1", Role::Merchant, body).await?;
        assert_eq!(status, 201, "{body}");
        let id = id_of(&body, "voucher_id").expect("voucher id");
        if kind == "regular" {
            regular.push(id)
        } else {
            seckill.push(id)
        }
    }

    let publisher = Publisher::new(stack.js.clone(), 64);
    let mut orders: Vec<(String, String)> = Vec::new();
    for _ in 0..150 {
        let user = users.choose(&mut rng).expect("users").clone();
        match rng.random_range(0..6) {
            0 => {
                let product = products.choose(&mut rng).expect("products");
                let body = json!({"quantity": rng.random_range(1..10)});
                api.post(&format!("/products/{product}/restock"), "shop-1", Role::Merchant, body)
                    .await?;
            }
            1 => {
                let voucher = regular.choose(&mut rng).expect("vouchers");
                api.post(
                    &format!("/vouchers/{voucher}/claim"),
                    &user,
                    Role::Customer,
                    Value::Null,
                )
                .await?;
            }
            2 | 3 => {
                // a seckill attempt the edge admitted, straight to the claim writer
                let voucher: Uuid = seckill.choose(&mut rng).expect("vouchers").parse()?;
                let request = OrderRequested {
                    order_id: Uuid::now_v7(),
                    voucher_id: voucher,
                    user_id: user.clone(),
                    requested_at: Utc::now(),
                };
                orders.push((request.order_id.to_string(), user.clone()));
                let message = Outgoing::new(
                    stack.namespace.seckill_requests_subject(),
                    request.order_id.to_string(),
                    serde_json::to_vec(&request)?,
                );
                publisher.publish(message).await?;
            }
            4 => {
                let items: Vec<Value> = products
                    .choose_multiple(&mut rng, 2)
                    .map(|p| json!({"product_id": p, "quantity": 1}))
                    .collect();
                let (status, body) = api
                    .post(
                        "/orders",
                        &user,
                        Role::Customer,
                        json!({"items": items, "coupon_id": null}),
                    )
                    .await?;
                if status == 202 {
                    orders.extend(id_of(&body, "order_id").map(|id| (id, user.clone())));
                }
            }
            _ => {
                if let Some((order, owner)) = orders.choose(&mut rng).cloned() {
                    api.post(&format!("/orders/{order}/cancel"), &owner, Role::Customer, Value::Null)
                        .await?;
                }
            }
        }
    }

    // quiet: every admitted request decided, every reaction done, everything
    // stored published and projected, all at once
    eventually(Duration::from_secs(60), || stack.quiet()).await?;
    let placed: i64 = sqlx::query_scalar("SELECT count(*) FROM order_view")
        .fetch_one(&stack.db.pool)
        .await?;
    assert!(placed > 0, "the workload made orders");

    for projection in Projection::ALL {
        let options = ReplayOptions {
            batch: 13,
            dry_run: true,
            // a small cache: documents are written and read back mid-scan
            document_cache: 16,
        };
        let report = projection.replay(&stack.db.pool, &options, &mut Silent).await?;
        let differences = report.differences.expect("compared");
        assert!(differences.is_empty(), "{projection} (seed {seed}): {differences:?}");
        assert_eq!(report.dead_letters, 0, "{projection}");
    }
    stack.stop().await
}
