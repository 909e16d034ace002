//! The forwarder against real Redis and NATS: a crash between the publish and
//! the XACK, forwarders killed at random moments, and several instances on
//! one stream. Every admitted request must be on JetStream exactly once.

use std::{collections::HashSet, time::Duration};

use crate::support::{Harness, NO_RATE_LIMIT, occurrences};
use platform::telemetry::TraceHeaders;
use seckill_edge::gate::Admission;
use testkit::eventually;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Admits `users` users straight through the gate; returns the order ids.
async fn admit(harness: &Harness, voucher: Uuid, users: std::ops::Range<usize>) -> anyhow::Result<HashSet<Uuid>> {
    let mut orders = HashSet::new();
    for user in users {
        let admission = harness
            .gate
            .admit(
                voucher,
                &format!("user-{user}"),
                Uuid::now_v7(),
                None,
                &TraceHeaders::default(),
            )
            .await?;
        let Admission::Admitted { order_id, .. } = admission else {
            anyhow::bail!("user-{user} not admitted: {admission:?}");
        };
        orders.insert(order_id);
    }
    Ok(orders)
}

async fn pending(harness: &Harness, voucher: Uuid) -> anyhow::Result<u64> {
    let keys = harness.gate.keys(voucher);
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(&keys.stream)
        .arg(seckill_edge::gate::FORWARDER_GROUP)
        .query_async(&mut harness.redis.clone())
        .await?;
    let redis::Value::Array(fields) = summary else {
        anyhow::bail!("unexpected XPENDING reply {summary:?}")
    };
    Ok(match fields.first() {
        Some(redis::Value::Int(n)) => u64::try_from(*n)?,
        _ => 0,
    })
}

/// Waits until the stream is empty and JetStream holds `expected` requests,
/// then checks each one is there exactly once.
async fn assert_forwarded_exactly_once(
    harness: &Harness,
    voucher: Uuid,
    expected: &HashSet<Uuid>,
) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), || async {
        Ok(harness.stream_length(voucher).await? == 0 && pending(harness, voucher).await? == 0)
    })
    .await?;
    let requests = harness.requests_on_jetstream().await?;
    let counts = occurrences(&requests);
    assert!(counts.values().all(|n| *n == 1), "a request reached JetStream twice");
    let forwarded: HashSet<Uuid> = counts.into_keys().collect();
    assert_eq!(&forwarded, expected, "every admitted request, nothing else");
    Ok(())
}

#[tokio::test]
async fn a_forwarder_that_dies_between_publish_and_ack_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(500).await?;
    let orders = admit(&harness, voucher, 0..300).await?;

    // "crashed": reads 300 entries and publishes them, then dies before XACK
    let crashed = harness.forwarder("crashed", Duration::from_secs(3_600))?;
    let mut connection = crashed.connection().await?;
    let keys = harness.gate.keys(voucher);
    let entries = crashed.read(&mut connection, &keys, false).await?;
    assert_eq!(entries.len(), 300);
    assert_eq!(crashed.publish(voucher, &entries).await?, 300);
    assert_eq!(pending(&harness, voucher).await?, 300, "published but not acknowledged");

    // more admissions arrive while nobody forwards
    let later = admit(&harness, voucher, 300..400).await?;

    // a survivor takes over the idle entries and forwards the new ones
    let survivor = harness.forwarder("survivor", Duration::from_millis(200))?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { survivor.forward_voucher(voucher, stop).await }
    });
    let expected: HashSet<Uuid> = orders.union(&later).copied().collect();
    assert_forwarded_exactly_once(&harness, voucher, &expected).await?;
    stop.cancel();
    task.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarders_killed_at_random_moments_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(5_000).await?;
    let mut expected = HashSet::new();
    for round in 0..8 {
        expected.extend(admit(&harness, voucher, round * 250..(round + 1) * 250).await?);
        // a fresh instance each round (the killed one never comes back), killed
        // after a random moment: before, during or after a publish or an ack
        let forwarder = harness.forwarder(&format!("doomed-{round}"), Duration::from_millis(100))?;
        let task = tokio::spawn(async move { forwarder.forward_voucher(voucher, CancellationToken::new()).await });
        tokio::time::sleep(Duration::from_millis(rand::random_range(1..40))).await;
        task.abort();
        let _ = task.await;
    }
    let last = harness.forwarder("last", Duration::from_millis(100))?;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { last.forward_voucher(voucher, stop).await }
    });
    assert_forwarded_exactly_once(&harness, voucher, &expected).await?;
    stop.cancel();
    task.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_share_a_stream_and_forward_each_request_once() -> anyhow::Result<()> {
    let harness = Harness::new(NO_RATE_LIMIT, testkit::unreachable_pool()).await?;
    let voucher = harness.open_sale(3_000).await?;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for instance in 0..3 {
        // each runs the whole forwarder: registry discovery included
        let forwarder = harness.forwarder(&format!("edge-{instance}"), Duration::from_millis(500))?;
        tasks.push(tokio::spawn(forwarder.run(stop.clone())));
    }
    let mut expected = HashSet::new();
    for batch in 0..6 {
        expected.extend(admit(&harness, voucher, batch * 500..(batch + 1) * 500).await?);
    }
    assert_forwarded_exactly_once(&harness, voucher, &expected).await?;
    stop.cancel();
    for task in tasks {
        task.await?;
    }
    Ok(())
}
