//! Messages between services that are not aggregate events: they never
//! enter the event store and travel as plain JSON objects.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::subjects::{HDR_CORRELATION_ID, HDR_EVENT_TYPE, HDR_EVENT_VERSION, MSG_ID};

/// A seckill request the edge admitted (Redis took stock and marked the
/// user), published on [`crate::Namespace::seckill_requests_subject`]. The
/// Voucher aggregate makes the final decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRequested {
    pub order_id: Uuid,
    pub voucher_id: Uuid,
    pub user_id: String,
    pub requested_at: DateTime<Utc>,
}

impl OrderRequested {
    pub const EVENT_TYPE: &str = "OrderRequested";
    pub const EVENT_VERSION: &str = "1.0";

    /// The headers the edge's forwarder sets, besides trace context.
    ///
    /// The order id is the message id, so a forwarder re-sending after a
    /// crash is deduped by JetStream, and the correlation id, so the whole
    /// life of the order can be found by it.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        let order_id = self.order_id.to_string();
        [
            (MSG_ID, order_id.clone()),
            (HDR_CORRELATION_ID, order_id),
            (HDR_EVENT_TYPE, Self::EVENT_TYPE.to_owned()),
            (HDR_EVENT_VERSION, Self::EVENT_VERSION.to_owned()),
        ]
    }
}
