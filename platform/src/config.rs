//! Configuration pieces that binaries flatten into their own clap parsers.
//!
//! Every value comes from the environment (or the equivalent flag); defaults
//! point at the local stack of `./dev up`. Secrets have no default.

use std::{fmt, str::FromStr, time::Duration};

use clap::Args;

/// A value that must never reach a log line: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct PostgresConfig {
    /// Postgres connection URL (may contain a password, hence a secret).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://citypicks@127.0.0.1:55432/citypicks",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub database_url: Secret,
    /// Size of the connection pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

#[derive(Debug, Clone, Args)]
pub struct RedisConfig {
    /// One server's URL, or with `REDIS_CLUSTER=true` the URLs of one or
    /// more cluster nodes, comma-separated (the rest is discovered).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:56379/",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub redis_url: Secret,
    /// Talk to a Redis Cluster through the cluster-aware client.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NatsConfig {
    /// One server's URL, or the URLs of a cluster's servers, comma-separated:
    /// the client tries them in turn and rides out the loss of one.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:54222")]
    pub nats_url: String,
    /// Prefix of every stream and subject; tests use their own to stay isolated.
    #[arg(long, env = "NATS_NAMESPACE", default_value = "cp")]
    pub nats_namespace: String,
    /// Replicas of every JetStream stream: 1 on one server, 3 in a cluster.
    /// Every service ensures the topology at start, so all of them must
    /// agree (a service with 1 would scale a cluster's R3 streams down).
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,
}

#[derive(Debug, Clone, Args)]
pub struct AuthConfig {
    /// HS256 secret that signs and verifies JWTs. Required: there is no safe default.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
}

#[derive(Debug, Clone, Args)]
pub struct StartupConfig {
    /// How long to wait for dependencies at start-up before giving up.
    #[arg(long, env = "STARTUP_TIMEOUT_SECS", default_value_t = 30)]
    pub startup_timeout_secs: u64,
}

impl StartupConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct TelemetryConfig {
    /// `text` for people, `json` for log shippers.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// OTLP/HTTP collector; unset means no trace export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Service name in traces; defaults to the binary name.
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// The share of requests without a sampled caller that start a trace
    /// (0 to 1), when traces are exported; a caller's `traceparent` decides
    /// for its own requests. As OpenTelemetry's `parentbased_traceidratio`.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = sample_ratio)]
    pub trace_sample_ratio: f64,
}

fn sample_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1")),
    }
}

/// What every HTTP service does with its connections (API.md "Limits").
#[derive(Debug, Clone, Args)]
pub struct HttpConfig {
    /// How long a connection may take to send a request's headers, counted
    /// from when it opens or from its previous response; past it the
    /// connection is closed. Cuts slowloris clients and idle keep-alive
    /// connections alike.
    #[arg(
        long,
        env = "HTTP_HEADER_READ_TIMEOUT_MS",
        default_value_t = HttpConfig::HEADER_READ_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub http_header_read_timeout_ms: u64,
    /// How long one request may take from its headers to its response; past
    /// it the answer is 503 `request_timeout`. Must exceed the query API's
    /// longest `min_version` wait (10 s).
    #[arg(
        long,
        env = "HTTP_REQUEST_TIMEOUT_MS",
        default_value_t = HttpConfig::REQUEST_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub http_request_timeout_ms: u64,
    /// Connections served at once; at the cap the service stops accepting
    /// until one closes (new ones wait in the listen backlog).
    #[arg(
        long,
        env = "HTTP_MAX_CONNECTIONS",
        default_value_t = HttpConfig::MAX_CONNECTIONS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub http_max_connections: u32,
}

impl HttpConfig {
    pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
    pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
    pub const MAX_CONNECTIONS: u32 = 10_000;

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_read_timeout_ms.max(1))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms.max(1))
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            http_header_read_timeout_ms: Self::HEADER_READ_TIMEOUT_MS,
            http_request_timeout_ms: Self::REQUEST_TIMEOUT_MS,
            http_max_connections: Self::MAX_CONNECTIONS,
        }
    }
}
