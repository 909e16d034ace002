//! Test helpers for integration tests against the real servers.
//!
//! Each test gets its own isolation unit: a fresh Postgres database with the
//! migrations applied ([`TestDb`]), a private NATS namespace for stream and
//! subject names ([`unique_namespace`]), and a Redis key prefix
//! ([`unique_prefix`]). The servers are the ones `./dev test` starts; their
//! addresses come from `TEST_DATABASE_URL`, `TEST_NATS_URL` and
//! `TEST_REDIS_URL`, defaulting to its ports.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:55433/postgres";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:54223";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:56380/";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn admin_url() -> String {
    env_or("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
}

pub fn nats_url() -> String {
    env_or("TEST_NATS_URL", DEFAULT_NATS_URL)
}

pub fn redis_url() -> String {
    env_or("TEST_REDIS_URL", DEFAULT_REDIS_URL)
}

/// A short random lowercase id, usable in database names, NATS names and keys.
pub fn short_id() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A NATS namespace of this test's own (`t` + random), so streams never collide.
pub fn unique_namespace() -> String {
    format!("t{}", short_id())
}

/// A Redis key prefix of this test's own.
pub fn unique_prefix() -> String {
    format!("t{}:", short_id())
}

/// A freshly created database with every migration applied. `./dev test`
/// drops leftover `t_*` databases before each run.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> anyhow::Result<Self> {
        let db = Self::empty().await?;
        platform::pg::migrate(&db.pool).await.context("migrations")?;
        Ok(db)
    }

    /// A fresh database without migrations (to test the migrations themselves).
    pub async fn empty() -> anyhow::Result<Self> {
        let admin_url = admin_url();
        let name = format!("t_{}", short_id());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .with_context(|| "connecting to the test Postgres (is `./dev test-infra up` running?)".to_owned())?;
        admin.execute(format!(r#"CREATE DATABASE "{name}""#).as_str()).await?;
        admin.close().await?;
        let url = replace_database(&admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await?;
        Ok(Self { name, url, pool })
    }
}

fn replace_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, _) = url.rsplit_once('/').context("database URL without a path")?;
    Ok(format!("{base}/{database}"))
}

pub async fn nats() -> anyhow::Result<async_nats::Client> {
    let url = nats_url();
    async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to the test NATS at {url}"))
}

pub async fn redis() -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(redis_url())?;
    Ok(redis::aio::ConnectionManager::new(client).await?)
}
