//! Operator tools run by the command line: warm Redis from Firestore, and compare every
//! cached record with its document.

use super::QuotaService;
use crate::storage::{Document, Record, Seed, StorageError, new_epoch};

/// How one cached record compares with its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub provider: String,
    /// `used` in Redis.
    pub cached: i64,
    /// `aiCallsUsed` in Firestore (0 when absent).
    pub stored: i64,
    /// What the next write will add to the document (0 for a clean record).
    pub unsynced: i64,
    /// `stored + unsynced - cached`: what the document holds beyond (or short of) the
    /// record once synced. Other writers' increments since the load show up here too.
    pub drift: i64,
    /// The document moved to another epoch: the record's unsynced usage cannot land.
    pub stale: bool,
}

/// Compares a record with its document.
pub fn compare(provider: &str, record: &Record, doc: Option<&Document>) -> Drift {
    let stored = doc.and_then(|d| d.used).unwrap_or(0);
    let doc_epoch = doc.and_then(|d| d.epoch.clone()).unwrap_or_default();
    let (unsynced, stale) = if !record.is_dirty() {
        (0, false)
    } else if doc_epoch == record.epoch {
        (record.used - doc.and_then(|d| d.watermark).unwrap_or(0), false)
    } else if doc_epoch == record.loaded_from {
        (
            record.unsynced_since_load(doc.and_then(|d| d.watermark).unwrap_or(0)),
            false,
        )
    } else {
        (0, true)
    };
    Drift {
        provider: provider.to_owned(),
        cached: record.used,
        stored,
        unsynced,
        drift: stored.saturating_add(unsynced).saturating_sub(record.used),
        stale,
    }
}

/// Walks every cached record and compares it with its document; `on_record` sees each.
pub async fn verify(quotas: &QuotaService, mut on_record: impl FnMut(&Drift)) -> Result<Vec<Drift>, StorageError> {
    let mut drifted = Vec::new();
    let mut cursor = 0;
    loop {
        let (next, records) = quotas.counters().scan_records(cursor, 500).await?;
        for (provider, record) in records {
            let doc = quotas.ledger().read(&provider).await?;
            let drift = compare(provider.as_str(), &record, doc.as_ref());
            on_record(&drift);
            if drift.drift != 0 || drift.stale {
                drifted.push(drift);
            }
        }
        if next == 0 {
            return Ok(drifted);
        }
        cursor = next;
    }
}

/// Loads every provider document into Redis (records already cached are kept). Resumable:
/// a second run skips what the first loaded. `on_page` gets the running count. Documents
/// that Firestore decides for are left out, as a request's load leaves them: beyond what
/// Redis counts exactly, or with a replica deciding there for lack of Redis these moments.
pub async fn backfill(
    quotas: &QuotaService,
    default_limit: i64,
    mut on_page: impl FnMut(u64),
) -> Result<u64, StorageError> {
    let mut page = None;
    let mut loaded = 0;
    loop {
        let (docs, next) = quotas.ledger().list_documents(page, 500).await?;
        for (provider, doc) in docs {
            if doc.used_beyond_exact() || quotas.deciding_elsewhere(&doc) {
                continue; // Firestore decides for it (see `QuotaService::load`)
            }
            let seed = Seed {
                used: doc.used(),
                limit: doc.limit_or(default_limit),
                epoch: new_epoch(),
                loaded_from: doc.epoch.unwrap_or_default(),
                keys: doc.keys,
                // Refused if any Firestore decision for it was fenced lately, since the
                // listing may predate it: its first request loads it instead.
                fence: 0,
                outdated: false, // (those Firestore decides for are skipped above)
            };
            quotas.counters().load(&provider, &seed, quotas.cache_ttl()).await?;
            loaded += 1;
        }
        on_page(loaded);
        match next {
            Some(token) => page = Some(token),
            None => return Ok(loaded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(used: i64, version: u64, synced: u64) -> Record {
        Record {
            used,
            limit: 100,
            epoch: "e2".into(),
            base: 10,
            loaded_from: "e1".into(),
            version,
            synced,
            from_watermark: None,
            loaded_ms: None,
            outdated: false,
        }
    }

    fn doc(used: i64, epoch: &str, watermark: i64) -> Document {
        Document {
            used: Some(used),
            limit: None,
            epoch: Some(epoch.into()),
            watermark: Some(watermark),
            keys: vec![],
            fallback: None,
        }
    }

    #[test]
    fn a_level_record_has_no_drift() {
        assert_eq!(compare("p", &record(12, 2, 2), Some(&doc(12, "e2", 12))).drift, 0);
        let pending = compare("p", &record(15, 5, 2), Some(&doc(12, "e2", 12)));
        assert_eq!((pending.unsynced, pending.drift), (3, 0));
        let first = compare("p", &record(15, 5, 0), Some(&doc(10, "e1", 0)));
        assert_eq!((first.unsynced, first.drift), (5, 0));
    }

    #[test]
    fn other_writers_and_stale_epochs_show() {
        assert_eq!(compare("p", &record(12, 2, 2), Some(&doc(20, "e2", 12))).drift, 8);
        assert!(compare("p", &record(12, 3, 2), Some(&doc(20, "e9", 0))).stale);
    }
}
