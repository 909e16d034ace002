//! Upgrades of stored payloads written by older code, so aggregates,
//! projectors and replay only ever see the current event shapes.
//!
//! The one real case: a prototype wrote `VoucherCreated` "1.0" as
//! `{"is_seckill": bool, "discount_cents": i64, ...}`; "2.0" has
//! `kind` ("regular" | "seckill") and `value_cents` instead.
//!
//! Upcasters compare versions semantically ("2.0" = "2.0.0") and apply when
//! theirs is newer than the stored one; an applied upcaster stamps its own
//! version in full form, so an upgraded "1.0" event reads "2.0.0".

use std::sync::LazyLock;

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster, SerializedEvent};
use serde_json::Value;

use crate::voucher::VOUCHER_CREATED_VERSION;

/// The upcasters in the order they must run, for
/// `PersistedEventStore::with_upcasters` and `QueryReplay::with_upcasters`.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "VoucherCreated",
        VOUCHER_CREATED_VERSION,
        Box::new(voucher_created_v1_to_v2),
    ))]
}

static UPCASTERS: LazyLock<Vec<Box<dyn EventUpcaster>>> = LazyLock::new(upcasters);

/// Applies every matching upcaster, as the event store does on load, and
/// returns the resulting version and payload. `payload` is the stored form,
/// i.e. the serialized enum (`{"VoucherCreated": {...}}`).
pub fn upcast(event_type: &str, event_version: &str, payload: Value) -> (String, Value) {
    let event = SerializedEvent::new(
        String::new(),
        0,
        String::new(),
        event_type.to_owned(),
        event_version.to_owned(),
        payload,
        Value::Null,
    );
    let event = UPCASTERS.iter().fold(event, |event, upcaster| {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            upcaster.upcast(event)
        } else {
            event
        }
    });
    (event.event_version, event.payload)
}

/// Lets decoding borrow the payload instead of copying it when, as for
/// nearly every event, nothing applies.
pub(crate) fn needs_upcast(event_type: &str, event_version: &str) -> bool {
    UPCASTERS
        .iter()
        .any(|upcaster| upcaster.can_upcast(event_type, event_version))
}

/// Upcasters cannot fail, so a payload of an unexpected shape is left as it
/// is and decoding it reports the error.
fn voucher_created_v1_to_v2(mut payload: Value) -> Value {
    if let Some(Value::Object(fields)) = payload.get_mut("VoucherCreated") {
        if let Some(Value::Bool(is_seckill)) = fields.remove("is_seckill") {
            let kind = if is_seckill { "seckill" } else { "regular" };
            fields.insert("kind".to_owned(), kind.into());
        }
        if let Some(discount) = fields.remove("discount_cents") {
            fields.insert("value_cents".to_owned(), discount);
        }
    }
    payload
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::voucher::{VoucherEvent, VoucherKind};

    fn stored(kind_fields: Value) -> Value {
        let mut fields = json!({
            "voucher_id": "0b6e1f3c-5a2d-4c8e-9f10-2a3b4c5d6e7f",
            "merchant_id": "m-1",
            "title": "Half price hotpot",
            "price_cents": 990,
            "min_spend_cents": 5000,
            "stock": 100,
            "begins_at": "2025-06-01T10:00:00Z",
            "ends_at": "2025-06-01T12:00:00Z"
        });
        fields
            .as_object_mut()
            .unwrap()
            .extend(kind_fields.as_object().unwrap().clone());
        json!({ "VoucherCreated": fields })
    }

    #[test]
    fn v1_voucher_created_decodes_as_v2() {
        let (version, payload) = upcast(
            "VoucherCreated",
            "1.0",
            stored(json!({ "is_seckill": true, "discount_cents": 500 })),
        );
        assert_eq!(version, "2.0.0");
        let VoucherEvent::VoucherCreated { kind, value_cents, .. } = serde_json::from_value(payload).unwrap() else {
            panic!("not a VoucherCreated");
        };
        assert_eq!(kind, VoucherKind::Seckill);
        assert_eq!(value_cents, 500);
    }

    #[test]
    fn v1_regular_voucher_gets_regular_kind() {
        let (_, payload) = upcast(
            "VoucherCreated",
            "1.0",
            stored(json!({ "is_seckill": false, "discount_cents": 300 })),
        );
        assert_eq!(payload["VoucherCreated"]["kind"], "regular");
    }

    #[test]
    fn current_versions_and_other_events_pass_through() {
        let v2 = stored(json!({ "kind": "seckill", "value_cents": 500 }));
        for version in [VOUCHER_CREATED_VERSION, "2.0.0"] {
            assert_eq!(
                upcast("VoucherCreated", version, v2.clone()),
                (version.to_owned(), v2.clone())
            );
        }
        let other = json!({ "VoucherClaimed": { "user_id": "u", "is_seckill": true } });
        assert_eq!(
            upcast("VoucherClaimed", "1.0", other.clone()),
            ("1.0".to_owned(), other)
        );
        assert!(!needs_upcast("VoucherCreated", VOUCHER_CREATED_VERSION));
        assert!(needs_upcast("VoucherCreated", "1.0"));
    }
}
