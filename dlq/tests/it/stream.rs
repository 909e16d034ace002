//! The JetStream dead-letter stream (`events:` ids).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use cp_nats::{ConsumerRunner, ConsumerSpec, Handler, HandlerError, Outgoing, Publisher, RunnerConfig};
use dlq::Exit;
use events::subjects::HDR_EVENT_TYPE;
use tokio_util::sync::CancellationToken;

use crate::{Places, eventually};

/// A reactor whose handler refuses every message until it is fixed.
#[derive(Clone, Default)]
struct Reactor {
    broken: Arc<AtomicBool>,
    handled: Arc<AtomicUsize>,
}

impl Handler for Reactor {
    fn handle(&self, _: &jetstream::Message) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let (broken, handled) = (self.broken.load(Ordering::SeqCst), self.handled.clone());
        async move {
            if broken {
                return Err(cp_nats::permanent("the reactor cannot read this OrderPlaced"));
            }
            handled.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[tokio::test]
async fn a_parked_message_is_re_driven_to_its_consumer_once_and_audited() -> anyhow::Result<()> {
    let places = Places::new().await?;
    let stream = places.namespace.events_stream("Order");
    let spec = ConsumerSpec::new(stream.clone(), "test-reactor").max_deliver(3);
    let consumer = cp_nats::ensure_consumer(&places.js, &spec).await?;
    let reactor = Reactor::default();
    reactor.broken.store(true, Ordering::SeqCst);
    let runner = ConsumerRunner::new(
        consumer,
        reactor.clone(),
        Publisher::new(places.js.clone(), 16),
        places.namespace.clone(),
        RunnerConfig {
            max_deliver: 3,
            ..RunnerConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { runner.run(stop.cancelled_owned()).await }
    });
    let publisher = Publisher::new(places.js.clone(), 16);
    publisher
        .publish(
            Outgoing::new(
                places.namespace.events_subject("Order"),
                "event-1",
                &b"{\"order\":1}"[..],
            )
            .header(HDR_EVENT_TYPE, "OrderPlaced"),
        )
        .await?;
    eventually(Duration::from_secs(10), || async {
        Ok(places.entries(&[]).await?.len() == 1)
    })
    .await?;

    let listed = places.entries(&["--source", "events", "--type", "OrderPlaced"]).await?;
    assert_eq!(listed[0]["id"], "events:1");
    assert_eq!(listed[0]["state"], "open");
    assert_eq!(
        listed[0]["attempts"], 1,
        "a permanent failure is parked on its first delivery"
    );
    assert_eq!(listed[0]["key"], "event-1");
    assert!(listed[0]["reason"].as_str().unwrap_or_default().contains("cannot read"));
    assert!(places.entries(&["--type", "OrderPaid"]).await?.is_empty());
    assert!(places.entries(&["--source", "edge"]).await?.is_empty());
    let (exit, shown, _) = places.dlq(&["show", "events:1", "--json"]).await?;
    assert_eq!(exit, Exit::Done);
    let shown: serde_json::Value = serde_json::from_str(&shown)?;
    assert_eq!(shown["detail"]["payload"]["order"], 1);
    assert_eq!(shown["detail"]["consumer"], "test-reactor");

    // still broken: handed back, parked again as a new entry
    let (exit, out, _) = places.dlq(&["redrive", "events:1", "--wait", "10s"]).await?;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(out.contains("failed_again") && out.contains("events:2"), "{out}");
    let open = places.entries(&[]).await?;
    assert_eq!(open.len(), 1, "the old entry is re-driven, the new one open: {open:?}");
    assert_eq!(open[0]["id"], "events:2");
    assert_eq!(open[0]["key"], "event-1", "the original id survives the re-drive");

    // fixed: the re-drive reaches the reactor
    reactor.broken.store(false, Ordering::SeqCst);
    let (exit, out, _) = places.dlq(&["redrive", "events:2", "--json"]).await?;
    assert_eq!(exit, Exit::Done, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["results"][0]["outcome"], "redriven");
    assert_eq!(reactor.handled.load(Ordering::SeqCst), 1);
    assert!(places.entries(&[]).await?.is_empty());

    // again: nothing published, nothing handled twice
    let before = places.js.get_stream(&stream).await?.info().await?.state.last_sequence;
    let (exit, out, _) = places.dlq(&["redrive", "events:2", "events:1"]).await?;
    assert_eq!(exit, Exit::Done, "{out}");
    assert_eq!(out.matches("  skipped  already redriven").count(), 2, "{out}");
    let after = places.js.get_stream(&stream).await?.info().await?.state.last_sequence;
    assert_eq!(after, before);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reactor.handled.load(Ordering::SeqCst), 1);
    assert_eq!(
        places.audit().await?,
        [
            (
                "events:1".into(),
                "redrive".into(),
                "failed_again".into(),
                "tester".into()
            ),
            ("events:2".into(), "redrive".into(), "redriven".into(), "tester".into()),
        ]
    );
    let (_, history, _) = places.dlq(&["show", "events:1"]).await?;
    assert!(history.contains("failed_again"), "{history}");

    stop.cancel();
    running.await??;
    places.finish().await
}

#[tokio::test]
async fn dropped_entries_keep_their_reason_and_are_not_re_driven() -> anyhow::Result<()> {
    let places = Places::new().await?;
    let publisher = Publisher::new(places.js.clone(), 16);
    // parked as the runner parks, without a runner: no consumer will confirm
    for n in 1..=2 {
        publisher
            .publish(
                Outgoing::new(
                    places.namespace.dead_letter_subject("gone"),
                    format!("dlq:gone:e{n}"),
                    &b"x"[..],
                )
                .header(cp_nats::consumer::HDR_DLQ_CONSUMER, "gone")
                .header(
                    cp_nats::consumer::HDR_DLQ_STREAM,
                    places.namespace.events_stream("Order"),
                )
                .header(
                    cp_nats::consumer::HDR_DLQ_SUBJECT,
                    places.namespace.events_subject("Order"),
                )
                .header(cp_nats::consumer::HDR_DLQ_ERROR, "boom")
                .header(cp_nats::consumer::HDR_DLQ_DELIVERED, "5")
                .header(cp_nats::consumer::HDR_DLQ_ORIGINAL_MSG_ID, format!("e{n}")),
            )
            .await?;
    }
    let (exit, out, _) = places
        .dlq(&["drop", "events:1", "--reason", "test order, ignore"])
        .await?;
    assert_eq!(exit, Exit::Done, "{out}");
    let dropped = places.entries(&["--state", "dropped"]).await?;
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0]["last_action"]["reason"], "test order, ignore");
    assert_eq!(dropped[0]["attempts"], 5);
    let (exit, out, _) = places.dlq(&["drop", "events:1", "--reason", "again"]).await?;
    assert_eq!(exit, Exit::Done);
    assert!(out.contains("already dropped"), "{out}");

    // --all-matching takes the open one only; its consumer is gone, so the
    // outcome is unconfirmed (exit 1), and it counts as handed back
    let (exit, out, _) = places.dlq(&["redrive", "--all-matching", "--dry-run"]).await?;
    assert_eq!(exit, Exit::Done);
    assert!(
        out.contains("events:2  would_redrive") && !out.contains("events:1"),
        "{out}"
    );
    assert_eq!(places.audit().await?.len(), 1, "a dry run changes nothing");
    let (exit, out, _) = places.dlq(&["redrive", "--all-matching", "--wait", "200ms"]).await?;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(out.contains("unconfirmed"), "{out}");
    let everything = places.entries(&["--state", "all"]).await?;
    let states: Vec<&str> = everything.iter().filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states, ["dropped", "redriven"]);
    places.finish().await
}
