//! `replay --projection <name>|all [--dry-run] [--batch N] [--json]`:
//! rebuilds views from the event store and swaps them in while the query API
//! keeps serving (see `projections::replay`). Progress goes to standard
//! error: a bar on a terminal, plain lines otherwise (`projections::progress`);
//! `--json` prints a summary for scripts on standard output. Any error exits
//! non-zero with a message.

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use platform::config::{PostgresConfig, StartupConfig, TelemetryConfig};
use projections::{
    Projection,
    progress::{BarProgress, LineProgress},
    replay::{Progress, ReplayOptions},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    All,
    Orders,
    Coupons,
    Vouchers,
    Products,
}

#[derive(Debug, Parser)]
#[command(name = "replay", about = "Rebuild City Picks views from the event store")]
struct Args {
    /// The projection to rebuild, or all of them.
    #[arg(long, value_enum)]
    projection: Target,
    /// Rebuild and report the differences against the live views; swap nothing.
    #[arg(long)]
    dry_run: bool,
    /// Events read from the store per page.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Print a JSON summary (per projection: events, documents, dead
    /// letters, time, and on a dry run the differences) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    startup: StartupConfig,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match replay(args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("replay failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn replay(args: Args) -> anyhow::Result<ExitCode> {
    let _telemetry = platform::telemetry::init("replay", &args.telemetry)?;
    let pool = platform::pg::connect(&args.postgres, args.startup.timeout()).await?;
    let projections = match args.projection {
        Target::All => Projection::ALL.to_vec(),
        Target::Orders => vec![Projection::Orders],
        Target::Coupons => vec![Projection::Coupons],
        Target::Vouchers => vec![Projection::Vouchers],
        Target::Products => vec![Projection::Products],
    };
    let options = ReplayOptions {
        batch: args.batch as usize,
        dry_run: args.dry_run,
        ..ReplayOptions::default()
    };
    let mut progress: Box<dyn Progress> = if std::io::stderr().is_terminal() {
        Box::new(BarProgress::new())
    } else {
        Box::new(LineProgress::new(std::io::stderr(), Duration::from_secs(5)))
    };
    let mut out = std::io::stdout();
    let mut reports = Vec::new();
    for projection in projections {
        let report = projection.replay(&pool, &options, progress.as_mut()).await?;
        if args.json {
            reports.push(report.to_json());
        } else if let Some(differences) = report.differences {
            if differences.is_empty() {
                writeln!(out, "{projection}: the live view equals the replay")?;
            } else {
                writeln!(
                    out,
                    "{projection}: {} only in the replay, {} only in the live view, {} different; e.g. {}",
                    differences.missing_live,
                    differences.missing_replay,
                    differences.changed,
                    differences.sample.join(", ")
                )?;
            }
        } else {
            writeln!(out, "{projection}: swapped in ({} documents)", report.documents)?;
        }
    }
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({"dry_run": args.dry_run, "projections": reports}),
        )?;
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}
