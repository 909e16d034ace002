//! Wire-format tests: every event survives JSON, names are stable, and the
//! metadata, envelope and NATS naming contracts hold.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;

use chrono::{DateTime, TimeZone, Utc};
use events::metadata::keys;
use events::subjects::{HDR_CORRELATION_ID, HDR_EVENT_TYPE, MSG_ID};
use events::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use uuid::Uuid;

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 10, minute, 0).unwrap()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn metadata() -> EventMetadata {
    EventMetadata::for_user("user-1", "customer")
        .caused_by(id(99))
        .with_trace(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x".to_owned()),
        )
}

fn json_roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
    let text = serde_json::to_string(value).unwrap();
    assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), value, "{text}");
}

/// Round-trips each sample on its own and inside an envelope, and checks
/// that `event_type()` is the variant name (the externally tagged key) and
/// unique within the enum.
fn check_catalogue<E: AggregateEvents>(samples: &[E], variants: usize) {
    let mut types = HashSet::new();
    for (n, event) in samples.iter().enumerate() {
        json_roundtrip(event);
        let value = serde_json::to_value(event).unwrap();
        let tag = value.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(event.event_type(), tag);
        assert!(types.insert(tag), "duplicate event type");

        let envelope = EventEnvelope::new("agg-1", n as u64 + 1, 7, event, metadata(), at(0)).unwrap();
        assert_eq!(envelope.aggregate_type, E::AGGREGATE_TYPE);
        assert_eq!(&envelope.decode::<E>().unwrap(), event);
    }
    assert_eq!(types.len(), variants, "a variant has no sample");
}

fn voucher_events() -> Vec<VoucherEvent> {
    vec![
        VoucherEvent::VoucherCreated {
            voucher_id: id(1),
            merchant_id: "merchant-1".to_owned(),
            title: "Hotpot for two".to_owned(),
            kind: VoucherKind::Seckill,
            price_cents: 990,
            value_cents: 5_000,
            min_spend_cents: 10_000,
            stock: Some(100),
            begins_at: at(0),
            ends_at: at(30),
        },
        VoucherEvent::VoucherClaimed {
            user_id: "user-1".to_owned(),
            coupon_id: id(2),
        },
        VoucherEvent::SeckillClaimAccepted {
            order_id: id(3),
            user_id: "user-1".to_owned(),
            requested_at: at(1),
        },
        VoucherEvent::SeckillClaimRejected {
            order_id: id(4),
            user_id: "user-2".to_owned(),
            reason: ClaimRejection::AlreadyPurchased,
        },
        VoucherEvent::SeckillStockReleased {
            order_id: id(3),
            user_id: "user-1".to_owned(),
        },
    ]
}

fn order_events() -> Vec<OrderEvent> {
    vec![
        OrderEvent::OrderSubmitted {
            order_id: id(10),
            user_id: "user-1".to_owned(),
            merchant_id: Some("shop-1".to_owned()),
            items: vec![RequestedItem {
                product_id: id(20),
                quantity: 2,
            }],
            coupon_id: Some(id(30)),
            submitted_at: at(2),
        },
        OrderEvent::OrderPlaced {
            order_id: id(10),
            user_id: "user-1".to_owned(),
            merchant_id: Some("shop-1".to_owned()),
            kind: OrderKind::Goods,
            items: vec![OrderItem {
                product_id: Some(id(20)),
                voucher_id: None,
                name: "Dumplings".to_owned(),
                quantity: 2,
                unit_price_cents: 1_200,
            }],
            voucher_id: None,
            coupon_id: Some(id(30)),
            subtotal_cents: 2_400,
            discount_cents: 500,
            total_cents: 1_900,
            placed_at: at(3),
        },
        OrderEvent::OrderRejected {
            order_id: id(11),
            user_id: "user-2".to_owned(),
            merchant_id: None,
            kind: OrderKind::Goods,
            voucher_id: None,
            reason: OrderRejectionReason::OutOfStock { product_id: id(20) },
            rejected_at: at(3),
        },
        OrderEvent::OrderPaymentStarted {
            payment_id: id(40),
            amount_cents: 1_900,
        },
        OrderEvent::OrderPaid {
            payment_id: id(40),
            amount_cents: 1_900,
            paid_at: at(4),
        },
        OrderEvent::OrderCancelled {
            reason: CancellationReason::CustomerRequested,
            cancelled_by: "user-1".to_owned(),
            cancelled_at: at(5),
        },
        OrderEvent::OrderTimedOut {
            deadline: at(15),
            timed_out_at: at(16),
        },
        OrderEvent::OrderPreparationStarted { at: at(6) },
        OrderEvent::OrderCompleted { at: at(7) },
        OrderEvent::OrderRefunded {
            payment_id: id(40),
            amount_cents: 1_900,
            reason: "paid after cancellation".to_owned(),
            at: at(8),
        },
    ]
}

