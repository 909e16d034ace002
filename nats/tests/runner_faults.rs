//! The consumer runner through faults, against the real test nats-server:
//! work resumes within seconds, not after an ack wait, and a dependency that
//! is away spends no delivery attempt.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use cp_nats::{ConsumerRunner, ConsumerSpec, Handler, HandlerError, Outgoing, Publisher, RunnerConfig, Topology};
use events::subjects::Namespace;
use tokio_util::sync::CancellationToken;

struct Bus {
    namespace: Namespace,
    js: jetstream::Context,
    publisher: Publisher,
}

async fn bus() -> anyhow::Result<Bus> {
    testkit::init_logs();
    let namespace = Namespace::new(testkit::unique_namespace())?;
    let js = cp_nats::jetstream(testkit::nats().await?, 1_000);
    let topology = Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas());
    cp_nats::ensure_topology(&js, &topology).await?;
    let publisher = Publisher::new(js.clone(), 256);
    Ok(Bus {
        namespace,
        js,
        publisher,
    })
}

impl Bus {
    async fn publish(&self, count: usize) -> anyhow::Result<()> {
        let batch: Vec<Outgoing> = (0..count)
            .map(|i| {
                Outgoing::new(
                    self.namespace.events_subject("Order"),
                    format!("m-{i}"),
                    format!("m-{i}"),
                )
            })
            .collect();
        self.publisher.publish_all(batch).await?;
        Ok(())
    }

    async fn consumer(
        &self,
        ack_wait: Duration,
        max_deliver: i64,
    ) -> anyhow::Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>> {
        let spec = ConsumerSpec::new(self.namespace.events_stream("Order"), "faults")
            .ack_wait(ack_wait)
            .max_deliver(max_deliver);
        Ok(cp_nats::ensure_consumer(&self.js, &spec).await?)
    }

    fn config(max_deliver: i64, batch: usize) -> RunnerConfig {
        RunnerConfig {
            max_deliver,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            batch,
            linger: Duration::from_millis(2),
            ..RunnerConfig::default()
        }
    }

