//! Turns serde's error texts into messages a client can act on: the field path
//! (`items[0].quantity`) and the problem in words, never a Rust type name
//! (API.md "Errors": `expected u32` or `struct CreateProduct` mean nothing to
//! a client and describe our internals).
//!
//! serde reports errors as text only, in a handful of fixed shapes
//! (`invalid type: …, expected …`, `missing field …`, …); those are reworded
//! here. Anything else is passed on only if it names no Rust type.

use std::fmt::Write as _;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;
use serde_path_to_error::{Path, Segment};

use super::error::CommonError;

/// The longest piece of client input quoted back in a message.
const MAX_QUOTED_CHARS: usize = 40;

/// `items[0].quantity`; empty for the document itself.
pub(crate) fn field_path(path: &Path) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&path_key(key));
            }
            // Only buffered (untagged, flattened) content loses its keys.
            Segment::Unknown => {}
        }
    }
    out
}

/// A key as it appears in a path: bare when it looks like a field name,
/// quoted (and cut short) when it is arbitrary client input.
fn path_key(key: &str) -> String {
    let plain =
        !key.is_empty() && key.len() <= 64 && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain { key.to_owned() } else { quoted(key) }
}

/// `value` as a JSON string, cut to [`MAX_QUOTED_CHARS`] characters.
fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", serde_json::Value::from(&value[..end])),
        None => serde_json::Value::from(value).to_string(),
    }
}

fn join(path: &str, field: &str) -> String {
    let field = path_key(field);
    if path.is_empty() {
        field
    } else {
        format!("{path}.{field}")
    }
}

fn at(path: &str, problem: &str) -> String {
    if path.is_empty() {
        problem.to_owned()
    } else {
        format!("{path}: {problem}")
    }
}

/// serde_json appends ` at line L column C`; the path says where already.
pub(crate) fn strip_position(message: &str) -> &str {
    let Some((head, tail)) = message.rsplit_once(" at line ") else {
        return message;
    };
    let shaped = tail
        .split_once(" column ")
        .is_some_and(|(line, column)| is_digits(line) && is_digits(column));
    if shaped { head } else { message }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Deserializes a JSON document, with the contract's errors: 400
/// `malformed_json` for text that is not JSON, 422 `invalid_body` naming the
/// field for JSON that does not fit.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CommonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| json_error(bytes, e))?;
    deserializer
        .end()
        .map_err(|e| CommonError::MalformedJson(e.to_string()))?;
    Ok(value)
}

/// Not generic over the target type: compiled once.
fn json_error(bytes: &[u8], error: serde_path_to_error::Error<serde_json::Error>) -> CommonError {
    let path = field_path(error.path());
    match error.inner().classify() {
        Category::Data => {
            let message = error.inner().to_string();
            CommonError::InvalidBody(describe(&path, strip_position(&message)))
        }
        // serde_json reports a number or a list where an enum's name belongs
        // as the syntax error "expected value"; in a document that is valid
        // JSON it is a wrong value, not bad syntax.
        Category::Syntax if serde_json::from_slice::<IgnoredAny>(bytes).is_ok() => {
            CommonError::InvalidBody(at(&path, "expected one of the allowed values"))
        }
        // Syntax messages are about the text (`expected value at line 1
        // column 2`) and name no type; the position helps here.
        Category::Syntax | Category::Eof | Category::Io => CommonError::MalformedJson(error.into_inner().to_string()),
    }
}

