//! `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`: no token needed.

use std::sync::atomic::Ordering;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde_json::json;

use super::AppState;

const OPENAPI: &str = include_str!("../../openapi.yaml");

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let redis = app.health.redis.load(Ordering::Relaxed);
    let firestore = app.health.firestore.load(Ordering::Relaxed);
    let word = |up: bool| if up { "ok" } else { "down" };
    let status = if redis && firestore {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"redis": word(redis), "firestore": word(firestore)})),
    )
}

pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI)
}
