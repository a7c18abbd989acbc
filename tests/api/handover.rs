//! Firestore deciding beside Redis must never let Redis decide from a record that misses
//! one of its decisions: neither when Redis returns while a fallback is in flight or
//! landing (DESIGN.md invariant 6), nor while replicas in different phases decide for one
//! provider (a phase switch). Run on the in-memory adapters and on Redis + Firestore; the
//! ledger is the real one behind a gate that holds a call where the test says.

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
    domain::{Outcome, Phase, ProviderId, QuotaService, Source},
    storage::{
        Applied, Change, Counters, Document, Fallback, KeyRecord, Ledger, LedgerDecision, Record, RecordWrite,
        StorageError, WriteOutcome, firestore::FirestoreLedger, memory, redis::RedisCounters,
    },
};
use tokio::sync::{Notify, Semaphore};

use crate::helpers::{emulator_host, redis_url, unique};

/// Runs a scenario as two tests: on the in-memory adapters, and on Redis and Firestore.
macro_rules! on_both {
    ($scenario:ident: $memory:ident, $real:ident) => {
        #[tokio::test]
        async fn $memory() {
            let (counters, ledger) = memory().await;
            $scenario(counters, ledger).await;
        }

        #[tokio::test]
        async fn $real() {
            let (counters, ledger) = real().await;
            $scenario(counters, ledger).await;
        }
    };
}

/// The real ledger, except that a decision can be held before it reaches it (and so
/// before its "changed outside" mark is written, or just after it with `mark_first`, as
/// the Firestore adapter writes it before its transaction), and a read after it returns;
/// clearing one provider's mark can be made to fail; another replica's consume can be
/// made to follow every record write (a record it keeps dirty); and record writes can be
/// held (`hold_writes`), counted while in a write.
struct Gated {
    inner: Arc<dyn Ledger>,
    hold_next: AtomicBool,
    mark_first: AtomicBool,
    fail_clear: std::sync::Mutex<Option<ProviderId>>,
    busy: std::sync::Mutex<Option<(Arc<dyn Counters>, ProviderId)>>,
    busy_units: std::sync::atomic::AtomicI64,
    hold_next_read: AtomicBool,
    fail_phase_read: AtomicBool,
    entered: Notify,
    open: Semaphore,
    /// Record writes wait for `writes_open` while set; `writing` counts those in a write.
    hold_writes: AtomicBool,
    writing: std::sync::atomic::AtomicUsize,
    writes_open: Semaphore,
    /// The next record write panics (a bug in a write path).
    panic_next_write: AtomicBool,
    /// Fallbacks announced (`Ledger::announce_fallback`).
    announcements: std::sync::atomic::AtomicUsize,
}

impl Gated {
    fn new(inner: Arc<dyn Ledger>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hold_next: AtomicBool::new(false),
            mark_first: AtomicBool::new(false),
            fail_clear: std::sync::Mutex::default(),
            busy: std::sync::Mutex::default(),
            busy_units: std::sync::atomic::AtomicI64::new(0),
            hold_next_read: AtomicBool::new(false),
            fail_phase_read: AtomicBool::new(false),
            entered: Notify::new(),
            open: Semaphore::new(0),
            hold_writes: AtomicBool::new(false),
            writing: std::sync::atomic::AtomicUsize::new(0),
            writes_open: Semaphore::new(0),
            panic_next_write: AtomicBool::new(false),
            announcements: std::sync::atomic::AtomicUsize::new(0),
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
        let doc = self.inner.read(provider).await;
        if self.hold_next_read.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.open.acquire().await.unwrap().forget();
        }
        doc
    }
    async fn write_record(
        &self,
        provider: &ProviderId,
        record: &Record,
        keys: &[KeyRecord],
    ) -> Result<WriteOutcome, StorageError> {
        assert!(
            !self.panic_next_write.swap(false, Ordering::SeqCst),
            "a record write panics (test)"
        );
        self.writing.fetch_add(1, Ordering::SeqCst);
        if self.hold_writes.load(Ordering::SeqCst) {
            self.entered.notify_one();
            self.writes_open.acquire().await.unwrap().forget();
        }
        let written = self.inner.write_record(provider, record, keys).await;
        self.writing.fetch_sub(1, Ordering::SeqCst);
        let busy = self.busy.lock().unwrap().clone();
        if let Some((counters, _)) = busy.filter(|(_, kept)| kept == provider) {
            let change = Change {
                op: quotad::storage::Op::Consume,
                amount: 1,
                idempotency_key: None,
                with_record: false,
            };
            counters.apply(provider, &change).await.unwrap();
            self.busy_units.fetch_add(1, Ordering::SeqCst);
        }
        written
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
        fallback: Option<Fallback<'_>>,
    ) -> Result<LedgerDecision, StorageError> {
        if self.hold_next.swap(false, Ordering::SeqCst) {
            if fallback.is_some() && self.mark_first.load(Ordering::SeqCst) {
                self.inner.note_changed_outside(provider).await?;
            }
            self.entered.notify_one();
            self.open.acquire().await.unwrap().forget();
        }
        self.inner.decide(provider, change, default_limit, fallback).await
    }
    async fn announce_fallback(&self, provider: &ProviderId, by: &str) -> Result<(), StorageError> {
        self.announcements.fetch_add(1, Ordering::SeqCst);
        self.inner.announce_fallback(provider, by).await
    }
    async fn add_used(&self, provider: &ProviderId, delta: i64, epoch: &str) -> Result<bool, StorageError> {
        self.inner.add_used(provider, delta, epoch).await
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
    async fn fallback_marks(
        &self,
        since_ms: i64,
        max: usize,
    ) -> Result<Vec<(ProviderId, quotad::storage::FallbackMark)>, StorageError> {
        self.inner.fallback_marks(since_ms, max).await
    }
    async fn changed_outside(&self, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        self.inner.changed_outside(max).await
    }
    async fn note_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        self.inner.note_changed_outside(provider).await
    }
    async fn clear_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError> {
        if self.fail_clear.lock().unwrap().as_ref() == Some(provider) {
            return Err(StorageError::Unavailable {
                backend: "firestore",
                message: "clearing this mark fails".into(),
            });
        }
        self.inner.clear_changed_outside(provider).await
    }
    async fn meta(&self, name: &str) -> Result<Option<String>, StorageError> {
        self.inner.meta(name).await
    }
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StorageError> {
        self.inner.set_meta(name, value).await
    }
    async fn phase(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        if self.fail_phase_read.swap(false, Ordering::SeqCst) {
            return Err(StorageError::Unavailable {
                backend: "firestore",
                message: "the phase read fails (test)".into(),
            });
        }
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

/// [`consume`] in a task of its own.
fn spawn_consume(quotas: &Arc<QuotaService>, provider: &ProviderId) -> tokio::task::JoinHandle<i64> {
    let (quotas, provider) = (quotas.clone(), provider.clone());
    tokio::spawn(async move { consume(&quotas, &provider).await })
}

fn service(counters: Arc<dyn Counters>, ledger: Arc<Gated>) -> Arc<QuotaService> {
    in_phase(counters, ledger, Phase::DualWrite)
}

fn in_phase(counters: Arc<dyn Counters>, ledger: Arc<Gated>, phase: Phase) -> Arc<QuotaService> {
    QuotaService::new(counters, ledger, 100, Duration::from_secs(300), phase)
}

/// `id` consumed once in Redis (which caches the record) and written; then Redis is away
/// for `quotas`'s decisions, whose next consume of `id`, a fallback, is returned held on
/// its way to Firestore (`ledger.open` releases it). A call failed while Redis still
/// answers pings (a slow or hung call: the fallback's fence and marks reach Redis, and
/// its decisions leave no mark in the document: see
/// `a_cut_off_replicas_first_fallback_is_announced_before_it_decides` for a replica cut off).
async fn a_held_fallback(quotas: &Arc<QuotaService>, ledger: &Gated, id: &ProviderId) -> tokio::task::JoinHandle<i64> {
    assert_eq!(consume(quotas, id).await, 1);
    assert!(quotas.flush(id).await.unwrap());
    quotas.redis_down("test");
    quotas.note_redis_answers(true);
    ledger.hold_next.store(true, Ordering::SeqCst);
    let fallback = spawn_consume(quotas, id);
    ledger.entered.notified().await;
    fallback
}

/// Polls `done` (yielding to the runtime) until it holds; fails after 10 s.
async fn until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// [`until`] for a condition that needs a call to read.
async fn until_async<F, Fut>(mut done: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A plain consume of 1 (no idempotency key, no record asked back), as another replica sends it.
fn bare_consume() -> quotad::storage::Change<'static> {
    quotad::storage::Change {
        op: quotad::storage::Op::Consume,
        amount: 1,
        idempotency_key: None,
        with_record: false,
    }
}

/// A fallback still in flight when Redis returns: its provider waits for the decision to
/// land and its record to reload; another provider goes back to Redis at once.
async fn a_fallback_in_flight_holds_its_provider(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters.clone(), ledger.clone());
    let (held, other) = (p("held"), p("other"));
    let first = a_held_fallback(&quotas, &ledger, &held).await; // its mark not yet written

    // What the reconcile task does: nothing is marked yet, so Redis may decide again.
    assert_eq!(quotas.reconcile().await.unwrap(), 0);
    quotas.redis_recovered();
    assert!(quotas.redis_is_up());
    assert!(quotas.handover().is_held(&held));
    assert!(!quotas.handover().is_held(&other));
    assert_eq!(consume(&quotas, &other).await, 1);
    assert!(counters.read(&other).await.unwrap().is_some(), "Redis decided it");

    let second = spawn_consume(&quotas, &held);
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

/// Every provider Firestore decided for while Redis was away is held at the recovery,
/// not only those still in flight: a reconcile that failed partway may have cleared a
/// mark while its decision was in flight, and another replica (which reaches Redis) may
/// have loaded the record before the decision landed (where the fallback's fence did not
/// reach Redis).
async fn a_fallback_whose_mark_a_failed_reconcile_cleared_holds_its_provider(
    counters: Arc<dyn Counters>,
    ledger: Arc<Gated>,
) {
    let a = service(counters.clone(), ledger.clone());
    let b = service(counters.clone(), ledger.clone());
    let (held, other) = (p("a-held"), p("z-other"));
    assert_eq!(consume(&a, &held).await, 1);
    assert!(a.flush(&held).await.unwrap());

    a.redis_down("test");
    a.note_redis_answers(true); // a slow call: the fallback's fence reaches Redis (as above)
    ledger.mark_first.store(true, Ordering::SeqCst);
    ledger.hold_next.store(true, Ordering::SeqCst);
    let first = spawn_consume(&a, &held);
    ledger.entered.notified().await; // its mark is written, its transaction not yet
    ledger.note_changed_outside(&other).await.unwrap();
    *ledger.fail_clear.lock().unwrap() = Some(other.clone());
    assert!(
        a.reconcile().await.is_err(),
        "reloads `held`, clears its mark, fails on `other`"
    );
    // B reaches Redis, and would load the record before A's decision lands but for the
    // fallback's fence (which a Redis killed and back empty would not hold: the hold below
    // is for that): its load waits for A's decision.
    let by_b = spawn_consume(&b, &held);
    until(|| b.fence_waiting() == 1, "B's load waits for A's fence").await;
    ledger.open.add_permits(1);
    assert_eq!(first.await.unwrap(), 2, "Firestore's view: 1 + 1");
    assert_eq!(by_b.await.unwrap(), 3, "B loaded the document with A's decision");

    *ledger.fail_clear.lock().unwrap() = None;
    a.reconcile().await.unwrap(); // lists `other` only
    a.redis_recovered();
    assert!(a.handover().is_held(&held));
    assert_eq!(a.hand_back().await, 1);
    assert_eq!(consume(&a, &held).await, 4, "Redis decided from the reloaded record");
    assert!(a.flush(&held).await.unwrap());
    assert_eq!(ledger.read(&held).await.unwrap().unwrap().used, Some(4));
}

/// A decision waiting for a held provider stops waiting when Redis goes down again, and
/// Firestore decides it.
async fn redis_going_down_again_ends_the_wait(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters, ledger.clone());
    let held = p("held");
    let first = a_held_fallback(&quotas, &ledger, &held).await;
    assert_eq!(quotas.reconcile().await.unwrap(), 0);
    quotas.redis_recovered();
    let second = spawn_consume(&quotas, &held);
    until(|| quotas.handover().waiting() == 1, "the second consume waits").await;
    quotas.redis_down("test again");
    assert_eq!(
        second.await.unwrap(),
        2,
        "Firestore decided it while the first still waits"
    );
    ledger.open.add_permits(1);
    assert_eq!(first.await.unwrap(), 3);
    assert_eq!(ledger.read(&held).await.unwrap().unwrap().used, Some(3));
}