fn payment_events() -> Vec<PaymentEvent> {
    vec![
        PaymentEvent::PaymentCreated {
            payment_id: id(40),
            order_id: id(10),
            user_id: "user-1".to_owned(),
            amount_cents: 1_900,
            provider: "local".to_owned(),
            checkout_url: "http://localhost:8080/sim/checkout/40".to_owned(),
            created_at: at(3),
        },
        PaymentEvent::PaymentSucceeded {
            provider_event_id: "evt_1".to_owned(),
            at: at(4),
        },
        PaymentEvent::PaymentFailed {
            provider_event_id: "evt_2".to_owned(),
            reason: "card declined".to_owned(),
            at: at(4),
        },
        PaymentEvent::PaymentRefunded {
            amount_cents: 1_900,
            reason: "order cancelled".to_owned(),
            at: at(9),
        },
    ]
}

fn coupon_events() -> Vec<CouponEvent> {
    vec![
        CouponEvent::CouponIssued {
            coupon_id: id(30),
            user_id: "user-1".to_owned(),
            merchant_id: Some("shop-1".to_owned()),
            voucher_id: id(1),
            value_cents: 500,
            min_spend_cents: 2_000,
            expires_at: at(59),
            source: CouponSource::SeckillOrder { order_id: id(3) },
        },
        CouponEvent::CouponReserved { order_id: id(10) },
        CouponEvent::CouponRedeemed { order_id: id(10) },
        CouponEvent::CouponReleased { order_id: id(10) },
        CouponEvent::CouponExpired { at: at(59) },
    ]
}

fn product_events() -> Vec<ProductEvent> {
    vec![
        ProductEvent::ProductCreated {
            product_id: id(20),
            merchant_id: "merchant-1".to_owned(),
            name: "Dumplings".to_owned(),
            price_cents: 1_200,
            stock: 50,
        },
        ProductEvent::ProductRestocked { quantity: 10 },
        ProductEvent::ProductStockReserved {
            order_id: id(10),
            quantity: 2,
        },
        ProductEvent::ProductStockReleased {
            order_id: id(10),
            quantity: 2,
        },
    ]
}

#[test]
fn voucher_events_roundtrip() {
    check_catalogue(&voucher_events(), 5);
}

#[test]
fn order_events_roundtrip() {
    check_catalogue(&order_events(), 10);
}

#[test]
fn payment_events_roundtrip() {
    check_catalogue(&payment_events(), 4);
}

#[test]
fn coupon_events_roundtrip() {
    check_catalogue(&coupon_events(), 5);
}

#[test]
fn product_events_roundtrip() {
    check_catalogue(&product_events(), 4);
}

#[test]
fn versions_are_current() {
    for event in voucher_events() {
        let expected = match event {
            VoucherEvent::VoucherCreated { .. } => "2.0",
            _ => "1.0",
        };
        assert_eq!(event.event_version(), expected);
    }
    assert!(order_events().iter().all(|e| e.event_version() == "1.0"));
}

