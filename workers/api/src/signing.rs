//! How a webhook delivery is signed: the [Standard Webhooks] headers, and the older
//! `FirstLine-Signature` header, sent beside them for one more version.
//!
//! - **Standard Webhooks** (`webhook-id`, `webhook-timestamp`, `webhook-signature`): the
//!   signature is `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with the
//!   base64-decoded part of the secret after `whsec_`. Receivers verify it with any Standard
//!   Webhooks library (`tests/it/webhooks.rs` uses the Python one). The id is the delivery's: the
//!   same on every try of it, so a receiver can drop duplicates by it; the timestamp is the try's.
//! - **`FirstLine-Signature: t=<unix seconds>,v1=<hex>`** (like Stripe's): HMAC-SHA256 over
//!   `"<t>.<body>"`, keyed with the whole secret string as its bytes. Kept for receivers written
//!   against it; to be removed in the next version.
//!
//! Secrets are `whsec_` and the base64 of 32 random bytes (the specification asks for 24 to 64).
//! Secrets made before were `whsec_` and 64 hex digits: hex digits are base64 characters, so
//! such a secret decodes, as the specification reads it, to a 48-byte key (244 random bits), and
//! Standard Webhooks libraries take it as it is; nothing needs to be rotated.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Standard base64, padded when encoding; padding optional when decoding (libraries accept
/// secrets either way).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The prefix of a symmetric secret in the Standard Webhooks format.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new webhook secret: `whsec_` and the base64 of 32 random bytes from the OS.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS's random number generator");
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// The HMAC key a Standard Webhooks receiver takes from `secret`: the base64 after `whsec_`,
/// decoded; `None` when it is not that, or decodes to fewer than 24 or more than 64 bytes
/// (the specification's bounds).
pub fn standard_key(secret: &str) -> Option<Vec<u8>> {
    let key = BASE64.decode(secret.strip_prefix(SECRET_PREFIX)?).ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

fn standard_mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `webhook-signature` header of delivery `id` of `body` sent at `timestamp` (unix seconds):
/// `v1,<base64>`.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = standard_mac(key, id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("v1,{}", BASE64.encode(digest))
}

/// Checks Standard Webhooks headers as a receiver should: one of the space-separated `v1,`
/// signatures matches (compared in constant time), and `timestamp` is within `tolerance_secs`
/// of `now`.
pub fn verify_standard(
    secret: &str,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), &'static str> {
    let key = standard_key(secret).ok_or("not a whsec_ secret")?;
    let timestamp: i64 = timestamp.parse().map_err(|_| "no timestamp")?;
    if (now - timestamp).abs() > tolerance_secs {
        return Err("timestamp outside the tolerance");
    }
    let expected = standard_mac(&key, id, timestamp, body);
    for signature in signatures.split(' ') {
        let Some(("v1", encoded)) = signature.split_once(',') else {
            continue;
        };
        if let Ok(bytes) = BASE64.decode(encoded) {
            if expected.clone().verify_slice(&bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err("no matching v1 signature")
}

fn legacy_mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The `FirstLine-Signature` header of `body` sent at `timestamp` (unix seconds).
pub fn signature_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = legacy_mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex(&digest))
}

/// Checks a `FirstLine-Signature` header as a receiver should: a `v1` HMAC of `"<t>.<body>"`
/// (compared in constant time) and `t` within `tolerance_secs` of `now`.
pub fn verify(
    secret: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), &'static str> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => signatures.push(s),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or("no timestamp")?;
    if (now - timestamp).abs() > tolerance_secs {
        return Err("timestamp outside the tolerance");
    }
    let expected = legacy_mac(secret, timestamp, body);
    for s in signatures {
        if let Some(bytes) = unhex(s) {
            if expected.clone().verify_slice(&bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err("no matching v1 signature")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_standard_signature_matches_the_specifications_libraries() {
        // A vector from Standard Webhooks' reference libraries (their Python `Webhook.sign`
        // gives the same for these inputs).
        let key = standard_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = standard_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let verify = |secret, signatures, now| {
            verify_standard(
                secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                signatures,
                body,
                now,
                300,
            )
        };
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(verify(secret, signature.as_str(), 1614265339), Ok(()));
        // Several signatures, space-separated (a rotation): any one that matches.
        let rotated = format!("v1a,bm90IG1pbmU= v1,AAAA {signature}");
        assert_eq!(verify(secret, &rotated, 1614265339), Ok(()));
        assert_eq!(
            verify(secret, &signature, 1614266000),
            Err("timestamp outside the tolerance")
        );
        assert_eq!(
            verify(
                "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                &signature,
                1614265339
            ),
            Err("no matching v1 signature")
        );
    }

    #[test]
    fn new_secrets_are_whsec_and_32_random_bytes_and_old_hex_ones_still_decode() {
        let a = new_secret();
        assert!(a.starts_with("whsec_"), "{a}");
        assert_eq!(standard_key(&a).map(|k| k.len()), Some(32));
        assert_ne!(a, new_secret());
        // A secret made before (`whsec_` and 64 hex digits): a 48-byte key.
        let old = format!(
            "whsec_{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        assert_eq!(standard_key(&old).map(|k| k.len()), Some(48));
        // Not the format: no key, so no Standard Webhooks signature.
        assert_eq!(standard_key("s3cret"), None);
        assert_eq!(standard_key("whsec_not base64!"), None);
        assert_eq!(standard_key("whsec_AAAA"), None, "3 bytes: too short");
    }

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_secret_does_not() {
        let header = signature_header("whsec_x", 1_700_000_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
        assert_eq!(
            verify("whsec_x", &header, b"{\"a\":1}", 1_700_000_010, 300),
            Ok(())
        );
        assert!(verify("whsec_x", &header, b"{\"a\":2}", 1_700_000_010, 300).is_err());
        assert!(verify("whsec_y", &header, b"{\"a\":1}", 1_700_000_010, 300).is_err());
        assert_eq!(
            verify("whsec_x", &header, b"{\"a\":1}", 1_700_001_000, 300),
            Err("timestamp outside the tolerance")
        );
        assert_eq!(verify("whsec_x", "v1=00", b"", 0, 300), Err("no timestamp"));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 ("Jefe"), with the message split as "<t>.<body>".
        let header = signature_header("Jefe", 0, b"");
        let expected = {
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
            m.update(b"0.");
            hex(&m.finalize().into_bytes())
        };
        assert_eq!(header, format!("t=0,v1={expected}"));
        let rfc = {
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
            m.update(b"what do ya want for nothing?");
            hex(&m.finalize().into_bytes())
        };
        assert_eq!(
            rfc,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    proptest! {
        #[test]
        fn any_body_round_trips_and_any_flip_fails(body in proptest::collection::vec(any::<u8>(), 0..200), flip in any::<usize>()) {
            let header = signature_header("s3cret", 42, &body);
            prop_assert_eq!(verify("s3cret", &header, &body, 42, 0), Ok(()));
            let secret = new_secret();
            let key = standard_key(&secret).unwrap();
            let standard = standard_signature(&key, "d-1", 42, &body);
            prop_assert_eq!(verify_standard(&secret, "d-1", "42", &standard, &body, 42, 0), Ok(()));
            if !body.is_empty() {
                let mut changed = body.clone();
                let i = flip % changed.len();
                changed[i] ^= 1;
                prop_assert!(verify("s3cret", &header, &changed, 42, 0).is_err());
                prop_assert!(verify_standard(&secret, "d-1", "42", &standard, &changed, 42, 0).is_err());
            }
        }
    }
}
