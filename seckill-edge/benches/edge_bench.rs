//! The helper program of `./dev bench seckill_edge` (`seckill-edge/bench/run.sh`).
//!
//! ```text
//! edge_bench tokens N FILE [--split T]     N customer JWTs (distinct subs), one a line,
//!                                          signed with $JWT_SECRET; with --split, FILE.0 ..
//!                                          FILE.<T-1>, dealt round robin (one per wrk thread)
//! edge_bench seed STOCK                    load a fresh voucher (sale open now) with STOCK
//!                                          units under --prefix; prints shell assignments
//!                                          VOUCHER=, META=, USERS=, RES=, STREAM=, RATE=, IDEM=
//! edge_bench forwarder [--entries N] [--rounds R] [--batch B]
//!                                          N admitted requests prefilled in a voucher's Redis
//!                                          stream → Forwarder::forward_voucher → JetStream in a
//!                                          fresh namespace, R rounds, median requests/s
//! edge_bench jwt-cost [N]                  what verifying one customer JWT costs on one
//!                                          core (JwtKeys::verify, N times, default 200,000)
//! edge_bench cleanup                       UNLINK every key under --prefix
//! edge_bench drop-namespace NS             delete the JetStream streams of namespace NS
//! ```
//! Common options: `--redis-url` (default $REDIS_URL or the dev Redis),
//! `--nats-url` ($NATS_URL or the dev NATS), `--prefix` (Redis key prefix);
//! several comma-separated `--redis-url`s are a Redis Cluster.
//! `forwarder --watch redis=PID,nats=PID` also prints the CPU those processes,
//! this one and the whole machine used while the stream drained (Linux /proc);
//! `--quiet-max-busy P --quiet-wait-secs S` wait before each round until the
//! machine is at most P % busy, and `--foreign-max P --retries N` repeat a
//! round during which other processes used more than P % of a core.

#![allow(clippy::print_stdout)]

