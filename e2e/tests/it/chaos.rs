//! The CI subset of the fault suite (`e2e::chaos`): smaller sales, debug
//! builds, run beside the other tests. `./dev chaos` runs every scenario,
//! larger, on release builds, and holds them to the 5 s goal; here the
//! invariants must hold and consistency come back within 20 s (the other
//! tests share the two cores).
//!
//! The services run as processes of their own: `./dev test` builds them
//! (`cargo build --bins`) and points `CP_BIN_DIR` at them.

use std::time::Duration;

use e2e::chaos::{self, Fault, Infra, SaleConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_lose_nothing_when_a_part_is_killed_mid_sale() -> anyhow::Result<()> {
    testkit::init_logs();
    let mut infra = Infra::start().await?;
    let logs = std::env::temp_dir().join(format!("cp-chaos-{}", testkit::short_id()));
    let mut outcomes = Vec::new();
    for fault in [
        Fault::CommandApi,
        Fault::ProjectionDaemon,
        Fault::Edge,
        Fault::NatsNode,
        Fault::Postgres,
        Fault::PaymentTimeoutRace,
    ] {
        outcomes.push(chaos::run(fault, &SaleConfig::ci(), &mut infra, &chaos::bin_dir(), &logs).await?);
    }
    let table = chaos::table(&outcomes);
    eprintln!("{table}");
    assert!(
        outcomes.iter().all(|o| o.met(Duration::from_secs(20))),
        "service logs in {}:\n{table}",
        logs.display()
    );
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}