/// A reconcile round that fails ends the recovery it began in, not one that a probe
/// began meanwhile (that probe's own round follows), and a probe finding Redis answering
/// again does not prolong a recovery already on; a failed probe ends any.
async fn a_failed_round_ends_only_its_own_recovery(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters, ledger);
    let id = p("waiting");
    quotas.redis_down("test");
    let round = quotas.recovery_round(); // a periodic round begins: no recovery on
    quotas.redis_answers(); // a probe during the round found Redis answering
    quotas.recovery_failed(round);
    let decision = spawn_consume(&quotas, &id);
    until(
        || quotas.recovery_waiting() == 1,
        "the consume waits for the probe's recovery",
    )
    .await;
    let round = quotas.recovery_round(); // the probe's round
    quotas.redis_answers(); // probes go on finding Redis answering during it
    quotas.redis_down("a call sent while Redis was up failed late"); // ends nothing
    assert_eq!(quotas.recovery_round(), round);
    quotas.recovery_failed(round); // and the round fails
    assert_eq!(decision.await.unwrap(), 1, "Firestore decided it");
    assert_eq!(quotas.recovery_round(), 0, "the next probe begins another");

    quotas.redis_answers();
    let decision = spawn_consume(&quotas, &id);
    until(|| quotas.recovery_waiting() == 1, "the next consume waits").await;
    quotas.end_recovery(); // what a failed probe does
    assert_eq!(decision.await.unwrap(), 2, "Firestore decided it");
    assert_eq!(quotas.recovery_round(), 0);
}

/// A fallback whose request is dropped mid-decision (a client that hung up) still runs to
/// its end, and its provider stays held until then: the decision may still land.
async fn a_dropped_fallback_holds_its_provider_until_it_lands(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let quotas = service(counters, ledger.clone());
    let held = p("held");
    assert_eq!(consume(&quotas, &held).await, 1);
    quotas.redis_down("test");
    ledger.hold_next.store(true, Ordering::SeqCst);
    let first = spawn_consume(&quotas, &held);
    ledger.entered.notified().await;
    assert_eq!(quotas.reconcile().await.unwrap(), 0);
    quotas.redis_recovered();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(quotas.handover().is_held(&held));
    assert_eq!(quotas.hand_back().await, 0, "its decision is still running");
    ledger.open.add_permits(1);
    let handover = quotas.handover();
    until(|| !handover.ready().is_empty(), "the dropped request's decision lands").await;
    assert_eq!(quotas.hand_back().await, 1);
    assert!(!quotas.handover().is_held(&held));
    assert_eq!(
        consume(&quotas, &held).await,
        3,
        "the dropped request's decision counted"
    );
}

/// A fence whose holder died (it neither releases nor renews it) lifts by itself: a
/// decision that met it waits, then loads the record and decides in Redis.
async fn a_dead_holders_fence_expires(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let id = p("dead-holder");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    assert!(counters.fence(&id, "died", Duration::from_millis(800)).await.unwrap());
    let waiting = spawn_consume(&a, &id);
    until(|| a.fence_waiting() == 1, "the consume waits for the fence").await;
    assert_eq!(waiting.await.unwrap(), 2);
    assert_eq!(counters.read(&id).await.unwrap().unwrap().used, 2, "decided in Redis");
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(1));
}