use std::{
    collections::HashMap,
    io::{BufWriter, Write as _},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{Duration as Span, Utc};
use cp_nats::{Publisher, Topology};
use events::Namespace;
use platform::{
    clock::SystemClock,
    config::Secret,
    http::{JwtKeys, Role},
    kv::{Kv, KvClient},
};
use seckill_edge::{
    forwarder::{Forwarder, ForwarderConfig},
    gate::Gate,
    keys::{VoucherKeys, registry},
    ledger::VoucherSnapshot,
};
use testkit::bench::median;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The edge's default (`seckill_edge::Config`).
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(86_400);

struct Args {
    positional: Vec<String>,
    options: HashMap<String, String>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut positional = Vec::new();
        let mut options = HashMap::new();
        let mut raw = std::env::args().skip(1).filter(|a| a != "--bench");
        while let Some(arg) = raw.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let value = raw.next().ok_or_else(|| anyhow::anyhow!("--{name} needs a value"))?;
                options.insert(name.to_owned(), value);
            } else {
                positional.push(arg);
            }
        }
        Ok(Self { positional, options })
    }

    fn option(&self, name: &str, env: &str, default: &str) -> String {
        self.options
            .get(name)
            .cloned()
            .or_else(|| std::env::var(env).ok())
            .unwrap_or_else(|| default.to_owned())
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(match self.options.get(name) {
            Some(value) => value.parse()?,
            None => default,
        })
    }

    fn redis_url(&self) -> String {
        self.option("redis-url", "REDIS_URL", "redis://127.0.0.1:56379/")
    }

    fn nats_url(&self) -> String {
        self.option("nats-url", "NATS_URL", "nats://127.0.0.1:54222")
    }

    fn prefix(&self) -> anyhow::Result<String> {
        self.options
            .get("prefix")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("--prefix is required"))
    }

    fn arg(&self, index: usize, what: &str) -> anyhow::Result<&str> {
        self.positional
            .get(index)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("missing {what}"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    match args.positional.first().map(String::as_str) {
        Some("tokens") => tokens(&args),
        Some("jwt-cost") => jwt_cost(&args),
        Some("seed") => seed(&args).await,
        Some("forwarder") => forwarder_bench(&args).await,
        Some("cleanup") => cleanup(&args).await,
        Some("drop-namespace") => {
            let js = jetstream(&args.nats_url()).await?;
            drop_namespace(&js, &Namespace::new(args.arg(1, "namespace")?)?).await
        }
        _ => anyhow::bail!("usage: edge_bench tokens|seed|forwarder|cleanup|drop-namespace ... (see the source)"),
    }
}

/// Several comma-separated URLs: a Redis Cluster.
async fn redis(url: &str) -> anyhow::Result<Kv> {
    Ok(KvClient::from_urls(url, url.contains(','))?.connect().await?)
}

async fn jetstream(url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    Ok(cp_nats::jetstream(async_nats::connect(url).await?, 5_000))
}

/// `tokens N FILE [--split T]`: signing is spread over the cores.
fn tokens(args: &Args) -> anyhow::Result<()> {
    let count: usize = args.arg(1, "N")?.parse()?;
    let file = args.arg(2, "FILE")?;
    let split: usize = args.number("split", 0)?;
    let ttl = Duration::from_secs(args.number("ttl-secs", 4 * 3_600)?);
    let secret = std::env::var("JWT_SECRET").map_err(|_| anyhow::anyhow!("JWT_SECRET is not set"))?;
    let keys = JwtKeys::new(&Secret::new(secret));
    let started = Instant::now();
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let chunk = count.div_ceil(workers).max(1);
    let signed: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let keys = keys.clone();
                scope.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(|i| keys.issue(&format!("u{i:015}"), Role::Customer, ttl))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))?
                    .map_err(Into::into)
            })
            .collect::<anyhow::Result<_>>()
    })?;
    let outputs = if split == 0 {
        vec![file.to_owned()]
    } else {
        (0..split).map(|t| format!("{file}.{t}")).collect()
    };
    let mut writers = outputs
        .iter()
        .map(|path| Ok(BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    for (i, token) in signed.iter().flatten().enumerate() {
        let writer = &mut writers[i % outputs.len()];
        writer.write_all(token.as_bytes())?;
        writer.write_all(b"\n")?;
    }
    for mut writer in writers {
        writer.flush()?;
    }
    eprintln!(
        "{count} tokens in {:.1} s → {}",
        started.elapsed().as_secs_f64(),
        outputs.join(", ")
    );
    Ok(())
}

/// `jwt-cost [N]`: the edge verifies one token per attempt; this is its price.
fn jwt_cost(args: &Args) -> anyhow::Result<()> {
    let count: usize = args.positional.get(1).map_or(Ok(200_000), |n| n.parse())?;
    let secret = std::env::var("JWT_SECRET").unwrap_or_else(|_| "jwt-cost".to_owned());
    let keys = JwtKeys::new(&Secret::new(secret));
    let tokens = (0..1_000)
        .map(|i| keys.issue(&format!("u{i:015}"), Role::Customer, Duration::from_secs(3_600)))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for i in 0..count {
        std::hint::black_box(keys.verify(&tokens[i % tokens.len()])?);
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64;
    println!("JWT_VERIFY micros={micros:.2} per_core_per_sec={:.0}", 1e6 / micros);
    Ok(())
}

fn open_sale(voucher_id: Uuid, stock: u32) -> VoucherSnapshot {
    let now = Utc::now();
    VoucherSnapshot {
        voucher_id,
        stock,
        begins_at: now - Span::hours(1),
        ends_at: now + Span::days(1),
        version: 1,
        buyers: Vec::new(),
    }
}

/// `seed STOCK`: prints the voucher's keys as shell assignments.
async fn seed(args: &Args) -> anyhow::Result<()> {
    let stock: u32 = args.arg(1, "STOCK")?.parse()?;
    let prefix = args.prefix()?;
    let gate = Gate::new(
        redis(&args.redis_url()).await?,
        prefix.clone(),
        IDEMPOTENCY_TTL,
        Arc::new(SystemClock),
    );
    let voucher_id = Uuid::now_v7();
    anyhow::ensure!(
        gate.load(&open_sale(voucher_id, stock)).await?,
        "voucher already loaded"
    );
    let keys = VoucherKeys::new(&prefix, voucher_id);
    for (name, value) in [
        ("VOUCHER", voucher_id.to_string().as_str()),
        ("META", &keys.meta),
        ("BUYERS", &keys.buyers),
        ("RELEASED", &keys.released),
        ("STREAM", &keys.stream),
    ] {
        anyhow::ensure!(!value.contains('\''), "unexpected quote in {value}");
        println!("{name}='{value}'");
    }
    Ok(())
}

/// `cleanup`: every key under the prefix, the registry included.
async fn cleanup(args: &Args) -> anyhow::Result<()> {
    let prefix = args.prefix()?;
    anyhow::ensure!(
        prefix.len() >= 4,
        "refusing to clean up under the short prefix {prefix:?}"
    );
    let mut redis = redis(&args.redis_url()).await?;
    let pattern = format!("{prefix}*");
    let mut cursor = 0_u64;
    let mut removed = 0_usize;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            removed += redis::cmd("UNLINK").arg(&keys).query_async::<usize>(&mut redis).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    eprintln!("removed {removed} keys under {prefix}");
    Ok(())
}

/// Benchmarks leave no streams behind on the dev stack's NATS.
async fn drop_namespace(js: &async_nats::jetstream::Context, namespace: &Namespace) -> anyhow::Result<()> {
    for stream in Topology::new(namespace.clone()).streams() {
        if let Err(error) = js.delete_stream(&stream.name).await {
            // a stream never created (nothing to delete) is fine
            if js.get_stream(&stream.name).await.is_ok() {
                anyhow::bail!("cannot delete stream {}: {error}", stream.name);
            }
        }
    }
    Ok(())
}

/// `forwarder`: a backlog of admitted requests drained into JetStream.
async fn forwarder_bench(args: &Args) -> anyhow::Result<()> {
    let entries: usize = args.number("entries", 300_000)?;
    let rounds: usize = args.number("rounds", 3)?;
    let batch: usize = args.number("batch", 1_000)?;
    let prefix = args.prefix()?;
    let redis_url = args.redis_url();
    let mut redis = redis(&redis_url).await?;
    let js = jetstream(&args.nats_url()).await?;
    let gate = Gate::new(redis.clone(), prefix.clone(), IDEMPOTENCY_TTL, Arc::new(SystemClock));
    let mut watched: Vec<(String, String)> = vec![("forwarder".to_owned(), "self".to_owned())];
    if let Some(list) = args.options.get("watch") {
        for item in list.split(',').filter(|item| !item.is_empty() && !item.ends_with('=')) {
            let (name, pid) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--watch takes name=pid,..."))?;
            watched.push((name.to_owned(), pid.to_owned()));
        }
    }
    let bench = ForwarderBench {
        gate,
        redis_url,
        js,
        entries,
        batch,
        watched,
    };
    let mut rates = Vec::new();
    let quiet_max_busy: f64 = args.number("quiet-max-busy", 100.0)?;
    let quiet_wait = Duration::from_secs(args.number("quiet-wait-secs", 0)?);
    let foreign_max: f64 = args.number("foreign-max", 100.0)?;
    let retries: usize = args.number("retries", 0)?;
    let mut round = 1;
    let mut attempt = 1;
    while round <= rounds {
        wait_quiet(quiet_max_busy, quiet_wait).await;
        let namespace = Namespace::new(format!("b{}", &Uuid::new_v4().simple().to_string()[..12]))?;
        cp_nats::ensure_topology(&bench.js, &Topology::new(namespace.clone())).await?;
        let outcome = forward_round(&bench, &mut redis, &namespace).await;
        drop_namespace(&bench.js, &namespace).await?;
        let (rate, seconds, (cpu, other)) = outcome?;
        if other > foreign_max && attempt <= retries {
            eprintln!(
                "discarded forwarder round {round} ({rate:.0}/s): other processes used {other} % of a core; running it again"
            );
            attempt += 1;
            continue;
        }
        println!(
            "FORWARDER round={round} entries={entries} seconds={seconds:.3} rate={rate:.0} batch={batch} namespace={}",
            namespace.as_str()
        );
        println!("  cpu % of one core while draining: {cpu}");
        if other > foreign_max {
            eprintln!(
                "WARNING: forwarder round {round}: other processes used {other} % of a core; kept after {retries} repeats"
            );
        }
        rates.push(rate);
        round += 1;
        attempt = 1;
    }
    println!("FORWARDER_MEDIAN rate={:.0} rounds={rounds}", median(rates));
    Ok(())
}

/// What every round of the forwarder benchmark shares.
struct ForwarderBench {
    gate: Gate,
    redis_url: String,
    js: async_nats::jetstream::Context,
    entries: usize,
    batch: usize,
    /// (name, pid) of the processes whose CPU is reported ("self": this one)
    watched: Vec<(String, String)>,
}

async fn forward_round(
    bench: &ForwarderBench,
    redis: &mut Kv,
    namespace: &Namespace,
) -> anyhow::Result<(f64, f64, (String, f64))> {
    let voucher_id = Uuid::now_v7();
    let (entries, batch) = (bench.entries, bench.batch);
    let stock = u32::try_from(entries)?;
    bench.gate.load(&open_sale(voucher_id, stock)).await?;
    let keys = bench.gate.keys(voucher_id);
    // what the admission script writes: o, u, t, tp, ts
    let now = Utc::now().timestamp_millis();
    let filled = Instant::now();
    for start in (0..entries).step_by(10_000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 10_000).min(entries) {
            pipe.cmd("XADD")
                .arg(&keys.stream)
                .arg("*")
                .arg("o")
                .arg(Uuid::now_v7().to_string())
                .arg("u")
                .arg(format!("u{i:015}"))
                .arg("t")
                .arg(now)
                .arg("tp")
                .arg("")
                .arg("ts")
                .arg("")
                .ignore();
        }
        pipe.query_async::<()>(redis).await?;
    }
    let length: usize = redis::cmd("XLEN").arg(&keys.stream).query_async(redis).await?;
    anyhow::ensure!(length == entries, "prefilled {length} of {entries}");
    eprintln!("prefilled {entries} entries in {:.1} s", filled.elapsed().as_secs_f64());

    let forwarder = Forwarder::new(
        KvClient::from_urls(&bench.redis_url, false)?,
        bench.gate.prefix(),
        Publisher::new(bench.js.clone(), 4_096),
        namespace.clone(),
        ForwarderConfig {
            batch,
            ..ForwarderConfig::new(format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]))
        },
    );
    let stop = CancellationToken::new();
    let cpu_before = CpuSample::take(&bench.watched);
    let started = Instant::now();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { forwarder.forward_voucher(voucher_id, stop).await })
    };
    let stream = bench.js.get_stream(namespace.seckill_requests_stream()).await?;
    let outcome = loop {
        let left: usize = redis::cmd("XLEN").arg(&keys.stream).query_async(redis).await?;
        if left == 0 {
            break Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(300) {
            break Err(anyhow::anyhow!("forwarder stalled with {left} entries left"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cpu = CpuSample::take(&bench.watched).since(&cpu_before);
    stop.cancel();
    task.await?;
    let elapsed = outcome?;
    let stored = stream.get_info().await?.state.messages;
    redis::cmd("UNLINK")
        .arg(&keys.meta)
        .arg(&keys.buyers)
        .arg(&keys.released)
        .arg(&keys.stream)
        .query_async::<()>(redis)
        .await?;
    redis::cmd("SREM")
        .arg(registry(bench.gate.prefix()))
        .arg(voucher_id.to_string())
        .query_async::<()>(redis)
        .await?;
    anyhow::ensure!(
        stored == u64::try_from(entries)?,
        "JetStream holds {stored} messages, expected {entries}"
    );
    Ok((entries as f64 / elapsed.as_secs_f64(), elapsed.as_secs_f64(), cpu))
}

/// Waits (up to `patience`) until the machine is at most `max_busy` % busy over 2 s.
async fn wait_quiet(max_busy: f64, patience: Duration) {
    let deadline = Instant::now() + patience;
    let mut said = false;
    loop {
        let Some((b0, t0, _)) = machine_ticks() else { return };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Some((b1, t1, _)) = machine_ticks() else { return };
        let busy = 100.0 * b1.saturating_sub(b0) as f64 / t1.saturating_sub(t0).max(1) as f64;
        if busy <= max_busy {
            return;
        }
        if Instant::now() >= deadline {
            if patience > Duration::ZERO {
                eprintln!("WARNING: the machine is still {busy:.0} % busy: measuring anyway");
            }
            return;
        }
        if !said {
            eprintln!("waiting for other processes to finish (machine {busy:.0} % busy)");
            said = true;
        }
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
}

/// CPU ticks (user + system) of some processes and of the whole machine.
struct CpuSample {
    processes: Vec<(String, u64)>,
    busy: u64,
    total: u64,
    /// irq + softirq: loopback TCP mostly runs there, charged to no process
    interrupts: u64,
}

impl CpuSample {
    fn take(watched: &[(String, String)]) -> Self {
        let processes = watched
            .iter()
            .map(|(name, pid)| (name.clone(), process_ticks(pid).unwrap_or(0)))
            .collect();
        let (busy, total, interrupts) = machine_ticks().unwrap_or((0, 0, 0));
        Self {
            processes,
            busy,
            total,
            interrupts,
        }
    }

    /// Percent of one core each process, the rest and the machine used since `before`.
    /// Also returns the percent of a core used by processes not watched.
    fn since(&self, before: &Self) -> (String, f64) {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let wall = (self.total.saturating_sub(before.total)) as f64 / cores;
        if wall <= 0.0 {
            return ("unavailable".to_owned(), 0.0);
        }
        let percent = |ticks: u64| (100.0 * ticks as f64 / wall).round();
        let mut parts = Vec::new();
        let mut accounted = 0;
        for ((name, now), (_, then)) in self.processes.iter().zip(&before.processes) {
            let used = now.saturating_sub(*then);
            accounted += used;
            parts.push(format!("{name} {}", percent(used)));
        }
        let busy = self.busy.saturating_sub(before.busy);
        let interrupts = self.interrupts.saturating_sub(before.interrupts);
        let other = percent(busy.saturating_sub(accounted + interrupts));
        parts.push(format!("irq/softirq {}", percent(interrupts)));
        parts.push(format!("other {other}"));
        let line = format!("{}; busy {} of {}", parts.join(", "), percent(busy), 100.0 * cores);
        (line, other)
    }
}

fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // after "pid (comm) " come the state (field 3) ... utime (14) and stime (15)
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn machine_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4)?;
    let interrupts = values.get(5)? + values.get(6)?;
    Some((total - idle, total, interrupts))
}
