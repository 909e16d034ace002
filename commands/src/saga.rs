//! The goods reservation saga's decision, pure: from a submitted order and
//! the current state of its products, what happens next. No I/O and no
//! clock: the executor (`lifecycle`) loads the states, runs the plan's
//! commands through the aggregates (which keep their own rules: stock, the
//! coupon's owner, expiry and minimum spend) and appends everything in one
//! unit of work.

use std::collections::HashMap;

use events::{OrderItem, OrderRejectionReason, OrderStatus};
use uuid::Uuid;

use crate::domain::{Order, Product};

/// An order priced from its products: one merchant, a representable subtotal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub merchant_id: String,
    /// The lines with the prices and names as bought.
    pub items: Vec<OrderItem>,
    pub subtotal_cents: i64,
}

/// What the saga does with an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoodsPlan {
    /// Not awaiting its reservation (placed, rejected or cancelled already):
    /// a redelivered event, nothing to do.
    Done,
    /// Refused before anything is reserved.
    Reject(OrderRejectionReason),
    /// Reserve the coupon (if any) against `subtotal_cents` and every line's
    /// stock, then place the order: all in one append.
    Reserve(Priced),
}

/// Plans a submitted goods order from its products' current states
/// (`products` holds every requested product id; a product with no events is
/// unknown).
pub fn plan(order: &Order, products: &HashMap<Uuid, Product>) -> GoodsPlan {
    plan_with(order, |product_id| products.get(product_id))
}

/// [`plan`] with the products looked up by `product`.
pub fn plan_with<'a>(order: &Order, product: impl Fn(&Uuid) -> Option<&'a Product>) -> GoodsPlan {
    if order.status() != Some(OrderStatus::Submitted) {
        return GoodsPlan::Done;
    }
    let mut items = Vec::with_capacity(order.requested_items().len());
    let mut merchant_id: Option<&str> = None;
    for line in order.requested_items() {
        let details = product(&line.product_id).and_then(Product::details);
        let Some(details) = details else {
            return GoodsPlan::Reject(OrderRejectionReason::ProductNotFound {
                product_id: line.product_id,
            });
        };
        match merchant_id {
            Some(merchant) if merchant != details.merchant_id => {
                return GoodsPlan::Reject(OrderRejectionReason::MixedMerchants);
            }
            _ => merchant_id = Some(&details.merchant_id),
        }
        items.push(OrderItem {
            product_id: Some(line.product_id),
            voucher_id: None,
            name: details.name.clone(),
            quantity: line.quantity,
            unit_price_cents: details.price_cents,
        });
    }
    let Some(subtotal_cents) = items.iter().try_fold(0_i64, |sum, item| {
        item.unit_price_cents
            .checked_mul(i64::from(item.quantity))
            .and_then(|line| sum.checked_add(line))
    }) else {
        return GoodsPlan::Reject(OrderRejectionReason::TotalTooLarge);
    };
    GoodsPlan::Reserve(Priced {
        merchant_id: merchant_id.unwrap_or_default().to_owned(),
        items,
        subtotal_cents,
    })
}

