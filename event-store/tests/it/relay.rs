//! The outbox relay against real Postgres and NATS.

use std::time::Duration;

use async_nats::jetstream;
use cp_nats::{Publisher, Topology, ensure_topology};
use event_store::relay::{Relay, RelayConfig};
use events::{EventEnvelope, Namespace};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;

struct Fixture {
    db: testkit::TestDb,
    js: jetstream::Context,
    namespace: Namespace,
}

async fn fixture() -> anyhow::Result<Fixture> {
    testkit::init_logs();
    let db = testkit::TestDb::new().await?;
    let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    ensure_topology(
        &js,
        &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;
    Ok(Fixture { db, js, namespace })
}

impl Fixture {
    fn relay(&self, namespace: &Namespace, batch_size: i64) -> JoinHandle<()> {
        let relay = Relay::new(
            self.db.pool.clone(),
            Publisher::new(self.js.clone(), 1_024),
            namespace.clone(),
            RelayConfig {
                batch_size,
                poll_interval: Duration::from_millis(20),
                ..RelayConfig::default()
            },
        );
        tokio::spawn(relay.run(std::future::pending()))
    }

    async fn published(&self, namespace: &Namespace, aggregate_type: &str) -> anyhow::Result<Vec<EventEnvelope>> {
        let stream = self.js.get_stream(namespace.events_stream(aggregate_type)).await?;
        let count = stream.get_info().await?.state.messages;
        let mut out = Vec::new();
        for sequence in 1..=count {
            let message = stream.get_raw_message(sequence).await?;
            out.push(serde_json::from_slice(&message.payload)?);
        }
        Ok(out)
    }

    async fn wait_for(
        &self,
        namespace: &Namespace,
        aggregate_type: &str,
        n: usize,
    ) -> anyhow::Result<Vec<EventEnvelope>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let published = self.published(namespace, aggregate_type).await?;
            if published.len() >= n {
                return Ok(published);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} events published",
                published.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const INSERT: &str =
    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
     VALUES ('Order', $1, $2, 'OrderCompleted', '1.0', '{\"OrderCompleted\": {}}'::jsonb, $3)";

fn metadata() -> serde_json::Value {
    serde_json::to_value(events::EventMetadata::system("test").to_map()).unwrap_or_default()
}

async fn insert(pool: &PgPool, aggregate_id: &str, sequence: i64) -> anyhow::Result<()> {
    sqlx::query(INSERT)
        .bind(aggregate_id)
        .bind(sequence)
        .bind(metadata())
        .execute(pool)
        .await?;
    Ok(())
}

async fn insert_in(conn: &mut PgConnection, aggregate_id: &str, sequence: i64) -> anyhow::Result<i64> {
    sqlx::query(INSERT)
        .bind(aggregate_id)
        .bind(sequence)
        .bind(metadata())
        .execute(&mut *conn)
        .await?;
    let position: i64 =
        sqlx::query_scalar("SELECT global_position FROM events WHERE aggregate_id = $1 AND sequence = $2")
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_one(&mut *conn)
            .await?;
    Ok(position)
}

#[tokio::test]
async fn a_slow_transaction_is_not_skipped_and_per_aggregate_order_holds() -> anyhow::Result<()> {
    let f = fixture().await?;
    let relay = f.relay(&f.namespace, 100);

    // A takes the lower position and stays open; B commits a higher one.
    let mut a = PgConnection::connect(&f.db.url).await?;
    sqlx::query("BEGIN").execute(&mut a).await?;
    let position_a = insert_in(&mut a, "order-a", 1).await?;
    insert(&f.db.pool, "order-b", 1).await?;
    insert(&f.db.pool, "order-b", 2).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // B is held back behind A: publishing it now could let A be skipped
    assert!(f.published(&f.namespace, "Order").await?.is_empty());

    sqlx::query("COMMIT").execute(&mut a).await?;
    let published = f.wait_for(&f.namespace, "Order", 3).await?;
    let order: Vec<(String, u64)> = published.iter().map(|e| (e.aggregate_id.clone(), e.sequence)).collect();
    assert_eq!(
        order,
        vec![("order-a".into(), 1), ("order-b".into(), 1), ("order-b".into(), 2)]
    );
    assert_eq!(published[0].global_position, position_a);
    relay.abort();
    Ok(())
}

/// The case a `global_position` cursor gets wrong: B's transaction id is
/// older than A's but B draws the higher position and commits first.
#[tokio::test]
async fn a_lower_position_committed_after_a_higher_one_is_still_published() -> anyhow::Result<()> {
    let f = fixture().await?;
    let relay = f.relay(&f.namespace, 100);

    let mut b = PgConnection::connect(&f.db.url).await?;
    let mut a = PgConnection::connect(&f.db.url).await?;
    sqlx::query("BEGIN").execute(&mut b).await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut b).await?; // B's xid first
    sqlx::query("BEGIN").execute(&mut a).await?;
    let position_a = insert_in(&mut a, "order-a", 1).await?; // A: newer xid, lower position
    let position_b = insert_in(&mut b, "order-b", 1).await?;
    assert!(position_a < position_b);
    sqlx::query("COMMIT").execute(&mut b).await?;

    let first = f.wait_for(&f.namespace, "Order", 1).await?;
    assert_eq!(first[0].aggregate_id, "order-b");
    sqlx::query("COMMIT").execute(&mut a).await?;
    let published = f.wait_for(&f.namespace, "Order", 2).await?;
    assert_eq!(published[1].aggregate_id, "order-a", "the lower position was skipped");
    assert_eq!(published[1].global_position, position_a);
    relay.abort();
    Ok(())
}

#[tokio::test]
async fn a_relay_killed_mid_stream_and_restarted_publishes_everything_once_in_order() -> anyhow::Result<()> {
    let f = fixture().await?;
    // 50 aggregates × 60 events, interleaved, in many transactions
    for sequence in 1..=60_i64 {
        let ids: Vec<String> = (0..50).map(|i| format!("o-{i}")).collect();
        let seqs = vec![sequence; 50];
        let metas = vec![metadata(); 50];
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'Order', i, s, 'OrderCompleted', '1.0', '{\"OrderCompleted\": {}}'::jsonb, m
               FROM UNNEST($1::text[], $2::bigint[], $3::jsonb[]) AS u(i, s, m)",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&metas)
        .execute(&f.db.pool)
        .await?;
    }
    let relay = f.relay(&f.namespace, 37);
    f.wait_for(&f.namespace, "Order", 500).await?;
    relay.abort(); // killed between batches or mid-batch
    let _ = relay.await;
    // as if it had crashed after publishing but before storing its cursor
    sqlx::query("UPDATE relay_cursor SET last_tx_id = '0', last_position = 0")
        .execute(&f.db.pool)
        .await?;

    let relay = f.relay(&f.namespace, 500);
    let published = f.wait_for(&f.namespace, "Order", 3_000).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published_again = f.published(&f.namespace, "Order").await?;
    assert_eq!(published_again.len(), 3_000, "duplicates reached the stream");
    relay.abort();

    let mut ids: Vec<_> = published.iter().map(|e| e.event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3_000);
    let positions: Vec<i64> = published.iter().map(|e| e.global_position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "stream order differs from commit order"
    );
    let mut last = std::collections::HashMap::new();
    for event in &published {
        let previous = last.insert(event.aggregate_id.clone(), event.sequence).unwrap_or(0);
        assert_eq!(
            event.sequence,
            previous + 1,
            "per-aggregate order broken at {}",
            event.aggregate_id
        );
    }
    Ok(())
}

#[tokio::test]
async fn of_two_relays_one_publishes_and_the_other_takes_over_when_it_dies() -> anyhow::Result<()> {
    let f = fixture().await?;
    // The standby publishes into its own namespace so we can see if it ever does.
    let standby_ns = Namespace::new(testkit::unique_namespace())?;
    ensure_topology(
        &f.js,
        &Topology::new(standby_ns.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;

    let active = f.relay(&f.namespace, 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let standby = f.relay(&standby_ns, 100);
    for sequence in 1..=20 {
        insert(&f.db.pool, "order-1", sequence).await?;
    }
    f.wait_for(&f.namespace, "Order", 20).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        f.published(&standby_ns, "Order").await?.is_empty(),
        "the standby published too"
    );

    active.abort(); // its session ends and the lock with it
    let _ = active.await;
    for sequence in 21..=30 {
        insert(&f.db.pool, "order-1", sequence).await?;
    }
    let taken_over = f.wait_for(&standby_ns, "Order", 10).await?;
    let sequences: Vec<u64> = taken_over.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (21..=30).collect::<Vec<u64>>(),
        "the standby resumes from the cursor"
    );
    assert_eq!(f.published(&f.namespace, "Order").await?.len(), 20);
    standby.abort();
    Ok(())
}

#[tokio::test]
async fn published_messages_carry_id_trace_and_routing_headers() -> anyhow::Result<()> {
    let f = fixture().await?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let meta = events::EventMetadata::system("test").with_trace(traceparent, None);
    sqlx::query(INSERT)
        .bind("order-t")
        .bind(1_i64)
        .bind(serde_json::to_value(meta.to_map())?)
        .execute(&f.db.pool)
        .await?;
    let relay = f.relay(&f.namespace, 100);
    let published = f.wait_for(&f.namespace, "Order", 1).await?;
    relay.abort();
    let stream = f.js.get_stream(f.namespace.events_stream("Order")).await?;
    let raw = stream.get_raw_message(1).await?;
    let header = |name: &str| raw.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        header("Nats-Msg-Id"),
        Some(events::event_id("Order", "order-t", 1).to_string())
    );
    assert_eq!(header("traceparent").as_deref(), Some(traceparent));
    assert_eq!(header("Cp-Aggregate-Id").as_deref(), Some("order-t"));
    assert_eq!(header("Cp-Event-Type").as_deref(), Some("OrderCompleted"));
    assert_eq!(published[0].metadata.correlation_id, meta.correlation_id);
    Ok(())
}

/// On a Postgres of the test's own with `synchronous_commit = off` and its
/// WAL writer frozen: events are appended and published, then the server
/// stops at once. Every event that reached JetStream must still be in the
/// store after crash recovery; without the relay's durable commit before
/// publishing, all of them were published and lost (a phantom each).
#[tokio::test]
async fn nothing_published_is_lost_when_postgres_crashes_with_synchronous_commit_off() -> anyhow::Result<()> {
    testkit::init_logs();
    let mut server = testkit::PostgresServer::start(testkit::postgres_server::Durability::LoseRecentCommits).await?;
    let admin = PgPool::connect(&server.url("postgres")).await?;
    sqlx::query("CREATE DATABASE relay_crash").execute(&admin).await?;
    admin.close().await;
    let pool = PgPool::connect(&server.url("relay_crash")).await?;
    platform::pg::migrate(&pool).await?;
    let js = cp_nats::jetstream(testkit::nats().await?, 1_000);
    let namespace = Namespace::new(testkit::unique_namespace())?;
    ensure_topology(
        &js,
        &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
    )
    .await?;
    let relay = Relay::new(
        pool.clone(),
        Publisher::new(js.clone(), 1_024),
        namespace.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::default()
        },
    );
    let relaying = tokio::spawn(relay.run(std::future::pending()));
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&pool).await?;
    assert_eq!(setting, "off");
    // from here on, the commits' WAL stays in memory: the crash takes them back
    server.stall_wal_writer().await?;
    for i in 0..50 {
        insert(&pool, &format!("order-{i}"), 1).await?;
    }
    let stream = js.get_stream(namespace.events_stream("Order")).await?;
    testkit::eventually(Duration::from_secs(10), || {
        let stream = stream.clone();
        async move {
            let mut stream = stream;
            Ok(stream.info().await?.state.messages == 50)
        }
    })
    .await?;
    relaying.abort();
    pool.close().await;

    server.stop_immediately()?;
    server.start_again().await?;
    let pool = PgPool::connect(&server.url("relay_crash")).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;
    assert_eq!(stored, 50, "every published event survived the crash");
    Ok(())
}
