//! Validated inputs. Everything that reaches the domain was parsed here first, so the
//! domain never re-checks a raw string.

use std::fmt;

/// Why an input was refused; the HTTP layer turns it into `400 invalid_<field>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid {0}")]
pub struct InvalidInput(pub &'static str);

/// Whether Firestore accepts `raw` as a document or collection id: 1..=1500 bytes, no `/`,
/// not `.` or `..`, not `__*__` (reserved).
pub fn is_firestore_id(raw: &str) -> bool {
    let reserved = raw.len() >= 4 && raw.starts_with("__") && raw.ends_with("__");
    !raw.is_empty() && raw.len() <= 1500 && !raw.contains('/') && raw != "." && raw != ".." && !reserved
}

/// A provider id or rate-limit key: 1..=128 bytes of `[A-Za-z0-9_.:@-]`, not `.` or `..`,
/// not `__*__` (Firestore reserves those document ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderId(String);

impl ProviderId {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b);
        if raw.len() > 128 || !raw.bytes().all(allowed) || !is_firestore_id(raw) {
            return Err(InvalidInput("id"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount to consume or refund: 1..=1_000_000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(i64);

impl Amount {
    pub const MAX: i64 = 1_000_000;

    pub fn new(value: i64) -> Result<Self, InvalidInput> {
        if (1..=Self::MAX).contains(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidInput("amount"))
        }
    }

    /// From a JSON value: only an integer (not a float, string or bool) is an amount.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, InvalidInput> {
        value.as_i64().ok_or(InvalidInput("amount")).and_then(Self::new)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A stored usage or limit: 0..=10^12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaValue(i64);

impl QuotaValue {
    pub fn from_json(value: &serde_json::Value, field: &'static str) -> Result<Self, InvalidInput> {
        match value.as_i64() {
            Some(v) if (0..=crate::config::MAX_QUOTA_VALUE).contains(&v) => Ok(Self(v)),
            _ => Err(InvalidInput(field)),
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// An `Idempotency-Key` header value: 1..=128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidInput> {
        if raw.is_empty() || raw.len() > 128 || !raw.iter().all(|b| (0x20..=0x7e).contains(b)) {
            return Err(InvalidInput("idempotency_key"));
        }
        // Printable ASCII is valid UTF-8.
        Ok(Self(String::from_utf8_lossy(raw).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn provider_ids_follow_the_contract() {
        for ok in ["a", "AZaz09_.:@-", "x..y", "...", "__a", "a__", "__", "___"] {
            assert!(ProviderId::parse(ok).is_ok(), "{ok}");
        }
        assert!(ProviderId::parse(&"a".repeat(128)).is_ok());
        for bad in ["", ".", "..", "__x__", "____", "a/b", "été", "a b", "p*", "a%b"] {
            assert_eq!(ProviderId::parse(bad), Err(InvalidInput("id")), "{bad}");
        }
        assert!(ProviderId::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn amounts_are_integers_in_range() {
        use serde_json::json;
        assert_eq!(Amount::from_json(&json!(1)).unwrap().get(), 1);
        assert_eq!(Amount::from_json(&json!(1_000_000)).unwrap().get(), 1_000_000);
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("1"),
            json!(true),
            json!(1_000_001),
            json!(null),
        ] {
            assert!(Amount::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn idempotency_keys_are_printable_ascii() {
        assert!(IdempotencyKey::parse(b"retry-1 ~").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; 128]).is_ok());
        for bad in [&b""[..], &[b'k'; 129][..], b"tab\t", "é".as_bytes()] {
            assert!(IdempotencyKey::parse(bad).is_err());
        }
    }

    proptest! {
        #[test]
        fn any_accepted_id_is_made_of_allowed_bytes(raw in ".{0,140}") {
            if let Ok(id) = ProviderId::parse(&raw) {
                prop_assert!(id.as_str().len() <= 128);
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b)));
            }
        }

        #[test]
        fn ids_of_allowed_bytes_are_accepted_unless_reserved(raw in "[A-Za-z0-9_.:@-]{1,128}") {
            let reserved = raw == "." || raw == ".." || (raw.len() >= 4 && raw.starts_with("__") && raw.ends_with("__"));
            prop_assert_eq!(ProviderId::parse(&raw).is_ok(), !reserved);
        }
    }
}
