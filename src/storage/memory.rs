//! Embedded in-memory adapters: the service runs on a bare machine (`cargo run`) and the
//! domain tests run fast. They keep the same semantics as Redis and Firestore.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Applied, Change, Counters, DROPPED_TAG, Decision, DeltaPlan, Document, Fallback, FallbackMark, IdempotencyEntry,
    KeyRecord, Ledger, LedgerDecision, RebaseMark, RebaseOnto, Record, Seed, StorageError, Synced, WriteOutcome,
    carry_fallback_keys, delta_for, fallback_epoch, fallback_key_entry, idempotency_id, merge_keys,
    settle_twice_decided,
};
use crate::domain::{
    Phase, ProviderId,
    ratelimit::{Anomaly, RateCheck, RateDecision, Twin},
};

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Looks up an idempotency record: `Some(answer)` when the key was used before.
fn replay(entry: Option<&String>, amount: i64) -> Option<Result<Decision, ()>> {
    let entry = IdempotencyEntry::parse(entry?)?;
    if entry.expires_ms <= now_ms() {
        return None;
    }
    Some(if entry.amount == amount {
        Ok(entry.decision)
    } else {
        Err(())
    })
}

/// A new idempotency record for `decision`, expiring after the TTL.
fn new_key_entry(change: &Change<'_>, decision: Decision) -> IdempotencyEntry {
    IdempotencyEntry::new(change.amount, decision, now_ms())
}

/// A record with its expiry (`None` while dirty: dirty records never expire). A record
/// that turns clean lives the cache TTL from its load (`Record::loaded_ms`), not from the
/// moment it turned clean.
struct Cached {
    record: Record,
    expiry: Option<Instant>,
}

impl Cached {
    fn new(record: Record, ttl: Duration) -> Self {
        Self {
            record,
            expiry: Some(Instant::now() + ttl),
        }
    }
}

#[derive(Default)]
struct CountersState {
    sentinel: Option<String>,
    sync_lock: Option<(String, Instant)>,
    sync_report: Option<String>,
    phase_mirror: Option<(Phase, DateTime<Utc>)>,
    records: HashMap<ProviderId, Cached>,
    /// Idempotency records by provider and key id.
    keys: HashMap<(ProviderId, String), String>,
    /// Those not yet handed to the ledger.
    pending: HashMap<ProviderId, BTreeMap<String, String>>,
    dirty_since: HashMap<ProviderId, Instant>,
    /// Fence generation and the fences held (token -> expiry), by provider.
    fences: HashMap<ProviderId, (u64, HashMap<String, Instant>)>,
}

/// In-process [`Counters`].
#[derive(Default)]
pub struct MemoryCounters {
    state: Mutex<CountersState>,
    rate_limits: Twin,
}

impl CountersState {
    /// Brings a ledger document's idempotency records along with a loaded record.
    fn import_keys(&mut self, provider: &ProviderId, keys: &[KeyRecord]) {
        for (id, entry) in keys {
            self.keys
                .entry((provider.clone(), id.clone()))
                .or_insert_with(|| entry.clone());
        }
    }

    /// As Redis's `pending_dropped.lua`: the pending idempotency records of a record whose
    /// usage never reaches the ledger are marked ([`DROPPED_TAG`]).
    fn mark_pending_dropped(&mut self, provider: &ProviderId) {
        for entry in self.pending.get_mut(provider).into_iter().flat_map(|p| p.values_mut()) {
            if fallback_epoch(entry).is_none() {
                entry.push_str(DROPPED_TAG);
            }
        }
    }

    /// Whether a fence is held on the provider, or was taken since `seen` was read.
    fn fenced(&self, provider: &ProviderId, seen: u64) -> bool {
        let now = Instant::now();
        self.fences.get(provider).map_or(seen != 0, |(generation, held)| {
            *generation != seen || held.values().any(|expiry| *expiry > now)
        })
    }

    /// Takes fence `token` on the provider until `ttl` from now (expired ones go).
    fn take_fence(&mut self, provider: &ProviderId, token: &str, ttl: Duration) {
        let now = Instant::now();
        let (generation, held) = self.fences.entry(provider.clone()).or_default();
        held.retain(|_, expiry| *expiry > now);
        held.insert(token.to_owned(), now + ttl);
        *generation += 1;
    }

