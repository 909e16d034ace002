//! `citypicks-dlq`: the operator's tool for work that failed for good
//! (API.md "Dead-letter CLI"). One id scheme over every place it is parked,
//! list / show / re-drive / drop, text for people and `--json` for scripts.
//!
//! Layout:
//! - [`id`]: the ids (`events:<seq>`, `projections:<name>:<event id>`,
//!   `edge:<voucher>:<entry>`, `timeouts:<order>`) and [`id::Source`];
//! - [`entry`]: dead letters from every place in one shape, and what a
//!   re-drive means in each place;
//! - [`audit`]: `dead_letter_actions`, the record of every re-drive and drop
//!   (this crate owns that table), which also gives an entry its state;
//! - [`Cli`], [`Config`] (env), [`run`] (connect, then [`execute`]).
//!
//! Exit codes: 0 done, 1 some entries failed again (or their outcome was not
//! seen within `--wait`, or were not found, or a source could not be read),
//! 2 bad usage.

pub mod audit;
pub mod entry;
pub mod id;

use std::{io::Write, time::Duration};

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use platform::{
    config::{NatsConfig, PostgresConfig, RedisConfig, StartupConfig, TelemetryConfig},
    errors::DisplayChain,
};
use serde_json::json;

use crate::{
    audit::{Action, NewRecord, Outcome},
    entry::{Entry, Filter, Sources, State},
    id::{EntryId, Source},
};

pub const NAME: &str = "citypicks-dlq";

/// Ids one call takes, at most.
pub const MAX_IDS: usize = 10_000;
/// A drop's reason, at most (characters).
pub const MAX_REASON: usize = 2_000;

#[derive(Debug, Parser)]
#[command(name = NAME, about = "List, show, re-drive and drop City Picks dead letters", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Print JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The edge's Redis key prefix (as the edge's `SECKILL_KEY_PREFIX`).
    #[arg(long, env = "SECKILL_KEY_PREFIX", default_value = "cp:")]
    pub key_prefix: String,
    /// Who acts, for the audit (default: the login name).
    #[arg(long, env = "DLQ_OPERATOR")]
    pub operator: Option<String>,
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub nats: NatsConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub startup: StartupConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// `--operator`, else `login` (the binary passes `$USER`), else "unknown".
    pub fn operator(&self, login: Option<String>) -> String {
        self.operator
            .clone()
            .filter(|name| !name.trim().is_empty())
            .or(login.filter(|name| !name.trim().is_empty()))
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List dead letters (open ones unless `--state` says otherwise), oldest first.
    List(Selection),
    /// Everything one dead letter holds, and what was done with it.
    Show { id: String },
    /// Hand dead letters back to where they failed; idempotent and audited.
    Redrive {
        /// The entries to re-drive.
        #[arg(required_unless_present = "all_matching", num_args = 1..)]
        ids: Vec<String>,
        /// Every open entry the selection takes instead of listed ids.
        #[arg(long, conflicts_with = "ids")]
        all_matching: bool,
        #[command(flatten)]
        selection: Selection,
        /// Say what would be re-driven; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for each entry's consumer to show how it ended (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = parse_wait)]
        wait: Duration,
    },
    /// Give up on dead letters for good, with a reason; they stay listed as dropped.
    Drop {
        #[arg(required = true, num_args = 1..)]
        ids: Vec<String>,
        /// Why (kept in the audit).
        #[arg(long)]
        reason: String,
    },
}

/// Which entries `list` and `redrive --all-matching` take.
#[derive(Debug, Clone, Args)]
pub struct Selection {
    #[arg(long, value_enum, default_value = "all")]
    pub source: SourceArg,
    /// Parked at or after: an RFC 3339 time, or an age such as 30m, 2h, 7d.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Since>,
    /// Only this event type (e.g. OrderRequested, OrderPlaced).
    #[arg(long = "type", value_parser = parse_type)]
    pub event_type: Option<String>,
    /// Only entries in this state (`list` default: open; `redrive` takes open ones only).
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
}

impl Selection {
    fn is_default(&self) -> bool {
        self.source == SourceArg::All && self.since.is_none() && self.event_type.is_none() && self.state.is_none()
    }

