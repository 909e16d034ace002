//! The projectors: one pure `apply(view, event)` per view, no I/O. The
//! writer ([`crate::writer`]) loads documents, calls [`Projector::apply`] and
//! stores what changed; the daemon and the replay CLI share both.
//!
//! A document reflects its aggregate up to `version` (the aggregate
//! sequence). The writer only hands an event to `apply` when its sequence is
//! exactly `version + 1` (or 1 for a new document); earlier sequences are
//! redeliveries and skipped, later ones are gaps and retried.

pub mod coupon;
pub mod order;
pub mod product;
pub mod voucher;

use std::fmt::Debug;

use chrono::{DateTime, Utc};
use events::{EnvelopeError, EventEnvelope};
use serde::{Serialize, de::DeserializeOwned};

pub use coupon::{CouponProjector, CouponView};
pub use order::{OrderProjector, OrderView};
pub use product::{ProductProjector, ProductView};
pub use voucher::{VoucherProjector, VoucherView};

/// The indexed columns of a view row besides `id`, `version` and `doc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    pub user_id: Option<String>,
    /// The merchant the document belongs to: every merchant-facing query
    /// is scoped by it (API.md "Tenancy").
    pub merchant_id: Option<String>,
    pub status: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Decode(#[from] EnvelopeError),
    /// An event that needs an existing document arrived for none (or the
    /// reverse): the stream and the store disagree, which is a bug to look at.
    #[error("{event_type} cannot apply to {state}")]
    Unexpected { event_type: String, state: &'static str },
}

pub trait Projector: Send + Sync + 'static {
    type View: Serialize + DeserializeOwned + Clone + PartialEq + Debug + Send + Sync;
    /// The projection's name in the CLI, checkpoints and metrics ("orders").
    const NAME: &'static str;
    /// The view table ("order_view").
    const TABLE: &'static str;
    /// The aggregate type whose events stream feeds this projection.
    const AGGREGATE_TYPE: &'static str;

    /// The document after `event`; `view` is `None` before the aggregate's
    /// first event. Sets the document's version to `event.sequence`.
    fn apply(view: Option<Self::View>, event: &EventEnvelope) -> Result<Self::View, ApplyError>;

    /// The aggregate sequence the document reflects.
    fn version(view: &Self::View) -> u64;

    /// The columns the query API filters, sorts and authorizes on.
    fn columns(view: &Self::View) -> Columns;
}
