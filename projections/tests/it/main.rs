//! The integration tests of `projections`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 5 times).

mod daemon;
mod reconciler;
mod replay;
mod service;
mod support;
mod swap;
