//! NATS: the client connection (JetStream sits on top of it in `cp-nats`).

use std::time::Duration;

use async_nats::{ServerAddr, connection::State};

use crate::{config::NatsConfig, startup::wait_for};

/// `NATS_URL` as server addresses: one URL, or a cluster's URLs separated by
/// commas. The client tries them in turn on connect and on every reconnect,
/// so it rides out the loss of any one of them.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, async_nats::Error> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>()
                .map_err(|e| format!("NATS_URL: {url:?}: {e}").into())
        })
        .collect::<Result<Vec<_>, async_nats::Error>>()?;
    if addrs.is_empty() {
        return Err("NATS_URL holds no URL".into());
    }
    Ok(addrs)
}

pub async fn connect(config: &NatsConfig, client_name: &str, timeout: Duration) -> anyhow::Result<async_nats::Client> {
    let addrs = server_addrs(&config.nats_url).map_err(|e| anyhow::anyhow!(e))?;
    wait_for("nats", timeout, || {
        async_nats::ConnectOptions::new()
            .name(client_name)
            .connection_timeout(Duration::from_secs(2))
            // keep reconnecting for as long as the process lives: /health reports the outage
            .max_reconnects(None)
            .connect(addrs.clone())
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

#[cfg(test)]
mod tests {
    use super::server_addrs;

    #[test]
    fn one_url_or_a_clusters_urls_separated_by_commas() {
        assert_eq!(server_addrs("nats://127.0.0.1:4222").map(|a| a.len()).ok(), Some(1));
        let cluster = server_addrs("nats://127.0.0.1:1, nats://127.0.0.1:2,nats://127.0.0.1:3,").unwrap_or_default();
        let ports: Vec<u16> = cluster.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [1, 2, 3]);
    }

    #[test]
    fn a_bad_or_empty_url_list_is_an_error_naming_the_url() {
        assert!(server_addrs(" , ").is_err());
        let error = server_addrs("nats://127.0.0.1:1,http://[::1")
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("http://[::1")));
    }
}
