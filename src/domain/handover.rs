//! Handing providers back to Redis (DESIGN.md invariant 6).
//!
//! While Redis is away, Firestore decides, and each decision marks its provider "changed
//! outside" so that Redis reloads the record before it decides for it again. The reconcile
//! task lists those marks, reloads the records and only then lets Redis decide. But a
//! decision still in flight at that moment writes its mark after the listing (or a
//! reconcile that failed partway cleared its mark before it landed), and Redis would
//! decide from a record that misses it until the next periodic reconcile.
//!
//! So this replica counts its Firestore fallbacks per provider. When Redis comes back (or
//! when one starts while Redis is up: a flap), the providers they were for since Redis
//! went down are *held*: Redis decides for a held provider only after its decisions have
//! landed and its record has been reloaded. A decision for a held provider waits for that
//! (at most [`HOLD_LIMIT`], then Firestore decides it). Other providers go back to Redis
//! at once, so a busy provider cannot keep the whole replica on Firestore.
//!
//! Other replicas' fallbacks are caught by their fences while they are in flight (where
//! Redis takes the call), then by their marks, which the periodic reconcile reloads within
//! 5 s.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

use super::ProviderId;

/// How long a decision waits, in all, before Redis decides it: for a recovery in progress
/// (see `QuotaService::await_recovery`), then for its held provider; after that Firestore
/// decides it. With a Redis call's own timeout (0.8 s) it stays within API.md's 2 s.
pub const HOLD_LIMIT: Duration = Duration::from_millis(1200);

/// In `dual-write`, how long after Redis went down a replica's Firestore decisions wait
/// for the other replicas to write the changes their writers had not carried yet (see
/// `QuotaService::outage_grace`): their calls time out about when this one's did, and a
/// write takes a Firestore transaction. Within [`HOLD_LIMIT`] of the decision's start.
pub const OUTAGE_GRACE: Duration = Duration::from_millis(400);

#[derive(Debug, Default)]
struct Entry {
    /// Firestore decisions for this provider not yet finished.
    in_flight: usize,
    /// Whether Redis must reload the record before it decides for the provider again.
    reload: bool,
    /// While decisions are in flight: what says they have all landed (see
    /// [`InFlight::first`]).
    landed: Option<Arc<Notify>>,
}

/// Whether Redis decides, and which providers it may not decide for yet.
#[derive(Debug)]
pub struct Handover {
    /// Whether Redis decides (the breaker). Set up only under `entries`' lock (set down
    /// without it).
    up: AtomicBool,
    entries: Mutex<HashMap<ProviderId, Entry>>,
    /// Whether `entries` has any: the hot path's only cost while nothing is held.
    any: AtomicBool,
    /// Bumped when providers are released or Redis goes down: waiters look again.
    released: watch::Sender<u64>,
    /// Wakes the task that reloads held providers whose decisions have landed.
    ready: Notify,
    waiting: AtomicUsize,
}

impl Default for Handover {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
            entries: Mutex::default(),
            any: AtomicBool::new(false),
            released: watch::channel(0).0,
            ready: Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// One Firestore decision in flight; finishing it (or dropping it: a cancelled request)
/// updates its provider's entry.
#[must_use]
pub struct InFlight<'a> {
    handover: &'a Handover,
    provider: ProviderId,
    first: Option<Arc<Notify>>,
}

impl InFlight<'_> {
    /// For the first of its provider's decisions in flight (none were): what is notified
    /// once the last of them has landed (a fallback's fence lasts as long, see
    /// `QuotaService::change_in_ledger`).
    pub fn first(&self) -> Option<Arc<Notify>> {
        self.first.clone()
    }
}

