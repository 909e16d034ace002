//! Payments: the provider adapter, the simulated local provider, and the
//! signed webhook's verification.

pub mod signature;
