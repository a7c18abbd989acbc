//! Request metrics: a count by route, method and status, and a latency histogram by
//! route. A plain tower layer (no boxed future, no cloned inner service per request), with
//! the metric handles cached per label set.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    response::Response,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::telemetry::Cached;

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

/// Counts and times every request of the service it wraps.
#[derive(Clone, Copy)]
pub struct RecordLayer;

impl<S> Layer<S> for RecordLayer {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recorded { inner }
    }
}

#[derive(Clone)]
pub struct Recorded<S> {
    inner: S,
}

impl<S> Service<Request> for Recorded<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Recording<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (route, method) = (route_index(&request), method_index(request.method()));
        Recording {
            inner: self.inner.call(request),
            route,
            method,
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// A request's response future, recorded when it is ready.
    pub struct Recording<F> {
        #[pin]
        inner: F,
        route: usize,
        method: usize,
        started: Instant,
    }
}

impl<F, E> Future for Recording<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            record(*this.route, *this.method, response.status().as_u16(), *this.started);
        }
        Poll::Ready(result)
    }
}

fn record(route: usize, method: usize, status: u16, started: Instant) {
    let status = status_index(status);
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
}
