//! The edge's `:dead` streams: a re-drive hands the entry back to the forwarder.

use std::time::Duration;

use cp_nats::Publisher;
use dlq::Exit;
use redis::AsyncCommands as _;
use seckill_edge::{
    forwarder::{Forwarder, ForwarderConfig},
    keys::{self, VoucherKeys},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Places, eventually};

#[tokio::test]
async fn unreadable_entries_fail_again_and_readable_ones_reach_jetstream() -> anyhow::Result<()> {
    let places = Places::new().await?;
    let mut kv = places.sources.kv.clone();
    let forwarder = Forwarder::new(
        testkit::kv_client(),
        places.prefix.clone(),
        Publisher::new(places.js.clone(), 100),
        places.namespace.clone(),
        ForwarderConfig {
            block: Duration::from_millis(100),
            discovery: Duration::from_millis(100),
            ..ForwarderConfig::new("edge-test")
        },
    );
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forwarder.run(stop.clone()));
    let voucher = Uuid::now_v7();
    let voucher_keys = VoucherKeys::new(&places.prefix, voucher);
    // as loading the sale does
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&voucher_keys.stream)
        .arg(seckill_edge::gate::FORWARDER_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut kv)
        .await?;
    let _: i64 = kv.sadd(keys::registry(&places.prefix), voucher.to_string()).await?;
    // an entry the forwarder cannot read: parked by the forwarder itself
    let _: String = kv
        .xadd(&voucher_keys.stream, "*", &[("o", "not-an-order-id"), ("u", "bob")])
        .await?;
    eventually(Duration::from_secs(10), || async {
        Ok(places.entries(&["--source", "edge"]).await?.len() == 1)
    })
    .await?;
    let parked = places.entries(&[]).await?;
    let poison = parked[0]["id"].as_str().unwrap_or_default().to_owned();
    assert!(poison.starts_with(&format!("edge:{voucher}:")), "{poison}");
    assert_eq!(parked[0]["key"], "not-an-order-id");

    // its sale ends; the forwarders forget the voucher, its dead letters stay listed
    let _: i64 = kv.srem(keys::registry(&places.prefix), voucher.to_string()).await?;
    let (exit, out, _) = places.dlq(&["redrive", &poison, "--wait", "10s"]).await?;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(out.contains("failed_again"), "{out}");
    let again = places.entries(&[]).await?;
    assert_eq!(again.len(), 1);
    assert_ne!(again[0]["id"], poison.as_str(), "parked again under a new id");
    let redriven = places.entries(&["--state", "redriven"]).await?;
    assert_eq!(redriven.len(), 1, "listed from the audit: {redriven:?}");
    assert_eq!(redriven[0]["id"], poison.as_str());
    assert_eq!(redriven[0]["key"], "not-an-order-id");
    assert_eq!(redriven[0]["last_action"]["outcome"], "failed_again");
    let (exit, shown, _) = places.dlq(&["show", &poison]).await?;
    assert_eq!(exit, Exit::Done, "gone from Redis, kept by the audit");
    assert!(
        shown.contains("not-an-order-id") && shown.contains("failed_again"),
        "{shown}"
    );

    // an entry an older forwarder could not read, which this one can
    let order = Uuid::now_v7();
    let _: String = kv
        .xadd(
            &voucher_keys.dead_letters,
            "*",
            &[("id", "1-0"), ("o", order.to_string().as_str()), ("u", "ann")],
        )
        .await?;
    let readable = places
        .entries(&[])
        .await?
        .into_iter()
        .find(|e| e["key"] == order.to_string().as_str())
        .and_then(|e| e["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let (exit, out, _) = places.dlq(&["redrive", &readable, "--wait", "10s"]).await?;
    assert_eq!(exit, Exit::Done, "{out}");
    assert!(out.contains("the forwarder published it"), "{out}");
    let requests = places.js.get_stream(places.namespace.seckill_requests_stream()).await?;
    let published = requests
        .direct_get_last_for_subject(places.namespace.seckill_requests_subject())
        .await?;
    assert_eq!(
        published
            .headers
            .get(events::subjects::MSG_ID)
            .map(|v| v.as_str().to_owned()),
        Some(order.to_string()),
        "published under its order id: the claim writer dedupes it"
    );
    let (exit, out, _) = places.dlq(&["redrive", &readable]).await?;
    assert_eq!(exit, Exit::Done);
    assert!(out.contains("skipped"), "{out}");
    let outcomes: Vec<String> = places.audit().await?.into_iter().map(|(_, _, o, _)| o).collect();
    assert_eq!(outcomes, ["failed_again", "redriven"]);

    stop.cancel();
    forwarding.await?;
    places.finish().await
}
