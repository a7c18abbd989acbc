//! [`Counters`] on Redis: one Lua script per operation, preloaded and sent as EVALSHA
//! (reloaded on NOSCRIPT), over one shared multiplexed connection that pipelines
//! concurrent requests. The connection is made lazily and remade after failures, so the
//! service starts and serves (from Firestore) while Redis is away.

pub mod keys;

use std::{
    sync::{Arc, LazyLock, Mutex, RwLock},
    time::Duration,
};

use ::redis::{Script, Value, aio::ConnectionManager};
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::oneshot;

pub use self::keys::Keys;
use super::{
    Applied, Change, Counters, Decision, IDEMPOTENCY_TTL, IdempotencyEntry, KeyRecord, Op, RebaseMark, RebaseOnto,
    Record, Seed, Settled, StorageError, Synced, Unanswered, idempotency_id,
};
use crate::domain::{
    Phase, ProviderId,
    ratelimit::{ANOMALIES_KEPT, Algorithm, Anomaly, RateCheck, RateDecision, anomaly_at},
};

/// The longest a single Redis call may take before it counts as unavailable. API.md: no
/// request waits more than 2 s on an unresponsive Redis before deciding from Firestore.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(800);

/// A consume or refund script that Redis runs later than this after it was sent (by Redis
/// time) changes no usage: its sender has given up by then (after [`CALL_TIMEOUT`]) and
/// decided from Firestore, so a hung Redis that wakes up must not apply it a second time;
/// it marks the records it names outdated instead (`apply.lua`).
/// The gap between the two bounds the transit time of a late reply (and the error of the
/// measured clock offset). Sync-lock acquires and renewals keep the same deadline: one
/// run at the sender's timeout, whose reply came too late, held the lock with nobody
/// syncing (seen once in a clean-clone CI run).
pub const APPLY_DEADLINE: Duration = Duration::from_millis(250);

/// How long the sender of an outdated mark or a fallback's fence waits for its answer (see
/// [`Counters::mark_outdated`], [`Counters::fence_outdated`]): through a hang, so that a
/// provider has one mark and one fence at a time queued in a hung Redis (one per this
/// period in a longer hang; a call that is not waited for still runs). A call unanswered
/// this long while Redis answers the shared connection finds its own connection dead.
pub const MARK_WAIT: Duration = Duration::from_secs(30);

static APPLY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/apply.lua")));
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/pending_dropped.lua"),
        include_str!("scripts/load.lua")
    ))
});
static MARK_SYNCED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/mark_synced.lua")));
static EVICT_CLEAN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/evict_clean.lua")));
static SET_LIMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/set_limit.lua")));
static RATE_LIMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/ratelimit.lua")));
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/pending_dropped.lua"),
        include_str!("scripts/forget.lua")
    ))
});
static LOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/lock.lua")));
static DIRTY: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/dirty.lua")));
static FENCE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/fence.lua")));
static FENCED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/fenced.lua")));
static RENEW_FENCE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/renew_fence.lua")));
static REBASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/rebase.lua")));
static MARK_OUTDATED: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/mark_outdated.lua")));
static UNFENCE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/unfence.lua")));
static SETTLE_RECEIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/settle_receipt.lua")));

/// How many receipts a replica keeps in Redis (see `apply.lua`): its calls take the slots
/// in turn, so an unanswered call's receipt is read before this many more calls of its
/// sender (each waits for Redis) have run.
const RECEIPT_SLOTS: u64 = 4096;

/// This replica's receipts of apply calls (see `apply.lua`), and the calls that went
/// unanswered: Redis may have run them.
struct Receipts {
    key: String,
    next: std::sync::atomic::AtomicU64,
    unanswered: Mutex<std::collections::VecDeque<u64>>,
}

impl Receipts {
    /// The slot of call `seq`'s receipt.
    fn slot(seq: u64) -> u64 {
        seq % RECEIPT_SLOTS
    }

    fn unanswered(&self, seq: u64) {
        let mut unanswered = self.unanswered.lock().unwrap();
        if unanswered.len() as u64 >= RECEIPT_SLOTS {
            // its slot has been taken by a later call already
            tracing::warn!(
                seq = unanswered.pop_front(),
                "too many unanswered calls to settle; the oldest is given up"
            );
        }
        unanswered.push_back(seq);
    }
}

/// Redis-backed counters.
pub struct RedisCounters {
    link: Arc<Link>,
    keys: Keys,
    /// Redis clock minus ours, in ms (measured with `TIME`); `None` until measured.
    clock_offset_ms: RwLock<Option<i64>>,
    /// Consumes and refunds waiting to be sent together.
    applies: Batches<ApplyJob>,
    /// Rate-limit checks waiting to be sent together.
    checks: Batches<CheckJob>,
    /// Record reads waiting to be sent together.
    reads: Batches<ReadJob>,
    receipts: Arc<Receipts>,
}

/// The shared connection, made lazily and remade after failures.
struct Link {
    client: ::redis::Client,
    connection: RwLock<Option<ConnectionManager>>,
    connect_lock: tokio::sync::Mutex<()>,
    /// When the last connection attempt failed.
    failed_connect: RwLock<Option<std::time::Instant>>,
    /// A second connection, for outdated marks and fallbacks' fences only (see
    /// [`Counters::mark_outdated`], [`Counters::fence_outdated`]): made with the shared one,
    /// or by a mark, when there is none; dropped only when it is found dead, not when Redis
    /// hangs.
    marks: RwLock<Option<ConnectionManager>>,
}

/// At most this many changes or checks go in one call (a call blocks Redis while it runs:
/// a few µs each).
const MAX_BATCH: usize = 128;

/// A batch of this many distinct items is sent without waiting for more. With 10k
/// providers, or 100k rate-limit keys, 16 to 32 gave 5-11 % more requests a second than
/// waiting for everything ready (8: less; the hot lines are unchanged: their batches are
/// one item). `bench/run.sh` measures it.
const SEND_AT: usize = 16;

/// Work that requests make ready together goes to Redis in one call (one `EVALSHA` of a
/// script that decides the items in order, exactly as if each were its own call). The first
/// job queued spawns a task that yields once, so that the requests already runnable can
/// queue theirs, then sends everything queued (in calls of at most [`MAX_BATCH`]). Nothing
/// waits for a batch to fill: a lone request is sent at once. And a batch that reaches
/// [`SEND_AT`] distinct items is sent at once by the request that completes it, so that
/// Redis decides those while this process reads the next requests (with many distinct
/// providers or keys, a batch of everything ready would leave Redis idle while the batch
/// forms, and this process idle while Redis decides it). Identical jobs in a row, a hot
/// provider's, are one item: its batches stay whole. The call runs in its own task, so a
/// request dropped meanwhile cannot take the others' answers with it.
struct Batches<J>(Arc<Mutex<Queue<J>>>);

