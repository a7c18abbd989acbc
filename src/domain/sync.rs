//! The batch sync: writes every dirty record's unsynced usage to the ledger, exactly once
//! per version (the ledger's watermark check makes a replay add nothing).

use std::{collections::HashSet, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;

use super::QuotaService;

/// What a sync run did (API.md `POST /admin/sync`).
#[derive(Debug, Clone, serde::Serialize)]
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

/// Runs syncs one at a time and remembers the last report.
pub struct SyncJob {
    service: Arc<QuotaService>,
    running: Mutex<()>,
    last: std::sync::Mutex<Option<SyncReport>>,
}

const BATCH: usize = 500;

impl SyncJob {
    pub fn new(service: Arc<QuotaService>) -> Self {
        Self {
            service,
            running: Mutex::new(()),
            last: std::sync::Mutex::new(None),
        }
    }

    pub fn last(&self) -> Option<SyncReport> {
        self.last.lock().unwrap().clone()
    }

    /// One full run: every record dirty when it starts (and those made dirty meanwhile, once).
    pub async fn run_once(&self) -> Result<SyncReport, SyncError> {
        let _guard = self.running.try_lock().map_err(|_| SyncError::Running)?;
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
            if fresh.is_empty() {
                break;
            }
            for provider in fresh {
                match self.service.flush(&provider).await {
                    Ok(true) => written += 1,
                    Ok(false) => failed += 1,
                    Err(err) => {
                        tracing::warn!(%provider, error = %err, "sync: write failed");
                        failed += 1;
                    }
                }
                seen.insert(provider);
            }
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
