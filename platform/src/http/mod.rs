//! HTTP basics every service shares.
//!
//! - [`error`]: the error body of API.md and the errors every service can raise.
//! - [`extract`]: `Json`/`Path`/`Query` extractors whose rejections use that body.
//! - [`auth`]: HS256 JWT verification and the [`auth::AuthUser`] extractor with roles.
//! - [`health`]: dependency probes behind `GET /health`.
//! - [`server`]: wrapping a service's routes with `/health`, `/metrics`, body limit,
//!   request tracing and metrics, JSON 404/405, and serving with graceful shutdown.

pub mod auth;
pub mod error;
pub mod extract;
pub mod health;
pub mod server;

pub use auth::{AuthUser, JwtKeys, Role};
pub use error::{CommonError, ErrorBody, error_response};
pub use extract::{ApiJson, ApiPath, ApiQuery};
pub use health::Health;
pub use server::{Ops, serve, service_router};
