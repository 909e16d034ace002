//! The integration tests of `platform`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 3 times).

mod compose;
mod http;
mod migrations;
