//! The input bounds of API.md "Limits", as constants and pure validators that
//! handlers call on a request's fields before deciding anything.
//!
//! A [`LimitError`] names the field and the bound in words and converts into
//! [`CommonError::InvalidBody`] (422 `invalid_body`):
//!
//! ```
//! use platform::limits::{self, MAX_TITLE_CHARS};
//!
//! let checked = limits::text("title", "Hotpot for two", MAX_TITLE_CHARS)
//!     .and_then(|()| limits::cents("price_cents", 990))
//!     .and_then(|()| limits::quantity("items[0].quantity", 0u32));
//! assert_eq!(
//!     checked.map_err(|e| e.to_string()),
//!     Err("items[0].quantity: must be a whole number from 1 to 1000000".to_owned())
//! );
//! ```

use std::borrow::Cow;

use crate::http::CommonError;

/// The largest amount of money in any `*_cents` field (a billion in major units).
pub const MAX_CENTS: i64 = 100_000_000_000;
/// Quantities and stock: at least one unit…
pub const MIN_QUANTITY: u32 = 1;
/// …and at most a million.
pub const MAX_QUANTITY: u32 = 1_000_000;
/// Titles and names.
pub const MAX_TITLE_CHARS: usize = 200;

/// A field outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct LimitError {
    /// The field's path as the client wrote it, e.g. `items[0].quantity`.
    pub field: Cow<'static, str>,
    pub problem: LimitProblem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitProblem {
    #[error("must not be blank")]
    Blank,
    #[error("must not contain control characters")]
    ControlCharacter,
    #[error("must be at most {max} characters")]
    TooLong { max: usize },
    #[error("must be a whole number from {min} to {max}")]
    OutOfRange { min: i128, max: i128 },
}

impl From<LimitError> for CommonError {
    fn from(error: LimitError) -> Self {
        Self::InvalidBody(error.to_string())
    }
}

fn check(field: impl Into<Cow<'static, str>>, problem: Option<LimitProblem>) -> Result<(), LimitError> {
    match problem {
        None => Ok(()),
        Some(problem) => Err(LimitError {
            field: field.into(),
            problem,
        }),
    }
}

/// Text a person wrote: not blank, no control characters (NUL included:
/// Postgres `text` cannot hold it; newlines and tabs neither, these are
/// one-line fields), at most `max_chars` characters (not bytes).
pub fn text(field: impl Into<Cow<'static, str>>, value: &str, max_chars: usize) -> Result<(), LimitError> {
    let problem = if value.trim().is_empty() {
        Some(LimitProblem::Blank)
    } else if value.chars().any(char::is_control) {
        Some(LimitProblem::ControlCharacter)
    } else if value.chars().nth(max_chars).is_some() {
        Some(LimitProblem::TooLong { max: max_chars })
    } else {
        None
    };
    check(field, problem)
}

/// An amount of money: 0 ≤ `value` ≤ [`MAX_CENTS`]. Takes any integer type
/// the request uses, so a negative or oversized value is judged before any
/// conversion could wrap it.
pub fn cents(field: impl Into<Cow<'static, str>>, value: impl Into<i128>) -> Result<(), LimitError> {
    range(field, value.into(), 0, i128::from(MAX_CENTS))
}

/// A quantity or a stock: [`MIN_QUANTITY`] ≤ `value` ≤ [`MAX_QUANTITY`].
pub fn quantity(field: impl Into<Cow<'static, str>>, value: impl Into<i128>) -> Result<(), LimitError> {
    range(field, value.into(), i128::from(MIN_QUANTITY), i128::from(MAX_QUANTITY))
}

fn range(field: impl Into<Cow<'static, str>>, value: i128, min: i128, max: i128) -> Result<(), LimitError> {
    check(
        field,
        (!(min..=max).contains(&value)).then_some(LimitProblem::OutOfRange { min, max }),
    )
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse as _;
    use http::StatusCode;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn text_fields() {
        assert_eq!(text("title", "Hotpot for two", MAX_TITLE_CHARS), Ok(()));
        assert_eq!(text("title", &"火".repeat(MAX_TITLE_CHARS), MAX_TITLE_CHARS), Ok(()));
        let problem = |value: &str| text("title", value, MAX_TITLE_CHARS).map_err(|e| e.problem);
        assert_eq!(problem(""), Err(LimitProblem::Blank));
        assert_eq!(problem(" \t "), Err(LimitProblem::Blank));
        assert_eq!(problem("a\0b"), Err(LimitProblem::ControlCharacter));
        assert_eq!(problem("line\nbreak"), Err(LimitProblem::ControlCharacter));
        assert_eq!(
            problem(&"x".repeat(MAX_TITLE_CHARS + 1)),
            Err(LimitProblem::TooLong { max: MAX_TITLE_CHARS })
        );
    }

    #[test]
    fn money_and_quantities() {
        assert_eq!(cents("price_cents", 0i64), Ok(()));
        assert_eq!(cents("price_cents", MAX_CENTS), Ok(()));
        assert!(cents("price_cents", -1i64).is_err());
        assert!(cents("price_cents", MAX_CENTS + 1).is_err());
        assert!(cents("price_cents", u64::MAX).is_err());
        assert_eq!(quantity("stock", 1u32), Ok(()));
        assert_eq!(quantity("stock", 1_000_000i64), Ok(()));
        assert!(quantity("stock", 0u32).is_err());
        assert!(quantity("stock", 1_000_001u32).is_err());
        assert!(quantity("stock", -5i32).is_err());
    }

    #[tokio::test]
    async fn a_limit_error_is_a_422_naming_the_field() {
        let error = cents(format!("items[{}].price_cents", 2), -1i64).err();
        let response = CommonError::from(error.unwrap_or_else(|| unreachable!())).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(body["error"]["code"], "invalid_body");
        assert_eq!(
            body["error"]["message"],
            "items[2].price_cents: must be a whole number from 0 to 100000000000"
        );
    }

    proptest! {
        #[test]
        fn cents_accepts_exactly_the_contract_range(value in any::<i64>()) {
            prop_assert_eq!(cents("c", value).is_ok(), (0..=MAX_CENTS).contains(&value));
        }

        #[test]
        fn quantity_accepts_exactly_the_contract_range(value in any::<i64>()) {
            prop_assert_eq!(quantity("q", value).is_ok(), (1..=1_000_000).contains(&value));
        }

        #[test]
        fn accepted_text_is_bounded_and_printable(value in "\\PC{0,10}[\\x00-\\x1f]?\\PC{0,10}", max in 1usize..25) {
            if text("t", &value, max).is_ok() {
                prop_assert!(value.chars().count() <= max);
                prop_assert!(!value.chars().any(char::is_control));
                prop_assert!(!value.trim().is_empty());
            }
        }

        #[test]
        fn the_error_names_the_field(field in "[a-z_]{1,20}", value in any::<i64>()) {
            if let Err(error) = cents(field.clone(), value) {
                let message = error.to_string();
                let prefix = format!("{field}: ");
                prop_assert!(message.starts_with(&prefix), "{}", message);
            }
        }
    }
}
