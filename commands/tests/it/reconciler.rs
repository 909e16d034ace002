//! The requests' reconciler against real Postgres and NATS: admitted
//! requests the claim writer acknowledged but whose commit vanished (the
//! voucher's last decisions and their orders gone from the store, the
//! writer's cache still holding them) are found and re-driven into exactly
//! one order each; a second pass finds nothing.

use std::time::Duration;

use chrono::Utc;
use commands::{
    CLAIM_WRITER_CONSUMER,
    reconciler::{ReconcilerConfig, RequestReconciler},
};
use cp_nats::{ConsumerRunner, ConsumerSpec, Outgoing, Publisher, RunnerConfig, Topology, ensure_consumer};
use events::{Namespace, OrderRequested};
use uuid::Uuid;

use crate::claims::{order_statuses, seckill_voucher, state};

/// A seckill voucher of 100 units, and a JetStream namespace of the test's own.
struct Sale {
    state: commands::AppState,
    voucher_id: Uuid,
    namespace: Namespace,
    js: async_nats::jetstream::Context,
    publisher: Publisher,
}

impl Sale {
    async fn open(db: &testkit::TestDb) -> anyhow::Result<Self> {
        let state = state(db);
        let voucher_id = seckill_voucher(&state, 100).await?;
        let namespace = Namespace::new(testkit::unique_namespace())?;
        let js = cp_nats::jetstream(testkit::nats().await?, 1_000);
        cp_nats::ensure_topology(
            &js,
            &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
        )
        .await?;
        let publisher = Publisher::new(js.clone(), 256);
        Ok(Self {
            state,
            voucher_id,
            namespace,
            js,
            publisher,
        })
    }
}

