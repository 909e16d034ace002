//! The edge's dead letters: stream entries the forwarder could not read,
//! parked in the voucher's `:dead` stream (field `id` = where the entry was,
//! then its fields). Read and re-driven by the `citypicks-dlq` CLI.
//!
//! Vouchers with dead letters are remembered in a set of their own
//! ([`keys::dead_letter_registry`]): the forwarders' registry forgets a
//! voucher once its sale is over. A re-drive moves the entry back into the
//! voucher's stream atomically (`lua/redrive.lua`: a second re-drive of the
//! same entry moves nothing) and registers the voucher with the forwarders
//! again; the forwarder then publishes it (the claim writer dedupes by order
//! id) or parks it once more.

use std::{sync::LazyLock, time::Duration};

use chrono::{DateTime, TimeZone as _, Utc};
use platform::kv::Kv;
use redis::{AsyncCommands as _, RedisResult, Script, streams::StreamRangeReply};
use uuid::Uuid;

use crate::keys::{self, VoucherKeys};

static REDRIVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/redrive.lua")));

/// One parked entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeDeadLetter {
    pub voucher_id: Uuid,
    /// Its id in the `:dead` stream.
    pub entry_id: String,
    /// Its id in the voucher's stream when it was parked.
    pub stream_entry_id: String,
    /// Its fields (`o` order id, `u` user id, `tp`/`ts` trace context), as text.
    pub fields: Vec<(String, String)>,
    pub parked_at: DateTime<Utc>,
}

impl EdgeDeadLetter {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What became of a re-drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeOutcome {
    /// The forwarder published it.
    Forwarded,
    /// The forwarder parked it again: the new entry.
    FailedAgain(Box<EdgeDeadLetter>),
    /// Still in the stream after the wait (no forwarder running?).
    Unconfirmed,
}

/// Every voucher that may hold dead letters: those that ever parked one,
/// and those the forwarders read now.
pub async fn vouchers(kv: &mut Kv, prefix: &str) -> RedisResult<Vec<Uuid>> {
    let (dead, live): (Vec<String>, Vec<String>) = redis::pipe()
        .smembers(keys::dead_letter_registry(prefix))
        .smembers(keys::registry(prefix))
        .query_async(kv)
        .await?;
    let mut ids: Vec<Uuid> = dead.iter().chain(&live).filter_map(|id| id.parse().ok()).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Every parked entry of every voucher, at or after `since`.
pub async fn list(kv: &mut Kv, prefix: &str, since: Option<DateTime<Utc>>) -> RedisResult<Vec<EdgeDeadLetter>> {
    let start = since.map_or_else(|| "-".to_owned(), |since| since.timestamp_millis().max(0).to_string());
    let mut letters = Vec::new();
    for voucher_id in vouchers(kv, prefix).await? {
        let keys = VoucherKeys::new(prefix, voucher_id);
        let reply: StreamRangeReply = kv.xrange(&keys.dead_letters, start.as_str(), "+").await?;
        letters.extend(reply.ids.iter().map(|entry| parse(voucher_id, entry)));
    }
    letters.sort_by_key(|letter| letter.parked_at);
    Ok(letters)
}

/// One parked entry.
pub async fn get(kv: &mut Kv, prefix: &str, voucher_id: Uuid, entry_id: &str) -> RedisResult<Option<EdgeDeadLetter>> {
    let keys = VoucherKeys::new(prefix, voucher_id);
    let reply: StreamRangeReply = kv.xrange(&keys.dead_letters, entry_id, entry_id).await?;
    Ok(reply.ids.first().map(|entry| parse(voucher_id, entry)))
}

/// Moves the entry back into its voucher's stream; its new stream id, or
/// `None` when it is no longer parked.
pub async fn redrive(kv: &mut Kv, prefix: &str, voucher_id: Uuid, entry_id: &str) -> RedisResult<Option<String>> {
    let keys = VoucherKeys::new(prefix, voucher_id);
    // registered first: an entry back in a stream no forwarder reads would wait forever
    let _: i64 = kv.sadd(keys::registry(prefix), voucher_id.to_string()).await?;
    REDRIVE
        .key(&keys.dead_letters)
        .key(&keys.stream)
        .arg(entry_id)
        .arg(crate::gate::FORWARDER_GROUP)
        .invoke_async(kv)
        .await
}

/// Waits up to `wait` for the forwarder to take the re-driven entry
/// `stream_entry_id` out of the stream, then tells whether it parked it again.
pub async fn outcome(
    kv: &mut Kv,
    prefix: &str,
    voucher_id: Uuid,
    stream_entry_id: &str,
    wait: Duration,
) -> RedisResult<EdgeOutcome> {
    let keys = VoucherKeys::new(prefix, voucher_id);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let reply: StreamRangeReply = kv.xrange(&keys.stream, stream_entry_id, stream_entry_id).await?;
        if reply.ids.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(EdgeOutcome::Unconfirmed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // parked again under a later id, with `id` = the re-driven entry's
    let start = stream_entry_id.split('-').next().unwrap_or("-");
    let reply: StreamRangeReply = kv.xrange(&keys.dead_letters, start, "+").await?;
    Ok(reply
        .ids
        .iter()
        .map(|entry| parse(voucher_id, entry))
        .find(|letter| letter.stream_entry_id == stream_entry_id)
        .map_or(EdgeOutcome::Forwarded, |letter| {
            EdgeOutcome::FailedAgain(Box::new(letter))
        }))
}

fn parse(voucher_id: Uuid, entry: &redis::streams::StreamId) -> EdgeDeadLetter {
    let text = |value: &redis::Value| match value {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::SimpleString(text) => text.clone(),
        other => format!("{other:?}"),
    };
    let mut stream_entry_id = String::new();
    let mut fields = Vec::new();
    for (name, value) in &entry.map {
        if name == "id" && stream_entry_id.is_empty() {
            stream_entry_id = text(value);
        } else {
            fields.push((name.clone(), text(value)));
        }
    }
    fields.sort();
    let millis = entry
        .id
        .split('-')
        .next()
        .and_then(|ms| ms.parse::<i64>().ok())
        .unwrap_or(0);
    EdgeDeadLetter {
        voucher_id,
        entry_id: entry.id.clone(),
        stream_entry_id,
        fields,
        parked_at: Utc.timestamp_millis_opt(millis).single().unwrap_or_default(),
    }
}