struct Queue<J> {
    jobs: Vec<J>,
    /// Distinct items among `jobs` (a job identical to the one before it adds none).
    items: usize,
}

/// A job of a batch.
trait Batched {
    /// Whether `next`, queued right after this job, is decided in the same item.
    fn same_item(&self, next: &Self) -> bool;
}

/// What [`Batches::queue`] asks of its caller.
enum Queued<J> {
    /// The first job of a new batch: start its sender ([`Batches::send_with`]).
    First,
    /// Queued behind others: their sender takes it.
    Later,
    /// The batch is full: send these jobs now.
    Full(Vec<J>),
}

impl<J: Batched + Send + 'static> Batches<J> {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Queue {
            jobs: Vec::new(),
            items: 0,
        })))
    }

    /// Queues `job`; `sender` makes the function that sends a batch, called only when this
    /// job starts a batch or fills one.
    fn queue<F, Fut>(&self, job: J, sender: impl FnOnce() -> F)
    where
        F: Fn(Vec<J>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.enqueue(job) {
            Queued::First => self.send_with(sender()),
            Queued::Full(jobs) => {
                tokio::spawn(in_calls(jobs, sender()));
            }
            Queued::Later => {}
        }
    }

    fn enqueue(&self, job: J) -> Queued<J> {
        let mut queue = self.0.lock().unwrap();
        if !queue.jobs.last().is_some_and(|last| last.same_item(&job)) {
            queue.items += 1;
        }
        queue.jobs.push(job);
        if queue.items >= SEND_AT {
            queue.items = 0;
            return Queued::Full(std::mem::take(&mut queue.jobs));
        }
        if queue.jobs.len() == 1 {
            Queued::First
        } else {
            Queued::Later
        }
    }

    /// Spawns the task that hands everything queued to `send`, after one yield (nothing,
    /// when a full batch took it meanwhile).
    fn send_with<F, Fut>(&self, send: F)
    where
        F: Fn(Vec<J>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let queue = self.0.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let jobs = {
                let mut queue = queue.lock().unwrap();
                queue.items = 0;
                std::mem::take(&mut queue.jobs)
            };
            if !jobs.is_empty() {
                in_calls(jobs, send).await;
            }
        });
    }
}

/// Sends `jobs` in calls of at most [`MAX_BATCH`]: each call but the last in a task of its
/// own, the last in this one.
async fn in_calls<J, F, Fut>(mut jobs: Vec<J>, send: F)
where
    F: Fn(Vec<J>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while jobs.len() > MAX_BATCH {
        let rest = jobs.split_off(MAX_BATCH);
        tokio::spawn(send(jobs));
        jobs = rest;
    }
    send(jobs).await;
}

/// The answer a batched job waits for; a batch task that ended without answering (the
/// runtime shutting down) reads as Redis being unavailable.
async fn answer<T>(answered: oneshot::Receiver<Result<T, StorageError>>) -> Result<T, StorageError> {
    answered
        .await
        .unwrap_or_else(|_| Err(unavailable("the call ended without an answer")))
}

/// One consume or refund waiting for its apply call.
struct ApplyJob {
    record: String,
    /// With an idempotency key: that key and the provider's pending key records.
    keyed: Option<(String, String)>,
    op: &'static str,
    amount: i64,
    with_record: bool,
    provider: String,
    id: String,
    answer: oneshot::Sender<Result<Applied, StorageError>>,
}

impl Batched for ApplyJob {
    /// The same change, and neither carries an idempotency key (a keyed change is one of a
    /// kind).
    fn same_item(&self, next: &Self) -> bool {
        self.keyed.is_none()
            && next.keyed.is_none()
            && self.record == next.record
            && self.op == next.op
            && self.amount == next.amount
            && self.with_record == next.with_record
    }
}

/// One rate-limit check waiting for its call.
struct CheckJob {
    counter: String,
    /// The exact window's running sum (`sw` only).
    sums: Option<String>,
    algorithm: &'static str,
    limit: u64,
    window_ms: u64,
    cost: u64,
    /// `None`: Redis TIME.
    now_ms: Option<u64>,
    /// Plan-based checks only: anomaly counting.
    anomaly: Option<AnomalyCount>,
    answer: oneshot::Sender<Result<RateDecision, StorageError>>,
}

impl Batched for CheckJob {
    /// The same check: it would be decided alike in `next`'s place.
    fn same_item(&self, next: &Self) -> bool {
        self.counter == next.counter
            && self.algorithm == next.algorithm
            && self.limit == next.limit
            && self.window_ms == next.window_ms
            && self.cost == next.cost
            && self.now_ms == next.now_ms
            && self.anomaly == next.anomaly
    }
}

/// One record read waiting for its pipeline.
struct ReadJob {
    record: String,
    answer: oneshot::Sender<Result<Option<Record>, StorageError>>,
}

impl Batched for ReadJob {
    fn same_item(&self, next: &Self) -> bool {
        self.record == next.record
    }
}

/// The fields of a record hash that a read returns, in [`record_of`]'s order.
const RECORD_FIELDS: [&str; 10] = [
    "used", "limit", "epoch", "base", "from", "ver", "synced", "fromw", "at", "outdated",
];

/// What a plan-based check counts its attempts with.
#[derive(PartialEq)]
struct AnomalyCount {
    /// The key's attempt counter (one for all its plans).
    attempts: String,
    plan: String,
    threshold: u64,
    /// The caller's key, as the anomaly list names it.
    key: String,
}

fn unavailable(message: impl ToString) -> StorageError {
    StorageError::Unavailable {
        backend: "redis",
        message: message.to_string(),
    }
}

/// Server states in which Redis cannot take a write now but may later (loading a
/// snapshot, a replica after failover, out of memory, a busy script, cluster moves).
const TRANSIENT_CODES: [&str; 10] = [
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "OOM",
    "NOREPLICAS",
    "MOVED",
    "ASK",
];

fn classify(err: &::redis::RedisError) -> StorageError {
    let transient_state = err.code().is_some_and(|code| TRANSIENT_CODES.contains(&code)) || err.is_cluster_error();
    if transient_state
        || err.is_timeout()
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        unavailable(err)
    } else {
        StorageError::Other {
            backend: "redis",
            message: err.to_string(),
        }
    }
}

