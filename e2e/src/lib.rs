//! End-to-end tests: several City Picks services at once, each started
//! in-process on an ephemeral 127.0.0.1 port against the test infra of
//! `./dev test` (a fresh database, a NATS namespace and Redis keys of the
//! test's own), driven over HTTP as a client would.
//!
//! The crate has no code of its own; everything is in one integration test
//! binary, `tests/it/`:
//! - `main.rs`: the stack (command API with the simulated payment provider,
//!   seckill edge, projection daemon, query API), tokens, and seeding a
//!   little data through the public API so that path ids exist;
//! - `contract.rs`: schemathesis against each service's `/openapi.json`
//!   (API.md's HTTP contract): no 5xx, only documented statuses, bodies and
//!   content types as documented. Schemathesis comes from the repository's
//!   `.venv`, which `./dev test` installs.