/// The first line whose stock cannot cover it, given what the batch holds
/// already: `product` is the product's state with this batch's earlier
/// reservations applied. A line this order reserved before (a redelivery)
/// needs nothing more.
pub fn short_line<'a>(order: &Order, product: impl Fn(&Uuid) -> Option<&'a Product>) -> Option<Uuid> {
    let order_id = order.order_id()?;
    order.requested_items().iter().find_map(|line| {
        let state = product(&line.product_id)?;
        let held = state.reserved_by(order_id);
        let short = held != line.quantity && (held > 0 || state.available() < line.quantity);
        short.then_some(line.product_id)
    })
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone as _, Utc};
    use cqrs_es::Aggregate as _;
    use events::{OrderEvent, ProductEvent, RequestedItem};

    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn submitted(lines: &[(u128, u32)]) -> Order {
        let mut order = Order::default();
        order.apply(OrderEvent::OrderSubmitted {
            order_id: id(1),
            user_id: "ann".into(),
            merchant_id: Some("shop-1".into()),
            items: lines
                .iter()
                .map(|(product, quantity)| RequestedItem {
                    product_id: id(*product),
                    quantity: *quantity,
                })
                .collect(),
            coupon_id: None,
            submitted_at: Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap(),
        });
        order
    }

    fn product(n: u128, merchant: &str, price_cents: i64) -> (Uuid, Product) {
        let mut product = Product::default();
        product.apply(ProductEvent::ProductCreated {
            product_id: id(n),
            merchant_id: merchant.into(),
            name: format!("Dish {n}"),
            price_cents,
            stock: 10,
        });
        (id(n), product)
    }

    #[test]
    fn a_submitted_order_is_priced_from_its_products() {
        let products = HashMap::from([product(10, "shop-1", 300), product(11, "shop-1", 450)]);
        let GoodsPlan::Reserve(priced) = plan(&submitted(&[(10, 2), (11, 1)]), &products) else {
            panic!("not priced");
        };
        assert_eq!(priced.merchant_id, "shop-1");
        assert_eq!(priced.subtotal_cents, 1_050);
        assert_eq!(priced.items[0].name, "Dish 10");
        assert_eq!(priced.items[1].unit_price_cents, 450);
    }

    #[test]
    fn what_can_never_be_placed_is_rejected_before_anything_is_reserved() {
        let products = HashMap::from([product(10, "shop-1", 300), product(12, "shop-2", 100)]);
        assert_eq!(
            plan(&submitted(&[(10, 1), (13, 1)]), &products),
            GoodsPlan::Reject(OrderRejectionReason::ProductNotFound { product_id: id(13) })
        );
        assert_eq!(
            plan(&submitted(&[(10, 1), (12, 1)]), &products),
            GoodsPlan::Reject(OrderRejectionReason::MixedMerchants)
        );
        let gold = HashMap::from([product(14, "shop-1", i64::MAX / 2)]);
        assert_eq!(
            plan(&submitted(&[(14, 3)]), &gold),
            GoodsPlan::Reject(OrderRejectionReason::TotalTooLarge)
        );
    }

    #[test]
    fn a_line_the_stock_cannot_cover_is_found_before_anything_is_reserved() {
        let products = HashMap::from([product(10, "shop-1", 300), product(11, "shop-1", 450)]);
        let lookup = |id: &Uuid| products.get(id);
        assert_eq!(short_line(&submitted(&[(10, 10), (11, 1)]), lookup), None);
        assert_eq!(short_line(&submitted(&[(10, 1), (11, 11)]), lookup), Some(id(11)));
        // what this order holds already counts as covered
        let mut held = products.clone();
        if let Some(apple) = held.get_mut(&id(10)) {
            apple.apply(ProductEvent::ProductStockReserved {
                order_id: id(1),
                quantity: 10,
            });
        }
        assert_eq!(short_line(&submitted(&[(10, 10)]), |id| held.get(id)), None);
        // but nobody else's units
        assert_eq!(short_line(&submitted(&[(10, 11)]), |id| held.get(id)), Some(id(10)));
    }

    #[test]
    fn an_order_already_decided_is_left_alone() {
        let products = HashMap::from([product(10, "shop-1", 300)]);
        assert_eq!(plan(&Order::default(), &products), GoodsPlan::Done);
        let mut order = submitted(&[(10, 1)]);
        order.apply(OrderEvent::OrderCancelled {
            reason: events::CancellationReason::CustomerRequested,
            cancelled_by: "ann".into(),
            cancelled_at: Utc.with_ymd_and_hms(2030, 1, 1, 12, 1, 0).unwrap(),
        });
        assert_eq!(plan(&order, &products), GoodsPlan::Done);
    }
}
