//! A Postgres server of the test's own (`initdb` and `pg_ctl` from the newest
//! `/usr/lib/postgresql/*/bin`, data in a temp dir, a free port on
//! 127.0.0.1), for the fault suite, which stops it at once mid-sale. As
//! root (CI) its files belong to the `postgres` user and its tools run
//! through `runuser`, as `./dev` does. Stopped (immediately) on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::short_id;

/// How the server trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous_commit = on`: an acknowledged commit survives a crash.
    Full,
    /// `synchronous_commit = off`: an immediate stop loses the acknowledged
    /// commits whose WAL was not written yet (a few, by chance; all since
    /// [`PostgresServer::stall_wal_writer`], for certain), as a failover to
    /// a lagging replica would.
    LoseRecentCommits,
}

#[derive(Debug)]
pub struct PostgresServer {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    durability: Durability,
    running: bool,
    /// The WAL writer's PID while it is stopped (SIGSTOP).
    stalled_wal_writer: Option<u32>,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (install the Debian package postgresql)")?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .context("no Postgres server binaries under /usr/lib/postgresql/*/bin")
}

impl PostgresServer {
    pub async fn start(durability: Durability) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("cp-pg-{}", short_id()));
        std::fs::create_dir_all(dir.join("data"))?;
        let mut server = Self {
            port,
            bin: pg_bin()?,
            dir,
            durability,
            running: false,
            stalled_wal_writer: None,
        };
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&server.dir)
                .status()?;
            anyhow::ensure!(status.success(), "chown postgres {}", server.dir.display());
        }
        server.tool("initdb", |c| {
            c.arg("-D").arg(server.dir.join("data")).args([
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]);
        })?;
        server.start_again().await?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Freezes the WAL writer (SIGSTOP): from now on the WAL of commits
    /// made with `synchronous_commit = off` stays in shared memory (until a
    /// backend must write it), so an immediate stop loses those commits for
    /// certain instead of by chance.
    pub async fn stall_wal_writer(&mut self) -> anyhow::Result<()> {
        let pool = sqlx::postgres::PgPool::connect(&self.url("postgres")).await?;
        let pid: i32 = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        let pid = u32::try_from(pid)?;
        signal("-STOP", pid)?;
        self.stalled_wal_writer = Some(pid);
        Ok(())
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): no checkpoint,
    /// crash recovery at the next start, as after a power cut of its process.
    /// A stalled WAL writer is let go only once the stop is under way, so it
    /// exits without writing.
    pub fn stop_immediately(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.tool("pg_ctl", |c| {
                c.args(["stop", "-m", "immediate", "-W", "-D"])
                    .arg(self.dir.join("data"));
            })?;
            if let Some(pid) = self.stalled_wal_writer.take() {
                signal("-CONT", pid)?;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while self.dir.join("data/postmaster.pid").exists() {
                anyhow::ensure!(std::time::Instant::now() < deadline, "postgres did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
            self.running = false;
        }
        Ok(())
    }

    /// Starts the (stopped) server again on its port and data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 -c fsync=on",
            self.port
        );
        if self.durability == Durability::LoseRecentCommits {
            options.push_str(" -c synchronous_commit=off");
        }
        let log = self.dir.join("postgres.log");
        self.tool("pg_ctl", |c| {
            c.args(["start", "-w", "-t", "60", "-D"])
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(&log)
                .args(["-o", &options]);
        })?;
        self.running = true;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if sqlx::postgres::PgPool::connect(&self.url("postgres")).await.is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "postgres on {} never answered",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a server tool (as the `postgres` user when root), failing with its output.
    fn tool(&self, name: &str, args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
        let program = self.bin.join(name);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.current_dir("/");
        args(&mut command);
        let output = command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "{name} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

fn signal(signal: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.stop_immediately();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
