//! Bearer JWT (HS256) with `sub`, `role`, `exp` and optional `nbf` claims, per
//! API.md "Auth".
//!
//! - [`JwtKeys`] issues and verifies tokens; a `sub` outside [`validate_sub`]'s
//!   rules, an unknown role, an expired token or one not valid yet is a 401.
//! - [`AuthUser`] is the authenticated caller; [`Authorized`] also checks its
//!   role while extracting, so the 403 comes before any body is read.

use std::{borrow::Cow, fmt, marker::PhantomData, ops::Deref, str::FromStr, sync::Arc, time::Duration};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::request::Parts,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::error::CommonError;
use crate::config::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Merchant,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Merchant => "merchant",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected customer, merchant or admin")]
pub struct UnknownRole(String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Self::Customer),
            "merchant" => Ok(Self::Merchant),
            "admin" => Ok(Self::Admin),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: u64,
    /// Not before (seconds since the epoch); honoured when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// API.md: a user id (`sub`) is 1–128 characters.
pub const MAX_SUB_CHARS: usize = 128;

/// Why a `sub` is not a user id we accept (API.md "Auth").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubError {
    #[error("the user id is empty")]
    Empty,
    #[error("the user id is longer than {MAX_SUB_CHARS} characters")]
    TooLong,
    #[error("the user id contains a control character")]
    ControlCharacter,
    #[error("the user id contains an invisible formatting character")]
    InvisibleCharacter,
    #[error("the user id starts or ends with whitespace")]
    SurroundingWhitespace,
}

/// Whether `sub` is a user id every store can hold and every screen can show:
/// 1–[`MAX_SUB_CHARS`] characters, none of them a control character (NUL
/// included: Postgres `text` cannot store it), a line or paragraph separator,
/// a bidirectional mark, embedding, override or isolate, or an invisible one
/// (zero-width space, word joiner, BOM): they make two ids look alike. No
/// leading or trailing whitespace either. Pure, so the claim writer
/// can recognise ids that could never be stored with the same rules the API
/// enforces.
pub fn validate_sub(sub: &str) -> Result<(), SubError> {
    let mut chars = 0usize;
    for c in sub.chars() {
        chars += 1;
        if chars > MAX_SUB_CHARS {
            return Err(SubError::TooLong);
        }
        if c.is_control() {
            return Err(SubError::ControlCharacter);
        }
        if is_invisible_format(c) {
            return Err(SubError::InvisibleCharacter);
        }
    }
    if chars == 0 {
        return Err(SubError::Empty);
    }
    if sub.starts_with(char::is_whitespace) || sub.ends_with(char::is_whitespace) {
        return Err(SubError::SurroundingWhitespace);
    }
    Ok(())
}

/// Characters that print as nothing or reorder what follows. The joiners
/// (U+200C, U+200D) are left alone: some scripts and emoji need them.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{200E}' | '\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// Signing and verification keys; cheap to clone.
///
/// [`verify`](Self::verify) has a fast path for tokens exactly as
/// [`issue`](Self::issue) writes them (our header, the four claims of
/// [`Claims`] and nothing else): the HMAC key schedule is computed once,
/// and the header and claims are decoded once, into borrowed fields.
/// `jsonwebtoken::decode` re-keys the HMAC and decodes both parts twice,
/// which made it the largest single cost of a seckill attempt
/// (docs/BENCHMARKS.md). Every other token goes through
/// `jsonwebtoken::decode`, the authority; a property test checks that both
/// paths answer alike wherever the fast one answers.
#[derive(Clone)]
pub struct JwtKeys(Arc<Keys>);

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// HMAC-SHA256 keyed with the secret, cloned for every verification.
    mac: Option<Hmac<Sha256>>,
    /// The encoded header [`JwtKeys::issue`] writes.
    issued_header: String,
}

/// The claims of a token of the fast path: exactly [`Claims`]' fields, `sub`
/// borrowed unless it has escapes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuedClaims<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
    role: Role,
    exp: u64,
    /// Absent or a number: jsonwebtoken refuses `"nbf": null`.
    #[serde(default, deserialize_with = "present")]
    nbf: Option<u64>,
}