/// A holder renews its fence for as long as its decision runs, beyond the fence's TTL.
async fn a_slow_decision_keeps_its_fence(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let b = in_phase(counters.clone(), ledger.clone(), Phase::FirestoreOnly);
    let id = p("slow");
    ledger.hold_next.store(true, Ordering::SeqCst);
    let by_b = spawn_consume(&b, &id);
    ledger.entered.notified().await;
    assert!(counters.fence_held(&id).await.unwrap());
    tokio::time::sleep(Duration::from_secs(7)).await; // past the fence's TTL (5 s)
    assert!(
        counters.fence_held(&id).await.unwrap(),
        "renewed while the decision runs"
    );
    ledger.open.add_permits(1);
    assert_eq!(by_b.await.unwrap(), 1);
    assert!(!counters.fence_held(&id).await.unwrap(), "released once it landed");
}

/// A fallback marks its provider's record outdated as soon as Redis takes the call (here at
/// once: this replica only believes Redis is away): another replica that reaches Redis then
/// decides for it in Firestore too, not from a record that misses the fallback, and the
/// reconcile reloads it. (A record that other replicas keep dirty, its mark lost, is rebased
/// in place instead: `a_record_kept_dirty_past_its_ttl_is_rebased`, and the contract's.)
async fn a_fallback_marks_the_record_outdated_until_the_recovery(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let (busy, calm) = (p("busy"), p("calm"));
    assert_eq!(consume(&a, &busy).await, 1);
    assert!(a.flush(&busy).await.unwrap()); // the document is in the record's epoch
    assert_eq!(consume(&a, &calm).await, 1);
    a.redis_down("test");
    assert_eq!(consume(&a, &busy).await, 2, "a fallback: Firestore decides");
    // The writer has not carried calm's unit yet: this replica writes it before Firestore
    // decides (it holds what its changes left in Redis).
    assert_eq!(consume(&a, &calm).await, 2, "Redis's unit, then the fallback's");
    for id in [&busy, &calm] {
        let mut marked = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !marked {
            assert!(tokio::time::Instant::now() < deadline, "{id} never marked");
            tokio::time::sleep(Duration::from_millis(2)).await;
            marked = counters.read(id).await.unwrap().is_some_and(|r| r.outdated);
        }
    }
    // Another replica (Redis answers it) is not let decide from it.
    let by_other = bare_consume();
    assert_eq!(counters.apply(&busy, &by_other).await.unwrap(), Applied::Outdated);
    assert_eq!(a.reconcile().await.unwrap(), 2, "both reloaded");
    for id in [&busy, &calm] {
        assert!(counters.read(id).await.unwrap().is_none_or(|r| !r.outdated), "{id}");
    }
    a.redis_recovered();
    assert!(a.redis_is_up());
    assert_eq!(a.hand_back().await, 2);
    // Redis's unit and the fallback's, then this one.
    assert_eq!(consume(&a, &busy).await, 3);
    assert_eq!(consume(&a, &calm).await, 3);
    assert!(a.flush(&busy).await.unwrap());
    assert_eq!(ledger.read(&busy).await.unwrap().unwrap().used, Some(3));
}

/// A record that another replica keeps dirty never turns clean, so it never expires; once
/// it has outlived the cache TTL, the writes that follow rebase it, and it takes in what
/// other writers (a legacy Cloud Function) added to the document meanwhile.
async fn a_record_kept_dirty_past_its_ttl_is_rebased(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let ttl = Duration::from_secs(1);
    let a = QuotaService::new(counters.clone(), ledger.clone(), 100, ttl, Phase::DualWrite);
    let busy = p("busy");
    assert_eq!(consume(&a, &busy).await, 1);
    let loaded = tokio::time::Instant::now(); // the record was loaded before
    assert!(a.flush(&busy).await.unwrap()); // the document is in the record's epoch
    // another writer adds 50 to the document, behind the cache
    let outside = quotad::storage::Change {
        amount: 50,
        ..bare_consume()
    };
    let added = ledger.inner.decide(&busy, &outside, 100, None).await.unwrap();
    assert!(matches!(added, LedgerDecision::Decided(d) if d.allowed && d.used == 51));
    // another replica consumes after every write: the record stays dirty
    *ledger.busy.lock().unwrap() = Some((counters.clone(), busy.clone()));
    consume(&a, &busy).await;
    assert!(!a.flush(&busy).await.unwrap(), "kept dirty");
    assert!(
        counters.read(&busy).await.unwrap().unwrap().used < 50,
        "within the TTL: as loaded"
    );
    tokio::time::sleep_until(loaded + ttl + Duration::from_millis(100)).await;
    assert!(!a.flush(&busy).await.unwrap(), "still kept dirty");
    let record = counters.read(&busy).await.unwrap().unwrap();
    assert!(record.used > 50, "past the TTL: rebased onto the document ({record:?})");
    // every unit once: two consumes here, the other writer's 50 and the other replica's
    *ledger.busy.lock().unwrap() = None;
    assert!(a.flush(&busy).await.unwrap());
    let others = ledger.busy_units.load(Ordering::SeqCst);
    assert_eq!(ledger.read(&busy).await.unwrap().unwrap().used, Some(52 + others));
}

/// A rebase (here an invalidation of a record another replica keeps dirty) reads the record,
/// then the document: an outdated mark that reaches the record in between stands for a
/// fallback the document may not hold yet, so the rebase leaves it (`RebaseMark::Keep`).
async fn a_mark_that_lands_during_a_rebase_stays(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let busy = p("rebase-marked");
    assert_eq!(consume(&a, &busy).await, 1);
    assert!(a.flush(&busy).await.unwrap()); // the document is in the record's epoch
    // another replica consumes after every write: the record stays dirty, and is rebased
    *ledger.busy.lock().unwrap() = Some((counters.clone(), busy.clone()));
    consume(&a, &busy).await; // dirty, and kept so
    ledger.hold_next_read.store(true, Ordering::SeqCst);
    let invalidated = {
        let (a, busy) = (a.clone(), busy.clone());
        tokio::spawn(async move { a.invalidate(&busy).await })
    };
    ledger.entered.notified().await; // the rebase has read the record and the document
    assert!(!counters.read(&busy).await.unwrap().unwrap().outdated);
    counters.mark_outdated(&busy).await.unwrap(); // a fallback elsewhere has just landed
    ledger.open.add_permits(1);
    invalidated.await.unwrap().unwrap();
    *ledger.busy.lock().unwrap() = None;
    let record = counters.read(&busy).await.unwrap().unwrap();
    assert!(record.outdated, "the mark stays: {record:?}");
}

on_both!(a_mark_that_lands_during_a_rebase_stays: memory_a_mark_that_lands_during_a_rebase_stays, redis_a_mark_that_lands_during_a_rebase_stays);

/// A load whose document was read before a fenced decision landed is refused, though the
/// fence is gone by the time the load reaches Redis.
async fn a_load_read_before_a_fenced_decision_is_refused(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = in_phase(counters.clone(), ledger.clone(), Phase::DualWrite);
    let b = in_phase(counters.clone(), ledger.clone(), Phase::FirestoreOnly);
    let id = p("read-early");
    ledger.hold_next_read.store(true, Ordering::SeqCst);
    let by_a = spawn_consume(&a, &id);
    ledger.entered.notified().await; // A's miss has read the document: used 0
    assert_eq!(consume(&b, &id).await, 1, "B decided (fenced) and released its fence");
    ledger.open.add_permits(1);
    assert_eq!(by_a.await.unwrap(), 2, "A's load was refused; it loaded again");
    assert_eq!(
        counters.read(&id).await.unwrap().unwrap().used,
        2,
        "and decided in Redis"
    );
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(1));
    assert_eq!(consume(&a, &id).await, 3);
    assert!(a.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(3));
}

