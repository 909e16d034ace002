//! What every City Picks binary shares.
//!
//! Layout:
//! - [`config`]: configuration structs read from environment variables (clap `env`),
//!   with defaults that match the local stack started by `./dev up` (including the
//!   HTTP layer's timeouts and connection cap, [`config::HttpConfig`]).
//! - [`telemetry`]: tracing subscriber, optional OTLP trace export, the Prometheus
//!   registry behind `/metrics`, and W3C trace-context helpers for HTTP and NATS headers.
//! - [`pg`], [`kv`], [`bus`]: connecting to Postgres (plus the embedded migrations),
//!   Redis (one server or a Redis Cluster, [`kv::Kv`]) and NATS, waiting for
//!   them at start-up.
//! - [`http`]: the API error body, JSON/path/query extractors that answer in that
//!   format, the JWT auth and role extractors, `/health` and `/metrics`, request
//!   tracing, and serving with timeouts, a connection cap and graceful shutdown.
//! - [`limits`]: the input bounds of API.md "Limits" (money, quantities, text)
//!   as pure validators whose errors are 422s naming the field.
//! - [`shutdown`]: SIGTERM/SIGINT as a future.
//! - [`clock`]: time as an injected service ([`clock::Clock`]), fixed in tests.
//! - [`errors`]: an error with its sources on one line ([`errors::DisplayChain`]).

pub mod bus;
pub mod clock;
pub mod config;
pub mod errors;
pub mod http;
pub mod kv;
pub mod limits;
pub mod pg;
pub mod shutdown;
mod startup;
pub mod telemetry;

pub use config::Secret;
pub use startup::wait_for;
