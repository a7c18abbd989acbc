//! `GET /quota/{provider}`, `POST /quota/{provider}/consume` and `.../refund`.

use axum::{Json, extract::State, response::IntoResponse};

use super::{
    AppState, Caller,
    error::ApiError,
    extract::{ChangeRequest, Checked, Idempotency, ProviderPath},
};
use crate::{
    domain::{Outcome, ProviderId, Source},
    storage::{Decision, Op},
};

pub async fn lookup(
    _: Caller,
    State(app): State<AppState>,
    ProviderPath(provider): ProviderPath,
) -> Result<axum::response::Response, ApiError> {
    let view = app.quotas.get(&provider).await?;
    let source = match view.source {
        Source::Cache => "cache",
        Source::Store => "store",
    };
    Ok(Json(QuotaBody {
        provider: provider.as_str(),
        used: view.used,
        limit: view.limit,
        remaining: (view.limit - view.used).max(0),
        has_quota: view.used < view.limit,
        source,
    })
    .into_response())
}

/// The answer of a lookup (typed: the hot path serialises it without building a map).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaBody<'a> {
    pub provider: &'a str,
    pub used: i64,
    pub limit: i64,
    pub remaining: i64,
    pub has_quota: bool,
    pub source: &'static str,
}

/// The answer of an admitted consume or refund.
#[derive(serde::Serialize)]
struct ChangeBody<'a> {
    provider: &'a str,
    allowed: bool,
    used: i64,
    limit: i64,
    remaining: i64,
}

/// What a consume or refund is checked for before its body (see [`Checked`]).
type ChangeChecked = Checked<(Caller, ProviderPath, Idempotency), ChangeRequest>;

pub async fn consume(
    state: State<AppState>,
    Checked((_, provider, key), body): ChangeChecked,
) -> Result<impl IntoResponse, ApiError> {
    change(state, provider, key, body, Op::Consume).await
}

pub async fn refund(
    state: State<AppState>,
    Checked((_, provider, key), body): ChangeChecked,
) -> Result<impl IntoResponse, ApiError> {
    change(state, provider, key, body, Op::Refund).await
}

async fn change(
    State(app): State<AppState>,
    ProviderPath(provider): ProviderPath,
    Idempotency(key): Idempotency,
    ChangeRequest(amount): ChangeRequest,
    op: Op,
) -> Result<impl IntoResponse, ApiError> {
    let outcome = app
        .quotas
        .change(&provider, op, amount.get(), key.as_ref().map(|k| k.as_str()))
        .await?;
    let (Outcome::Decided(decision) | Outcome::Replayed(decision)) = outcome;
    answer(&provider, decision)
}

fn answer(provider: &ProviderId, d: Decision) -> Result<axum::response::Response, ApiError> {
    if !d.allowed {
        return Err(ApiError::QuotaExceeded {
            used: d.used,
            limit: d.limit,
        });
    }
    let body = ChangeBody {
        provider: provider.as_str(),
        allowed: true,
        used: d.used,
        limit: d.limit,
        remaining: (d.limit - d.used).max(0),
    };
    Ok(Json(body).into_response())
}
