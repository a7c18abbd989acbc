//! The two ports the domain talks to, and their adapters.
//!
//! - [`Counters`]: the fast, atomic store that decides (Redis, or [`memory`] in-process).
//! - [`Ledger`]: the durable system of record (Firestore, or [`memory`] in-process).
//!
//! # How a change reaches the ledger exactly once
//!
//! A cached [`Record`] carries an `epoch` (random, chosen when it was loaded from the
//! ledger), the `base` usage it was loaded at, the ledger epoch it was `loaded_from`, a
//! `version` bumped by every change and `synced`, the last version the ledger holds. The
//! ledger document keeps quotad's bookkeeping next to the legacy fields: the epoch, the
//! version and the `watermark` (the record's usage already added to `aiCallsUsed`). A write
//! adds `used - watermark` (or `used - base` for a new epoch) in one transaction, so replays
//! add nothing and other writers' increments survive (see `Ledger::write_record`).

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{
    Phase, ProviderId,
    ratelimit::{Anomaly, RateCheck, RateDecision},
};

pub mod firestore;
pub mod memory;
pub mod redis;

/// A storage failure. `Unavailable` means the backend did not answer (refused, timed out,
/// dropped): the caller may fall back or retry. `Other` is a bug or a refused request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("{backend} unavailable: {message}")]
    Unavailable { backend: &'static str, message: String },
    #[error("{backend}: {message}")]
    Other { backend: &'static str, message: String },
}

impl StorageError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }
}

/// A provider's cached counter as the domain sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub used: i64,
    pub limit: i64,
    pub epoch: String,
    pub base: i64,
    pub loaded_from: String,
    pub version: u64,
    pub synced: u64,
    /// Set by a rebase ([`Counters::rebase`]; `None` after a plain load): the document's
    /// watermark of the record's previous epoch when the rebase read it.
    pub from_watermark: Option<i64>,
    /// When the record was loaded or rebased from the ledger (unix ms, by Redis's clock for
    /// a Redis record; `None` for one an older quotad wrote): the cache TTL runs from then.
    pub loaded_ms: Option<i64>,
    /// Firestore may have decided for the provider since this record was loaded (a replica
    /// that could not reach Redis did, see [`Counters::mark_outdated`]): no decision or
    /// lookup uses it until it is reloaded.
    pub outdated: bool,
}

impl Record {
    pub fn is_dirty(&self) -> bool {
        self.version > self.synced
    }

    /// What this record's first write adds to a document still in the epoch it was loaded
    /// (or rebased) from, whose watermark is now `doc_watermark`: its usage since then. A
    /// rebased record carried the previous epoch's unwritten usage; the writes of that
    /// epoch that landed after the rebase read the document added exactly the watermark's
    /// move since (negative after refunds), so that much is already there.
    pub fn unsynced_since_load(&self, doc_watermark: i64) -> i64 {
        let late = self.from_watermark.map_or(0, |read| doc_watermark - read);
        self.used - self.base - late
    }
}

/// What a record is created from: the ledger document as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub used: i64,
    pub limit: i64,
    /// The new record's epoch.
    pub epoch: String,
    /// The document's epoch at the time of the read ("" when it has none).
    pub loaded_from: String,
    /// The document's idempotency records, for Redis to answer their retries.
    pub keys: Vec<KeyRecord>,
    /// The provider's fence generation ([`Counters::fence_gen`]) read before the document:
    /// a load is refused when a Firestore decision was fenced since (0: none known).
    pub fence: u64,
    /// The record is written outdated ([`Record::outdated`]): another replica decides for
    /// the provider in the ledger these moments, for lack of Redis, and Redis will not see
    /// those decisions. Marked in the same step as the write, so that no decision is made
    /// from the record in between. A record that the write leaves in place is marked too.
    pub outdated: bool,
}

/// What [`Counters::rebase`] puts a record onto: the document's usage and its watermark of
/// the record's epoch, read together, and the document's idempotency records.
#[derive(Debug, Clone, Copy)]
pub struct RebaseOnto<'a> {
    pub used: i64,
    pub watermark: i64,
    pub keys: &'a [KeyRecord],
    /// What becomes of the record's outdated mark ([`Record::outdated`]).
    pub mark: RebaseMark,
}

/// What a rebase does with the record's outdated mark. A mark is sent after the Firestore
/// decision it stands for has landed, so a mark the record had when it was read before
/// the document is one the document has seen; one that arrived since may stand for a
/// decision the document was read without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebaseMark {
    /// Marked outdated, as [`Seed::outdated`]: another replica decides in the ledger these
    /// moments.
    Set,
    /// Cleared: the record was read outdated before the document; it holds what the
    /// document holds now.
    Clear,
    /// Left as it is: the record was read without a mark, so any mark it has now came
    /// after the document was read.
    Keep,
}

/// Consume or refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Consume,
    Refund,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Consume => "consume",
            Op::Refund => "refund",
        }
    }
}

/// One consume or refund to apply atomically.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub op: Op,
    pub amount: i64,
    pub idempotency_key: Option<&'a str>,
    /// Answer with the record as the change left it while it holds changes not yet in the
    /// ledger ([`Applied::Decided`]): `dual-write` holds it until the writer has carried it.
    pub with_record: bool,
}

/// The decided answer of a consume or refund (also what an idempotency key replays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub used: i64,
    pub limit: i64,
}

/// What the counters said about a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// No record: load it from the ledger, then apply again.
    Miss,
    /// The record is outdated ([`Record::outdated`]): nothing was applied; Firestore decides,
    /// and the record is reloaded.
    Outdated,
    /// Decided now; when the change asked for it ([`Change::with_record`]), with the record
    /// as the change left it while it holds changes not yet in the ledger (for the last
    /// change of those sent together, at least), so that this replica can write them should
    /// the counters lose the record or stop answering before the writer has read it.
    Decided(Decision, Option<Box<Record>>),
    /// The idempotency key was used before with this amount: its first answer.
    Replayed(Decision),
    /// The idempotency key was used before with another amount.
    KeyReused,
}

