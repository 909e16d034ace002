//! Contract conformance (API.md): schemathesis generates requests from each
//! service's own `/openapi.json`, valid and invalid ones, and checks every
//! answer: no 5xx, only the statuses the operation documents, bodies that
//! match the documented schemas, and the documented content types.
//!
//! Roles change which statuses occur, so the command API and the query API
//! are run as a customer and as a merchant, the edge as a customer. Seeded
//! ids are offered to schemathesis through dictionaries (taken about half
//! the time) so that successful answers are checked too, not only 404s.
//! Examples per operation are bounded to keep CI short.
//!
//! Schemathesis is the pinned version `./dev test` installs into `.venv`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use platform::http::Role;
use testkit::Server;

use crate::{CUSTOMER, MERCHANT, Seeded, Stack};

const CHECKS: &str = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance";

/// Generated test cases per operation and phase (the coverage phase adds
/// its boundary cases on top).
const MAX_EXAMPLES: u32 = 50;

/// The most one schemathesis run may take before the test gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// `.venv/bin/schemathesis` at the workspace root.
fn schemathesis() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."));
    let path = root.join(".venv/bin/schemathesis");
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run `./dev test` (it installs the pinned schemathesis into .venv)",
        path.display()
    );
    Ok(path)
}

/// One schemathesis run: a service, the token it runs with, the seeded ids
/// its operations take.
struct Target<'a> {
    name: &'a str,
    server: &'a Server,
    token: String,
    /// `[[operations]]` sections of the schemathesis config.
    operations: &'a str,
    /// Requests in flight at once.
    workers: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_as_its_openapi_document_says() -> anyhow::Result<()> {
    // before anything starts: a missing tool is a failure, never a skip
    let schemathesis = schemathesis()?;
    let stack = Stack::start().await?;
    let seeded = stack.seed().await?;
    let targets = [
        Target {
            name: "command API as a customer",
            server: &stack.commands,
            token: stack.token(CUSTOMER, Role::Customer)?,
            operations: COMMANDS_OPERATIONS,
            workers: 2,
        },
        Target {
            name: "command API as a merchant",
            server: &stack.commands,
            token: stack.token(MERCHANT, Role::Merchant)?,
            operations: COMMANDS_OPERATIONS,
            workers: 2,
        },
        Target {
            name: "seckill edge as a customer",
            server: &stack.edge,
            // one who has not bought the seeded sale yet: a 202 to check too
            token: stack.token("bob", Role::Customer)?,
            operations: EDGE_OPERATIONS,
            // one at a time: a second first attempt on a voucher the edge is
            // still loading is a 503 `warming_up`, by design
            workers: 1,
        },
        Target {
            name: "query API as a customer",
            server: &stack.query,
            token: stack.token(CUSTOMER, Role::Customer)?,
            operations: QUERY_OPERATIONS,
            workers: 2,
        },
        Target {
            name: "query API as a merchant",
            server: &stack.query,
            token: stack.token(MERCHANT, Role::Merchant)?,
            operations: QUERY_OPERATIONS,
            workers: 2,
        },
    ];
    let dir = std::env::temp_dir().join(format!("e2e-contract-{}", testkit::short_id()));
    std::fs::create_dir_all(&dir)?;
    let dictionaries = dictionaries(&seeded);
    let mut failures = String::new();
    for (index, target) in targets.iter().enumerate() {
        let config = dir.join(format!("run-{index}.toml"));
        std::fs::write(&config, format!("{CONFIG}\n{dictionaries}\n{}", target.operations))?;
        let run = Run {
            schemathesis: &schemathesis,
            dir: &dir,
            config: &config,
            output: &dir.join(format!("run-{index}.log")),
            target,
        };
        let (passed, output) = run.execute().await?;
        if !passed {
            write!(failures, "\n===== {}: schemathesis failed =====\n{output}", target.name)?;
        }
    }
    stack.stop().await?;
    anyhow::ensure!(
        failures.is_empty(),
        "schemathesis found contract violations (configs and logs in {}):{failures}",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One `schemathesis run` of a target.
struct Run<'a> {
    schemathesis: &'a Path,
    /// The working directory: Hypothesis keeps files there.
    dir: &'a Path,
    config: &'a Path,
    /// stdout and stderr.
    output: &'a Path,
    target: &'a Target<'a>,
}

impl Run<'_> {
    /// Whether schemathesis passed, and everything it printed.
    async fn execute(&self) -> anyhow::Result<(bool, String)> {
        let log = std::fs::File::create(self.output)?;
        let base = self.target.server.url("");
        let (max_examples, workers) = (MAX_EXAMPLES.to_string(), self.target.workers.to_string());
        let mut child = Command::new(self.schemathesis)
            .arg("--config-file")
            .arg(self.config)
            .arg("run")
            .arg(format!("{base}/openapi.json"))
            .args(["--url", &base])
            .args(["--checks", CHECKS])
            .args(["--max-examples", &max_examples])
            .args(["--workers", &workers])
            .args(["--request-timeout", "20"])
            .args(["--generation-database", "none"])
            .args(["--header", &format!("Authorization: Bearer {}", self.target.token)])
            .arg("--no-color")
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let output = std::fs::read_to_string(self.output)?;
        match status {
            Some(status) => Ok((status.success(), output)),
            None => Ok((false, format!("timed out after {RUN_TIMEOUT:?}\n{output}"))),
        }
    }
}

