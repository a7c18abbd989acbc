//! `/admin/*`: invalidation, setting quotas, the phase, the sync and anomalies.

use axum::{
    Json,
    extract::{Query, State},
    response::IntoResponse,
};
use serde_json::{Value, json};

use super::{
    AppState,
    error::ApiError,
    extract::{Checked, Fields, JsonObject, NoFields, ProviderPath},
};
use crate::domain::{
    Phase, QuotaValue,
    ratelimit::ANOMALIES_KEPT,
    sync::{SwitchError, SyncError},
};

pub async fn invalidate(
    State(app): State<AppState>,
    Checked(ProviderPath(provider), _): Checked<ProviderPath, NoFields>,
) -> Result<impl IntoResponse, ApiError> {
    app.quotas.invalidate(&provider).await?;
    Ok(Json(json!({"provider": provider.as_str(), "invalidated": true})))
}

pub async fn set_quota(
    State(app): State<AppState>,
    Checked(ProviderPath(provider), body): Checked<ProviderPath, JsonObject>,
) -> Result<impl IntoResponse, ApiError> {
    let fields = Fields::new(body, &["limit", "used"])?;
    let value = |name: &'static str| {
        fields
            .has(name)
            .then(|| {
                fields
                    .get(name)
                    .ok_or(crate::domain::InvalidInput(name))
                    .and_then(|v| QuotaValue::from_json(v, name))
                    .map(QuotaValue::get)
            })
            .transpose()
    };
    let (limit, used) = (value("limit")?, value("used")?);
    if limit.is_none() && used.is_none() {
        return Err(ApiError::BadRequest {
            code: "invalid_body",
            detail: "give at least one of limit and used".into(),
        });
    }
    let view = app.quotas.set_quota(&provider, used, limit).await?;
    Ok(Json(json!({
        "provider": provider.as_str(),
        "used": view.used,
        "limit": view.limit,
        "remaining": (view.limit - view.used).max(0),
        "hasQuota": view.used < view.limit,
        "source": "store",
    })))
}

fn phase_body((phase, since): (Phase, chrono::DateTime<chrono::Utc>)) -> Json<Value> {
    Json(json!({"phase": phase.as_str(), "since": since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}))
}

pub async fn phase(State(app): State<AppState>) -> impl IntoResponse {
    phase_body(app.quotas.phase())
}

pub async fn set_phase(State(app): State<AppState>, body: JsonObject) -> Result<impl IntoResponse, ApiError> {
    let fields = Fields::new(body, &["phase"])?;
    let phase = fields
        .get("phase")
        .and_then(Value::as_str)
        .and_then(Phase::parse)
        .ok_or_else(|| ApiError::invalid("phase", "phase must be firestore-only, dual-write or redis-primary"))?;
    match app.sync.switch_phase(phase).await {
        Ok(answer) => Ok(phase_body(answer)),
        Err(SwitchError::Incomplete) => Err(ApiError::Conflict {
            code: "sync_incomplete",
            detail: "usage is left unsynced; the phase is unchanged".into(),
        }),
        Err(SwitchError::Quota(err)) => Err(err.into()),
    }
}

pub async fn sync_now(State(app): State<AppState>, _: NoFields) -> Result<impl IntoResponse, ApiError> {
    match app.sync.run_once().await {
        Ok(report) => Ok(Json(report)),
        Err(SyncError::Running) => Err(ApiError::Conflict {
            code: "sync_running",
            detail: "another sync is running".into(),
        }),
        Err(SyncError::Storage(err)) => Err(crate::domain::QuotaError::from(err).into()),
    }
}

pub async fn sync_status(State(app): State<AppState>) -> impl IntoResponse {
    let next = app
        .schedule
        .next_after(chrono::Utc::now())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    Json(json!({"last": app.sync.last().await, "nextRunAt": next}))
}

pub async fn anomalies(
    State(app): State<AppState>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<impl IntoResponse, ApiError> {
    // other parameters are ignored (a cache buster, say); a limit above what the list keeps
    // reads all of it
    let mut limit = 50;
    for (name, value) in query {
        if name == "limit" {
            limit = value
                .parse::<u64>()
                .or_else(|err| match err.kind() {
                    std::num::IntErrorKind::PosOverflow => Ok(u64::MAX), // still "above the list"
                    _ => Err(err),
                })
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::invalid("query", "limit must be a positive integer"))?
                .min(ANOMALIES_KEPT as u64) as usize;
        }
    }
    let anomalies = app
        .limiter
        .anomalies(limit)
        .await
        .map_err(crate::domain::QuotaError::from)?;
    Ok(Json(json!({"anomalies": anomalies})))
}