/// Decisions that meet another replica's fence wait for it, then decide in Redis: a busy
/// provider's decisions do not keep each other off Redis.
async fn decisions_wait_for_a_fence_then_go_back_to_redis(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = in_phase(counters.clone(), ledger.clone(), Phase::DualWrite);
    let b = in_phase(counters.clone(), ledger.clone(), Phase::FirestoreOnly);
    let id = p("busy");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    ledger.hold_next.store(true, Ordering::SeqCst);
    let by_b = spawn_consume(&b, &id);
    ledger.entered.notified().await;
    let by_a: Vec<_> = (0..20).map(|_| spawn_consume(&a, &id)).collect();
    until(|| a.fence_waiting() == 20, "A's 20 consumes wait for B's fence").await;
    ledger.open.add_permits(1);
    assert_eq!(by_b.await.unwrap(), 2);
    let mut answers = Vec::new();
    for consume in by_a {
        answers.push(consume.await.unwrap());
    }
    answers.sort_unstable();
    assert_eq!(answers, (3..23).collect::<Vec<_>>());
    // Redis decided all 20: Firestore has only B's (this test runs no writer).
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(2));
    assert_eq!(counters.read(&id).await.unwrap().unwrap().used, 22);
}

/// A firestore-only decision that meets a record other replicas keep dirty decides in
/// Redis (where they decide), without marking Redis down.
async fn a_firestore_only_decision_meeting_a_busy_record_decides_in_redis(
    counters: Arc<dyn Counters>,
    ledger: Arc<Gated>,
) {
    let a = in_phase(counters.clone(), ledger.clone(), Phase::DualWrite);
    let b = in_phase(counters.clone(), ledger.clone(), Phase::FirestoreOnly);
    let id = p("kept-dirty");
    assert_eq!(consume(&a, &id).await, 1);
    *ledger.busy.lock().unwrap() = Some((counters.clone(), id.clone())); // a consume after each write
    // 1, then a consume after each of the 15 writes (five flushes of three tries), then B's
    assert_eq!(consume(&b, &id).await, 17);
    assert!(b.redis_is_up());
    *ledger.busy.lock().unwrap() = None;
    assert!(b.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(17));
}

/// A fallback fences its provider as soon as Redis takes the call (a Redis that wakes from
/// a hang while the decision waits out its grace or its transaction serves the other
/// replicas at once): until the decision has landed, no replica decides from the record,
/// nor loads the document without it. (Before the fence, a replica still deciding in Redis
/// and one deciding in Firestore each admitted the last unit; found by a black-box soak
/// that paused Redis for 0.67 s.)
async fn a_fallback_fences_its_provider_until_it_lands(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let b = service(counters.clone(), ledger.clone());
    let id = p("fenced-fallback");
    let by_a = a_held_fallback(&a, &ledger, &id).await; // the document at 1; A's decision held
    until_async(
        || async { counters.fence_held(&id).await.unwrap() },
        "the fallback fences its provider",
    )
    .await;
    assert_eq!(
        counters.apply(&id, &bare_consume()).await.unwrap(),
        Applied::Outdated,
        "the record is out of use"
    );
    // B, which reaches Redis, decides in Firestore (under a fence of its own, dropping the
    // record): before A's decision, which counts it.
    assert_eq!(consume(&b, &id).await, 2);
    assert!(b.redis_is_up());
    let seed = quotad::storage::Seed {
        used: 2,
        limit: 100,
        epoch: "reloaded".into(),
        loaded_from: String::new(),
        keys: vec![],
        fence: counters.fence_gen(&id).await.unwrap(),
        outdated: false,
    };
    assert!(
        !counters.load(&id, &seed, Duration::from_secs(300)).await.unwrap(),
        "a load while the fallback is in flight is refused"
    );
    let next = spawn_consume(&b, &id);
    until(|| b.fence_waiting() == 1, "B's next decision waits for the fence").await;
    ledger.open.add_permits(1);
    assert_eq!(by_a.await.unwrap(), 3, "A's decision counts B's");
    assert_eq!(next.await.unwrap(), 4, "B loads the document with A's decision");
    assert!(b.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(4));
}

on_both!(a_fallback_fences_its_provider_until_it_lands: memory_fences_a_fallbacks_provider_until_it_lands, redis_fences_a_fallbacks_provider_until_it_lands);

/// A fallback's mark follows its decision: where its fence did not hold (Redis lost it, as
/// a restart would), a replica that reloads the record while the decision is still on its
/// way to Firestore loads a document without it, and the mark that lands after the
/// decision takes that record out of use again. Real Redis only: the fence is deleted.
#[tokio::test]
async fn redis_marks_a_fallbacks_record_after_its_decision_where_its_fence_was_lost() {
    let (redis, ledger) = real_redis();
    let counters: Arc<dyn Counters> = redis.clone();
    let a = service(counters.clone(), ledger.clone());
    let id = p("mark-after");
    let by_a = a_held_fallback(&a, &ledger, &id).await;
    until_async(
        || async { counters.fence_held(&id).await.unwrap() },
        "the fallback fences its provider",
    )
    .await;
    let fences = redis.keys().fences(&id);
    let _: i64 = redis.query(::redis::cmd("DEL").arg(fences).clone()).await.unwrap();
    // Another replica drops the record and loads the document as it is: used 1.
    assert!(counters.evict_clean(&id).await.unwrap());
    let doc = ledger.read(&id).await.unwrap().unwrap();
    let seed = quotad::storage::Seed {
        used: doc.used(),
        limit: 100,
        epoch: "reloaded".into(),
        loaded_from: doc.epoch.clone().unwrap_or_default(),
        keys: vec![],
        fence: counters.fence_gen(&id).await.unwrap(),
        outdated: false,
    };
    assert!(counters.load(&id, &seed, Duration::from_secs(300)).await.unwrap());
    ledger.open.add_permits(1);
    assert_eq!(by_a.await.unwrap(), 2, "A decided in Firestore");
    until_async(
        || async { counters.read(&id).await.unwrap().is_some_and(|r| r.outdated) },
        "the mark after the decision marks the reloaded record",
    )
    .await;
    assert_eq!(counters.apply(&id, &bare_consume()).await.unwrap(), Applied::Outdated);
}

/// A lookup of an outdated record reloads it (its unsynced usage written first) and reads
/// through: in `redis-primary` it shows the document with that usage, and caches it.
async fn a_lookup_of_an_outdated_record_reloads_it(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = in_phase(counters.clone(), ledger.clone(), Phase::RedisPrimary);
    let id = p("looked-up");
    assert_eq!(consume(&a, &id).await, 1, "in Redis only, not yet synced");
    let outside = quotad::storage::Change {
        amount: 5,
        ..bare_consume()
    };
    // Decided in Firestore elsewhere, and marked (as a fallback long past would leave it: a
    // recent fallback keeps lookups off the cache, see the test below).
    ledger.inner.decide(&id, &outside, 100, None).await.unwrap();
    counters.mark_outdated(&id).await.unwrap();
    let seen = a.get(&id).await.unwrap();
    assert_eq!((seen.used, seen.source), (6, Source::Store));
    let again = a.get(&id).await.unwrap();
    assert_eq!((again.used, again.source), (6, Source::Cache));
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(6));
}

on_both!(a_lookup_of_an_outdated_record_reloads_it: memory_reloads_an_outdated_record_for_a_lookup, redis_reloads_an_outdated_record_for_a_lookup);

/// Another replica, cut off from Redis (a network split), decides in Firestore and cannot
/// mark the record this one decides from. This one's next write finds the fallback's mark
/// in the document and marks the record outdated itself; from then on, while the other
/// replica's mark is recent, decisions and lookups here go to Firestore too and nothing is
/// cached: each replica sees what the other decided.
async fn a_fallback_seen_by_a_write_sends_decisions_to_firestore(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let id = p("split");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    let elsewhere = quotad::storage::Change {
        amount: 5,
        ..bare_consume()
    };
    ledger
        .inner
        .decide(&id, &elsewhere, 100, Some(Fallback::marking("cut-off")))
        .await
        .unwrap(); // the document: 6
    // Decided from the record, which has not seen it (a write will); written: 7.
    assert_eq!(consume(&a, &id).await, 2);
    assert!(!counters.read(&id).await.unwrap().unwrap().outdated);
    a.flush(&id).await.unwrap();
    until_async(
        || async { counters.read(&id).await.unwrap().is_some_and(|r| r.outdated) },
        "the write marks it (in the background)",
    )
    .await;
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(7));
    // Firestore decides now, and the record is dropped and not loaded again.
    assert_eq!(consume(&a, &id).await, 8);
    assert_eq!(consume(&a, &id).await, 9);
    assert_eq!(counters.read(&id).await.unwrap(), None);
    let seen = a.get(&id).await.unwrap();
    assert_eq!((seen.used, seen.source), (9, Source::Store));
    assert_eq!(counters.read(&id).await.unwrap(), None);
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(9));
}