    fn filter(&self, now: DateTime<Utc>, default_state: Option<State>) -> Filter {
        Filter {
            sources: match self.source {
                SourceArg::All => Source::ALL.to_vec(),
                SourceArg::Events => vec![Source::Events],
                SourceArg::Projections => vec![Source::Projections],
                SourceArg::Edge => vec![Source::Edge],
                SourceArg::Timeouts => vec![Source::Timeouts],
            },
            since: self.since.map(|since| since.at(now)),
            event_type: self.event_type.clone(),
            state: match self.state {
                None => default_state,
                Some(StateArg::All) => None,
                Some(StateArg::Open) => Some(State::Open),
                Some(StateArg::Redriven) => Some(State::Redriven),
                Some(StateArg::Dropped) => Some(State::Dropped),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceArg {
    All,
    Events,
    Projections,
    Edge,
    Timeouts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Open,
    Redriven,
    Dropped,
    All,
}

/// `--since`: a moment, or an age resolved against the injected clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    At(DateTime<Utc>),
    Ago(Duration),
}

impl Since {
    fn at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::At(at) => at,
            Self::Ago(age) => chrono::Duration::from_std(age)
                .ok()
                .and_then(|age| now.checked_sub_signed(age))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }
}

fn parse_since(text: &str) -> Result<Since, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(Since::At(at.with_timezone(&Utc)));
    }
    match humantime::parse_duration(text) {
        Ok(age) if age <= Duration::from_secs(100 * 365 * 24 * 3600) => Ok(Since::Ago(age)),
        _ => Err(format!(
            "{:?} is neither an RFC 3339 time nor an age such as 30m, 2h, 7d",
            text.chars().take(60).collect::<String>()
        )),
    }
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(wait) if wait <= Duration::from_secs(600) => Ok(wait),
        Ok(_) => Err("at most 10m".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_type(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 100 || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("an event type is 1 to 100 letters, digits or _".to_owned());
    }
    Ok(text.to_owned())
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done,
    /// Some entries failed again, were not found, ended unseen, or a
    /// source could not be read.
    SomeFailed,
    Usage,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Self::Done => 0,
            Self::SomeFailed => 1,
            Self::Usage => 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot connect to {what}")]
    Connect {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("postgres")]
    Postgres(#[from] sqlx::Error),
    #[error("cannot read a dead-letter source")]
    Source(#[from] entry::SourceError),
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output")]
    Json(#[from] serde_json::Error),
}

/// Connects to every place dead letters are parked.
pub async fn connect(config: &Config) -> Result<Sources, DlqError> {
    let timeout = config.startup.timeout();
    let connect = |what: &'static str| {
        move |source: anyhow::Error| DlqError::Connect {
            what,
            source: source.into(),
        }
    };
    let pool = platform::pg::connect(&config.postgres, timeout)
        .await
        .map_err(connect("postgres"))?;
    let nats = platform::bus::connect(&config.nats, NAME, timeout)
        .await
        .map_err(connect("nats"))?;
    let kv = platform::kv::connect(&config.redis, timeout)
        .await
        .map_err(connect("redis"))?;
    let namespace = config
        .nats
        .nats_namespace
        .parse()
        .map_err(|error: events::subjects::NamespaceError| DlqError::Connect {
            what: "nats (NATS_NAMESPACE)",
            source: error.into(),
        })?;
    Ok(Sources {
        pool,
        dead_letters: cp_nats::dead_letters::DeadLetters::new(async_nats::jetstream::new(nats), namespace),
        kv,
        prefix: config.key_prefix.clone(),
    })
}

/// Connects, then executes `cli.command` as `operator`.
pub async fn run(cli: &Cli, operator: &str, out: &mut dyn Write, err: &mut dyn Write) -> Result<Exit, DlqError> {
    let sources = connect(&cli.config).await?;
    execute(&cli.command, cli.json, &sources, operator, Utc::now(), out, err).await
}

/// Executes one command against `sources`; `now` resolves `--since` ages.
pub async fn execute(
    command: &Command,
    json: bool,
    sources: &Sources,
    operator: &str,
    now: DateTime<Utc>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit, DlqError> {
    match command {
        Command::List(selection) => list(sources, &selection.filter(now, Some(State::Open)), json, out, err).await,
        Command::Show { id } => match id.parse::<EntryId>() {
            Ok(id) => show(sources, &id, json, out, err).await,
            Err(error) => usage(err, &error.to_string()),
        },
        Command::Redrive {
            ids,
            all_matching,
            selection,
            dry_run,
            wait,
        } => {
            if !all_matching && !selection.is_default() {
                return usage(
                    err,
                    "--source, --since, --type and --state select entries for --all-matching only",
                );
            }
            if selection.state.is_some_and(|state| state != StateArg::Open) {
                return usage(err, "only open entries are re-driven");
            }
            let targets = if *all_matching {
                let (entries, unreadable) = sources.list(&selection.filter(now, Some(State::Open))).await?;
                warn_unreadable(err, &unreadable)?;
                if !unreadable.is_empty() {
                    // re-driving "all" while a place cannot be read would be a lie
                    return Ok(Exit::SomeFailed);
                }
                entries.into_iter().map(|e| Target::Found(Box::new(e))).collect()
            } else {
                match resolve(sources, ids, err).await? {
                    Ok(targets) => targets,
                    Err(exit) => return Ok(exit),
                }
            };
            redrive(sources, targets, *dry_run, *wait, operator, json, out).await
        }
        Command::Drop { ids, reason } => {
            let reason = reason.trim();
            if reason.is_empty() || reason.chars().count() > MAX_REASON {
                return usage(err, &format!("--reason is 1 to {MAX_REASON} characters"));
            }
            let targets = match resolve(sources, ids, err).await? {
                Ok(targets) => targets,
                Err(exit) => return Ok(exit),
            };
            drop_entries(sources, targets, reason, operator, json, out).await
        }
    }
}

fn usage(err: &mut dyn Write, message: &str) -> Result<Exit, DlqError> {
    writeln!(err, "error: {message}")?;
    Ok(Exit::Usage)
}

fn warn_unreadable(err: &mut dyn Write, unreadable: &[entry::Unreadable]) -> Result<(), DlqError> {
    for source in unreadable {
        writeln!(err, "warning: {}", DisplayChain(source))?;
    }
    Ok(())
}

async fn list(
    sources: &Sources,
    filter: &Filter,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit, DlqError> {
    let (entries, unreadable) = sources.list(filter).await?;
    warn_unreadable(err, &unreadable)?;
    if json {
        let unreadable: Vec<_> = unreadable
            .iter()
            .map(|u| json!({"source": u.source_name, "error": DisplayChain(u).to_string()}))
            .collect();
        serde_json::to_writer_pretty(&mut *out, &json!({"entries": entries, "unreadable": unreadable}))?;
        writeln!(out)?;
    } else if entries.is_empty() {
        writeln!(out, "no dead letters")?;
    } else {
        writeln!(
            out,
            "{:<64} {:<8} {:<20} {:>5} {:<22} REASON",
            "ID", "STATE", "PARKED", "TRIES", "TYPE"
        )?;
        for entry in &entries {
            writeln!(
                out,
                "{:<64} {:<8} {:<20} {:>5} {:<22} {}",
                entry.id,
                state_name(entry.state),
                entry.parked_at.format("%Y-%m-%d %H:%M:%S"),
                entry.attempts,
                entry.event_type.as_deref().unwrap_or("-"),
                one_line(&entry.reason, 100)
            )?;
        }
        writeln!(out, "{} dead letter(s)", entries.len())?;
    }
    Ok(if unreadable.is_empty() {
        Exit::Done
    } else {
        Exit::SomeFailed
    })
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Open => "open",
        State::Redriven => "redriven",
        State::Dropped => "dropped",
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max - 1).collect::<String>())
    } else {
        flat
    }
}

async fn show(
    sources: &Sources,
    id: &EntryId,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Exit, DlqError> {
    let found = sources.get(id).await?;
    // an id may stand for another entry (a projection's refusal on the stream)
    let key = found.as_ref().map_or_else(|| id.to_string(), |entry| entry.id.clone());
    let history = audit::history(&sources.pool, &key).await?;
    let (entry, detail) = match found {
        Some(entry) => {
            let detail = entry.detail();
            (Some(entry), detail)
        }
        // an edge entry leaves Redis when re-driven: the audit kept it
        None => match audit::snapshot(&sources.pool, &key).await? {
            Some(snapshot) => (None, snapshot["detail"].clone()),
            None => {
                writeln!(err, "error: no dead letter {key}")?;
                return Ok(Exit::SomeFailed);
            }
        },
    };
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &json!({"id": key, "entry": entry, "detail": detail, "history": history}),
        )?;
        writeln!(out)?;
        return Ok(Exit::Done);
    }
    writeln!(out, "id:          {key}")?;
    match &entry {
        Some(entry) => {
            writeln!(out, "state:       {}", state_name(entry.state))?;
            writeln!(out, "parked at:   {}", entry.parked_at.to_rfc3339())?;
            writeln!(out, "attempts:    {}", entry.attempts)?;
            writeln!(out, "refused by:  {}", entry.place)?;
            if let Some(event_type) = &entry.event_type {
                writeln!(out, "event type:  {event_type}")?;
            }
            if let Some(key) = &entry.key {
                writeln!(out, "about:       {key}")?;
            }
            writeln!(out, "reason:      {}", one_line(&entry.reason, 2_000))?;
        }
        None => writeln!(out, "state:       no longer parked (as the audit kept it below)")?,
    }
    writeln!(out, "detail:\n{}", serde_json::to_string_pretty(&detail)?)?;
    if history.is_empty() {
        writeln!(out, "history:     none")?;
    } else {
        writeln!(out, "history:")?;
        for record in &history {
            writeln!(
                out,
                "  {} {:?} by {}: {}{}",
                record.recorded_at.to_rfc3339(),
                record.action,
                record.operator,
                record.outcome.name(),
                record
                    .reason
                    .as_deref()
                    .or(record.detail.as_deref())
                    .map(|text| format!(" ({})", one_line(text, 300)))
                    .unwrap_or_default()
            )?;
        }
    }
    Ok(Exit::Done)
}

enum Target {
    Found(Box<Entry>),
    /// Not parked (any more): re-driven or never there.
    Missing(EntryId),
}

/// Parses every id first (one bad id is bad usage, nothing done), then
/// looks each up.
async fn resolve(
    sources: &Sources,
    ids: &[String],
    err: &mut dyn Write,
) -> Result<Result<Vec<Target>, Exit>, DlqError> {
    if ids.len() > MAX_IDS {
        return usage(err, &format!("at most {MAX_IDS} ids per call")).map(Err);
    }
    let mut parsed = Vec::with_capacity(ids.len());
    for id in ids {
        match id.parse::<EntryId>() {
            Ok(id) if !parsed.contains(&id) => parsed.push(id),
            Ok(_) => {}
            Err(error) => return usage(err, &error.to_string()).map(Err),
        }
    }
    let mut targets = Vec::with_capacity(parsed.len());
    for id in parsed {
        targets.push(match sources.get(&id).await? {
            Some(entry) => Target::Found(Box::new(entry)),
            None => Target::Missing(id),
        });
    }
    Ok(Ok(targets))
}

/// One line of a re-drive's or drop's report.
#[derive(Debug, serde::Serialize)]
struct Done {
    id: String,
    /// `redriven`, `failed_again`, `unconfirmed`, `dropped`, or `skipped`,
    /// `not_found`, `would_redrive`.
    outcome: &'static str,
    detail: String,
}

impl Done {
    fn failed(&self) -> bool {
        matches!(self.outcome, "failed_again" | "unconfirmed" | "not_found" | "error")
    }
}

async fn redrive(
    sources: &Sources,
    targets: Vec<Target>,
    dry_run: bool,
    wait: Duration,
    operator: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit, DlqError> {
    let mut report = Vec::with_capacity(targets.len());
    for target in targets {
        let entry = match target {
            Target::Found(entry) => entry,
            Target::Missing(id) => {
                let done = missing(sources, &id).await?;
                print_done(&done, json, out)?;
                report.push(done);
                continue;
            }
        };
        let done = if dry_run {
            match entry.state {
                State::Open => Done {
                    id: entry.id.clone(),
                    outcome: "would_redrive",
                    detail: format!("{} ({})", entry.place, one_line(&entry.reason, 100)),
                },
                state => skipped(&entry.id, state),
            }
        } else {
            redrive_one(sources, &entry, wait, operator).await?
        };
        print_done(&done, json, out)?;
        report.push(done);
    }
    summary(&report, dry_run, json, out)
}

/// Re-drives one entry under its lock, and audits what happened.
async fn redrive_one(sources: &Sources, entry: &Entry, wait: Duration, operator: &str) -> Result<Done, DlqError> {
    let mut tx = sources.pool.begin().await?;
    let latest = audit::lock(&mut tx, &entry.id).await?;
    let entry = entry.clone().with_action(latest);
    if entry.state != State::Open {
        return Ok(skipped(&entry.id, entry.state));
    }
    let result = match sources.redrive(&entry, wait).await {
        Ok(result) => result,
        Err(error) => {
            return Ok(Done {
                id: entry.id.clone(),
                outcome: "error",
                detail: DisplayChain(&error).to_string(),
            });
        }
    };
    audit::write(
        &mut tx,
        &NewRecord {
            id: &entry.id,
            source: entry.source,
            action: Action::Redrive,
            outcome: result.outcome,
            reason: None,
            detail: Some(&result.detail),
            operator,
            entry: &entry.snapshot(),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(Done {
        id: entry.id,
        outcome: result.outcome.name(),
        detail: result.detail,
    })
}

fn skipped(id: &str, state: State) -> Done {
    Done {
        id: id.to_owned(),
        outcome: "skipped",
        detail: format!("already {}", state_name(state)),
    }
}

/// A listed id that is not parked: done before (the audit says), or unknown.
async fn missing(sources: &Sources, id: &EntryId) -> Result<Done, DlqError> {
    let key = id.to_string();
    let latest = audit::latest(&sources.pool, std::slice::from_ref(&key))
        .await?
        .remove(&key);
    Ok(match latest {
        Some(record) => Done {
            id: key,
            outcome: "skipped",
            detail: format!(
                "no longer parked; last {} at {}",
                record.outcome.name(),
                record.recorded_at.to_rfc3339()
            ),
        },
        None => Done {
            id: key,
            outcome: "not_found",
            detail: "no such dead letter".to_owned(),
        },
    })
}

async fn drop_entries(
    sources: &Sources,
    targets: Vec<Target>,
    reason: &str,
    operator: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit, DlqError> {
    let mut report = Vec::with_capacity(targets.len());
    for target in targets {
        let done = match target {
            Target::Missing(id) => missing(sources, &id).await?,
            Target::Found(entry) => {
                let mut tx = sources.pool.begin().await?;
                let latest = audit::lock(&mut tx, &entry.id).await?;
                let entry = entry.with_action(latest);
                if entry.state == State::Open {
                    audit::write(
                        &mut tx,
                        &NewRecord {
                            id: &entry.id,
                            source: entry.source,
                            action: Action::Drop,
                            outcome: Outcome::Dropped,
                            reason: Some(reason),
                            detail: None,
                            operator,
                            entry: &entry.snapshot(),
                        },
                    )
                    .await?;
                    tx.commit().await?;
                    Done {
                        id: entry.id.clone(),
                        outcome: "dropped",
                        detail: reason.to_owned(),
                    }
                } else {
                    skipped(&entry.id, entry.state)
                }
            }
        };
        print_done(&done, json, out)?;
        report.push(done);
    }
    summary(&report, false, json, out)
}

fn print_done(done: &Done, json: bool, out: &mut dyn Write) -> Result<(), DlqError> {
    if !json {
        writeln!(out, "{}  {}  {}", done.id, done.outcome, one_line(&done.detail, 300))?;
    }
    Ok(())
}

fn summary(report: &[Done], dry_run: bool, json: bool, out: &mut dyn Write) -> Result<Exit, DlqError> {
    let count = |outcome: &str| report.iter().filter(|d| d.outcome == outcome).count();
    if json {
        serde_json::to_writer_pretty(&mut *out, &json!({"dry_run": dry_run, "results": report}))?;
        writeln!(out)?;
    } else {
        let parts: Vec<String> = [
            "would_redrive",
            "redriven",
            "dropped",
            "failed_again",
            "unconfirmed",
            "skipped",
            "not_found",
            "error",
        ]
        .into_iter()
        .map(|outcome| (outcome, count(outcome)))
        .filter(|(_, n)| *n > 0)
        .map(|(outcome, n)| format!("{n} {outcome}"))
        .collect();
        writeln!(
            out,
            "{}",
            if parts.is_empty() {
                "nothing to do".to_owned()
            } else {
                parts.join(", ")
            }
        )?;
    }
    Ok(if report.iter().any(Done::failed) {
        Exit::SomeFailed
    } else {
        Exit::Done
    })
}
