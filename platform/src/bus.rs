//! NATS: the client connection (JetStream sits on top of it in `cp-nats`).

use std::time::Duration;

use async_nats::connection::State;

use crate::{config::NatsConfig, startup::wait_for};

pub async fn connect(config: &NatsConfig, client_name: &str, timeout: Duration) -> anyhow::Result<async_nats::Client> {
    wait_for("nats", timeout, || {
        async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(Duration::from_secs(2))
            // keep reconnecting for as long as the process lives: /health reports the outage
            .max_reconnects(None)
            .connect(config.nats_url.as_str())
    })
    .await
}

pub async fn ping(client: &async_nats::Client) -> Result<(), String> {
    match client.connection_state() {
        State::Connected => match tokio::time::timeout(Duration::from_secs(1), client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("timed out".to_owned()),
        },
        state => Err(format!("{state:?}").to_lowercase()),
    }
}
