//! The payment webhook's signature (API.md "Payment webhook"):
//! `Payment-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`,
//! accepted within 300 s of now. Pure: the caller passes the clock.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

pub const HEADER: &str = "payment-signature";
/// A signature older or newer than this is refused (replay protection).
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Payment-Signature header")]
    Missing,
    #[error("Payment-Signature is not t=<unix seconds>,v1=<hex>")]
    Malformed,
    #[error("Payment-Signature timestamp is more than 300 s away from now")]
    Stale,
    #[error("Payment-Signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length: this cannot fail
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value a provider sends for `body` at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// Checks `header` against `body`, in constant time, and its age against `now`.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8], now: DateTime<Utc>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = Some(value.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", value)) => signatures.push(hex::decode(value).map_err(|_| SignatureError::Malformed)?),
            // other schemes (a future v2) are ignored, as providers do
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now.timestamp() - timestamp).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    // several v1 values are allowed during a secret rotation
    let matches = signatures
        .iter()
        .any(|signature| mac(secret, timestamp, body).verify_slice(signature).is_ok());
    if matches { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"payment.succeeded"}"#;

    fn now() -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn a_signed_body_verifies_within_the_tolerance() {
        let header = sign(SECRET, now().timestamp(), BODY);
        assert!(header.starts_with("t=1800000000,v1="));
        assert_eq!(verify(SECRET, Some(&header), BODY, now()), Ok(()));
        let later = now() + chrono::Duration::seconds(TOLERANCE_SECS);
        assert_eq!(verify(SECRET, Some(&header), BODY, later), Ok(()));
    }

    #[test]
    fn the_known_answer_matches_an_independent_hmac() {
        // printf '1.x' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign(b"key", 1, b"x"),
            "t=1,v1=fc4913c41a7bf793267e2a384f3261c9436ec2cd097bd745e7b0d99113f510ec"
        );
    }

    #[test]
    fn tampering_staleness_and_garbage_are_refused() {
        let header = sign(SECRET, now().timestamp(), BODY);
        assert_eq!(verify(SECRET, None, BODY, now()), Err(SignatureError::Missing));
        assert_eq!(
            verify(SECRET, Some(&header), b"{}", now()),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", Some(&header), BODY, now()),
            Err(SignatureError::Mismatch)
        );
        let late = now() + chrono::Duration::seconds(TOLERANCE_SECS + 1);
        assert_eq!(verify(SECRET, Some(&header), BODY, late), Err(SignatureError::Stale));
        let early = now() - chrono::Duration::seconds(TOLERANCE_SECS + 1);
        assert_eq!(verify(SECRET, Some(&header), BODY, early), Err(SignatureError::Stale));
        for garbage in [
            "",
            "v1=00",
            "t=abc,v1=00",
            "t=1800000000",
            "t=1800000000,v1=zz",
            "nonsense",
        ] {
            assert_eq!(
                verify(SECRET, Some(garbage), BODY, now()),
                Err(SignatureError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn one_matching_signature_among_several_is_enough() {
        let good = sign(SECRET, now().timestamp(), BODY);
        let v1 = good.split_once(",v1=").map(|(_, v)| v.to_owned()).unwrap();
        let header = format!("t={},v1={},v1={v1}", now().timestamp(), "00".repeat(32));
        assert_eq!(verify(SECRET, Some(&header), BODY, now()), Ok(()));
    }
}
