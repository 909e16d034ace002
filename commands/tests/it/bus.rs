//! The command bus against a real Postgres: two processes, each with its own
//! aggregate cache, deciding on one product. A cache that is behind the store
//! never yields a wrong answer: an append at a stale version is a conflict
//! and is decided again on the store's state, and a refusal decided on a
//! stale entry is confirmed against the store before it is answered.

use commands::{
    bus::{CommandError, Commands},
    domain::{Product, ProductCommand, ProductError},
};
use event_store::{AggregateCache, EventStore};
use events::EventMetadata;
use uuid::Uuid;

fn process(db: &testkit::TestDb) -> Commands<Product> {
    Commands::new(EventStore::new(db.pool.clone()), ()).with_cache(AggregateCache::new(100))
}

fn reserve(order: u128) -> impl Fn() -> ProductCommand {
    move || ProductCommand::Reserve {
        order_id: Uuid::from_u128(order),
        quantity: 1,
    }
}

#[tokio::test]
async fn a_cache_behind_the_store_never_decides_wrongly() -> anyhow::Result<()> {
    let db = testkit::TestDb::new().await?;
    let (a, b) = (process(&db), process(&db));
    let meta = EventMetadata::system("test");
    let product = Uuid::now_v7();
    let id = product.to_string();
    a.create(
        &id,
        || ProductCommand::Create {
            product_id: product,
            merchant_id: "shop".into(),
            name: "Dish".into(),
            price_cents: 1_000,
            stock: 1,
        },
        &meta,
    )
    .await?;
    // a caches one unit in stock; b takes it
    b.execute(&id, reserve(1), &meta).await?;

    // a decides on its stale entry (one unit left): the append conflicts and
    // the retry, on the store's state, refuses
    let taken = a.execute(&id, reserve(2), &meta).await;
    assert!(
        matches!(
            taken,
            Err(CommandError::Domain(ProductError::OutOfStock { available: 0 }))
        ),
        "{taken:?}"
    );

    // b restocks; a's entry (nothing in stock) would refuse, but a refusal
    // is confirmed against the store first, and the store has stock now
    b.execute(
        &id,
        || ProductCommand::Restock {
            quantity: 2,
            merchant: None,
        },
        &meta,
    )
    .await?;
    let reserved = a.execute(&id, reserve(3), &meta).await?;
    assert_eq!(reserved.version, 4, "created, reserved, restocked, reserved");

    // and the store holds exactly what was decided
    let reservations: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(&id)
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        reservations,
        [
            "ProductCreated",
            "ProductStockReserved",
            "ProductRestocked",
            "ProductStockReserved"
        ]
    );
    db.drop_database().await
}
