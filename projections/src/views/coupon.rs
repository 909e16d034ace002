//! The coupon document: a user's coupon and where it stands, as the
//! "my coupons" list shows it.

use chrono::{DateTime, Utc};
use events::{CouponEvent, CouponSource, CouponStatus, EventEnvelope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApplyError, Columns, Projector};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponView {
    pub coupon_id: Uuid,
    pub user_id: String,
    /// The voucher's merchant; `null` on coupons issued before tenancy.
    pub merchant_id: Option<String>,
    pub voucher_id: Uuid,
    pub value_cents: i64,
    pub min_spend_cents: i64,
    pub expires_at: DateTime<Utc>,
    pub source: CouponSource,
    /// As recorded: a coupon past `expires_at` reads `available` until its
    /// `CouponExpired` event, because a view must not depend on the clock.
    pub status: CouponStatus,
    /// The order holding or having redeemed it; null once released.
    pub order_id: Option<Uuid>,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct CouponProjector;

impl Projector for CouponProjector {
    type View = CouponView;
    const NAME: &'static str = "coupons";
    const TABLE: &'static str = "coupon_view";
    const AGGREGATE_TYPE: &'static str = "Coupon";

    fn apply(view: Option<CouponView>, event: &EventEnvelope) -> Result<CouponView, ApplyError> {
        let decoded = event.decode::<CouponEvent>()?;
        let mut view = match (view, decoded) {
            (
                None,
                CouponEvent::CouponIssued {
                    coupon_id,
                    user_id,
                    merchant_id,
                    voucher_id,
                    value_cents,
                    min_spend_cents,
                    expires_at,
                    source,
                },
            ) => CouponView {
                coupon_id,
                user_id,
                merchant_id,
                voucher_id,
                value_cents,
                min_spend_cents,
                expires_at,
                source,
                status: CouponStatus::Available,
                order_id: None,
                version: event.sequence,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
            },
            (None, _) => return Err(unexpected(event, "a missing coupon")),
            (Some(_), CouponEvent::CouponIssued { .. }) => return Err(unexpected(event, "an existing coupon")),
            // The same transitions as the aggregate's `apply`.
            (Some(mut view), CouponEvent::CouponReserved { order_id }) => {
                view.status = CouponStatus::Reserved;
                view.order_id = Some(order_id);
                view
            }
            (Some(mut view), CouponEvent::CouponRedeemed { order_id }) => {
                view.status = CouponStatus::Redeemed;
                view.order_id = Some(order_id);
                view
            }
            (Some(mut view), CouponEvent::CouponReleased { .. }) => {
                view.status = CouponStatus::Available;
                view.order_id = None;
                view
            }
            (Some(mut view), CouponEvent::CouponExpired { .. }) => {
                view.status = CouponStatus::Expired;
                view
            }
        };
        view.version = event.sequence;
        view.updated_at = event.recorded_at;
        Ok(view)
    }

    fn version(view: &CouponView) -> u64 {
        view.version
    }

    fn columns(view: &CouponView) -> Columns {
        Columns {
            user_id: Some(view.user_id.clone()),
            merchant_id: view.merchant_id.clone(),
            status: Some(view.status.as_str().to_owned()),
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
    use events::EventMetadata;
    use serde_json::{Value, json};

    use super::*;

    const COUPON: u128 = 0xC0;
    const VOUCHER: u128 = 0xF00D;
    const ORDER: u128 = 0x0D;
    const OTHER_ORDER: u128 = 0x0E;
    const SECKILL_ORDER: u128 = 0x5EC;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(seconds)
    }

    fn envelope(sequence: u64, event: &CouponEvent) -> EventEnvelope {
        let n = i64::try_from(sequence).unwrap();
        EventEnvelope::new(
            id(COUPON).to_string(),
            sequence,
            n + 100,
            event,
            EventMetadata::system("test"),
            at(n),
        )
        .unwrap()
    }

    /// Applies the events in order; event n (from 1) is recorded at `at(n)`.
    fn project(events: &[CouponEvent]) -> Result<CouponView, ApplyError> {
        let mut view = None;
        for (n, event) in (1..).zip(events) {
            view = Some(CouponProjector::apply(view, &envelope(n, event))?);
        }
        Ok(view.expect("no events"))
    }

    fn issued() -> CouponEvent {
        CouponEvent::CouponIssued {
            coupon_id: id(COUPON),
            user_id: "alice".into(),
            merchant_id: Some("shop-1".into()),
            voucher_id: id(VOUCHER),
            value_cents: 500,
            min_spend_cents: 2000,
            expires_at: at(86_400),
            source: CouponSource::SeckillOrder {
                order_id: id(SECKILL_ORDER),
            },
        }
    }

    fn reserved(order: u128) -> CouponEvent {
        CouponEvent::CouponReserved { order_id: id(order) }
    }

    fn redeemed(order: u128) -> CouponEvent {
        CouponEvent::CouponRedeemed { order_id: id(order) }
    }

    fn released(order: u128) -> CouponEvent {
        CouponEvent::CouponReleased { order_id: id(order) }
    }

    fn expired() -> CouponEvent {
        CouponEvent::CouponExpired { at: at(86_400) }
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn issue_creates_an_available_coupon() {
        let view = project(&[issued()]).unwrap();

        assert_eq!(
            view,
            CouponView {
                coupon_id: id(COUPON),
                user_id: "alice".into(),
                merchant_id: Some("shop-1".into()),
                voucher_id: id(VOUCHER),
                value_cents: 500,
                min_spend_cents: 2000,
                expires_at: at(86_400),
                source: CouponSource::SeckillOrder {
                    order_id: id(SECKILL_ORDER)
                },
                status: CouponStatus::Available,
                order_id: None,
                version: 1,
                created_at: at(1),
                updated_at: at(1),
            }
        );
    }

    #[test]
    fn reservation_holds_it_for_the_order() {
        let view = project(&[issued(), reserved(ORDER)]).unwrap();

        assert_eq!(view.status, CouponStatus::Reserved);
        assert_eq!(view.order_id, Some(id(ORDER)));
        assert_eq!(view.version, 2);
        assert_eq!(view.created_at, at(1));
        assert_eq!(view.updated_at, at(2));
    }

    #[test]
    fn redemption_keeps_the_order() {
        let view = project(&[issued(), reserved(ORDER), redeemed(ORDER)]).unwrap();

        assert_eq!(view.status, CouponStatus::Redeemed);
        assert_eq!(view.order_id, Some(id(ORDER)));
        assert_eq!(view.version, 3);
    }

    #[test]
    fn release_makes_it_available_to_another_order() {
        let view = project(&[issued(), reserved(ORDER), released(ORDER)]).unwrap();
        assert_eq!(view.status, CouponStatus::Available);
        assert_eq!(view.order_id, None);

        let view = project(&[issued(), reserved(ORDER), released(ORDER), reserved(OTHER_ORDER)]).unwrap();
        assert_eq!(view.status, CouponStatus::Reserved);
        assert_eq!(view.order_id, Some(id(OTHER_ORDER)));
    }

    #[test]
    fn expiry_is_final() {
        let view = project(&[issued(), expired()]).unwrap();

        assert_eq!(view.status, CouponStatus::Expired);
        assert_eq!(view.order_id, None);
        assert_eq!(view.updated_at, at(2));
    }

    #[test]
    fn events_after_the_issue_need_a_document() {
        for event in [reserved(ORDER), redeemed(ORDER), released(ORDER), expired()] {
            let result = CouponProjector::apply(None, &envelope(1, &event));
            assert!(
                matches!(result, Err(ApplyError::Unexpected { .. })),
                "{event:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn a_second_issue_is_unexpected() {
        let view = project(&[issued()]).unwrap();

        let result = CouponProjector::apply(Some(view), &envelope(2, &issued()));

        assert!(matches!(result, Err(ApplyError::Unexpected { .. })), "{result:?}");
    }

    #[test]
    fn the_document_has_the_contract_fields() {
        let view = project(&[issued(), reserved(ORDER)]).unwrap();

        let json = serde_json::to_value(&view).unwrap();

        assert_eq!(
            keys(&json),
            BTreeSet::from([
                "coupon_id",
                "user_id",
                "merchant_id",
                "voucher_id",
                "value_cents",
                "min_spend_cents",
                "expires_at",
                "source",
                "status",
                "order_id",
                "version",
                "created_at",
                "updated_at",
            ])
        );
        assert_eq!(json["status"], "reserved");
        assert_eq!(json["order_id"], id(ORDER).to_string());
        assert_eq!(
            json["source"],
            json!({ "kind": "seckill_order", "order_id": id(SECKILL_ORDER).to_string() })
        );
        assert_eq!(json["version"], 2);
        assert_eq!(serde_json::from_value::<CouponView>(json).unwrap(), view);
    }

    #[test]
    fn a_released_coupon_has_a_null_order() {
        let json = serde_json::to_value(project(&[issued(), reserved(ORDER), released(ORDER)]).unwrap()).unwrap();

        assert_eq!(json["status"], "available");
        assert_eq!(json["order_id"], Value::Null);
    }

    #[test]
    fn columns_carry_owner_status_and_times() {
        let view = project(&[issued(), reserved(ORDER), redeemed(ORDER)]).unwrap();

        assert_eq!(
            CouponProjector::columns(&view),
            Columns {
                user_id: Some("alice".into()),
                merchant_id: Some("shop-1".into()),
                status: Some("redeemed".into()),
                created_at: Some(at(1)),
                updated_at: Some(at(3)),
            }
        );
        assert_eq!(CouponProjector::version(&view), 3);
    }
}
