//! The input limits of API.md "Limits" as domain invariants. The HTTP layer
//! checks them first, with a 422 naming the field (`platform::limits`, whose
//! constants these are); the aggregates check them again, so no path into
//! the event store (a consumer, a reactor, a replayed request) can record
//! what a projection or a client could not handle: a NUL Postgres refuses, an
//! amount whose total overflows.

pub use platform::limits::{MAX_CENTS, MAX_QUANTITY, MAX_TITLE_CHARS as MAX_TEXT_CHARS};

/// Free text a person typed: no control characters (NUL among them, which
/// Postgres cannot store in `jsonb`).
pub fn is_clean_text(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

/// A user id the event store and every view can hold, by the rule the API
/// applies to a JWT's `sub` (`platform::http::auth::validate_sub`).
pub fn is_valid_user_id(user_id: &str) -> bool {
    platform::http::auth::validate_sub(user_id).is_ok()
}

/// What to record for a user id that breaks [`is_valid_user_id`], so the
/// refusal itself can be stored: every character that could not stand alone
/// in a user id (control, invisible, whitespace) replaced, the length cut,
/// never empty. A valid id is returned as it is. Deterministic, so a
/// redelivered request records the same.
pub fn storable_user_id(user_id: &str) -> String {
    if is_valid_user_id(user_id) {
        return user_id.to_owned();
    }
    let mut one = [0u8; 4];
    let cleaned: String = user_id
        .chars()
        .map(|c| {
            if is_valid_user_id(c.encode_utf8(&mut one)) {
                c
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .take(platform::http::auth::MAX_SUB_CHARS)
        .collect();
    if cleaned.is_empty() {
        char::REPLACEMENT_CHARACTER.to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn user_ids_follow_the_sub_rules() {
        assert!(is_valid_user_id("alice"));
        assert!(is_valid_user_id(&"é".repeat(128)));
        assert!(!is_valid_user_id(""));
        assert!(!is_valid_user_id("al\0ice"));
        assert!(!is_valid_user_id("line\nbreak"));
        assert!(!is_valid_user_id(&"x".repeat(129)));
        assert_eq!(storable_user_id("ann\0"), "ann\u{fffd}");
        assert_eq!(storable_user_id(""), "\u{fffd}");
        assert_eq!(storable_user_id("alice"), "alice");
    }

    proptest! {
        #[test]
        fn any_user_id_has_a_storable_form(user_id in any::<String>()) {
            let stored = storable_user_id(&user_id);
            prop_assert!(is_valid_user_id(&stored), "{:?} → {:?}", user_id, stored);
            prop_assert_eq!(stored.clone(), storable_user_id(&user_id));
            if is_valid_user_id(&user_id) {
                prop_assert_eq!(stored, user_id);
            }
        }
    }
}
