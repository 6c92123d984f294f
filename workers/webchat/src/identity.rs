//! Who a widget's customer is (客戶身份驗證). An anonymous visitor has a random id the widget
//! keeps in `localStorage` (`anon-` and 32 hex digits, made by the gateway or the widget); a
//! returning customer of the tenant's site presents the site's own `customer_id` with
//! `token = hex(HMAC-SHA256(secret, customer_id))`, which the site's server computes with the
//! tenant's customer-identity secret and the gateway checks. Anything else is refused: without
//! a good token nobody speaks as a site's customer, and an anonymous id names no site customer.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The prefix of anonymous visitors' ids.
pub const ANONYMOUS_PREFIX: &str = "anon-";

/// Longest customer id accepted (the inbound schema has no limit; a widget id should be short).
pub const MAX_CUSTOMER_ID: usize = 128;

/// Why a customer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "customer_id is empty, longer than {MAX_CUSTOMER_ID} bytes or holds a control character"
    )]
    BadId,
    #[error("an anonymous id is `anon-` and 32 hex digits")]
    BadAnonymousId,
    #[error("a customer id that is not anonymous needs a token")]
    MissingToken,
    #[error("the token does not match the customer id")]
    BadToken,
    #[error("this gateway has no customer-identity secret: only anonymous visitors may chat")]
    NoSecret,
}

/// `hex(HMAC-SHA256(secret, customer_id))`: what a tenant's site gives its signed-in customer.
pub fn token(secret: &str, customer_id: &str) -> String {
    mac(secret, customer_id)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mac(secret: &str, customer_id: &str) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(customer_id.as_bytes());
    mac
}

/// A new anonymous visitor's id.
pub fn new_anonymous() -> String {
    format!("{ANONYMOUS_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

fn is_anonymous_form(id: &str) -> bool {
    id.strip_prefix(ANONYMOUS_PREFIX).is_some_and(|rest| {
        rest.len() == 32 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Checks who connects: `customer_id` with its `token`, or an anonymous id without one.
/// `secret` is the tenant's customer-identity secret (None: signed customers are refused).
/// The token is compared in constant time.
pub fn check(
    secret: Option<&str>,
    customer_id: &str,
    token: Option<&str>,
) -> Result<(), IdentityError> {
    if customer_id.is_empty()
        || customer_id.len() > MAX_CUSTOMER_ID
        || customer_id.chars().any(char::is_control)
    {
        return Err(IdentityError::BadId);
    }
    let token = match token.filter(|t| !t.is_empty()) {
        None if customer_id.starts_with(ANONYMOUS_PREFIX) => {
            return if is_anonymous_form(customer_id) {
                Ok(())
            } else {
                Err(IdentityError::BadAnonymousId)
            };
        }
        None => return Err(IdentityError::MissingToken),
        Some(t) => t,
    };
    let secret = secret.ok_or(IdentityError::NoSecret)?;
    let bytes = unhex(token).ok_or(IdentityError::BadToken)?;
    mac(secret, customer_id)
        .verify_slice(&bytes)
        .map_err(|_| IdentityError::BadToken)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_token_is_hex_hmac_sha256_of_the_customer_id() {
        // RFC 4231 test case 2: key "Jefe".
        assert_eq!(
            token("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_signed_customer_needs_the_right_token() {
        let good = token("s3cret", "member-42");
        assert_eq!(check(Some("s3cret"), "member-42", Some(&good)), Ok(()));
        assert_eq!(
            check(Some("s3cret"), "member-42", Some(&good.to_uppercase())),
            Ok(())
        );
        assert_eq!(
            check(Some("other"), "member-42", Some(&good)),
            Err(IdentityError::BadToken)
        );
        assert_eq!(
            check(Some("s3cret"), "member-43", Some(&good)),
            Err(IdentityError::BadToken)
        );
        assert_eq!(
            check(Some("s3cret"), "member-42", Some(&good[..62])),
            Err(IdentityError::BadToken)
        );
        assert_eq!(
            check(Some("s3cret"), "member-42", Some("zz")),
            Err(IdentityError::BadToken)
        );
        assert_eq!(
            check(Some("s3cret"), "member-42", None),
            Err(IdentityError::MissingToken)
        );
        assert_eq!(
            check(None, "member-42", Some(&good)),
            Err(IdentityError::NoSecret)
        );
    }

    #[test]
    fn anonymous_ids_have_one_form_and_no_token() {
        let anon = new_anonymous();
        assert_eq!(check(None, &anon, None), Ok(()));
        assert_eq!(check(Some("s"), &anon, Some("")), Ok(()));
        assert_eq!(
            check(None, "anon-member-42", None),
            Err(IdentityError::BadAnonymousId)
        );
        assert_eq!(
            check(None, "anon-", None),
            Err(IdentityError::BadAnonymousId)
        );
        assert_eq!(
            check(None, &anon.to_uppercase().replace("ANON", "anon"), None),
            Err(IdentityError::BadAnonymousId)
        );
        assert_eq!(check(None, "", None), Err(IdentityError::BadId));
        assert_eq!(check(None, "a\nb", None), Err(IdentityError::BadId));
        assert_eq!(
            check(None, &"x".repeat(129), None),
            Err(IdentityError::BadId)
        );
    }

    proptest! {
        /// The site's token always passes; any other token of the same length, or the token
        /// of another id or another secret, never does.
        #[test]
        fn only_the_sites_token_passes(
            secret in "[ -~]{1,40}",
            id in "[a-zA-Z0-9@._-]{1,60}",
            other in "[a-zA-Z0-9@._-]{1,60}",
            flip in 0usize..64,
        ) {
            let good = token(&secret, &id);
            prop_assert!(check(Some(&secret), &id, Some(&good)).is_ok());
            let mut bad: Vec<u8> = good.clone().into_bytes();
            bad[flip] = if bad[flip] == b'0' { b'1' } else { b'0' };
            let bad = String::from_utf8(bad).unwrap();
            prop_assert_eq!(check(Some(&secret), &id, Some(&bad)), Err(IdentityError::BadToken));
            if other != id {
                prop_assert_eq!(check(Some(&secret), &other, Some(&good)), Err(IdentityError::BadToken));
            }
            prop_assert_eq!(check(Some(&format!("{secret}x")), &id, Some(&good)), Err(IdentityError::BadToken));
        }
    }
}
