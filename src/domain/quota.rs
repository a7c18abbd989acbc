//! The quota service: decides consumes and refunds, answers lookups, and keeps Redis and
//! Firestore level according to the phase.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{
    Phase, ProviderId,
    handover::{HOLD_LIMIT, Handover, InFlight, OUTAGE_GRACE, Waiting},
    writer::Writer,
};
use crate::storage::{
    Applied, Change, Counters, Decision, Document, EXACT_MAX, Fallback, FallbackMark, IdempotencyEntry, KeyRecord,
    Ledger, LedgerDecision, Op, RebaseMark, RebaseOnto, Record, Seed, Settled, StorageError, Synced, Unanswered,
    WriteOutcome, exact, idempotency_id, new_epoch,
};
use crate::telemetry::Cached;

/// Where a lookup was answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Store,
}

/// A provider's quota as a lookup answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaView {
    pub used: i64,
    pub limit: i64,
    pub source: Source,
}

/// A decided consume or refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Decided(Decision),
    /// The first answer of a retried request (same idempotency key and amount).
    Replayed(Decision),
}

/// Why the service could not decide.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("idempotency key reused with another amount")]
    KeyReused,
    #[error("a dependency is unavailable: {0}")]
    Unavailable(StorageError),
    #[error("storage error: {0}")]
    Internal(StorageError),
}

impl From<StorageError> for QuotaError {
    fn from(err: StorageError) -> Self {
        if err.is_unavailable() {
            QuotaError::Unavailable(err)
        } else {
            QuotaError::Internal(err)
        }
    }
}

/// Quota decisions by op, phase and outcome; cache lookups that hit.
static DECISIONS: Cached<metrics::Counter, 18> = Cached::new();
static CACHE: Cached<metrics::Counter, 1> = Cached::new();

/// Shared state of one replica's quota decisions.
pub struct QuotaService {
    counters: Arc<dyn Counters>,
    ledger: Arc<dyn Ledger>,
    default_limit: i64,
    cache_ttl: Duration,
    phase: watch::Sender<(Phase, DateTime<Utc>)>,
    /// Whether the phase was read from the ledger (or its mirror), not taken from config.
    phase_stored: std::sync::atomic::AtomicBool,
    /// Whether Redis decides, and the providers it may not decide for yet.
    handover: Handover,
    writer: Writer,
    /// The id of the Redis data set this replica last saw (see `check_redis_data`).
    known_sentinel: std::sync::Mutex<Option<String>>,
    /// Decisions waiting for a fence to lift (see `change_in_redis`).
    fence_waiting: std::sync::atomic::AtomicUsize,
    /// Providers whose record a fallback is marking outdated (one mark in flight each),
    /// with whether another fallback landed since that mark was sent (it is sent again).
    marking: std::sync::Mutex<std::collections::HashMap<ProviderId, bool>>,
    /// Providers this replica, cut off from Redis, has announced its fallbacks for (see
    /// [`QuotaService::announce`]): until when its decisions wait, and when it last decided.
    announced: std::sync::Mutex<std::collections::HashMap<ProviderId, Announced>>,
    /// Other replicas' fallback marks [`QuotaService::watch_marks`] has acted on, by
    /// provider: the newest one's time (ms), kept while it is recent.
    marks_seen: std::sync::Mutex<std::collections::HashMap<ProviderId, i64>>,
    /// Redis is down for decisions, but a probe has found it (and Firestore) answering:
    /// the reconcile that brings decisions back runs, and decisions wait for it (see
    /// [`QuotaService::await_recovery`]). 0 when no recovery is on, else which one (from
    /// `recoveries`), so that a reconcile round that fails ends only a recovery that was
    /// on when it began, not one a probe began meanwhile.
    recovering: std::sync::atomic::AtomicU64,
    /// Recoveries begun.
    recoveries: std::sync::atomic::AtomicU64,
    /// Wakes decisions waiting for the recovery when it ends, either way.
    recovery: tokio::sync::Notify,
    /// Decisions waiting for the recovery (tests synchronise on it).
    recovery_waiting: std::sync::atomic::AtomicUsize,
    /// Wakes the health task when Redis goes down (it probes at once).
    went_down: tokio::sync::Notify,
    /// When Redis last went down for this replica's decisions (see
    /// [`QuotaService::outage_grace`]).
    down_since: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Failed calls to Redis, times two ([`QuotaService::failures`]), plus one while Redis
    /// has answered the health task's last ping and no call has failed since
    /// ([`QuotaService::redis_answering`]). One word, so that a ping answered and a call
    /// failing at the same moment cannot leave "answering" after the failure.
    redis_seen: std::sync::atomic::AtomicU64,
    /// Down transitions since the running write of everything held began (see
    /// [`QuotaService::write_held_now`]), 0 while none runs: it ends after a round that
    /// began after the last of them.
    held_writes: std::sync::atomic::AtomicU64,
    /// Wakes the reconcile when a probe finds Redis and Firestore answering while decisions
    /// are away from Redis (it runs at once).
    answers: tokio::sync::Notify,
    /// Usage of unanswered calls to take out of the ledger, with the document epoch it is
    /// in (see [`QuotaService::settle_unanswered`]), forgotten by Redis already: kept here
    /// until the ledger has it. Held by the settlement that runs.
    unsettled: tokio::sync::Mutex<Vec<(ProviderId, i64, String)>>,
    /// This replica's id in the fallback marks it leaves in documents (random per process).
    replica: String,
    /// This service, for the tasks Firestore decisions run in.
    me: std::sync::Weak<QuotaService>,
}