impl Handover {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Marks Redis down; returns whether it was up. Waiters look again (and decide from
    /// Firestore).
    pub fn go_down(&self) -> bool {
        let was_up = self.up.swap(false, Ordering::AcqRel);
        if was_up {
            self.released.send_modify(|g| *g += 1);
        }
        was_up
    }

    /// Lets Redis decide again, after a reconcile: every provider Firestore decided for
    /// since Redis went down is held until reloaded, those still deciding until their
    /// decisions land. (A reconcile lists marks, but one that failed partway may have
    /// cleared a mark while its decision was still in flight, and another replica may
    /// have loaded the record before it landed.) Returns whether Redis was down.
    pub fn go_up(&self) -> bool {
        let mut entries = self.entries.lock().unwrap();
        let mut ready = false;
        for entry in entries.values_mut() {
            entry.reload = true;
            ready |= entry.in_flight == 0;
        }
        self.any.store(!entries.is_empty(), Ordering::Release);
        let was_up = self.up.swap(true, Ordering::AcqRel);
        drop(entries);
        if ready {
            self.ready.notify_one();
        }
        !was_up
    }

    /// Counts a Firestore decision for `provider` until the returned guard drops.
    pub fn begin(&self, provider: &ProviderId) -> InFlight<'_> {
        let mut entries = self.entries.lock().unwrap();
        let up = self.up.load(Ordering::Acquire);
        let entry = entries.entry(provider.clone()).or_default();
        let first = (entry.in_flight == 0).then(|| entry.landed.insert(Arc::new(Notify::new())).clone());
        entry.in_flight += 1;
        entry.reload |= up;
        self.any.store(true, Ordering::Release);
        InFlight {
            handover: self,
            provider: provider.clone(),
            first,
        }
    }

    fn finish(&self, provider: &ProviderId) {
        let mut entries = self.entries.lock().unwrap();
        let Some(entry) = entries.get_mut(provider) else {
            return;
        };
        entry.in_flight -= 1;
        if entry.in_flight == 0
            && let Some(landed) = entry.landed.take()
        {
            landed.notify_one(); // kept for its waiter if it is not waiting yet
        }
        if entry.in_flight == 0 && entry.reload {
            drop(entries);
            self.ready.notify_one();
        }
        // Finished while Redis is down: held at the recovery.
    }

    /// Waits until Redis may decide for `provider`: `true` when it may, `false` when
    /// Firestore should decide (Redis went down, or the hold lasted until `deadline`).
    pub async fn clear_for(&self, provider: &ProviderId, deadline: tokio::time::Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return true;
        }
        loop {
            let mut released = {
                let entries = self.entries.lock().unwrap();
                if !entries.contains_key(provider) {
                    return self.is_up();
                }
                self.released.subscribe()
            };
            if !self.is_up() {
                return false;
            }
            let _waiting = Waiting::new(&self.waiting);
            if tokio::time::timeout_at(deadline, released.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Decisions waiting for a held provider (tests synchronise on it).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether `provider` is tracked (a Firestore decision in flight or a reload pending).
    pub fn is_held(&self, provider: &ProviderId) -> bool {
        self.entries.lock().unwrap().contains_key(provider)
    }

    /// Held providers whose decisions have all landed: each needs its reload.
    pub fn ready(&self) -> Vec<ProviderId> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .filter(|(_, e)| e.in_flight == 0 && e.reload)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Waits until some held provider may be ready.
    pub async fn ready_changed(&self) {
        self.ready.notified().await;
    }

    /// Releases `provider` after its reload, unless a new decision for it started
    /// meanwhile (its end makes it ready again).
    pub fn reloaded(&self, provider: &ProviderId) {
        let mut entries = self.entries.lock().unwrap();
        if entries.get(provider).is_some_and(|e| e.in_flight == 0) {
            entries.remove(provider);
        }
        self.any.store(!entries.is_empty(), Ordering::Release);
        drop(entries);
        self.released.send_modify(|g| *g += 1);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.handover.finish(&self.provider);
    }
}

/// Counts one waiting decision in `count` while it lives (a cancelled wait included).
pub struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
