//! What the projection tests share: a fresh database and namespace, the
//! daemon running in-process, and events put in the store and on JetStream
//! the way the command side's relay puts them.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use cp_nats::{Outgoing, Publisher, Topology};
use cqrs_es::DomainEvent;
use events::{AggregateEvents, EventEnvelope, EventMetadata, Namespace};
use projections::{Daemon, Projection, daemon::consumer_name};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct Setup {
    pub db: testkit::TestDb,
    pub namespace: Namespace,
    pub js: async_nats::jetstream::Context,
    stop: CancellationToken,
    daemon: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Setup {
    pub async fn new() -> anyhow::Result<Self> {
        let db = testkit::TestDb::new().await?;
        let namespace = Namespace::new(testkit::unique_namespace())?;
        let js = cp_nats::jetstream(testkit::nats().await?, 5_000);
        cp_nats::ensure_topology(
            &js,
            &Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas()),
        )
        .await?;
        Ok(Self {
            db,
            namespace,
            js,
            stop: CancellationToken::new(),
            daemon: None,
        })
    }

    pub fn start_daemon(&mut self, max_deliver: i64) {
        let daemon = Daemon {
            pool: self.db.pool.clone(),
            js: self.js.clone(),
            namespace: self.namespace.clone(),
            batch_size: 500,
            max_deliver,
            workers: 2,
        };
        self.daemon = Some(tokio::spawn(daemon.run(self.stop.clone())));
    }

    pub async fn stop_daemon(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(task) = self.daemon.take() {
            task.await??;
        }
        self.stop = CancellationToken::new();
        Ok(())
    }

    /// True once a projection's consumer has acknowledged all it was given.
    pub async fn caught_up(&self, projection: Projection) -> anyhow::Result<bool> {
        let stream = self
            .js
            .get_stream(self.namespace.events_stream(projection.aggregate_type()))
            .await?;
        let state = stream.get_info().await?.state;
        match stream.consumer_info(consumer_name(projection.name())).await {
            Ok(info) => Ok(info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence >= state.last_sequence),
            Err(_) => Ok(state.messages == 0),
        }
    }

    pub async fn wait_caught_up(&self) -> anyhow::Result<()> {
        testkit::eventually(Duration::from_secs(30), || async {
            for projection in Projection::ALL {
                if !self.caught_up(projection).await? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
    }

    /// Stores the event in `events` (as the command side would) and returns
    /// its envelope.
    pub async fn store<E: AggregateEvents + DomainEvent>(
        &self,
        aggregate_id: &str,
        sequence: u64,
        event: &E,
    ) -> anyhow::Result<EventEnvelope> {
        let payload = serde_json::to_value(event)?;
        self.store_raw(
            E::AGGREGATE_TYPE,
            aggregate_id,
            sequence,
            &event.event_type(),
            &event.event_version(),
            payload,
        )
        .await
    }

    /// Stores any payload, even one no projector can read.
    pub async fn store_raw(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: u64,
        event_type: &str,
        event_version: &str,
        payload: serde_json::Value,
    ) -> anyhow::Result<EventEnvelope> {
        let metadata = serde_json::to_value(EventMetadata::system("test").to_map())?;
        let row = sqlx::query(&format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {}",
            event_store::ENVELOPE_COLUMNS
        ))
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(i64::try_from(sequence)?)
        .bind(event_type)
        .bind(event_version)
        .bind(payload)
        .bind(metadata)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(event_store::envelope_from_row(&row)?)
    }

    /// Publishes as the relay does; `redelivery` gives it a fresh message id
    /// so JetStream's dedupe lets the copy through to the consumer.
    pub async fn publish(&self, envelope: &EventEnvelope, redelivery: bool) -> anyhow::Result<()> {
        let msg_id = if redelivery {
            Uuid::new_v4().to_string()
        } else {
            envelope.event_id.to_string()
        };
        let message = Outgoing::new(
            self.namespace.events_subject(&envelope.aggregate_type),
            msg_id,
            serde_json::to_vec(envelope)?,
        );
        Publisher::new(self.js.clone(), 16).publish(message).await?;
        Ok(())
    }

    /// Every row of a view table: id → (version, doc).
    pub async fn rows(&self, table: &str) -> anyhow::Result<Vec<(String, i64, serde_json::Value)>> {
        Ok(
            sqlx::query_as(&format!("SELECT id, version, doc FROM {table} ORDER BY id"))
                .fetch_all(&self.db.pool)
                .await?,
        )
    }

    pub async fn doc(&self, table: &str, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        Ok(sqlx::query_scalar(&format!("SELECT doc FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?)
    }

    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.stop_daemon().await?;
        self.db.drop_database().await
    }
}

pub fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + second, 0).single().expect("time")
}
