//! `GET /health`: every dependency probed concurrently with a short timeout;
//! 200 when all answer, 503 (with which one failed) otherwise.

use std::{future::Future, pin::Pin, sync::Arc};

use serde::Serialize;

type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long one probe may take before its dependency counts as down: a
/// `/health` answers, and a scrape (Prometheus waits 4 s) completes, while
/// a server hangs.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Default)]
pub struct Health {
    /// Shared: the state holding it is cloned for every request.
    probes: Arc<Vec<(&'static str, Probe)>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.probes.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Health").field("probes", &names).finish()
    }
}

#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub status: &'static str,
    pub checks: Vec<CheckReport>,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub name: &'static str,
    pub ok: bool,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a named probe; `probe` is called on every `/health` request and
    /// every `/metrics` scrape (gauge `dependency_up{dependency}`, 1 or 0:
    /// how Prometheus learns that a server without an exporter of its own,
    /// NATS, is away).
    pub fn with<F, Fut>(mut self, name: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Arc::make_mut(&mut self.probes).push((name, Arc::new(move || Box::pin(probe()))));
        self
    }

    pub fn postgres(self, pool: sqlx::PgPool) -> Self {
        self.with("postgres", move || {
            let pool = pool.clone();
            async move { crate::pg::ping(&pool).await }
        })
    }

    pub fn redis(self, connection: crate::kv::Kv) -> Self {
        self.with("redis", move || {
            let connection = connection.clone();
            async move { crate::kv::ping(&connection).await }
        })
    }

    pub fn nats(self, client: async_nats::Client) -> Self {
        self.with("nats", move || {
            let client = client.clone();
            async move { crate::bus::ping(&client).await }
        })
    }

    pub async fn check(&self) -> HealthReport {
        let results = futures::future::join_all(self.probes.iter().map(|(name, probe)| {
            let probe = probe.clone();
            async move {
                let answer = tokio::time::timeout(PROBE_TIMEOUT, probe())
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")));
                (*name, answer)
            }
        }))
        .await;
        let checks: Vec<CheckReport> = results
            .into_iter()
            .map(|(name, result)| {
                // The cause may name hosts or users: it goes to the log, not the body.
                if let Err(error) = &result {
                    tracing::warn!(dependency = name, %error, "health probe failed");
                }
                // the probe names are a fixed few: a bounded label
                metrics::gauge!("dependency_up", "dependency" => name).set(if result.is_ok() { 1.0 } else { 0.0 });
                CheckReport {
                    name,
                    ok: result.is_ok(),
                }
            })
            .collect();
        let status = if checks.iter().all(|c| c.ok) {
            "ok"
        } else {
            "unavailable"
        };
        HealthReport { status, checks }
    }
}