on_both!(a_fallback_seen_by_a_write_sends_decisions_to_firestore: memory_a_fallback_seen_by_a_write_sends_decisions_to_firestore, redis_a_fallback_seen_by_a_write_sends_decisions_to_firestore);

/// A replica cut off from Redis announces its first fallback for a provider in the document
/// before it decides (see `one_replica_cut_off_from_redis_leaves_bursts_exact` for what that
/// buys): the mark is there, the usage untouched, while the decision is still on its way;
/// a provider without a document gets one with a usage of 0. A replica whose call failed
/// while Redis answers its pings announces nothing (its own outdated mark reaches Redis).
async fn a_cut_off_replicas_first_fallback_is_announced_before_it_decides(
    counters: Arc<dyn Counters>,
    ledger: Arc<Gated>,
) {
    let a = service(counters.clone(), ledger.clone());
    let (id, new) = (p("announced"), p("announced-new"));
    ledger
        .inner
        .set_quota(&id, Some(9), Some(11), &quotad::storage::new_epoch())
        .await
        .unwrap();
    a.redis_down("cut off"); // and no ping answers since
    for (provider, used) in [(&id, 9), (&new, 0)] {
        ledger.hold_next.store(true, Ordering::SeqCst);
        let by_a = spawn_consume(&a, provider);
        ledger.entered.notified().await; // the decision, held on its way to the ledger
        let doc = ledger.read(provider).await.unwrap().unwrap();
        assert!(
            doc.fallback.is_some() && doc.used == Some(used),
            "announced first: {doc:?}"
        );
        ledger.open.add_permits(1);
        assert_eq!(by_a.await.unwrap(), used + 1);
    }
    let slow = p("announced-not");
    ledger
        .inner
        .set_quota(&slow, Some(1), Some(11), &quotad::storage::new_epoch())
        .await
        .unwrap();
    a.note_redis_answers(true); // a ping answered since the failure
    ledger.hold_next.store(true, Ordering::SeqCst);
    let by_a = spawn_consume(&a, &slow);
    ledger.entered.notified().await;
    assert_eq!(ledger.read(&slow).await.unwrap().unwrap().fallback, None);
    ledger.open.add_permits(1);
    assert_eq!(by_a.await.unwrap(), 2);
}

on_both!(a_cut_off_replicas_first_fallback_is_announced_before_it_decides: memory_a_cut_off_replicas_first_fallback_is_announced_before_it_decides, redis_a_cut_off_replicas_first_fallback_is_announced_before_it_decides);

/// An operator's `PUT` of `used` beside another replica's recent fallback mark leaves the
/// record it writes outdated when it answers, in the same step as the write: no request
/// decides from it in between (and nothing waits for a mark sent later).
async fn a_put_beside_a_recent_mark_writes_the_record_outdated(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let id = p("put-beside");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap()); // clean: the PUT's own flush writes nothing
    ledger
        .inner
        .decide(&id, &bare_consume(), 100, Some(Fallback::marking("cut-off")))
        .await
        .unwrap();
    a.set_quota(&id, Some(5), None).await.unwrap();
    let record = counters.read(&id).await.unwrap().unwrap();
    assert!(record.outdated && record.used == 5, "{record:?}");
    assert_eq!(consume(&a, &id).await, 6, "decided in Firestore");
}

on_both!(a_put_beside_a_recent_mark_writes_the_record_outdated: memory_a_put_beside_a_recent_mark_writes_the_record_outdated, redis_a_put_beside_a_recent_mark_writes_the_record_outdated);

/// A ping's answer says Redis answers only when no call has failed since the ping was sent
/// (a hung Redis answers pings sent before it hung), and a failure always clears it: the
/// fallbacks after it mark their documents.
#[tokio::test]
async fn a_ping_answered_counts_only_when_no_call_failed_since_it_was_sent() {
    let (counters, ledger) = memory().await;
    let a = service(counters, ledger);
    assert!(a.redis_answering(), "until a call fails");
    let sent = a.failures();
    a.redis_down("a call failed");
    assert_eq!(a.failures(), sent + 1);
    assert!(!a.redis_answering());
    a.note_redis_answers_since(true, sent);
    assert!(!a.redis_answering(), "sent before the failure");
    let sent = a.failures();
    a.note_redis_answers_since(true, sent);
    assert!(a.redis_answering());
    a.redis_down("again");
    assert!(!a.redis_answering() && a.failures() == sent + 1);
    a.note_redis_answers_since(false, a.failures());
    assert!(!a.redis_answering());
}

/// A fallback leaves its mark in the document only while the replica's pings find no Redis
/// either: after a call that failed while Redis answers (a slow call), its own outdated
/// mark reaches Redis, and a document mark would send the other replicas to Firestore.
async fn only_a_replica_cut_off_from_redis_marks_the_document(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let id = p("marked");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    a.redis_down("a call timed out");
    a.note_redis_answers(true); // and a ping answered since
    assert_eq!(consume(&a, &id).await, 2);
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().fallback, None);
    a.note_redis_answers(false); // no Redis at all
    assert_eq!(consume(&a, &id).await, 3);
    let doc = ledger.read(&id).await.unwrap().unwrap();
    assert!(doc.fallback.is_some(), "{doc:?}");
}

on_both!(only_a_replica_cut_off_from_redis_marks_the_document: memory_only_a_replica_cut_off_from_redis_marks_the_document, redis_only_a_replica_cut_off_from_redis_marks_the_document);

/// A replica asked to leave `redis-primary` before it has followed another's switch into it
/// (its view is a poll behind) still syncs first: it decides from the stored phase.
async fn leaving_a_phase_not_yet_followed_still_syncs_first(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone()); // in dual-write, and following nothing
    let id = p("unsynced");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    ledger.set_phase(Phase::RedisPrimary, Utc::now()).await.unwrap(); // another replica's switch
    let by_other = quotad::storage::Change {
        amount: 2,
        ..bare_consume()
    };
    assert!(matches!(counters.apply(&id, &by_other).await.unwrap(), Applied::Decided(d, _) if d.used == 3));
    assert_eq!(a.phase().0, Phase::DualWrite, "not followed yet");
    let sync = quotad::domain::sync::SyncJob::new(a.clone());
    let (phase, _) = sync.switch_phase(Phase::FirestoreOnly).await.unwrap();
    assert_eq!(phase, Phase::FirestoreOnly);
    assert_eq!(ledger.phase().await.unwrap().unwrap().0, Phase::FirestoreOnly);
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(3), "synced first");
    // Another switch to redis-primary, then one out of it while the stored phase cannot be
    // read: it may be redis-primary, so the sync runs first here too.
    ledger.set_phase(Phase::RedisPrimary, Utc::now()).await.unwrap();
    assert!(matches!(counters.apply(&id, &by_other).await.unwrap(), Applied::Decided(d, _) if d.used == 5));
    ledger.fail_phase_read.store(true, Ordering::SeqCst);
    let (phase, _) = sync.switch_phase(Phase::DualWrite).await.unwrap();
    assert_eq!(phase, Phase::DualWrite);
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(5), "synced first");
}

on_both!(leaving_a_phase_not_yet_followed_still_syncs_first: memory_leaving_a_phase_not_yet_followed_still_syncs_first, redis_leaving_a_phase_not_yet_followed_still_syncs_first);

