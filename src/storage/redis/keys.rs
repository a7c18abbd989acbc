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
        format!("{}q:{{{provider}}}", self.prefix)
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
        format!("{}idem:{{{provider}}}:{id}", self.prefix)
    }

    /// Hash of the provider's idempotency records not yet handed to the ledger.
    pub fn pending_keys(&self, provider: &ProviderId) -> String {
        format!("{}idemq:{{{provider}}}", self.prefix)
    }

    /// Sorted set of dirty providers, scored by when they first became dirty (ms).
    pub fn dirty(&self) -> String {
        format!("{}dirty", self.prefix)
    }

    /// The id of this Redis data set (gone when Redis comes back empty).
    pub fn sentinel(&self) -> String {
        format!("{}sentinel", self.prefix)
    }

    /// The batch sync's lock (value: the holder's token; expires if the holder dies).
    pub fn sync_lock(&self) -> String {
        format!("{}sync:lock", self.prefix)
    }

    /// The last sync report (JSON).
    pub fn sync_report(&self) -> String {
        format!("{}sync:last", self.prefix)
    }

    /// A rate-limit counter of a key under one policy (`counter` names the policy).
    pub fn rate_counter(&self, key: &str, counter: &str) -> String {
        format!("{}rl:{{{key}}}:{counter}", self.prefix)
    }

    /// The sliding window's running sum beside its log.
    pub fn rate_sum(&self, key: &str, counter: &str) -> String {
        format!("{}rl:{{{key}}}:{counter}:sum", self.prefix)
    }

    /// A key's anomaly attempt counter for its plan (lives 5 minutes from the first attempt).
    pub fn attempts(&self, key: &str, plan: &str) -> String {
        format!("{}rl:{{{key}}}:attempts:{plan}", self.prefix)
    }

    /// The bounded list of recorded anomalies, newest first.
    pub fn anomalies(&self) -> String {
        format!("{}anomalies", self.prefix)
    }
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
    }
}
