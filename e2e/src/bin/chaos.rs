//! `citypicks-chaos`: the fault suite (`./dev chaos`). Runs each scenario of
//! `e2e::chaos` on servers of its own, prints the table, and with `--write`
//! puts it into docs/RELIABILITY.md. Exits non-zero if any scenario failed.

use std::{io::Write as _, path::PathBuf};

use clap::Parser;
use e2e::chaos::{self, Fault, Infra, SaleConfig};

#[derive(Debug, Parser)]
#[command(about = "Kill each part of City Picks mid-sale and check that nothing is lost")]
struct Args {
    /// The faults to run (default: all of them).
    #[arg(long, value_enum, value_delimiter = ',')]
    fault: Vec<Fault>,
    /// The CI-sized sale instead of the full one.
    #[arg(long)]
    small: bool,
    /// Where the service binaries are (default: `$CP_BIN_DIR`, else target/debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where each scenario's service logs go.
    #[arg(long, default_value = ".data/chaos/logs")]
    logs: PathBuf,
    /// Write the table into this markdown file, between its chaos markers.
    #[arg(long)]
    write: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let faults = if args.fault.is_empty() {
        Fault::ALL.to_vec()
    } else {
        args.fault
    };
    let config = if args.small {
        SaleConfig::ci()
    } else {
        SaleConfig::full()
    };
    let bins = args.bin_dir.unwrap_or_else(chaos::bin_dir);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("==> starting Postgres, a 3-node JetStream cluster and a 6-node Redis Cluster");
    let mut infra = Infra::start().await?;
    let mut outcomes = Vec::new();
    for fault in faults {
        eprintln!("==> {}", fault.describe());
        let outcome = chaos::run(fault, &config, &mut infra, &bins, &args.logs).await?;
        eprintln!(
            "    202: {}, lost: {}, consistent after back: {:?}, repairs: {:?}: {}",
            outcome.admitted,
            outcome.lost,
            outcome.consistent_after,
            outcome.repairs,
            if outcome.met(chaos::GOAL) { "pass" } else { "FAIL" }
        );
        for difference in &outcome.replay_differences {
            eprintln!("    replay differs: {difference}");
        }
        outcomes.push(outcome);
    }
    let table = chaos::table(&outcomes);
    let stamped = format!(
        "Run {} ({} build of the services, sale of {} units, {} users × {} attempts over {:?}, fault at {:?}, part back {:?} later; load average before: {}).\n\n{table}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if bins.ends_with("release") { "release" } else { "debug" },
        config.stock,
        config.users,
        config.attempts_per_user,
        config.duration,
        config.fault_at,
        config.down_for,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    // the table is the program's output; progress goes to stderr
    writeln!(std::io::stdout().lock(), "{stamped}")?;
    if let Some(path) = args.write {
        let document = std::fs::read_to_string(&path)?;
        std::fs::write(&path, chaos::splice(&document, &stamped)?)?;
        eprintln!("==> wrote {}", path.display());
    }
    anyhow::ensure!(
        outcomes.iter().all(|o| o.met(chaos::GOAL)),
        "some scenarios failed or were consistent again only after more than {:?}",
        chaos::GOAL
    );
    Ok(())
}