fn present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(value).map(Some)
}

/// Longest claims part the fast path decodes on the stack (ours are ~120 bytes).
const MAX_FAST_CLAIMS_BYTES: usize = 512;

/// An HS256 signature: 32 bytes.
const SIGNATURE_BYTES: usize = 32;

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtKeys([redacted])")
    }
}

impl JwtKeys {
    pub fn new(secret: &Secret) -> Self {
        let bytes = secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // `nbf` stays optional; when a token carries one it is honoured.
        validation.validate_nbf = true;
        let encoding = EncodingKey::from_secret(bytes);
        // the header part of any token we sign: the same for every token
        let issued_header = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &serde_json::json!({}), &encoding)
            .ok()
            .and_then(|token| token.split('.').next().map(str::to_owned))
            .unwrap_or_default();
        Self(Arc::new(Keys {
            encoding,
            decoding: DecodingKey::from_secret(bytes),
            validation,
            // HMAC takes a key of any length: never `None`
            mac: <Hmac<Sha256> as Mac>::new_from_slice(bytes).ok(),
            issued_header,
        }))
    }

    /// Issues a token for `sub` with `role`, valid for `ttl`. It does not check
    /// `sub` (tests need tokens that [`verify`](Self::verify) refuses).
    pub fn issue(&self, sub: &str, role: Role, ttl: Duration) -> Result<String, jsonwebtoken::errors::Error> {
        let exp = chrono::Utc::now().timestamp().max(0).unsigned_abs() + ttl.as_secs();
        self.issue_claims(&Claims {
            sub: sub.to_owned(),
            role,
            exp,
            nbf: None,
        })
    }

    /// Signs `claims` as they are (e.g. with an `nbf`).
    pub fn issue_claims(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.0.encoding)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, CommonError> {
        match self.verify_issued(token, jsonwebtoken::get_current_timestamp()) {
            Some(verified) => verified,
            None => self.verify_any(token),
        }
    }

    /// The fast path: the answer for a token with our header and exactly
    /// our claims, `None` for any other token (then [`Self::verify_any`]
    /// decides). Checks what `jsonwebtoken::decode` with our `Validation`
    /// checks, in its order: the signature, then `exp` (5 s leeway), then
    /// `nbf`; then the `sub` rules.
    fn verify_issued(&self, token: &str, now: u64) -> Option<Result<Claims, CommonError>> {
        let keys = &*self.0;
        let (header, rest) = token.split_once('.')?;
        let (payload, signature) = rest.split_once('.')?;
        if header != keys.issued_header || signature.contains('.') {
            return None;
        }
        let mut expected = [0u8; SIGNATURE_BYTES + 3];
        let signature = match URL_SAFE_NO_PAD.decode_slice(signature, &mut expected) {
            Ok(len) => &expected[..len],
            Err(_) => return Some(Err(CommonError::InvalidToken)),
        };
        let mut mac = keys.mac.clone()?;
        mac.update(&token.as_bytes()[..header.len() + 1 + payload.len()]);
        if mac.verify_slice(signature).is_err() {
            return Some(Err(CommonError::InvalidToken));
        }
        let mut decoded = [0u8; MAX_FAST_CLAIMS_BYTES];
        let len = URL_SAFE_NO_PAD.decode_slice(payload, &mut decoded).ok()?;
        let claims: IssuedClaims<'_> = serde_json::from_slice(decoded.get(..len)?).ok()?;
        if claims.exp < now.saturating_sub(keys.validation.leeway) {
            return Some(Err(CommonError::TokenExpired));
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(keys.validation.leeway))
        {
            return Some(Err(CommonError::InvalidToken));
        }
        if validate_sub(&claims.sub).is_err() {
            return Some(Err(CommonError::InvalidToken));
        }
        Some(Ok(Claims {
            sub: claims.sub.into_owned(),
            role: claims.role,
            exp: claims.exp,
            nbf: claims.nbf,
        }))
    }

    /// Any token, through `jsonwebtoken::decode`.
    fn verify_any(&self, token: &str) -> Result<Claims, CommonError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.0.decoding, &self.0.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => CommonError::TokenExpired,
                _ => CommonError::InvalidToken,
            })?;
        validate_sub(&claims.sub).map_err(|_| CommonError::InvalidToken)?;
        Ok(claims)
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub sub: String,
    pub role: Role,
}

