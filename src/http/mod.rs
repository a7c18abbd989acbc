//! HTTP: routes, extractors, authentication and problem+json errors. No business rules
//! here: handlers validate into domain types, call the domain, and shape the answer.

mod admin;
pub mod error;
pub mod extract;
mod ops;
mod quota;
mod ratelimit;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;

use self::error::ApiError;
use crate::domain::{QuotaService, limiter::RateLimiter, ratelimit::Policy, schedule::Schedule, sync::SyncJob};
use crate::telemetry::Cached;

/// Everything a request handler may need, shared by all requests.
pub struct App {
    /// Quota decisions, lookups and the admin operations on quotas.
    pub quotas: Arc<QuotaService>,
    /// Rate-limit checks and anomaly records.
    pub limiter: Arc<RateLimiter>,
    /// The batch sync (one run at a time).
    pub sync: Arc<SyncJob>,
    /// Plans by name.
    pub plans: BTreeMap<String, Policy>,
    /// Caller keys; `None` means the caller endpoints are open.
    pub api_keys: Option<Vec<String>>,
    /// Admin token; `None` disables the admin endpoints.
    pub admin_token: Option<String>,
    /// The sync's schedule, for `nextRunAt`.
    pub schedule: Schedule,
    /// Readiness as the health task last saw it.
    pub health: Arc<Health>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
}

/// Whether each dependency answered the health task's last probe.
#[derive(Debug)]
pub struct Health {
    pub redis: AtomicBool,
    pub firestore: AtomicBool,
}

/// Not ready until the first probe has answered.
impl Default for Health {
    fn default() -> Self {
        Self {
            redis: AtomicBool::new(false),
            firestore: AtomicBool::new(false),
        }
    }
}

impl Health {
    pub fn set(&self, redis: bool, firestore: bool) {
        self.redis.store(redis, Ordering::Relaxed);
        self.firestore.store(firestore, Ordering::Relaxed);
    }
}

pub type AppState = Arc<App>;

/// The whole HTTP surface.
pub fn router(app: AppState) -> Router {
    let caller = Router::new()
        .route("/quota/{provider}", get(quota::lookup))
        .route("/quota/{provider}/consume", post(quota::consume))
        .route("/quota/{provider}/refund", post(quota::refund))
        .route("/ratelimit/check", post(ratelimit::check))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_caller));
    let admin = Router::new()
        .route("/admin/quota/{provider}/invalidate", post(admin::invalidate))
        .route("/admin/quota/{provider}", put(admin::set_quota))
        .route("/admin/phase", get(admin::phase).put(admin::set_phase))
        .route("/admin/sync", get(admin::sync_status).post(admin::sync_now))
        .route("/admin/anomalies", get(admin::anomalies))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_admin));
    let ops = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.yaml", get(ops::openapi));
    caller
        .merge(admin)
        .merge(ops)
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY))
        .layer(middleware::from_fn(record_request))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("a handler panicked".into()).into_response()
        }))
        .with_state(app)
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// Constant-time comparison (the length of a configured secret is not hidden).
fn secret_matches(given: &[u8], expected: &str) -> bool {
    given.ct_eq(expected.as_bytes()).into()
}

async fn require_caller(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(keys) = &app.api_keys {
        // Every key is compared (no early exit), each in constant time.
        let known = bearer(request.headers())
            .is_some_and(|token| keys.iter().fold(false, |found, key| found | secret_matches(token, key)));
        if !known {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

async fn require_admin(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &app.admin_token else {
        return ApiError::AdminDisabled.into_response();
    };
    if !bearer(request.headers()).is_some_and(|token| secret_matches(token, expected)) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// The route patterns, so metric labels are static strings (no allocation per request).
const ROUTES: [&str; 13] = [
    "/quota/{provider}",
    "/quota/{provider}/consume",
    "/quota/{provider}/refund",
    "/ratelimit/check",
    "/admin/quota/{provider}/invalidate",
    "/admin/quota/{provider}",
    "/admin/phase",
    "/admin/sync",
    "/admin/anomalies",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.yaml",
];

/// The route's index in [`ROUTES`], or `ROUTES.len()` for "unmatched".
fn route_index(request: &Request) -> usize {
    let matched = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
    matched
        .and_then(|m| ROUTES.iter().position(|r| *r == m))
        .unwrap_or(ROUTES.len())
}

fn route_label(index: usize) -> &'static str {
    ROUTES.get(index).copied().unwrap_or("unmatched")
}

const METHODS: [&str; 8] = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "other"];

fn method_index(method: &axum::http::Method) -> usize {
    use axum::http::Method;
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

const STATUSES: [&str; 14] = [
    "200", "400", "401", "403", "404", "405", "409", "413", "415", "422", "429", "500", "503", "other",
];

fn status_index(status: u16) -> usize {
    match status {
        200 => 0,
        400 => 1,
        401 => 2,
        403 => 3,
        404 => 4,
        405 => 5,
        409 => 6,
        413 => 7,
        415 => 8,
        422 => 9,
        429 => 10,
        500 => 11,
        503 => 12,
        _ => 13,
    }
}

const ROUTE_LABELS: usize = ROUTES.len() + 1;
static REQUESTS: Cached<metrics::Counter, { ROUTE_LABELS * METHODS.len() * STATUSES.len() }> = Cached::new();
static DURATIONS: Cached<metrics::Histogram, ROUTE_LABELS> = Cached::new();

/// Counts requests by route, method and status and times them.
async fn record_request(request: Request, next: Next) -> Response {
    let (route, method) = (route_index(&request), method_index(request.method()));
    let started = Instant::now();
    let response = next.run(request).await;
    let status = status_index(response.status().as_u16());
    let index = (route * METHODS.len() + method) * STATUSES.len() + status;
    REQUESTS
        .get(index, || {
            metrics::counter!("quotad_http_requests_total", "route" => route_label(route),
                "method" => METHODS[method], "status" => STATUSES[status])
        })
        .increment(1);
    DURATIONS
        .get(
            route,
            || metrics::histogram!("quotad_http_request_duration_seconds", "route" => route_label(route)),
        )
        .record(started.elapsed().as_secs_f64());
    response
}
