//! One active instance among several: a session-level Postgres advisory
//! lock held on a dedicated connection. If the holder dies, its session ends,
//! Postgres releases the lock and a standby's next try takes it.

use std::{future::Future, pin::pin, time::Duration};

use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Takes the session-level advisory lock `lock_key` on `conn` if it is free.
/// It is held until the session ends (or is unlocked), so the holder should
/// do its leader's work through this same connection: if the session
/// breaks, the lock is gone and so is the connection.
pub async fn try_lock(conn: &mut PgConnection, lock_key: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key)
        .fetch_one(conn)
        .await
}

/// A dedicated connection holding the advisory lock `lock_key`, or `None`
/// while another session holds it.
pub async fn lead(pool: &PgPool, lock_key: i64) -> Result<Option<PgConnection>, sqlx::Error> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    Ok(if try_lock(&mut conn, lock_key).await? {
        Some(conn)
    } else {
        None
    })
}

/// How long work that lost its leadership may take to settle what it holds
/// (finish its batch, give back the rest) before it is dropped.
pub const STEP_DOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs `work` only while this process holds the advisory lock `lock_key`;
/// standbys retry and take over when the holder's session ends. `work` is
/// started again if it returns while the lock is still held.
///
/// `work` gets a token that is cancelled when the leadership is lost (or on
/// shutdown): it should then finish what it is doing and give back what it
/// holds, so the next leader starts at once rather than after an ack wait.
/// It is dropped if it takes longer than [`STEP_DOWN_GRACE`].
pub async fn while_leader<F, Fut>(pool: &PgPool, lock_key: i64, shutdown: impl Future<Output = ()>, mut work: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut shutdown = pin!(shutdown);
    loop {
        let stepping_down = CancellationToken::new();
        let session = async {
            let Some(mut conn) = lead(pool, lock_key).await? else {
                return Ok::<bool, sqlx::Error>(false);
            };
            tracing::info!(lock_key, "leader lock acquired");
            // Lead until the lock's session breaks: a broken session means a
            // standby may have taken over.
            let mut working = pin!(work(stepping_down.clone()));
            tokio::select! {
                () = &mut working => return Ok(true),
                error = keep_alive(&mut conn) => tracing::warn!(%error, "leader session lost; stepping down"),
            }
            stepping_down.cancel();
            if tokio::time::timeout(STEP_DOWN_GRACE, working).await.is_err() {
                tracing::warn!(lock_key, "work did not step down within the grace period; dropped");
            }
            Ok(true)
        };
        let mut session = pin!(session);
        let outcome = tokio::select! {
            () = &mut shutdown => {
                stepping_down.cancel();
                let _ = tokio::time::timeout(STEP_DOWN_GRACE, session).await;
                return;
            }
            outcome = &mut session => outcome,
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(error) => {
                tracing::warn!(%error, "leader election failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn keep_alive(conn: &mut PgConnection) -> sqlx::Error {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // bounded: a server that stopped answering (not only one that
        // closed the connection) ends the leadership too
        match tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&mut *conn)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return error,
            Err(_) => return sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        }
    }
}
