//! Webhook signatures, Stripe-style (issue 15, item 6).
//!
//! Every webhook request carries `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`. Signing the timestamp with the body is what bounds replays: a receiver refuses
//! a request whose `t` is further than its tolerance from its own clock, so a captured request is
//! only good for that window, and within it the body's `eventId` (also sent as `X-Event-Id`) lets
//! the receiver drop a repeat. [`verify`] is the receiver's side, kept here as the reference the
//! README describes and the tests run.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const HEADER: &str = "x-signature";

/// The `X-Signature` value for `body` sent at `t` (unix seconds).
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(mac(secret, t, body).finalize().into_bytes()))
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why a receiver refuses a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("malformed X-Signature header (want t=<unix>,v1=<hex>)")]
    Malformed,
    #[error("signed at {t}, {age_secs} s from now: outside the tolerance (a replay or a skewed clock)")]
    OutsideTolerance { t: i64, age_secs: i64 },
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// Checks a request as a receiver should: the header parses, its `t` is within `tolerance` of
/// `now` (unix seconds), and one of its `v1` values is the HMAC of `"<t>.<body>"` under `secret`
/// (several `v1` are accepted so a secret can be rotated). Compares in constant time.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance: Duration) -> Result<(), VerifyError> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>().map_err(|_| VerifyError::Malformed)?),
            Some(("v1", v)) => sigs.push(hex::decode(v).map_err(|_| VerifyError::Malformed)?),
            Some(_) => {} // other schemes (v0…) are ignored, as Stripe's receivers do
            None => return Err(VerifyError::Malformed),
        }
    }
    let t = t.ok_or(VerifyError::Malformed)?;
    if sigs.is_empty() {
        return Err(VerifyError::Malformed);
    }
    let age_secs = now - t;
    if age_secs.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::OutsideTolerance { t, age_secs });
    }
    if sigs.iter().any(|s| mac(secret, t, body).verify_slice(s).is_ok()) {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_within_the_tolerance_and_not_after() {
        let h = sign(b"k", 1_000, b"{}");
        assert!(h.starts_with("t=1000,v1="));
        let tol = Duration::from_secs(300);
        assert_eq!(verify(b"k", &h, b"{}", 1_300, tol), Ok(()));
        assert_eq!(verify(b"k", &h, b"{}", 700, tol), Ok(()));
        assert_eq!(verify(b"k", &h, b"{}", 1_301, tol), Err(VerifyError::OutsideTolerance { t: 1_000, age_secs: 301 }));
        assert_eq!(verify(b"k", &h, b"{ }", 1_000, tol), Err(VerifyError::Mismatch));
        assert_eq!(verify(b"k", "v1=00", b"{}", 1_000, tol), Err(VerifyError::Malformed));
        assert_eq!(verify(b"k", "t=1000", b"{}", 1_000, tol), Err(VerifyError::Malformed));
        // A rotated secret: the old and the new signature side by side.
        let both = format!("{},v1={}", sign(b"new", 1_000, b"{}"), &sign(b"old", 1_000, b"{}")[10..]);
        assert_eq!(verify(b"old", &both, b"{}", 1_000, tol), Ok(()));
        assert_eq!(verify(b"new", &both, b"{}", 1_000, tol), Ok(()));
    }
}