/// `a` consumes two units of `id`, which it holds (not written yet); then Redis comes back
/// without the record.
async fn held_then_lost(a: &QuotaService, counters: &dyn Counters, id: &ProviderId) {
    assert_eq!(consume(a, id).await, 1);
    assert_eq!(consume(a, id).await, 2);
    let lost = counters.read(id).await.unwrap().unwrap().epoch;
    counters.forget(id, &lost).await.unwrap();
}

/// Held changes of an epoch that Redis lost leave the document to a record loaded since:
/// written, they would take the document to their epoch and make that record stale, and its
/// usage would go instead (Redis's data loss takes the held changes, as it always could).
async fn held_changes_of_a_lost_epoch_leave_a_newer_record_its_document(
    counters: Arc<dyn Counters>,
    ledger: Arc<Gated>,
) {
    let (a, b) = (
        service(counters.clone(), ledger.clone()),
        service(counters.clone(), ledger.clone()),
    );
    let id = p("lost");
    held_then_lost(&a, counters.as_ref(), &id).await;
    assert_eq!(consume(&b, &id).await, 1, "loaded afresh from the document");
    assert!(a.flush(&id).await.unwrap());
    assert!(a.writer().held(&id, None).is_empty(), "dropped, not kept for ever");
    assert!(b.flush(&id).await.unwrap());
    assert!(counters.read(&id).await.unwrap().is_some(), "b's record is not stale");
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(1), "b's unit");
    assert_eq!(consume(&b, &id).await, 2);
    assert!(b.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(2));
}

/// Held changes of an epoch that Redis lost, with no record loaded since, reach the
/// document (under a fence, so that none loads meanwhile), and the record reloads with them.
async fn held_changes_of_a_lost_epoch_reach_the_document(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let a = service(counters.clone(), ledger.clone());
    let id = p("lost-alone");
    held_then_lost(&a, counters.as_ref(), &id).await;
    assert!(a.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(2));
    assert!(!counters.fence_held(&id).await.unwrap(), "the fence is released");
    assert_eq!(consume(&a, &id).await, 3, "reloaded with them");
}

/// Held changes of an epoch whose record was rebased in place (a busy record reloaded by
/// the reconcile, or past the cache TTL) are carried by the rebased record: they are
/// released, not written again as lost (which found the document moved on to the new epoch,
/// and logged them dropped).
async fn held_changes_a_rebase_carried_are_released(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let (a, b) = (
        service(counters.clone(), ledger.clone()),
        service(counters.clone(), ledger.clone()),
    );
    let id = p("carried");
    assert_eq!(consume(&a, &id).await, 1); // held by a
    assert_eq!(consume(&b, &id).await, 2);
    assert!(b.flush(&id).await.unwrap()); // written by b: a does not know
    let record = counters.read(&id).await.unwrap().unwrap();
    let doc = ledger.read(&id).await.unwrap().unwrap();
    assert_eq!((doc.used, doc.watermark), (Some(2), Some(2)));
    let new_epoch = quotad::storage::new_epoch();
    assert!(
        counters
            .rebase(
                &id,
                &record.epoch,
                &new_epoch,
                &quotad::storage::RebaseOnto {
                    used: 2,
                    watermark: 2,
                    keys: &[],
                    mark: quotad::storage::RebaseMark::Keep
                }
            )
            .await
            .unwrap()
    );
    let rebased = counters.read(&id).await.unwrap().unwrap();
    assert_eq!((rebased.used, rebased.from_watermark), (2, Some(2)), "{rebased:?}");
    ledger.panic_next_write.store(true, Ordering::SeqCst);
    assert!(a.flush(&id).await.unwrap(), "nothing to write");
    ledger.panic_next_write.store(false, Ordering::SeqCst);
    assert!(a.writer().held(&id, None).is_empty());
    assert_eq!(consume(&a, &id).await, 3);
    assert!(a.flush(&id).await.unwrap());
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(3));
}

/// Once Redis answers again, while this replica's decisions are still away from it, its
/// held changes do not take their document from a record another replica (back on Redis
/// already) has loaded since: they wait for the reconcile, which writes them under a fence.
async fn held_changes_wait_for_the_reconcile_once_redis_answers(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let (a, b) = (
        service(counters.clone(), ledger.clone()),
        service(counters.clone(), ledger.clone()),
    );
    let id = p("answers");
    held_then_lost(&a, counters.as_ref(), &id).await;
    a.redis_down("test");
    a.note_redis_answers(true);
    assert_eq!(consume(&b, &id).await, 1, "b, back on Redis, loads from the document");
    quotad::domain::writer::sweep(&a).await;
    assert_eq!(a.writer().held(&id, None).len(), 1, "kept for the reconcile");
    assert!(b.flush(&id).await.unwrap());
    assert!(counters.read(&id).await.unwrap().is_some(), "b's record is not stale");
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(1));
}

/// While Redis is away, a replica's sweep writes what its changes left there, so that
/// another replica's fallback counts them (not only this replica's own next fallback).
async fn the_sweep_writes_held_changes_while_redis_is_away(counters: Arc<dyn Counters>, ledger: Arc<Gated>) {
    let (a, b) = (
        service(counters.clone(), ledger.clone()),
        service(counters.clone(), ledger.clone()),
    );
    let id = p("swept");
    assert_eq!(consume(&a, &id).await, 1); // held by a, not written yet
    a.redis_down("test");
    b.redis_down("test");
    quotad::domain::writer::sweep(&a).await;
    assert!(a.writer().held(&id, None).is_empty());
    assert_eq!(consume(&b, &id).await, 2, "b's fallback counts a's unit");
}

async fn memory() -> (Arc<dyn Counters>, Arc<Gated>) {
    (
        Arc::new(memory::MemoryCounters::default()),
        Gated::new(Arc::new(memory::MemoryLedger::default())),
    )
}

async fn real() -> (Arc<dyn Counters>, Arc<Gated>) {
    let (redis, ledger) = real_redis();
    (redis, ledger)
}

/// [`real`], with the Redis adapter's own type (to look inside Redis).
fn real_redis() -> (Arc<RedisCounters>, Arc<Gated>) {
    let _ = emulator_host();
    let counters = RedisCounters::new(&redis_url(), &(unique("h") + ":")).unwrap();
    let ledger = FirestoreLedger::new(&unique("handover-"), "providers");
    (Arc::new(counters), Gated::new(Arc::new(ledger)))
}

on_both!(a_fallback_in_flight_holds_its_provider: memory_holds_a_provider_whose_fallback_is_in_flight, redis_holds_a_provider_whose_fallback_is_in_flight);

on_both!(a_fallback_whose_mark_a_failed_reconcile_cleared_holds_its_provider: memory_holds_a_provider_whose_mark_a_failed_reconcile_cleared, redis_holds_a_provider_whose_mark_a_failed_reconcile_cleared);

on_both!(a_dropped_fallback_holds_its_provider_until_it_lands: memory_holds_a_dropped_fallbacks_provider_until_it_lands, redis_holds_a_dropped_fallbacks_provider_until_it_lands);

on_both!(a_dead_holders_fence_expires: memory_lets_a_dead_holders_fence_expire, redis_lets_a_dead_holders_fence_expire);

on_both!(a_slow_decision_keeps_its_fence: memory_renews_the_fence_of_a_slow_decision, redis_renews_the_fence_of_a_slow_decision);

on_both!(a_fallback_marks_the_record_outdated_until_the_recovery: memory_marks_a_fallbacks_record_outdated_until_the_recovery, redis_marks_a_fallbacks_record_outdated_until_the_recovery);

on_both!(held_changes_of_a_lost_epoch_leave_a_newer_record_its_document: memory_leaves_a_newer_record_its_document, redis_leaves_a_newer_record_its_document);

on_both!(held_changes_a_rebase_carried_are_released: memory_releases_held_changes_a_rebase_carried, redis_releases_held_changes_a_rebase_carried);

on_both!(held_changes_of_a_lost_epoch_reach_the_document: memory_writes_held_changes_of_a_lost_epoch, redis_writes_held_changes_of_a_lost_epoch);

