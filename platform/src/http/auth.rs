//! Bearer JWT (HS256) with `sub`, `role`, `exp` and optional `nbf` claims, per
//! API.md "Auth".
//!
//! - [`JwtKeys`] issues and verifies tokens; a `sub` outside [`validate_sub`]'s
//!   rules, an unknown role, an expired token or one not valid yet is a 401.
//! - [`AuthUser`] is the authenticated caller; [`Authorized`] also checks its
//!   role while extracting, so the 403 comes before any body is read.

use std::{fmt, marker::PhantomData, ops::Deref, str::FromStr, sync::Arc, time::Duration};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::request::Parts,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

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
#[derive(Clone)]
pub struct JwtKeys(Arc<Keys>);

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

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
        Self(Arc::new(Keys {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
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
    }
}
