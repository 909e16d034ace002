//! The integration tests of `event-store`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 2 times).

mod leader;
mod relay;
mod store;
