//! The dual-write writer: carries each Redis change into Firestore behind the answer,
//! retried until it lands.
//!
//! The queue in process memory only makes the write prompt. Durability comes from Redis:
//! a changed record is dirty (it never expires) and sits in the dirty index until the
//! ledger holds its version, so a sweep re-enqueues whatever a crashed replica (or a
//! failed write) left behind.
//!
//! Redis can fail between a change and the write that carries it, and the writes lag the
//! answers by a Firestore transaction or more. So the writer also holds, for each provider,
//! the record as this replica's last change left it (Redis answers it with the change),
//! until the ledger holds that version: when Redis stops answering, or comes back without
//! the record, this replica writes what it holds before Firestore decides for the provider
//! (see [`QuotaService::write_held`]). Other replicas' unwritten changes are theirs to write.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Phase, ProviderId, QuotaService, quota::Lineage};
use crate::storage::{KeyRecord, Record};

/// How long a record may stay dirty before a sweep takes it over from whoever wrote it.
const SWEEP_AGE: Duration = Duration::from_secs(2);
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const WORKERS: usize = 4;

/// The queue of providers with changes to write.
#[derive(Default)]
pub struct Writer {
    queue: Mutex<(VecDeque<ProviderId>, HashSet<ProviderId>)>,
    ready: Notify,
    /// This replica's changes the ledger may not hold yet, by provider: one entry per
    /// epoch (two only around a reload).
    held: Mutex<HashMap<ProviderId, Vec<Held>>>,
}

/// The newest record of one epoch that this replica's changes left, with the idempotency
/// records of its keyed changes (each with the version it made).
#[derive(Debug, Clone)]
pub struct Held {
    pub record: Record,
    pub keys: Vec<(u64, KeyRecord)>,
}

impl Writer {
    /// Queues a provider (once: repeated changes coalesce into one write).
    pub fn enqueue(&self, provider: ProviderId) {
        let mut queue = self.queue.lock().unwrap();
        if queue.1.insert(provider.clone()) {
            queue.0.push_back(provider);
            drop(queue);
            self.ready.notify_one();
        }
    }

    fn pop(&self) -> Option<ProviderId> {
        let mut queue = self.queue.lock().unwrap();
        let provider = queue.0.pop_front()?;
        queue.1.remove(&provider);
        Some(provider)
    }

    pub fn pending(&self) -> usize {
        self.queue.lock().unwrap().0.len()
    }

    /// Holds `record`, as a change of this replica left it, until the ledger has its
    /// version, with the change's idempotency record `key` if it had one.
    pub fn hold(&self, provider: &ProviderId, record: Record, key: Option<KeyRecord>) {
        let mut held = self.held.lock().unwrap();
        let entries = held.entry(provider.clone()).or_default();
        let key = key.map(|key| (record.version, key));
        match entries.iter_mut().find(|h| h.record.epoch == record.epoch) {
            Some(entry) => {
                if record.version > entry.record.version {
                    entry.record = record;
                }
                entry.keys.extend(key);
            }
            None => entries.push(Held {
                record,
                keys: key.into_iter().collect(),
            }),
        }
    }

    /// What is held for `provider`, but of the epoch `except`.
    pub fn held(&self, provider: &ProviderId, except: Option<&str>) -> Vec<Held> {
        let held = self.held.lock().unwrap();
        let Some(entries) = held.get(provider) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|h| except != Some(h.record.epoch.as_str()))
            .cloned()
            .collect()
    }

    /// Providers with changes held.
    pub fn held_providers(&self) -> Vec<ProviderId> {
        self.held.lock().unwrap().keys().cloned().collect()
    }

    /// The ledger holds `version` of `epoch` (or has dropped the epoch, with `u64::MAX`),
    /// and the idempotency records of the changes up to it, or of those in `keys` only (a
    /// write of what was held: a key held after it was taken is still to write). What it
    /// covers is no longer held.
    pub fn landed(&self, provider: &ProviderId, epoch: &str, version: u64, keys: Option<&[String]>) {
        let mut held = self.held.lock().unwrap();
        let Some(entries) = held.get_mut(provider) else {
            return;
        };
        for entry in entries.iter_mut().filter(|h| h.record.epoch == epoch) {
            entry
                .keys
                .retain(|(made, (id, _))| *made > version || keys.is_some_and(|written| !written.contains(id)));
        }
        entries.retain(|h| h.record.epoch != epoch || h.record.version > version || !h.keys.is_empty());
        if entries.is_empty() {
            held.remove(provider);
        }
    }
}

/// Outcome of one step of a worker, separate from its loop so tests can step it.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Idle,
    Written,
    Failed,
}

/// Writes one queued provider.
pub async fn write_one(service: &QuotaService) -> Step {
    let Some(provider) = service.writer().pop() else {
        return Step::Idle;
    };
    match service.flush(&provider).await {
        Ok(_) => Step::Written,
        Err(err) => {
            metrics::counter!("quotad_store_write_retries_total").increment(1);
            tracing::warn!(%provider, error = %err, "Firestore write failed; it will be retried");
            service.background_call_failed(&err);
            Step::Failed
        }
    }
}

/// Runs the writer's workers and its sweep until `cancel`, then flushes what is queued.
pub async fn run(service: Arc<QuotaService>, cancel: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (service, cancel) = (service.clone(), cancel.clone());
        tasks.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match write_one(&service).await {
                    Step::Written => backoff = Duration::from_millis(50),
                    Step::Failed => {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Step::Idle => {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = service.writer().ready.notified() => {}
                            () = tokio::time::sleep(SWEEP_EVERY) => {}
                        }
                    }
                }
            }
        });
    }
    {
        let (service, cancel) = (service.clone(), cancel.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(SWEEP_EVERY) => {}
                }
                sweep(&service).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    drain(&service, Duration::from_secs(10)).await;
}

