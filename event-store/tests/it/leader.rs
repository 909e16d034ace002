//! `while_leader` against the real Postgres: work that loses its leadership
//! (its lock session is killed, as a Postgres restart would) is told to step
//! down and gets to settle what it holds, and leading resumes when the lock
//! is free again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use event_store::leader::while_leader;
use tokio_util::sync::CancellationToken;

const KEY: i64 = 0x7465_7374_6c65_6164;

#[tokio::test]
async fn lost_leadership_cancels_the_work_which_settles_then_leads_again() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let started = Arc::new(AtomicUsize::new(0));
    let settled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let leading = tokio::spawn({
        let (pool, started, settled, stop) = (db.pool.clone(), started.clone(), settled.clone(), stop.clone());
        async move {
            while_leader(&pool, KEY, stop.cancelled_owned(), |stepping_down| {
                let (started, settled) = (started.clone(), settled.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    stepping_down.cancelled().await;
                    // what a consumer does here: finish its batch, give back the rest
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    settled.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await;
        }
    });
    testkit::eventually(Duration::from_secs(5), || {
        let started = started.load(Ordering::SeqCst);
        async move { Ok(started == 1) }
    })
    .await?;

    // the lock's session dies
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted
         AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(KEY)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(killed, 1);
    testkit::eventually(Duration::from_secs(5), || {
        let (settled, started) = (settled.load(Ordering::SeqCst), started.load(Ordering::SeqCst));
        async move { Ok(settled == 1 && started == 2) }
    })
    .await?;

    // shutdown steps the second term down the same way
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), leading).await??;
    assert_eq!(settled.load(Ordering::SeqCst), 2);
    Ok(())
}
