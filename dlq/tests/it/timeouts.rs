//! `order_deadlines` set aside: a re-drive puts the deadline back in line.
//! The command API's poller (tested in `commands`) is played here by hand:
//! it deletes a deadline that fired, or sets it aside again.

use std::time::Duration;

use dlq::Exit;
use uuid::Uuid;

use crate::Places;

async fn set_aside(places: &Places, order: Uuid, error: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO order_deadlines (order_id, due_at, attempts, last_error, dead_lettered_at)
         VALUES ($1, now() - interval '1 minute', 8, $2, now())
         ON CONFLICT (order_id) DO UPDATE SET dead_lettered_at = now(), last_error = $2",
    )
    .bind(order.to_string())
    .bind(error)
    .execute(&places.db.pool)
    .await?;
    Ok(())
}

/// Waits until the deadline is back in line, then does what the poller would.
fn poller(places: &Places, order: Uuid, fire: bool) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let pool = places.db.pool.clone();
    tokio::spawn(async move {
        crate::eventually(Duration::from_secs(10), || async {
            let waiting: Option<bool> =
                sqlx::query_scalar("SELECT dead_lettered_at IS NULL FROM order_deadlines WHERE order_id = $1")
                    .bind(order.to_string())
                    .fetch_optional(&pool)
                    .await?;
            Ok(waiting == Some(true))
        })
        .await?;
        let statement = if fire {
            "DELETE FROM order_deadlines WHERE order_id = $1"
        } else {
            "UPDATE order_deadlines SET dead_lettered_at = now(), last_error = 'still broken' WHERE order_id = $1"
        };
        sqlx::query(statement).bind(order.to_string()).execute(&pool).await?;
        Ok(())
    })
}

#[tokio::test]
async fn a_deadline_set_aside_goes_back_in_line_and_the_poller_decides() -> anyhow::Result<()> {
    let places = Places::new().await?;
    let order = Uuid::now_v7();
    set_aside(&places, order, "order store unreachable").await?;
    let id = format!("timeouts:{order}");
    let listed = places.entries(&["--source", "timeouts"]).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["attempts"], 8);
    assert_eq!(listed[0]["reason"], "order store unreachable");

    let refusing = poller(&places, order, false);
    let (exit, out, _) = places.dlq(&["redrive", &id, "--wait", "10s"]).await?;
    refusing.await??;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(out.contains("set aside again: still broken"), "{out}");
    assert_eq!(places.entries(&[]).await?.len(), 1, "still open: the same deadline");

    let firing = poller(&places, order, true);
    let (exit, out, _) = places.dlq(&["redrive", &id, "--wait", "10s"]).await?;
    firing.await??;
    assert_eq!(exit, Exit::Done, "{out}");
    assert!(out.contains("the poller fired it"), "{out}");
    let (exit, out, _) = places.dlq(&["redrive", &id]).await?;
    assert_eq!(exit, Exit::Done);
    assert!(out.contains("skipped") && out.contains("no longer parked"), "{out}");
    let redriven = places.entries(&["--state", "redriven", "--source", "timeouts"]).await?;
    assert_eq!(redriven.len(), 1, "{redriven:?}");
    assert_eq!(redriven[0]["id"], id.as_str());
    assert_eq!(
        redriven[0]["reason"], "still broken",
        "as it was when re-driven the second time"
    );
    assert!(
        places
            .entries(&["--state", "redriven", "--source", "edge"])
            .await?
            .is_empty()
    );

    // nothing runs the deadlines: back in line, unconfirmed
    let other = Uuid::now_v7();
    set_aside(&places, other, "boom").await?;
    let (exit, out, _) = places
        .dlq(&["redrive", &format!("timeouts:{other}"), "--wait", "300ms"])
        .await?;
    assert_eq!(exit, Exit::SomeFailed, "{out}");
    assert!(out.contains("unconfirmed"), "{out}");
    places.finish().await
}
