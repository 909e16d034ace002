//! The integration tests of `seckill-edge`, one binary (modules instead of one
//! binary per file: each links the whole workspace once, not 5 times).

mod admission;
mod cluster;
mod failover;
mod forwarder;
mod reconciler;
mod rewarm;
mod service;
mod support;
