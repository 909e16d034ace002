//! Waiting for a dependency at start-up: services are often started together
//! with their servers (compose, `./dev up`), so a refused connection in the
//! first seconds is expected and retried until the configured deadline.

use std::{fmt::Display, future::Future, time::Duration};

use anyhow::{Context, anyhow};
use tokio::time::{Instant, sleep};

pub async fn wait_for<T, E, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> anyhow::Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() + delay < deadline => {
                tracing::warn!(dependency = what, %error, retry_in_ms = delay.as_millis() as u64, "dependency not ready");
                sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => {
                return Err(anyhow!("{error}"))
                    .with_context(|| format!("{what} not reachable within {}s", timeout.as_secs()));
            }
        }
    }
}
