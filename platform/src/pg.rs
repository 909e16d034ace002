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

/// Whether the database answers [`ping`]: a consumer's probe (`cp_nats::probe`)
/// telling a database that is away from a message that is wrong.
pub async fn answers(pool: PgPool) -> bool {
    ping(&pool).await.is_ok()
}

/// The channel on which the projections announce, with each committed batch,
/// which documents changed: the query API's document cache forgets them.
pub const VIEW_CHANGES_CHANNEL: &str = "view_changes";

/// Below Postgres' 8,000-byte limit on a notification's payload.
const MAX_PAYLOAD: usize = 7_900;

/// What one notification on [`VIEW_CHANGES_CHANNEL`] says changed in a view
/// table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// These documents are now at least at these versions.
    Documents { table: String, changed: Vec<(String, u64)> },
    /// The whole table was replaced (a replay's swap).
    Table { table: String },
}

impl ViewChange {
    /// The payloads announcing `changed` documents of `table`, as few as fit:
    /// `table`, then one `id version` line per document.
    pub fn payloads(table: &str, changed: &[(String, u64)]) -> Vec<String> {
        let mut payloads = Vec::new();
        let mut current = String::from(table);
        for (id, version) in changed {
            let line = format!("\n{id} {version}");
            if current.len() + line.len() > MAX_PAYLOAD && current.len() > table.len() {
                payloads.push(std::mem::replace(&mut current, String::from(table)));
            }
            current.push_str(&line);
        }
        if current.len() > table.len() {
            payloads.push(current);
        }
        payloads
    }

    /// The payload announcing that all of `table` changed.
    pub fn whole_table(table: &str) -> String {
        format!("{table}\n*")
    }

    /// Reads a payload; `None` for one this version does not understand.
    pub fn parse(payload: &str) -> Option<Self> {
        let mut lines = payload.split('\n');
        let table = lines.next().filter(|t| !t.is_empty())?.to_owned();
        let mut changed = Vec::new();
        for line in lines {
            if line == "*" {
                return Some(Self::Table { table });
            }
            let (id, version) = line.rsplit_once(' ')?;
            changed.push((id.to_owned(), version.parse().ok()?));
        }
        Some(Self::Documents { table, changed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_changes_fit_in_notifications_and_read_back_as_written() {
        let changed: Vec<(String, u64)> = (0..1_000).map(|n| (format!("{:036}", n), n)).collect();
        let payloads = ViewChange::payloads("order_view", &changed);
        assert!(payloads.len() > 1, "1,000 ids need several notifications");
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let mut read = Vec::new();
        for payload in &payloads {
            match ViewChange::parse(payload) {
                Some(ViewChange::Documents { table, changed }) => {
                    assert_eq!(table, "order_view");
                    read.extend(changed);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(read, changed);
        assert!(ViewChange::payloads("order_view", &[]).is_empty());
        assert_eq!(
            ViewChange::parse(&ViewChange::whole_table("voucher_view")),
            Some(ViewChange::Table {
                table: "voucher_view".into()
            })
        );
        assert_eq!(ViewChange::parse(""), None);
        assert_eq!(ViewChange::parse("order_view\nid not-a-number"), None);
    }
}
