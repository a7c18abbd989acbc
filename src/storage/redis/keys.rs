//! Every Redis key quotad uses, built in one place. Keys of one provider carry its id as a
//! hash tag (`{id}`), so every key a quota script touches lives in one cluster slot (ids
//! cannot contain braces). The dirty index is the one key outside that rule: see
//! `scripts/apply.lua`.

use crate::domain::ProviderId;

/// Builds keys under one prefix (each test app has its own).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Hash of a provider's cached record: `used limit epoch base from ver synced`.
    pub fn record(&self, provider: &ProviderId) -> String {
        join(&[&self.prefix, "q:{", provider.as_str(), "}"])
    }

    /// Sorted set of the fences held on a provider's record (token -> expiry ms).
    pub fn fences(&self, provider: &ProviderId) -> String {
        join(&[&self.prefix, "qf:{", provider.as_str(), "}"])
    }

    /// A provider's fence generation (see [`crate::storage::Counters::fence_gen`]).
    pub fn fence_gen(&self, provider: &ProviderId) -> String {
        join(&[&self.prefix, "qg:{", provider.as_str(), "}"])
    }

    /// The SCAN pattern of every record.
    pub fn record_pattern(&self) -> String {
        format!("{}q:{{*", self.prefix)
    }

    /// The provider of a record key.
    pub fn provider_of(key: &str) -> Option<ProviderId> {
        let tagged = key.split_once('{')?.1;
        ProviderId::parse(tagged.strip_suffix('}')?).ok()
    }

    /// An idempotency record (`id` from [`crate::storage::idempotency_id`]):
    /// `amount:allowed:used:limit` of the first answer.
    pub fn idempotency(&self, provider: &ProviderId, id: &str) -> String {
        join(&[&self.prefix, "idem:{", provider.as_str(), "}:", id])
    }

    /// Hash of the provider's idempotency records not yet handed to the ledger.
    pub fn pending_keys(&self, provider: &ProviderId) -> String {
        join(&[&self.prefix, "idemq:{", provider.as_str(), "}"])
    }

    /// Sorted set of dirty providers, scored by when they first became dirty (ms).
    pub fn dirty(&self) -> String {
        format!("{}dirty", self.prefix)
    }

    /// A replica's receipts of its apply calls (hash; see `scripts/apply.lua`).
    pub fn receipts(&self, replica: &str) -> String {
        format!("{}rcpt:{replica}", self.prefix)
    }

    /// The id of this Redis data set (gone when Redis comes back empty).
    pub fn sentinel(&self) -> String {
        format!("{}sentinel", self.prefix)
    }

    /// The batch sync's lock (value: the holder's token; expires if the holder dies).
    pub fn sync_lock(&self) -> String {
        format!("{}sync:lock", self.prefix)
    }

    /// The phase mirrored from the ledger: `<phase> <since, RFC 3339>`.
    pub fn phase_mirror(&self) -> String {
        format!("{}phase", self.prefix)
    }

    /// The last sync report (JSON).
    pub fn sync_report(&self) -> String {
        format!("{}sync:last", self.prefix)
    }

    /// A rate-limit counter of a key under one policy (`counter` names the policy).
    pub fn rate_counter(&self, key: &str, counter: &str) -> String {
        join(&[&self.prefix, "rl:{", key, "}:", counter])
    }

    /// The sliding window's running sum beside its log.
    pub fn rate_sum(&self, key: &str, counter: &str) -> String {
        join(&[&self.prefix, "rl:{", key, "}:", counter, ":sum"])
    }

    /// A key's anomaly attempt counter, whatever its plan (lives 5 minutes from the first
    /// attempt). It holds 2 x attempts, plus 1 once the window's anomaly is recorded.
    pub fn attempts(&self, key: &str) -> String {
        join(&[&self.prefix, "rl:{", key, "}:tries"])
    }

    /// The bounded list of recorded anomalies, newest first.
    pub fn anomalies(&self) -> String {
        format!("{}anomalies", self.prefix)
    }
}

/// The parts end to end, in one allocation (the hot path builds a few keys per request;
/// `format!` costs several times more).
fn join(parts: &[&str]) -> String {
    let mut key = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        key.push_str(part);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_keys_share_a_hash_tag() {
        let keys = Keys::new("t:");
        let p = ProviderId::parse("creator:1@x").unwrap();
        assert_eq!(keys.record(&p), "t:q:{creator:1@x}");
        assert_eq!(keys.idempotency(&p, "r:00ff"), "t:idem:{creator:1@x}:r:00ff");
        assert_eq!(keys.pending_keys(&p), "t:idemq:{creator:1@x}");
        assert_eq!(keys.rate_counter("ip:1", "gcra60000"), "t:rl:{ip:1}:gcra60000");
        assert_eq!(keys.rate_sum("ip:1", "sw60000"), "t:rl:{ip:1}:sw60000:sum");
        assert_eq!(keys.attempts("ip:1"), "t:rl:{ip:1}:tries");
    }
}