impl AuthUser {
    /// 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), CommonError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(CommonError::Forbidden(names.join(", ")))
        }
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    JwtKeys: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = CommonError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .ok_or(CommonError::MissingToken)?
            .to_str()
            .map_err(|_| CommonError::InvalidToken)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(CommonError::MissingToken)?;
        let claims = JwtKeys::from_ref(state).verify(token.trim())?;
        Ok(Self {
            sub: claims.sub,
            role: claims.role,
        })
    }
}

/// Which roles may call an endpoint, as a type, so [`Authorized`] can check it
/// while extracting.
pub trait RolePolicy: Send + Sync + 'static {
    const ROLES: &'static [Role];
}

/// Customers only.
#[derive(Debug, Clone, Copy)]
pub struct Customers;
/// Merchants only.
#[derive(Debug, Clone, Copy)]
pub struct Merchants;
/// Admins only.
#[derive(Debug, Clone, Copy)]
pub struct Admins;
/// Merchants and admins (an admin acts for any merchant).
#[derive(Debug, Clone, Copy)]
pub struct MerchantsOrAdmins;
/// Customers and admins.
#[derive(Debug, Clone, Copy)]
pub struct CustomersOrAdmins;
/// Any authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct AnyRole;

impl RolePolicy for Customers {
    const ROLES: &'static [Role] = &[Role::Customer];
}
impl RolePolicy for Merchants {
    const ROLES: &'static [Role] = &[Role::Merchant];
}
impl RolePolicy for Admins {
    const ROLES: &'static [Role] = &[Role::Admin];
}
impl RolePolicy for MerchantsOrAdmins {
    const ROLES: &'static [Role] = &[Role::Merchant, Role::Admin];
}
impl RolePolicy for CustomersOrAdmins {
    const ROLES: &'static [Role] = &[Role::Customer, Role::Admin];
}
impl RolePolicy for AnyRole {
    const ROLES: &'static [Role] = &[Role::Customer, Role::Merchant, Role::Admin];
}

/// The authenticated caller, already checked against `P`'s roles.
///
/// A parts extractor, so it runs before the body extractor (which must come
/// last anyway): a caller with the wrong role gets 403 whatever the body is,
/// never the 415/422 of a body it was not entitled to send.
///
/// ```ignore
/// async fn restock(
///     user: Authorized<MerchantsOrAdmins>,
///     ApiPath(id): ApiPath<Uuid>,
///     ApiJson(body): ApiJson<Restock>,
/// ) -> Result<StatusCode, ApiError> {
///     let merchant = &user.sub; // Deref to AuthUser
///     ...
/// }
/// ```
pub struct Authorized<P: RolePolicy> {
    pub user: AuthUser,
    // `fn() -> P`: the policy is a marker, it neither is owned nor affects Send/Sync.
    policy: PhantomData<fn() -> P>,
}

impl<P: RolePolicy> Authorized<P> {
    pub fn into_inner(self) -> AuthUser {
        self.user
    }
}

impl<P: RolePolicy> Deref for Authorized<P> {
    type Target = AuthUser;

    fn deref(&self) -> &AuthUser {
        &self.user
    }
}

impl<P: RolePolicy> Clone for Authorized<P> {
    fn clone(&self) -> Self {
        Self {
            user: self.user.clone(),
            policy: PhantomData,
        }
    }
}

impl<P: RolePolicy> fmt::Debug for Authorized<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorized")
            .field("user", &self.user)
            .field("roles", &P::ROLES)
            .finish()
    }
}

