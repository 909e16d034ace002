//! `citypicks-migrate`: applies the SQL migrations to `DATABASE_URL` and exits.

use clap::Parser;
use platform::config::{PostgresConfig, StartupConfig, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(about = "Apply City Picks database migrations")]
struct Config {
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    startup: StartupConfig,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = platform::telemetry::init("citypicks-migrate", &config.telemetry)?;
    let pool = platform::pg::connect(&config.postgres, config.startup.timeout()).await?;
    platform::pg::migrate(&pool).await?;
    tracing::info!(
        migrations = platform::pg::MIGRATOR.iter().count(),
        "database is up to date"
    );
    Ok(())
}
