//! The dual-write writer: carries each Redis change into Firestore behind the answer,
//! retried until it lands.
//!
//! The queue in process memory only makes the write prompt. Durability comes from Redis:
//! a changed record is dirty (it never expires) and sits in the dirty index until the
//! ledger holds its version, so a sweep re-enqueues whatever a crashed replica (or a
//! failed write) left behind.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Phase, ProviderId, QuotaService};

/// How long a record may stay dirty before a sweep takes it over from whoever wrote it.
const SWEEP_AGE: Duration = Duration::from_secs(2);
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const WORKERS: usize = 4;

/// The queue of providers with changes to write.
#[derive(Default)]
pub struct Writer {
    queue: Mutex<(VecDeque<ProviderId>, HashSet<ProviderId>)>,
    ready: Notify,
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
    if phase == Phase::RedisPrimary || !service.redis_is_up() {
        return;
    }
    let providers = match service.counters().dirty(SWEEP_AGE, 500).await {
        Ok(providers) => providers,
        Err(err) => {
            tracing::debug!(error = %err, "dirty sweep failed");
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

/// Writes everything queued, for at most `budget` (graceful shutdown).
pub async fn drain(service: &QuotaService, budget: Duration) {
    let deadline = tokio::time::Instant::now() + budget;
    while service.writer().pending() > 0 && tokio::time::Instant::now() < deadline {
        if write_one(service).await == Step::Failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
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