on_both!(held_changes_wait_for_the_reconcile_once_redis_answers: memory_keeps_held_changes_for_the_reconcile, redis_keeps_held_changes_for_the_reconcile);

on_both!(the_sweep_writes_held_changes_while_redis_is_away: memory_sweep_writes_held_changes_while_redis_is_away, redis_sweep_writes_held_changes_while_redis_is_away);

on_both!(a_record_kept_dirty_past_its_ttl_is_rebased: memory_rebases_a_record_kept_dirty_past_its_ttl, redis_rebases_a_record_kept_dirty_past_its_ttl);

/// A record an older quotad loaded has no load time. Turned clean, it gets one (its TTL
/// runs from then, not from each write); kept dirty, the next write rebases it (and so
/// gives it one): a busy provider's record never stays without a reload for good.
#[tokio::test]
async fn redis_gives_a_record_of_an_older_quotad_its_load_time() {
    let (redis, ledger) = real_redis();
    let a = QuotaService::new(
        redis.clone(),
        ledger.clone(),
        100,
        Duration::from_secs(300),
        Phase::DualWrite,
    );
    let id = p("old");
    let as_an_older_quotad_wrote_it = || async {
        let hdel = ::redis::cmd("HDEL").arg(redis.keys().record(&id)).arg("at").clone();
        let removed: u64 = redis.query(hdel).await.unwrap();
        assert_eq!(removed, 1);
        assert_eq!(redis.read(&id).await.unwrap().unwrap().loaded_ms, None);
    };
    assert_eq!(consume(&a, &id).await, 1);
    as_an_older_quotad_wrote_it().await;
    assert!(a.flush(&id).await.unwrap());
    let clean = redis.read(&id).await.unwrap().unwrap();
    assert!(clean.loaded_ms.is_some(), "turned clean: {clean:?}");
    assert_eq!(consume(&a, &id).await, 2);
    as_an_older_quotad_wrote_it().await;
    *ledger.busy.lock().unwrap() = Some((redis.clone(), id.clone()));
    assert!(!a.flush(&id).await.unwrap(), "kept dirty");
    *ledger.busy.lock().unwrap() = None;
    let rebased = redis.read(&id).await.unwrap().unwrap();
    assert!(
        rebased.loaded_ms.is_some() && rebased.epoch != clean.epoch,
        "rebased: {rebased:?}"
    );
    assert!(a.flush(&id).await.unwrap());
    let others = ledger.busy_units.load(Ordering::SeqCst);
    assert_eq!(ledger.read(&id).await.unwrap().unwrap().used, Some(2 + others));
}

on_both!(a_load_read_before_a_fenced_decision_is_refused: memory_refuses_a_load_read_before_a_fenced_decision, redis_refuses_a_load_read_before_a_fenced_decision);

on_both!(decisions_wait_for_a_fence_then_go_back_to_redis: memory_decisions_wait_for_a_fence_then_go_back_to_redis, redis_decisions_wait_for_a_fence_then_go_back_to_redis);

on_both!(a_firestore_only_decision_meeting_a_busy_record_decides_in_redis: memory_decides_a_busy_record_in_redis, redis_decides_a_busy_record_in_redis);

/// Decisions waiting for a recovery go on as soon as it ends, whichever way, not when their
/// wait runs out (paused time: the clock moves only while every task waits for a timer, so
/// a decision left to its deadline would show 1.2 s gone).
#[tokio::test(start_paused = true)]
async fn memory_wakes_recovery_waiters_when_it_ends() {
    let (counters, ledger) = memory().await;
    let quotas = service(counters, ledger);
    quotas.redis_down("test");
    // past the first moments of the outage, in which a dual-write fallback waits anyway
    tokio::time::sleep(quotad::domain::handover::OUTAGE_GRACE).await;
    for how in ["a failed round", "a failed probe", "Redis back"] {
        quotas.note_redis_answers(true); // a probe found Redis answering
        quotas.redis_answers();
        let decision = spawn_consume(&quotas, &p(&how.replace(' ', "-")));
        until(|| quotas.recovery_waiting() == 1, "the consume waits").await;
        let ended = tokio::time::Instant::now();
        match how {
            "a failed round" => quotas.recovery_failed(quotas.recovery_round()),
            "a failed probe" => quotas.end_recovery(),
            _ => quotas.redis_recovered(),
        }
        assert_eq!(decision.await.unwrap(), 1);
        assert!(
            ended.elapsed() < Duration::from_millis(100),
            "woken by {how} after {:?}",
            ended.elapsed()
        );
    }
}

on_both!(a_failed_round_ends_only_its_own_recovery: memory_ends_only_a_failed_rounds_own_recovery, redis_ends_only_a_failed_rounds_own_recovery);

on_both!(redis_going_down_again_ends_the_wait: memory_ends_the_wait_when_redis_goes_down_again, redis_ends_the_wait_when_redis_goes_down_again);

/// A phase mirror gone stale (Redis restored from an older snapshot) is mended by the next
/// refresh of the phase from the ledger.
#[tokio::test]
async fn a_stale_phase_mirror_is_mended_by_the_next_refresh() {
    let (counters, ledger) = memory().await;
    let a = service(counters.clone(), ledger.clone());
    let (_, since) = a.set_phase(Phase::RedisPrimary).await.unwrap();
    let older = since - chrono::Duration::hours(1);
    counters.set_phase_mirror(Phase::DualWrite, older).await.unwrap();
    a.refresh_phase().await.unwrap();
    let mirrored = counters.phase_mirror().await.unwrap().unwrap();
    assert_eq!(mirrored.0, Phase::RedisPrimary);
}

/// A cut-off replica's fallback consumes of a provider that arrive together share one
/// announcement and its wait: each decides 0.3 s after it, none before. A refund neither
/// announces nor waits; a consume after a pause of more than 1.5 s announces again.
/// (Paused time: the clock moves only while every task waits for a timer.)
#[tokio::test(start_paused = true)]
async fn memory_fallbacks_share_one_announcement_and_wait_for_it() {
    use quotad::domain::handover::OUTAGE_GRACE;
    let (counters, ledger) = memory().await;
    let a = service(counters, ledger.clone());
    let id = p("announced-once");
    a.redis_down("cut off"); // and no ping answered since
    tokio::time::sleep(OUTAGE_GRACE).await; // past the outage's first moments: no grace
    let start = tokio::time::Instant::now();
    let consumes: Vec<_> = (0..5).map(|_| spawn_consume(&a, &id)).collect();
    let mut used: Vec<i64> = Vec::new();
    for consume in consumes {
        used.push(consume.await.unwrap());
    }
    used.sort_unstable();
    assert_eq!(used, [1, 2, 3, 4, 5]);
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(300),
        "one wait, from the announcement"
    );
    assert_eq!(ledger.announcements.load(Ordering::SeqCst), 1);
    let refund = tokio::time::Instant::now();
    let refunded = a.change(&id, quotad::storage::Op::Refund, 1, None).await.unwrap();
    assert!(matches!(refunded, Outcome::Decided(d) if d.used == 4), "{refunded:?}");
    assert_eq!(refund.elapsed(), Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = tokio::time::Instant::now();
    assert_eq!(consume(&a, &id).await, 5);
    assert_eq!(again.elapsed(), Duration::from_millis(300));
    assert_eq!(ledger.announcements.load(Ordering::SeqCst), 2);
}

