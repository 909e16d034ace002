//! One trace from a request to its order, across every service: an OTLP/HTTP
//! receiver speaking the real protocol (the opentelemetry-proto messages)
//! collects the spans the stack exports while a seckill attempt and a goods
//! order go through, each sent with a known `traceparent`. Every stage's
//! span must belong to that trace, as a child (same trace id) or, for a
//! batch with several parents, through a link to it.
//!
//! The services run in this test's process (one test per process under
//! nextest), so the trace exporter installed first is theirs.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use platform::{
    config::{LogFormat, TelemetryConfig},
    http::Role,
};
use prost::Message as _;
use serde_json::{Value, json};

use crate::{CUSTOMER, Stack};

/// Spans as an OTLP collector receives them.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

impl Collector {
    async fn start(&self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new().route("/v1/traces", post(export)).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(url)
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().map(|spans| spans.clone()).unwrap_or_default()
    }
}

async fn export(State(collector): State<Collector>, body: Bytes) -> impl IntoResponse {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let spans = request
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            if let Ok(mut held) = collector.0.lock() {
                held.extend(spans);
            }
            (
                StatusCode::OK,
                [("content-type", "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(error) => (
            StatusCode::BAD_REQUEST,
            [("content-type", "text/plain")],
            error.to_string().into_bytes(),
        ),
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How `span` joins the trace `trace_id`: "child" (same trace), "link", or neither.
fn joins(span: &Span, trace_id: &str) -> Option<&'static str> {
    if hex(&span.trace_id) == trace_id {
        Some("child")
    } else if span.links.iter().any(|link| hex(&link.trace_id) == trace_id) {
        Some("link")
    } else {
        None
    }
}

/// Asserts the trace holds a span named `name` (and with `consumer`, that
/// consumer attribute) joined to it; its relation.
fn stage(spans: &[Span], trace_id: &str, name: &str, consumer: Option<&str>) -> anyhow::Result<&'static str> {
    spans
        .iter()
        .filter(|span| span.name.starts_with(name))
        .filter(|span| consumer.is_none_or(|c| attribute(span, "consumer").as_deref() == Some(c)))
        .find_map(|span| joins(span, trace_id))
        .ok_or_else(|| {
            let seen: Vec<String> = spans
                .iter()
                .filter(|s| joins(s, trace_id).is_some())
                .map(|s| format!("{} {:?}", s.name, attribute(s, "consumer")))
                .collect();
            anyhow::anyhow!("no {name} {consumer:?} span in trace {trace_id}; the trace has {seen:?}")
        })
}

/// GETs `path` from the query API as `user` until `ready` holds.
async fn visible(stack: &Stack, path: &str, user: &str, ready: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let token = stack.token(user, Role::Customer)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = stack.http.get(stack.query.url(path)).bearer_auth(&token).send().await?;
        if response.status() == 200 {
            let body: Value = response.json().await?;
            if ready(&body) {
                return Ok(body);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{path} not ready for {user}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seckill_attempt_and_a_goods_order_are_each_one_trace_through_every_service() -> anyhow::Result<()> {
    let collector = Collector::default();
    let endpoint = collector.start().await?;
    // before the stack: the first telemetry of a process is the one installed
    let telemetry = platform::telemetry::init(
        "citypicks-e2e",
        &TelemetryConfig {
            log_format: LogFormat::Text,
            otlp_endpoint: Some(endpoint),
            service_name: None,
            trace_sample_ratio: 1.0,
        },
    )?;
    let stack = Stack::start().await?;
    let seeded = stack.seed().await?;

    // a seckill attempt from a client that started trace T1
    let (seckill_trace, seckill_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = stack
        .http
        .post(stack.edge.url(&format!("/seckill/{}", seeded.seckill_voucher_id)))
        .bearer_auth(stack.token("tracer", Role::Customer)?)
        .header("traceparent", format!("00-{seckill_trace}-{seckill_parent}-01"))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 202, "attempt: {}", response.status());
    let admitted: Value = response.json().await?;
    let order = admitted["order_id"].as_str().unwrap_or_default().to_owned();
    visible(&stack, &format!("/orders/{order}"), "tracer", |o| {
        o["status"] == "pending_payment"
    })
    .await?;

    // a goods order from a client that started trace T2, through the lifecycle saga
    let (goods_trace, goods_parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let response = stack
        .http
        .post(stack.commands.url("/orders"))
        .bearer_auth(stack.token(CUSTOMER, Role::Customer)?)
        .header("traceparent", format!("00-{goods_trace}-{goods_parent}-01"))
        .json(&json!({"items": [{"product_id": seeded.product_id, "quantity": 1}]}))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 202, "goods order: {}", response.status());
    let placed: Value = response.json().await?;
    let goods = placed["order_id"].as_str().unwrap_or_default().to_owned();
    visible(&stack, &format!("/orders/{goods}"), CUSTOMER, |o| {
        o["status"] == "pending_payment"
    })
    .await?;

    // the last stage's span ends right after its commit: give it a moment,
    // then shut the exporter down, which sends every span it holds
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(move || drop(telemetry)).await?;
    let spans = collector.spans();
    anyhow::ensure!(!spans.is_empty(), "the collector received nothing");

    // T1: the edge's request span is the client's child ...
    let edge = spans
        .iter()
        .find(|s| s.name.starts_with("POST /seckill/") && hex(&s.trace_id) == seckill_trace)
        .ok_or_else(|| anyhow::anyhow!("no edge span in T1"))?;
    assert_eq!(
        hex(&edge.parent_span_id),
        seckill_parent,
        "the edge joins the client's span"
    );
    assert_eq!(attribute(edge, "http.response.status_code").as_deref(), Some("202"));
    // ... and every later stage joins T1
    let mut relations = Vec::new();
    for (name, consumer) in [
        ("forward_batch", None),
        ("consume_batch", Some(commands::CLAIM_WRITER_CONSUMER)),
        ("claim_batch", None),
        ("relay_batch", None),
        ("consume_batch", Some("projection-orders")),
    ] {
        relations.push((name, consumer, stage(&spans, seckill_trace, name, consumer)?));
    }
    // T2: the command API's span, the relay, the saga, the projections
    let command = spans
        .iter()
        .find(|s| s.name == "POST /orders" && hex(&s.trace_id) == goods_trace)
        .ok_or_else(|| anyhow::anyhow!("no command API span in T2"))?;
    assert_eq!(hex(&command.parent_span_id), goods_parent);
    for (name, consumer) in [
        ("relay_batch", None),
        ("consume_batch", Some(commands::lifecycle::LIFECYCLE_CONSUMER)),
        ("consume_batch", Some("projection-orders")),
        ("consume_batch", Some("projection-products")),
    ] {
        relations.push((name, consumer, stage(&spans, goods_trace, name, consumer)?));
    }
    eprintln!("stages and how they join their trace: {relations:?}");
    stack.stop().await
}
