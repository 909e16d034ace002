//! Postgres: the pool every service uses and the embedded migrations.

use std::time::Duration;

use sqlx::{PgPool, migrate::Migrator, postgres::PgPoolOptions};

use crate::{config::PostgresConfig, startup::wait_for};

/// The SQL migrations of `migrations/`, compiled into every binary that needs them.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A pooled connection idle longer than this is pinged before it is handed
/// out; one used more recently is trusted.
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Connects a pool, waiting up to `timeout` for the server.
///
/// sqlx pings every connection before handing it out by default: a full
/// round trip in front of every statement, a third of the query API's
/// round trips under load (docs/BENCHMARKS.md). Only connections idle for
/// [`PING_IDLE_AFTER`] are pinged now, which still weeds out what a server
/// restart broke while the service was quiet; a query on a connection broken
/// within the last second fails like one in flight at the restart, and the
/// broken connection is dropped.
pub async fn connect(config: &PostgresConfig, timeout: Duration) -> anyhow::Result<PgPool> {
    let options = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IDLE_AFTER {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        });
    let url = config.database_url.expose();
    wait_for("postgres", timeout, || options.clone().connect(url)).await
}

/// Applies every pending migration; safe to run concurrently with itself
/// (sqlx takes an advisory lock) and a no-op when the schema is current.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// `SELECT 1` with a short timeout: the health probe.
pub async fn ping(pool: &PgPool) -> Result<(), String> {
    let probe = sqlx::query("SELECT 1").execute(pool);
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}
