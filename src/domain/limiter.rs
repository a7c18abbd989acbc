//! The rate limiter: decides on the counter store (one Redis script per check, anomaly
//! counting included) and falls back to the in-process twin while Redis is away, which is
//! approximate across replicas (each counts on its own). Anomalies are logged, metered and
//! sent to the webhook, never on the request path.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    QuotaService,
    ratelimit::{Anomaly, Policy, RateCheck, RateDecision, Twin},
};
use crate::storage::{Counters, StorageError};

/// Checks rate limits for every replica's callers.
pub struct RateLimiter {
    counters: Arc<dyn Counters>,
    quotas: Arc<QuotaService>,
    twin: Twin,
    in_fallback: AtomicBool,
    webhook: Option<mpsc::Sender<Anomaly>>,
}

impl RateLimiter {
    pub fn new(counters: Arc<dyn Counters>, quotas: Arc<QuotaService>, webhook: Option<mpsc::Sender<Anomaly>>) -> Self {
        Self {
            counters,
            quotas,
            twin: Twin::default(),
            in_fallback: AtomicBool::new(false),
            webhook,
        }
    }

    /// One check now.
    pub async fn check(&self, key: &str, policy: &Policy, cost: u64) -> RateDecision {
        let check = RateCheck {
            key,
            policy,
            cost,
            now_ms: None,
        };
        if self.quotas.redis_is_up() {
            match self.counters.rate_check(&check).await {
                Ok(decision) => {
                    if self.in_fallback.swap(false, Ordering::Relaxed) {
                        tracing::info!("rate limits are decided by Redis again");
                    }
                    self.report(&check, &decision);
                    return decision;
                }
                Err(err) if err.is_unavailable() => self.quotas.redis_down(&err.to_string()),
                Err(err) => {
                    // This key's counter is broken (a key of another type, written by hand):
                    // Redis is up, so the others stay on it; this check is decided here.
                    tracing::error!(key, error = %err, "rate-limit script failed for this key; deciding it in-process");
                    metrics::counter!("quotad_ratelimit_script_errors_total").increment(1);
                    return self.decide_in_process(&check);
                }
            }
        }
        if !self.in_fallback.swap(true, Ordering::Relaxed) {
            tracing::warn!("Redis unavailable: rate limits are decided in-process (approximate across replicas)");
            metrics::counter!("quotad_ratelimit_fallbacks_total").increment(1);
        }
        self.decide_in_process(&check)
    }

    fn decide_in_process(&self, check: &RateCheck<'_>) -> RateDecision {
        let decision = self.twin.check(check);
        self.report(check, &decision);
        decision
    }

    fn report(&self, check: &RateCheck<'_>, decision: &RateDecision) {
        let (Some(count), Some((plan, threshold))) = (decision.anomaly, check.anomaly_threshold()) else {
            return;
        };
        tracing::warn!(
            key = check.key,
            plan,
            count,
            threshold,
            "rate-limit anomaly: attempts above twice the plan's limit"
        );
        metrics::counter!("quotad_anomalies_total", "plan" => plan.to_owned()).increment(1);
        if let Some(webhook) = &self.webhook {
            let anomaly =
                super::ratelimit::anomaly_at(check.key.to_owned(), plan.to_owned(), count, threshold, decision.now_ms);
            if webhook.try_send(anomaly).is_err() {
                metrics::counter!("quotad_webhook_dropped_total").increment(1);
            }
        }
    }

    /// The newest anomalies first (from Redis, or this process's while Redis is away).
    pub async fn anomalies(&self, limit: usize) -> Result<Vec<Anomaly>, StorageError> {
        if self.quotas.redis_is_up() {
            match self.counters.anomalies(limit).await {
                Ok(found) => return Ok(found),
                Err(err) if err.is_unavailable() => self.quotas.redis_down(&err.to_string()),
                Err(err) => return Err(err),
            }
        }
        Ok(self.twin.anomalies(limit))
    }
}

/// The webhook queue: anomalies wait here for the sender task.
pub fn webhook_channel() -> (mpsc::Sender<Anomaly>, mpsc::Receiver<Anomaly>) {
    mpsc::channel(1024)
}

/// Posts each anomaly as JSON to `url`: 5 s timeout, 3 attempts with backoff, then dropped
/// (logged and metered). Stops at `cancel`.
pub async fn deliver_webhooks(url: String, mut queue: mpsc::Receiver<Anomaly>, cancel: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    loop {
        let anomaly = tokio::select! {
            () = cancel.cancelled() => return,
            next = queue.recv() => match next { Some(a) => a, None => return },
        };
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=3 {
            match client.post(&url).json(&anomaly).send().await {
                Ok(resp) if resp.status().is_success() => {
                    metrics::counter!("quotad_webhook_deliveries_total", "result" => "delivered").increment(1);
                    break;
                }
                outcome => {
                    let error = match outcome {
                        Ok(resp) => format!("status {}", resp.status()),
                        Err(err) => err.to_string(),
                    };
                    tracing::warn!(attempt, %error, "anomaly webhook failed");
                    if attempt == 3 {
                        metrics::counter!("quotad_webhook_deliveries_total", "result" => "failed").increment(1);
                        break;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay *= 4;
                }
            }
        }
    }
}