impl<S, P> FromRequestParts<S> for Authorized<P>
where
    JwtKeys: FromRef<S>,
    S: Send + Sync,
    P: RolePolicy,
{
    type Rejection = CommonError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        user.require(P::ROLES)?;
        Ok(Self {
            user,
            policy: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn user_ids_follow_the_contract() {
        assert_eq!(validate_sub("alice"), Ok(()));
        assert_eq!(validate_sub("shop-1 east"), Ok(()));
        assert_eq!(validate_sub("名前"), Ok(()));
        assert_eq!(validate_sub(&"x".repeat(MAX_SUB_CHARS)), Ok(()));
        // characters, not bytes
        assert_eq!(validate_sub(&"é".repeat(MAX_SUB_CHARS)), Ok(()));
        assert_eq!(validate_sub(""), Err(SubError::Empty));
        assert_eq!(validate_sub(&"x".repeat(MAX_SUB_CHARS + 1)), Err(SubError::TooLong));
        assert_eq!(validate_sub("a\0b"), Err(SubError::ControlCharacter));
        assert_eq!(validate_sub("a\nb"), Err(SubError::ControlCharacter));
        assert_eq!(validate_sub("a\u{7f}"), Err(SubError::ControlCharacter));
        assert_eq!(validate_sub("a\u{85}b"), Err(SubError::ControlCharacter));
        assert_eq!(validate_sub("ad\u{202E}nim"), Err(SubError::InvisibleCharacter));
        assert_eq!(validate_sub("a\u{200B}"), Err(SubError::InvisibleCharacter));
        assert_eq!(validate_sub(" alice"), Err(SubError::SurroundingWhitespace));
        assert_eq!(validate_sub("alice\u{3000}"), Err(SubError::SurroundingWhitespace));
        assert_eq!(validate_sub(" "), Err(SubError::SurroundingWhitespace));
    }

    proptest! {
        #[test]
        fn an_accepted_user_id_is_short_and_printable(sub in "\\PC{0,140}") {
            if validate_sub(&sub).is_ok() {
                let chars = sub.chars().count();
                prop_assert!((1..=MAX_SUB_CHARS).contains(&chars));
                prop_assert!(!sub.contains('\0'));
                prop_assert!(!sub.chars().any(char::is_control));
                prop_assert_eq!(sub.trim(), sub.as_str());
            }
        }

        #[test]
        fn any_control_character_is_refused(prefix in "[a-z]{0,10}", c in any::<char>().prop_filter("control", |c| c.is_control()), suffix in "[a-z]{0,10}") {
            prop_assert_eq!(validate_sub(&format!("{prefix}{c}{suffix}")), Err(SubError::ControlCharacter));
        }

        /// Wherever the fast path answers, it answers what jsonwebtoken does.
        #[test]
        fn the_fast_path_agrees_with_jsonwebtoken(token in token()) {
            let keys = keys();
            let now = jsonwebtoken::get_current_timestamp();
            if let Some(fast) = keys.verify_issued(&token, now) {
                prop_assert_eq!(outcome(fast), outcome(keys.verify_any(&token)), "{}", token);
            }
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys() -> JwtKeys {
        JwtKeys::new(&Secret::new(SECRET.to_owned()))
    }

    fn outcome(verified: Result<Claims, CommonError>) -> Result<Claims, String> {
        verified.map_err(|error| format!("{error:?}"))
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn sign(secret: &str, message: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key");
        mac.update(message.as_bytes());
        b64(&mac.finalize().into_bytes())
    }

    /// Seconds from now, away from the leeway's edges (5 s): the two paths
    /// read the clock a moment apart.
    fn offset() -> impl Strategy<Value = i64> {
        prop_oneof![-100_000i64..-8, -2i64..3, 8i64..100_000]
    }

    /// A JSON value of a claim: mostly well typed, sometimes not.
    fn claims_json() -> impl Strategy<Value = String> {
        let sub = prop_oneof![
            4 => "[a-z0-9-]{1,24}".prop_map(|s| serde_json::json!(s)),
            2 => "\\PC{0,140}".prop_map(|s| serde_json::json!(s)),
            1 => Just(serde_json::json!("")),
            1 => Just(serde_json::json!(" padded")),
            1 => Just(serde_json::json!("ad\u{202E}nim")),
            1 => Just(serde_json::json!(42)),
        ];
        let role = prop_oneof![
            6 => prop::sample::select(vec!["customer", "merchant", "admin"]).prop_map(|r| serde_json::json!(r)),
            1 => Just(serde_json::json!("root")),
            1 => Just(serde_json::json!(null)),
        ];
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        let time = move |offset: i64| serde_json::json!(now + offset);
        let exp = prop_oneof![
            8 => offset().prop_map(time),
            1 => Just(serde_json::json!(1.5e9)),
            1 => Just(serde_json::json!(-1)),
            1 => Just(serde_json::json!("soon")),
        ];
        let nbf = prop_oneof![offset().prop_map(time), Just(serde_json::json!(null))];
        let extra = prop::sample::select(vec!["aud", "iss", "jti", "sub", "exp", "nbf"]);
        (
            sub,
            role,
            prop::option::weighted(0.9, exp),
            prop::option::of(nbf),
            prop::option::weighted(0.2, (extra, "[a-z]{1,8}")),
            any::<bool>(),
        )
            .prop_map(|(sub, role, exp, nbf, extra, sub_last)| {
                let mut fields = vec![format!("\"role\":{role}")];
                if let Some(exp) = exp {
                    fields.push(format!("\"exp\":{exp}"));
                }
                if let Some(nbf) = nbf {
                    fields.push(format!("\"nbf\":{nbf}"));
                }
                if let Some((name, value)) = extra {
                    fields.push(format!("\"{name}\":\"{value}\""));
                }
                let sub = format!("\"sub\":{sub}");
                if sub_last {
                    fields.push(sub)
                } else {
                    fields.insert(0, sub)
                }
                format!("{{{}}}", fields.join(","))
            })
    }

    /// Tokens: signed with our key or another, our header or another,
    /// tampered or cut.
    fn token() -> impl Strategy<Value = String> {
        let header = prop_oneof![
            8 => Just(keys().0.issued_header.clone()),
            1 => Just(b64(br#"{"alg":"HS256"}"#)),
            1 => Just(b64(br#"{"alg":"none","typ":"JWT"}"#)),
            1 => Just(b64(br#"{"typ":"JWT","alg":"HS512"}"#)),
        ];
        let secret = prop_oneof![8 => Just(SECRET), 1 => Just("another secret")];
        (header, claims_json(), secret, 0u8..8, any::<prop::sample::Index>()).prop_map(
            |(header, claims, secret, damage, at)| {
                let message = format!("{header}.{}", b64(claims.as_bytes()));
                let signature = sign(secret, &message);
                let mut token = format!("{message}.{signature}");
                match damage {
                    // a flipped character anywhere
                    0 => {
                        let i = at.index(token.len());
                        let c = if token.as_bytes()[i] == b'A' { "B" } else { "A" };
                        token.replace_range(i..=i, c);
                    }
                    1 => token.truncate(at.index(token.len())),
                    2 => token.push_str(".x"),
                    3 => token.push('='),
                    _ => {}
                }
                token
            },
        )
    }

    #[test]
    fn issued_tokens_take_the_fast_path() {
        let keys = keys();
        let now = jsonwebtoken::get_current_timestamp();
        for (sub, role) in [
            ("alice", Role::Customer),
            ("shop \"7\"", Role::Merchant),
            ("名前", Role::Admin),
        ] {
            let token = keys.issue(sub, role, Duration::from_secs(60)).expect("token");
            let claims = keys.verify_issued(&token, now).expect("fast path").expect("valid");
            assert_eq!((claims.sub.as_str(), claims.role), (sub, role));
            assert_eq!(Ok(claims), keys.verify(&token).map_err(|e| e.to_string()));
        }
        let later = keys
            .issue_claims(&Claims {
                sub: "bob".to_owned(),
                role: Role::Customer,
                exp: now + 600,
                nbf: Some(now + 300),
            })
            .expect("token");
        assert!(matches!(
            keys.verify_issued(&later, now),
            Some(Err(CommonError::InvalidToken))
        ));
        let expired = keys
            .issue_claims(&Claims {
                sub: "bob".to_owned(),
                role: Role::Customer,
                exp: now - 60,
                nbf: None,
            })
            .expect("token");
        assert!(matches!(
            keys.verify_issued(&expired, now),
            Some(Err(CommonError::TokenExpired))
        ));
    }
}