#[test]
fn every_rejection_reason_and_source_roundtrips() {
    let reasons = [
        OrderRejectionReason::SoldOut,
        OrderRejectionReason::AlreadyPurchased,
        OrderRejectionReason::SaleNotStarted,
        OrderRejectionReason::SaleEnded,
        OrderRejectionReason::VoucherNotFound,
        OrderRejectionReason::OutOfStock { product_id: id(20) },
        OrderRejectionReason::ProductNotFound { product_id: id(21) },
        OrderRejectionReason::CouponUnavailable,
        OrderRejectionReason::CouponMinSpendNotMet,
        OrderRejectionReason::InvalidRequest,
        OrderRejectionReason::TotalTooLarge,
        OrderRejectionReason::MixedMerchants,
    ];
    reasons.iter().for_each(json_roundtrip);
    assert_eq!(
        OrderRejectionReason::from(ClaimRejection::InvalidRequest),
        OrderRejectionReason::InvalidRequest
    );
    [
        CouponSource::RegularClaim,
        CouponSource::SeckillOrder { order_id: id(3) },
    ]
    .iter()
    .for_each(json_roundtrip);
    [
        CancellationReason::CustomerRequested,
        CancellationReason::AdminRequested,
        CancellationReason::PaymentFailed,
    ]
    .iter()
    .for_each(json_roundtrip);
}

/// Orders recorded before tenancy have no `merchant_id`: they still decode,
/// as belonging to no merchant, and new ones carry it.
#[test]
fn order_events_without_a_merchant_still_decode() {
    let old = json!({"OrderPlaced": {
        "order_id": id(10), "user_id": "user-1", "kind": "seckill_voucher", "items": [],
        "voucher_id": id(7), "coupon_id": null, "subtotal_cents": 990, "discount_cents": 0,
        "total_cents": 990, "placed_at": "2025-06-01T10:00:00Z"
    }});
    let event: OrderEvent = serde_json::from_value(old).unwrap();
    assert!(matches!(event, OrderEvent::OrderPlaced { merchant_id: None, .. }));
    let new = serde_json::to_value(&order_events()[1]).unwrap();
    assert_eq!(new["OrderPlaced"]["merchant_id"], "shop-1");
}

#[test]
fn small_enums_have_flat_snake_case_json() {
    assert_eq!(
        serde_json::to_value(OrderRejectionReason::OutOfStock { product_id: id(20) }).unwrap(),
        json!({ "code": "out_of_stock", "product_id": id(20).to_string() })
    );
    assert_eq!(
        serde_json::to_value(OrderRejectionReason::SoldOut).unwrap(),
        json!({ "code": "sold_out" })
    );
    assert_eq!(
        serde_json::to_value(CouponSource::SeckillOrder { order_id: id(3) }).unwrap(),
        json!({ "kind": "seckill_order", "order_id": id(3).to_string() })
    );
    assert_eq!(
        serde_json::to_value(OrderKind::SeckillVoucher).unwrap(),
        json!("seckill_voucher")
    );
    assert_eq!(
        serde_json::to_value(ClaimRejection::NotSeckill).unwrap(),
        json!("not_seckill")
    );
}

#[test]
fn status_as_str_matches_serde() {
    use OrderStatus::*;
    for status in [
        Submitted,
        PendingPayment,
        Paid,
        Preparing,
        Completed,
        Cancelled,
        Rejected,
    ] {
        assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
        json_roundtrip(&status);
    }
    use CouponStatus::*;
    for status in [Available, Reserved, Redeemed, Expired] {
        assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
        json_roundtrip(&status);
    }
}

#[test]
fn claim_rejections_map_to_order_rejections() {
    assert_eq!(
        OrderRejectionReason::from(ClaimRejection::SoldOut),
        OrderRejectionReason::SoldOut
    );
    assert_eq!(
        OrderRejectionReason::from(ClaimRejection::NotSeckill),
        OrderRejectionReason::VoucherNotFound
    );
}