impl RedisCounters {
    /// Checks the URL; connects on first use.
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<Self> {
        Ok(Self {
            link: Arc::new(Link {
                client: ::redis::Client::open(url)?,
                connection: RwLock::new(None),
                connect_lock: tokio::sync::Mutex::new(()),
                failed_connect: RwLock::new(None),
                marks: RwLock::new(None),
            }),
            keys: Keys::new(prefix),
            clock_offset_ms: RwLock::new(None),
            applies: Batches::new(),
            checks: Batches::new(),
            reads: Batches::new(),
            receipts: Arc::new(Receipts {
                key: Keys::new(prefix).receipts(&uuid::Uuid::new_v4().simple().to_string()),
                next: std::sync::atomic::AtomicU64::new(0),
                unanswered: Mutex::new(std::collections::VecDeque::new()),
            }),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = ::redis::RedisResult<T>>,
    {
        self.link.call(f).await
    }

    /// Runs one of the preloaded scripts (`EVALSHA`; on `NOSCRIPT` it loads it again).
    async fn invoke<T: ::redis::FromRedisValue + Send>(
        &self,
        invocation: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, StorageError> {
        self.link.invoke(invocation).await
    }

    /// Runs a script on the connection kept for outdated marks and fallback fences, which a
    /// hang does not take down (the shared one is dropped at its first timeout, and no new
    /// one can be made while Redis hangs): a call sent while Redis hangs waits in it and runs
    /// when Redis wakes, before what is sent after it. Its answer is waited for up to
    /// [`MARK_WAIT`].
    async fn on_marks_connection(&self, invocation: &::redis::ScriptInvocation<'_>) -> Result<(), StorageError> {
        let mut conn = self.link.marks_connection().await?;
        let done = invocation.invoke_async::<i64>(&mut conn).await;
        if let Err(err) = &done
            && err.is_timeout()
            && self.link.connection.read().unwrap().is_some()
        {
            // Redis answers the shared connection, yet ran nothing here for MARK_WAIT: this
            // connection's path is dead (a hang would have taken the shared one down too)
            *self.link.marks.write().unwrap() = None;
        }
        done.map(|_| ()).map_err(|err| classify(&err))
    }

    /// A `fence.lua` call (`mode`: '' or 'outdated').
    fn fence_call(
        &self,
        provider: &ProviderId,
        token: &str,
        ttl: Duration,
        mode: &str,
    ) -> ::redis::ScriptInvocation<'static> {
        let mut invocation = FENCE.prepare_invoke();
        invocation
            .key(self.keys.record(provider))
            .key(self.keys.fences(provider))
            .key(self.keys.fence_gen(provider))
            .arg(token)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(mode);
        invocation
    }

    /// Runs an arbitrary command (tests and tools look inside Redis with it).
    pub async fn query<T: ::redis::FromRedisValue + Send>(&self, cmd: ::redis::Cmd) -> Result<T, StorageError> {
        self.call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }
}

impl Link {
    /// The shared connection, made on first use (or after it was dropped as broken). A
    /// `probe` tries to connect even right after an attempt failed (requests do not, so as
    /// not to wait for a Redis that is away), so that a probe is connecting whenever a hung
    /// Redis wakes.
    async fn connection_with(&self, probe: bool) -> Result<ConnectionManager, StorageError> {
        if let Some(conn) = self.connection.read().unwrap().clone() {
            return Ok(conn);
        }
        // One task connects while the others wait for it, not for attempts of their own: a
        // request waits at most two call timeouts on a Redis that hangs.
        let _guard = tokio::time::timeout(CALL_TIMEOUT, self.connect_lock.lock())
            .await
            .map_err(|_| unavailable("connecting"))?;
        if let Some(conn) = self.connection.read().unwrap().clone() {
            return Ok(conn);
        }
        if !probe
            && self
                .failed_connect
                .read()
                .unwrap()
                .is_some_and(|at| at.elapsed() < CALL_TIMEOUT)
        {
            return Err(unavailable("the last connection attempt failed"));
        }
        let conn = self
            .connect(CALL_TIMEOUT)
            .await
            .inspect_err(|_| *self.failed_connect.write().unwrap() = Some(std::time::Instant::now()))?;
        // Preload every script, so the first request of each kind is one EVALSHA too
        // (invoke_async still reloads on NOSCRIPT, e.g. after a Redis restart, but only for a
        // caller still waiting: a mark or a fallback's fence queued in a hung Redis is run
        // after its caller gave up, so it must find its script there).
        for script in [
            &*APPLY,
            &*MARK_OUTDATED,
            &*FENCE,
            &*UNFENCE,
            &*LOAD,
            &*MARK_SYNCED,
            &*EVICT_CLEAN,
            &*SET_LIMIT,
            &*DIRTY,
            &*RATE_LIMIT,
            &*FORGET,
            &*LOCK,
        ] {
            let mut preload = conn.clone();
            if let Err(err) = tokio::time::timeout(CALL_TIMEOUT, script.load_async(&mut preload))
                .await
                .unwrap_or(Ok(String::new()))
            {
                tracing::debug!(error = %err, "could not preload a script; it loads on first use");
            }
        }
        // Made before Redis can hang, so that it is there when a mark needs it. One that
        // exists is kept: marks queued in it may not have run yet.
        if self.marks.read().unwrap().is_none() {
            let _ = self.marks_connection().await;
        }
        *self.connection.write().unwrap() = Some(conn.clone());
        Ok(conn)
    }

    /// A new connection whose calls time out after `response_timeout`. One attempt, no
    /// retry of the crate's: its backoff (up to 100-200 ms after a refusal) would hide a
    /// restarted Redis from the health task's pings every 20 ms, and requests do not
    /// connect while Redis is away.
    async fn connect(&self, response_timeout: Duration) -> Result<ConnectionManager, StorageError> {
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(0);
        tokio::time::timeout(
            CALL_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| unavailable("connect timed out"))
        .and_then(|made| made.map_err(|e| classify(&e)))
    }

    /// The connection for outdated marks and fallbacks' fences, made when there is none.
    async fn marks_connection(&self) -> Result<ConnectionManager, StorageError> {
        if let Some(conn) = self.marks.read().unwrap().clone() {
            return Ok(conn);
        }
        let conn = self
            .connect(MARK_WAIT)
            .await
            .inspect_err(|err| tracing::debug!(error = %err, "no connection for outdated marks"))?;
        Ok(self.marks.write().unwrap().get_or_insert(conn).clone())
    }

    /// Runs one call with the timeout; an unavailable answer drops the connection so the
    /// next call makes a new one (a hung server keeps a TCP connection that never answers).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = ::redis::RedisResult<T>>,
    {
        self.call_with(false, f).await
    }

    /// [`Link::call`]; a `probe` connects as [`Link::connection_with`] says.
    async fn call_with<T, F, Fut>(&self, probe: bool, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = ::redis::RedisResult<T>>,
    {
        let conn = self.connection_with(probe).await?;
        // The connection's own response timeout (CALL_TIMEOUT) bounds the call: no second
        // timer per request on the hot path.
        let result = f(conn).await.map_err(|err| classify(&err));
        if let Err(err) = &result
            && err.is_unavailable()
        {
            *self.connection.write().unwrap() = None;
        }
        result
    }

    /// [`RedisCounters::invoke`], for the batch senders, which hold only the link.
    async fn invoke<T: ::redis::FromRedisValue + Send>(
        &self,
        invocation: ::redis::ScriptInvocation<'_>,
    ) -> Result<T, StorageError> {
        self.call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bad_reply(what: &str, reply: &[Value]) -> StorageError {
    StorageError::Other {
        backend: "redis",
        message: format!("unexpected {what} reply: {reply:?}"),
    }
}

#[async_trait]
impl Counters for RedisCounters {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// `TIME`, which also measures the clock offset used by the apply deadline. Connects
    /// if it can, whenever the last attempt was.
    async fn ping(&self) -> Result<(), StorageError> {
        // Timed from when TIME is sent, not from the connect that may come first.
        let (sent, (secs, micros)): (i64, (i64, i64)) = self
            .link
            .call_with(true, |mut conn| async move {
                let sent = now_ms();
                ::redis::cmd("TIME")
                    .query_async(&mut conn)
                    .await
                    .map(|time| (sent, time))
            })
            .await?;
        let received = now_ms();
        let redis_ms = secs * 1000 + micros / 1000;
        *self.clock_offset_ms.write().unwrap() = Some(redis_ms - (sent + received) / 2);
        Ok(())
    }

    /// Sent with the reads ready at the same time, in one pipeline (see [`Batches`]).
    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn read(&self, provider: &ProviderId) -> Result<Option<Record>, StorageError> {
        let (answer_to, answered) = oneshot::channel();
        let job = ReadJob {
            record: self.keys.record(provider),
            answer: answer_to,
        };
        self.reads.queue(job, || {
            let link = self.link.clone();
            move |jobs| send_reads(link.clone(), jobs)
        });
        answer(answered).await
    }

    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn load(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<bool, StorageError> {
        Ok(self.write_seed(provider, seed, ttl, false).await? != 2)
    }

    async fn fence_gen(&self, provider: &ProviderId) -> Result<u64, StorageError> {
        let generation: Option<u64> = self
            .query(::redis::cmd("GET").arg(self.keys.fence_gen(provider)).clone())
            .await?;
        Ok(generation.unwrap_or(0))
    }

    async fn fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        let gone: i64 = self.invoke(self.fence_call(provider, token, ttl, "")).await?;
        Ok(gone == 1)
    }

    /// On the connection of [`RedisCounters::mark_outdated`], for the same reason.
    async fn fence_outdated(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError> {
        self.on_marks_connection(&self.fence_call(provider, token, ttl, "outdated"))
            .await
    }

    async fn unfence_outdated(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError> {
        let mut invocation = UNFENCE.prepare_invoke();
        invocation
            .key(self.keys.fences(provider))
            .key(self.keys.fence_gen(provider))
            .arg(token);
        self.on_marks_connection(&invocation).await
    }

    async fn renew_fence(&self, provider: &ProviderId, token: &str, ttl: Duration) -> Result<(), StorageError> {
        let mut invocation = RENEW_FENCE.prepare_invoke();
        invocation
            .key(self.keys.fences(provider))
            .arg(token)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.invoke::<i64>(invocation).await.map(|_| ())
    }

    async fn rebase(
        &self,
        provider: &ProviderId,
        epoch: &str,
        new_epoch: &str,
        onto: &RebaseOnto<'_>,
    ) -> Result<bool, StorageError> {
        let mut invocation = REBASE.prepare_invoke();
        invocation
            .key(self.keys.record(provider))
            .arg(epoch)
            .arg(onto.used)
            .arg(onto.watermark)
            .arg(new_epoch)
            .arg(match onto.mark {
                RebaseMark::Set => "1",
                RebaseMark::Clear => "0",
                RebaseMark::Keep => "",
            });
        self.with_ledger_keys(&mut invocation, provider, onto.keys);
        let done: i64 = self.invoke(invocation).await?;
        Ok(done == 1)
    }

    async fn fence_held(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        let mut invocation = FENCED.prepare_invoke();
        invocation.key(self.keys.fences(provider));
        let held: i64 = self.invoke(invocation).await?;
        Ok(held > 0)
    }

    async fn unfence(&self, provider: &ProviderId, token: &str) -> Result<(), StorageError> {
        let mut invocation = UNFENCE.prepare_invoke();
        invocation
            .key(self.keys.fences(provider))
            .key(self.keys.fence_gen(provider))
            .arg(token);
        self.invoke::<i64>(invocation).await.map(|_| ())
    }

    /// Sent with the changes ready at the same time, in one call (see [`Batches`]).
    #[tracing::instrument(skip_all, fields(provider = %provider), err(level = "debug"))]
    async fn apply(&self, provider: &ProviderId, change: &Change<'_>) -> Result<Applied, StorageError> {
        let id = change
            .idempotency_key
            .map(|k| idempotency_id(change.op, k))
            .unwrap_or_default();
        let (answer_to, answered) = oneshot::channel();
        let job = ApplyJob {
            record: self.keys.record(provider),
            keyed: change
                .idempotency_key
                .map(|_| (self.keys.idempotency(provider, &id), self.keys.pending_keys(provider))),
            op: if change.op == Op::Consume { "c" } else { "r" },
            amount: change.amount,
            with_record: change.with_record,
            provider: provider.as_str().to_owned(),
            id,
            answer: answer_to,
        };
        self.applies.queue(job, || {
            let (link, dirty, deadline) = (self.link.clone(), self.keys.dirty(), self.apply_deadline_ms());
            let receipts = self.receipts.clone();
            move |jobs| send_applies(link.clone(), dirty.clone(), receipts.clone(), deadline, jobs)
        });
        answer(answered).await
    }

    #[tracing::instrument(skip_all, fields(provider = %provider, version), err(level = "debug"))]
    async fn mark_synced(
        &self,
        provider: &ProviderId,
        epoch: &str,
        version: u64,
        limit: i64,
        ttl: Duration,
        transferred: &[String],
    ) -> Result<Synced, StorageError> {
        let mut invocation = MARK_SYNCED.prepare_invoke();
        invocation
            .key(self.keys.record(provider))
            .key(self.keys.dirty())
            .key(self.keys.pending_keys(provider))
            .arg(epoch)
            .arg(version)
            .arg(limit)
            .arg(ttl.as_secs())
            .arg(provider.as_str());
        for id in transferred {
            invocation.arg(id);
        }
        match self.invoke::<i64>(invocation).await? {
            0 => Ok(Synced::Dirty),
            1 => Ok(Synced::Clean),
            2 => Ok(Synced::Outlived),
            3 => Ok(Synced::Replaced),
            other => Err(bad_reply("mark_synced", &[Value::Int(other)])),
        }
    }

    async fn pending_keys(&self, provider: &ProviderId) -> Result<Vec<KeyRecord>, StorageError> {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(self.keys.pending_keys(provider));
        self.query(cmd).await
    }

    /// Sent on a connection of its own (see [`RedisCounters::on_marks_connection`]).
    async fn mark_outdated(&self, provider: &ProviderId) -> Result<(), StorageError> {
        let mut invocation = MARK_OUTDATED.prepare_invoke();
        invocation.key(self.keys.record(provider));
        self.on_marks_connection(&invocation).await
    }

    async fn settle_unanswered(&self) -> Result<Vec<Unanswered>, StorageError> {
        let calls: Vec<u64> = self.receipts.unanswered.lock().unwrap().iter().copied().collect();
        let mut settled = Vec::new();
        for call in calls {
            let read = ::redis::cmd("HGET")
                .arg(&self.receipts.key)
                .arg(Receipts::slot(call))
                .clone();
            let receipt: Option<String> = match self.query(read).await {
                Ok(receipt) => receipt,
                Err(err) if err.is_unavailable() => return Err(err),
                Err(err) => {
                    // e.g. the hash holds another type: nothing to settle with, ever
                    tracing::warn!(call, error = %err, "an unanswered call's receipt cannot be read; given up");
                    None
                }
            };
            let parts: Vec<&str> = receipt.as_deref().unwrap_or_default().split(' ').collect();
            let mut ledger = false;
            // another call's receipt (a later one took the slot, or this one left none)
            // settles nothing
            if parts.first() == Some(&call.to_string().as_str()) {
                for provider in parts[1..].iter().step_by(3).filter_map(|p| ProviderId::parse(p).ok()) {
                    let answer: String = match self.invoke(self.settle_receipt(&provider, call, "settle")).await {
                        Ok(answer) => answer,
                        Err(err) if err.is_unavailable() => return Err(err),
                        Err(err) => {
                            tracing::warn!(call, %provider, error = %err, "an unanswered call cannot be settled; given up");
                            continue;
                        }
                    };
                    let mut answer = answer.split(' ');
                    let (outcome, usage) = (answer.next(), answer.next().and_then(|u| u.parse().ok()));
                    let settled_as = match (outcome, answer.next()) {
                        (Some("record"), _) => Settled::Record,
                        (Some("lost"), _) => Settled::Lost,
                        (Some("ledger"), Some(epoch)) => Settled::Ledger {
                            epoch: epoch.to_owned(),
                        },
                        _ => continue, // gone
                    };
                    ledger |= matches!(settled_as, Settled::Ledger { .. });
                    settled.push(Unanswered {
                        provider,
                        usage: usage.unwrap_or_default(),
                        call,
                        settled: settled_as,
                    });
                }
            }
            if !ledger {
                self.receipts.unanswered.lock().unwrap().retain(|c| *c != call);
            }
        }
        Ok(settled)
    }

    async fn forget_unanswered(&self, unanswered: &Unanswered) -> Result<bool, StorageError> {
        let invocation = self.settle_receipt(&unanswered.provider, unanswered.call, "forget");
        let answer: String = self.invoke(invocation).await?;
        Ok(answer == "forgotten")
    }

    async fn evict_clean(&self, provider: &ProviderId) -> Result<bool, StorageError> {
        let mut invocation = EVICT_CLEAN.prepare_invoke();
        invocation.key(self.keys.record(provider));
        let gone: i64 = self.invoke(invocation).await?;
        Ok(gone == 1)
    }

    async fn forget(&self, provider: &ProviderId, epoch: &str) -> Result<bool, StorageError> {
        let mut invocation = FORGET.prepare_invoke();
        invocation
            .key(self.keys.record(provider))
            .key(self.keys.dirty())
            .key(self.keys.pending_keys(provider))
            .arg(epoch)
            .arg(provider.as_str());
        self.invoke::<i64>(invocation).await.map(|dropped| dropped == 1)
    }

    async fn replace(&self, provider: &ProviderId, seed: &Seed, ttl: Duration) -> Result<(), StorageError> {
        self.write_seed(provider, seed, ttl, true).await.map(|_| ())
    }

    async fn set_limit(&self, provider: &ProviderId, limit: i64) -> Result<(), StorageError> {
        let mut invocation = SET_LIMIT.prepare_invoke();
        invocation.key(self.keys.record(provider)).arg(limit);
        self.invoke::<i64>(invocation).await.map(|_| ())
    }

    async fn dirty(&self, min_age: Duration, max: usize) -> Result<Vec<ProviderId>, StorageError> {
        let mut invocation = DIRTY.prepare_invoke();
        invocation
            .key(self.keys.dirty())
            .arg(u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX))
            .arg(max);
        let ids: Vec<String> = self.invoke(invocation).await?;
        Ok(ids.iter().filter_map(|id| ProviderId::parse(id).ok()).collect())
    }

    async fn scan_records(&self, cursor: u64, count: usize) -> Result<(u64, Vec<(ProviderId, Record)>), StorageError> {
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(self.keys.record_pattern())
            .arg("COUNT")
            .arg(count);
        let (next, keys): (u64, Vec<String>) = self.query(cmd).await?;
        let mut records = Vec::new();
        for key in keys {
            let Some(provider) = Keys::provider_of(&key) else {
                continue;
            };
            if let Some(record) = self.read(&provider).await? {
                records.push((provider, record));
            }
        }
        Ok((next, records))
    }

    async fn ensure_sentinel(&self, candidate: &str) -> Result<Option<String>, StorageError> {
        let mut set = ::redis::cmd("SET");
        set.arg(self.keys.sentinel()).arg(candidate).arg("NX").arg("GET");
        self.query(set).await
    }

    async fn acquire_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        self.lock_op("acquire", token, ttl).await
    }

    async fn renew_sync_lock(&self, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        self.lock_op("renew", token, ttl).await
    }

    async fn release_sync_lock(&self, token: &str) -> Result<(), StorageError> {
        self.lock_op("release", token, Duration::ZERO).await.map(|_| ())
    }

    async fn phase_mirror(&self) -> Result<Option<(Phase, DateTime<Utc>)>, StorageError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.keys.phase_mirror());
        let raw: Option<String> = self.query(cmd).await?;
        // `<phase> <since>`; anything else (another version's value) is no mirror.
        Ok(raw.as_deref().and_then(|raw| {
            let (phase, since) = raw.split_once(' ')?;
            let since = DateTime::parse_from_rfc3339(since).ok()?;
            Some((Phase::parse(phase)?, since.with_timezone(&Utc)))
        }))
    }

    async fn set_phase_mirror(&self, phase: Phase, since: DateTime<Utc>) -> Result<(), StorageError> {
        let mut cmd = ::redis::cmd("SET");
        let value = format!(
            "{} {}",
            phase.as_str(),
            since.to_rfc3339_opts(SecondsFormat::Micros, true)
        );
        cmd.arg(self.keys.phase_mirror()).arg(value);
        self.query::<()>(cmd).await
    }

    async fn store_sync_report(&self, report: &str) -> Result<(), StorageError> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.keys.sync_report()).arg(report);
        self.query::<()>(cmd).await
    }

    async fn last_sync_report(&self) -> Result<Option<String>, StorageError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.keys.sync_report());
        self.query(cmd).await
    }

