//! The Product aggregate: a merchant's goods and their stock, reserved and
//! released per order by the goods-order saga.
//!
//! Rules it enforces:
//! - Creation: a non-blank name of at most 200 characters, a non-negative
//!   price.
//! - Restock by 1..=1,000,000 units, never past `u32::MAX` in total.
//! - No oversell: an order reserves only what is available
//!   (stock − reserved + released).
//! - Reserve and release are idempotent per order: an order reserves at most
//!   once (again with the same quantity is a no-op, even after its release,
//!   since that can only be a late redelivery) and releases what it reserved
//!   exactly once; releasing for an order that holds nothing is a no-op,
//!   because compensations are delivered at least once and may follow a
//!   reservation that never happened.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use events::{AggregateEvents, ProductEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DomainError, ErrorKind};

pub const MAX_NAME_CHARS: usize = super::limits::MAX_TEXT_CHARS;
pub const MAX_RESTOCK: u32 = super::limits::MAX_QUANTITY;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductCommand {
    Create {
        product_id: Uuid,
        merchant_id: String,
        name: String,
        price_cents: i64,
        stock: u32,
    },
    Restock {
        quantity: u32,
        /// The acting merchant (`None`: an admin). A merchant restocks only
        /// its own products; another's is answered as missing.
        merchant: Option<String>,
    },
    Reserve {
        order_id: Uuid,
        quantity: u32,
    },
    Release {
        order_id: Uuid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    #[error("product not found")]
    NotFound,
    #[error("product already exists")]
    AlreadyExists,
    #[error("name must not be blank")]
    EmptyName,
    #[error("name must be at most {MAX_NAME_CHARS} characters")]
    NameTooLong,
    #[error("name must not contain control characters")]
    NameNotText,
    #[error("price_cents must not be negative")]
    NegativePrice,
    #[error("price_cents must be at most {}", super::limits::MAX_CENTS)]
    PriceTooHigh,
    #[error("stock must be at most {}", super::limits::MAX_QUANTITY)]
    StockTooLarge,
    #[error("quantity {quantity} is out of range")]
    InvalidQuantity { quantity: u32 },
    #[error("the stock would exceed its maximum")]
    StockOverflow,
    #[error("only {available} left")]
    OutOfStock { available: u32 },
    #[error("this order already reserved {reserved}")]
    ReservationConflict { reserved: u32 },
}

impl DomainError for ProductError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound => ErrorKind::NotFound,
            Self::AlreadyExists | Self::OutOfStock { .. } | Self::ReservationConflict { .. } => ErrorKind::Conflict,
            Self::EmptyName
            | Self::NameTooLong
            | Self::NameNotText
            | Self::NegativePrice
            | Self::PriceTooHigh
            | Self::StockTooLarge
            | Self::InvalidQuantity { .. }
            | Self::StockOverflow => ErrorKind::Invalid,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "product_not_found",
            Self::AlreadyExists => "product_exists",
            Self::EmptyName => "name_empty",
            Self::NameTooLong => "name_too_long",
            Self::NameNotText => "name_not_text",
            Self::NegativePrice => "negative_price",
            Self::PriceTooHigh => "price_too_high",
            Self::StockTooLarge => "stock_too_large",
            Self::InvalidQuantity { .. } => "invalid_quantity",
            Self::StockOverflow => "stock_overflow",
            Self::OutOfStock { .. } => "out_of_stock",
            Self::ReservationConflict { .. } => "reservation_conflict",
        }
    }
}

/// What `ProductCreated` fixed about the product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductDetails {
    pub product_id: Uuid,
    pub merchant_id: String,
    pub name: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    quantity: u32,
    released: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Product {
    details: Option<ProductDetails>,
    /// Everything ever put on the shelf: the initial stock plus restocks.
    stock: u32,
    /// Units held by reservations not yet released.
    held: u32,
    reservations: HashMap<Uuid, Reservation>,
}

impl Product {
    pub fn exists(&self) -> bool {
        self.details.is_some()
    }

    pub fn details(&self) -> Option<&ProductDetails> {
        self.details.as_ref()
    }

    pub fn name(&self) -> Option<&str> {
        self.details.as_ref().map(|d| d.name.as_str())
    }

    pub fn merchant_id(&self) -> Option<&str> {
        self.details.as_ref().map(|d| d.merchant_id.as_str())
    }

    pub fn price_cents(&self) -> Option<i64> {
        self.details.as_ref().map(|d| d.price_cents)
    }

    pub fn stock(&self) -> u32 {
        self.stock
    }

