//! Embedded in-memory adapters: the service runs on a bare machine (`cargo run`) and the
//! domain tests run fast. They keep the same semantics as Redis and Firestore.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Applied, Change, Counters, Decision, DeltaPlan, Document, IDEMPOTENCY_TTL, Ledger, LedgerDecision, Op, Record,
    Seed, StorageError, WriteOutcome, delta_for,
};
use crate::domain::{
    Phase, ProviderId,
    ratelimit::{Anomaly, RateCheck, RateDecision, Twin},
};

type IdemKey = (ProviderId, Op, String);

/// Applies a change to `used`/`limit`: the decision rule shared by both memory adapters.
fn decide(used: i64, limit: i64, change: &Change<'_>) -> Decision {
    match change.op {
        Op::Consume if used + change.amount > limit => Decision {
            allowed: false,
            used,
            limit,
        },
        Op::Consume => Decision {
            allowed: true,
            used: used + change.amount,
            limit,
        },
        Op::Refund => Decision {
            allowed: true,
            used: (used - change.amount).max(0),
            limit,
        },
    }
}

/// Looks up an idempotency record: `Some(answer)` when the key was used before.
fn replay(
    keys: &HashMap<IdemKey, (i64, Decision, Instant)>,
    key: &IdemKey,
    amount: i64,
) -> Option<Result<Decision, ()>> {
    let (first_amount, decision, expires) = keys.get(key)?;
    if *expires <= Instant::now() {
        return None;
    }
    Some(if *first_amount == amount {
        Ok(*decision)
    } else {
        Err(())
    })
}

#[derive(Default)]
struct CountersState {
    sync_lock: Option<(String, Instant)>,
    sync_report: Option<String>,
    records: HashMap<ProviderId, (Record, Option<Instant>)>,
    keys: HashMap<IdemKey, (i64, Decision, Instant)>,
    dirty_since: HashMap<ProviderId, Instant>,
}

/// In-process [`Counters`].
#[derive(Default)]
pub struct MemoryCounters {
    state: Mutex<CountersState>,
    rate_limits: Twin,
}

impl CountersState {
    fn live(&mut self, provider: &ProviderId) -> Option<&mut Record> {
        let expired = matches!(self.records.get(provider), Some((_, Some(at))) if *at <= Instant::now());
        if expired {
            self.records.remove(provider);
        }
        self.records.get_mut(provider).map(|(r, _)| r)
    }
}

#[async_trait]
impl Counters for MemoryCounters {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StorageError> {
        Ok(())
    }

    async fn read(&self, provider: &ProviderId) -> Result<Option<Record>, StorageError> {
        Ok(self.state.lock().unwrap().live(provider).cloned())
    }

    async fn load(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        if state.live(provider).is_none() {
            state
                .records
                .insert(provider.clone(), (record_of(seed), Some(Instant::now() + ttl)));
        }
        Ok(())
    }

    async fn apply(&self, provider: &ProviderId, change: &Change<'_>) -> Result<Applied, StorageError> {
        let mut state = self.state.lock().unwrap();
        let key = change
            .idempotency_key
            .map(|k| (provider.clone(), change.op, k.to_owned()));
        if let Some(key) = &key {
            match replay(&state.keys, key, change.amount) {
                Some(Ok(decision)) => return Ok(Applied::Replayed(decision)),
                Some(Err(())) => return Ok(Applied::KeyReused),
                None => {}
            }
        }
        let Some(record) = state.live(provider) else {
            return Ok(Applied::Miss);
        };
        let decision = decide(record.used, record.limit, change);
        let changed = decision.used != record.used;
        if changed {
            record.used = decision.used;
            record.version += 1;
        }
        if changed {
            if let Some(entry) = state.records.get_mut(provider) {
                entry.1 = None; // dirty records never expire
            }
            state.dirty_since.entry(provider.clone()).or_insert_with(Instant::now);
        }
        if let Some(key) = key {
            state
                .keys
                .insert(key, (change.amount, decision, Instant::now() + IDEMPOTENCY_TTL));
        }
        Ok(Applied::Decided(decision))
    }

