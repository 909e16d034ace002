//! API.md "Limits" as properties, through the whole stack: whatever a client
//! sends as a name, title, amount or identity, the command API never answers
//! 5xx, and whatever it accepts the projection daemon applies and the query
//! API serves (never a stored event the projections cannot apply).

use std::sync::OnceLock;

use platform::http::Role;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::Stack;

/// One stack and runtime for every case: the cases only add data.
fn shared() -> &'static (tokio::runtime::Runtime, Stack) {
    static SHARED: OnceLock<(tokio::runtime::Runtime, Stack)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let stack = runtime.block_on(Stack::start()).expect("stack");
        (runtime, stack)
    })
}

/// POST to the command API as `sub`.
fn command(sub: &str, role: Role, path: &str, body: Value) -> Result<(u16, Value), TestCaseError> {
    let (runtime, stack) = shared();
    runtime
        .block_on(stack.post(&stack.commands.url(path), sub, role, Some(body)))
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

/// The query API's document once the projection wrote it (an id the view
/// does not have yet is a 404 at once, so this polls).
fn projected(path: &str) -> Result<(u16, Value), TestCaseError> {
    let (runtime, stack) = shared();
    runtime
        .block_on(async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            loop {
                let response = stack
                    .http
                    .get(stack.query.url(path))
                    .bearer_auth(stack.token("reader", Role::Customer)?)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let body = response.json().await.unwrap_or(Value::Null);
                if status != 404 || std::time::Instant::now() >= deadline {
                    return anyhow::Ok((status, body));
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,250}",
        "[a-z \\x00-\\x1f\\u{200b}\\u{fffd}]{0,10}"
    ]
}

fn any_cents() -> impl Strategy<Value = i64> {
    prop_oneof![any::<i64>(), -2..100_000_000_002_i64, Just(i64::MAX), Just(i64::MIN)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_product_is_refused_with_a_4xx_or_served_as_sent(
        name in any_text(),
        price in any_cents(),
        stock in prop_oneof![any::<i64>(), -1..1_000_002_i64],
    ) {
        let body = json!({"name": name, "price_cents": price, "stock": stock});
        let (status, answer) = command("m-1", Role::Merchant, "/products", body)?;
        prop_assert!((200..500).contains(&status), "{status} {answer}");
        if status == 201 {
            let id = answer["product_id"].as_str().unwrap_or_default().to_owned();
            let (status, doc) = projected(&format!("/products/{id}"))?;
            prop_assert_eq!(status, 200, "{}", doc);
            prop_assert_eq!(doc["name"].as_str(), Some(name.as_str()));
        } else {
            prop_assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
        }
    }

    #[test]
    fn any_voucher_is_refused_with_a_4xx_or_served_as_sent(
        title in any_text(),
        price in any_cents(),
        value in any_cents(),
        min_spend in any_cents(),
        stock in prop_oneof![any::<i64>(), 0..1_000_002_i64],
    ) {
        let body = json!({
            "title": title, "kind": "seckill", "price_cents": price, "value_cents": value,
            "min_spend_cents": min_spend, "stock": stock,
            "begins_at": "2020-01-01T00:00:00Z", "ends_at": "2099-01-01T00:00:00Z"
        });
        let (status, answer) = command("m-1", Role::Merchant, "/vouchers", body)?;
        prop_assert!((200..500).contains(&status), "{status} {answer}");
        if status == 201 {
            let id = answer["voucher_id"].as_str().unwrap_or_default().to_owned();
            let (status, doc) = projected(&format!("/vouchers/{id}"))?;
            prop_assert_eq!(status, 200, "{}", doc);
            prop_assert_eq!(doc["title"].as_str(), Some(title.as_str()));
        }
    }

    #[test]
    fn any_identity_is_refused_with_401_or_served(sub in any_text()) {
        let body = json!({"items": [{"product_id": uuid::Uuid::now_v7(), "quantity": 1}]});
        let (status, answer) = command(&sub, Role::Customer, "/orders", body)?;
        if platform::http::auth::validate_sub(&sub).is_ok() {
            prop_assert_eq!(status, 202, "{}", answer);
        } else {
            prop_assert_eq!(status, 401, "{}", answer);
        }
    }
}
