//! The integration tests of `commands`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 4 times).

mod api;
mod bus;
mod claims;
mod lifecycle;
mod reconciler;
mod service;