    async fn mark_synced(
        &self,
        provider: &ProviderId,
        epoch: &str,
        version: u64,
        limit: i64,
        ttl: Duration,
    ) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        let Some((record, expiry)) = state.records.get_mut(provider) else {
            return Ok(());
        };
        if record.epoch != epoch {
            return Ok(());
        }
        record.synced = record.synced.max(version);
        record.limit = limit;
        if !record.is_dirty() {
            *expiry = Some(Instant::now() + ttl);
            state.dirty_since.remove(provider);
        }
        Ok(())
    }

    async fn evict_clean(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        if state.live(provider).is_some_and(|r| r.is_dirty()) {
            return Ok(false);
        }
        state.records.remove(provider);
        state.dirty_since.remove(provider);
        Ok(true)
    }

    async fn forget(&self, provider: &ProviderId, epoch: &str) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        if state.records.get(provider).is_some_and(|(r, _)| r.epoch == epoch) {
            state.records.remove(provider);
            state.dirty_since.remove(provider);
        }
        Ok(())
    }

    async fn replace(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        state
            .records
            .insert(provider.clone(), (record_of(seed), Some(Instant::now() + ttl)));
        state.dirty_since.remove(provider);
        Ok(())
    }

    async fn set_limit(&self, provider: &ProviderId, limit: i64) -> Result<(), StorageError> {
        if let Some(record) = self.state.lock().unwrap().live(provider) {
            record.limit = limit;
        }
        Ok(())
    }

    async fn dirty(&self, min_age: Duration, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        let mut found: Vec<_> = state
            .dirty_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= min_age)
            .map(|(p, since)| (*since, p.clone()))
            .collect();
        found.sort();
        Ok(found.into_iter().take(max).map(|(_, p)| p).collect())
    }

    async fn scan_records(&self, cursor: u64, count: usize) -> Result<(u64, Vec<(ProviderId, Record)>), StorageError> {
        let mut state = self.state.lock().unwrap();
        let mut ids: Vec<ProviderId> = state.records.keys().cloned().collect();
        ids.sort();
        let start = usize::try_from(cursor).unwrap_or(usize::MAX);
        let page: Vec<_> = ids.iter().skip(start).take(count).cloned().collect();
        let records = page
            .iter()
            .filter_map(|id| state.live(id).map(|r| (id.clone(), r.clone())))
            .collect();
        let next = if start + count >= ids.len() {
            0
        } else {
            (start + count) as u64
        };
        Ok((next, records))
    }

    async fn acquire_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        if state
            .sync_lock
            .as_ref()
            .is_some_and(|(_, until)| *until > Instant::now())
        {
            return Ok(false);
        }
        state.sync_lock = Some((token.to_owned(), Instant::now() + ttl));
        Ok(true)
    }

    async fn renew_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        match &mut state.sync_lock {
            Some((holder, until)) if holder == token && *until > Instant::now() => {
                *until = Instant::now() + ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_sync_lock(&self, token: &str) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        if state.sync_lock.as_ref().is_some_and(|(holder, _)| holder == token) {
            state.sync_lock = None;
        }
        Ok(())
    }

    async fn store_sync_report(&self, report: &str) -> Result<(), StorageError> {
        self.state.lock().unwrap().sync_report = Some(report.to_owned());
        Ok(())
    }

    async fn last_sync_report(&self) -> Result<Option<String>, StorageError> {
        Ok(self.state.lock().unwrap().sync_report.clone())
    }

    async fn rate_check(&self, check: &RateCheck<'_>) -> Result<RateDecision, StorageError> {
        Ok(self.rate_limits.check(check))
    }

    async fn anomalies(&self, limit: usize) -> Result<Vec<Anomaly>, StorageError> {
        Ok(self.rate_limits.anomalies(limit))
    }
}

fn record_of(seed: &Seed) -> Record {
    Record {
        used: seed.used,
        limit: seed.limit,
        epoch: seed.epoch.clone(),
        base: seed.used,
        loaded_from: seed.loaded_from.clone(),
        version: 0,
        synced: 0,
    }
}

#[derive(Debug, Clone, Default)]
struct Doc {
    used: Option<i64>,
    limit: Option<i64>,
    epoch: Option<String>,
    watermark: i64,
    version: u64,
}

#[derive(Default)]
struct LedgerState {
    docs: HashMap<ProviderId, Doc>,
    keys: HashMap<IdemKey, (i64, Decision, Instant)>,
    changed: Vec<ProviderId>,
    phase: Option<(Phase, DateTime<Utc>)>,
}

/// In-process [`Ledger`].
#[derive(Default)]
pub struct MemoryLedger {
    state: Mutex<LedgerState>,
}

