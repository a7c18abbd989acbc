//! Wiring: configuration → adapters → domain → HTTP, and the background tasks.

use std::{
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    domain::quota::MARK_POLL,
    domain::{QuotaService, limiter, limiter::RateLimiter, ratelimit, schedule::Schedule, sync::SyncJob, writer},
    http::{self, App, Health},
    storage::{Counters, Ledger, firestore::FirestoreLedger, memory, redis::RedisCounters},
    telemetry,
};

/// A built service: its listener is bound, nothing runs until [`Application::run_until`].
pub struct Application {
    listener: TcpListener,
    app: Arc<App>,
    /// The anomaly webhook's URL and queue, when one is configured.
    webhook: Option<(String, tokio::sync::mpsc::Receiver<crate::domain::ratelimit::Anomaly>)>,
    deadlines: http::serve::Deadlines,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let (counters, ledger) = backends(&config)?;
        Self::with_backends(config, counters, ledger).await
    }

    /// Builds on given adapters (tests share an in-memory ledger between two apps).
    pub async fn with_backends(
        config: Config,
        counters: Arc<dyn Counters>,
        ledger: Arc<dyn Ledger>,
    ) -> anyhow::Result<Self> {
        tracing::info!(
            counters = counters.kind(),
            ledger = ledger.kind(),
            "starting quotad on {} counters and {} ledger{}",
            counters.kind(),
            ledger.kind(),
            if counters.kind() == "memory" || ledger.kind() == "memory" {
                " (embedded in-memory backends: nothing is shared or kept across restarts)"
            } else {
                ""
            }
        );
        if config.api_keys.is_none() {
            tracing::warn!("QUOTAD_API_KEYS is unset: the caller endpoints are open to anyone");
        }
        if config.admin_token.is_none() {
            tracing::info!("QUOTAD_ADMIN_TOKEN is unset: the admin endpoints answer 403");
        }
        let plans = ratelimit::plans_from_config(&config.plans)?;
        let schedule = Schedule::parse(&config.sync_schedule)?;
        let quotas = QuotaService::new(
            counters.clone(),
            ledger,
            config.default_limit,
            config.cache_ttl,
            config.initial_phase,
        );
        let (webhook_tx, webhook) = match &config.anomaly_webhook {
            Some(url) => {
                let (tx, rx) = limiter::webhook_channel();
                (Some(tx), Some((url.clone(), rx)))
            }
            None => (None, None),
        };
        let listener = TcpListener::bind(&config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let app = Arc::new(App {
            sync: Arc::new(SyncJob::new(quotas.clone())),
            limiter: Arc::new(RateLimiter::new(counters, quotas.clone(), webhook_tx)),
            quotas,
            plans,
            api_keys: config.api_keys.clone(),
            admin_token: config.admin_token.clone(),
            schedule,
            health: Arc::new(Health::default()),
            metrics: telemetry::metrics_handle(),
        });
        Ok(Self {
            listener,
            app,
            webhook,
            deadlines: config.deadlines,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` completes, then drains requests and flushes pending writes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(writer::run(self.app.quotas.clone(), cancel.clone()));
        // Readiness is known before the first request, and so is a stored phase (which a
        // loss of Redis's data found now is recorded under).
        let health = probe(&self.app, true).await;
        if health.1 {
            adopt_stored_phase(&self.app.quotas).await;
        } else if health.0 {
            // Firestore away: the phase mirrored in Redis, rather than QUOTAD_PHASE.
            self.app.quotas.adopt_mirrored_phase().await;
        }
        check_data(&self.app, health).await;
        tasks.spawn(watch_health(self.app.clone(), cancel.clone()));
        tasks.spawn(reconcile(self.app.clone(), cancel.clone()));
        tasks.spawn(hand_back(self.app.clone(), cancel.clone()));
        tasks.spawn(watch_marks(self.app.clone(), cancel.clone()));
        tasks.spawn(follow_phase(self.app.clone(), cancel.clone()));
        tasks.spawn(scheduled_sync(self.app.clone(), cancel.clone()));
        if let Some((url, queue)) = self.webhook {
            tasks.spawn(limiter::deliver_webhooks(url, queue, cancel.clone()));
        }
        tasks.close();
        tracing::info!(addr = %self.listener.local_addr()?, "listening");
        let result = http::serve::serve(self.listener, http::service(self.app.clone()), self.deadlines, shutdown).await;
        tracing::info!("shutting down: flushing pending Firestore writes");
        cancel.cancel();
        tasks.wait().await;
        tracing::info!("stopped");
        result.map_err(Into::into)
    }
}

/// The adapters the configuration names (the embedded ones when it names none).
pub fn backends(config: &Config) -> anyhow::Result<(Arc<dyn Counters>, Arc<dyn Ledger>)> {
    let counters: Arc<dyn Counters> = match &config.redis_url {
        Some(url) => Arc::new(RedisCounters::new(url, &config.redis_prefix).context("REDIS_URL")?),
        None => Arc::new(memory::MemoryCounters::default()),
    };
    let ledger: Arc<dyn Ledger> = match &config.firestore_project_id {
        Some(project) => Arc::new(FirestoreLedger::new(project, &config.collection)),
        None => Arc::new(memory::MemoryLedger::default()),
    };
    Ok((counters, ledger))
}

/// The quota service and sync job without a listener, for the command-line tools; the
/// phase is the stored one.
pub async fn tools(config: &Config) -> anyhow::Result<(Arc<QuotaService>, SyncJob)> {
    let (counters, ledger) = backends(config)?;
    let quotas = QuotaService::new(
        counters,
        ledger,
        config.default_limit,
        config.cache_ttl,
        config.initial_phase,
    );
    if let Some((phase, since)) = quotas.ledger().phase().await.context("reading the stored phase")? {
        quotas.follow_phase(phase, since);
    }
    Ok((quotas.clone(), SyncJob::new(quotas)))
}

/// The runtime quotad (and the bench's echo ceiling, on equal terms) runs on: tokio's
/// current-thread scheduler when it is to have one worker (`TOKIO_WORKER_THREADS=1`, or a
/// host with one core), otherwise the multi-thread one, which reads `TOKIO_WORKER_THREADS`
/// itself. One worker of the multi-thread scheduler still pays for work stealing and its
/// shared queues. Under wrk on the 2-core bench machine (8 s runs, alternating binaries)
/// the current-thread scheduler took quotad 0.4-2 µs less CPU a request (12.8-13.4 against
/// 13.6-15.1 µs; the echo 0.1-0.6 µs less), at the same req/s, and cut the hot consume's
/// p99 from 2.0-3.4 ms to 1.4-1.6 ms, the cached GET's from 1.9-2.7 to 1.45-1.5 ms.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut builder = if one_worker(std::env::var("TOKIO_WORKER_THREADS").ok().as_deref(), cores) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// Whether the runtime gets one worker: `TOKIO_WORKER_THREADS` (as tokio reads it), else
/// one per core. A value tokio would refuse is left to the multi-thread builder to report.
fn one_worker(setting: Option<&str>, cores: usize) -> bool {
    match setting {
        Some(value) => value.trim().parse::<usize>() == Ok(1),
        None => cores == 1,
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Sleeps `period` unless cancelled; `false` when cancelled.
async fn tick(cancel: &CancellationToken, period: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(period) => true,
    }
}

/// Probes both dependencies once, each bounded so a hung one cannot hold the caller.
async fn probe(app: &App, first: bool) -> (bool, bool) {
    let quotas = &app.quotas;
    let failures = quotas.failures();
    let (redis, firestore) = tokio::join!(
        tokio::time::timeout(PROBE_BOUND, quotas.counters().ping()),
        tokio::time::timeout(PROBE_BOUND, quotas.ledger().ping())
    );
    let (redis_ok, firestore_ok) = (matches!(redis, Ok(Ok(()))), matches!(firestore, Ok(Ok(()))));
    // Each change is logged once, with why a dependency is down (`/readyz` only names it).
    let health = &app.health;
    for (name, was, result) in [
        ("redis", health.redis.load(Ordering::Relaxed), redis),
        ("firestore", health.firestore.load(Ordering::Relaxed), firestore),
    ] {
        match result {
            Ok(Ok(())) if !was => tracing::info!(dependency = name, "dependency is ready"),
            Ok(Ok(())) => {}
            Ok(Err(err)) if was || first => tracing::warn!(dependency = name, error = %err, "dependency is down"),
            Err(_) if was || first => tracing::warn!(
                dependency = name,
                error = "no answer within 1.5 s",
                "dependency is down"
            ),
            _ => {}
        }
    }
    app.health.set(redis_ok, firestore_ok);
    quotas.probed(redis_ok, firestore_ok, failures);
    (redis_ok, firestore_ok)
}

/// Whether Redis lost its data set, once both dependencies answer (see
/// [`QuotaService::check_redis_data`]).
async fn check_data(app: &App, (redis, firestore): (bool, bool)) {
    if redis
        && firestore
        && let Err(err) = app.quotas.check_redis_data().await
    {
        tracing::debug!(error = %err, "could not check Redis's data set");
    }
}

/// While Redis is away (for this replica's decisions), how often it is probed (at most;
/// at once after a probe that took this long) and the reconcile tried (it also runs as
/// soon as a probe finds Redis answering): the sooner it is back, the sooner the records
/// Firestore changed are reloaded, and other replicas, which may never have lost Redis,
/// stop deciding from them.
const RECOVERY_TICK: Duration = Duration::from_millis(200);

/// While Redis is away, how often Redis alone is pinged between full probes (which also
/// read from Firestore): a replica sees a restarted Redis this soon, so that its fallbacks
/// stop missing what other replicas, back on Redis already, decide there.
const REDIS_TICK: Duration = Duration::from_millis(20);

/// How long a probe waits for a dependency.
const PROBE_BOUND: Duration = Duration::from_millis(1500);

/// `normal`, or [`RECOVERY_TICK`] while Redis is away.
fn period(app: &App, normal: Duration) -> Duration {
    if app.quotas.redis_is_up() {
        normal
    } else {
        RECOVERY_TICK
    }
}

/// Probes both dependencies every second for `/readyz` (a change shows within 10 s), and
/// every [`RECOVERY_TICK`] while Redis is away, at once after a probe that took that long
/// (one that waited for a hung Redis) and at once when a request finds Redis down: a probe
/// is connecting when Redis wakes.
async fn watch_health(app: Arc<App>, cancel: CancellationToken) {
    let mut took = Duration::ZERO;
    loop {
        let wait = period(&app, Duration::from_secs(1)).saturating_sub(took);
        // Redis alone is pinged in between only while it does not answer: once it does, the
        // reconcile brings decisions back, and the next full probe comes at its tick.
        if app.quotas.redis_is_up() || app.quotas.redis_answering() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = app.quotas.went_down() => {}
            }
        } else {
            let ping = || async {
                let failures = app.quotas.failures();
                let answers = matches!(
                    tokio::time::timeout(PROBE_BOUND, app.quotas.counters().ping()).await,
                    Ok(Ok(()))
                );
                app.quotas.note_redis_answers_since(answers, failures);
                answers
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = until_answered(ping, wait) => {}
            }
        }
        let started = tokio::time::Instant::now();
        let health = probe(&app, false).await;
        took = started.elapsed();
        check_data(&app, health).await;
    }
}

/// Calls `ping` every [`REDIS_TICK`] until it answers `true` (then returns `true` at once)
/// or `wait` has passed (`false`).
async fn until_answered<F, Fut>(mut ping: F, wait: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < until {
        if ping().await {
            return true;
        }
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + REDIS_TICK)).await;
    }
    false
}

/// Brings decisions back to Redis once it answers again and what Firestore decided
/// meanwhile is reloaded; also reloads, every few seconds, what another replica's fallback
/// marked.
async fn reconcile(app: Arc<App>, cancel: CancellationToken) {
    let quotas = &app.quotas;
    let mut last_round = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period(&app, Duration::from_millis(500))) => {}
            () = quotas.answers() => {}
        }
        // The probe's flags can be older than the failure that took Redis down (the probe
        // sent then may still be waiting on a hung Redis): only a ping answered since says
        // Redis is back.
        let healthy = app.health.redis.load(std::sync::atomic::Ordering::Relaxed)
            && app.health.firestore.load(std::sync::atomic::Ordering::Relaxed)
            && quotas.redis_answering();
        if !healthy || (quotas.redis_is_up() && last_round.elapsed() < Duration::from_secs(5)) {
            continue;
        }
        last_round = tokio::time::Instant::now();
        let round = quotas.recovery_round();
        let failures = quotas.failures();
        match quotas.reconcile().await {
            Ok(reloaded) => {
                if reloaded > 0 {
                    tracing::info!(reloaded, "reloaded records Firestore changed while Redis was away");
                }
                if quotas.failures() == failures {
                    quotas.redis_recovered();
                } else {
                    // A call failed during the round: this Redis is not back (a round that
                    // needed no Redis call, nothing being held or to reload, cannot tell).
                    quotas.recovery_failed(round);
                }
            }
            Err(err) => {
                quotas.round_failed(round, &err);
                tracing::warn!(error = %err, "reconciling with Firestore failed; will retry");
            }
        }
    }
}

/// Looks for other replicas' fallback marks every [`MARK_POLL`] from the start of one
/// poll to the next's, however long a query takes (see [`QuotaService::watch_marks`]: the
/// period bounds how late a mark is seen); a slower query delays the next. A failed poll is
/// logged at debug level and tried again at the next tick (a Firestore that does not answer
/// is the health task's to report); shutdown does not wait for a poll.
async fn watch_marks(app: Arc<App>, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(MARK_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => tokio::select! {
                () = cancel.cancelled() => return,
                polled = app.quotas.watch_marks() => polled,
            },
        };
        if let Err(err) = polled {
            tracing::debug!(error = %err, "looking for other replicas' fallback marks failed");
        }
    }
}

/// Reloads the providers held back from Redis once their Firestore decisions have landed
/// (woken by those decisions; retries what failed every half second).
async fn hand_back(app: Arc<App>, cancel: CancellationToken) {
    let handover = app.quotas.handover();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = handover.ready_changed() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        app.quotas.hand_back().await;
    }
}

/// Adopts the stored phase before serving: `QUOTAD_PHASE` is only the phase when none is
/// stored. Bounded, as quotad serves even while Firestore hangs at start
/// ([`follow_phase`] adopts it once Firestore answers).
async fn adopt_stored_phase(quotas: &QuotaService) {
    match tokio::time::timeout(Duration::from_millis(1500), quotas.refresh_phase()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "could not read the stored phase at start"),
        Err(_) => {
            tracing::warn!("reading the stored phase at start timed out");
            quotas.adopt_mirrored_phase().await;
        }
    }
}

/// Follows the phase stored in the ledger (every replica within a second or two).
async fn follow_phase(app: Arc<App>, cancel: CancellationToken) {
    loop {
        match app.quotas.refresh_phase().await {
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "reading the phase failed"),
        }
        if !tick(&cancel, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// Runs the batch sync on its cron schedule (UTC).
async fn scheduled_sync(app: Arc<App>, cancel: CancellationToken) {
    loop {
        let now = chrono::Utc::now();
        let Some(next) = app.schedule.next_after(now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        if !tick(&cancel, wait).await {
            return;
        }
        match app.sync.run_once().await {
            Ok(report) => tracing::info!(written = report.written, failed = report.failed, "scheduled sync done"),
            Err(err) => tracing::warn!(error = %err, "scheduled sync did not run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// One worker, asked for or from one core, runs the current-thread scheduler; any other
    /// setting (tokio's own errors included) the multi-thread one.
    #[test]
    fn the_runtime_has_one_worker_only_when_asked_or_on_one_core() {
        assert!(one_worker(Some("1"), 8));
        assert!(one_worker(Some(" 1 "), 8));
        assert!(one_worker(None, 1));
        assert!(!one_worker(None, 2));
        assert!(!one_worker(Some("2"), 1));
        assert!(!one_worker(Some("0"), 1));
        assert!(!one_worker(Some("one"), 1));
    }

    /// Redis answering at the 4th ping is seen then, 3 ticks in, not at the end of the wait.
    #[tokio::test(start_paused = true)]
    async fn redis_is_pinged_every_tick_until_it_answers() {
        let pings = AtomicUsize::new(0);
        let ping = || async { pings.fetch_add(1, Ordering::SeqCst) + 1 == 4 };
        let started = tokio::time::Instant::now();
        assert!(until_answered(ping, RECOVERY_TICK).await);
        assert_eq!(pings.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), 3 * REDIS_TICK);
    }

    /// A Redis that never answers is pinged until the wait is over, and not after.
    #[tokio::test(start_paused = true)]
    async fn pinging_redis_ends_with_the_wait() {
        let pings = AtomicUsize::new(0);
        let ping = || async {
            pings.fetch_add(1, Ordering::SeqCst);
            false
        };
        let started = tokio::time::Instant::now();
        assert!(!until_answered(ping, Duration::from_millis(50)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(pings.load(Ordering::SeqCst), 3, "at 0, 20 and 40 ms");
        assert!(!until_answered(|| async { unreachable!("no wait, no ping") }, Duration::ZERO).await);
    }
}