    /// Units that can still be reserved.
    pub fn available(&self) -> u32 {
        self.stock.saturating_sub(self.held)
    }

    /// Units currently held by orders.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// What an order currently holds (0 once released or never reserved).
    pub fn reserved_by(&self, order_id: Uuid) -> u32 {
        match self.reservations.get(&order_id) {
            Some(reservation) if !reservation.released => reservation.quantity,
            _ => 0,
        }
    }

    fn decide(&self, command: ProductCommand) -> Result<Option<ProductEvent>, ProductError> {
        match command {
            ProductCommand::Create {
                product_id,
                merchant_id,
                name,
                price_cents,
                stock,
            } => {
                if self.exists() {
                    return Err(ProductError::AlreadyExists);
                }
                if name.trim().is_empty() {
                    return Err(ProductError::EmptyName);
                }
                if name.chars().count() > MAX_NAME_CHARS {
                    return Err(ProductError::NameTooLong);
                }
                if !super::limits::is_clean_text(&name) {
                    return Err(ProductError::NameNotText);
                }
                if price_cents < 0 {
                    return Err(ProductError::NegativePrice);
                }
                if price_cents > super::limits::MAX_CENTS {
                    return Err(ProductError::PriceTooHigh);
                }
                if stock > super::limits::MAX_QUANTITY {
                    return Err(ProductError::StockTooLarge);
                }
                Ok(Some(ProductEvent::ProductCreated {
                    product_id,
                    merchant_id,
                    name,
                    price_cents,
                    stock,
                }))
            }
            ProductCommand::Restock { quantity, merchant } => {
                let owned = match (&self.details, merchant) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(details), Some(merchant)) => details.merchant_id == merchant,
                };
                if !owned {
                    return Err(ProductError::NotFound);
                }
                if quantity == 0 || quantity > MAX_RESTOCK {
                    return Err(ProductError::InvalidQuantity { quantity });
                }
                if self.stock.checked_add(quantity).is_none() {
                    return Err(ProductError::StockOverflow);
                }
                Ok(Some(ProductEvent::ProductRestocked { quantity }))
            }
            ProductCommand::Reserve { order_id, quantity } => {
                if !self.exists() {
                    return Err(ProductError::NotFound);
                }
                if quantity == 0 {
                    return Err(ProductError::InvalidQuantity { quantity });
                }
                if let Some(existing) = self.reservations.get(&order_id) {
                    return if existing.quantity == quantity {
                        Ok(None)
                    } else {
                        Err(ProductError::ReservationConflict {
                            reserved: existing.quantity,
                        })
                    };
                }
                let available = self.available();
                if quantity > available {
                    return Err(ProductError::OutOfStock { available });
                }
                Ok(Some(ProductEvent::ProductStockReserved { order_id, quantity }))
            }
            ProductCommand::Release { order_id } => match self.reservations.get(&order_id) {
                Some(reservation) if !reservation.released => Ok(Some(ProductEvent::ProductStockReleased {
                    order_id,
                    quantity: reservation.quantity,
                })),
                _ => Ok(None),
            },
        }
    }
}

