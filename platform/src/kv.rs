//! Redis: one multiplexed, auto-reconnecting connection per process.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{config::RedisConfig, startup::wait_for};

pub async fn connect(config: &RedisConfig, timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(config.redis_url.expose())?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    wait_for("redis", timeout, || {
        ConnectionManager::new_with_config(client.clone(), manager_config.clone())
    })
    .await
}

pub async fn ping(connection: &ConnectionManager) -> Result<(), String> {
    let mut connection = connection.clone();
    let ping = redis::cmd("PING");
    let probe = ping.query_async::<String>(&mut connection);
    match tokio::time::timeout(Duration::from_secs(1), probe).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}