    fn live(&mut self, provider: &ProviderId) -> Option<&mut Record> {
        let expired = self
            .records
            .get(provider)
            .is_some_and(|cached| cached.expiry.is_some_and(|at| at <= Instant::now()));
        if expired {
            self.records.remove(provider);
        }
        self.records.get_mut(provider).map(|cached| &mut cached.record)
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

    async fn load(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        if let Some(record) = state.live(provider) {
            record.outdated |= seed.outdated; // as load.lua: a record left in place is marked
            return Ok(true);
        }
        if state.fenced(provider, seed.fence) {
            return Ok(false);
        }
        state
            .records
            .insert(provider.clone(), Cached::new(record_of(seed), ttl));
        state.import_keys(provider, &seed.keys);
        Ok(true)
    }

    async fn fence_gen(&self, provider: &ProviderId) -> Result<u64, StorageError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .fences
            .get(provider)
            .map_or(0, |(generation, _)| *generation))
    }

    async fn fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        state.take_fence(provider, token, ttl);
        if state.live(provider).is_some_and(|r| r.is_dirty()) {
            return Ok(false);
        }
        state.records.remove(provider);
        state.dirty_since.remove(provider);
        Ok(true)
    }

    async fn fence_outdated(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap(); // one step, as the script's
        state.take_fence(provider, token, ttl);
        if let Some(record) = state.live(provider) {
            record.outdated = true;
        }
        Ok(())
    }

    async fn unfence_outdated(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError> {
        self.unfence(provider, token).await
    }

    async fn renew_fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        let (_, held) = state.fences.entry(provider.clone()).or_default();
        held.insert(token.to_owned(), Instant::now() + ttl);
        Ok(())
    }

    async fn rebase(
        &self,
        provider: &ProviderId,
        epoch: &str,
        new_epoch: &str,
        onto: &RebaseOnto<'_>,
    ) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        let Some(record) = state.live(provider).filter(|r| r.epoch == epoch) else {
            return Ok(false);
        };
        let carried = record.used - onto.watermark;
        let dirty = record.is_dirty();
        let outdated = match onto.mark {
            RebaseMark::Set => true,
            RebaseMark::Clear => false,
            RebaseMark::Keep => record.outdated,
        };
        *record = Record {
            used: super::usage_after_write(onto.used, carried, 0), // as the document (rebase.lua alike)
            limit: record.limit,
            epoch: new_epoch.to_owned(),
            base: onto.used,
            loaded_from: epoch.to_owned(),
            version: u64::from(dirty),
            synced: 0,
            from_watermark: Some(onto.watermark),
            loaded_ms: Some(now_ms()), // it holds what the ledger held now
            outdated,
        };
        state.import_keys(provider, onto.keys);
        Ok(true)
    }

    async fn fence_held(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        let now = Instant::now();
        let state = self.state.lock().unwrap();
        Ok(state
            .fences
            .get(provider)
            .is_some_and(|(_, held)| held.values().any(|expiry| *expiry > now)))
    }

    async fn unfence(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        let (generation, held) = state.fences.entry(provider.clone()).or_default();
        held.remove(token);
        *generation += 1;
        Ok(())
    }

    async fn apply(&self, provider: &ProviderId, change: &Change<'_>) -> Result<Applied, StorageError> {
        let mut state = self.state.lock().unwrap();
        let id = change.idempotency_key.map(|k| idempotency_id(change.op, k));
        if let Some(id) = &id {
            match replay(state.keys.get(&(provider.clone(), id.clone())), change.amount) {
                Some(Ok(decision)) => return Ok(Applied::Replayed(decision)),
                Some(Err(())) => return Ok(Applied::KeyReused),
                None => {}
            }
        }
        let Some(record) = state.live(provider) else {
            return Ok(Applied::Miss);
        };
        if record.outdated {
            return Ok(Applied::Outdated);
        }
        let decision = super::decide(record.used, record.limit, change);
        // A keyed decision makes the record dirty too: its key travels to the ledger.
        let dirty = decision.used != record.used || id.is_some();
        record.used = decision.used;
        if dirty {
            record.version += 1;
        }
        let unwritten = (change.with_record && record.is_dirty()).then(|| Box::new(record.clone()));
        if dirty {
            if let Some(cached) = state.records.get_mut(provider) {
                cached.expiry = None; // dirty records never expire
            }
            state.dirty_since.entry(provider.clone()).or_insert_with(Instant::now);
        }
        if let Some(id) = id {
            let entry = new_key_entry(change, decision).render();
            state
                .pending
                .entry(provider.clone())
                .or_default()
                .insert(id.clone(), entry.clone());
            state.keys.insert((provider.clone(), id), entry);
        }
        Ok(Applied::Decided(decision, unwritten))
    }

    async fn mark_synced(
        &self,
        provider: &ProviderId,
        epoch: &str,
        version: u64,
        limit: i64,
        ttl: Duration,
        transferred: &[String],
    ) -> Result<Synced, StorageError> {
        let mut state = self.state.lock().unwrap();
        if let Some(pending) = state.pending.get_mut(provider) {
            for id in transferred {
                pending.remove(id);
            }
        }
        let Some(cached) = state.records.get_mut(provider) else {
            state.dirty_since.remove(provider);
            return Ok(Synced::Clean);
        };
        if cached.record.epoch != epoch {
            return Ok(Synced::Replaced);
        }
        cached.record.synced = cached.record.synced.max(version);
        cached.record.limit = limit;
        let age = |loaded| Duration::from_millis(u64::try_from(now_ms() - loaded).unwrap_or(0));
        if cached.record.is_dirty() {
            let outlived = cached.record.loaded_ms.is_none_or(|loaded| age(loaded) >= ttl);
            return Ok(if outlived { Synced::Outlived } else { Synced::Dirty });
        }
        // the TTL runs from the load: a busy provider still reloads what other writers
        // added (an expiry already past drops the record now); a record without a load
        // time gets the whole TTL, and its load time now
        let loaded = *cached.record.loaded_ms.get_or_insert_with(now_ms);
        cached.expiry = Some(Instant::now() + ttl.saturating_sub(age(loaded)));
        state.dirty_since.remove(provider);
        Ok(Synced::Clean)
    }

    async fn pending_keys(&self, provider: &ProviderId) -> Result<Vec<KeyRecord>, StorageError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .pending
            .get(provider)
            .map(|p| p.clone().into_iter().collect())
            .unwrap_or_default())
    }

    async fn mark_outdated(&self, provider: &ProviderId) -> Result<(), StorageError> {
        if let Some(record) = self.state.lock().unwrap().live(provider) {
            record.outdated = true;
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

    async fn forget(&self, provider: &ProviderId, epoch: &str) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        let of_epoch = state
            .records
            .get(provider)
            .is_some_and(|cached| cached.record.epoch == epoch);
        if of_epoch {
            state.records.remove(provider);
            state.dirty_since.remove(provider);
            state.mark_pending_dropped(provider);
        }
        Ok(of_epoch)
    }

    async fn replace(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        // as load.lua: a record loaded from the operator's document stays (marked as asked)
        if let Some(record) = state
            .live(provider)
            .filter(|record| !seed.loaded_from.is_empty() && record.loaded_from == seed.loaded_from)
        {
            record.outdated |= seed.outdated;
            return Ok(());
        }
        state.mark_pending_dropped(provider);
        if state.fenced(provider, seed.fence) {
            state.records.remove(provider);
            state.dirty_since.remove(provider);
            return Ok(());
        }
        state
            .records
            .insert(provider.clone(), Cached::new(record_of(seed), ttl));
        state.dirty_since.remove(provider);
        state.import_keys(provider, &seed.keys);
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

    async fn ensure_sentinel(&self, candidate: &str) -> Result<Option<String>, StorageError> {
        let mut state = self.state.lock().unwrap();
        let present = state.sentinel.clone();
        state.sentinel.get_or_insert_with(|| candidate.to_owned());
        Ok(present)
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

    async fn phase_mirror(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        Ok(self.state.lock().unwrap().phase_mirror)
    }

    async fn set_phase_mirror(&self, phase: Phase, since: DateTime<Utc>) -> Result<(), StorageError> {
        self.state.lock().unwrap().phase_mirror = Some((phase, since));
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
        from_watermark: None,
        loaded_ms: Some(now_ms()),
        used: seed.used,
        limit: seed.limit,
        epoch: seed.epoch.clone(),
        base: seed.used,
        loaded_from: seed.loaded_from.clone(),
        version: 0,
        synced: 0,
        outdated: seed.outdated,
    }
}

#[derive(Debug, Clone, Default)]
struct Doc {
    used: Option<i64>,
    limit: Option<i64>,
    epoch: Option<String>,
    watermark: i64,
    version: u64,
    /// Idempotency records kept in the document (as `quotadKeys` in Firestore).
    keys: BTreeMap<String, String>,
    fallback: Option<FallbackMark>,
}

#[derive(Default)]
struct LedgerState {
    meta: HashMap<String, String>,
    docs: HashMap<ProviderId, Doc>,
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
        keys: doc
            .keys
            .iter()
            .filter(|(_, entry)| IdempotencyEntry::parse(entry).is_some_and(|e| e.expires_ms > now_ms()))
            .map(|(id, entry)| (id.clone(), entry.clone()))
            .collect(),
        fallback: doc.fallback.clone(),
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

    async fn write_record(
        &self,
        provider: &ProviderId,
        record: &Record,
        keys: &[KeyRecord],
    ) -> Result<WriteOutcome, StorageError> {
        let mut state = self.state.lock().unwrap();
        let doc = state.docs.entry(provider.clone()).or_default();
        if matches!(
            delta_for(record, doc.epoch.as_deref(), doc.watermark, doc.version),
            DeltaPlan::Stale
        ) {
            return Ok(WriteOutcome::Stale);
        }
        let (correction, _) = settle_twice_decided(&mut doc.keys, keys, doc.epoch.as_deref(), now_ms());
        merge_keys(&mut doc.keys, keys, now_ms());
        let delta = match delta_for(record, doc.epoch.as_deref(), doc.watermark, doc.version) {
            DeltaPlan::Stale => return Ok(WriteOutcome::Stale),
            DeltaPlan::AlreadyThere => None,
            DeltaPlan::Add(delta) => {
                carry_fallback_keys(&mut doc.keys, doc.epoch.as_deref(), &record.epoch);
                doc.epoch = Some(record.epoch.clone());
                doc.watermark = record.used;
                doc.version = record.version;
                Some(delta)
            }
        };
        if delta.is_some() || correction != 0 {
            doc.used = Some(super::usage_after_write(
                doc.used.unwrap_or(0),
                delta.unwrap_or(0),
                correction,
            ));
        }
        Ok(WriteOutcome::Written {
            limit: doc.limit,
            fallback: doc.fallback.clone(),
        })
    }

    async fn decide(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        default_limit: i64,
        fallback: Option<Fallback<'_>>,
    ) -> Result<LedgerDecision, StorageError> {
        let mut state = self.state.lock().unwrap();
        let id = change.idempotency_key.map(|k| idempotency_id(change.op, k));
        let doc = state.docs.get(provider).cloned().unwrap_or_default();
        if let Some(id) = &id {
            match replay(doc.keys.get(id), change.amount) {
                Some(Ok(decision)) => return Ok(LedgerDecision::Replayed(decision)),
                Some(Err(())) => return Ok(LedgerDecision::KeyReused),
                None => {}
            }
        }
        let used = doc.used.unwrap_or(0);
        let (decision, stored) = super::decide_stored(used, doc.limit.unwrap_or(default_limit), change);
        if stored != used {
            state.docs.entry(provider.clone()).or_default().used = Some(stored);
            if fallback.is_some() && !state.changed.contains(provider) {
                state.changed.push(provider.clone());
            }
        }
        let changes = stored != used || id.is_some();
        if let Some(mark) = fallback
            .and_then(|fallback| fallback.mark_to_write(doc.fallback.as_ref(), now_ms(), changes, doc.used.is_some()))
        {
            state.docs.entry(provider.clone()).or_default().fallback = Some(mark);
        }
        if let Some(id) = id {
            let entry = fallback_key_entry(&new_key_entry(change, decision), doc.epoch.as_deref());
            merge_keys(
                &mut state.docs.entry(provider.clone()).or_default().keys,
                &[(id, entry)],
                now_ms(),
            );
        }
        Ok(LedgerDecision::Decided(decision))
    }

    async fn add_used(&self, provider: &ProviderId, delta: i64, epoch: &str) -> Result<bool, StorageError> {
        let mut state = self.state.lock().unwrap();
        let Some(doc) = state.docs.get_mut(provider) else {
            return Ok(false);
        };
        let used = super::used_after_adding(doc.used, doc.epoch.as_deref(), delta, epoch);
        doc.used = used.or(doc.used);
        Ok(used.is_some())
    }

    async fn fallback_marks(&self, since_ms: i64, max: usize) -> Result<Vec<(ProviderId, FallbackMark)>, StorageError> {
        let state = self.state.lock().unwrap();
        let marked = state.docs.iter().filter_map(|(provider, doc)| {
            let mark = doc.fallback.as_ref().filter(|mark| mark.at_ms >= since_ms)?;
            Some((provider.clone(), mark.clone()))
        });
        Ok(marked.take(max).collect())
    }

    async fn announce_fallback(&self, provider: &ProviderId, by: &str) -> Result<(), StorageError> {
        let mut state = self.state.lock().unwrap();
        let doc = state.docs.entry(provider.clone()).or_default();
        doc.used.get_or_insert(0);
        doc.fallback = Some(FallbackMark {
            by: by.to_owned(),
            at_ms: now_ms(),
        });
        Ok(())
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

    async fn meta(&self, name: &str) -> Result<Option<String>, StorageError> {
        Ok(self.state.lock().unwrap().meta.get(name).cloned())
    }

    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StorageError> {
        self.state
            .lock()
            .unwrap()
            .meta
            .insert(name.to_owned(), value.to_owned());
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