impl Aggregate for Product {
    const TYPE: &'static str = ProductEvent::AGGREGATE_TYPE;
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Error = ProductError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if let Some(event) = self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ProductEvent::ProductCreated {
                product_id,
                merchant_id,
                name,
                price_cents,
                stock,
            } => {
                self.details = Some(ProductDetails {
                    product_id,
                    merchant_id,
                    name,
                    price_cents,
                });
                self.stock = stock;
            }
            ProductEvent::ProductRestocked { quantity } => {
                self.stock = self.stock.saturating_add(quantity);
            }
            ProductEvent::ProductStockReserved { order_id, quantity } => {
                // Counted only the first time, so a repeated event cannot hold twice.
                if let Entry::Vacant(slot) = self.reservations.entry(order_id) {
                    slot.insert(Reservation {
                        quantity,
                        released: false,
                    });
                    self.held = self.held.saturating_add(quantity);
                }
            }
            ProductEvent::ProductStockReleased { order_id, .. } => {
                // The recorded reservation, not the event, says how much comes back.
                if let Some(reservation) = self.reservations.get_mut(&order_id)
                    && !reservation.released
                {
                    reservation.released = true;
                    self.held = self.held.saturating_sub(reservation.quantity);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::domain::testing::{execute, id, replay};

    const PRODUCT: u128 = 0xA1;

    fn framework() -> TestFramework<Product> {
        TestFramework::with(())
    }

    fn create(name: &str, price_cents: i64, stock: u32) -> ProductCommand {
        ProductCommand::Create {
            product_id: id(PRODUCT),
            merchant_id: "merchant-1".into(),
            name: name.into(),
            price_cents,
            stock,
        }
    }

    fn created(stock: u32) -> ProductEvent {
        ProductEvent::ProductCreated {
            product_id: id(PRODUCT),
            merchant_id: "merchant-1".into(),
            name: "Apple".into(),
            price_cents: 120,
            stock,
        }
    }

    fn reserve(order: u128, quantity: u32) -> ProductCommand {
        ProductCommand::Reserve {
            order_id: id(order),
            quantity,
        }
    }

    fn reserved(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::ProductStockReserved {
            order_id: id(order),
            quantity,
        }
    }

    fn release(order: u128) -> ProductCommand {
        ProductCommand::Release { order_id: id(order) }
    }

    fn released(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::ProductStockReleased {
            order_id: id(order),
            quantity,
        }
    }

    // ---- Create ----

    #[test]
    fn create_a_product() {
        framework()
            .given_no_previous_events()
            .when(create("Apple", 120, 10))
            .then_expect_events(vec![created(10)]);
    }

    #[test]
    fn create_accepts_the_limits() {
        let name = "é".repeat(MAX_NAME_CHARS);
        let events = execute(&mut Product::default(), create(&name, 0, 0), &()).unwrap();
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn create_twice_is_a_conflict() {
        framework()
            .given(vec![created(10)])
            .when(create("Apple", 120, 10))
            .then_expect_error(ProductError::AlreadyExists);
    }

    #[test]
    fn create_validates_its_fields() {
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        for (command, error) in [
            (create("", 120, 1), ProductError::EmptyName),
            (create("   ", 120, 1), ProductError::EmptyName),
            (create(&long, 120, 1), ProductError::NameTooLong),
            (create("Apple", -1, 1), ProductError::NegativePrice),
            (create("Ap\0ple", 120, 1), ProductError::NameNotText),
            (create("Apple\n", 120, 1), ProductError::NameNotText),
            (
                create("Apple", crate::domain::limits::MAX_CENTS + 1, 1),
                ProductError::PriceTooHigh,
            ),
            (create("Apple", i64::MAX, 1), ProductError::PriceTooHigh),
            (
                create("Apple", 120, crate::domain::limits::MAX_QUANTITY + 1),
                ProductError::StockTooLarge,
            ),
        ] {
            framework()
                .given_no_previous_events()
                .when(command)
                .then_expect_error(error);
        }
    }

    // ---- Restock ----

    #[test]
    fn a_merchant_restocks_only_its_own_products() {
        let restock = |merchant: &str| ProductCommand::Restock {
            quantity: 5,
            merchant: Some(merchant.into()),
        };
        framework()
            .given(vec![created(10)])
            .when(restock("merchant-1"))
            .then_expect_events(vec![ProductEvent::ProductRestocked { quantity: 5 }]);
        // another merchant's product is answered as missing
        framework()
            .given(vec![created(10)])
            .when(restock("merchant-2"))
            .then_expect_error(ProductError::NotFound);
    }

    #[test]
    fn restock_a_product() {
        framework()
            .given(vec![created(10)])
            .when(ProductCommand::Restock {
                quantity: MAX_RESTOCK,
                merchant: None,
            })
            .then_expect_events(vec![ProductEvent::ProductRestocked { quantity: MAX_RESTOCK }]);
    }

    #[test]
    fn restock_quantity_must_be_in_range() {
        for quantity in [0, MAX_RESTOCK + 1] {
            framework()
                .given(vec![created(10)])
                .when(ProductCommand::Restock {
                    quantity,
                    merchant: None,
                })
                .then_expect_error(ProductError::InvalidQuantity { quantity });
        }
    }

    #[test]
    fn restock_past_the_maximum_is_refused() {
        framework()
            .given(vec![created(u32::MAX - 5)])
            .when(ProductCommand::Restock {
                quantity: 6,
                merchant: None,
            })
            .then_expect_error(ProductError::StockOverflow);
    }

    #[test]
    fn restock_a_missing_product_is_not_found() {
        framework()
            .given_no_previous_events()
            .when(ProductCommand::Restock {
                quantity: 1,
                merchant: None,
            })
            .then_expect_error(ProductError::NotFound);
    }

    // ---- Reserve ----

    #[test]
    fn reserve_what_is_available() {
        framework()
            .given(vec![created(10), reserved(1, 4)])
            .when(reserve(2, 6))
            .then_expect_events(vec![reserved(2, 6)]);
    }

    #[test]
    fn reserve_counts_restocks_and_releases() {
        framework()
            .given(vec![
                created(2),
                reserved(1, 2),
                released(1, 2),
                ProductEvent::ProductRestocked { quantity: 3 },
            ])
            .when(reserve(2, 5))
            .then_expect_events(vec![reserved(2, 5)]);
    }

    #[test]
    fn reserve_more_than_available_is_out_of_stock() {
        framework()
            .given(vec![created(10), reserved(1, 4)])
            .when(reserve(2, 7))
            .then_expect_error(ProductError::OutOfStock { available: 6 });
    }

    #[test]
    fn reserve_again_for_the_same_order_is_a_no_op() {
        for history in [
            vec![created(10), reserved(1, 4)],
            vec![created(10), reserved(1, 4), released(1, 4)],
            // Even when nothing would be left to reserve now.
            vec![created(4), reserved(1, 4)],
        ] {
            framework()
                .given(history)
                .when(reserve(1, 4))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn reserve_again_with_another_quantity_is_a_conflict() {
        framework()
            .given(vec![created(10), reserved(1, 4)])
            .when(reserve(1, 5))
            .then_expect_error(ProductError::ReservationConflict { reserved: 4 });
    }

    #[test]
    fn reserve_nothing_is_invalid_and_a_missing_product_is_not_found() {
        framework()
            .given(vec![created(10)])
            .when(reserve(1, 0))
            .then_expect_error(ProductError::InvalidQuantity { quantity: 0 });
        framework()
            .given_no_previous_events()
            .when(reserve(1, 1))
            .then_expect_error(ProductError::NotFound);
    }

    // ---- Release ----

    #[test]
    fn release_gives_back_what_the_order_reserved() {
        framework()
            .given(vec![created(10), reserved(1, 4)])
            .when(release(1))
            .then_expect_events(vec![released(1, 4)]);
    }

    #[test]
    fn release_twice_or_without_a_reservation_is_a_no_op() {
        for history in [
            vec![created(10), reserved(1, 4), released(1, 4)],
            vec![created(10)],
            vec![created(10), reserved(2, 4)],
            vec![],
        ] {
            framework().given(history).when(release(1)).then_expect_events(vec![]);
        }
    }

    // ---- state ----

    #[test]
    fn available_tracks_reservations_and_survives_repeated_events() {
        let product: Product = replay(vec![
            created(10),
            reserved(1, 4),
            reserved(1, 4),
            reserved(2, 3),
            released(1, 4),
            released(1, 4),
            released(9, 100),
            ProductEvent::ProductRestocked { quantity: 5 },
        ]);
        assert_eq!(product.stock(), 15);
        assert_eq!(product.held(), 3);
        assert_eq!(product.available(), 12);
        assert_eq!(product.reserved_by(id(1)), 0);
        assert_eq!(product.reserved_by(id(2)), 3);
        assert_eq!(product.name(), Some("Apple"));
        assert_eq!(product.price_cents(), Some(120));
        assert_eq!(product.merchant_id(), Some("merchant-1"));
    }

    #[test]
    fn concurrent_orders_never_oversell() {
        let mut product = Product::default();
        execute(&mut product, create("Apple", 120, 7), &()).unwrap();
        let mut held = 0;
        for order in 0..20_u128 {
            let quantity = (order % 3 + 1) as u32;
            match execute(&mut product, reserve(order, quantity), &()) {
                Ok(events) => {
                    assert_eq!(events.len(), 1);
                    held += quantity;
                }
                Err(ProductError::OutOfStock { available }) => assert!(available < quantity),
                Err(other) => panic!("unexpected {other:?}"),
            }
            if order % 4 == 0 {
                let back = product.reserved_by(id(order));
                execute(&mut product, release(order), &()).unwrap();
                held -= back;
            }
            assert!(product.held() <= product.stock());
            assert_eq!(product.held(), held);
        }
    }

    #[test]
    fn every_error_has_a_distinct_code() {
        let all = [
            ProductError::NotFound,
            ProductError::AlreadyExists,
            ProductError::EmptyName,
            ProductError::NameTooLong,
            ProductError::NegativePrice,
            ProductError::InvalidQuantity { quantity: 0 },
            ProductError::StockOverflow,
            ProductError::OutOfStock { available: 0 },
            ProductError::ReservationConflict { reserved: 0 },
        ];
        let codes: BTreeSet<_> = all.iter().map(DomainError::code).collect();
        assert_eq!(codes.len(), all.len());
    }
}