#[test]
fn order_requested_is_a_plain_object() {
    let request = OrderRequested {
        order_id: id(3),
        voucher_id: id(1),
        user_id: "user-1".to_owned(),
        requested_at: at(1),
    };
    json_roundtrip(&request);
    assert_eq!(
        serde_json::to_value(&request).unwrap(),
        json!({
            "order_id": id(3).to_string(),
            "voucher_id": id(1).to_string(),
            "user_id": "user-1",
            "requested_at": "2025-06-01T10:01:00Z",
        })
    );
    let headers: HashMap<_, _> = request.headers().into_iter().collect();
    assert_eq!(headers[MSG_ID], id(3).to_string());
    assert_eq!(headers[HDR_CORRELATION_ID], id(3).to_string());
    assert_eq!(headers[HDR_EVENT_TYPE], OrderRequested::EVENT_TYPE);
}

#[test]
fn envelope_roundtrips_with_metadata_as_flat_map() {
    let event = &order_events()[1];
    let envelope = EventEnvelope::new(id(10).to_string(), 2, 42, event, metadata(), at(3)).unwrap();
    json_roundtrip(&envelope);

    let value = serde_json::to_value(&envelope).unwrap();
    assert_eq!(
        value["metadata"][keys::CORRELATION_ID],
        json!(envelope.metadata.correlation_id.to_string())
    );
    assert_eq!(value["metadata"][keys::ACTOR_KIND], json!("user"));
    assert_eq!(value["event_type"], json!("OrderPlaced"));
    assert_eq!(envelope.event_id, event_id("Order", &id(10).to_string(), 2));
}

#[test]
fn event_ids_are_deterministic_and_distinct() {
    let first = event_id("Order", "o-1", 1);
    assert_eq!(first, event_id("Order", "o-1", 1));
    assert_eq!(first.get_version_num(), 5);
    assert_ne!(first, event_id("Order", "o-1", 2));
    assert_ne!(first, event_id("Order", "o-2", 1));
    assert_ne!(first, event_id("Voucher", "o-1", 1));
}

#[test]
fn any_event_dispatches_on_aggregate_type() {
    let event = coupon_events().remove(1);
    let mut envelope = EventEnvelope::new("c-1", 2, 5, &event, metadata(), at(0)).unwrap();
    assert_eq!(AnyEvent::decode(&envelope).unwrap(), AnyEvent::Coupon(event));

    envelope.aggregate_type = "Basket".to_owned();
    assert!(matches!(
        AnyEvent::decode(&envelope),
        Err(EnvelopeError::UnknownAggregateType(t)) if t == "Basket"
    ));

    envelope.aggregate_type = "Order".to_owned();
    assert!(matches!(AnyEvent::decode(&envelope), Err(EnvelopeError::Decode { .. })));
}

#[test]
fn envelope_decode_upcasts_old_voucher_created() {
    let mut envelope = EventEnvelope::new("v-1", 1, 1, &voucher_events()[0], metadata(), at(0)).unwrap();
    envelope.event_version = "1.0".to_owned();
    envelope.payload = json!({ "VoucherCreated": {
        "voucher_id": id(1).to_string(),
        "merchant_id": "merchant-1",
        "title": "Hotpot for two",
        "is_seckill": true,
        "price_cents": 990,
        "discount_cents": 500,
        "min_spend_cents": 10_000,
        "stock": 100,
        "begins_at": "2025-06-01T10:00:00Z",
        "ends_at": "2025-06-01T10:30:00Z",
    }});
    let AnyEvent::Voucher(VoucherEvent::VoucherCreated { kind, value_cents, .. }) =
        AnyEvent::decode(&envelope).unwrap()
    else {
        panic!("not a VoucherCreated");
    };
    assert_eq!((kind, value_cents), (VoucherKind::Seckill, 500));
}

#[test]
fn metadata_map_roundtrip() {
    let full = metadata();
    assert_eq!(EventMetadata::from_map(&full.to_map()).unwrap(), full);

    let minimal = EventMetadata::system("timeout-scheduler");
    let map = minimal.to_map();
    assert_eq!(map.len(), 3, "absent optionals are not stored: {map:?}");
    assert_eq!(EventMetadata::from_map(&map).unwrap(), minimal);
}