/// Another replica finds Redis gone a little after this one (its own call timed out
/// later) and then writes what its changes left there: a `dual-write` fallback in the
/// first moments of the outage waits for the rest of `OUTAGE_GRACE`, and counts them.
/// Later fallbacks, and those of `redis-primary` (which holds nothing), do not wait.
/// (Paused time: the clock moves only while every task waits for a timer.)
#[tokio::test(start_paused = true)]
async fn memory_a_fallback_waits_for_what_other_replicas_hold_when_redis_goes() {
    use quotad::domain::handover::OUTAGE_GRACE;
    let (counters, ledger) = memory().await;
    let (a, b) = (service(counters.clone(), ledger.clone()), service(counters, ledger));
    let id = p("shared");
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap()); // the document is in the record's epoch
    for used in 2..=3 {
        assert_eq!(consume(&a, &id).await, used); // in Redis; no writer runs: `a` holds them
    }
    let start = tokio::time::Instant::now();
    b.redis_down("test");
    let from_b = spawn_consume(&b, &id);
    tokio::time::sleep(OUTAGE_GRACE / 4).await;
    a.redis_down("test"); // writes what it holds
    assert_eq!(from_b.await.unwrap(), 4, "the fallback counts a's 3 units");
    assert_eq!(start.elapsed(), OUTAGE_GRACE);

    let later = tokio::time::Instant::now();
    assert_eq!(consume(&b, &id).await, 5);
    assert!(later.elapsed() < Duration::from_millis(10), "{:?}", later.elapsed());

    // A recovery that ends while a fallback waits out the grace holds its provider back
    // from Redis until the decision has landed (here, with no hand-back task, until the
    // next decision's wait runs out and Firestore decides it, fenced).
    let (counters, ledger) = memory().await;
    let c = service(counters, ledger);
    let q = p("q");
    assert_eq!(consume(&c, &q).await, 1);
    c.redis_down("test");
    let fallback = spawn_consume(&c, &q);
    tokio::time::sleep(OUTAGE_GRACE / 4).await;
    c.redis_answers();
    c.redis_recovered();
    let next = spawn_consume(&c, &q);
    assert_eq!(fallback.await.unwrap(), 2);
    assert_eq!(
        next.await.unwrap(),
        3,
        "Redis decided from a record without the fallback"
    );

    let (counters, ledger) = memory().await;
    let primary = in_phase(counters, ledger, Phase::RedisPrimary);
    primary.redis_down("test");
    let start = tokio::time::Instant::now();
    assert_eq!(consume(&primary, &id).await, 1);
    assert!(start.elapsed() < Duration::from_millis(10), "{:?}", start.elapsed());
}

/// Redis flapping while Firestore hangs starts one write of what a replica holds, not one
/// a transition, each waiting on Firestore; a transition while it runs has it go round
/// again once Firestore answers, so what was held since reaches the document too.
#[tokio::test(start_paused = true)]
async fn memory_one_write_of_what_is_held_runs_however_often_redis_goes() {
    let (counters, ledger) = memory().await;
    let a = service(counters, ledger.clone());
    let (x, y) = (p("x"), p("y"));
    for id in [&x, &y] {
        assert_eq!(consume(&a, id).await, 1);
        assert!(a.flush(id).await.unwrap()); // the documents are in the records' epochs
    }
    assert_eq!(consume(&a, &x).await, 2); // held: no writer runs here
    ledger.hold_writes.store(true, Ordering::SeqCst);
    a.redis_down("test");
    ledger.entered.notified().await; // the first round's write of x hangs
    for used in 2..=6 {
        a.redis_answers();
        a.redis_recovered();
        assert!(a.redis_is_up());
        assert_eq!(consume(&a, &y).await, used); // in Redis, held
        a.redis_down("test");
    }
    // With time paused, a sleep ends only once every task waits: any other write started
    // by the transitions above has reached the gate by then.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ledger.writing.load(Ordering::SeqCst), 1, "one write at a time");

    ledger.hold_writes.store(false, Ordering::SeqCst);
    ledger.writes_open.add_permits(1);
    until(
        || ledger.writing.load(Ordering::SeqCst) == 0,
        "the write ends, and the round after it",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await; // every task idle again
    assert_eq!(ledger.read(&x).await.unwrap().unwrap().used, Some(2));
    assert_eq!(
        ledger.read(&y).await.unwrap().unwrap().used,
        Some(6),
        "the round after the hung one wrote what was held since"
    );

    // Done: the next transition starts a write again.
    a.redis_answers();
    a.redis_recovered();
    assert_eq!(consume(&a, &x).await, 3);
    a.redis_down("test");
    until(
        || a.writer().held_providers().is_empty(),
        "the next transition writes x",
    )
    .await;
    assert_eq!(ledger.read(&x).await.unwrap().unwrap().used, Some(3));

    // A write that panics ends its task, and the next transition writes again.
    a.redis_answers();
    a.redis_recovered();
    assert_eq!(consume(&a, &x).await, 4);
    ledger.panic_next_write.store(true, Ordering::SeqCst);
    a.redis_down("test");
    until(
        || !ledger.panic_next_write.load(Ordering::SeqCst),
        "the write that panics",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await; // the task has ended
    a.redis_answers();
    a.redis_recovered();
    a.redis_down("test");
    until(
        || a.writer().held_providers().is_empty(),
        "the transition after a panicked write writes x",
    )
    .await;
    assert_eq!(ledger.read(&x).await.unwrap().unwrap().used, Some(4));
}

/// A probe's ping sent before a call failed says nothing of the Redis after it (a hung
/// Redis answers what it read before it hung): its answer begins no recovery, and a later
/// ping's does.
#[tokio::test]
async fn memory_an_answer_older_than_a_failed_call_begins_no_recovery() {
    let (counters, ledger) = memory().await;
    let a = service(counters, ledger);
    let sent = a.failures();
    a.redis_down("a decision's call fails while the probe's pings are out");
    a.probed(true, true, sent);
    assert!(!a.redis_answering());
    assert_eq!(a.recovery_round(), 0, "a recovery began on a stale answer");

    let sent = a.failures();
    a.probed(true, false, sent);
    assert!(a.redis_answering());
    assert_eq!(a.recovery_round(), 0, "Firestore does not answer");
    a.probed(true, true, sent);
    assert_ne!(a.recovery_round(), 0, "both answer since the last failure");

    let sent = a.failures();
    a.redis_down("another call fails");
    a.probed(true, true, sent);
    assert_eq!(a.recovery_round(), 0, "a stale answer ends the recovery");

    a.redis_recovered();
    assert!(a.redis_is_up());
    a.probed(false, true, a.failures());
    assert!(!a.redis_is_up(), "a ping that fails takes Redis down");
    assert!(!a.redis_answering());
}

/// A link to Redis that comes back for one ping and drops again before the reconcile round:
/// the failed round leaves this replica "not answering", so that its next fallbacks mark
/// their documents again (otherwise another replica, on Redis, would decide beside them
/// unwarned). Real Redis behind a proxy, and the emulator.
#[tokio::test]
async fn a_round_that_loses_redis_again_leaves_fallbacks_marking_documents() {
    let _ = emulator_host();
    let port: u16 = std::env::var("QUOTAD_TEST_REDIS_PORT").unwrap().parse().unwrap();
    let mut proxy = crate::helpers::TcpProxy::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let counters =
        Arc::new(RedisCounters::new(&format!("redis://{}/", proxy.address()), &(unique("h") + ":")).unwrap());
    let ledger = Gated::new(Arc::new(FirestoreLedger::new(&unique("handover-"), "providers")));
    let a = service(counters.clone(), ledger.clone());
    counters.ping().await.unwrap();
    let (id, other) = (p("flap"), p("flap-other"));
    assert_eq!(consume(&a, &id).await, 1);
    assert!(a.flush(&id).await.unwrap());
    proxy.set_up(false).await;
    assert_eq!(consume(&a, &other).await, 1); // a fallback
    assert!(!a.redis_answering());
    // One ping gets through (as the health task's probe would send it) ...
    proxy.set_up(true).await;
    let before = a.failures();
    counters.ping().await.unwrap();
    a.probed(true, true, before);
    assert!(a.redis_answering());
    let round = a.recovery_round();
    assert_ne!(round, 0, "a recovery is on");
    // ... and the link is gone again for the round (what `startup::reconcile` does).
    proxy.set_up(false).await;
    let err = a.reconcile().await.expect_err("the round needs Redis");
    a.round_failed(round, &err);
    assert!(!a.redis_answering());
    assert_eq!(consume(&a, &id).await, 2); // a fallback, which marks its document
    let doc = ledger.read(&id).await.unwrap().unwrap();
    assert!(doc.fallback.is_some(), "{doc:?}");
}
