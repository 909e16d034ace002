//! The JetStream layer on a cluster of three nats-server processes of the
//! test's own (`testkit::NatsCluster`) with R3 streams: a publisher that
//! retries each message under its `Nats-Msg-Id` until acknowledged, and a
//! consumer, ride out the SIGKILL of the stream's leader. Nothing
//! acknowledged is lost, nothing is stored twice, and a restarted node
//! catches up.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use cp_nats::{ConsumerRunner, ConsumerSpec, Handler, HandlerError, Outgoing, Publisher, RunnerConfig, Topology};
use events::subjects::Namespace;
use tokio::time::Instant;

const MESSAGES: usize = 1_500;
const KILL_AFTER: usize = 500;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashSet<String>>>);

impl Seen {
    fn len(&self) -> usize {
        self.0.lock().map(|s| s.len()).unwrap_or_default()
    }
}

impl Handler for Seen {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandlerError> {
        let id = String::from_utf8(message.payload.to_vec())?;
        self.0.lock().map_err(|_| "poisoned")?.insert(id);
        Ok(())
    }
}

async fn leader_of(js: &jetstream::Context, stream: &str) -> anyhow::Result<String> {
    let info = js.get_stream(stream).await?.get_info().await?;
    info.cluster
        .and_then(|c| c.leader)
        .ok_or_else(|| anyhow::anyhow!("stream {stream} has no leader"))
}

#[tokio::test]
async fn r3_streams_lose_nothing_acknowledged_when_the_leader_is_killed() -> anyhow::Result<()> {
    testkit::init_logs();
    let mut cluster = testkit::NatsCluster::start().await?;
    let js = cp_nats::jetstream(cluster.connect().await?, 1_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    // a cluster that just started may take longer than one request's bound
    // to place R3 streams (seen under the whole suite's load): as a service
    // starting on it does, wait for it
    let topology = Topology::new(namespace.clone()).with_replicas(3);
    cp_nats::ensure_topology_within(&js, &topology, Duration::from_secs(60)).await?;
    let stream = namespace.events_stream("Order");
    let info = js.get_stream(&stream).await?.get_info().await?;
    assert_eq!(info.config.num_replicas, 3);

    let seen = Seen::default();
    let spec = ConsumerSpec::new(&stream, "cluster-test").ack_wait(Duration::from_secs(3));
    let consumer = cp_nats::ensure_consumer(&js, &spec).await?;
    let publisher = Publisher::new(js.clone(), 256);
    let runner = ConsumerRunner::new(
        consumer,
        seen.clone(),
        publisher.clone(),
        namespace.clone(),
        RunnerConfig::default(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let consuming = tokio::spawn(runner.run(stop.clone().cancelled_owned()));

    let subject = namespace.events_subject("Order");
    let mut killed_at = None;
    let mut stalled = Duration::ZERO;
    for i in 0..MESSAGES {
        if i == KILL_AFTER {
            let leader = leader_of(&js, &stream).await?;
            let index = cluster
                .index_of(&leader)
                .ok_or_else(|| anyhow::anyhow!("unknown leader {leader}"))?;
            cluster.kill(index)?;
            killed_at = Some(index);
        }
        // as the outbox relay does: the same id until the cluster acknowledges it
        let started = Instant::now();
        loop {
            let message = Outgoing::new(subject.clone(), format!("m-{i}"), format!("m-{i}"));
            match tokio::time::timeout(Duration::from_secs(2), publisher.publish(message)).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) => tracing::info!(%error, i, "publish failed; retrying"),
                Err(_) => tracing::info!(i, "publish timed out; retrying"),
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "message {i} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stalled = stalled.max(started.elapsed());
    }
    tracing::info!(?stalled, "longest wait for one acknowledgement (through the kill)");
    assert!(stalled < Duration::from_secs(15), "publishing stalled {stalled:?}");

    testkit::eventually(Duration::from_secs(30), || {
        let seen = seen.clone();
        async move { Ok(seen.len() == MESSAGES) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: consumed {} of {MESSAGES}", seen.len()))?;
    let stored = js.get_stream(&stream).await?.get_info().await?.state.messages;
    assert_eq!(stored, MESSAGES as u64, "every message stored exactly once");

    // the killed node comes back and catches up with the stream
    let index = killed_at.ok_or_else(|| anyhow::anyhow!("no node was killed"))?;
    cluster.restart(index).await?;
    testkit::eventually(Duration::from_secs(30), || {
        let js = js.clone();
        let stream = stream.clone();
        async move {
            let info = js.get_stream(&stream).await?.get_info().await?;
            let replicas = info.cluster.map(|c| c.replicas).unwrap_or_default();
            Ok(replicas.len() == 2
                && replicas
                    .iter()
                    .all(|r| r.current && !r.offline && r.lag.unwrap_or(0) == 0))
        }
    })
    .await?;
    stop.cancel();
    consuming.await??;
    Ok(())
}
