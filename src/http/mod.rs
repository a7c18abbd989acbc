//! HTTP: routes, extractors, authentication and problem+json errors. No business rules
//! here: handlers validate into domain types, call the domain, and shape the answer.

mod admin;
pub mod error;
pub mod extract;
mod ops;
mod quota;
mod ratelimit;
mod record;
pub mod serve;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequestParts, Request, State},
    http::{HeaderMap, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;

use self::error::ApiError;
use crate::domain::{QuotaService, limiter::RateLimiter, ratelimit::Policy, schedule::Schedule, sync::SyncJob};

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
        .route("/ratelimit/check", post(ratelimit::check)); // each handler takes a `Caller` first
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
        // (bodies are read first: see [`extract::Checked`])
        .fallback(|request: Request| async move {
            let (parts, body) = request.into_parts();
            extract::discard(&parts.headers, body).await;
            ApiError::NotFound
        })
        .method_not_allowed_fallback(|request: Request| async move {
            let (parts, body) = request.into_parts();
            extract::discard(&parts.headers, body).await;
            // the router lets `{provider}` match an empty segment, which API.md says
            // matches no route, whatever the method (the handlers' own check: ProviderPath)
            if has_empty_segment(parts.uri.path()) {
                ApiError::NotFound
            } else {
                ApiError::MethodNotAllowed
            }
        })
        .layer(record::RecordLayer) // per route: it labels by the matched route
        .with_state(app)
}

/// The whole HTTP surface as one service: [`router`] inside the layers that need no route.
pub fn service(
    app: AppState,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send + 'static>
+ Clone
+ Send
+ 'static {
    outer_layers(router(app))
}

/// Panics become a `500` that says nothing internal, and bodies are capped. These wrap the
/// router once, not each route (a layer on a `Router` boxes and clones per request).
fn outer_layers(
    router: Router,
) -> impl tower::Service<Request, Response = Response, Error = Infallible, Future = impl Send + 'static>
+ Clone
+ Send
+ 'static {
    tower::ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(axum::body::Body::new))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("a handler panicked".into()).into_response()
        }))
        .layer(DefaultBodyLimit::max(extract::MAX_BODY))
        .service(router)
}

/// Whether a path has an empty segment (`/quota//consume`, `/quota/`).
fn has_empty_segment(path: &str) -> bool {
    path.strip_prefix('/')
        .is_some_and(|rest| rest.split('/').any(str::is_empty))
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

/// An authenticated caller: the request carries one of `QUOTAD_API_KEYS` as its bearer
/// token (or no keys are configured). Every caller endpoint takes it as its first
/// extractor, so it is checked before anything else is read. An extractor, not a
/// middleware layer: the hot path pays no boxed future and no service clone for it.
pub struct Caller;

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(keys) = &app.api_keys {
            // Every key is compared (no early exit), each in constant time.
            let known = bearer(&parts.headers)
                .is_some_and(|token| keys.iter().fold(false, |found, key| found | secret_matches(token, key)));
            if !known {
                return Err(ApiError::Unauthorized);
            }
        }
        Ok(Caller)
    }
}

async fn require_admin(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let refused = match &app.admin_token {
        None => ApiError::AdminDisabled,
        Some(expected) if !bearer(request.headers()).is_some_and(|token| secret_matches(token, expected)) => {
            ApiError::Unauthorized
        }
        Some(_) => return next.run(request).await,
    };
    let (parts, body) = request.into_parts();
    extract::discard(&parts.headers, body).await; // see [`extract::Checked`]
    refused.into_response()
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, extract::Request, routing::get};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_says_nothing_internal() {
        async fn boom() -> &'static str {
            panic!("the secret detail")
        }
        let router = Router::new().route("/boom", get(boom));
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let response = super::outer_layers(router).oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("\"code\":\"internal\"") && !body.contains("secret"),
            "{body}"
        );
    }
}