    /// `recorder` handling `consumer`'s messages until [`Running::stop`].
    fn run(
        &self,
        consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
        recorder: &Recorder,
        config: RunnerConfig,
        probe: Option<cp_nats::Probe>,
    ) -> Running {
        let mut runner = ConsumerRunner::new(
            consumer,
            recorder.clone(),
            self.publisher.clone(),
            self.namespace.clone(),
            config,
        );
        if let Some(probe) = probe {
            runner = runner.with_probe(probe);
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(runner.run(stop.clone().cancelled_owned()));
        Running { stop, task }
    }

    async fn until_dead_letters(&self, count: u64) -> anyhow::Result<()> {
        testkit::eventually(Duration::from_secs(10), || async move {
            Ok(self.dead_letters().await? == count)
        })
        .await
    }

    async fn dead_letters(&self) -> anyhow::Result<u64> {
        Ok(self
            .js
            .get_stream(self.namespace.dead_letter_stream())
            .await?
            .get_info()
            .await?
            .state
            .messages)
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), cp_nats::consumer::RunnerError>>,
}

impl Running {
    /// Stops the runner and waits until it has given back what it held.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Records every delivery (body → delivery count as JetStream reports it);
/// fails while `down` is set, as a handler whose database is away does;
/// sleeps `delay` per message.
#[derive(Clone, Default)]
struct Recorder {
    deliveries: Arc<Mutex<HashMap<String, Vec<i64>>>>,
    handled: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
    delay: Duration,
    /// The one message it hangs on, if any.
    hangs_on: Option<&'static str>,
}

impl Recorder {
    fn handled(&self) -> Vec<String> {
        self.handled.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn deliveries_of(&self, body: &str) -> Vec<i64> {
        self.deliveries
            .lock()
            .ok()
            .and_then(|d| d.get(body).cloned())
            .unwrap_or_default()
    }
}

impl Handler for Recorder {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandlerError> {
        let body = String::from_utf8(message.payload.to_vec())?;
        let delivered = message.info()?.delivered;
        self.deliveries
            .lock()
            .map_err(|_| "poisoned")?
            .entry(body.clone())
            .or_default()
            .push(delivered);
        if self.down.load(Ordering::SeqCst) {
            return Err("connection refused (the database is away)".into());
        }
        if self.hangs_on == Some(body.as_str()) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        self.handled.lock().map_err(|_| "poisoned")?.push(body);
        Ok(())
    }
}

#[tokio::test]
async fn messages_are_held_not_dead_lettered_while_the_probe_says_the_dependency_is_away() -> anyhow::Result<()> {
    let bus = bus().await?;
    bus.publish(20).await?;
    let recorder = Recorder::default();
    recorder.down.store(true, Ordering::SeqCst);
    let down = recorder.down.clone();
    let probe = cp_nats::probe(move || {
        let down = down.clone();
        async move { !down.load(Ordering::SeqCst) }
    });
    // two deliveries at most, and an ack wait far shorter than the outage
    let consumer = bus.consumer(Duration::from_secs(1), 2).await?;
    let running = bus.run(consumer, &recorder, Bus::config(2, 32), Some(probe));

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(recorder.handled().is_empty());
    recorder.down.store(false, Ordering::SeqCst);
    testkit::eventually(Duration::from_secs(5), || {
        let handled = recorder.handled().len();
        async move { Ok(handled == 20) }
    })
    .await?;
    // held through an outage four times the ack wait: still the first delivery
    for i in 0..20 {
        let deliveries = recorder.deliveries_of(&format!("m-{i}"));
        assert!(deliveries.iter().all(|d| *d == 1), "m-{i} delivered {deliveries:?}");
    }
    assert_eq!(bus.dead_letters().await?, 0);
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn without_a_probe_a_failing_dependency_still_ends_in_the_dead_letter_stream() -> anyhow::Result<()> {
    // the counterpart: what the probe prevents (and what handlers without a
    // dependency to ask still get: nothing retries forever)
    let bus = bus().await?;
    bus.publish(3).await?;
    let recorder = Recorder::default();
    recorder.down.store(true, Ordering::SeqCst);
    let consumer = bus.consumer(Duration::from_secs(1), 2).await?;
    let running = bus.run(consumer, &recorder, Bus::config(2, 32), None);
    bus.until_dead_letters(3).await?;
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_long_handler_gets_progress_acks_instead_of_a_redelivery() -> anyhow::Result<()> {
    let bus = bus().await?;
    bus.publish(2).await?;
    let recorder = Recorder {
        delay: Duration::from_millis(1_500),
        ..Recorder::default()
    };
    // each message takes longer than the ack wait
    let consumer = bus.consumer(Duration::from_secs(1), 5).await?;
    let running = bus.run(consumer, &recorder, Bus::config(5, 2), None);
    testkit::eventually(Duration::from_secs(10), || {
        let handled = recorder.handled().len();
        async move { Ok(handled == 2) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..2 {
        assert_eq!(recorder.deliveries_of(&format!("m-{i}")), [1], "m-{i}");
    }
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_runner_stopped_while_holding_gives_its_messages_back_so_the_next_gets_them_at_once() -> anyhow::Result<()> {
    // as the claim writer losing its leadership when Postgres goes away:
    // whoever leads next must not wait out the ack wait
    let bus = bus().await?;
    bus.publish(20).await?;
    let consumer = bus.consumer(Duration::from_secs(30), 5).await?;
    let first = Recorder::default();
    first.down.store(true, Ordering::SeqCst);
    let running = bus.run(
        consumer.clone(),
        &first,
        Bus::config(5, 32),
        Some(cp_nats::probe(|| async { false })),
    );
    // the first batch fails and is held; whatever else the pull delivers
    // meanwhile joins the held messages without being handled
    testkit::eventually(Duration::from_secs(5), || {
        let tried = (0..20).any(|i| !first.deliveries_of(&format!("m-{i}")).is_empty());
        async move { Ok(tried) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await?;
    assert!(first.handled().is_empty());

    let second = Recorder::default();
    let started = tokio::time::Instant::now();
    let running = bus.run(consumer, &second, Bus::config(5, 32), None);
    testkit::eventually(Duration::from_secs(5), || {
        let handled = second.handled().len();
        async move { Ok(handled == 20) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: the second runner handled {:?}", second.handled()))?;
    assert!(started.elapsed() < Duration::from_secs(5));
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_handler_that_hangs_is_abandoned_after_its_timeout_and_ends_in_the_dead_letter_stream() -> anyhow::Result<()>
{
    // progress acks would keep a hung batch in hand forever
    let bus = bus().await?;
    bus.publish(1).await?;
    let recorder = Recorder {
        delay: Duration::from_secs(3_600),
        ..Recorder::default()
    };
    let consumer = bus.consumer(Duration::from_secs(1), 2).await?;
    let running = bus.run(
        consumer,
        &recorder,
        RunnerConfig {
            handler_timeout: Duration::from_millis(500),
            ..Bus::config(2, 1)
        },
        None,
    );
    bus.until_dead_letters(1).await?;
    assert_eq!(recorder.deliveries_of("m-0"), [1, 2]);
    let letters = cp_nats::dead_letters::DeadLetters::new(bus.js.clone(), bus.namespace.clone())
        .list_after(0, None)
        .await?;
    assert!(
        letters[0].error.contains("took longer than 500ms"),
        "{}",
        letters[0].error
    );
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_message_whose_consumer_died_on_every_delivery_is_dead_lettered_from_its_advisory() -> anyhow::Result<()> {
    let bus = bus().await?;
    let subject = bus.namespace.events_subject("Order");
    bus.publisher
        .publish(Outgoing::new(&subject, "evt-poison", "poison").header("Cp-Event-Type", "OrderPlaced"))
        .await?;
    let consumer = bus.consumer(Duration::from_millis(500), 2).await?;
    // a process that takes the message and dies before settling it, twice;
    // its restart pulls again (which is when JetStream gives up on it)
    for _ in 0..3 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(1_500))
            .messages()
            .await?;
        while let Some(message) = futures::StreamExt::next(&mut batch).await {
            drop(message.map_err(|error| anyhow::anyhow!(error))?);
        }
    }
    let sweeper = cp_nats::ExhaustedDeliveries::new(bus.js.clone(), bus.publisher.clone(), bus.namespace.clone());
    let stop = CancellationToken::new();
    let sweeping = tokio::spawn(sweeper.run(stop.clone().cancelled_owned()));
    bus.until_dead_letters(1).await?;
    let letters = cp_nats::dead_letters::DeadLetters::new(bus.js.clone(), bus.namespace.clone())
        .list_after(0, None)
        .await?;
    let letter = &letters[0];
    assert_eq!(letter.consumer, "faults");
    assert_eq!(letter.stream, bus.namespace.events_stream("Order"));
    assert_eq!(letter.stream_sequence, 1);
    assert_eq!(letter.subject, subject);
    assert_eq!(letter.delivered, 2);
    assert_eq!(letter.original_msg_id.as_deref(), Some("evt-poison"));
    assert_eq!(letter.event_type.as_deref(), Some("OrderPlaced"));
    assert_eq!(&letter.payload[..], b"poison");
    // as published: not the headers a direct get adds (Nats-Stream, …)
    assert!(
        letter.headers.iter().all(|(name, _)| !name.starts_with("Nats-")),
        "{:?}",
        letter.headers
    );
    assert!(
        letter.error.contains("delivered 2 times without an outcome"),
        "{}",
        letter.error
    );
    stop.cancel();
    sweeping.await?;
    Ok(())
}

#[tokio::test]
async fn a_message_that_hangs_does_not_fail_its_neighbours() -> anyhow::Result<()> {
    // per-message handlers are bounded message by message
    let bus = bus().await?;
    bus.publish(3).await?;
    let recorder = Recorder {
        hangs_on: Some("m-1"),
        ..Recorder::default()
    };
    let consumer = bus.consumer(Duration::from_secs(1), 2).await?;
    let config = RunnerConfig {
        handler_timeout: Duration::from_millis(300),
        ..Bus::config(2, 3)
    };
    let running = bus.run(consumer, &recorder, config, None);
    bus.until_dead_letters(1).await?;
    let mut handled = recorder.handled();
    handled.sort();
    assert_eq!(handled, ["m-0", "m-2"]);
    assert_eq!(recorder.deliveries_of("m-0"), [1]);
    assert_eq!(recorder.deliveries_of("m-2"), [1]);
    assert_eq!(recorder.deliveries_of("m-1"), [1, 2]);
    running.stop().await?;
    Ok(())
}

/// A batch handler that never answers.
struct HangingBatch;

impl cp_nats::BatchHandler for HangingBatch {
    async fn handle_batch(&self, _messages: &[jetstream::Message]) -> Vec<Result<(), HandlerError>> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_batch_that_hangs_is_abandoned_as_a_whole_and_ends_in_the_dead_letter_stream() -> anyhow::Result<()> {
    let bus = bus().await?;
    bus.publish(2).await?;
    let consumer = bus.consumer(Duration::from_secs(1), 2).await?;
    let runner = ConsumerRunner::batched(
        consumer,
        HangingBatch,
        bus.publisher.clone(),
        bus.namespace.clone(),
        RunnerConfig {
            handler_timeout: Duration::from_millis(300),
            ..Bus::config(2, 2)
        },
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(runner.run(stop.clone().cancelled_owned()));
    bus.until_dead_letters(2).await?;
    stop.cancel();
    running.await??;
    Ok(())
}
