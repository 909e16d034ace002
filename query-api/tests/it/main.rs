//! The integration tests of `query-api`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 3 times).

mod api;
mod filter_sql;
mod service;