/// The message for a deserialization error `message` (serde's text, without a
/// position) at `path` (from [`field_path`]; empty for the whole document).
pub(crate) fn describe(path: &str, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.strip_suffix('`').unwrap_or(rest);
        return format!("{}: missing", join(path, field));
    }
    if let Some(rest) = message.strip_prefix("duplicate field `") {
        let field = rest.strip_suffix('`').unwrap_or(rest);
        return format!("{}: given more than once", join(path, field));
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, _) = split_choice(rest, "fields");
        // The path ends with the unknown key itself; the message names it.
        let key = path_key(field);
        let parent = match path.strip_suffix(key.as_str()) {
            Some("") => "",
            Some(parent) => parent.strip_suffix('.').unwrap_or(path),
            None => path,
        };
        return at(parent, &format!("unknown field {}", quoted(field)));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let problem = match split_choice(rest, "variants") {
            (value, Some(allowed)) => format!("expected {}, got {}", allowed.replace('`', "\""), quoted(value)),
            (value, None) => format!("unknown value {}", quoted(value)),
        };
        return at(path, &problem);
    }
    let mismatch = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    if let Some((unexpected, expected)) = mismatch.and_then(|rest| rest.rsplit_once(", expected ")) {
        let problem = match got(unexpected) {
            Some(got) => format!("expected {}, got {got}", expected_words(expected)),
            None => format!("expected {}", expected_words(expected)),
        };
        return at(path, &problem);
    }
    if let Some((length, expected)) = message
        .strip_prefix("invalid length ")
        .and_then(|rest| rest.split_once(", expected "))
        && is_digits(length)
    {
        return at(
            path,
            &format!("expected {}, got {length} items", expected_words(expected)),
        );
    }
    at(path, &custom_words(message))
}

/// Splits "`name`, expected one of `a`, `b`" into the name and the choice;
/// serde says "there are no fields/variants" when there is none.
fn split_choice<'a>(rest: &'a str, kind: &str) -> (&'a str, Option<&'a str>) {
    if let Some(name) = rest.strip_suffix(&format!("`, there are no {kind}")) {
        return (name, None);
    }
    // The choices are our own names and never contain the separator, so the
    // last one is it, whatever the client's name contains.
    match rest.rsplit_once("`, expected ") {
        Some((name, choice)) => (name, Some(choice)),
        None => (rest.strip_suffix('`').unwrap_or(rest), None),
    }
}

/// What the client sent, from serde's description of it. Strings are not
/// quoted back (they can be long); numbers and literals are.
fn got(unexpected: &str) -> Option<String> {
    let literal = |prefix: &str| {
        unexpected
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('`'))
            .and_then(|rest| rest.strip_suffix('`'))
            .filter(|value| value.len() <= MAX_QUOTED_CHARS)
            .map(str::to_owned)
    };
    if unexpected.starts_with("string ") || unexpected.starts_with("character ") {
        return Some("a string".to_owned());
    }
    let word = match unexpected {
        "unit value" | "null" => "null",
        "map" => "an object",
        "sequence" => "an array",
        _ => {
            return literal("integer ")
                .or_else(|| literal("floating point "))
                .or_else(|| literal("boolean "));
        }
    };
    Some(word.to_owned())
}

/// What was expected, from serde's `expecting` text, which for primitives and
/// derived types is a Rust type name.
pub(crate) fn expected_words(expected: &str) -> String {
    let words = match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "u128" | "usize" => "a whole number (0 or more)",
        "a nonzero u8" => "a whole number from 1 to 255",
        "a nonzero u16" => "a whole number from 1 to 65535",
        "a nonzero u32" => "a whole number from 1 to 4294967295",
        "a nonzero u64" | "a nonzero u128" | "a nonzero usize" => "a whole number (1 or more)",
        "i8" => "an integer from -128 to 127",
        "i16" => "an integer from -32768 to 32767",
        "i32" => "an integer from -2147483648 to 2147483647",
        "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "string" | "String" | "str" => "a string",
        "a character" | "char" => "a single character",
        "a sequence" | "sequence" => "an array",
        "a map" | "map" => "an object",
        "unit" => "null",
        "option" => "a value or null",
        "field identifier" => "a field name",
        "variant identifier" | "unit variant" => "one of the allowed values",
        other if other.contains("UUID") => "a UUID",
        other if other.contains("RFC 3339") => RFC3339,
        other
            if other.starts_with("struct ")
                || other.starts_with("internally tagged enum ")
                || other.starts_with("adjacently tagged enum ") =>
        {
            "an object"
        }
        other if other.starts_with("tuple struct ") || other.starts_with("tuple variant ") => "an array",
        other if other.starts_with("enum ") => "one of the allowed values",
        other => {
            if let Some(size) = other.strip_prefix("a tuple of size ").filter(|n| is_digits(n)) {
                return format!("an array of {size} items");
            }
            if names_a_rust_type(other) {
                "a valid value"
            } else {
                other
            }
        }
    };
    words.to_owned()
}