impl QuotaService {
    pub fn new(
        counters: Arc<dyn Counters>,
        ledger: Arc<dyn Ledger>,
        default_limit: i64,
        cache_ttl: Duration,
        initial_phase: Phase,
    ) -> Arc<Self> {
        let (phase, _) = watch::channel((initial_phase, Utc::now()));
        Arc::new_cyclic(|me| Self {
            counters,
            ledger,
            default_limit,
            cache_ttl,
            phase,
            phase_stored: std::sync::atomic::AtomicBool::new(false),
            handover: Handover::default(),
            writer: Writer::default(),
            known_sentinel: std::sync::Mutex::new(None),
            fence_waiting: std::sync::atomic::AtomicUsize::new(0),
            marking: std::sync::Mutex::default(),
            announced: std::sync::Mutex::default(),
            marks_seen: std::sync::Mutex::default(),
            recovering: std::sync::atomic::AtomicU64::new(0),
            recoveries: std::sync::atomic::AtomicU64::new(0),
            recovery_waiting: std::sync::atomic::AtomicUsize::new(0),
            recovery: tokio::sync::Notify::new(),
            went_down: tokio::sync::Notify::new(),
            down_since: std::sync::Mutex::new(None),
            redis_seen: std::sync::atomic::AtomicU64::new(1), // no failure, answering
            held_writes: std::sync::atomic::AtomicU64::new(0),
            answers: tokio::sync::Notify::new(),
            unsettled: tokio::sync::Mutex::default(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            me: me.clone(),
        })
    }

    pub fn counters(&self) -> &Arc<dyn Counters> {
        &self.counters
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    pub fn cache_ttl(&self) -> Duration {
        self.cache_ttl
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    pub fn phase(&self) -> (Phase, DateTime<Utc>) {
        *self.phase.borrow()
    }

    /// Adopts a phase read from the ledger (every replica polls it).
    pub fn follow_phase(&self, phase: Phase, since: DateTime<Utc>) {
        self.phase_stored.store(true, std::sync::atomic::Ordering::Relaxed);
        self.phase.send_if_modified(|current| {
            if current.0 == phase && current.1 == since {
                return false;
            }
            if current.0 != phase {
                tracing::info!(from = %current.0, to = %phase, "phase changed");
                metrics::counter!("quotad_phase_changes_total", "to" => phase.as_str()).increment(1);
            }
            *current = (phase, since);
            true
        });
    }

    /// Reads the stored phase and adopts it (none stored: this replica's own stays), and
    /// mirrors it in Redis. When the ledger cannot be read, adopts the mirror instead if it
    /// is newer than what this replica knows.
    pub async fn refresh_phase(&self) -> Result<(Phase, DateTime<Utc>), StorageError> {
        match self.ledger.phase().await {
            Ok(Some((phase, since))) => {
                self.follow_phase(phase, since);
                self.mirror_phase(phase, since).await;
            }
            Ok(None) => {}
            Err(err) => {
                self.adopt_mirrored_phase().await;
                return Err(err);
            }
        }
        Ok(self.phase())
    }

    /// Writes the phase read from the ledger to the Redis mirror unless the mirror holds it
    /// already (one read a refresh): a mirror that went stale (Redis restored from an old
    /// snapshot, or a write that raced a phase change) is mended within a refresh.
    async fn mirror_phase(&self, phase: Phase, since: DateTime<Utc>) {
        use chrono::SubsecRound;
        let since = since.trunc_subsecs(6); // what the mirror keeps
        match self.counters.phase_mirror().await {
            Ok(Some(mirrored)) if mirrored == (phase, since) => return,
            Ok(_) => {}
            Err(err) => return tracing::debug!(error = %err, "reading the phase mirrored in Redis failed"),
        }
        if let Err(err) = self.counters.set_phase_mirror(phase, since).await {
            tracing::debug!(error = %err, "mirroring the phase in Redis failed");
        }
    }

    /// Adopts the phase mirrored in Redis when this replica has read none from the ledger
    /// (`QUOTAD_PHASE` is only for when none is stored), or the mirror is newer.
    pub async fn adopt_mirrored_phase(&self) {
        match self.counters.phase_mirror().await {
            Ok(Some((phase, since))) => {
                let stored = self.phase_stored.load(std::sync::atomic::Ordering::Relaxed);
                if !stored || since > self.phase().1 {
                    tracing::info!(%phase, "the ledger cannot be read: following the phase mirrored in Redis");
                    self.follow_phase(phase, since);
                }
            }
            Ok(None) => {}
            Err(err) => tracing::debug!(error = %err, "reading the phase mirrored in Redis failed"),
        }
    }

    /// Stores a new phase durably and adopts it. The caller has refreshed the phase: this
    /// replica's view may be a poll behind the stored one.
    pub async fn set_phase(&self, phase: Phase) -> Result<(Phase, DateTime<Utc>), QuotaError> {
        let (current, since) = self.phase();
        if current == phase {
            return Ok((current, since));
        }
        let since = Utc::now();
        self.ledger.set_phase(phase, since).await?;
        self.follow_phase(phase, since);
        self.mirror_phase(phase, since).await;
        Ok((phase, since))
    }

    pub fn redis_is_up(&self) -> bool {
        self.handover.is_up()
    }

    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// Marks Redis down after a failed call: decisions go to Firestore until the health
    /// task sees it answer again (and has reloaded what Firestore changed meanwhile).
    fn redis_failed(&self, err: &StorageError) {
        self.redis_down(&err.to_string());
    }

    /// A call of the writer or the sweep failed: when Redis did not answer, it is down for
    /// this replica as after a decision's failed call, and what this replica holds goes to
    /// Firestore at once (see [`QuotaService::redis_down`]); other replicas, whose calls fail
    /// too, decide there from now.
    pub fn background_call_failed(&self, err: &StorageError) {
        if err.is_unavailable() && err.is_redis() {
            self.redis_failed(err);
        }
    }

    /// A decision's Redis call failed: Redis is marked down and the decision goes to
    /// Firestore (counted as a fallback).
    fn decision_falls_back(&self, err: &StorageError) {
        self.redis_failed(err);
        metrics::counter!("quotad_fallbacks_total").increment(1);
    }

    /// Marks Redis down (see `redis_failed`); a health probe whose ping fails calls it (see
    /// [`QuotaService::probed`]).
    /// Clears a recovery flag left over from before Redis was up (a probe that raced the
    /// recovery's end). Once Redis is down it ends no recovery: a call sent while Redis was
    /// up and failing late says nothing about the Redis a probe found answering since (a
    /// failed probe or reconcile round ends that recovery).
    pub fn redis_down(&self, reason: &str) {
        // one failure more, and not answering (`(v | 1) + 1` clears the low bit, carrying it)
        let _ = self.redis_seen.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |seen| Some((seen | 1) + 1),
        );
        if self.redis_is_up() {
            self.end_recovery();
        }
        // Set before Redis reads as down, so that no fallback misses its grace; a failure
        // while already down moves nothing.
        let now = tokio::time::Instant::now();
        if self.redis_is_up() {
            *self.down_since.lock().unwrap() = Some(now);
        }
        if self.handover.go_down() {
            self.went_down.notify_one();
            self.write_held_now();
            tracing::warn!(
                reason,
                "Redis unavailable: deciding from Firestore until it answers again"
            );
            metrics::counter!("quotad_redis_transitions_total", "to" => "down").increment(1);
        }
    }

    /// What this replica's changes left in Redis goes to the documents now, for the other
    /// replicas' fallbacks (see `outage_grace`): in a task of its own, since the sweep may be
    /// waiting on the same Redis. Only into documents already in the held records' epochs
    /// (the usual case: the writer's first write of a record moved its document there):
    /// Redis may be back already (a failure on a dead connection after a restart), other
    /// replicas loading records from the same documents. The rest waits for the fallback,
    /// the sweep or the reconcile.
    /// One such task at a time: Redis flapping while Firestore hangs would otherwise start
    /// one a transition, each waiting on Firestore. A request made while one runs has it go
    /// round again once it ends (a provider may have been held since its round began).
    fn write_held_now(&self) {
        use std::sync::atomic::Ordering;
        let (Some(me), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current()) else {
            return; // no runtime to run it (the sweep writes them while Redis is away)
        };
        if self.held_writes.fetch_add(1, Ordering::AcqRel) > 0 {
            return;
        }
        runtime.spawn(async move {
            // A round that panics or is dropped must not leave the count up: no later
            // transition would write what is held again.
            let running = HeldWrites(&me.held_writes);
            loop {
                let asked = me.held_writes.load(Ordering::Acquire);
                super::writer::write_all_held(&me, None, Some(Lineage::Try)).await;
                if me
                    .held_writes
                    .compare_exchange(asked, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
            }
            std::mem::forget(running);
        });
    }

    /// Called by the health task once Redis answers and a reconciliation begun since it
    /// went down is done (see [`Handover::go_up`]).
    pub fn redis_recovered(&self) {
        let up = self.handover.go_up();
        self.end_recovery();
        if up {
            tracing::info!("Redis answers again: deciding from Redis");
            metrics::counter!("quotad_redis_transitions_total", "to" => "up").increment(1);
        }
    }

    /// A probe found Redis and Firestore answering while decisions are away from Redis:
    /// until the reconcile has brought them back (or failed), decisions wait for it rather
    /// than decide in Firestore. Another replica that never lost Redis decides there
    /// meanwhile, and in `dual-write` its changes reach the document only a few ms later:
    /// a Firestore decision in between would not see them.
    pub fn redis_answers(&self) {
        if !self.redis_is_up() {
            // A recovery already on goes on: a round that fails then ends it, and the next
            // probe begins another.
            let next = self.recoveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let _ = self.recovering.compare_exchange(
                0,
                next,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.answers.notify_one();
        }
    }

    /// Resolves when a probe finds Redis and Firestore answering while decisions are away
    /// from Redis.
    pub async fn answers(&self) {
        self.answers.notified().await;
    }

    /// The recovery that [`QuotaService::redis_answers`] began is over (Redis is back, or a
    /// probe failed): waiting decisions go on.
    pub fn end_recovery(&self) {
        self.recovering.store(0, std::sync::atomic::Ordering::Release);
        self.recovery.notify_waiters();
    }

    /// Calls to Redis that failed so far (see [`QuotaService::redis_down`]): a ping sent, or
    /// a reconcile round begun, before one of them says nothing of the Redis after it.
    pub fn failures(&self) -> u64 {
        self.redis_seen.load(std::sync::atomic::Ordering::Acquire) >> 1
    }

    /// A ping sent when [`QuotaService::failures`] was `before` answered (or not): an answer
    /// counts only if no call has failed since (a hung Redis answers no ping sent after),
    /// checked and noted in one step.
    pub fn note_redis_answers_since(&self, answers: bool, before: u64) {
        if !answers {
            self.note_redis_answers(false);
            return;
        }
        let _ = self.redis_seen.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |seen| (seen >> 1 == before).then_some(seen | 1),
        );
    }

    /// What a health probe found, its pings sent when [`QuotaService::failures`] was
    /// `failures`: a Redis that does not answer is down; both answering begin a recovery
    /// while decisions are away from Redis, unless a call has failed since the ping was sent
    /// (a hung Redis may answer a ping sent before it hung); anything else ends one.
    pub fn probed(&self, redis: bool, firestore: bool, failures: u64) {
        self.note_redis_answers_since(redis, failures);
        if !redis && self.redis_is_up() {
            self.redis_down("health probe failed");
        }
        if redis && firestore && self.redis_answering() {
            self.redis_answers();
        } else {
            self.end_recovery();
        }
    }

    /// What the health task found of Redis: whether its last ping answered.
    pub fn note_redis_answers(&self, answers: bool) {
        if answers {
            self.redis_seen.fetch_or(1, std::sync::atomic::Ordering::AcqRel);
        } else {
            self.redis_seen.fetch_and(!1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Whether Redis answered the health task's last ping (a failed call says no too).
    pub fn redis_answering(&self) -> bool {
        self.redis_seen.load(std::sync::atomic::Ordering::Acquire) & 1 == 1
    }

    /// How held changes are written while Redis is away for this replica's decisions: they
    /// may take their document to their epoch only while Redis does not answer at all (no
    /// replica can load a record then); once it answers, other replicas may be back on it,
    /// loading records from the same documents, and the reconcile writes them under a fence.
    pub fn lineage_while_away(&self) -> Lineage {
        if self.redis_answering() {
            Lineage::Try
        } else {
            Lineage::May
        }
    }

    /// Which recovery is on as a reconcile round begins (0 if none), for
    /// [`QuotaService::recovery_failed`].
    pub fn recovery_round(&self) -> u64 {
        self.recovering.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A reconcile round begun during recovery `round` failed: that recovery ends (not one
    /// begun since, whose own round follows at once).
    pub fn recovery_failed(&self, round: u64) {
        if round != 0
            && self
                .recovering
                .compare_exchange(
                    round,
                    0,
                    std::sync::atomic::Ordering::AcqRel,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            self.recovery.notify_waiters();
        }
    }

    /// A reconcile round begun in recovery `round` failed with `err`: the recovery ends,
    /// and a Redis that stopped answering during the round is down again and, until a ping
    /// answers, not answering (a ping that answered just before no longer speaks for it:
    /// this replica's fallbacks mark their documents again, see [`Fallback`]).
    pub fn round_failed(&self, round: u64, err: &StorageError) {
        self.background_call_failed(err);
        self.recovery_failed(round);
    }

    /// Resolves when Redis goes down for decisions (the health task probes at once).
    pub async fn went_down(&self) {
        self.went_down.notified().await;
    }

    /// Waits, up to `deadline`, for a recovery in progress to end.
    async fn await_recovery(&self, deadline: tokio::time::Instant) {
        let recovering = || !self.redis_is_up() && self.recovering.load(std::sync::atomic::Ordering::Acquire) != 0;
        if !recovering() {
            return;
        }
        let ended = self.recovery.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if recovering() {
            let _waiting = Waiting::new(&self.recovery_waiting);
            let _ = tokio::time::timeout_at(deadline, ended).await;
        }
    }

    /// Decisions waiting for a recovery to end.
    pub fn recovery_waiting(&self) -> usize {
        self.recovery_waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// In `dual-write`, a Firestore decision made in the first [`OUTAGE_GRACE`] after
    /// Redis went down for this replica waits for the rest of it (never past `deadline`).
    /// Other replicas lose Redis at about the same time, their calls timing out as this
    /// one's did, and each then writes at once what its changes left in Redis and its
    /// writer has not carried yet (see [`QuotaService::redis_down`]; after the write in
    /// progress, if one is): a decision in between would not count them.
    async fn outage_grace(&self, phase: Phase, deadline: tokio::time::Instant) {
        if phase != Phase::DualWrite {
            return;
        }
        let Some(since) = *self.down_since.lock().unwrap() else {
            return;
        };
        let until = (since + OUTAGE_GRACE).min(deadline);
        if tokio::time::Instant::now() < until {
            tracing::debug!("waiting for other replicas to write their changes before deciding in Firestore");
            tokio::time::sleep_until(until).await;
        }
    }

    /// In `dual-write`, a replica cut off from Redis (its pings find none, while other
    /// replicas may still reach it) announces its fallbacks for a provider before the first
    /// of them decides: it writes its mark into the document, then waits
    /// [`ANNOUNCE_WAIT`] (never past `deadline`). A replica deciding for the provider from
    /// Redis meanwhile writes each admitted change to the document right after it, meets
    /// the mark there, and decides in Firestore from then on; the fallback, deciding after
    /// the wait, counts what it admitted before. Without it, both would admit the provider's
    /// last units at once (a split, found by a black-box soak). Fallbacks that arrive while
    /// the announcement is written share it and its wait; later ones decide at once while
    /// this replica's mark stays recent for the others (its decisions rewrite it); one
    /// after a pause of [`ANNOUNCE_FRESH`] announces again. In an outage that every
    /// replica loses Redis in, each announces too (it cannot tell a split from that): the
    /// price is a write and 0.3 s per provider and pause.
    async fn announce(&self, provider: &ProviderId, deadline: tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        // One announcement for all the fallbacks that arrive while it is written: they
        // share its write and its wait.
        let announcement = {
            let mut announced = self.announced.lock().unwrap();
            match announced.get_mut(provider) {
                Some(known) if now.duration_since(known.last) < ANNOUNCE_FRESH => {
                    known.last = now;
                    known.until.clone()
                }
                _ => {
                    if announced.len() >= 4096 {
                        announced.retain(|_, known| now.duration_since(known.last) < ANNOUNCE_FRESH);
                    }
                    let until = Arc::new(tokio::sync::OnceCell::new());
                    let known = Announced {
                        until: until.clone(),
                        last: now,
                    };
                    announced.insert(provider.clone(), known);
                    until
                }
            }
        };
        let until = announcement
            .get_or_init(|| async {
                // in the document before the wait begins: the wait is for those who read it
                // (bounded as the other waits are: a hung Firestore fails the decision after)
                let written = tokio::time::timeout_at(deadline, self.ledger.announce_fallback(provider, &self.replica));
                match written.await {
                    Ok(Ok(())) => {
                        metrics::counter!("quotad_fallback_announcements_total").increment(1);
                        tokio::time::Instant::now() + ANNOUNCE_WAIT
                    }
                    // failed or past the deadline: the decision finds Firestore as it is
                    failed => {
                        tracing::debug!(%provider, ?failed, "could not announce a fallback");
                        tokio::time::Instant::now()
                    }
                }
            })
            .await;
        tokio::time::sleep_until((*until).min(deadline)).await;
    }

    /// Whether to use Redis for this request, given the phase.
    fn use_redis(&self, phase: Phase) -> bool {
        phase.redis_decides() && self.redis_is_up()
    }

    fn limit_of(&self, stored: Option<i64>) -> i64 {
        exact(stored.unwrap_or(self.default_limit))
    }

    /// A lookup: Redis first (read-through), Firestore on a miss, in `firestore-only` or
    /// while Redis is away.
    pub async fn get(&self, provider: &ProviderId) -> Result<QuotaView, QuotaError> {
        let (phase, _) = self.phase();
        if self.use_redis(phase) {
            match self.counters.read(provider).await {
                Ok(Some(record)) if !record.outdated => {
                    CACHE
                        .get(0, || metrics::counter!("quotad_cache_total", "result" => "hit"))
                        .increment(1);
                    return Ok(QuotaView {
                        used: record.used,
                        limit: record.limit,
                        source: Source::Cache,
                    });
                }
                Ok(found) => match self.read_through(provider, found.is_some()).await {
                    Ok(view) => return Ok(view),
                    Err(QuotaError::Unavailable(err)) if err.is_redis() => self.redis_failed(&err),
                    Err(err) => return Err(err),
                },
                Err(err) if err.is_unavailable() => self.redis_failed(&err),
                Err(err) => return Err(err.into()),
            }
        }
        let doc = self.ledger.read(provider).await?.unwrap_or_default();
        Ok(QuotaView {
            used: doc.used(),
            limit: self.limit_of(doc.limit),
            source: Source::Store,
        })
    }

    /// A lookup Redis cannot answer: no record, or an `outdated` one (Firestore decided for
    /// it while a replica could not reach Redis), which is reloaded first as an invalidation
    /// does (its unsynced usage written, then dropped or rebased). Then read through.
    async fn read_through(&self, provider: &ProviderId, outdated: bool) -> Result<QuotaView, QuotaError> {
        metrics::counter!("quotad_cache_total", "result" => "miss").increment(1);
        if outdated {
            self.reload(provider).await?;
        }
        // Cached or not (a fenced decision may be landing), it is the store's.
        let (seed, _) = self.load(provider).await?;
        Ok(QuotaView {
            used: seed.used,
            limit: seed.limit,
            source: Source::Store,
        })
    }

    /// Reads the document and caches it (unless another replica cached it first); see
    /// [`Loaded`].
    async fn load(&self, provider: &ProviderId) -> Result<(Seed, Loaded), QuotaError> {
        let fence = self.counters.fence_gen(provider).await?;
        let doc = self.ledger.read(provider).await?.unwrap_or_default();
        let beyond = doc.used_beyond_exact();
        let away = self.deciding_elsewhere(&doc);
        let seed = Seed {
            used: doc.used(),
            limit: self.limit_of(doc.limit),
            epoch: new_epoch(),
            loaded_from: doc.epoch.unwrap_or_default(),
            keys: doc.keys,
            fence,
            outdated: false, // (away, nothing is written: below)
        };
        if beyond {
            return Ok((seed, Loaded::Beyond));
        }
        if away {
            metrics::counter!("quotad_loads_left_to_firestore_total").increment(1);
            return Ok((seed, Loaded::Away));
        }
        let loaded = self.counters.load(provider, &seed, self.cache_ttl).await?;
        Ok((seed, if loaded { Loaded::Cached } else { Loaded::Fenced }))
    }

    /// Consumes or refunds `amount` (see API.md "Quotas").
    pub async fn change(
        &self,
        provider: &ProviderId,
        op: Op,
        amount: i64,
        idempotency_key: Option<&str>,
    ) -> Result<Outcome, QuotaError> {
        let (phase, _) = self.phase();
        let change = Change {
            op,
            amount,
            idempotency_key,
            with_record: phase != Phase::RedisPrimary,
        };
        // One bound for both waits below, so that with a Redis call's own timeout a
        // decision still reaches Firestore within API.md's 2 s.
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        if phase.redis_decides() {
            self.await_recovery(deadline).await;
        }
        // A provider Firestore decided for while Redis was away waits for its reload.
        let outcome = if self.use_redis(phase) && self.handover.clear_for(provider, deadline).await {
            match self.change_in_redis(provider, &change, phase, deadline).await {
                Ok(outcome) => Ok(outcome),
                Err(QuotaError::Unavailable(err)) if err.is_redis() => {
                    self.decision_falls_back(&err);
                    self.in_firestore(provider, &change, phase, InFirestore::Fallback, deadline)
                        .await
                }
                Err(err) => Err(err),
            }
        } else if self.redis_is_up() {
            // firestore-only (or a provider whose hold outlasted its wait)
            self.in_firestore(provider, &change, phase, InFirestore::Fenced, deadline)
                .await
        } else {
            if phase.redis_decides() {
                metrics::counter!("quotad_fallbacks_total").increment(1);
            }
            self.in_firestore(provider, &change, phase, InFirestore::Fallback, deadline)
                .await
        };
        if let Ok(Outcome::Decided(decision) | Outcome::Replayed(decision)) = &outcome {
            let (result, result_index) = match &outcome {
                Ok(Outcome::Replayed(_)) => ("replayed", 2),
                _ if decision.allowed => ("allowed", 0),
                _ => ("denied", 1),
            };
            let index = (usize::from(op == Op::Refund) * 3 + phase as usize) * 3 + result_index;
            DECISIONS
                .get(index, || {
                    metrics::counter!("quotad_decisions_total", "kind" => "quota", "op" => op.as_str(),
                        "outcome" => result, "phase" => phase.as_str())
                })
                .increment(1);
        }
        outcome
    }

    async fn change_in_redis(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        phase: Phase,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, QuotaError> {
        let mut loads = 0;
        let mut waiting = None;
        let fence_wait_until = tokio::time::Instant::now() + FENCE_WAIT;
        loop {
            match self.counters.apply(provider, change).await? {
                Applied::Miss => {
                    metrics::counter!("quotad_cache_total", "result" => "miss").increment(1);
                    match self.load(provider).await?.1 {
                        Loaded::Cached => {
                            loads += 1;
                            if loads == 3 {
                                // Gone between load and apply three times over: fenced
                                // decisions keep dropping it, or Redis evicts under memory
                                // pressure. Firestore decides this one (Redis itself answers).
                                return self
                                    .in_firestore(provider, change, phase, InFirestore::Fenced, deadline)
                                    .await;
                            }
                            continue;
                        }
                        // Firestore decides for it, exactly, as in `firestore-only`.
                        Loaded::Beyond | Loaded::Away => {
                            return self
                                .in_firestore(provider, change, phase, InFirestore::Fenced, deadline)
                                .await;
                        }
                        Loaded::Fenced => {}
                    }
                    // Firestore is deciding for it (another replica's decision in a phase
                    // switch): wait for that to land, then load. Deciding in Firestore at
                    // once would fence it in turn, and a busy provider's decisions would
                    // keep each other off Redis. A holder renews its fence, and a dead
                    // holder's expires within FENCE_TTL: only a replica that keeps deciding
                    // in Firestore for longer than FENCE_WAIT sends this one there too.
                    if waiting.is_none() {
                        metrics::counter!("quotad_fence_waits_total").increment(1);
                        waiting = Some(Waiting::new(&self.fence_waiting));
                    }
                    while self.counters.fence_held(provider).await? {
                        if tokio::time::Instant::now() >= fence_wait_until {
                            return self
                                .in_firestore(provider, change, phase, InFirestore::Fenced, deadline)
                                .await;
                        }
                        tokio::time::sleep(FENCE_POLL).await;
                    }
                }
                // Firestore decided for it while this replica could not see (another replica
                // could not reach Redis): Firestore decides, under a fence that drops it.
                Applied::Outdated => {
                    return self
                        .in_firestore(provider, change, phase, InFirestore::Fenced, deadline)
                        .await;
                }
                applied => return self.answer_of(provider, change, applied, phase),
            }
        }
    }

    /// The answer to a change Redis took (not a miss); in `dual-write` and `firestore-only`
    /// its usage goes to Firestore now (in `redis-primary`, with the sync).
    fn answer_of(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        applied: Applied,
        phase: Phase,
    ) -> Result<Outcome, QuotaError> {
        match applied {
            Applied::KeyReused => Err(QuotaError::KeyReused),
            Applied::Replayed(decision) => Ok(Outcome::Replayed(decision)),
            Applied::Decided(decision, unwritten) => {
                if phase != Phase::RedisPrimary {
                    if let Some(record) = unwritten {
                        let key = change.idempotency_key.map(|key| {
                            let entry = IdempotencyEntry::new(change.amount, decision, Utc::now().timestamp_millis());
                            (idempotency_id(change.op, key), entry.render())
                        });
                        self.writer.hold(provider, *record, key);
                    }
                    self.writer.enqueue(provider.clone());
                }
                Ok(Outcome::Decided(decision))
            }
            Applied::Miss | Applied::Outdated => unreachable!("a miss is loaded, an outdated record fenced"),
        }
    }

    /// Decisions waiting for a Firestore decision elsewhere to land (tests synchronise on
    /// it).
    pub fn fence_waiting(&self) -> usize {
        self.fence_waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decides in Firestore, in a task of its own: a request dropped meanwhile (its client
    /// went away) does not end the decision's hold or fence before Firestore has answered.
    async fn in_firestore(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        phase: Phase,
        how: InFirestore,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, QuotaError> {
        let Some(me) = self.me.upgrade() else {
            return Err(QuotaError::Internal(StorageError::Other {
                backend: "firestore",
                message: "the service is shutting down".into(),
            }));
        };
        let (provider, op, amount, with_record) = (provider.clone(), change.op, change.amount, change.with_record);
        let key = change.idempotency_key.map(str::to_owned);
        let task = tokio::spawn(async move {
            let change = Change {
                op,
                amount,
                idempotency_key: key.as_deref(),
                with_record,
            };
            match how {
                InFirestore::Fenced => me.change_fenced(&provider, &change, phase, deadline).await,
                // Redis may still hold a record this decision makes stale: it is marked,
                // and reloaded before Redis decides for it again.
                InFirestore::Fallback => me.change_in_ledger(&provider, &change, phase, true, deadline).await,
            }
        });
        task.await.unwrap_or_else(|err| {
            Err(QuotaError::Internal(StorageError::Other {
                backend: "firestore",
                message: format!("the decision's task failed: {err}"),
            }))
        })
    }

    /// Decides in Firestore while Redis is reachable: under a fence on the provider, so
    /// that no replica loads (and then decides from) a record read before this decision
    /// landed; the cached record is dropped first, its unsynced usage written. Without
    /// Redis it is a fallback, marked for a reload.
    async fn change_fenced(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        phase: Phase,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, QuotaError> {
        let token = new_epoch();
        let fence = Fence {
            counters: self.counters.clone(),
            provider: provider.clone(),
            token,
            held: true,
        };
        let mut marked = false;
        match self.renewing(&fence, self.drop_under_fence(&fence)).await {
            Ok(true) => {}
            Ok(false) => {
                // Other replicas keep deciding in Redis from this record, and it misses no
                // fenced decision (each drops it first, and none loads meanwhile; fallbacks
                // made while Redis was away are reloaded once it is not this busy).
                // Deciding in Firestore beside it would let both admit: Redis decides.
                match self.counters.apply(provider, change).await {
                    Ok(Applied::Miss | Applied::Outdated) => {} // gone or outdated: Firestore decides
                    Ok(applied) => {
                        fence.release().await;
                        return self.answer_of(provider, change, applied, phase);
                    }
                    Err(err) if err.is_unavailable() => {
                        self.decision_falls_back(&err);
                        marked = true;
                    }
                    Err(err) => {
                        tracing::warn!(%provider, error = %err, "could not decide for a busy record");
                        marked = true;
                    }
                }
            }
            Err(QuotaError::Unavailable(err)) if err.is_redis() => {
                self.decision_falls_back(&err);
                marked = true;
            }
            Err(err) => {
                // The record may keep usage Firestore has not seen; it reloads later.
                tracing::warn!(%provider, error = %err, "could not drop the cached record");
                marked = true;
            }
        }
        let outcome = self
            .renewing(&fence, self.change_in_ledger(provider, change, phase, marked, deadline))
            .await;
        fence.release().await;
        outcome
    }

    /// Runs `work` while renewing `fence` (every [`FENCE_RENEW`]), so that it lasts as long
    /// as the work does, however long a Firestore call takes, and no longer than
    /// [`FENCE_TTL`] after a holder dies.
    async fn renewing<T>(&self, fence: &Fence, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep(FENCE_RENEW) => {
                    if let Err(err) = self.counters.renew_fence(&fence.provider, &fence.token, FENCE_TTL).await {
                        tracing::warn!(provider = %fence.provider, error = %err, "could not renew a fence");
                    }
                }
            }
        }
    }

    /// Takes the fence and drops the record, writing its unsynced usage first. Returns
    /// `false` when the record stayed dirty (other replicas keep changing it).
    async fn drop_under_fence(&self, fence: &Fence) -> Result<bool, QuotaError> {
        let provider = &fence.provider;
        if self.counters.fence(provider, &fence.token, FENCE_TTL).await? {
            return Ok(true);
        }
        for _ in 0..5 {
            self.flush(provider).await?;
            if self.counters.evict_clean(provider).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn change_in_ledger(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        phase: Phase,
        fallback: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, QuotaError> {
        tracing::debug!(%phase, fallback, "deciding with a Firestore transaction");
        // Counted until it lands: Redis may not decide for the provider meanwhile (nor
        // after a recovery that ends while it waits out the outage's first moments).
        let in_flight = fallback.then(|| self.handover.begin(provider));
        // The provider's first fallback in flight fences it until the last has landed (not
        // in firestore-only: no replica decides in Redis then).
        if phase.redis_decides()
            && let Some(landed) = in_flight.as_ref().and_then(InFlight::first)
        {
            tokio::spawn(hold_fallback_fence(self.counters.clone(), provider.clone(), landed));
        }
        if fallback {
            // Both waits end at a time of their own, so they overlap. Consumes only: a
            // refund admits nothing the others could admit too.
            if phase == Phase::DualWrite && change.op == Op::Consume && !self.redis_answering() {
                self.announce(provider, deadline).await;
            }
            self.outage_grace(phase, deadline).await;
        }
        // This replica's changes that Redis took and the writer has not carried yet go to
        // the document first, so that the decision counts them. No record loads meanwhile
        // when the provider is fenced, or Redis does not answer.
        let lineage = if fallback {
            self.lineage_while_away()
        } else {
            Lineage::May
        };
        self.write_held(provider, None, lineage).await?;
        let decided = self
            .ledger
            .decide(provider, change, self.default_limit, self.fallback(fallback))
            .await;
        if fallback {
            // After the decision, not before: a replica that meets the mark and reloads the
            // record must find the decision in the document (an error may have landed too).
            self.mark_outdated_later(provider);
        }
        match decided? {
            LedgerDecision::Decided(decision) => Ok(Outcome::Decided(decision)),
            LedgerDecision::Replayed(decision) => Ok(Outcome::Replayed(decision)),
            LedgerDecision::KeyReused => Err(QuotaError::KeyReused),
        }
    }

    /// A fallback decided in Firestore: its provider's record in Redis is marked outdated
    /// whenever Redis takes the call, so that replicas that reach Redis do not decide from
    /// it before it is reloaded (this one holds it back itself, see [`Handover`]). A hung
    /// Redis runs the mark when it wakes, before anything sent after; an unreachable one
    /// never does: the reconciliation reloads the record. The call is not waited for. One
    /// runs at a time per provider; fallbacks that land meanwhile get one more after it (a
    /// reload between the first mark and their decision would have missed them).
    fn mark_outdated_later(&self, provider: &ProviderId) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        match self.marking.lock().unwrap().entry(provider.clone()) {
            std::collections::hash_map::Entry::Occupied(mut sent) => {
                *sent.get_mut() = true;
                return;
            }
            std::collections::hash_map::Entry::Vacant(none) => {
                none.insert(false);
            }
        }
        let provider = provider.clone();
        tokio::spawn(async move {
            loop {
                if let Err(err) = me.counters.mark_outdated(&provider).await {
                    tracing::debug!(%provider, error = %err, "could not mark the record outdated");
                }
                let mut marking = me.marking.lock().unwrap();
                match marking.get_mut(&provider) {
                    Some(again) if *again => *again = false,
                    _ => {
                        marking.remove(&provider);
                        return;
                    }
                }
            }
        });
    }

    /// Writes to the ledger the changes this replica holds for `provider` (see
    /// [`Writer::hold`]), but those of the epoch `except` (Redis has that record: the
    /// writer carries it). Replays add nothing, so a write another already made is harmless.
    ///
    /// A held record whose epoch the document does not have yet moves the document to it
    /// (as the writer's first write of a record does). That is sound only while no other
    /// record can have been loaded from the document and written: while Redis, which still
    /// holds the epoch or has lost it and is unreachable, cannot load one, or under a fence
    /// with no dirty record in Redis (`Lineage::May`). Beside a dirty record of another
    /// epoch, which the move would make stale, only a document already in the held epoch
    /// takes the write (`Lineage::Keep`); otherwise those changes are lost with Redis's
    /// data, and logged. See [`QuotaService::write_lost_held`].
    pub async fn write_held(
        &self,
        provider: &ProviderId,
        except: Option<&str>,
        lineage: Lineage,
    ) -> Result<(), StorageError> {
        for held in self.writer.held(provider, except) {
            let ids: Vec<String> = held.keys.iter().map(|(_, (id, _))| id.clone()).collect();
            let keys: Vec<KeyRecord> = held.keys.into_iter().map(|(_, key)| key).collect();
            let record = match lineage {
                Lineage::May => held.record,
                Lineage::Keep | Lineage::Try => held.record.without_lineage(),
            };
            let (epoch, version) = (&record.epoch, record.version);
            match self.ledger.write_record(provider, &record, &keys).await? {
                WriteOutcome::Written { .. } => {
                    metrics::counter!("quotad_store_writes_total", "result" => "written_held").increment(1);
                    tracing::info!(%provider, %epoch, version, "wrote this replica's changes that Redis could not give");
                    self.writer.landed(provider, epoch, version, Some(&ids));
                }
                WriteOutcome::Stale if lineage == Lineage::Try => {
                    tracing::debug!(%provider, %epoch, "held changes wait for the reconcile");
                }
                WriteOutcome::Stale => {
                    metrics::counter!("quotad_store_writes_total", "result" => "stale_held").increment(1);
                    tracing::warn!(%provider, %epoch, since_load = record.used - record.base,
                        "changes this replica held are not in the document's epoch: dropped (the document was \
                         reset, or a later epoch carried them, or Redis lost them and another record was written)");
                    self.writer.landed(provider, epoch, u64::MAX, None);
                }
            }
        }
        Ok(())
    }

    /// Writes the changes this replica holds of epochs Redis no longer has (`present`: the
    /// record it has, if any) under a fence, so that no record loads meanwhile. When Redis
    /// holds no record, or only a clean one (dropped by the fence: it has written nothing),
    /// they may take the document to their epoch; beside a dirty record of another epoch
    /// (loaded since, and perhaps written) they may not ([`Lineage::Keep`]).
    /// Changes of the epoch that `present` (the record Redis has) was rebased from in place
    /// are not lost: each was made in Redis on the record before the rebase, which carried
    /// everything its document's watermark did not hold (see [`Counters::rebase`]). They are
    /// released, not written (a plain load, which may follow Redis losing the record,
    /// carries nothing: only a rebase sets `from_watermark`).
    async fn write_lost_held(&self, provider: &ProviderId, present: Option<&Record>) -> Result<(), StorageError> {
        if let Some(rebased) = present.filter(|r| r.from_watermark.is_some()) {
            self.writer.landed(provider, &rebased.loaded_from, u64::MAX, None);
        }
        let present = present.map(|r| r.epoch.as_str());
        if self.writer.held(provider, present).is_empty() {
            return Ok(());
        }
        let fence = Fence {
            counters: self.counters.clone(),
            provider: provider.clone(),
            token: new_epoch(),
            held: true,
        };
        let work = async {
            if self.counters.fence(provider, &fence.token, FENCE_TTL).await? {
                self.write_held(provider, None, Lineage::May).await
            } else {
                self.write_held(provider, present, Lineage::Keep).await
            }
        };
        let written = self.renewing(&fence, work).await;
        fence.release().await;
        written
    }

    /// Writes a provider's unsynced usage to the ledger, exactly once. Returns `true` when
    /// the record is clean afterwards (or there is none); `false` when each of its three
    /// rounds found it changed again, replaced or rebased (callers treat it as kept dirty).
    /// A round that writes reads the record once: `mark_synced` says what it left.
    pub async fn flush(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        for _ in 0..3 {
            let record = match self.counters.read(provider).await {
                Ok(record) => record,
                Err(err) => {
                    // Redis cannot say what is unwritten: this replica writes its own.
                    if let Err(write) = self.write_held(provider, None, self.lineage_while_away()).await {
                        tracing::debug!(%provider, error = %write, "writing held changes failed");
                    }
                    return Err(err);
                }
            };
            // Held changes of an epoch Redis no longer has (it came back without the record,
            // or the record was reloaded since) are written first: nothing else will.
            self.write_lost_held(provider, record.as_ref()).await?;
            let Some(record) = record else {
                return Ok(true);
            };
            if !record.is_dirty() {
                self.writer.landed(provider, &record.epoch, record.synced, None);
                return Ok(true);
            }
            // Idempotency records decided in Redis travel with the usage, so a retry that
            // Firestore decides (Redis away, or a phase change) is answered, not charged.
            let keys = self.counters.pending_keys(provider).await?;
            match self.ledger.write_record(provider, &record, &keys).await {
                Ok(WriteOutcome::Written { limit, fallback }) => {
                    metrics::counter!("quotad_store_writes_total", "result" => "written").increment(1);
                    let missed = fallback.is_some_and(|mark| self.missed_by(&record, &mark));
                    if missed {
                        self.outdated_by_mark(provider);
                    }
                    match self.note_written(provider, &record, limit, &keys).await? {
                        Synced::Clean => return Ok(true),
                        // Kept dirty for longer than the cache TTL (a busy provider): rebased,
                        // it takes in what other writers added meanwhile (failing, it is tried
                        // again after the next write). Not when just marked outdated: a
                        // rebase would clear the mark, and the record is reloaded anyway.
                        Synced::Outlived if !missed => {
                            if let Err(err) = self.rebase(provider).await {
                                tracing::warn!(%provider, error = %err, "rebase after the cache TTL failed");
                            }
                        }
                        // changed meanwhile, or replaced: the next round reads what is there
                        Synced::Outlived | Synced::Dirty | Synced::Replaced => {}
                    }
                }
                Ok(WriteOutcome::Stale) => {
                    self.drop_stale(provider, &record).await?;
                    return Ok(true);
                }
                Err(err) => {
                    metrics::counter!("quotad_store_writes_total", "result" => "failed").increment(1);
                    return Err(err);
                }
            }
        }
        Ok(false)
    }

    /// How a Firestore decision is recorded when it is a `fallback`: with this replica's
    /// mark in the document only while its pings find no Redis either (see
    /// [`Fallback::mark_document`]).
    fn fallback(&self, fallback: bool) -> Option<Fallback<'_>> {
        fallback.then(|| Fallback {
            by: &self.replica,
            mark_document: !self.redis_answering(),
        })
    }

    /// Whether `mark` says that another replica, unable to reach Redis, decided in
    /// Firestore after `record` was loaded ([`FallbackMark::missed_by`]). Redis never saw
    /// that decision, and this replica reaches Redis while that one cannot mark the record
    /// outdated itself.
    fn missed_by(&self, record: &Record, mark: &FallbackMark) -> bool {
        mark.missed_by(&self.replica, record.loaded_ms, Utc::now().timestamp_millis())
    }

    /// Whether `doc`'s fallback mark says that another replica decides in Firestore for
    /// lack of Redis these moments ([`FallbackMark::deciding_elsewhere`]): Redis keeps no
    /// record of it to decide from (loads, rebases, an operator's `PUT`, the backfill).
    pub fn deciding_elsewhere(&self, doc: &Document) -> bool {
        let now = Utc::now().timestamp_millis();
        doc.fallback
            .as_ref()
            .is_some_and(|mark| mark.deciding_elsewhere(&self.replica, now))
    }

    /// In `dual-write`, while this replica reaches Redis: looks for other replicas' recent
    /// fallback marks (a replica cut off from Redis writes one before its first fallback
    /// consume for a provider and waits [`ANNOUNCE_WAIT`]: see [`QuotaService::announce`]),
    /// and marks this replica's records of those providers outdated, as the cut-off replica
    /// would have done had it reached Redis. Polled every [`MARK_POLL`], shorter than that
    /// wait, so that by the time the fallback decides, this replica decides the provider in
    /// Firestore too, in the same transactions. Before, it learnt of the mark only at its
    /// next write, after deciding once more from a record that missed the fallback's
    /// decision: the provider's last unit was admitted twice (helper-54's repro, every time).
    /// Each new mark is acted on once. Returns how many records it marked.
    pub async fn watch_marks(&self) -> Result<usize, StorageError> {
        if self.phase().0 != Phase::DualWrite || !self.redis_answering() {
            return Ok(0);
        }
        let now = Utc::now().timestamp_millis();
        // every mark `deciding_elsewhere` may take for a replica still deciding in Firestore
        let since = now - FallbackMark::RECENT_MS - FallbackMark::CLOCK_SLACK_MS;
        let marks = self.ledger.fallback_marks(since, 1000).await?;
        let fresh: Vec<ProviderId> = {
            let mut seen = self.marks_seen.lock().unwrap();
            seen.retain(|_, at| *at >= since);
            marks
                .into_iter()
                .filter(|(_, mark)| mark.deciding_elsewhere(&self.replica, now))
                .filter_map(|(provider, mark)| {
                    let newer = seen.get(&provider).is_none_or(|at| mark.at_ms > *at);
                    newer.then(|| {
                        seen.insert(provider.clone(), mark.at_ms);
                        provider
                    })
                })
                .collect()
        };
        for provider in &fresh {
            self.outdated_by_mark(provider);
        }
        Ok(fresh.len())
    }

    /// A write found that another replica decided in Firestore beside the cached record
    /// ([`QuotaService::missed_by`]): the record is marked outdated, as that replica's own
    /// mark would have done had it reached Redis. Until it is reloaded, decisions for the
    /// provider go to Firestore; and while that replica keeps deciding there, so do they
    /// ([`Loaded::Away`]). The mark is sent as a fallback's own is
    /// ([`QuotaService::mark_outdated_later`]), and not waited for: the connection it goes
    /// on waits out a hung Redis. (Rebases and an operator's `PUT` beside a recent mark
    /// write their record outdated themselves: [`QuotaService::deciding_elsewhere`].)
    fn outdated_by_mark(&self, provider: &ProviderId) {
        Self::fallback_seen(provider);
        self.mark_outdated_later(provider);
    }

    /// Counts and logs a record found or written outdated because of another replica's
    /// fallback mark.
    fn fallback_seen(provider: &ProviderId) {
        metrics::counter!("quotad_fallbacks_seen_total").increment(1);
        tracing::info!(%provider, "another replica decides in Firestore for lack of Redis: the cached record is outdated");
    }

    /// A record's write landed: the writer and Redis learn what the ledger holds now (its
    /// version and limit, and the idempotency records `keys` that went with it). Says what
    /// is left in Redis (see [`Counters::mark_synced`]).
    async fn note_written(
        &self,
        provider: &ProviderId,
        record: &Record,
        limit: Option<i64>,
        keys: &[KeyRecord],
    ) -> Result<Synced, StorageError> {
        self.writer.landed(provider, &record.epoch, record.version, None);
        let transferred: Vec<String> = keys.iter().map(|(id, _)| id.clone()).collect();
        let limit = self.limit_of(limit);
        self.counters
            .mark_synced(
                provider,
                &record.epoch,
                record.version,
                limit,
                self.cache_ttl,
                &transferred,
            )
            .await
    }

    /// A record's write found its document in an epoch that is neither the record's nor
    /// the one it was loaded from. Either the document was set to another epoch (an
    /// operator's PUT while Redis was away), whose absolute value replaced what the record
    /// had not written: Redis still holds the record, and it is dropped (logged), its
    /// pending idempotency records marked (see [`Counters::forget`]). Or the write was
    /// slow, and the record it read was written and replaced meanwhile (or another replica
    /// dropped it first): Redis no longer holds it, and there is nothing to drop.
    async fn drop_stale(&self, provider: &ProviderId, record: &Record) -> Result<(), StorageError> {
        self.writer.landed(provider, &record.epoch, u64::MAX, None);
        let (epoch, since_load) = (&record.epoch, record.used - record.base);
        if self.counters.forget(provider, epoch).await? {
            metrics::counter!("quotad_store_writes_total", "result" => "stale").increment(1);
            tracing::warn!(%provider, %epoch, since_load,
                "cached record is stale (its document was reset meanwhile): dropping it");
        } else {
            tracing::debug!(%provider, %epoch, "a write read a record that was replaced before it landed");
        }
        Ok(())
    }

    /// Writes many dirty records in one batch (the batch sync): `(written, failed)`. A
    /// record changed meanwhile stays dirty for the next run; nothing is written twice.
    pub async fn flush_batch(&self, providers: &[ProviderId]) -> Result<(u64, u64), StorageError> {
        // Reads go out together: the shared connection pipelines them.
        let reads = futures::future::join_all(providers.iter().map(|provider| async move {
            match self.counters.read(provider).await? {
                Some(record) if record.is_dirty() => {
                    let keys = self.counters.pending_keys(provider).await?;
                    Ok::<_, StorageError>(Some((provider.clone(), record, keys)))
                }
                _ => Ok(None),
            }
        }))
        .await;
        let mut items = Vec::with_capacity(providers.len());
        for read in reads {
            if let Some(item) = read? {
                items.push(item);
            }
        }
        // Transient Firestore errors are retried with backoff; replays add nothing.
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        let results = loop {
            match self.ledger.write_records(&items).await {
                Ok(results) => break results,
                Err(err) if err.is_unavailable() && attempt < 4 => {
                    tracing::warn!(error = %err, attempt, "sync: a batch write failed; retrying");
                    metrics::counter!("quotad_store_write_retries_total").increment(1);
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                    attempt += 1;
                }
                Err(err) => {
                    tracing::warn!(error = %err, records = items.len(), "sync: a batch write failed");
                    metrics::counter!("quotad_store_writes_total", "result" => "failed").increment(items.len() as u64);
                    return Ok((0, items.len() as u64));
                }
            }
        };
        let settled = futures::future::join_all(items.iter().zip(results).map(
            |((provider, record, keys), result)| async move {
                match result {
                    Ok(WriteOutcome::Written { limit, .. }) => {
                        self.note_written(provider, record, limit, keys).await?;
                        Ok::<_, StorageError>((1, 0))
                    }
                    Ok(WriteOutcome::Stale) => {
                        self.drop_stale(provider, record).await?;
                        Ok((0, 0))
                    }
                    Err(err) => {
                        tracing::warn!(%provider, error = %err, "sync: write failed");
                        Ok((0, 1))
                    }
                }
            },
        ))
        .await;
        let (mut written, mut failed) = (0u64, 0u64);
        for outcome in settled {
            let (w, f) = outcome?;
            written += w;
            failed += f;
        }
        metrics::counter!("quotad_store_writes_total", "result" => "written").increment(written);
        Ok((written, failed))
    }

    /// Drops the cached record, writing its unsynced usage first: invalidation never loses
    /// usage.
    pub async fn invalidate(&self, provider: &ProviderId) -> Result<(), QuotaError> {
        if self.reload_written(provider).await? {
            return Ok(());
        }
        Err(QuotaError::Unavailable(StorageError::Other {
            backend: "redis",
            message: "the record stayed dirty and the document has not seen it".into(),
        }))
    }

    /// [`QuotaService::invalidate`], but `false` when the record stayed dirty: other
    /// replicas keep changing it faster than it can be written.
    async fn try_invalidate(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        for _ in 0..5 {
            if self.counters.evict_clean(provider).await? {
                return Ok(true);
            }
            self.flush(provider).await?;
        }
        Ok(false)
    }

    /// Reloads a record that other replicas keep dirty without dropping it (see
    /// [`Counters::rebase`]): `false` when it cannot, because the document has not seen
    /// the record's epoch yet (it has never been written).
    async fn rebase(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        let Some(record) = self.counters.read(provider).await? else {
            return Ok(true); // gone: the next request loads it
        };
        let doc = self.ledger.read(provider).await?.unwrap_or_default();
        // Not before the document has seen the record's epoch; and never onto a usage
        // beyond what Redis counts exactly (the record is dropped instead, when it can be).
        let (used, watermark) = (doc.used(), doc.watermark.unwrap_or(0));
        let rebased = i128::from(doc.used.unwrap_or(0)) + i128::from(record.used) - i128::from(watermark);
        if doc.epoch.as_deref() != Some(record.epoch.as_str()) || rebased.abs() > i128::from(EXACT_MAX) {
            return Ok(false);
        }
        // Another replica decides in Firestore these moments: the rebased record would miss
        // its next decisions, as a loaded one would (see `Loaded::Away`). It is rebased
        // outdated.
        let away = self.deciding_elsewhere(&doc);
        let mark = match (away, record.outdated) {
            (true, _) => RebaseMark::Set,
            (false, true) => RebaseMark::Clear,
            (false, false) => RebaseMark::Keep,
        };
        let onto = RebaseOnto {
            used,
            watermark,
            keys: &doc.keys,
            mark,
        };
        let rebased = self
            .counters
            .rebase(provider, &record.epoch, &new_epoch(), &onto)
            .await?;
        if rebased && away {
            Self::fallback_seen(provider);
        }
        Ok(rebased)
    }

    /// Drops the record for a reload or, when other replicas keep it dirty, rebases it.
    async fn reload(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        Ok(self.try_invalidate(provider).await? || self.rebase(provider).await?)
    }

    /// [`QuotaService::reload`] for an operator (invalidation, a new limit): dropped; or,
    /// when other requests keep it dirty (a busy provider), rebased on what the document
    /// holds after its usage was written there. Either way the next decision starts from
    /// the store, and the usage not yet written comes along. A rebase fails while the
    /// document has not seen the record's epoch (another invalidation has just rebased
    /// it): written once more, the document has. `false` when it still could not.
    async fn reload_written(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        if self.reload(provider).await? {
            return Ok(true);
        }
        self.flush(provider).await?;
        self.rebase(provider).await
    }

    /// A record that could not be reloaded because other replicas keep it dirty: they
    /// decide from it meanwhile, and so may this one. Its reload is retried later.
    fn reload_deferred(provider: &ProviderId, why: &'static str) {
        tracing::warn!(%provider, why, "reload deferred: other replicas keep the record dirty");
        metrics::counter!("quotad_reloads_deferred_total").increment(1);
    }

    /// Sets `used` and/or `limit` in the ledger and the cache: both agree when it returns.
    pub async fn set_quota(
        &self,
        provider: &ProviderId,
        used: Option<i64>,
        limit: Option<i64>,
    ) -> Result<QuotaView, QuotaError> {
        let redis = self.redis_is_up();
        if redis {
            match self.flush(provider).await {
                Ok(_) => {}
                Err(err) if err.is_redis() && err.is_unavailable() => self.redis_failed(&err),
                Err(err) => return Err(err.into()),
            }
        }
        // Read before the write: a fenced decision landing after it must not be missed by
        // the record this puts in Redis (it is dropped instead; the next request loads it).
        let fence = if redis {
            self.counters.fence_gen(provider).await.unwrap_or(u64::MAX)
        } else {
            u64::MAX
        };
        let epoch = new_epoch();
        let doc = self.ledger.set_quota(provider, used, limit, &epoch).await?;
        let away = self.deciding_elsewhere(&doc);
        let view = QuotaView {
            used: doc.used(),
            limit: self.limit_of(doc.limit),
            source: Source::Store,
        };
        let cached = if used.is_some() {
            let seed = Seed {
                used: view.used,
                limit: view.limit,
                epoch: epoch.clone(),
                loaded_from: epoch,
                keys: doc.keys,
                fence,
                // as a rebase: another replica deciding in Firestore these moments
                outdated: away,
            };
            let replaced = self.counters.replace(provider, &seed, self.cache_ttl).await;
            if replaced.is_ok() && away {
                Self::fallback_seen(provider);
            }
            replaced
        } else {
            // The document may hold what other writers added since the record was loaded:
            // the record is reloaded as an invalidation reloads it, so that store and cache
            // agree. Failing that (or without Redis), it is marked below for the reconcile,
            // and meanwhile takes the new limit.
            let reloaded = if redis {
                self.reload_written(provider).await
            } else {
                Ok(false)
            };
            if !matches!(reloaded, Ok(true)) && redis {
                let _ = self.counters.set_limit(provider, view.limit).await;
            }
            reloaded.and_then(|done| {
                done.then_some(()).ok_or_else(|| StorageError::Other {
                    backend: "redis",
                    message: "the record could not be reloaded".into(),
                })
            })
        };
        if let Err(err) = cached {
            // Redis will reload this provider before it decides for it again.
            tracing::warn!(%provider, error = %err, "quota set in Firestore; the cache will be reloaded");
            self.ledger.note_changed_outside(provider).await?;
            if err.is_unavailable() && err.is_redis() {
                self.redis_failed(&err);
            }
        }
        Ok(view)
    }

    /// Detects that Redis came back without its data (a restart without persistence): the
    /// data set's id (the sentinel) is gone. Records then reload from Firestore under new
    /// epochs, but usage never written to Firestore is lost: this reports it (an `ERROR`
    /// log, `quotad_redis_data_loss_total`, and the `redis-loss` record `quotad verify`
    /// prints) instead of absorbing it silently. Returns whether a loss was found.
    pub async fn check_redis_data(&self) -> Result<bool, StorageError> {
        const SENTINEL: &str = "redis-sentinel";
        let candidate = new_epoch();
        let present = self.counters.ensure_sentinel(&candidate).await?;
        let known = self.known_sentinel.lock().unwrap().clone();
        if let Some(present) = present {
            if known.as_deref() != Some(present.as_str()) {
                if self.ledger.meta(SENTINEL).await?.as_deref() != Some(present.as_str()) {
                    self.ledger.set_meta(SENTINEL, &present).await?;
                }
                *self.known_sentinel.lock().unwrap() = Some(present);
            }
            return Ok(false);
        }
        // Redis had no sentinel: it is new, or it lost its data.
        let previous = match known {
            Some(known) => Some(known),
            None => self.ledger.meta(SENTINEL).await?,
        };
        let lost = previous.is_some();
        if lost {
            let (phase, _) = self.phase();
            tracing::error!(%phase, "Redis came back empty: usage it held that was not yet written to Firestore \
                is lost; records reload from Firestore (keep Redis persistent, sync often)");
            metrics::counter!("quotad_redis_data_loss_total", "phase" => phase.as_str()).increment(1);
            let record = serde_json::json!({"at": Utc::now().to_rfc3339(), "phase": phase.as_str()});
            self.ledger.set_meta("redis-loss", &record.to_string()).await?;
        }
        self.ledger.set_meta(SENTINEL, &candidate).await?;
        *self.known_sentinel.lock().unwrap() = Some(candidate);
        Ok(lost)
    }

    /// Takes the usage of this replica's calls that Redis ran without their answer
    /// arriving (it stopped before sending it, or the connection dropped) back out: the
    /// Firestore fallback decided those changes too (or failed, and its client was told
    /// so). Out of the cached record where there is one (the writer takes that to the
    /// document like any change), else out of the document, which the record's write reached
    /// first, and the provider is reloaded, as after a fallback. Given up (logged) where the
    /// call's epoch is gone (an operator has set `used` since). A keyed change needs none of this: the document
    /// settles its key (see `settle_twice_decided`). One settlement at a time.
    pub async fn settle_unanswered(&self) -> Result<(), StorageError> {
        let mut unsettled = self.unsettled.lock().await;
        let phase = self.phase().0;
        for unanswered in self.counters.settle_unanswered().await? {
            let Unanswered {
                provider,
                usage,
                settled,
                ..
            } = &unanswered;
            let place = match settled {
                Settled::Record => "record",
                Settled::Lost => "lost",
                Settled::Ledger { .. } => "ledger",
            };
            tracing::warn!(%provider, usage, place, "a call Redis ran without answering was decided in Firestore \
                too: its usage is taken back out");
            match settled {
                Settled::Record if phase != Phase::RedisPrimary => self.writer.enqueue(provider.clone()),
                Settled::Ledger { epoch } => {
                    if self.counters.forget_unanswered(&unanswered).await? {
                        unsettled.push((provider.clone(), *usage, epoch.clone()));
                    }
                    continue; // counted once it lands
                }
                _ => {}
            }
            metrics::counter!("quotad_unanswered_settled_total", "in" => place).increment(1);
        }
        while let Some((provider, usage, epoch)) = unsettled.pop() {
            match self.ledger.add_used(&provider, -usage, &epoch).await {
                Ok(true) => {
                    metrics::counter!("quotad_unanswered_settled_total", "in" => "ledger").increment(1);
                    // a record loaded before it landed reloads
                    self.ledger.note_changed_outside(&provider).await?;
                }
                Ok(false) => {
                    tracing::warn!(%provider, usage, "the document is in another epoch now (an operator set the \
                        usage, or a later record was written and dropped): not taken out");
                    metrics::counter!("quotad_unanswered_settled_total", "in" => "lost").increment(1);
                }
                Err(err) => {
                    unsettled.push((provider, usage, epoch));
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Reloads the providers Firestore decided while Redis was away: writes what Redis
    /// still holds unsynced, then drops the records so the next request loads them.
    pub async fn reconcile(&self) -> Result<usize, StorageError> {
        // This replica's changes that Redis lost (it came back empty) reach the documents
        // before Redis decides again: a record reloaded without them would miss them.
        for provider in self.writer.held_providers() {
            let record = self.counters.read(&provider).await?;
            self.write_lost_held(&provider, record.as_ref()).await?;
        }
        // Before the reloads, which then take what it settled in records along.
        if let Err(err) = self.settle_unanswered().await {
            if err.is_unavailable() {
                return Err(err);
            }
            tracing::warn!(error = %err, "settling calls Redis did not answer failed; will retry");
        }
        let mut done = 0;
        // Marks of busy records stay for the next reconcile; one must not stop the others.
        let mut deferred = std::collections::HashSet::new();
        loop {
            let changed = self.ledger.changed_outside(200 + deferred.len()).await?;
            let changed: Vec<_> = changed.into_iter().filter(|p| !deferred.contains(p)).collect();
            if changed.is_empty() {
                return Ok(done);
            }
            for provider in &changed {
                if !self.reload(provider).await? {
                    Self::reload_deferred(provider, "reconcile");
                    deferred.insert(provider.clone());
                    continue;
                }
                self.ledger.clear_changed_outside(provider).await?;
                done += 1;
            }
        }
    }

    /// Reloads the held providers whose Firestore decisions have landed (see
    /// [`Handover`]) and releases them to Redis. Returns how many it released.
    pub async fn hand_back(&self) -> usize {
        let mut released = 0;
        if !self.redis_is_up() {
            return 0; // the recovery makes them ready again
        }
        for provider in self.handover.ready() {
            match self.reload(&provider).await {
                Ok(reloaded) => {
                    if !reloaded {
                        // Holding it would only make this replica's requests wait; its mark
                        // stays, for the periodic reconcile to try again.
                        Self::reload_deferred(&provider, "hand-back");
                    }
                    self.handover.reloaded(&provider);
                    released += 1;
                }
                Err(err) if err.is_redis() && err.is_unavailable() => {
                    // Held until Redis is back and reconciled.
                    self.redis_failed(&err);
                    return released;
                }
                Err(err) => {
                    // e.g. Firestore unavailable, or a record other replicas keep dirty
                    tracing::warn!(%provider, error = %err, "reloading a held provider failed; will retry");
                }
            }
        }
        released
    }
}

/// How long a replica cut off from Redis waits after announcing its fallbacks for a
/// provider before the first decides ([`QuotaService::announce`]): time for the others'
/// writes of what they decided from Redis to land (a Firestore write, 50-200 ms in
/// production). The requests' deadline bounds the wait and the announcement's write, as it
/// bounds the other waits before a fallback decides (API.md's 2 s).
const ANNOUNCE_WAIT: Duration = Duration::from_millis(300);

/// How often replicas that reach Redis look for other replicas' fallback marks in
/// `dual-write` ([`QuotaService::watch_marks`]), from the start of one poll to the next's:
/// a mark is acted on at most this plus one query's time after it lands, before the
/// fallback decides ([`ANNOUNCE_WAIT`] after its mark's write came back) while a query
/// takes under ~100 ms (Firestore in the same region: tens of ms). Each poll is one query
/// (one document read when it finds nothing): 5 a second per replica, about 430,000 reads
/// a day.
pub const MARK_POLL: Duration = Duration::from_millis(200);

/// After this long without a fallback for a provider, the next one announces again: the
/// others take a mark for a replica still deciding in Firestore for
/// [`FallbackMark::RECENT_MS`] (2 s) only.
const ANNOUNCE_FRESH: Duration = Duration::from_millis(1500);

/// A provider's fallbacks announced ([`QuotaService::announce`]).
#[derive(Debug, Clone)]
struct Announced {
    /// Its decisions wait until then, once the announcement is written.
    until: Arc<tokio::sync::OnceCell<tokio::time::Instant>>,
    /// When its last fallback arrived.
    last: tokio::time::Instant,
}

/// How long a fence outlives a holder that stopped renewing it (a crashed replica).
const FENCE_TTL: Duration = Duration::from_secs(5);

/// How often a holder renews its fence while its decision runs.
const FENCE_RENEW: Duration = Duration::from_millis(1500);

/// How long a decision waits for fences to lift before it decides in Firestore: longer
/// than a dead holder's fence lasts.
const FENCE_WAIT: Duration = Duration::from_secs(6);

/// How often a decision that met a fence looks again.
const FENCE_POLL: Duration = Duration::from_millis(5);

/// What [`QuotaService::load`] did with the document it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loaded {
    /// Cached (or another replica had cached it first).
    Cached,
    /// Refused by Redis: a Firestore decision for the provider was fenced meanwhile (see
    /// [`QuotaService::change_fenced`]).
    Fenced,
    /// Not cached: its usage lies beyond what Redis counts exactly ([`exact`]), so that
    /// Firestore decides for it in every phase, by one rule.
    Beyond,
    /// Not cached: another replica decided for it in Firestore lately, for lack of Redis
    /// ([`QuotaService::deciding_elsewhere`]). Firestore decides here too until that
    /// replica stops: two replicas deciding apart, one in Redis and one in Firestore,
    /// would each admit what the other has.
    Away,
}

/// Whether a held record's write may move its document to the record's epoch (see
/// [`QuotaService::write_held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lineage {
    /// It may: no record can have been loaded from the document and written meanwhile.
    May,
    /// It may not, and never will: a record of another epoch is in Redis. A document in
    /// another epoch drops the held record.
    Keep,
    /// It may not for now (Redis answers again, and the reconcile, under a fence, decides):
    /// a document in another epoch leaves the held record held.
    Try,
}

/// How a decision goes to Firestore.
#[derive(Debug, Clone, Copy)]
enum InFirestore {
    /// Redis answers: under a fence ([`QuotaService::change_fenced`]).
    Fenced,
    /// Redis is away: marked for a reload, and counted by the [`Handover`].
    Fallback,
}

/// A fence held while Firestore decides (see [`Counters::fence`]). Released by
/// [`Fence::release`]; if the decision is dropped instead (its client went away), the
/// release runs in the background.
struct Fence {
    counters: Arc<dyn Counters>,
    provider: ProviderId,
    token: String,
    held: bool,
}

impl Fence {
    async fn release(mut self) {
        self.held = false;
        if let Err(err) = self.counters.unfence(&self.provider, &self.token).await {
            // It expires by itself; until then loads of this provider are refused and its
            // decisions go to Firestore.
            tracing::warn!(provider = %self.provider, error = %err, "could not release a fence");
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        if self.held
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (counters, provider, token) = (
                self.counters.clone(),
                self.provider.clone(),
                std::mem::take(&mut self.token),
            );
            runtime.spawn(async move {
                let _ = counters.unfence(&provider, &token).await;
            });
        }
    }
}

impl StorageError {
    /// Whether this error came from Redis (the counters), not Firestore.
    pub fn is_redis(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable { backend: "redis", .. } | StorageError::Other { backend: "redis", .. }
        )
    }
}

/// A fallback's fence (see [`Counters::fence_outdated`]), one per provider however many of
/// this replica's fallbacks are in flight for it: taken when Redis runs it (a hung Redis:
/// when it wakes, before what other replicas send after), renewed while decisions run,
/// released once the last has `landed`. Without it, a Redis that wakes while a decision
/// waits out its grace or its transaction would let another replica load the document
/// without it, or decide from a record that misses it, and both admit the last unit. A
/// Redis that does not take the call leaves it to the outdated mark after the decision.
/// The release goes on the fence's connection, behind it (a fence that timed out may still
/// run), and is tried again until it is done or the fence has expired anyway.
async fn hold_fallback_fence(counters: Arc<dyn Counters>, provider: ProviderId, landed: Arc<tokio::sync::Notify>) {
    let token = new_epoch();
    let sent = tokio::time::Instant::now();
    let fenced = counters.fence_outdated(&provider, &token, FENCE_TTL).await;
    // A call that failed at once (Redis refused it) never ran; one that waited may yet.
    let may_run = fenced.is_ok() || sent.elapsed() >= Duration::from_secs(1);
    match fenced {
        Ok(()) => loop {
            tokio::select! {
                () = landed.notified() => break,
                () = tokio::time::sleep(FENCE_RENEW) => {
                    if let Err(err) = counters.renew_fence(&provider, &token, FENCE_TTL).await {
                        tracing::debug!(%provider, error = %err, "could not renew a fallback's fence");
                    }
                }
            }
        },
        Err(err) => {
            tracing::debug!(%provider, error = %err, "could not fence a fallback's provider");
            landed.notified().await;
        }
    }
    let until = tokio::time::Instant::now() + FENCE_TTL;
    loop {
        match counters.unfence_outdated(&provider, &token).await {
            Ok(()) => return,
            Err(_) if !may_run => return,
            Err(err) if tokio::time::Instant::now() >= until => {
                return tracing::warn!(%provider, error = %err, "could not release a fallback's fence; it expires");
            }
            Err(_) => tokio::time::sleep(FENCE_POLL * 20).await,
        }
    }
}

/// Sets the count of [`QuotaService::write_held_now`] back to 0 when its task ends without
/// finishing (a panic, or the runtime dropping it): forgotten when it finishes.
struct HeldWrites<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for HeldWrites<'_> {
    fn drop(&mut self) {
        self.0.store(0, std::sync::atomic::Ordering::Release);
    }
}
