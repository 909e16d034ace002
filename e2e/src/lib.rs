//! End-to-end: several City Picks services at once, driven over HTTP as a
//! client would.
//!
//! - [`chaos`]: the fault suite, every service a process of its own (the
//!   built binaries) on infrastructure of the suite's own, one part killed
//!   mid-sale per scenario; binary `citypicks-chaos` (`./dev chaos`).
//! - `tests/it/` (one integration test binary), each service started
//!   in-process on an ephemeral 127.0.0.1 port against the test infra of
//!   `./dev test` (a fresh database, a NATS namespace and Redis keys of the
//!   test's own):
//!   - `main.rs`: the stack (command API with the simulated payment provider,
//!     seckill edge, projection daemon, query API), tokens, and seeding a
//!     little data through the public API so that path ids exist;
//!   - `contract.rs`: schemathesis against each service's `/openapi.json`
//!     (API.md's HTTP contract): no 5xx, only documented statuses, bodies and
//!     content types as documented. Schemathesis comes from the repository's
//!     `.venv`, which `./dev test` installs.
//!   - `hostile_input.rs`, `sale.rs`, `workload.rs`: bad input through every
//!     service, scripted sales, a mixed workload;
//!   - `chaos.rs`: the CI subset of the fault suite.

pub mod chaos;