impl MemoryLedger {
    /// What another writer (a legacy Cloud Function) does: add to `aiCallsUsed`.
    pub fn add_used(&self, provider: &ProviderId, amount: i64) {
        let mut state = self.state.lock().unwrap();
        let doc = state.docs.entry(provider.clone()).or_default();
        doc.used = Some(doc.used.unwrap_or(0) + amount);
    }
}

fn document_of(doc: &Doc) -> Document {
    Document {
        used: doc.used,
        limit: doc.limit,
        epoch: doc.epoch.clone(),
        watermark: Some(doc.watermark),
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StorageError> {
        Ok(())
    }

    async fn read(&self, provider: &ProviderId) -> Result<Option<Document>, StorageError> {
        Ok(self.state.lock().unwrap().docs.get(provider).map(document_of))
    }

    async fn write_record(&self, provider: &ProviderId, record: &Record) -> Result<WriteOutcome, StorageError> {
        let mut state = self.state.lock().unwrap();
        let doc = state.docs.entry(provider.clone()).or_default();
        match delta_for(record, doc.epoch.as_deref(), doc.watermark, doc.version) {
            DeltaPlan::Stale => return Ok(WriteOutcome::Stale),
            DeltaPlan::AlreadyThere => {}
            DeltaPlan::Add(delta) => {
                doc.used = Some(doc.used.unwrap_or(0) + delta);
                doc.epoch = Some(record.epoch.clone());
                doc.watermark = record.used;
                doc.version = record.version;
            }
        }
        Ok(WriteOutcome::Written { limit: doc.limit })
    }

    async fn decide(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        default_limit: i64,
        mark_changed: bool,
    ) -> Result<LedgerDecision, StorageError> {
        let mut state = self.state.lock().unwrap();
        let key = change
            .idempotency_key
            .map(|k| (provider.clone(), change.op, k.to_owned()));
        if let Some(key) = &key {
            match replay(&state.keys, key, change.amount) {
                Some(Ok(decision)) => return Ok(LedgerDecision::Replayed(decision)),
                Some(Err(())) => return Ok(LedgerDecision::KeyReused),
                None => {}
            }
        }
        let doc = state.docs.get(provider).cloned().unwrap_or_default();
        let used = doc.used.unwrap_or(0);
        let decision = decide(used, doc.limit.unwrap_or(default_limit), change);
        if decision.used != used {
            state.docs.entry(provider.clone()).or_default().used = Some(decision.used);
            if mark_changed && !state.changed.contains(provider) {
                state.changed.push(provider.clone());
            }
        }
        if let Some(key) = key {
            state
                .keys
                .insert(key, (change.amount, decision, Instant::now() + IDEMPOTENCY_TTL));
        }
        Ok(LedgerDecision::Decided(decision))
    }

    async fn set_quota(
        &self,
        provider: &ProviderId,
        used: Option<i64>,
        limit: Option<i64>,
        new_epoch: &str,
    ) -> Result<Document, StorageError> {
        let mut state = self.state.lock().unwrap();
        let doc = state.docs.entry(provider.clone()).or_default();
        if let Some(used) = used {
            doc.used = Some(used);
            doc.epoch = Some(new_epoch.to_owned());
            doc.watermark = used;
            doc.version = 0;
        }
        if let Some(limit) = limit {
            doc.limit = Some(limit);
        }
        Ok(document_of(doc))
    }

    async fn list_documents(
        &self,
        page: Option<String>,
        size: usize,
    ) -> Result<(Vec<(ProviderId, Document)>, Option<String>), StorageError> {
        let state = self.state.lock().unwrap();
        let mut docs: Vec<_> = state
            .docs
            .iter()
            .map(|(id, doc)| (id.clone(), document_of(doc)))
            .collect();
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        let start: usize = page.and_then(|p| p.parse().ok()).unwrap_or(0);
        let next = (start + size < docs.len()).then(|| (start + size).to_string());
        Ok((docs.into_iter().skip(start).take(size).collect(), next))
    }

    async fn changed_outside(&self, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        Ok(self.state.lock().unwrap().changed.iter().take(max).cloned().collect())
    }

    async fn note_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        if !state.changed.contains(provider) {
            state.changed.push(provider.clone());
        }
        Ok(())
    }

    async fn clear_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        self.state.lock().unwrap().changed.retain(|p| p != provider);
        Ok(())
    }

    async fn phase(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        Ok(self.state.lock().unwrap().phase)
    }

    async fn set_phase(&self, phase: Phase, since: DateTime<Utc>) -> Result<(), StorageError> {
        self.state.lock().unwrap().phase = Some((phase, since));
        Ok(())
    }
}
