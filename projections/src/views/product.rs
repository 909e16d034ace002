//! The product document: a merchant's goods and how much of their stock is
//! still free to order.

use chrono::{DateTime, Utc};
use events::{EventEnvelope, ProductEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApplyError, Columns, Projector};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductView {
    pub product_id: Uuid,
    pub merchant_id: String,
    pub name: String,
    pub price_cents: i64,
    /// Everything ever put on the shelf: the initial stock plus restocks.
    pub stock: u64,
    /// Units held by orders: reserved − released.
    pub reserved: u64,
    /// stock − reserved: what an order can still reserve.
    pub stock_available: u64,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct ProductProjector;

impl Projector for ProductProjector {
    type View = ProductView;
    const NAME: &'static str = "products";
    const TABLE: &'static str = "product_view";
    const AGGREGATE_TYPE: &'static str = "Product";

    // The aggregate keeps each order's reservation so a repeated event cannot
    // hold twice and a release gives back what was reserved; this view keeps
    // one counter instead, so the document does not grow with every order.
    // That is exact because (1) the aggregate records at most one
    // reservation per order and releases only an unreleased one, with the
    // quantity it reserved, so every recorded event changes its state by the
    // event's quantity; and (2) the writer applies each sequence exactly
    // once, in order.
    fn apply(view: Option<ProductView>, event: &EventEnvelope) -> Result<ProductView, ApplyError> {
        let decoded = event.decode::<ProductEvent>()?;
        let mut view = match (view, decoded) {
            (
                None,
                ProductEvent::ProductCreated {
                    product_id,
                    merchant_id,
                    name,
                    price_cents,
                    stock,
                },
            ) => ProductView {
                product_id,
                merchant_id,
                name,
                price_cents,
                stock: u64::from(stock),
                reserved: 0,
                stock_available: 0,
                version: event.sequence,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
            },
            (None, _) => return Err(unexpected(event, "a missing product")),
            (Some(_), ProductEvent::ProductCreated { .. }) => return Err(unexpected(event, "an existing product")),
            (Some(mut view), ProductEvent::ProductRestocked { quantity }) => {
                view.stock = view.stock.saturating_add(u64::from(quantity));
                view
            }
            (Some(mut view), ProductEvent::ProductStockReserved { quantity, .. }) => {
                view.reserved = view.reserved.saturating_add(u64::from(quantity));
                view
            }
            (Some(mut view), ProductEvent::ProductStockReleased { quantity, .. }) => {
                view.reserved = view.reserved.saturating_sub(u64::from(quantity));
                view
            }
        };
        view.stock_available = view.stock.saturating_sub(view.reserved);
        view.version = event.sequence;
        view.updated_at = event.recorded_at;
        Ok(view)
    }

    fn version(view: &ProductView) -> u64 {
        view.version
    }

    fn columns(view: &ProductView) -> Columns {
        Columns {
            user_id: None,
            merchant_id: Some(view.merchant_id.clone()),
            status: None,
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
    use serde_json::Value;

    use super::*;

    const PRODUCT: u128 = 0xA1;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 6, 1, 12, 0, 0).unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        t0() + Duration::seconds(seconds)
    }

    fn envelope(sequence: u64, event: &ProductEvent) -> EventEnvelope {
        let n = i64::try_from(sequence).unwrap();
        EventEnvelope::new(
            id(PRODUCT).to_string(),
            sequence,
            n + 100,
            event,
            EventMetadata::system("test"),
            at(n),
        )
        .unwrap()
    }

    /// Applies the events in order; event n (from 1) is recorded at `at(n)`.
    fn project(events: &[ProductEvent]) -> Result<ProductView, ApplyError> {
        let mut view = None;
        for (n, event) in (1..).zip(events) {
            view = Some(ProductProjector::apply(view, &envelope(n, event))?);
        }
        Ok(view.expect("no events"))
    }

    fn created(stock: u32) -> ProductEvent {
        ProductEvent::ProductCreated {
            product_id: id(PRODUCT),
            merchant_id: "m-1".into(),
            name: "Apple".into(),
            price_cents: 150,
            stock,
        }
    }

    fn restocked(quantity: u32) -> ProductEvent {
        ProductEvent::ProductRestocked { quantity }
    }

    fn reserved(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::ProductStockReserved {
            order_id: id(order),
            quantity,
        }
    }

    fn released(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::ProductStockReleased {
            order_id: id(order),
            quantity,
        }
    }

    /// (stock, reserved, stock_available)
    fn figures(view: &ProductView) -> (u64, u64, u64) {
        (view.stock, view.reserved, view.stock_available)
    }

    fn keys(value: &Value) -> BTreeSet<&str> {
        value.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn creation_makes_the_initial_stock_available() {
        let view = project(&[created(10)]).unwrap();

        assert_eq!(
            view,
            ProductView {
                product_id: id(PRODUCT),
                merchant_id: "m-1".into(),
                name: "Apple".into(),
                price_cents: 150,
                stock: 10,
                reserved: 0,
                stock_available: 10,
                version: 1,
                created_at: at(1),
                updated_at: at(1),
            }
        );
    }

    #[test]
    fn restocking_adds_to_the_stock() {
        let view = project(&[created(10), restocked(5)]).unwrap();

        assert_eq!(figures(&view), (15, 0, 15));
        assert_eq!(view.version, 2);
        assert_eq!(view.updated_at, at(2));
    }

    #[test]
    fn reservations_hold_units() {
        let view = project(&[created(10), reserved(1, 3), reserved(2, 7)]).unwrap();

        assert_eq!(figures(&view), (10, 10, 0));
    }

    #[test]
    fn a_release_gives_the_units_back() {
        let view = project(&[created(10), reserved(1, 3), reserved(2, 2), released(1, 3)]).unwrap();

        assert_eq!(figures(&view), (10, 2, 8));
        assert_eq!(view.version, 4);
        assert_eq!(view.created_at, at(1));
    }

    #[test]
    fn events_after_creation_need_a_document() {
        for event in [restocked(1), reserved(1, 1), released(1, 1)] {
            let result = ProductProjector::apply(None, &envelope(1, &event));
            assert!(
                matches!(result, Err(ApplyError::Unexpected { .. })),
                "{event:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn a_second_creation_is_unexpected() {
        let view = project(&[created(10)]).unwrap();

        let result = ProductProjector::apply(Some(view), &envelope(2, &created(10)));

        assert!(matches!(result, Err(ApplyError::Unexpected { .. })), "{result:?}");
    }

    #[test]
    fn the_document_has_the_contract_fields() {
        let view = project(&[created(10), reserved(1, 4)]).unwrap();

        let json = serde_json::to_value(&view).unwrap();

        assert_eq!(
            keys(&json),
            BTreeSet::from([
                "product_id",
                "merchant_id",
                "name",
                "price_cents",
                "stock",
                "reserved",
                "stock_available",
                "version",
                "created_at",
                "updated_at",
            ])
        );
        assert_eq!(json["stock"], 10);
        assert_eq!(json["reserved"], 4);
        assert_eq!(json["stock_available"], 6);
        assert_eq!(serde_json::from_value::<ProductView>(json).unwrap(), view);
    }

    #[test]
    fn columns_carry_only_the_times() {
        let view = project(&[created(10), restocked(1)]).unwrap();

        assert_eq!(
            ProductProjector::columns(&view),
            Columns {
                user_id: None,
                merchant_id: Some("m-1".into()),
                status: None,
                created_at: Some(at(1)),
                updated_at: Some(at(2)),
            }
        );
        assert_eq!(ProductProjector::version(&view), 2);
    }
}
