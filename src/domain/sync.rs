//! The batch sync: writes every dirty record's unsynced usage to the ledger, exactly once
//! per version (the ledger's watermark check makes a replay add nothing).

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;

use super::{Phase, QuotaService};

/// What a sync run did (API.md `POST /admin/sync`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncReport {
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Dirty records examined.
    pub providers: u64,
    /// Documents written.
    pub written: u64,
    /// Records that could not be written (they stay dirty for the next run).
    pub failed: u64,
}

/// Why a sync did not run.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("another sync is running")]
    Running,
    #[error("the dirty index could not be read: {0}")]
    Storage(#[from] crate::storage::StorageError),
}

/// Why a phase switch did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("usage is left unsynced; the phase is unchanged")]
    Incomplete,
    #[error(transparent)]
    Quota(#[from] super::QuotaError),
}

/// Runs syncs one at a time and remembers the last report.
pub struct SyncJob {
    service: Arc<QuotaService>,
    running: Mutex<()>,
    last: std::sync::Mutex<Option<SyncReport>>,
}

const BATCH: usize = 500;
/// The lock expires this long after its holder stopped renewing it (API.md: a dead
/// holder's lock is released within 60 s).
const LOCK_TTL: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// The name of the last sync report among quotad's own values in Firestore
/// ([`Ledger::meta`](crate::storage::Ledger::meta)), for replicas that cannot read Redis's.
const REPORT_META: &str = "sync-report";

impl SyncJob {
    pub fn new(service: Arc<QuotaService>) -> Self {
        Self {
            service,
            running: Mutex::new(()),
            last: std::sync::Mutex::new(None),
        }
    }

    /// The last report of any replica: from Redis, else from Firestore (Redis away, or
    /// without it), else this replica's own. (helper-54's soak: a replica restarted while
    /// Redis was stopped answered `last: null` after syncs had run; API.md: null only
    /// until a sync has run.)
    pub async fn last(&self) -> Option<SyncReport> {
        let parse = |json: String| serde_json::from_str::<SyncReport>(&json).ok();
        if let Ok(Some(report)) = self.service.counters().last_sync_report().await {
            return parse(report);
        }
        let stored = tokio::time::timeout(Duration::from_secs(2), self.service.ledger().meta(REPORT_META)).await;
        match stored {
            Ok(Ok(Some(report))) => parse(report),
            _ => self.last.lock().unwrap().clone(),
        }
    }

    /// Switches every replica to `target`. Leaving `redis-primary` first writes all usage
    /// to Firestore (waiting up to 60 s for a running sync) and refuses while any is left.
    pub async fn switch_phase(&self, target: Phase) -> Result<(Phase, DateTime<Utc>), SwitchError> {
        // API.md: the answer comes within 60 s even when Firestore is unreachable.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(55);
        // From the stored phase, not this replica's view of it, which follows a poll behind:
        // a replica that has not yet seen another's switch to redis-primary must still sync
        // before leaving it (and must not take the stored phase for the one it already has).
        // When it cannot be read (Firestore away or slow) it may be redis-primary: the sync
        // runs, and answers whether everything is written (API.md: sync_incomplete).
        let stored = tokio::time::timeout(Duration::from_secs(3), self.service.refresh_phase()).await;
        let may_be_primary = !matches!(stored, Ok(Ok((phase, _))) if phase != Phase::RedisPrimary);
        if may_be_primary && target != Phase::RedisPrimary {
            let report = loop {
                match tokio::time::timeout_at(deadline, self.run_once()).await {
                    Ok(Err(SyncError::Running)) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(other) => break other.ok(),
                    Err(_) => break None,
                }
            };
            if !matches!(&report, Some(r) if r.failed == 0) {
                tracing::warn!(?report, "not leaving redis-primary: the sync did not write everything");
                return Err(SwitchError::Incomplete);
            }
        }
        Ok(self.service.set_phase(target).await?)
    }

    /// One full run under the cross-replica lock.
    pub async fn run_once(&self) -> Result<SyncReport, SyncError> {
        let _guard = self.running.try_lock().map_err(|_| SyncError::Running)?;
        let counters = self.service.counters();
        let token = uuid::Uuid::new_v4().to_string();
        if !counters.acquire_sync_lock(&token, LOCK_TTL).await? {
            return Err(SyncError::Running);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renewal = {
            let (counters, token, lost) = (counters.clone(), token.clone(), lost.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    if !matches!(counters.renew_sync_lock(&token, LOCK_TTL).await, Ok(true)) {
                        tracing::warn!("sync lock lost: stopping after the current write");
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })
        };
        let report = self.walk(&lost).await;
        renewal.abort();
        if let Err(err) = counters.release_sync_lock(&token).await {
            tracing::warn!(error = %err, "could not release the sync lock; it expires by itself");
        }
        let report = report?;
        if let Ok(json) = serde_json::to_string(&report) {
            if let Err(err) = counters.store_sync_report(&json).await {
                tracing::warn!(error = %err, "could not store the sync report in Redis");
            }
            if let Err(err) = self.service.ledger().set_meta(REPORT_META, &json).await {
                tracing::warn!(error = %err, "could not store the sync report in Firestore");
            }
        }
        Ok(report)
    }

    /// Writes every record dirty when it starts (and those made dirty meanwhile, once).
    /// Safe to stop anywhere: each write lands once, and what is left stays dirty.
    async fn walk(&self, lost: &AtomicBool) -> Result<SyncReport, SyncError> {
        let started_at = Utc::now();
        let started = std::time::Instant::now();
        let mut seen = HashSet::new();
        let (mut written, mut failed) = (0u64, 0u64);
        loop {
            let batch = self
                .service
                .counters()
                .dirty(Duration::ZERO, BATCH + seen.len())
                .await?;
            let fresh: Vec<_> = batch.into_iter().filter(|p| !seen.contains(p)).take(BATCH).collect();
            if fresh.is_empty() || lost.load(Ordering::Relaxed) {
                break;
            }
            let (batch_written, batch_failed) = self.service.flush_batch(&fresh).await?;
            written += batch_written;
            failed += batch_failed;
            seen.extend(fresh);
        }
        let report = SyncReport {
            run_id: uuid::Uuid::new_v4().to_string(),
            started_at,
            finished_at: Utc::now(),
            providers: seen.len() as u64,
            written,
            failed,
        };
        metrics::counter!("quotad_sync_runs_total").increment(1);
        metrics::counter!("quotad_sync_written_total").increment(written);
        metrics::counter!("quotad_sync_failed_total").increment(failed);
        metrics::histogram!("quotad_sync_duration_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(providers = report.providers, written, failed, "sync finished");
        *self.last.lock().unwrap() = Some(report.clone());
        Ok(report)
    }
}