/// What [`Counters::mark_synced`] left of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Clean now (it lives the cache TTL from its load), or there is no record.
    Clean,
    /// Still dirty (changed since the version written), loaded within the cache TTL.
    Dirty,
    /// Still dirty, and loaded longer than the cache TTL ago by the backend's clock (Redis
    /// `TIME`), or with no load time (an older quotad loaded it): it never expires, so it is
    /// time to rebase it.
    Outlived,
    /// The provider's record is of another epoch now: this one was replaced.
    Replaced,
}

/// How long idempotency keys are remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// An idempotency record as both stores keep it: the key's id (see [`idempotency_id`])
/// and its [`IdempotencyEntry`] rendered. Records travel with the usage: Redis hands the
/// ones it decided to the ledger with the next write, and a record loaded from the ledger
/// brings the ledger's, so a retry is answered once whichever store decides it.
pub type KeyRecord = (String, String);

/// One record to write in a batch: the provider, its record and its pending idempotency
/// records.
pub type RecordWrite = (ProviderId, Record, Vec<KeyRecord>);

/// The id of an idempotency key for one endpoint: `c:` or `r:` and a 128-bit FNV-1a
/// digest in hex, so any printable key makes a short id safe in both stores.
pub fn idempotency_id(op: Op, key: &str) -> String {
    let fnv = |offset: u64| {
        key.bytes().fold(offset, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    format!(
        "{}:{:016x}{:016x}",
        &op.as_str()[..1],
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

/// At most this many idempotency records per document (the oldest go first): a document
/// must stay well below Firestore's 1 MiB and index-entry limits.
pub const KEYS_PER_DOCUMENT: usize = 1000;

/// Adds idempotency records to a document's map, dropping expired ones and, past
/// [`KEYS_PER_DOCUMENT`], the oldest. A record already there is kept (the first answer).
pub fn merge_keys(map: &mut std::collections::BTreeMap<String, String>, new: &[KeyRecord], now_ms: i64) {
    map.retain(|_, entry| IdempotencyEntry::parse(entry).is_some_and(|e| e.expires_ms > now_ms));
    for (id, entry) in new {
        if IdempotencyEntry::parse(entry).is_some_and(|e| e.expires_ms > now_ms) {
            map.entry(id.clone()).or_insert_with(|| entry.clone());
        }
    }
    if map.len() > KEYS_PER_DOCUMENT {
        let mut by_expiry: Vec<(i64, String)> = map
            .iter()
            .map(|(id, entry)| (IdempotencyEntry::parse(entry).map_or(0, |e| e.expires_ms), id.clone()))
            .collect();
        by_expiry.sort();
        for (_, oldest) in by_expiry.into_iter().take(map.len() - KEYS_PER_DOCUMENT) {
            map.remove(&oldest);
        }
    }
}

/// How a ledger records a key the Firestore fallback decided: the answer, then the epoch
/// the document was at (`-`: none). The epoch tells [`settle_twice_decided`] whether the
/// fallback's change is still in the document's usage (an operator's `used` starts another
/// epoch and replaces it; a record's write that moves the document on carries it:
/// [`carry_fallback_keys`]); readers of the answer ignore it.
pub fn fallback_key_entry(entry: &IdempotencyEntry, doc_epoch: Option<&str>) -> String {
    format!("{}:{}", entry.render(), doc_epoch.unwrap_or("-"))
}

/// A write that moves a document from epoch `from` (`None`: none) to `to` by adding a
/// record's delta keeps the document's usage, and with it the changes of the keys the
/// fallback recorded in `from`: they are re-stamped with `to`, so that
/// [`settle_twice_decided`] still finds them in the usage when Redis's answer of the same
/// key comes with a later write. (Only an operator's `used` starts an epoch that leaves
/// them out.) Returns whether any was.
pub fn carry_fallback_keys(
    known: &mut std::collections::BTreeMap<String, String>,
    from: Option<&str>,
    to: &str,
) -> bool {
    let from = from.unwrap_or("-");
    let mut carried = false;
    if from == to {
        return false;
    }
    for entry in known.values_mut() {
        if fallback_epoch(entry) == Some(from) {
            entry.truncate(entry.len() - from.len());
            entry.push_str(to);
            carried = true;
        }
    }
    carried
}

/// Ends a pending idempotency record decided by a record whose usage never reaches the
/// ledger (dropped as stale, or replaced by an operator's `used`): an epoch no document
/// has. Redis's `pending_dropped.lua` appends the same.
pub const DROPPED_TAG: &str = ":dropped";

/// The document epoch a [`fallback_key_entry`] was recorded at (`None`: not the fallback's;
/// a pending record Redis marked has [`DROPPED_TAG`]'s instead).
fn fallback_epoch(raw: &str) -> Option<&str> {
    raw.splitn(6, ':').nth(5)
}

/// Settles keys decided twice before `keys` (records Redis decided, on their way to the
/// ledger with the record's write) join a document's map `known`. A key the Firestore
/// fallback recorded in the document's current epoch `doc_epoch` with another answer, while
/// Redis's answer was still alive (their expiry times less than a key's life apart), was
/// decided twice: while Redis was away the fallback could not see Redis's unsynced records.
/// Its change is then in the document twice, once through that decision and once through
/// the record's delta. Redis's answer stands (Redis replays it): the fallback's change is
/// taken out of the document, and the map takes Redis's answer, so a later write of the
/// same key finds nothing to settle. Except where Redis denied a consume that the fallback
/// admitted: that admission may have been acted on, so it stays, and so does its answer
/// (without its epoch: settled); Redis's own record of the key still replays its denial
/// until it expires. Redis's answer of a record that was dropped before its write
/// ([`DROPPED_TAG`]) has no usage in the document to take out: nothing is settled. Two
/// answers of different amounts are two requests (a key reused, which Redis and the
/// fallback could not see of each other): both changes stay counted, and the map keeps the
/// first request's answer (the earlier expiry). Returns what to add to the document's
/// usage, and whether `known` changed. (A fallback refund that left usage at 0 may have
/// given back less than its amount: it is left as it is.)
pub fn settle_twice_decided(
    known: &mut std::collections::BTreeMap<String, String>,
    keys: &[KeyRecord],
    doc_epoch: Option<&str>,
    now_ms: i64,
) -> (i64, bool) {
    let (mut correction, mut changed) = (0, false);
    for (id, entry) in keys {
        let Some(prior) = known.get(id).filter(|prior| *prior != entry) else {
            continue;
        };
        if entry.ends_with(DROPPED_TAG) {
            continue;
        }
        // only the fallback's decisions carry an epoch, and only one of this epoch is in
        // the document's usage
        if fallback_epoch(prior) != Some(doc_epoch.unwrap_or("-")) {
            continue;
        }
        let (Some(theirs), Some(ours)) = (IdempotencyEntry::parse(prior), IdempotencyEntry::parse(entry)) else {
            continue;
        };
        if theirs.expires_ms <= now_ms || (theirs.expires_ms - ours.expires_ms).abs() >= idempotency_ttl_ms() {
            continue;
        }
        if theirs.amount != ours.amount {
            // the first request's answer is the key's (the other is told 422 from now on)
            if ours.expires_ms < theirs.expires_ms {
                known.insert(id.clone(), entry.clone());
                changed = true;
            }
            continue;
        }
        // what to add to the usage, and the answer that stands: Redis's, but where Redis
        // denied a consume the fallback admitted (another change made room before the
        // fallback read the document) the admission may have been acted on, so it stays
        // counted, and its answer stands, settled (without its epoch)
        let (undo, stands) = match (theirs.decision.allowed, id.starts_with("r:")) {
            (true, false) if !ours.decision.allowed => (0, theirs.render()),
            (false, _) => (0, entry.clone()),
            (true, false) => (-theirs.amount, entry.clone()),
            (true, true) if theirs.decision.used > 0 => (theirs.amount, entry.clone()),
            (true, true) => continue,
        };
        tracing::warn!(key = %id, undo, fallback_stands = stands != *entry,
            "an idempotency key was decided twice (Redis and the Firestore fallback): counted once");
        metrics::counter!("quotad_idempotency_settled_total").increment(1);
        correction += undo;
        known.insert(id.clone(), stands);
        changed = true;
    }
    (correction, changed)
}

/// A recorded first answer: `amount:allowed:used:limit:expiresMs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyEntry {
    pub amount: i64,
    pub decision: Decision,
    /// Unix ms after which the key is forgotten.
    pub expires_ms: i64,
}

/// How long idempotency keys are remembered, in ms.
fn idempotency_ttl_ms() -> i64 {
    i64::try_from(IDEMPOTENCY_TTL.as_millis()).unwrap_or(i64::MAX)
}

impl IdempotencyEntry {
    /// The answer to a change decided at `now_ms`, remembered for [`IDEMPOTENCY_TTL`].
    pub fn new(amount: i64, decision: Decision, now_ms: i64) -> Self {
        Self {
            amount,
            decision,
            expires_ms: now_ms + idempotency_ttl_ms(),
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let mut parts = raw.split(':').map(str::parse::<i64>);
        let mut next = || parts.next()?.ok();
        let (amount, allowed, used, limit, expires_ms) = (next()?, next()?, next()?, next()?, next()?);
        Some(Self {
            amount,
            decision: Decision {
                allowed: allowed == 1,
                used,
                limit,
            },
            expires_ms,
        })
    }

    pub fn render(&self) -> String {
        let d = self.decision;
        format!(
            "{}:{}:{}:{}:{}",
            self.amount,
            u8::from(d.allowed),
            d.used,
            d.limit,
            self.expires_ms
        )
    }
}

/// The fast, atomic store: decides consumes and refunds, caches records.
#[async_trait]
pub trait Counters: Send + Sync {
    /// `"redis"` or `"memory"`, for logs.
    fn kind(&self) -> &'static str;
    /// Answers when the backend is reachable.
    async fn ping(&self) -> Result<(), StorageError>;
    /// The cached record, if any.
    async fn read(&self, provider: &ProviderId) -> Result<Option<Record>, StorageError>;
    /// Creates the record from `seed` unless one exists (another replica may have won);
    /// a new record is clean and expires after `ttl`; with [`Seed::outdated`] it, or the
    /// record that was there, is marked outdated. Returns `false` (and creates nothing)
    /// while a fence is held, or when the fence generation is no longer `seed.fence`: a
    /// Firestore decision may have changed the document after it was read.
    async fn load(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<bool, StorageError>;
    /// The provider's fence generation: bumped when a fence is taken and when it is
    /// released (0 when none is known).
    async fn fence_gen(&self, provider: &ProviderId) -> Result<u64, StorageError>;
    /// Takes a fence (`token`, expiring after `ttl` if never released) while Firestore
    /// decides for the provider: no record loads until it is released, so none can miss
    /// that decision. Drops the record unless it is dirty; returns whether it is gone (if
    /// not: flush it, then [`Counters::evict_clean`]).
    async fn fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<bool, StorageError>;
    /// Takes a fence (as [`Counters::fence`]) for a decision that Firestore makes because
    /// Redis did not answer the deciding replica, and marks the record outdated (keeping
    /// it) instead of dropping it: from when Redis runs it, no replica loads a record, or
    /// decides from one, that may miss that decision. Sent so that a hung Redis runs it when
    /// it wakes, before what other replicas send after (as [`Counters::mark_outdated`]).
    async fn fence_outdated(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError>;
    /// Releases a fence taken with [`Counters::fence_outdated`], sent as that was (so that
    /// it runs after it).
    async fn unfence_outdated(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError>;
    /// Extends a fence its holder still works under: it expires `ttl` from now.
    async fn renew_fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError>;
    /// Whether a fence is held on the provider (loads are refused while one is).
    async fn fence_held(&self, provider: &ProviderId) -> Result<bool, StorageError>;
    /// Reloads a live record without dropping it (one that other replicas keep dirty): if it
    /// is still of `epoch`, it becomes `new_epoch` with the document's usage `onto.used` as
    /// its base, carrying what it holds above `onto.watermark`; the document's idempotency
    /// records come along. Its outdated mark becomes what `onto.mark` says.
    /// Returns whether it did.
    async fn rebase(
        &self,
        provider: &ProviderId,
        epoch: &str,
        new_epoch: &str,
        onto: &RebaseOnto<'_>,
    ) -> Result<bool, StorageError>;
    /// Releases a fence taken with [`Counters::fence`].
    async fn unfence(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError>;
    /// Applies a consume or refund atomically with its idempotency record; a change makes
    /// the record dirty (it no longer expires) and indexes it for the writer.
    async fn apply(&self, provider: &ProviderId, change: &Change<'_>) -> Result<Applied, StorageError>;
    /// Records that the ledger holds `version` of `epoch` (never lowers `synced`) and the
    /// idempotency records `transferred`; takes `limit` from the ledger; a record that
    /// became clean gets the TTL counted from its load (or rebase). Says what is left (so
    /// the caller need not read the record again).
    async fn mark_synced(
        &self,
        provider: &ProviderId,
        epoch: &str,
        version: u64,
        limit: i64,
        ttl: Duration,
        transferred: &[String],
    ) -> Result<Synced, StorageError>;
    /// Idempotency records decided here and not yet in the ledger.
    async fn pending_keys(&self, provider: &ProviderId) -> Result<Vec<KeyRecord>, StorageError>;
    /// Marks the record outdated ([`Record::outdated`]), if there is one: a replica that
    /// decided for the provider in Firestore while it could not reach Redis says so, for the
    /// replicas that still can. A load or a rebase clears the mark (unless it writes the
    /// record outdated itself: [`Seed::outdated`], [`RebaseMark`]).
    async fn mark_outdated(&self, provider: &ProviderId) -> Result<(), StorageError>;
    /// Takes back out the usage of this replica's changes whose call went unanswered but
    /// that the backend ran (Redis stopped after running it, or the connection dropped):
    /// their sender decided them from the ledger as well. Where the provider's record is
    /// cached the usage comes out of it, as a change of its own ([`Settled::Record`]); the
    /// rest, whose usage has reached the ledger, is for the caller to take out there, then
    /// forget with [`Counters::forget_unanswered`] (until then it is returned again).
    /// Backends that always answer have none.
    async fn settle_unanswered(&self) -> Result<Vec<Unanswered>, StorageError> {
        Ok(Vec::new())
    }
    /// Forgets what [`Counters::settle_unanswered`] returned for the ledger, which the
    /// caller takes out there; `false` when it was forgotten already (by a concurrent call).
    async fn forget_unanswered(&self, _unanswered: &Unanswered) -> Result<bool, StorageError> {
        Ok(false)
    }
    /// Drops a clean record. Returns `false` (and keeps it) when it is dirty.
    async fn evict_clean(&self, provider: &ProviderId) -> Result<bool, StorageError>;
    /// Drops the record if it is still of `epoch`, dirty or not (its document was reset),
    /// and marks the idempotency records it had not written ([`DROPPED_TAG`]): they still
    /// go to the ledger, but are never settled there. Returns whether it dropped it.
    async fn forget(&self, provider: &ProviderId, epoch: &str) -> Result<bool, StorageError>;
    /// Replaces the record (an operator set the quota); it is clean (and outdated with
    /// [`Seed::outdated`]). Under a fence, or when a fence was taken since `seed.fence` was
    /// read, it drops the record instead. Either way the replaced record's pending
    /// idempotency records are marked, as [`Counters::forget`] marks them. A record loaded
    /// from the document `seed` was written with (`seed.loaded_from`) already starts from
    /// the operator's usage: it stays, its pending idempotency records unmarked (and it is
    /// marked outdated with [`Seed::outdated`]).
    async fn replace(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<(), StorageError>;
    /// Sets the limit of a cached record, if there is one.
    async fn set_limit(&self, provider: &ProviderId, limit: i64) -> Result<(), StorageError>;
    /// Up to `max` dirty providers that have been dirty for at least `min_age`.
    async fn dirty(&self, min_age: Duration, max: usize) -> Result<Vec<ProviderId>, StorageError>;
    /// One page of cached records (`cursor` 0 starts; a returned 0 means done). Tools only.
    async fn scan_records(&self, cursor: u64, count: usize) -> Result<(u64, Vec<(ProviderId, Record)>), StorageError>;
    /// The id that marks this Redis data set: returns the one present, or stores
    /// `candidate` when there is none (an empty Redis) and returns `None` then.
    async fn ensure_sentinel(&self, candidate: &str) -> Result<Option<String>, StorageError>;
    /// Takes the sync lock for `ttl` unless another holder has it; `false` when taken.
    async fn acquire_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError>;
    /// Extends the lock while `token` still holds it; `false` when it was lost.
    async fn renew_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError>;
    /// Releases the lock if `token` holds it.
    async fn release_sync_lock(&self, token: &str) -> Result<(), StorageError>;
    /// The phase as a replica last read it from the ledger, mirrored here for replicas
    /// that cannot read the ledger (at start while Firestore is away).
    async fn phase_mirror(&self) -> Result<Option<(Phase, chrono::DateTime<chrono::Utc>)>, StorageError>;
    async fn set_phase_mirror(&self, phase: Phase, since: chrono::DateTime<chrono::Utc>) -> Result<(), StorageError>;
    /// Keeps the last sync report (JSON) for every replica's `GET /admin/sync`.
    async fn store_sync_report(&self, report: &str) -> Result<(), StorageError>;
    async fn last_sync_report(&self) -> Result<Option<String>, StorageError>;
    /// One rate-limit check, atomically with anomaly counting for plan-based keys.
    async fn rate_check(&self, check: &RateCheck<'_>) -> Result<RateDecision, StorageError>;
    /// The newest recorded anomalies first.
    async fn anomalies(&self, limit: usize) -> Result<Vec<Anomaly>, StorageError>;
}

/// A provider document as quotad reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    pub used: Option<i64>,
    pub limit: Option<i64>,
    pub epoch: Option<String>,
    /// The usage of `epoch` already added to `used`.
    pub watermark: Option<i64>,
    /// Idempotency records decided by (or carried into) this document, unexpired.
    pub keys: Vec<KeyRecord>,
    /// The last Firestore decision a replica made for lack of Redis.
    pub fallback: Option<FallbackMark>,
}

/// A decision on the Firestore fallback path (see [`Ledger::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback<'a> {
    /// The deciding replica's id.
    pub by: &'a str,
    /// Whether the document takes the replica's [`FallbackMark`]: while the replica cannot
    /// reach Redis at all (not when a call merely failed while Redis answers its pings: its
    /// own outdated mark reaches Redis then, and the mark would send every other replica's
    /// decisions for the provider to Firestore for nothing).
    pub mark_document: bool,
}

impl<'a> Fallback<'a> {
    /// A fallback of a replica cut off from Redis: it leaves its mark.
    pub fn marking(by: &'a str) -> Self {
        Self {
            by,
            mark_document: true,
        }
    }

    /// The mark this fallback writes at `now_ms` on a document whose mark is `current`,
    /// when `changes` (the decision writes the document anyway) or the mark is due and the
    /// document `has_usage` (a mark alone never creates a document).
    pub fn mark_to_write(
        &self,
        current: Option<&FallbackMark>,
        now_ms: i64,
        changes: bool,
        has_usage: bool,
    ) -> Option<FallbackMark> {
        let due = changes || (has_usage && FallbackMark::due(current, self.by, now_ms));
        (self.mark_document && due).then(|| FallbackMark {
            by: self.by.to_owned(),
            at_ms: now_ms,
        })
    }
}

/// A Firestore decision that a replica made because it could not reach Redis, as the
/// document records it (`quotadFallback`: `<unix ms> <replica id>`): which replica, and
/// when by its clock. A replica that does reach Redis learns from it, at its next write or
/// load, that the record Redis holds misses decisions (only one replica may have lost
/// Redis, a network split): see `QuotaService::flush` and `QuotaService::load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackMark {
    pub by: String,
    pub at_ms: i64,
}

impl FallbackMark {
    /// A mark is written again by the replica that wrote it after this long (ms), however
    /// often it decides: readers take a mark younger than [`FallbackMark::RECENT_MS`] for a
    /// replica still deciding in Firestore.
    pub const REFRESH_MS: i64 = 500;

    pub fn render(&self) -> String {
        format!("{} {}", self.at_ms, self.by)
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let (at, by) = raw.split_once(' ')?;
        Some(Self {
            at_ms: at.parse().ok()?,
            by: by.to_owned(),
        })
    }

    /// How long (ms) a replica takes another's mark for a replica still deciding in
    /// Firestore ([`FallbackMark::deciding_elsewhere`]).
    pub const RECENT_MS: i64 = 2_000;

    /// How far apart (ms) the clocks of replicas and Redis may be when a mark's time is
    /// compared with a record's load or a replica's own clock. NTP keeps servers within
    /// milliseconds. The marks of a replica whose clock is further ahead than this are
    /// ignored, those of one further behind age early and may be missed (either way its
    /// fallbacks are then seen only by the reconcile, every 5 s); none keeps others off
    /// Redis for longer than [`FallbackMark::RECENT_MS`] plus this.
    pub const CLOCK_SLACK_MS: i64 = 1_000;

    /// Whether a fallback decision by replica `by` at `now_ms` writes its mark: unless the
    /// document's `current` one is its own and younger than [`FallbackMark::REFRESH_MS`]
    /// (and the decision writes nothing else).
    pub fn due(current: Option<&Self>, by: &str, now_ms: i64) -> bool {
        !current.is_some_and(|mark| mark.by == by && (0..Self::REFRESH_MS).contains(&(now_ms - mark.at_ms)))
    }

    /// Whether this mark says that a replica other than `me` decided in Firestore after a
    /// record was loaded at `loaded_ms` (`None`: an older quotad's record, of unknown age),
    /// or so shortly before that clocks cannot tell: Redis never saw that decision. A mark
    /// from further ahead than the clocks' slack of `now_ms` is ignored.
    pub fn missed_by(&self, me: &str, loaded_ms: Option<i64>, now_ms: i64) -> bool {
        self.by != me
            && self.at_ms >= loaded_ms.unwrap_or(i64::MIN / 2) - Self::CLOCK_SLACK_MS
            && self.at_ms <= now_ms + Self::CLOCK_SLACK_MS
    }

    /// Whether this mark says that a replica other than `me` decides in Firestore these
    /// moments: younger than [`FallbackMark::RECENT_MS`] at `now_ms`, allowing for clocks
    /// apart either way.
    pub fn deciding_elsewhere(&self, me: &str, now_ms: i64) -> bool {
        let age = now_ms - self.at_ms;
        self.by != me && (-Self::CLOCK_SLACK_MS..Self::RECENT_MS + Self::CLOCK_SLACK_MS).contains(&age)
    }
}

impl Document {
    /// Its usage as quotad counts it ([`exact`]); 0 when it stores none.
    pub fn used(&self) -> i64 {
        exact(self.used.unwrap_or(0))
    }

    /// Whether its stored usage lies beyond [`EXACT_MAX`]: Redis does not cache it, and
    /// Firestore decides for it in every phase.
    pub fn used_beyond_exact(&self) -> bool {
        self.used.is_some_and(|used| used != exact(used))
    }

    /// Its limit as quotad counts it ([`exact`]), or `default` when it stores none.
    pub fn limit_or(&self, default: i64) -> i64 {
        exact(self.limit.unwrap_or(default))
    }
}

/// What a [`Ledger::write_record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The delta landed (or had landed before); the ledger holds this version. `limit` is
    /// the document's limit (or `None` when it stores none).
    Written {
        limit: Option<i64>,
        /// The document's [`Document::fallback`] as the write read it.
        fallback: Option<FallbackMark>,
    },
    /// The document belongs to another epoch now: this record is stale.
    Stale,
}

/// The answer of a decision made by a ledger transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerDecision {
    Decided(Decision),
    Replayed(Decision),
    KeyReused,
}

/// Usage that an unanswered call added to a provider (see
/// [`Counters::settle_unanswered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    pub provider: ProviderId,
    /// What the call added to the provider's usage (negative: it refunded).
    pub usage: i64,
    /// The backend's id of the call.
    pub call: u64,
    pub settled: Settled,
}

/// Where [`Counters::settle_unanswered`] took an unanswered call's usage out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Out of the cached record.
    Record,
    /// Nowhere: the record is of another lineage than the call's (an operator set `used`
    /// since, and the call's usage went with the old epoch).
    Lost,
    /// Not yet: the record was written and dropped. The ledger's to take out, while the
    /// document is still in the record's epoch, which wrote it there (`epoch`: its first
    /// characters).
    Ledger { epoch: String },
}

/// The durable system of record.
#[async_trait]
pub trait Ledger: Send + Sync {
    fn kind(&self) -> &'static str;
    async fn ping(&self) -> Result<(), StorageError>;
    /// Reads a provider document (`None`: it does not exist).
    async fn read(&self, provider: &ProviderId) -> Result<Option<Document>, StorageError>;
    /// Adds the record's unsynced delta to the document exactly once (see module docs),
    /// with the idempotency records `keys` in the same write.
    async fn write_record(
        &self,
        provider: &ProviderId,
        record: &Record,
        keys: &[KeyRecord],
    ) -> Result<WriteOutcome, StorageError>;
    /// Writes many records at once (the batch sync, at most 500); one answer per record.
    /// Adapters without batches write them one by one.
    async fn write_records(
        &self,
        items: &[RecordWrite],
    ) -> Result<Vec<Result<WriteOutcome, StorageError>>, StorageError> {
        let mut answers = Vec::with_capacity(items.len());
        for (provider, record, keys) in items {
            answers.push(self.write_record(provider, record, keys).await);
        }
        Ok(answers)
    }
    /// Decides a consume or refund in one transaction on the document, with its
    /// idempotency record, retrying on contention. A `fallback` (the path taken when Redis
    /// failed) marks the provider as changed outside Redis, so Redis reloads it later; and,
    /// when [`Fallback::mark_document`], the document records it ([`Document::fallback`],
    /// rewritten by the same replica at most every [`FallbackMark::REFRESH_MS`] unless
    /// the decision writes anyway, and only on a document that has a usage: see
    /// [`FallbackMark::due`]), stamped with the time of the attempt that lands.
    async fn decide(
        &self,
        provider: &ProviderId,
        change: &Change<'_>,
        default_limit: i64,
        fallback: Option<Fallback<'_>>,
    ) -> Result<LedgerDecision, StorageError>;
    /// Writes replica `by`'s [`FallbackMark`] into the provider's document before a
    /// fallback consume decides (see `QuotaService::announce`), stamped with the time of the
    /// attempt that lands; a document that does not exist yet is created with a usage of 0
    /// (which it holds as an absent one does), so that replicas that reach Redis find the
    /// mark at their first write: the one place where a mark comes without a decision's
    /// write (compare [`Fallback::mark_to_write`]). Nothing else of the document changes.
    async fn announce_fallback(&self, provider: &ProviderId, by: &str) -> Result<(), StorageError>;
    /// Adds `delta` to the document's usage (never below 0), as another writer would (no
    /// epoch or watermark of quotad's changes), if `epoch` is the first 8 characters of the
    /// document's epoch (all of a shorter one; epochs are random). Returns whether it did.
    async fn add_used(&self, provider: &ProviderId, delta: i64, epoch: &str) -> Result<bool, StorageError>;
    /// Sets `used` and/or `limit`. When `used` is set the document starts `new_epoch` with
    /// that usage as its watermark. Returns the document after the write.
    async fn set_quota(
        &self,
        provider: &ProviderId,
        used: Option<i64>,
        limit: Option<i64>,
        new_epoch: &str,
    ) -> Result<Document, StorageError>;
    /// One page of provider documents (`None` starts; a returned `None` means done).
    async fn list_documents(
        &self,
        page: Option<String>,
        size: usize,
    ) -> Result<(Vec<(ProviderId, Document)>, Option<String>), StorageError>;
    /// Up to `max` providers whose documents carry a [`FallbackMark`] written at
    /// `since_ms` or later (any replica's: the caller tells its own apart), with the mark.
    /// Replicas that reach Redis poll this, so that they stop deciding there for a
    /// provider soon after a replica cut off from Redis has announced a fallback for it
    /// (see `QuotaService::watch_marks`).
    async fn fallback_marks(&self, since_ms: i64, max: usize) -> Result<Vec<(ProviderId, FallbackMark)>, StorageError>;
    /// Providers whose documents changed outside Redis (fallback decisions), up to `max`.
    async fn changed_outside(&self, max: usize) -> Result<Vec<ProviderId>, StorageError>;
    /// Records that a provider's document changed outside Redis.
    async fn note_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError>;
    /// Forgets a provider of [`Ledger::changed_outside`].
    async fn clear_changed_outside(&self, provider: &ProviderId) -> Result<(), StorageError>;
    /// A small value of quotad's own (outside the provider collection), by name.
    async fn meta(&self, name: &str) -> Result<Option<String>, StorageError>;
    async fn set_meta(&self, name: &str, value: &str) -> Result<(), StorageError>;
    /// The stored phase and when it was set.
    async fn phase(&self) -> Result<Option<(Phase, chrono::DateTime<chrono::Utc>)>, StorageError>;
    async fn set_phase(&self, phase: Phase, since: chrono::DateTime<chrono::Utc>) -> Result<(), StorageError>;
}

/// The largest count quotad holds exactly: Redis scripts count in doubles, exact up to
/// 2^53 - 1 (JavaScript's `Number.MAX_SAFE_INTEGER`, what a dashboard can show exactly).
pub const EXACT_MAX: i64 = (1 << 53) - 1;

/// A document's count as quotad counts it: within ±[`EXACT_MAX`]. Only another writer can
/// store more (an "unlimited" `aiCallsLimit` of 2^63 - 1, say): a limit beyond it is more
/// than any usage reaches, and a usage beyond it is over every limit. Changes go to the
/// document as deltas (or, in a ledger transaction, from its own stored value), so the
/// bound never loses what the document holds.
pub fn exact(count: i64) -> i64 {
    count.clamp(-EXACT_MAX, EXACT_MAX)
}

/// The decision rule every store applies to `used`/`limit`: a consume is all-or-nothing
/// within the limit, a refund never takes usage below zero, and a usage another writer
/// left below zero (a legacy refund's decrement) stays as it is: a refund there gives
/// nothing back, and must not raise it either. Both are within
/// [`EXACT_MAX`] (see [`exact`]), so nothing overflows.
pub fn decide(used: i64, limit: i64, change: &Change<'_>) -> Decision {
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
            used: refunded(used, change.amount),
            limit,
        },
    }
}

/// A ledger transaction's decision on a document's stored values, which may lie beyond
/// [`EXACT_MAX`]: decided on [`exact`] values (a usage beyond the bound is over every
/// limit); returns the answer, which shows the new usage as [`exact`] too, and the
/// document's new `aiCallsUsed`, computed from what it stores.
pub fn decide_stored(used: i64, limit: i64, change: &Change<'_>) -> (Decision, i64) {
    let mut decision = decide(exact(used), exact(limit), change);
    let stored = match change.op {
        // admitted: `used` was below the limit, so at most the bound (or below -bound:
        // adding a positive amount cannot overflow)
        Op::Consume if decision.allowed => used + change.amount,
        Op::Consume => used,
        Op::Refund => refunded(used, change.amount),
    };
    decision.used = exact(stored);
    (decision, stored)
}

/// A document's `aiCallsUsed` after a record's write adds `delta` and the settlement of
/// keys decided twice adds `correction` (see [`settle_twice_decided`]): never below 0, nor
/// below a usage another writer left below 0 (whose records Redis decides from as it is:
/// see [`decide`]), and saturating at the ends of i64 (another writer may store anything).
pub fn usage_after_write(stored: i64, delta: i64, correction: i64) -> i64 {
    stored
        .saturating_add(delta)
        .saturating_add(correction)
        .max(floor(stored))
}

/// The lowest a refund or a write takes a usage `used`: 0, or `used` itself when another
/// writer left it below 0 (see [`decide`]). The Lua scripts apply the same
/// (`math.max(math.min(used, 0), ...)` in `apply.lua`, `rebase.lua`, `settle_receipt.lua`).
fn floor(used: i64) -> i64 {
    used.min(0)
}

/// `used` after a refund of `amount` ([`decide`]'s rule; saturating: another writer may
/// store anything).
fn refunded(used: i64, amount: i64) -> i64 {
    used.saturating_sub(amount).max(floor(used))
}

/// A document's `aiCallsUsed` after [`Ledger::add_used`] adds `delta`, or `None` when it
/// has no usage, or is not in the epoch `epoch` names: its first 8 characters (all of a
/// shorter one), as receipts name it (`settle_receipt.lua` compares the same).
pub fn used_after_adding(used: Option<i64>, doc_epoch: Option<&str>, delta: i64, epoch: &str) -> Option<i64> {
    let named = |e: &str| !epoch.is_empty() && e.get(..8).unwrap_or(e) == epoch;
    used.filter(|_| doc_epoch.is_some_and(named))
        .map(|used| usage_after_write(used, delta, 0))
}

/// A fresh random epoch id.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The delta a record adds to a document, or `None` when the document is in another epoch
/// (the record is stale) or already holds this version. Shared by every ledger adapter.
pub fn delta_for(record: &Record, doc_epoch: Option<&str>, doc_watermark: i64, doc_version: u64) -> DeltaPlan {
    let doc_epoch = doc_epoch.unwrap_or("");
    if doc_epoch == record.epoch {
        if doc_version >= record.version {
            DeltaPlan::AlreadyThere
        } else {
            DeltaPlan::Add(record.used - doc_watermark)
        }
    } else if doc_epoch == record.loaded_from {
        DeltaPlan::Add(record.unsynced_since_load(doc_watermark))
    } else {
        DeltaPlan::Stale
    }
}

impl Record {
    /// The record with no lineage: [`delta_for`] adds it only to a document already in its
    /// epoch, never moving a document to it from the epoch it was loaded from (a document
    /// is never in epoch `-`: epochs are hex).
    #[must_use]
    pub fn without_lineage(mut self) -> Self {
        self.loaded_from = "-".to_owned();
        self
    }
}

/// See [`delta_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaPlan {
    Add(i64),
    AlreadyThere,
    Stale,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(used: i64, version: u64) -> Record {
        Record {
            used,
            limit: 100,
            epoch: "e2".into(),
            base: 10,
            loaded_from: "e1".into(),
            version,
            synced: 0,
            from_watermark: None,
            loaded_ms: None,
            outdated: false,
        }
    }

    #[test]
    fn a_new_epoch_adds_what_was_used_since_the_load() {
        assert_eq!(delta_for(&record(15, 5), Some("e1"), 99, 99), DeltaPlan::Add(5));
    }

    #[test]
    fn the_same_epoch_adds_above_the_watermark_once() {
        assert_eq!(delta_for(&record(15, 5), Some("e2"), 12, 3), DeltaPlan::Add(3));
        assert_eq!(delta_for(&record(15, 5), Some("e2"), 15, 5), DeltaPlan::AlreadyThere);
        assert_eq!(delta_for(&record(14, 4), Some("e2"), 15, 5), DeltaPlan::AlreadyThere);
    }

    /// Counts within the bound, anywhere, and at the edges (each about as often).
    fn counts() -> impl proptest::strategy::Strategy<Value = i64> {
        use proptest::prelude::*;
        prop_oneof![
            -EXACT_MAX..=EXACT_MAX,
            any::<i64>(),
            prop_oneof![
                Just(i64::MAX),
                Just(i64::MIN),
                Just(EXACT_MAX),
                Just(-EXACT_MAX),
                Just(0)
            ],
        ]
    }

    /// A write never takes a document below 0, nor below what another writer left there
    /// below 0; it counts up from such a usage.
    #[test]
    fn a_write_keeps_a_usage_another_writer_left_below_zero() {
        assert_eq!(usage_after_write(-5, 1, 0), -4);
        assert_eq!(usage_after_write(-5, -3, 0), -5);
        assert_eq!(usage_after_write(-5, 0, -1), -5);
        assert_eq!(usage_after_write(2, -5, 0), 0);
        assert_eq!(usage_after_write(2, 3, -1), 4);
        assert_eq!(usage_after_write(i64::MIN, -1, 0), i64::MIN);
    }

    proptest::proptest! {
        /// Any stored 64-bit counts: no overflow, the answer within the exact bound, and
        /// the document changed by what was decided (exactly, while it was within it).
        #[test]
        fn stored_counts_of_any_size_are_decided_without_overflow(
            used in counts(),
            limit in counts(),
            refund in proptest::prelude::any::<bool>(),
            amount in 1i64..=1_000_000,
        ) {
            let op = if refund { Op::Refund } else { Op::Consume };
            let change = Change { op, amount, idempotency_key: None, with_record: false };
            let (decision, stored) = decide_stored(used, limit, &change);
            let rule = decide(exact(used), exact(limit), &change);
            proptest::prop_assert_eq!((decision.allowed, decision.limit), (rule.allowed, rule.limit));
            // the answer shows what the document holds now
            proptest::prop_assert_eq!(decision.used, exact(stored));
            match (refund, decision.allowed) {
                (false, true) => proptest::prop_assert_eq!(stored, used + amount),
                (false, false) => proptest::prop_assert_eq!(stored, used),
                (true, _) => proptest::prop_assert_eq!(
                    stored,
                    (i128::from(used) - i128::from(amount)).max(i128::from(used.min(0))) as i64
                ),
            }
            if used == exact(used) {
                proptest::prop_assert_eq!(decision, rule);
            }
        }
    }

    #[test]
    fn a_record_without_lineage_adds_only_within_its_epoch() {
        let lost = record(15, 5).without_lineage();
        assert_eq!(delta_for(&lost, Some("e2"), 12, 3), DeltaPlan::Add(3));
        assert_eq!(delta_for(&lost, Some("e1"), 0, 0), DeltaPlan::Stale, "its load's epoch");
        assert_eq!(delta_for(&lost, None, 0, 0), DeltaPlan::Stale, "a document without one");
    }

    #[test]
    fn a_move_to_another_epoch_carries_only_the_fallbacks_keys_of_the_epoch_left() {
        let mut known: std::collections::BTreeMap<String, String> = [
            ("c:a", "4:1:14:100:99:e1"),      // the fallback's, in e1
            ("c:b", "4:1:14:100:99:e0"),      // the fallback's, before an operator's reset
            ("c:c", "4:1:14:100:99"),         // Redis's, or settled
            ("c:d", "4:1:14:100:99:dropped"), // Redis's, of a dropped record
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let before = known.clone();
        assert!(!carry_fallback_keys(&mut known, Some("e1"), "e1"), "no move");
        assert!(carry_fallback_keys(&mut known, Some("e1"), "e2"));
        assert_eq!(known["c:a"], "4:1:14:100:99:e2");
        for key in ["c:b", "c:c", "c:d"] {
            assert_eq!(known[key], before[key], "{key}");
        }
        let mut fresh = [("c:a".to_owned(), "1:1:1:100:99:-".to_owned())].into();
        assert!(carry_fallback_keys(&mut fresh, None, "e1"));
        assert_eq!(fresh["c:a"], "1:1:1:100:99:e1");
    }

    #[test]
    fn another_epoch_makes_the_record_stale() {
        assert_eq!(delta_for(&record(15, 5), Some("e3"), 0, 0), DeltaPlan::Stale);
        assert_eq!(delta_for(&record(15, 5), None, 0, 0), DeltaPlan::Stale);
    }

    #[test]
    fn a_fallback_mark_is_rewritten_for_another_replica_or_once_it_ages() {
        let mark = FallbackMark {
            by: "a".into(),
            at_ms: 1_000,
        };
        assert_eq!(FallbackMark::parse(&mark.render()), Some(mark.clone()));
        assert_eq!(FallbackMark::parse("soon a"), None);
        assert!(FallbackMark::due(None, "a", 1_000));
        assert!(!FallbackMark::due(Some(&mark), "a", 1_000));
        assert!(!FallbackMark::due(
            Some(&mark),
            "a",
            1_000 + FallbackMark::REFRESH_MS - 1
        ));
        assert!(FallbackMark::due(Some(&mark), "a", 1_000 + FallbackMark::REFRESH_MS));
        assert!(FallbackMark::due(Some(&mark), "b", 1_000));
        // a mark from a clock ahead of this one's is written again, not trusted for long
        assert!(FallbackMark::due(Some(&mark), "a", 999));
    }

    #[test]
    fn a_fallback_mark_is_missed_by_records_loaded_before_it_and_only_by_others() {
        let (slack, at) = (FallbackMark::CLOCK_SLACK_MS, 100_000);
        let mark = FallbackMark {
            by: "cut".into(),
            at_ms: at,
        };
        let now = at + 10;
        assert!(mark.missed_by("other", Some(at - 5_000), now));
        assert!(
            mark.missed_by("other", Some(at + slack), now),
            "within the clocks' slack"
        );
        assert!(!mark.missed_by("other", Some(at + slack + 1), now), "loaded after it");
        assert!(!mark.missed_by("cut", Some(at - 5_000), now), "its own");
        assert!(mark.missed_by("other", None, now), "a record of unknown age");
        // a mark from a clock far ahead is ignored
        assert!(mark.missed_by("other", Some(0), at - slack));
        assert!(!mark.missed_by("other", Some(0), at - slack - 1));
    }

    #[test]
    fn a_fallback_mark_keeps_others_off_redis_only_while_it_is_recent() {
        let (slack, recent, at) = (FallbackMark::CLOCK_SLACK_MS, FallbackMark::RECENT_MS, 100_000);
        let mark = FallbackMark {
            by: "cut".into(),
            at_ms: at,
        };
        assert!(mark.deciding_elsewhere("other", at));
        assert!(mark.deciding_elsewhere("other", at + recent + slack - 1));
        assert!(!mark.deciding_elsewhere("other", at + recent + slack), "old");
        assert!(!mark.deciding_elsewhere("cut", at), "its own");
        assert!(mark.deciding_elsewhere("other", at - slack), "a clock a little ahead");
        assert!(!mark.deciding_elsewhere("other", at - slack - 1), "a clock far ahead");
    }
}