/// What every run shares: no state kept between runs.
const CONFIG: &str = r#"
[cache]
enabled = false
"#;

/// The seeded ids, as schemathesis dictionaries.
fn dictionaries(seeded: &Seeded) -> String {
    format!(
        r#"
[dictionaries]
orders = {{ values = ["{}", "{}"] }}
products = {{ values = ["{}"] }}
vouchers = {{ values = ["{}", "{}"] }}
coupons = {{ values = ["{}"] }}
payments = {{ values = ["{}"] }}
waits = {{ values = [0, 20] }}
merchants = {{ values = ["{MERCHANT}"] }}
"#,
        seeded.goods_order_id,
        seeded.seckill_order_id,
        seeded.product_id,
        seeded.seckill_voucher_id,
        seeded.regular_voucher_id,
        seeded.coupon_id,
        seeded.payment_id,
    )
}

const COMMANDS_OPERATIONS: &str = r#"
[[operations]]
include-path-regex = "^/orders/\\{id\\}/"
parameters = { "path.id" = { dictionary = "orders", probability = 0.5 } }

[[operations]]
include-path = "/vouchers/{id}/claim"
parameters = { "path.id" = { dictionary = "vouchers", probability = 0.5 } }

[[operations]]
include-path = ["/vouchers", "/products"]
parameters = { "body.merchant_id" = { dictionary = "merchants", probability = 0.5 } }

[[operations]]
include-path = "/products/{id}/restock"
parameters = { "path.id" = { dictionary = "products", probability = 0.5 } }

[[operations]]
include-path = "/orders"
parameters = { "body.items[*].product_id" = { dictionary = "products", probability = 0.7 }, "body.coupon_id" = { dictionary = "coupons", probability = 0.5 } }

[[operations]]
include-path = "/provider/checkout/{payment_id}"
parameters = { "path.payment_id" = { dictionary = "payments", probability = 0.5 } }
"#;

const EDGE_OPERATIONS: &str = r#"
[[operations]]
include-path = "/seckill/{voucher_id}"
parameters = { "path.voucher_id" = { dictionary = "vouchers", probability = 0.5 } }
"#;

/// `wait_ms` is kept short: a `min_version` the view never reaches would
/// otherwise hold each such request for up to 10 s.
const QUERY_OPERATIONS: &str = r#"
[[operations]]
include-path = "/orders/{id}"
parameters = { "path.id" = { dictionary = "orders", probability = 0.5 }, "query.wait_ms" = { dictionary = "waits" } }

[[operations]]
include-path = "/vouchers/{id}"
parameters = { "path.id" = { dictionary = "vouchers", probability = 0.5 }, "query.wait_ms" = { dictionary = "waits" } }

[[operations]]
include-path = "/products/{id}"
parameters = { "path.id" = { dictionary = "products", probability = 0.5 }, "query.wait_ms" = { dictionary = "waits" } }
"#;
