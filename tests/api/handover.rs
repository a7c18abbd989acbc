//! Returning to Redis (DESIGN.md invariant 6): a Firestore decision still in flight, or
//! landing, while the reconcile lists what Firestore changed must not let Redis decide
//! from a record that misses it. Run on the in-memory adapters and on Redis + Firestore;
//! the ledger is the real one behind a gate that holds a decision where the test says.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use quotad::{
    domain::{Outcome, Phase, ProviderId, QuotaService},
    storage::{
        Change, Counters, Document, KeyRecord, Ledger, LedgerDecision, Record, RecordWrite, StorageError, WriteOutcome,
        firestore::FirestoreLedger, memory, redis::RedisCounters,
    },
};
use tokio::sync::{Notify, Semaphore};

use crate::helpers::{emulator_host, redis_url, unique};

/// The real ledger, except that a decision can be held before it reaches it (and so
/// before its "changed outside" mark is written).
struct Gated {
    inner: Arc<dyn Ledger>,
    hold_next: AtomicBool,
    entered: Notify,
    open: Semaphore,
}

impl Gated {
    fn new(inner: Arc<dyn Ledger>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hold_next: AtomicBool::new(false),
            entered: Notify::new(),
            open: Semaphore::new(0),
        })
    }
}

#[async_trait]
impl Ledger for Gated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn ping(&self) -> Result<(), StorageError> {
        self.inner.ping().await
    }
    async fn read(&self, provider: &ProviderId) -> Result<Option<Document>, StorageError> {
        self.inner.read(provider).await
    }
    async fn write_record(
        &self,
        provider: &ProviderId,
        record: &Record,
        keys: &[KeyRecord],
    ) -> Result<WriteOutcome, StorageError> {
        self.inner.write_record(provider, record, keys).await
    }
    async fn write_records(
        &self,
        items: &[RecordWrite],
    ) -> Result<Vec<Result<WriteOutcome, StorageError>>, StorageError> {
        self.inner.write_records(items).await
    }
    async fn decide(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        default_limit: i64,
        mark_changed: bool,
    ) -> Result<LedgerDecision, StorageError> {
        if self.hold_next.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.open.acquire().await.unwrap().forget();
        }
        self.inner.decide(provider, change, default_limit, mark_changed).await
    }
    async fn set_quota(
        &self,
        provider: &ProviderId,
        used: Option<i64>,
        limit: Option<i64>,
        new_epoch: &str,
    ) -> Result<Document, StorageError> {
        self.inner.set_quota(provider, used, limit, new_epoch).await
    }
    async fn list_documents(
        &self,
        page: Option<String>,
        size: usize,
    ) -> Result<(Vec<(ProviderId, Document)>, Option<String>), StorageError> {
        self.inner.list_documents(page, size).await
    }
    async fn changed_outside(&self, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        self.inner.changed_outside(max).await
    }
    async fn note_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        self.inner.note_changed_outside(provider).await
    }
    async fn clear_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        self.inner.clear_changed_outside(provider).await
    }
    async fn meta(&self, name: &str) -> Result<Option<String>, StorageError> {
        self.inner.meta(name).await
    }
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StorageError> {
        self.inner.set_meta(name, value).await
    }
    async fn phase(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        self.inner.phase().await
    }
    async fn set_phase(&self, phase: Phase, since: DateTime<Utc>) -> Result<(), StorageError> {
        self.inner.set_phase(phase, since).await
    }
}

fn p(id: &str) -> ProviderId {
    ProviderId::parse(id).unwrap()
}

/// Consumes one unit; returns the usage the decision reports.
async fn consume(quotas: &QuotaService, provider: &ProviderId) -> i64 {
    match quotas.change(provider, quotad::storage::Op::Consume, 1, None).await {
        Ok(Outcome::Decided(decision)) => {
            assert!(decision.allowed, "{decision:?}");
            decision.used
        }
        other => panic!("consume: {other:?}"),
    }
}

fn service(counters: Arc<dyn Counters>, ledger: Arc<Gated>) -> Arc<QuotaService> {
    QuotaService::new(counters, ledger, 100, Duration::from_secs(300), Phase::DualWrite)
}