    /// Sent with the checks ready at the same time, in one call (see [`Batches`]).
    #[tracing::instrument(skip_all, fields(key = check.key), err(level = "debug"))]
    async fn rate_check(&self, check: &RateCheck<'_>) -> Result<RateDecision, StorageError> {
        let counter = check.counter_id();
        let (answer_to, answered) = oneshot::channel();
        let job = CheckJob {
            counter: self.keys.rate_counter(check.key, &counter),
            sums: (check.policy.algorithm == Algorithm::SlidingWindow).then(|| self.keys.rate_sum(check.key, &counter)),
            algorithm: check.policy.algorithm.code(),
            limit: check.policy.limit,
            window_ms: check.policy.window.ms(),
            cost: check.cost,
            now_ms: check.now_ms,
            anomaly: check.anomaly_threshold().map(|(plan, threshold)| AnomalyCount {
                attempts: self.keys.attempts(check.key),
                plan: plan.to_owned(),
                threshold,
                key: check.key.to_owned(),
            }),
            answer: answer_to,
        };
        self.checks.queue(job, || {
            let (link, anomalies) = (self.link.clone(), self.keys.anomalies());
            move |jobs| send_checks(link.clone(), anomalies.clone(), jobs)
        });
        answer(answered).await
    }

    async fn anomalies(&self, limit: usize) -> Result<Vec<Anomaly>, StorageError> {
        let mut cmd = ::redis::cmd("LRANGE");
        cmd.arg(self.keys.anomalies()).arg(0).arg(limit.saturating_sub(1));
        let entries: Vec<String> = self.query(cmd).await?;
        Ok(entries.iter().filter_map(|raw| parse_anomaly(raw)).collect())
    }
}