#[tokio::test]
async fn acknowledged_requests_whose_orders_vanished_are_re_driven_into_one_order_each() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let Sale {
        state,
        voucher_id,
        namespace,
        js,
        publisher,
    } = Sale::open(&db).await?;
    let consumer = ensure_consumer(
        &js,
        &ConsumerSpec::new(namespace.seckill_requests_stream(), CLAIM_WRITER_CONSUMER),
    )
    .await?;
    let runner = ConsumerRunner::batched(
        consumer.clone(),
        state.claim_writer(),
        publisher.clone(),
        namespace.clone(),
        RunnerConfig::default(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(runner.run(stop.clone().cancelled_owned()));

    let publish = |users: std::ops::Range<usize>| {
        let publisher = publisher.clone();
        let subject = namespace.seckill_requests_subject();
        async move {
            let requests: Vec<OrderRequested> = users
                .map(|u| OrderRequested {
                    order_id: Uuid::now_v7(),
                    voucher_id,
                    user_id: format!("user-{u}"),
                    requested_at: Utc::now(),
                })
                .collect();
            let messages: Vec<Outgoing> = requests
                .iter()
                .map(|r| {
                    Outgoing::new(
                        subject.clone(),
                        r.order_id.to_string(),
                        serde_json::to_vec(r).unwrap_or_default(),
                    )
                })
                .collect();
            publisher.publish_all(messages).await?;
            anyhow::Ok(requests)
        }
    };
    let acked = |count: u64| {
        let consumer = consumer.clone();
        async move {
            let mut consumer = consumer;
            Ok(consumer.info().await?.ack_floor.stream_sequence == count)
        }
    };
    publish(0..30).await?;
    testkit::eventually(Duration::from_secs(20), || acked(30)).await?;
    let voucher_version: i64 =
        sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_type = 'Voucher' AND aggregate_id = $1")
            .bind(voucher_id.to_string())
            .fetch_one(&db.pool)
            .await?;
    let lost = publish(30..60).await?;
    testkit::eventually(Duration::from_secs(20), || acked(60)).await?;
    stop.cancel();
    running.await??;
    assert_eq!(order_statuses(&db.pool).await?.len(), 60);

    // the second batch's commit vanishes: its decisions and orders are gone,
    // while its requests stay acknowledged and the writer's cache holds them
    let lost_ids: Vec<String> = lost.iter().map(|r| r.order_id.to_string()).collect();
    sqlx::query("DELETE FROM events WHERE aggregate_type = 'Order' AND aggregate_id = ANY($1)")
        .bind(&lost_ids)
        .execute(&db.pool)
        .await?;
    sqlx::query("DELETE FROM events WHERE aggregate_type = 'Voucher' AND aggregate_id = $1 AND sequence > $2")
        .bind(voucher_id.to_string())
        .bind(voucher_version)
        .execute(&db.pool)
        .await?;
    assert_eq!(order_statuses(&db.pool).await?.len(), 30);

    let mut reconciler = RequestReconciler::new(
        db.pool.clone(),
        js.clone(),
        namespace.clone(),
        state.claim_writer(),
        ReconcilerConfig::default(),
    )
    .starting_at(0);
    let report = reconciler.pass().await?;
    assert_eq!(
        (report.checked, report.missing, report.repaired),
        (60, 30, 30),
        "{report:?}"
    );
    let orders = order_statuses(&db.pool).await?;
    assert_eq!(orders.len(), 60);
    for request in &lost {
        let (event, user) = &orders[&request.order_id.to_string()];
        assert_eq!((event.as_str(), user), ("OrderPlaced", &request.user_id));
    }

    let again = reconciler.pass().await?;
    assert_eq!((again.missing, again.repaired), (0, 0), "{again:?}");
    assert_eq!(order_statuses(&db.pool).await?.len(), 60);
    Ok(())
}

type PullConsumer = async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;

/// The claim writer's process takes a message and dies before settling it;
/// its restart pulls again, which is when JetStream gives up on it
/// (`max_deliver` 1).
async fn die_on_next(consumer: &PullConsumer) -> anyhow::Result<()> {
    let mut taken = consumer.fetch().max_messages(1).messages().await?;
    while let Some(message) = futures::StreamExt::next(&mut taken).await {
        drop(message.map_err(|error| anyhow::anyhow!(error))?);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    Ok(())
}

async fn advisories(sale: &Sale) -> anyhow::Result<u64> {
    Ok(sale
        .js
        .get_stream(sale.namespace.advisories_stream())
        .await?
        .get_info()
        .await?
        .state
        .messages)
}

/// The claim writer (`max_deliver` 1) until its ack floor reaches `floor`.
async fn decide_until(sale: &Sale, consumer: &PullConsumer, floor: u64) -> anyhow::Result<()> {
    let runner = ConsumerRunner::batched(
        consumer.clone(),
        sale.state.claim_writer(),
        sale.publisher.clone(),
        sale.namespace.clone(),
        RunnerConfig {
            max_deliver: 1,
            ..RunnerConfig::default()
        },
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(runner.run(stop.clone().cancelled_owned()));
    testkit::eventually(Duration::from_secs(20), || {
        let consumer = consumer.clone();
        async move {
            let mut consumer = consumer;
            Ok(consumer.info().await?.ack_floor.stream_sequence >= floor)
        }
    })
    .await?;
    stop.cancel();
    running.await??;
    Ok(())
}

/// Two requests; the claim writer's process died on the first at its only
/// delivery, and decided the second.
async fn exhausted_once(db: &testkit::TestDb) -> anyhow::Result<(Sale, PullConsumer, Vec<OrderRequested>)> {
    let sale = Sale::open(db).await?;
    let consumer = ensure_consumer(
        &sale.js,
        &ConsumerSpec::new(sale.namespace.seckill_requests_stream(), CLAIM_WRITER_CONSUMER)
            .max_deliver(1)
            .ack_wait(Duration::from_millis(500)),
    )
    .await?;
    let requests: Vec<OrderRequested> = ["poison", "fine"]
        .iter()
        .map(|user| OrderRequested {
            order_id: Uuid::now_v7(),
            voucher_id: sale.voucher_id,
            user_id: (*user).to_owned(),
            requested_at: Utc::now(),
        })
        .collect();
    for request in &requests {
        sale.publisher
            .publish(Outgoing::new(
                sale.namespace.seckill_requests_subject(),
                request.order_id.to_string(),
                serde_json::to_vec(request)?,
            ))
            .await?;
    }
    die_on_next(&consumer).await?;
    decide_until(&sale, &consumer, 2).await?;
    testkit::eventually(Duration::from_secs(10), || async { Ok(advisories(&sale).await? == 1) }).await?;
    Ok((sale, consumer, requests))
}

fn reconciler_of(db: &testkit::TestDb, sale: &Sale) -> RequestReconciler {
    RequestReconciler::new(
        db.pool.clone(),
        sale.js.clone(),
        sale.namespace.clone(),
        sale.state.claim_writer(),
        ReconcilerConfig::default(),
    )
    .starting_at(0)
}

#[tokio::test]
async fn a_request_the_claim_writer_used_up_its_deliveries_on_gets_one_more_chance_through_the_stream()
-> anyhow::Result<()> {
    // its deliveries may have gone on restarts, not on a fault of its own;
    // and it is not re-driven in process (it may kill the process)
    let db = testkit::TestDb::new().await?;
    let (sale, consumer, requests) = exhausted_once(&db).await?;
    let report = reconciler_of(&db, &sale).pass().await?;
    assert_eq!(
        (report.missing, report.second_chances, report.exhausted, report.repaired),
        (1, 1, 0, 0),
        "{report:?}"
    );
    assert!(
        !order_statuses(&db.pool)
            .await?
            .contains_key(&requests[0].order_id.to_string())
    );

    // the claim writer takes the copy and decides it
    decide_until(&sale, &consumer, 3).await?;
    let orders = order_statuses(&db.pool).await?;
    let (event, user) = &orders[&requests[0].order_id.to_string()];
    assert_eq!((event.as_str(), user.as_str()), ("OrderPlaced", "poison"));
    let report = reconciler_of(&db, &sale).pass().await?;
    assert_eq!((report.missing, report.second_chances), (0, 0), "{report:?}");
    Ok(())
}

#[tokio::test]
async fn a_request_the_claim_writer_used_up_its_deliveries_on_twice_is_left_to_the_dead_letter_stream()
-> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let (sale, consumer, requests) = exhausted_once(&db).await?;
    let report = reconciler_of(&db, &sale).pass().await?;
    assert_eq!(report.second_chances, 1, "{report:?}");
    // the copy kills the claim writer's process too
    die_on_next(&consumer).await?;
    let mut pull = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(1_500))
        .messages()
        .await?;
    while futures::StreamExt::next(&mut pull).await.is_some() {}
    testkit::eventually(Duration::from_secs(10), || async { Ok(advisories(&sale).await? == 2) }).await?;

    // a restarted reconciler reads both advisories: parked, not re-driven
    let mut reconciler = reconciler_of(&db, &sale);
    let report = reconciler.pass().await?;
    assert_eq!(
        (report.missing, report.second_chances, report.exhausted, report.repaired),
        (1, 0, 1, 0),
        "{report:?}"
    );
    assert!(
        !order_statuses(&db.pool)
            .await?
            .contains_key(&requests[0].order_id.to_string())
    );
    let stream = sale.js.get_stream(sale.namespace.seckill_requests_stream()).await?;
    assert_eq!(stream.cached_info().state.messages, 3, "no third copy");
    Ok(())
}

#[tokio::test]
async fn requests_found_missing_survive_a_pass_that_fails_after_finding_them() -> anyhow::Result<()> {
    // the cursor has moved past them: dropped, nothing would find them again
    let db = testkit::TestDb::new().await?;
    let sale = Sale::open(&db).await?;
    let consumer = ensure_consumer(
        &sale.js,
        &ConsumerSpec::new(sale.namespace.seckill_requests_stream(), CLAIM_WRITER_CONSUMER),
    )
    .await?;
    let request = OrderRequested {
        order_id: Uuid::now_v7(),
        voucher_id: sale.voucher_id,
        user_id: "ann".to_owned(),
        requested_at: Utc::now(),
    };
    sale.publisher
        .publish(Outgoing::new(
            sale.namespace.seckill_requests_subject(),
            request.order_id.to_string(),
            serde_json::to_vec(&request)?,
        ))
        .await?;
    // acknowledged, its decision gone (a commit that vanished)
    let mut taken = consumer.fetch().max_messages(1).messages().await?;
    while let Some(message) = futures::StreamExt::next(&mut taken).await {
        message
            .map_err(|error| anyhow::anyhow!(error))?
            .double_ack()
            .await
            .map_err(|error| anyhow::anyhow!(error))?;
    }

    testkit::eventually(Duration::from_secs(10), || {
        let consumer = consumer.clone();
        async move {
            let mut consumer = consumer;
            Ok(consumer.info().await?.ack_floor.stream_sequence == 1)
        }
    })
    .await?;

    // the pass finds it, then cannot read the advisories
    sale.js.delete_stream(sale.namespace.advisories_stream()).await?;
    let mut reconciler = reconciler_of(&db, &sale);
    assert!(reconciler.pass().await.is_err());
    cp_nats::ensure_topology(
        &sale.js,
        &Topology::new(sale.namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;
    let report = reconciler.pass().await?;
    assert_eq!(
        (report.checked, report.missing, report.repaired),
        (0, 1, 1),
        "{report:?}"
    );
    assert!(
        order_statuses(&db.pool)
            .await?
            .contains_key(&request.order_id.to_string())
    );
    Ok(())
}
