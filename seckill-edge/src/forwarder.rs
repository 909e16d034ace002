//! The forwarder: from each voucher's Redis stream to JetStream.
//!
//! Every edge instance runs one, reading each registered voucher's stream
//! with the shared consumer group [`FORWARDER_GROUP`] under its own consumer
//! name. An entry is published as `OrderRequested` with `Nats-Msg-Id` = the
//! order id and the admission's `traceparent`, and XACKed and deleted only
//! after JetStream acknowledged it. A crash in between leaves the entry
//! pending: this instance re-reads its own pending entries on restart, and
//! any instance takes over entries idle longer than `claim_idle` (XAUTOCLAIM).
//! The re-publish is dropped by JetStream's duplicate window, so nothing
//! reaches the claim writer twice.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use bytes::Bytes;
use chrono::{TimeZone as _, Utc};
use cp_nats::{Outgoing, Publisher};
use events::{Namespace, OrderRequested, subjects::MSG_ID};
use platform::{
    kv::{Kv, KvClient},
    telemetry::TraceHeaders,
};
use redis::{
    AsyncCommands as _,
    streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    gate::FORWARDER_GROUP,
    keys::{VoucherKeys, registry},
};

#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// This instance's consumer name in every voucher's group.
    pub consumer: String,
    /// Entries read and published per round.
    pub batch: usize,
    /// How long one read waits for new entries.
    pub block: Duration,
    /// Pending entries idle this long belong to a dead consumer and are taken over.
    pub claim_idle: Duration,
    /// How often the registry of vouchers is re-read.
    pub discovery: Duration,
    /// A voucher whose sale ended this long ago and whose stream is empty is
    /// no longer read.
    pub retire_after: Duration,
}

impl ForwarderConfig {
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            batch: 1_000,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(10),
            // A sale may open as soon as it is created: a request admitted
            // before its voucher is discovered waits for the next look, and
            // the backlog that builds meanwhile lasts the whole sale
            // (measured: a 20,000-unit sale's p99 from 202 to decision was
            // 3.9 s when it opened within the second after creation, 0.4 s
            // when the forwarder was already reading). SMEMBERS five times a
            // second costs nothing.
            discovery: Duration::from_millis(200),
            retire_after: Duration::from_secs(3_600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("published {published} of {total} requests: {source}")]
    Publish {
        published: usize,
        total: usize,
        #[source]
        source: cp_nats::PublishFailure,
    },
}

