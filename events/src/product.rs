//! Events of the Product aggregate: goods stock, reserved and released per
//! order so both are idempotent on redelivery.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AggregateEvents;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductEvent {
    ProductCreated {
        product_id: Uuid,
        merchant_id: String,
        name: String,
        price_cents: i64,
        stock: u32,
    },
    ProductRestocked {
        quantity: u32,
    },
    ProductStockReserved {
        order_id: Uuid,
        quantity: u32,
    },
    ProductStockReleased {
        order_id: Uuid,
        quantity: u32,
    },
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ProductCreated { .. } => "ProductCreated",
            Self::ProductRestocked { .. } => "ProductRestocked",
            Self::ProductStockReserved { .. } => "ProductStockReserved",
            Self::ProductStockReleased { .. } => "ProductStockReleased",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl AggregateEvents for ProductEvent {
    const AGGREGATE_TYPE: &'static str = "Product";
}
