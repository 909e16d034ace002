//! The event store: the only code that touches the `events` table, the
//! relay's cursor and the projections' checkpoints (ARCHITECTURE.md, "one
//! owner per table"). Every other crate
//! reads and writes events through it.
//!
//! Layout:
//! - [`store`]: appending (one statement, several aggregates in one
//!   transaction, the sequence as optimistic lock, no gaps), loading and
//!   catching an aggregate up, deciding a command on it ([`decide`],
//!   [`Decided::then`]) and the in-memory [`AggregateCache`] for hot
//!   aggregates.
//! - [`read`]: events as [`events::EventEnvelope`]s: one aggregate's, one
//!   aggregate type's after a global position (replay), decoded and upcast
//!   into their enum ([`read::aggregate_events`]).
//! - [`relay`]: the outbox relay, the store onto JetStream in commit order.
//! - [`checkpoint`]: each projection's position in the store, and the lock
//!   the replay and the daemon share.
//! - [`group`]: group commit, the appends of concurrent callers in one
//!   statement (goods orders' submissions).
//! - [`leader`]: one active instance among several (Postgres advisory lock).
//! - [`reconcile`]: what the reconcilers read (the log's final position, the
//!   aggregates a page of it touched, which aggregates exist) and their
//!   cursor, which goes back after a server restart.

pub mod checkpoint;
pub mod group;
pub mod leader;
pub mod read;
pub mod reconcile;
pub mod relay;
pub mod store;

pub use read::{ENVELOPE_COLUMNS, envelope_from_row};
pub use store::{
    AggregateCache, Append, Decided, EventStore, Loaded, PendingEvent, StoreError, WriterGuard, decide, load_cached,
    metadata_json,
};
