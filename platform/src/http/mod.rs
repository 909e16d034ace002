//! HTTP basics every service shares.
//!
//! - [`error`]: the error body of API.md and the errors every service can raise.
//! - [`extract`]: `Json`/`Path`/`Query`/raw-bytes extractors whose rejections use
//!   that body and name fields in words, and [`NoBody`] for endpoints that take none.
//! - [`auth`]: HS256 JWT verification, the [`AuthUser`] extractor and the
//!   [`Authorized`] extractor that checks the role before any body is read.
//! - [`health`]: dependency probes behind `GET /health`.
//! - [`server`]: wrapping a service's routes with `/health`, `/metrics`, body and
//!   URI limits, the request timeout, request tracing and metrics, JSON errors,
//!   and serving with a header-read timeout, a connection cap and graceful shutdown.

pub mod auth;
mod describe;
pub mod error;
pub mod extract;
pub mod health;
pub mod server;
mod wire;

pub use auth::{
    Admins, AnyRole, AuthUser, Authorized, Customers, CustomersOrAdmins, JwtKeys, Merchants, MerchantsOrAdmins, Role,
    RolePolicy, SubError, validate_sub,
};
pub use error::{CommonError, ErrorBody, error_response, fixed_error_response};
pub use extract::{ApiBytes, ApiJson, ApiPath, ApiQuery, NoBody};
pub use health::Health;
pub use server::{Ops, serve, service_router};
