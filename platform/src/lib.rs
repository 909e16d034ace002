//! What every City Picks binary shares.
//!
//! Layout:
//! - [`config`]: configuration structs read from environment variables (clap `env`),
//!   with defaults that match the local stack started by `./dev up`.
//! - [`telemetry`]: tracing subscriber, optional OTLP trace export, the Prometheus
//!   registry behind `/metrics`, and W3C trace-context helpers for HTTP and NATS headers.
//! - [`pg`], [`kv`], [`bus`]: connecting to Postgres (plus the embedded migrations),
//!   Redis and NATS, waiting for them at start-up.
//! - [`http`]: the API error body, JSON/path/query extractors that answer in that
//!   format, the JWT auth extractor, `/health` and `/metrics`, request tracing and
//!   serving with graceful shutdown.
//! - [`shutdown`]: SIGTERM/SIGINT as a future.

pub mod bus;
pub mod config;
pub mod http;
pub mod kv;
pub mod pg;
pub mod shutdown;
mod startup;
pub mod telemetry;

pub use config::Secret;
pub use startup::wait_for;
