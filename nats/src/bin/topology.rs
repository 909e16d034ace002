//! `citypicks-topology`: creates or updates every JetStream stream and exits.

use clap::Parser;
use events::subjects::Namespace;
use platform::config::{NatsConfig, StartupConfig, TelemetryConfig};

#[derive(Debug, Parser)]
#[command(about = "Create the City Picks JetStream streams (idempotent)")]
struct Config {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(flatten)]
    startup: StartupConfig,
    #[command(flatten)]
    telemetry: TelemetryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = platform::telemetry::init("citypicks-topology", &config.telemetry)?;
    let namespace = Namespace::new(&config.nats.nats_namespace)?;
    let client = platform::bus::connect(&config.nats, "citypicks-topology", config.startup.timeout()).await?;
    let js = cp_nats::jetstream(client, 1_000);
    let topology = cp_nats::Topology::new(namespace).with_replicas(config.nats.nats_stream_replicas.into());
    let report = cp_nats::ensure_topology_within(&js, &topology, config.startup.timeout()).await?;
    for (stream, change) in report {
        tracing::info!(%stream, ?change, "stream");
    }
    Ok(())
}
