//! `citypicks-dlq` against real servers: each place dead letters are parked,
//! listed, re-driven (failing again, then succeeding once fixed), re-driven
//! twice (nothing happens twice), dropped with a reason, all audited.

mod edge;
mod projections;
mod stream;
mod timeouts;

use chrono::Utc;
use clap::Parser as _;
use cp_nats::dead_letters::DeadLetters;
use dlq::{Cli, Exit, entry::Sources};
use events::Namespace;

/// One test's places: its own database, namespace and Redis prefix.
pub struct Places {
    pub db: testkit::TestDb,
    pub js: async_nats::jetstream::Context,
    pub namespace: Namespace,
    pub prefix: String,
    pub sources: Sources,
}

impl Places {
    pub async fn new() -> anyhow::Result<Self> {
        testkit::init_logs();
        let db = testkit::TestDb::new().await?;
        let js = async_nats::jetstream::new(testkit::nats().await?);
        let namespace: Namespace = testkit::unique_namespace().parse()?;
        let topology = cp_nats::Topology::new(namespace.clone()).with_replicas(testkit::nats_stream_replicas());
        cp_nats::ensure_topology(&js, &topology).await?;
        let prefix = testkit::unique_prefix();
        let sources = Sources {
            pool: db.pool.clone(),
            dead_letters: DeadLetters::new(js.clone(), namespace.clone()),
            kv: testkit::kv_client().connect().await?,
            prefix: prefix.clone(),
        };
        Ok(Self {
            db,
            js,
            namespace,
            prefix,
            sources,
        })
    }

    /// Runs `citypicks-dlq <args>` in process; its exit, stdout and stderr.
    pub async fn dlq(&self, args: &[&str]) -> anyhow::Result<(Exit, String, String)> {
        let cli = Cli::try_parse_from(std::iter::once("citypicks-dlq").chain(args.iter().copied()))?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let exit = dlq::execute(
            &cli.command,
            cli.json,
            &self.sources,
            "tester",
            Utc::now(),
            &mut out,
            &mut err,
        )
        .await?;
        Ok((exit, String::from_utf8(out)?, String::from_utf8(err)?))
    }

    /// `list --json` with `args`: the entries.
    pub async fn entries(&self, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let (exit, out, err) = self.dlq(&all).await?;
        anyhow::ensure!(exit == Exit::Done, "list failed: {err}");
        let listed: serde_json::Value = serde_json::from_str(&out)?;
        Ok(listed["entries"].as_array().cloned().unwrap_or_default())
    }

    /// Every audit row: (entry, action, outcome, operator).
    pub async fn audit(&self) -> anyhow::Result<Vec<(String, String, String, String)>> {
        Ok(
            sqlx::query_as("SELECT entry_id, action, outcome, operator FROM dead_letter_actions ORDER BY id")
                .fetch_all(&self.db.pool)
                .await?,
        )
    }

    pub async fn finish(self) -> anyhow::Result<()> {
        self.db.drop_database().await
    }
}

pub use testkit::eventually;

#[tokio::test]
async fn bad_usage_exits_2_and_changes_nothing() -> anyhow::Result<()> {
    let places = Places::new().await?;
    for args in [
        &["show", "events:zero"][..],
        &["redrive", "projections:invoices:00000000-0000-0000-0000-000000000001"],
        &["redrive", "events:1", "--since", "1h"],
        &["drop", "events:1", "--reason", "   "],
        &["redrive", "--all-matching", "--state", "dropped"],
    ] {
        let (exit, _, err) = places.dlq(args).await?;
        assert_eq!(exit, Exit::Usage, "{args:?}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
    }
    // clap refuses what it can parse itself (and exits 2 in the binary)
    assert!(places.dlq(&["list", "--source", "kafka"]).await.is_err());
    assert!(places.dlq(&["list", "--since", "yesterday-ish"]).await.is_err());
    assert!(
        places.dlq(&["drop", "events:1"]).await.is_err(),
        "a drop needs a reason"
    );
    assert!(places.dlq(&["redrive"]).await.is_err(), "ids or --all-matching");
    assert!(places.audit().await?.is_empty());
    let (exit, out, _) = places.dlq(&["redrive", "events:99"]).await?;
    assert_eq!(exit, Exit::SomeFailed, "an id nothing holds: {out}");
    assert!(out.contains("not_found"), "{out}");
    places.finish().await
}