#[test]
fn caused_by_keeps_the_flow() {
    let origin = EventMetadata::system("edge");
    let next = origin.clone().caused_by(id(7));
    assert_eq!(next.correlation_id, origin.correlation_id);
    assert_eq!(next.causation_id, Some(id(7)));
    assert_ne!(EventMetadata::system("edge").correlation_id, origin.correlation_id);
}

#[test]
fn metadata_errors() {
    let good = metadata().to_map();

    let mut map = good.clone();
    map.remove(keys::CORRELATION_ID);
    assert!(matches!(
        EventMetadata::from_map(&map),
        Err(MetadataError::Missing(keys::CORRELATION_ID))
    ));

    let mut map = good.clone();
    map.insert(keys::CAUSATION_ID.to_owned(), "not-a-uuid".to_owned());
    assert!(matches!(
        EventMetadata::from_map(&map),
        Err(MetadataError::InvalidUuid {
            key: keys::CAUSATION_ID,
            ..
        })
    ));

    let mut map = good;
    map.insert(keys::ACTOR_KIND.to_owned(), "robot".to_owned());
    assert!(matches!(
        EventMetadata::from_map(&map),
        Err(MetadataError::UnknownActorKind(kind)) if kind == "robot"
    ));

    // Unknown keys are tolerated: newer writers may add some.
    let mut map = metadata().to_map();
    map.insert("tenant".to_owned(), "x".to_owned());
    assert!(EventMetadata::from_map(&map).is_ok());
}

#[test]
fn namespace_validation() {
    assert_eq!(Namespace::default().as_str(), "cp");
    assert_eq!("t1a2b3".parse::<Namespace>().unwrap().as_str(), "t1a2b3");
    assert!(Namespace::new("a_b").is_ok());
    assert!(Namespace::new("x".repeat(32)).is_ok());

    assert_eq!(Namespace::new(""), Err(NamespaceError::Empty));
    assert_eq!(Namespace::new("x".repeat(33)), Err(NamespaceError::TooLong(33)));
    assert_eq!(Namespace::new("Cp"), Err(NamespaceError::InvalidChar('C')));
    assert_eq!(Namespace::new("c.p"), Err(NamespaceError::InvalidChar('.')));
    assert_eq!(Namespace::new("c>"), Err(NamespaceError::InvalidChar('>')));
    assert_eq!(Namespace::new("c-p"), Err(NamespaceError::InvalidChar('-')));
}

#[test]
fn subject_and_stream_names() {
    let ns = Namespace::default();
    assert_eq!(ns.events_subject(OrderEvent::AGGREGATE_TYPE), "cp.evt.order");
    assert_eq!(ns.events_stream(OrderEvent::AGGREGATE_TYPE), "CP_EVT_ORDER");
    assert_eq!(ns.seckill_requests_subject(), "cp.seckill.requested");
    assert_eq!(ns.seckill_requests_stream(), "CP_SECKILL_REQUESTS");
    assert_eq!(ns.dead_letter_subject("order_view"), "cp.dlq.order_view");
    assert_eq!(ns.dead_letter_stream(), "CP_DLQ");
    assert_eq!(ns.dead_letter_stream_subject(), "cp.dlq.>");

    let test_ns = Namespace::new("t1a2b3").unwrap();
    assert_eq!(test_ns.events_stream("Voucher"), "T1A2B3_EVT_VOUCHER");

    assert_eq!(AGGREGATE_TYPES, ["Voucher", "Order", "Payment", "Coupon", "Product"]);
    let subjects: HashSet<_> = AGGREGATE_TYPES.iter().map(|t| ns.events_subject(t)).collect();
    assert_eq!(subjects.len(), AGGREGATE_TYPES.len());
    assert!(subjects.iter().all(|s| !s.contains(['*', '>'])));
}
