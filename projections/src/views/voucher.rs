//! The voucher document: a merchant's voucher with its sale counters.
//!
//! Whether the sale is upcoming, open or over depends on the clock, so the
//! query API works it out from `begins_at`/`ends_at` at read time; storing
//! it would make the view differ from a replay of the same events later.

use chrono::{DateTime, Utc};
use events::{EventEnvelope, VoucherEvent, VoucherKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApplyError, Columns, Projector};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoucherView {
    pub voucher_id: Uuid,
    pub merchant_id: String,
    pub title: String,
    pub kind: VoucherKind,
    pub price_cents: i64,
    pub value_cents: i64,
    pub min_spend_cents: i64,
    /// Null for regular vouchers: they are unlimited.
    pub stock: Option<u64>,
    /// Seckill: units held by orders (accepted − released); regular: the
    /// number of claims.
    pub claimed: u64,
    /// Seckill: stock − claimed; null for regular vouchers.
    pub remaining: Option<u64>,
    /// Seckill claims ever accepted, released or not.
    pub accepted: u64,
    pub rejected: u64,
    pub released: u64,
    /// Seckill only: nothing remaining. Always false for regular vouchers.
    pub sold_out: bool,
    pub begins_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl VoucherView {
    /// Derives the seckill figures from the counters, as the aggregate's
    /// `claimed()` and `remaining()` do from its sets.
    fn refresh(&mut self) {
        if self.kind != VoucherKind::Seckill {
            return;
        }
        self.claimed = self.accepted.saturating_sub(self.released);
        let remaining = self.stock.unwrap_or(0).saturating_sub(self.claimed);
        self.remaining = Some(remaining);
        self.sold_out = remaining == 0;
    }
}

pub struct VoucherProjector;

impl Projector for VoucherProjector {
    type View = VoucherView;
    const NAME: &'static str = "vouchers";
    const TABLE: &'static str = "voucher_view";
    const AGGREGATE_TYPE: &'static str = "Voucher";

    // The aggregate keeps sets of order ids and users so that a repeated
    // event cannot count twice; this view keeps plain counters instead, so
    // the document stays small however many claims a sale gets. That is
    // exact because (1) the aggregate never records a duplicate decision for
    // an order id, a second claim for a user, or a release of an order it did
    // not accept or already released, so every recorded event changes its
    // sets; and (2) the writer applies each sequence exactly once, in order.
    fn apply(view: Option<VoucherView>, event: &EventEnvelope) -> Result<VoucherView, ApplyError> {
        let decoded = event.decode::<VoucherEvent>()?;
        let mut view = match (view, decoded) {
            (
                None,
                VoucherEvent::VoucherCreated {
                    voucher_id,
                    merchant_id,
                    title,
                    kind,
                    price_cents,
                    value_cents,
                    min_spend_cents,
                    stock,
                    begins_at,
                    ends_at,
                },
            ) => VoucherView {
                voucher_id,
                merchant_id,
                title,
                kind,
                price_cents,
                value_cents,
                min_spend_cents,
                stock: stock.map(u64::from),
                claimed: 0,
                remaining: None,
                accepted: 0,
                rejected: 0,
                released: 0,
                sold_out: false,
                begins_at,
                ends_at,
                version: event.sequence,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
            },
            (None, _) => return Err(unexpected(event, "a missing voucher")),
            (Some(_), VoucherEvent::VoucherCreated { .. }) => return Err(unexpected(event, "an existing voucher")),
            (Some(mut view), VoucherEvent::VoucherClaimed { .. }) => {
                view.claimed = view.claimed.saturating_add(1);
                view
            }
            (Some(mut view), VoucherEvent::SeckillClaimAccepted { .. }) => {
                view.accepted = view.accepted.saturating_add(1);
                view
            }
            (Some(mut view), VoucherEvent::SeckillClaimRejected { .. }) => {
                view.rejected = view.rejected.saturating_add(1);
                view
            }
            (Some(mut view), VoucherEvent::SeckillStockReleased { .. }) => {
                view.released = view.released.saturating_add(1);
                view
            }
        };
        view.refresh();
        view.version = event.sequence;
        view.updated_at = event.recorded_at;
        Ok(view)
    }

    fn version(view: &VoucherView) -> u64 {
        view.version
    }

    fn columns(view: &VoucherView) -> Columns {
        let status = match view.kind {
            VoucherKind::Seckill if view.sold_out => Some("sold_out".to_owned()),
            VoucherKind::Seckill => Some("available".to_owned()),
            VoucherKind::Regular => None,
        };
        Columns {
            user_id: None,
            merchant_id: Some(view.merchant_id.clone()),
            status,
            created_at: Some(view.created_at),
            updated_at: Some(view.updated_at),
        }
    }
}

fn unexpected(event: &EventEnvelope, state: &'static str) -> ApplyError {
    ApplyError::Unexpected {
        event_type: event.event_type.clone(),
        state,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::{Duration, TimeZone};
    use events::{ClaimRejection, EventMetadata};
    use serde_json::{Value, json};

    use super::*;

    const VOUCHER: u128 = 0xF00D;
    const HOUR: i64 = 3600;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(seconds)
    }

    fn envelope(sequence: u64, event: &VoucherEvent) -> EventEnvelope {
        let n = i64::try_from(sequence).unwrap();
        EventEnvelope::new(
            id(VOUCHER).to_string(),
            sequence,
            n + 100,
            event,
            EventMetadata::system("test"),
            at(n),
        )
        .unwrap()
    }

    /// Applies the events in order; event n (from 1) is recorded at `at(n)`.
    fn project(events: &[VoucherEvent]) -> Result<VoucherView, ApplyError> {
        let mut view = None;
        for (n, event) in (1..).zip(events) {
            view = Some(VoucherProjector::apply(view, &envelope(n, event))?);
        }
        Ok(view.expect("no events"))
    }

    fn created(kind: VoucherKind, stock: Option<u32>) -> VoucherEvent {
        VoucherEvent::VoucherCreated {
            voucher_id: id(VOUCHER),
            merchant_id: "m-1".into(),
            title: "Two coffees for one".into(),
            kind,
            price_cents: 990,
            value_cents: 1800,
            min_spend_cents: 0,
            stock,
            begins_at: at(HOUR),
            ends_at: at(3 * HOUR),
        }
    }

    fn seckill(stock: u32) -> VoucherEvent {
        created(VoucherKind::Seckill, Some(stock))
    }

    fn regular() -> VoucherEvent {
        created(VoucherKind::Regular, None)
    }

    fn accepted(order: u128, user: &str) -> VoucherEvent {
        VoucherEvent::SeckillClaimAccepted {
            order_id: id(order),
            user_id: user.into(),
            requested_at: at(HOUR + 1),
        }
    }

    fn rejected(order: u128, user: &str, reason: ClaimRejection) -> VoucherEvent {
        VoucherEvent::SeckillClaimRejected {
            order_id: id(order),
            user_id: user.into(),
            reason,
        }
    }

    fn released(order: u128, user: &str) -> VoucherEvent {
        VoucherEvent::SeckillStockReleased {
            order_id: id(order),
            user_id: user.into(),
        }
    }

    fn claimed(user: &str, coupon: u128) -> VoucherEvent {
        VoucherEvent::VoucherClaimed {
            user_id: user.into(),
            coupon_id: id(coupon),
        }
    }

    /// (claimed, remaining, accepted, rejected, released, sold_out)
    fn figures(view: &VoucherView) -> (u64, Option<u64>, u64, u64, u64, bool) {
        (
            view.claimed,
            view.remaining,
            view.accepted,
            view.rejected,
            view.released,
            view.sold_out,
        )
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn seckill_creation_has_its_whole_stock_remaining() {
        let view = project(&[seckill(2)]).unwrap();

        assert_eq!(
            view,
            VoucherView {
                voucher_id: id(VOUCHER),
                merchant_id: "m-1".into(),
                title: "Two coffees for one".into(),
                kind: VoucherKind::Seckill,
                price_cents: 990,
                value_cents: 1800,
                min_spend_cents: 0,
                stock: Some(2),
                claimed: 0,
                remaining: Some(2),
                accepted: 0,
                rejected: 0,
                released: 0,
                sold_out: false,
                begins_at: at(HOUR),
                ends_at: at(3 * HOUR),
                version: 1,
                created_at: at(1),
                updated_at: at(1),
            }
        );
    }

    #[test]
    fn regular_creation_has_no_stock() {
        let view = project(&[regular()]).unwrap();

        assert_eq!(view.kind, VoucherKind::Regular);
        assert_eq!(view.stock, None);
        assert_eq!(figures(&view), (0, None, 0, 0, 0, false));
    }

    #[test]
    fn accepted_claims_take_stock_until_sold_out() {
        let view = project(&[seckill(2), accepted(1, "alice")]).unwrap();
        assert_eq!(figures(&view), (1, Some(1), 1, 0, 0, false));

        let view = project(&[seckill(2), accepted(1, "alice"), accepted(2, "bob")]).unwrap();
        assert_eq!(figures(&view), (2, Some(0), 2, 0, 0, true));
        assert_eq!(view.version, 3);
        assert_eq!(view.updated_at, at(3));
        assert_eq!(view.created_at, at(1));
    }

    #[test]
    fn rejections_are_counted_and_take_nothing() {
        let view = project(&[
            seckill(1),
            accepted(1, "alice"),
            rejected(2, "bob", ClaimRejection::SoldOut),
            rejected(3, "alice", ClaimRejection::AlreadyPurchased),
        ])
        .unwrap();

        assert_eq!(figures(&view), (1, Some(0), 1, 2, 0, true));
    }

    #[test]
    fn a_release_returns_the_unit_to_the_sale() {
        let view = project(&[seckill(1), accepted(1, "alice"), released(1, "alice")]).unwrap();
        assert_eq!(figures(&view), (0, Some(1), 1, 0, 1, false));

        // The released unit can be sold again to someone else.
        let view = project(&[
            seckill(1),
            accepted(1, "alice"),
            released(1, "alice"),
            accepted(2, "bob"),
        ])
        .unwrap();
        assert_eq!(figures(&view), (1, Some(0), 2, 0, 1, true));
    }

    #[test]
    fn regular_claims_count_as_claimed() {
        let view = project(&[regular(), claimed("alice", 0xC1), claimed("bob", 0xC2)]).unwrap();

        assert_eq!(figures(&view), (2, None, 0, 0, 0, false));
        assert_eq!(view.version, 3);
    }

    #[test]
    fn a_seckill_claim_on_a_regular_voucher_is_only_a_rejection() {
        let view = project(&[regular(), rejected(1, "alice", ClaimRejection::NotSeckill)]).unwrap();

        assert_eq!(figures(&view), (0, None, 0, 1, 0, false));
    }

    #[test]
    fn events_after_creation_need_a_document() {
        for event in [
            claimed("alice", 0xC1),
            accepted(1, "alice"),
            rejected(1, "alice", ClaimRejection::SoldOut),
            released(1, "alice"),
        ] {
            let result = VoucherProjector::apply(None, &envelope(1, &event));
            assert!(
                matches!(result, Err(ApplyError::Unexpected { .. })),
                "{event:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn a_second_creation_is_unexpected() {
        let view = project(&[seckill(2)]).unwrap();

        let result = VoucherProjector::apply(Some(view), &envelope(2, &seckill(2)));

        assert!(matches!(result, Err(ApplyError::Unexpected { .. })), "{result:?}");
    }

    #[test]
    fn a_version_1_0_creation_is_upcast() {
        // What the prototype stored: `is_seckill` and `discount_cents`.
        let mut event = envelope(1, &seckill(100));
        event.event_version = "1.0".into();
        event.payload = json!({
            "VoucherCreated": {
                "voucher_id": id(VOUCHER),
                "merchant_id": "m-1",
                "title": "Half price hotpot",
                "is_seckill": true,
                "price_cents": 990,
                "discount_cents": 500,
                "min_spend_cents": 5000,
                "stock": 100,
                "begins_at": at(HOUR),
                "ends_at": at(3 * HOUR)
            }
        });

        let view = VoucherProjector::apply(None, &event).unwrap();

        assert_eq!(view.kind, VoucherKind::Seckill);
        assert_eq!(view.value_cents, 500);
        assert_eq!(view.title, "Half price hotpot");
        assert_eq!(view.stock, Some(100));
        assert_eq!(view.remaining, Some(100));
    }

    #[test]
    fn the_document_has_the_contract_fields() {
        let view = project(&[seckill(2), accepted(1, "alice")]).unwrap();

        let json = serde_json::to_value(&view).unwrap();

        assert_eq!(
            keys(&json),
            BTreeSet::from([
                "voucher_id",
                "merchant_id",
                "title",
                "kind",
                "price_cents",
                "value_cents",
                "min_spend_cents",
                "stock",
                "claimed",
                "remaining",
                "accepted",
                "rejected",
                "released",
                "sold_out",
                "begins_at",
                "ends_at",
                "version",
                "created_at",
                "updated_at",
            ])
        );
        assert_eq!(json["kind"], "seckill");
        assert_eq!(json["stock"], 2);
        assert_eq!(json["claimed"], 1);
        assert_eq!(json["remaining"], 1);
        assert_eq!(json["sold_out"], false);
        assert_eq!(serde_json::from_value::<VoucherView>(json).unwrap(), view);

        let json = serde_json::to_value(project(&[regular()]).unwrap()).unwrap();
        assert_eq!(json["kind"], "regular");
        assert_eq!(json["stock"], Value::Null);
        assert_eq!(json["remaining"], Value::Null);
    }

    #[test]
    fn columns_carry_the_sold_out_state_of_seckill_vouchers_only() {
        let open = project(&[seckill(1)]).unwrap();
        assert_eq!(
            VoucherProjector::columns(&open),
            Columns {
                user_id: None,
                merchant_id: Some("m-1".into()),
                status: Some("available".into()),
                created_at: Some(at(1)),
                updated_at: Some(at(1)),
            }
        );

        let sold_out = project(&[seckill(1), accepted(1, "alice")]).unwrap();
        assert_eq!(VoucherProjector::columns(&sold_out).status.as_deref(), Some("sold_out"));
        assert_eq!(VoucherProjector::columns(&sold_out).updated_at, Some(at(2)));

        let regular = project(&[regular(), claimed("alice", 0xC1)]).unwrap();
        assert_eq!(
            VoucherProjector::columns(&regular),
            Columns {
                user_id: None,
                merchant_id: Some("m-1".into()),
                status: None,
                created_at: Some(at(1)),
                updated_at: Some(at(2)),
            }
        );
        assert_eq!(VoucherProjector::version(&regular), 2);
    }
}