/// Takes over the records that stayed dirty too long: queued for writing in dual-write,
/// written and dropped in firestore-only; in redis-primary the batch sync writes them.
pub async fn sweep(service: &QuotaService) {
    let phase = service.phase().0;
    if !service.redis_is_up() {
        // Other replicas decide in Firestore meanwhile: what this replica's changes left in
        // Redis reaches the documents within a sweep, not only at its own next fallback.
        write_all_held(service, None, None).await;
        return;
    }
    // Held changes whose write failed, and that nothing else queues again (another replica
    // has written the record since, say), are released by a flush.
    for provider in service.writer().held_providers() {
        service.writer().enqueue(provider);
    }
    if phase == Phase::RedisPrimary {
        return;
    }
    let providers = match service.counters().dirty(SWEEP_AGE, 500).await {
        Ok(providers) => providers,
        Err(err) => {
            tracing::debug!(error = %err, "dirty sweep failed");
            service.background_call_failed(&err); // an idle replica's first sign of an outage
            return;
        }
    };
    for provider in providers {
        if phase == Phase::DualWrite {
            service.writer().enqueue(provider);
        } else if let Err(err) = service.invalidate(&provider).await {
            // firestore-only: Firestore decides now, so write the record and drop it.
            tracing::warn!(%provider, error = %err, "could not write a record left dirty by an earlier phase");
        }
    }
}

/// While Redis is away for this replica's decisions, writes what every provider holds (see
/// [`QuotaService::write_held`]), until `deadline` if any, with `lineage` (by default, as
/// [`QuotaService::lineage_while_away`] says at each write). Returns how many failed.
pub async fn write_all_held(
    service: &QuotaService,
    deadline: Option<tokio::time::Instant>,
    lineage: Option<Lineage>,
) -> usize {
    let mut failed = 0;
    for provider in service.writer().held_providers() {
        if deadline.is_some_and(|at| tokio::time::Instant::now() >= at) {
            break;
        }
        let lineage = lineage.unwrap_or_else(|| service.lineage_while_away());
        if let Err(err) = service.write_held(&provider, None, lineage).await {
            tracing::debug!(%provider, error = %err, "writing held changes failed");
            failed += 1;
        }
    }
    failed
}

/// Writes everything queued, for at most `budget` (graceful shutdown).
pub async fn drain(service: &QuotaService, budget: Duration) {
    let deadline = tokio::time::Instant::now() + budget;
    // Before the queue empties, which takes what it settles in records along: only this
    // replica knows which of its calls went unanswered.
    match tokio::time::timeout_at(deadline, service.settle_unanswered()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "shutdown: could not settle calls Redis did not answer"),
        Err(_) => tracing::warn!("shutdown: settling calls Redis did not answer took too long"),
    }
    while service.writer().pending() > 0 && tokio::time::Instant::now() < deadline {
        if write_one(service).await == Step::Failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Redis away: what this replica's changes left there goes to the ledger from here.
    if !service.redis_is_up() {
        let failed = write_all_held(service, Some(deadline), None).await;
        if failed > 0 {
            tracing::warn!(failed, "shutdown: could not write changes Redis did not answer for");
        }
    }
    let left = service.writer().pending();
    if left > 0 {
        tracing::warn!(
            left,
            "shutdown: writes still pending stay dirty in Redis for another replica"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: &str, version: u64, used: i64) -> Record {
        Record {
            used,
            limit: 10,
            epoch: epoch.into(),
            base: 0,
            loaded_from: String::new(),
            version,
            synced: 0,
            from_watermark: None,
            loaded_ms: None,
            outdated: false,
        }
    }

    fn key(id: &str) -> Option<KeyRecord> {
        Some((id.into(), "1:1:1:10:0".into()))
    }

    /// The newest record of each epoch is held, answers arriving in any order, with every
    /// key; what the ledger holds stops being held, and nothing else.
    #[test]
    fn holds_the_newest_record_of_each_epoch_until_the_ledger_has_it() {
        let writer = Writer::default();
        let p = ProviderId::parse("p").unwrap();
        writer.hold(&p, record("e1", 3, 3), key("c:3"));
        writer.hold(&p, record("e1", 2, 2), key("c:2")); // answered late
        writer.hold(&p, record("e2", 1, 4), None); // reloaded since
        let held = writer.held(&p, None);
        assert_eq!(held.len(), 2);
        assert_eq!((held[0].record.version, held[0].record.used), (3, 3));
        let ids: Vec<&str> = held[0].keys.iter().map(|(_, (id, _))| id.as_str()).collect();
        assert_eq!(ids, ["c:3", "c:2"]);
        assert_eq!(writer.held(&p, Some("e1")).len(), 1, "but of e1");

        writer.landed(&p, "e1", 2, None);
        let held = writer.held(&p, Some("e2"));
        assert_eq!(held[0].record.version, 3, "version 3 is not in the ledger yet");
        assert_eq!(held[0].keys, vec![(3, key("c:3").unwrap())]);
        writer.landed(&p, "e1", 3, Some(&[])); // a write of what was held before c:3
        assert_eq!(writer.held(&p, Some("e2"))[0].keys.len(), 1, "c:3 still to write");
        writer.landed(&p, "e1", 3, Some(&["c:3".to_owned()]));
        writer.landed(&p, "e2", u64::MAX, None); // dropped by the ledger (stale)
        assert!(writer.held(&p, None).is_empty());
        assert!(writer.held_providers().is_empty());
    }
}
