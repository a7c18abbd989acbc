//! Logs (tracing, to stdout; `RUST_LOG` filters) and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the log subscriber once (later calls do nothing): the server logs at `info` to
/// stdout.
pub fn init_tracing() {
    install("info", false);
}

/// Logs for the command-line tools: warnings and errors only, on stderr (stdout is the
/// command's answer).
pub fn init_tracing_quiet() {
    install("warn", true);
}

/// `RUST_LOG` wins over `default_level`; colours only on a terminal.
fn install(default_level: &str, to_stderr: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = if to_stderr {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init()
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).try_init()
    };
}

/// Metric handles cached by label set: a hot-path metric with a few known label values
/// looks its handle up in the recorder's registry (hash the key, take a lock) once per label
/// set instead of once per request. The recorder must be installed ([`metrics_handle`])
/// before the first use, which building an application does.
pub struct Cached<T, const N: usize>([OnceLock<T>; N]);

impl<T, const N: usize> Cached<T, N> {
    pub const fn new() -> Self {
        Self([const { OnceLock::new() }; N])
    }

    /// The handle for label set `index` (< N), made by `make` on first use.
    pub fn get(&self, index: usize, make: impl FnOnce() -> T) -> &T {
        self.0[index].get_or_init(make)
    }
}

impl<T, const N: usize> Default for Cached<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The process-wide Prometheus recorder (installed on first use; every app in a test
/// process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("static bucket list is valid")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "quotad_http_requests_total",
        "HTTP requests by route, method and status"
    );
    metrics::describe_histogram!("quotad_http_request_duration_seconds", "HTTP request latency by route");
    metrics::describe_counter!(
        "quotad_decisions_total",
        "Quota and rate-limit decisions by outcome and phase"
    );
    metrics::describe_counter!("quotad_cache_total", "Quota cache lookups by result (hit, miss)");
    metrics::describe_counter!(
        "quotad_fallbacks_total",
        "Quota decisions made by Firestore while Redis was unavailable"
    );
    metrics::describe_counter!("quotad_store_writes_total", "Firestore usage writes by result");
    metrics::describe_counter!(
        "quotad_store_write_retries_total",
        "Firestore usage writes that failed and will be retried"
    );
    metrics::describe_counter!("quotad_redis_transitions_total", "Redis availability transitions");
    metrics::describe_counter!(
        "quotad_phase_changes_total",
        "Migration phase changes seen by this replica"
    );
    metrics::describe_counter!("quotad_sync_runs_total", "Batch sync runs");
    metrics::describe_counter!(
        "quotad_ratelimit_fallbacks_total",
        "Times rate limits went to the in-process twin because Redis was unavailable"
    );
    metrics::describe_counter!(
        "quotad_ratelimit_script_errors_total",
        "Rate-limit checks decided in-process because the script failed for their key"
    );
    metrics::describe_counter!(
        "quotad_idempotency_settled_total",
        "Idempotency keys decided both by Redis and by the Firestore fallback, counted once"
    );
    metrics::describe_counter!("quotad_anomalies_total", "Rate-limit anomalies recorded, by plan");
    metrics::describe_counter!(
        "quotad_webhook_deliveries_total",
        "Anomaly webhook deliveries by result (delivered, failed)"
    );
    metrics::describe_counter!(
        "quotad_webhook_dropped_total",
        "Anomalies not sent to the webhook because its queue was full"
    );
}
