//! The views' reconciler against real Postgres and NATS: a document left
//! behind with nothing left to redeliver (a commit that vanished, an event
//! the relay published and the stream then lost) is caught up and counted; a
//! document the pipeline is still getting to (an event not yet published, a
//! consumer with messages pending) is left to it until the reconciler's
//! patience runs out; current documents are left alone.

use std::time::{Duration, Instant};

use crate::{
    daemon::paid_orders,
    support::{Setup, at},
};
use events::OrderEvent;
use projections::{
    Projection,
    reconciler::{PassReport, ReconcilerConfig, ViewReconciler},
    replay::{ReplayOptions, Silent},
};

fn config(patience: Duration) -> ReconcilerConfig {
    ReconcilerConfig {
        grace: Duration::ZERO,
        patience,
        ..ReconcilerConfig::default()
    }
}

/// Passes until the reconciler has read the whole log; what those passes
/// repaired, and what the last one left waiting. It reads only below the
/// oldest transaction still running on the server, and that horizon is
/// server-wide: another test's open transaction holds it back a moment.
async fn pass_through(setup: &Setup, reconciler: &mut ViewReconciler) -> anyhow::Result<PassReport> {
    let end: i64 = sqlx::query_scalar("SELECT COALESCE(max(global_position), 0) FROM events")
        .fetch_one(&setup.db.pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut repaired = 0;
    loop {
        let mut report = reconciler.pass().await?;
        repaired += report.repaired;
        if report.read_up_to >= end {
            report.repaired = repaired;
            return Ok(report);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the log was not read up to {end}: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replay_differences(setup: &Setup) -> anyhow::Result<u64> {
    let options = ReplayOptions {
        batch: 100,
        dry_run: true,
        document_cache: 100,
    };
    let report = Projection::Orders.replay(&setup.db.pool, &options, &mut Silent).await?;
    let differences = report
        .differences
        .ok_or_else(|| anyhow::anyhow!("a dry run compares"))?;
    Ok(differences.changed + differences.missing_live + differences.missing_replay)
}

#[tokio::test]
async fn documents_behind_the_store_with_nothing_pending_are_caught_up_and_counted() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let envelopes = paid_orders(&setup, 20).await?;
    for envelope in &envelopes {
        setup.publish(envelope, false).await?;
    }
    setup.start_daemon(5);
    setup.wait_caught_up().await?;

    // the commit that created one document vanished after its batch was acked
    let lost = envelopes[0].aggregate_id.clone();
    sqlx::query("DELETE FROM order_view WHERE id = $1")
        .bind(&lost)
        .execute(&setup.db.pool)
        .await?;
    // an event is in the store that never reached the stream
    let unpublished = envelopes[3].aggregate_id.clone();
    setup
        .store(&unpublished, 4, &OrderEvent::OrderPreparationStarted { at: at(120) })
        .await?;
    assert!(replay_differences(&setup).await? > 0);
    // the relay published everything (its cursor is at the end of the log)
    sqlx::query(
        "INSERT INTO relay_cursor (relay_name, last_tx_id, last_position)
         SELECT 'main', tx_id, global_position FROM events ORDER BY tx_id DESC, global_position DESC LIMIT 1
         ON CONFLICT (relay_name) DO UPDATE SET last_tx_id = EXCLUDED.last_tx_id, last_position = EXCLUDED.last_position",
    )
    .execute(&setup.db.pool)
    .await?;

    // nothing is in flight: a long patience does not hold the repair back
    let mut reconciler = ViewReconciler::new(
        setup.db.pool.clone(),
        setup.js.clone(),
        setup.namespace.clone(),
        config(Duration::from_secs(600)),
    )
    .starting_at(0);
    let report = pass_through(&setup, &mut reconciler).await?;
    assert_eq!(report.repaired, 2, "{report:?}");
    assert_eq!(replay_differences(&setup).await?, 0);
    let status = setup
        .doc("order_view", &unpublished)
        .await?
        .map(|d| d["status"].clone());
    assert_eq!(status, Some("preparing".into()));

    // nothing new: nothing to repair, and every suspect was settled
    let again = reconciler.pass().await?;
    assert_eq!((again.repaired, again.waiting), (0, 0), "{again:?}");
    setup.finish().await
}

#[tokio::test]
async fn a_document_the_daemon_has_not_reached_is_left_to_it_until_patience_runs_out() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    let envelopes = paid_orders(&setup, 1).await?;
    // the daemon's consumer exists and holds the events, but nothing consumes them yet
    setup.start_daemon(5);
    setup.stop_daemon().await?;
    for envelope in &envelopes {
        setup.publish(envelope, false).await?;
    }

    let mut patient = ViewReconciler::new(
        setup.db.pool.clone(),
        setup.js.clone(),
        setup.namespace.clone(),
        config(Duration::from_secs(600)),
    )
    .starting_at(0);
    let report = pass_through(&setup, &mut patient).await?;
    assert_eq!((report.repaired, report.waiting), (0, 1), "{report:?}");

    let mut impatient = ViewReconciler::new(
        setup.db.pool.clone(),
        setup.js.clone(),
        setup.namespace.clone(),
        config(Duration::ZERO),
    )
    .starting_at(0);
    assert_eq!(pass_through(&setup, &mut impatient).await?.repaired, 1);

    // the daemon comes back: its events are duplicates now, the view stays right
    setup.start_daemon(5);
    setup.wait_caught_up().await?;
    assert_eq!(replay_differences(&setup).await?, 0);
    let rows = setup.rows("order_view").await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, 3);
    setup.finish().await
}