const RFC3339: &str = "an RFC 3339 date and time such as 2025-01-31T12:00:00Z";

/// Messages that types raise themselves (`serde::de::Error::custom`).
fn custom_words(message: &str) -> String {
    let words = match message {
        // uuid
        m if m.starts_with("UUID parsing failed") => "expected a UUID",
        // chrono's ParseError, for DateTime fields
        "input is out of range"
        | "no possible date and time matching input"
        | "input is not enough for unique date and time"
        | "input contains invalid characters"
        | "premature end of input"
        | "trailing input"
        | "bad or unsupported format string" => "expected an RFC 3339 date and time such as 2025-01-31T12:00:00Z",
        // std's FromStr errors: query strings and path segments are parsed from text
        "invalid digit found in string" | "cannot parse integer from empty string" => "expected an integer",
        "number too large to fit in target type" | "number too small to fit in target type" => "number out of range",
        "invalid float literal" => "expected a number",
        "provided string was not `true` or `false`" => "expected true or false",
        m if m.starts_with("data did not match any variant of") => "does not match any accepted form",
        m if names_a_rust_type(m) => "is not valid",
        m => return m.chars().take(200).collect::<String>().replace('`', "\""),
    };
    words.to_owned()
}

/// Whether `text` mentions a Rust type: a primitive, a path, generics, or a
/// CamelCase name.
pub(crate) fn names_a_rust_type(text: &str) -> bool {
    const TYPES: [&str; 26] = [
        "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize", "f32", "f64", "bool",
        "char", "str", "String", "Vec", "Option", "Box", "struct", "enum", "tuple", "Uuid", "DateTime",
    ];
    if text.contains("::") || text.contains('<') || text.contains('>') {
        return true;
    }
    text.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|word| {
        let camel = word.chars().next().is_some_and(char::is_uppercase)
            && word.chars().any(char::is_lowercase)
            && word.chars().skip(1).any(char::is_uppercase);
        camel || TYPES.contains(&word)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::{DateTime, Utc};
    use serde::Deserialize;
    use uuid::Uuid;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Order {
        title: String,
        price_cents: i64,
        kind: Kind,
        id: Option<Uuid>,
        at: Option<DateTime<Utc>>,
        items: Option<Vec<Item>>,
        paid: Option<bool>,
        small: Option<u8>,
        tags: Option<HashMap<String, u16>>,
        pair: Option<(u32, u32)>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        quantity: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        Seckill,
        Regular,
    }

    fn message(json: &str) -> String {
        match parse_json::<Order>(json.as_bytes()) {
            Ok(order) => format!("accepted {order:?}"),
            Err(CommonError::InvalidBody(message)) => message,
            Err(other) => format!("not invalid_body: {other:?}"),
        }
    }

    const BASE: &str = r#""title": "t", "price_cents": 1, "kind": "regular""#;

    #[test]
    fn messages_name_the_field_and_the_problem_in_words() {
        let cases = [
            (
                format!(r#"{{{BASE}, "items": [{{"quantity": -1}}]}}"#),
                "items[0].quantity: expected a whole number from 0 to 4294967295, got -1",
            ),
            (
                format!(r#"{{{BASE}, "items": [{{"quantity": 1}}, {{"quantity": "many"}}]}}"#),
                "items[1].quantity: expected a whole number from 0 to 4294967295, got a string",
            ),
            (
                format!(r#"{{{BASE}, "items": [{{"quantity": 5000000000}}]}}"#),
                "items[0].quantity: expected a whole number from 0 to 4294967295, got 5000000000",
            ),
            (
                r#"{"title": "t", "price_cents": 1.5, "kind": "regular"}"#.to_owned(),
                "price_cents: expected an integer, got 1.5",
            ),
            (
                r#"{"title": "t", "price_cents": "1", "kind": "regular"}"#.to_owned(),
                "price_cents: expected an integer, got a string",
            ),
            (format!(r#"{{{BASE}, "foo": 1}}"#), r#"unknown field "foo""#),
            (
                format!(r#"{{{BASE}, "items": [{{"quantity": 1, "x": 2}}]}}"#),
                r#"items[0]: unknown field "x""#,
            ),
            (r#"{"price_cents": 1, "kind": "regular"}"#.to_owned(), "title: missing"),
            (format!(r#"{{{BASE}, "items": [{{}}]}}"#), "items[0].quantity: missing"),
            (
                r#"{"title": "t", "price_cents": 1, "kind": "flash"}"#.to_owned(),
                r#"kind: expected "seckill" or "regular", got "flash""#,
            ),
            (
                r#"{"title": "t", "price_cents": 1, "kind": 3}"#.to_owned(),
                "kind: expected one of the allowed values",
            ),
            (format!(r#"{{{BASE}, "id": "nope"}}"#), "id: expected a UUID"),
            (format!(r#"{{{BASE}, "id": 7}}"#), "id: expected a UUID, got 7"),
            (
                format!(r#"{{{BASE}, "at": "yesterday"}}"#),
                "at: expected an RFC 3339 date and time such as 2025-01-31T12:00:00Z",
            ),
            (
                format!(r#"{{{BASE}, "paid": "yes"}}"#),
                "paid: expected true or false, got a string",
            ),
            (
                format!(r#"{{{BASE}, "small": 300}}"#),
                "small: expected a whole number from 0 to 255, got 300",
            ),
            (
                format!(r#"{{{BASE}, "tags": {{"a b": -1}}}}"#),
                r#"tags."a b": expected a whole number from 0 to 65535, got -1"#,
            ),
            (
                format!(r#"{{{BASE}, "items": {{}}}}"#),
                "items: expected an array, got an object",
            ),
            (
                format!(r#"{{{BASE}, "pair": [1]}}"#),
                "pair: expected an array of 2 items, got 1 items",
            ),
            // serde also takes a struct's fields as a list
            ("[]".to_owned(), "expected an object, got 0 items"),
            ("[1, 2]".to_owned(), "[0]: expected a string, got 1"),
            ("null".to_owned(), "expected an object, got null"),
            (
                format!(r#"{{{BASE}, "title": "again"}}"#),
                "title: given more than once",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(json, want)| (json, *want, message(json)))
            .filter(|(_, want, got)| got != want || names_a_rust_type(got))
            .map(|(json, want, got)| format!("{json}\n  want: {want}\n   got: {got}"))
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn bad_syntax_is_malformed_json() {
        for json in ["{", "{\"title\": }", "{} x", "", "{\"title\": \"a\u{0}\"}"] {
            assert!(
                matches!(
                    parse_json::<serde_json::Value>(json.as_bytes()),
                    Err(CommonError::MalformedJson(_))
                ),
                "{json}"
            );
        }
    }

    #[test]
    fn client_keys_and_values_are_quoted_and_cut_short() {
        let long = "k".repeat(500);
        let got = message(&format!(r#"{{{BASE}, "{long}": 1}}"#));
        assert!(got.len() < 80, "{got}");
        assert!(got.starts_with(r#"unknown field "kkk"#), "{got}");
        let got = message(&format!(r#"{{{BASE}, "bad\u0001name": 1}}"#));
        assert_eq!(got, r#"unknown field "bad\u0001name""#);
    }

    #[test]
    fn rust_type_names_are_recognised() {
        for text in [
            "expected u32",
            "struct CreateProduct",
            "DateTime<Utc>",
            "uuid::Uuid",
            "expected i64",
            "enum Kind",
        ] {
            assert!(names_a_rust_type(text), "{text}");
        }
        for text in [
            "a UUID",
            "an RFC 3339 date and time",
            "a whole number from 0 to 255",
            "expected one of \"a\", \"b\"",
        ] {
            assert!(!names_a_rust_type(text), "{text}");
        }
        assert_eq!(expected_words("struct CreateProduct"), "an object");
        assert_eq!(expected_words("something Odd<T>"), "a valid value");
        assert_eq!(custom_words("bad thing in Foo::Bar"), "is not valid");
        assert_eq!(custom_words("must be positive"), "must be positive");
    }

    #[test]
    fn positions_are_stripped_only_when_shaped_like_one() {
        assert_eq!(strip_position("expected value at line 1 column 2"), "expected value");
        assert_eq!(strip_position("odd at line x"), "odd at line x");
    }
}