#[derive(Clone)]
pub struct Forwarder {
    client: KvClient,
    prefix: String,
    publisher: Publisher,
    namespace: Namespace,
    config: ForwarderConfig,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("prefix", &self.prefix)
            .field("namespace", &self.namespace)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(
        client: KvClient,
        prefix: impl Into<String>,
        publisher: Publisher,
        namespace: Namespace,
        config: ForwarderConfig,
    ) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            publisher,
            namespace,
            config,
        }
    }

    /// A connection of its own: blocking reads would stall the shared one.
    pub async fn connection(&self) -> Result<Kv, redis::RedisError> {
        self.client.connect_with(None).await
    }

    /// Forwards every registered voucher's stream until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks: HashMap<Uuid, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut connection: Option<Kv> = None;
        while !shutdown.is_cancelled() {
            if connection.is_none() {
                match self.connection().await {
                    Ok(c) => connection = Some(c),
                    Err(error) => tracing::warn!(%error, "forwarder cannot reach redis"),
                }
            }
            if let Some(c) = connection.as_mut() {
                match c.smembers::<_, Vec<String>>(registry(&self.prefix)).await {
                    Ok(ids) => {
                        tasks.retain(|_, task| !task.is_finished());
                        for id in ids.iter().filter_map(|id| id.parse::<Uuid>().ok()) {
                            tasks.entry(id).or_insert_with(|| {
                                let forwarder = self.clone();
                                let stop = shutdown.child_token();
                                tokio::spawn(async move { forwarder.forward_voucher(id, stop).await })
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot read the voucher registry"),
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(self.config.discovery) => {}
            }
        }
        for (_, task) in tasks {
            let _ = task.await;
        }
    }

    /// Forwards one voucher's stream until shutdown or retirement.
    pub async fn forward_voucher(&self, voucher_id: Uuid, shutdown: CancellationToken) {
        let keys = VoucherKeys::new(&self.prefix, voucher_id);
        let mut connection = loop {
            match self.connection().await {
                Ok(connection) => break connection,
                Err(error) => {
                    tracing::warn!(%voucher_id, %error, "forwarder cannot reach redis");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // own pending entries first: what this consumer read before a restart
        let mut backlog = true;
        let mut next_reclaim = Instant::now();
        let mut next_housekeeping = Instant::now();
        tracing::debug!(%voucher_id, consumer = %self.config.consumer, "forwarding");
        while !shutdown.is_cancelled() {
            let round = async {
                if Instant::now() >= next_housekeeping {
                    next_housekeeping = Instant::now() + Duration::from_secs(1);
                    if self.housekeeping(&mut connection, &keys, voucher_id).await? {
                        return Ok(false);
                    }
                }
                if Instant::now() >= next_reclaim {
                    next_reclaim = Instant::now() + self.config.claim_idle / 2;
                    self.reclaim(&mut connection, &keys, voucher_id).await?;
                }
                let entries = self.read(&mut connection, &keys, backlog).await?;
                if entries.is_empty() {
                    backlog = false;
                } else {
                    self.forward(&mut connection, &keys, voucher_id, &entries).await?;
                }
                Ok::<bool, ForwardError>(true)
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                outcome = round => match outcome {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(%voucher_id, "sale over and stream drained: no longer forwarding");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%voucher_id, %error, "forwarding failed; retrying");
                        backlog = true;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
        }
    }

    /// Reads this consumer's own pending entries (`backlog`) or new ones.
    pub async fn read(
        &self,
        connection: &mut Kv,
        keys: &VoucherKeys,
        backlog: bool,
    ) -> Result<Vec<StreamId>, redis::RedisError> {
        let mut options = StreamReadOptions::default()
            .group(FORWARDER_GROUP, &self.config.consumer)
            .count(self.config.batch);
        if !backlog {
            options = options.block(usize::try_from(self.config.block.as_millis()).unwrap_or(500));
        }
        let id = if backlog { "0" } else { ">" };
        let reply: Option<StreamReadReply> = connection.xread_options(&[&keys.stream], &[id], &options).await?;
        Ok(reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .collect())
    }

    /// Takes over and forwards entries other consumers left pending too long.
    pub async fn reclaim(
        &self,
        connection: &mut Kv,
        keys: &VoucherKeys,
        voucher_id: Uuid,
    ) -> Result<usize, ForwardError> {
        let idle = u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut start = "0-0".to_owned();
        let mut reclaimed = 0;
        loop {
            let options = StreamAutoClaimOptions::default().count(self.config.batch);
            let reply: StreamAutoClaimReply = connection
                .xautoclaim_options(
                    &keys.stream,
                    FORWARDER_GROUP,
                    &self.config.consumer,
                    idle,
                    &start,
                    options,
                )
                .await?;
            if !reply.claimed.is_empty() {
                reclaimed += reply.claimed.len();
                tracing::info!(%voucher_id, entries = reply.claimed.len(), "took over entries of a stalled forwarder");
                metrics::counter!("seckill_forwarder_reclaimed_total").increment(reply.claimed.len() as u64);
                self.forward(connection, keys, voucher_id, &reply.claimed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(reclaimed);
            }
            start = reply.next_stream_id;
        }
    }

    /// Publishes `entries` and awaits every ack; returns how many were published.
    pub async fn publish(&self, voucher_id: Uuid, entries: &[StreamId]) -> Result<usize, ForwardError> {
        let subject = self.namespace.seckill_requests_subject();
        let messages: Vec<Outgoing> = entries
            .iter()
            .filter_map(|entry| request_of(voucher_id, entry))
            .map(|(request, trace)| outgoing(&subject, &request, &trace))
            .collect();
        let total = messages.len();
        match self.publisher.publish_all(messages).await {
            Ok(_) => Ok(total),
            Err(source) => Err(ForwardError::Publish {
                published: source.index,
                total,
                source,
            }),
        }
    }

    /// Publishes, then acknowledges and deletes exactly what JetStream stored.
    pub async fn forward(
        &self,
        connection: &mut Kv,
        keys: &VoucherKeys,
        voucher_id: Uuid,
        entries: &[StreamId],
    ) -> Result<usize, ForwardError> {
        // joined to the traces of the admissions (the entries' `tp`/`ts`)
        let span = if platform::telemetry::exporting() {
            let parents: Vec<_> = entries
                .iter()
                .filter_map(|entry| request_of(voucher_id, entry).map(|(_, trace)| trace.context()))
                .collect();
            platform::telemetry::batch_span(&parents, || {
                tracing::info_span!(
                    "forward_batch",
                    otel.name = "forward_batch",
                    otel.kind = "producer",
                    %voucher_id,
                    entries = entries.len()
                )
            })
        } else {
            tracing::Span::none()
        };
        async {
            let (good, poison): (Vec<&StreamId>, Vec<&StreamId>) = entries
                .iter()
                .partition(|entry| request_of(voucher_id, entry).is_some());
            let good: Vec<StreamId> = good.into_iter().cloned().collect();
            let outcome = self.publish(voucher_id, &good).await;
            let published = match &outcome {
                Ok(n) => *n,
                Err(ForwardError::Publish { published, .. }) => *published,
                Err(_) => 0,
            };
            if !poison.is_empty() {
                // its own command: the registry is in another cluster slot
                // than the voucher's keys of the atomic pipeline below
                let _: i64 = connection
                    .sadd(crate::keys::dead_letter_registry(&self.prefix), voucher_id.to_string())
                    .await?;
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for entry in &poison {
                tracing::error!(%voucher_id, id = %entry.id, "unreadable stream entry moved to the dead letters");
                pipe.cmd("XADD")
                    .arg(&keys.dead_letters)
                    .arg("*")
                    .arg("id")
                    .arg(&entry.id);
                for field in entry.map.keys() {
                    let value: Vec<u8> = entry.get(field).unwrap_or_default();
                    pipe.arg(field).arg(value);
                }
                pipe.ignore();
            }
            let done: Vec<&str> = good[..published]
                .iter()
                .chain(poison.iter().copied())
                .map(|entry| entry.id.as_str())
                .collect();
            if !done.is_empty() {
                pipe.xack(&keys.stream, FORWARDER_GROUP, &done).ignore();
                pipe.xdel(&keys.stream, &done).ignore();
                pipe.query_async::<()>(connection).await?;
            }
            if !poison.is_empty() {
                // no voucher label: the alert says there are some, `citypicks-dlq list --source edge` says where
                metrics::counter!("seckill_forwarder_dead_letters_total").increment(poison.len() as u64);
            }
            metrics::counter!("seckill_forwarded_total").increment(published as u64);
            outcome
        }
        .instrument(span)
        .await
    }

    /// Updates the backlog gauge; true when the voucher should no longer be read.
    async fn housekeeping(
        &self,
        connection: &mut Kv,
        keys: &VoucherKeys,
        voucher_id: Uuid,
    ) -> Result<bool, ForwardError> {
        let (length, ends): (u64, Option<i64>) = redis::pipe()
            .xlen(&keys.stream)
            .hget(&keys.meta, "ends")
            .query_async(connection)
            .await?;
        metrics::gauge!("seckill_forwarder_backlog", "voucher_id" => voucher_id.to_string()).set(length as f64);
        let retire_at = ends.map(|ends| ends + i64::try_from(self.config.retire_after.as_millis()).unwrap_or(i64::MAX));
        if length == 0 && retire_at.is_some_and(|at| at < Utc::now().timestamp_millis()) {
            let _: i64 = connection.srem(registry(&self.prefix), voucher_id.to_string()).await?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// An entry as the request it records, or `None` when it is unreadable.
fn request_of(voucher_id: Uuid, entry: &StreamId) -> Option<(OrderRequested, TraceHeaders)> {
    let order_id = entry.get::<String>("o")?.parse().ok()?;
    let user_id = entry.get::<String>("u")?;
    // the time is in the order id (a UUIDv7); entries of the older layout carry it as `t`
    let millis = if entry.map.contains_key("t") {
        entry.get::<i64>("t")?
    } else {
        crate::gate::order_millis(order_id)?
    };
    let requested_at = Utc.timestamp_millis_opt(millis).single()?;
    let non_empty = |field: &str| entry.get::<String>(field).filter(|value| !value.is_empty());
    let trace = TraceHeaders {
        traceparent: non_empty("tp"),
        tracestate: non_empty("ts"),
    };
    Some((
        OrderRequested {
            order_id,
            voucher_id,
            user_id,
            requested_at,
        },
        trace,
    ))
}

fn outgoing(subject: &str, request: &OrderRequested, trace: &TraceHeaders) -> Outgoing {
    let payload = Bytes::from(serde_json::to_vec(request).unwrap_or_default());
    let mut message = Outgoing::new(subject, request.order_id.to_string(), payload).trace(trace);
    for (name, value) in request.headers() {
        if name != MSG_ID {
            message = message.header(name, value);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::BulkString(v.as_bytes().to_vec())))
                .collect(),
            ..StreamId::default()
        }
    }

    #[test]
    fn an_entry_becomes_the_request_it_records_with_its_trace() {
        let order = Uuid::now_v7();
        let voucher = Uuid::from_u128(5);
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (request, trace) = request_of(
            voucher,
            &entry(&[
                ("o", &order.to_string()),
                ("u", "ann"),
                ("t", "1800000000123"),
                ("tp", traceparent),
                ("ts", ""),
            ]),
        )
        .expect("readable");
        assert_eq!(request.order_id, order);
        assert_eq!(request.voucher_id, voucher);
        assert_eq!(request.user_id, "ann");
        assert_eq!(request.requested_at.timestamp_millis(), 1_800_000_000_123);
        assert_eq!(trace.traceparent.as_deref(), Some(traceparent));
        assert_eq!(trace.tracestate, None);

        let message = outgoing("cp.seckill.requested", &request, &trace);
        assert_eq!(message.msg_id, order.to_string());
        assert_eq!(
            message.headers.get("traceparent").map(|v| v.as_str()),
            Some(traceparent)
        );
        assert_eq!(
            message
                .headers
                .get(events::subjects::HDR_CORRELATION_ID)
                .map(|v| v.as_str()),
            Some(order.to_string().as_str())
        );
        let decoded: OrderRequested = serde_json::from_slice(&message.payload).expect("json");
        assert_eq!(decoded, request);
    }

    #[test]
    fn an_entry_without_a_time_takes_it_from_its_order_id() {
        let order = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 1_800_000_000, 123_000_000));
        let (request, trace) =
            request_of(Uuid::from_u128(5), &entry(&[("o", &order.to_string()), ("u", "ann")])).expect("readable");
        assert_eq!(request.requested_at.timestamp_millis(), 1_800_000_000_123);
        assert_eq!(trace, TraceHeaders::default());
        // an id without a time, and no `t`: nothing to stamp the request with
        let v4 = Uuid::new_v4().to_string();
        assert!(request_of(Uuid::from_u128(5), &entry(&[("o", &v4), ("u", "ann")])).is_none());
    }

    #[test]
    fn unreadable_entries_are_recognised() {
        let voucher = Uuid::from_u128(5);
        assert!(request_of(voucher, &entry(&[("u", "ann"), ("t", "1")])).is_none());
        assert!(request_of(voucher, &entry(&[("o", "not-a-uuid"), ("u", "ann"), ("t", "1")])).is_none());
        assert!(
            request_of(
                voucher,
                &entry(&[("o", &Uuid::now_v7().to_string()), ("u", "ann"), ("t", "x")])
            )
            .is_none()
        );
    }
}