/// An anomaly as the rate-limit script records it (numbers as strings: Lua's cjson would
/// print large ones in exponent form).
fn parse_anomaly(raw: &str) -> Option<Anomaly> {
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    let number = |name: &str| v.get(name)?.as_str()?.parse::<u64>().ok();
    Some(anomaly_at(
        v.get("key")?.as_str()?.to_owned(),
        v.get("plan")?.as_str()?.to_owned(),
        number("count")?,
        number("threshold")?,
        number("atMs")?,
    ))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends one apply call for `jobs` and hands each its answer. A call that fails as a whole
/// (unreachable, timed out, or run after its deadline) fails every change in it alike, and
/// none was applied, or all were and their answers are lost as with a single call (the
/// deadline sees to a call that Redis runs too late). A change that fails on its own (the
/// script answers 'err' for it) fails alone. Identical changes in a row without idempotency
/// keys (a hot provider's, as a rule) go as one item with their number: the script reads
/// the item's arguments once and still answers each change.
async fn send_applies(link: Arc<Link>, dirty: String, receipts: Arc<Receipts>, deadline: i64, jobs: Vec<ApplyJob>) {
    let seq = receipts.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut invocation = APPLY.prepare_invoke();
    invocation
        .key(dirty)
        .key(&receipts.key)
        .arg(deadline)
        .arg(IDEMPOTENCY_TTL.as_secs())
        .arg(Receipts::slot(seq))
        .arg(seq);
    for item in jobs.chunk_by(ApplyJob::same_item) {
        let job = &item[0];
        invocation.key(&job.record);
        if let Some((idempotency, pending_keys)) = &job.keyed {
            invocation.key(idempotency).key(pending_keys);
        }
        invocation
            .arg(item.len())
            .arg(job.op)
            .arg(job.amount)
            .arg(u8::from(job.keyed.is_some()) + 2 * u8::from(job.with_record))
            .arg(&job.provider)
            .arg(&job.id);
    }
    let reply: Result<Vec<Value>, StorageError> = link.invoke(invocation).await;
    if reply.is_err() {
        // Redis may have run it: its sender decides from Firestore meanwhile
        receipts.unanswered(seq);
    }
    let reply = reply.and_then(|values| match values.as_slice() {
        [late] if text(late).as_deref() == Some("late") => Err(unavailable("Redis ran the script after its deadline")),
        _ => Ok(values),
    });
    deliver(jobs, reply, 4, "apply");
}

/// A batched job: it takes its part of the call's reply, or the call's error.
trait Answer {
    fn answer(self, reply: Result<&[Value], StorageError>);
}

impl Answer for ApplyJob {
    fn answer(self, reply: Result<&[Value], StorageError>) {
        let _ = self.answer.send(reply.and_then(applied));
    }
}

impl Answer for ReadJob {
    fn answer(self, reply: Result<&[Value], StorageError>) {
        let _ = self.answer.send(reply.and_then(|part| record_of(&part[0])));
    }
}

impl Answer for CheckJob {
    fn answer(self, reply: Result<&[Value], StorageError>) {
        let _ = self.answer.send(reply.and_then(|part| checked(part, self.limit)));
    }
}

/// Hands each job its `width` values of a batched reply, in order, or every job the
/// call's error (a reply of the wrong length is one too).
fn deliver<J: Answer>(jobs: Vec<J>, reply: Result<Vec<Value>, StorageError>, width: usize, what: &str) {
    let reply = reply.and_then(|values| {
        if values.len() == width * jobs.len() {
            Ok(values)
        } else {
            Err(bad_reply(what, &values))
        }
    });
    match reply {
        Ok(values) => {
            for (job, part) in jobs.into_iter().zip(values.chunks_exact(width)) {
                job.answer(Ok(part));
            }
        }
        Err(err) => {
            for job in jobs {
                job.answer(Err(err.clone()));
            }
        }
    }
}

/// Sends the `HMGET`s of `jobs` in one pipeline (one write, one read on each side) and
/// hands each its record. A read that Redis refuses (its key holds another type) fails
/// alone.
async fn send_reads(link: Arc<Link>, jobs: Vec<ReadJob>) {
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    for job in &jobs {
        pipe.cmd("HMGET").arg(&job.record).arg(&RECORD_FIELDS);
    }
    let reply: Result<Vec<Value>, StorageError> = link
        .call(|mut conn| async move { pipe.query_async(&mut conn).await })
        .await;
    deliver(jobs, reply, 1, "read");
}

/// A record from its `HMGET` reply; `None` when the hash does not exist.
fn record_of(reply: &Value) -> Result<Option<Record>, StorageError> {
    let v = match reply {
        Value::Array(values) => values.as_slice(),
        Value::ServerError(err) => return Err(classify(&err.clone().into())),
        other => return Err(bad_reply("record", std::slice::from_ref(other))),
    };
    if v.len() != RECORD_FIELDS.len() || matches!(v[0], Value::Nil) {
        return Ok(None);
    }
    let parse = || {
        Some(Record {
            used: int(&v[0])?,
            limit: int(&v[1])?,
            epoch: text(&v[2])?,
            base: int(&v[3])?,
            loaded_from: text(&v[4])?,
            version: u64::try_from(int(&v[5])?).ok()?,
            synced: u64::try_from(int(&v[6])?).ok()?,
            from_watermark: int(&v[7]), // absent unless rebased
            loaded_ms: int(&v[8]),
            outdated: !matches!(v[9], Value::Nil),
        })
    };
    parse().map(Some).ok_or_else(|| bad_reply("record", v))
}

/// Sends one rate-limit call for `jobs` and hands each its decision. Identical checks in a
/// row (a hot key's, as a rule) go as one item with their number: the script reads the
/// item's arguments once and still answers each check.
async fn send_checks(link: Arc<Link>, anomalies: String, jobs: Vec<CheckJob>) {
    let mut invocation = RATE_LIMIT.prepare_invoke();
    invocation.key(anomalies).arg(ANOMALIES_KEPT);
    for item in jobs.chunk_by(CheckJob::same_item) {
        let job = &item[0];
        invocation.key(&job.counter);
        if let Some(sums) = &job.sums {
            invocation.key(sums);
        }
        invocation
            .arg(item.len())
            .arg(job.algorithm)
            .arg(job.limit)
            .arg(job.window_ms)
            .arg(job.cost);
        match job.now_ms {
            Some(now) => invocation.arg(now),
            None => invocation.arg(""),
        };
        match &job.anomaly {
            Some(a) => invocation.key(&a.attempts).arg(&a.plan).arg(a.threshold).arg(&a.key),
            None => invocation.arg(""),
        };
    }
    let reply: Result<Vec<Value>, StorageError> = link.invoke(invocation).await;
    deliver(jobs, reply, 1, "rate-limit");
}

/// One check's part of a rate-limit reply: "allowed remaining reset retry-after now
/// anomaly", or "err " and the error.
fn checked(v: &[Value], limit: u64) -> Result<RateDecision, StorageError> {
    let text = match &v[0] {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    };
    let Some(text) = text else {
        return Err(bad_reply("rate-limit", v));
    };
    if let Some(message) = text.strip_prefix("err ") {
        return Err(StorageError::Other {
            backend: "redis",
            message: format!("rate-limit check failed: {message}"),
        });
    }
    let mut numbers = [0u64; 6];
    let mut parts = text.split(' ');
    for slot in &mut numbers {
        // negative values (a clock behind a window's start) read as 0, as before
        let part = parts.next().ok_or_else(|| bad_reply("rate-limit", v))?;
        *slot = match part.parse::<i64>() {
            Ok(n) => u64::try_from(n).unwrap_or(0),
            Err(_) => return Err(bad_reply("rate-limit", v)),
        };
    }
    match (numbers, parts.next()) {
        ([allowed @ (0 | 1), remaining, reset_ms, retry_after_ms, now_ms, anomaly], None) => Ok(RateDecision {
            allowed: allowed == 1,
            limit,
            remaining,
            reset_ms,
            retry_after_ms,
            now_ms,
            anomaly: (anomaly > 0).then_some(anomaly),
        }),
        _ => Err(bad_reply("rate-limit", v)),
    }
}

/// One change's four values of an apply reply.
fn applied(reply: &[Value]) -> Result<Applied, StorageError> {
    let decision = || {
        Some(Decision {
            allowed: int(&reply[1])? == 1,
            used: int(&reply[2])?,
            limit: int(&reply[3])?,
        })
    };
    let status = text(&reply[0]);
    match (status.as_deref(), decision()) {
        (Some("err"), _) => Err(StorageError::Other {
            backend: "redis",
            message: format!("apply failed: {}", text(&reply[1]).unwrap_or_default()),
        }),
        (Some("miss"), _) => Ok(Applied::Miss),
        (Some("outdated"), _) => Ok(Applied::Outdated),
        (Some("reused"), _) => Ok(Applied::KeyReused),
        (Some("replay"), Some(d)) => Ok(Applied::Replayed(d)),
        (Some("ok"), Some(d)) => Ok(Applied::Decided(d, None)),
        (Some(status), Some(d)) if status.starts_with("ok ") => {
            // The change is made: an answer it cannot read only loses the record that came.
            let record = unwritten_record(&status[3..], d);
            if record.is_none() {
                tracing::warn!(status, "apply answered a record quotad cannot read");
            }
            Ok(Applied::Decided(d, record.map(Box::new)))
        }
        _ => Err(bad_reply("apply", reply)),
    }
}

/// The record an apply call left with changes not yet in the ledger, from its answer
/// `<ver> <base> <fromw | -> <epoch> <from>` and the decision's `used` and `limit`.
fn unwritten_record(fields: &str, decision: Decision) -> Option<Record> {
    let mut fields = fields.splitn(5, ' ');
    let version = fields.next()?.parse().ok()?;
    let base = fields.next()?.parse().ok()?;
    let from_watermark = match fields.next()? {
        "-" => None,
        fromw => Some(fromw.parse().ok()?),
    };
    Some(Record {
        used: decision.used,
        limit: decision.limit,
        epoch: fields.next()?.to_owned(),
        base,
        loaded_from: fields.next()?.to_owned(),
        version,
        synced: 0,
        from_watermark,
        loaded_ms: None,
        outdated: false,
    })
}

impl RedisCounters {
    async fn lock_op(&self, op: &'static str, token: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut invocation = LOCK.prepare_invoke();
        invocation
            .key(self.keys.sync_lock())
            .arg(op)
            .arg(token)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(self.apply_deadline_ms());
        let held: i64 = self.invoke(invocation).await?;
        Ok(held == 1)
    }

    /// A `settle_receipt.lua` call for the part of call `call`'s receipt about `provider`.
    fn settle_receipt(&self, provider: &ProviderId, call: u64, mode: &str) -> ::redis::ScriptInvocation<'static> {
        let mut invocation = SETTLE_RECEIPT.prepare_invoke();
        invocation
            .key(&self.receipts.key)
            .key(self.keys.record(provider))
            .key(self.keys.dirty())
            .arg(Receipts::slot(call))
            .arg(call)
            .arg(provider.as_str())
            .arg(mode);
        invocation
    }

    /// The Redis time after which an apply or sync-lock call sent now must not change
    /// anything (0: none, while the offset is unmeasured): a hung Redis runs what it had
    /// queued once it resumes, after its sender stopped waiting.
    fn apply_deadline_ms(&self) -> i64 {
        let within = i64::try_from(APPLY_DEADLINE.as_millis()).unwrap_or(250);
        self.clock_offset_ms
            .read()
            .unwrap()
            .map_or(0, |offset| now_ms() + offset + within)
    }

    /// Adds the ledger's idempotency records to a `load.lua` or `rebase.lua` call: each
    /// key, with its answer `amount:allowed:used:limit` and expiry (unix ms) as arguments.
    fn with_ledger_keys(
        &self,
        invocation: &mut ::redis::ScriptInvocation<'_>,
        provider: &ProviderId,
        keys: &[KeyRecord],
    ) {
        for (id, entry) in keys {
            let Some(entry) = IdempotencyEntry::parse(entry) else {
                continue;
            };
            let d = entry.decision;
            invocation
                .key(self.keys.idempotency(provider, id))
                .arg(format!(
                    "{}:{}:{}:{}",
                    entry.amount,
                    u8::from(d.allowed),
                    d.used,
                    d.limit
                ))
                .arg(entry.expires_ms);
        }
    }

    async fn write_seed(
        &self,
        provider: &ProviderId,
        seed: &Seed,
        ttl: Duration,
        replace: bool,
    ) -> Result<i64, StorageError> {
        let mut invocation = LOAD.prepare_invoke();
        invocation
            .key(self.keys.record(provider))
            .key(self.keys.dirty())
            .key(self.keys.fences(provider))
            .key(self.keys.fence_gen(provider))
            .key(self.keys.pending_keys(provider))
            .arg(seed.used)
            .arg(seed.limit)
            .arg(&seed.epoch)
            .arg(&seed.loaded_from)
            .arg(ttl.as_secs())
            .arg(if replace { "1" } else { "0" })
            .arg(provider.as_str())
            .arg(seed.fence)
            .arg(u8::from(seed.outdated));
        // The ledger's idempotency records come along, so Redis answers their retries.
        self.with_ledger_keys(&mut invocation, provider, &seed.keys);
        self.invoke::<i64>(invocation).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Batched for u32 {
        fn same_item(&self, next: &Self) -> bool {
            self == next
        }
    }

    #[test]
    fn a_batch_of_send_at_distinct_items_is_handed_back_and_identical_jobs_count_once() {
        let batches = Batches::new();
        assert!(matches!(batches.enqueue(0_u32), Queued::First));
        // A hot provider's jobs: one item however many.
        for _ in 0..1000 {
            assert!(matches!(batches.enqueue(0), Queued::Later));
        }
        for n in 1..SEND_AT - 1 {
            assert!(matches!(batches.enqueue(n as u32), Queued::Later));
        }
        let Queued::Full(jobs) = batches.enqueue(999) else {
            panic!("the item that makes SEND_AT distinct items must fill the batch");
        };
        assert_eq!(jobs.len(), 1001 + SEND_AT - 1);
        assert_eq!(jobs[..1001], [0; 1001]);
        assert_eq!(jobs.last(), Some(&999));
        // The next job starts a new batch, counted afresh.
        assert!(matches!(batches.enqueue(5), Queued::First));
        for n in 0..SEND_AT - 2 {
            assert!(matches!(batches.enqueue(100 + n as u32), Queued::Later));
        }
        assert!(matches!(batches.enqueue(7), Queued::Full(jobs) if jobs.len() == SEND_AT));
    }

    #[tokio::test]
    async fn a_batch_goes_in_calls_of_at_most_max_batch_jobs_in_order() {
        let (sent, mut calls) = tokio::sync::mpsc::unbounded_channel();
        let jobs: Vec<u32> = (0..2 * MAX_BATCH as u32 + 44).collect();
        in_calls(jobs, move |call: Vec<u32>| {
            let sent = sent.clone();
            async move { sent.send(call).unwrap() }
        })
        .await;
        let mut got = Vec::new();
        while let Some(call) = calls.recv().await {
            assert!(call.len() <= MAX_BATCH);
            got.push(call);
        }
        got.sort_by_key(|call| call[0]);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [MAX_BATCH, MAX_BATCH, 44]);
        assert_eq!(got.concat(), (0..2 * MAX_BATCH as u32 + 44).collect::<Vec<_>>());
    }
}