/// Polls `done` (yielding to the runtime) until it holds; fails after 10 s.
async fn until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A fallback still in flight when Redis returns: its provider waits for the decision to
/// land and its record to reload; another provider goes back to Redis at once.
async fn a_fallback_in_flight_holds_its_provider(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters.clone(), ledger.clone());
    let (held, other) = (p("held"), p("other"));
    assert_eq!(consume(&quotas, &held).await, 1); // Redis decides and caches the record
    assert!(quotas.flush(&held).await.unwrap());

    quotas.redis_down("test");
    ledger.hold_next.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let (quotas, held) = (quotas.clone(), held.clone());
        async move { consume(&quotas, &held).await }
    });
    ledger.entered.notified().await; // Firestore is deciding it, its mark not yet written

    // What the reconcile task does: nothing is marked yet, so Redis may decide again.
    assert_eq!(quotas.reconcile().await.unwrap(), 0);
    quotas.redis_recovered();
    assert!(quotas.redis_is_up());
    assert!(quotas.handover().is_held(&held));
    assert!(!quotas.handover().is_held(&other));
    assert_eq!(consume(&quotas, &other).await, 1);
    assert!(counters.read(&other).await.unwrap().is_some(), "Redis decided it");

    let second = tokio::spawn({
        let (quotas, held) = (quotas.clone(), held.clone());
        async move { consume(&quotas, &held).await }
    });
    until(
        || quotas.handover().waiting() == 1,
        "the second consume waits for the held provider",
    )
    .await;
    assert_eq!(
        quotas.hand_back().await,
        0,
        "nothing to reload while the decision is in flight"
    );

    ledger.open.add_permits(1);
    assert_eq!(first.await.unwrap(), 2, "Firestore decided from the flushed usage");
    // What the hand-back task does once woken: reload, then release.
    assert_eq!(quotas.hand_back().await, 1);
    assert_eq!(second.await.unwrap(), 3, "Redis decided from the reloaded record");
    assert!(!quotas.handover().is_held(&held));
    assert!(quotas.flush(&held).await.unwrap());
    assert_eq!(ledger.read(&held).await.unwrap().unwrap().used, Some(3));
}

/// A fallback that lands after the reconcile listed the marks but before Redis is let
/// back: its provider is held too.
async fn a_fallback_landing_during_the_reconcile_holds_its_provider(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters, ledger.clone());
    let held = p("held");
    assert_eq!(consume(&quotas, &held).await, 1);
    assert!(quotas.flush(&held).await.unwrap());

    quotas.redis_down("test");
    // A fallback that finished before the reconcile began is covered by its mark.
    assert_eq!(consume(&quotas, &held).await, 2);
    assert_eq!(quotas.reconcile().await.unwrap(), 1);
    assert!(!quotas.handover().is_held(&held));
    // One that lands after the listing (as if between the listing and recovery) is not.
    assert_eq!(consume(&quotas, &held).await, 3);
    quotas.redis_recovered();
    assert!(quotas.handover().is_held(&held));
    assert_eq!(quotas.hand_back().await, 1);
    assert_eq!(
        consume(&quotas, &held).await,
        4,
        "Redis decided from the reloaded record"
    );
    assert!(quotas.flush(&held).await.unwrap());
    assert_eq!(ledger.read(&held).await.unwrap().unwrap().used, Some(4));
}

/// A fallback whose request is dropped mid-decision (a client that hung up) still ends
/// its hold.
async fn a_dropped_fallback_ends_its_hold(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters, ledger.clone());
    let held = p("held");
    assert_eq!(consume(&quotas, &held).await, 1);
    quotas.redis_down("test");
    ledger.hold_next.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let (quotas, held) = (quotas.clone(), held.clone());
        async move { consume(&quotas, &held).await }
    });
    ledger.entered.notified().await;
    assert_eq!(quotas.reconcile().await.unwrap(), 0);
    quotas.redis_recovered();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(quotas.handover().is_held(&held));
    assert_eq!(quotas.hand_back().await, 1);
    assert!(!quotas.handover().is_held(&held));
    assert_eq!(consume(&quotas, &held).await, 2, "the dropped decision changed nothing");
}

async fn memory() -> (Arc<dyn Counters>, Arc<Gated>) {
    (
        Arc::new(memory::MemoryCounters::default()),
        Gated::new(Arc::new(memory::MemoryLedger::default())),
    )
}

async fn real() -> (Arc<dyn Counters>, Arc<Gated>) {
    let _ = emulator_host();
    let counters = RedisCounters::new(&redis_url(), &(unique("h") + ":")).unwrap();
    let ledger = FirestoreLedger::new(&unique("handover-"), "providers");
    (Arc::new(counters), Gated::new(Arc::new(ledger)))
}

#[tokio::test]
async fn memory_holds_a_provider_whose_fallback_is_in_flight() {
    let (counters, ledger) = memory().await;
    a_fallback_in_flight_holds_its_provider(counters, ledger).await;
}

#[tokio::test]
async fn redis_holds_a_provider_whose_fallback_is_in_flight() {
    let (counters, ledger) = real().await;
    a_fallback_in_flight_holds_its_provider(counters, ledger).await;
}

#[tokio::test]
async fn memory_holds_a_provider_whose_fallback_lands_during_the_reconcile() {
    let (counters, ledger) = memory().await;
    a_fallback_landing_during_the_reconcile_holds_its_provider(counters, ledger).await;
}

#[tokio::test]
async fn redis_holds_a_provider_whose_fallback_lands_during_the_reconcile() {
    let (counters, ledger) = real().await;
    a_fallback_landing_during_the_reconcile_holds_its_provider(counters, ledger).await;
}

#[tokio::test]
async fn memory_ends_the_hold_of_a_dropped_fallback() {
    let (counters, ledger) = memory().await;
    a_dropped_fallback_ends_its_hold(counters, ledger).await;
}

#[tokio::test]
async fn redis_ends_the_hold_of_a_dropped_fallback() {
    let (counters, ledger) = real().await;
    a_dropped_fallback_ends_its_hold(counters, ledger).await;
}
