//! `POST /ratelimit/check`.

use axum::{
    Json,
    extract::State,
    http::{HeaderName, HeaderValue},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{
    AppState, Caller,
    error::ApiError,
    extract::{Fields, JsonObject},
};
use crate::domain::{
    ProviderId,
    ratelimit::{Algorithm, Policy, RateDecision, Window},
};

const MAX_LIMIT: u64 = 1_000_000;

pub async fn check(_: Caller, State(app): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let fields = Fields::new(body, &["key", "plan", "limit", "window", "algorithm", "cost"])?;
    let key = fields
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("id", "key must be a string id"))?;
    let key = ProviderId::parse(key)?;
    let policy = if fields.has("plan") {
        if ["limit", "window", "algorithm"].iter().any(|f| fields.has(f)) {
            return Err(ApiError::BadRequest {
                code: "invalid_json",
                detail: "a body with plan must not carry limit, window or algorithm".into(),
            });
        }
        let name = fields
            .get("plan")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid("plan", "plan must be a string"))?;
        app.plans.get(name).cloned().ok_or_else(|| ApiError::BadRequest {
            code: "unknown_plan",
            detail: format!("no plan named {name:?}"),
        })?
    } else {
        let limit = fields
            .get("limit")
            .and_then(Value::as_u64)
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", "limit must be an integer 1..=1000000"))?;
        let window = Window::from_json(fields.get("window").unwrap_or(&Value::Null))?;
        let algorithm = match fields.get("algorithm") {
            None if !fields.has("algorithm") => Algorithm::SlidingWindow,
            None => return Err(ApiError::invalid("algorithm", "unknown algorithm")),
            Some(raw) => Algorithm::parse(raw.as_str().unwrap_or(""))?,
        };
        Policy {
            name: "custom".into(),
            limit,
            window,
            algorithm,
            plan: None,
        }
    };
    let cost = match fields.get("cost") {
        None if !fields.has("cost") => 1,
        None => {
            return Err(ApiError::invalid("cost", "cost must be an integer 0..=limit"));
        }
        Some(raw) => raw
            .as_u64()
            .filter(|c| *c <= policy.limit)
            .ok_or_else(|| ApiError::invalid("cost", "cost must be an integer 0..=limit"))?,
    };
    let decision = app.limiter.check(key.as_str(), &policy, cost).await;
    let (allowed, phase) = (decision.allowed, app.quotas.phase().0);
    DECISIONS
        .get(usize::from(allowed) * 3 + phase as usize, || {
            metrics::counter!("quotad_decisions_total", "kind" => "ratelimit", "op" => "check",
                "outcome" => if allowed { "allowed" } else { "denied" }, "phase" => phase.as_str())
        })
        .increment(1);
    Ok(respond(&policy, &decision, cost))
}

/// The answer of an admitted check or a read (typed: serialised without building a map).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CheckBody {
    allowed: bool,
    limit: u64,
    remaining: u64,
    reset: u64,
    retry_after: u64,
}

/// Rate-limit decisions by outcome and phase.
static DECISIONS: crate::telemetry::Cached<metrics::Counter, 6> = crate::telemetry::Cached::new();

fn respond(policy: &Policy, d: &RateDecision, cost: u64) -> Response {
    let reset_secs = d.reset_ms.div_ceil(1000);
    let to_reset = d.reset_ms.saturating_sub(d.now_ms).div_ceil(1000);
    let retry_after = d.retry_after_ms.div_ceil(1000);
    let mut headers = vec![
        (
            "ratelimit-policy",
            format!("\"{}\";q={};w={}", policy.name, policy.limit, policy.window.secs()),
        ),
        (
            "ratelimit",
            format!("\"{}\";r={};t={}", policy.name, d.remaining, to_reset),
        ),
        ("x-ratelimit-limit", d.limit.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        ("x-ratelimit-reset", reset_secs.to_string()),
    ];
    if d.allowed || cost == 0 {
        let body = CheckBody {
            allowed: d.allowed,
            limit: d.limit,
            remaining: d.remaining,
            reset: reset_secs,
            retry_after: if d.allowed { 0 } else { retry_after },
        };
        let mut response = Json(body).into_response();
        for (name, value) in headers {
            if let Ok(value) = HeaderValue::try_from(value) {
                response.headers_mut().insert(HeaderName::from_static(name), value);
            }
        }
        return response;
    }
    headers.push(("retry-after", retry_after.to_string()));
    let mut members = Map::new();
    members.insert("limit".into(), json!(d.limit));
    members.insert("remaining".into(), json!(d.remaining));
    members.insert("reset".into(), json!(reset_secs));
    members.insert("retryAfter".into(), json!(retry_after));
    members.insert("violated-policies".into(), json!([policy.name]));
    ApiError::RateLimited { members, headers }.into_response()
}
