//! `POST /ratelimit/check`.

use axum::{
    Json,
    extract::State,
    http::{HeaderName, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use super::{
    AppState, Caller,
    error::ApiError,
    extract::{Checked, Fields, JsonBytes},
};
use crate::domain::{
    InvalidInput, ProviderId,
    ratelimit::{Algorithm, Policy, RateDecision, Window},
};

const MAX_LIMIT: u64 = 1_000_000;

const KNOWN: &[&str] = &["key", "plan", "limit", "window", "algorithm", "cost"];

/// One field of a check body, as far as the checks below tell values apart.
#[derive(Clone, Copy)]
enum Raw<'a> {
    Null,
    Str(&'a str),
    U64(u64),
    /// Any other value: a negative or fractional number, a boolean, an array, an object.
    Other,
}

impl<'a> Raw<'a> {
    fn of(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::String(s) => Self::Str(s),
            Value::Number(n) => n.as_u64().map_or(Self::Other, Self::U64),
            _ => Self::Other,
        }
    }

    fn str(self) -> Option<&'a str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    fn u64(self) -> Option<u64> {
        match self {
            Self::U64(n) => Some(n),
            _ => None,
        }
    }
}

/// Reads a value the usual body holds (a string without escapes, an integer, null, another
/// scalar); a string with escapes, an array or an object make the whole body take the
/// general path.
impl<'de> serde::Deserialize<'de> for Raw<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Raw<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Raw<'de>, E> {
                Ok(Raw::Str(s))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Raw<'de>, E> {
                Ok(Raw::U64(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Raw<'de>, E> {
                Ok(u64::try_from(n).map_or(Raw::Other, Raw::U64))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Raw<'de>, E> {
                Ok(Raw::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Raw<'de>, E> {
                Ok(Raw::Other)
            }
            fn visit_unit<E>(self) -> Result<Raw<'de>, E> {
                Ok(Raw::Null)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A field that is present (`None`: absent; a null is `Some(Raw::Null)`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Raw<'de>>, D::Error> {
    serde::Deserialize::deserialize(deserializer).map(Some)
}

/// The fields of a check body. The usual body is read straight into it; anything the
/// derived reader refuses (an unknown or duplicate field, a string with escapes) is read
/// through [`Fields`] instead, so both paths answer alike.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckInput<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    key: Option<Raw<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    plan: Option<Raw<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    limit: Option<Raw<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    window: Option<Raw<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    algorithm: Option<Raw<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    cost: Option<Raw<'a>>,
}

impl<'a> CheckInput<'a> {
    fn from_fields(fields: &'a Fields) -> Self {
        let raw = |name| fields.raw(name).map(Raw::of);
        Self {
            key: raw("key"),
            plan: raw("plan"),
            limit: raw("limit"),
            window: raw("window"),
            algorithm: raw("algorithm"),
            cost: raw("cost"),
        }
    }
}

pub async fn check(
    State(app): State<AppState>,
    Checked(_, JsonBytes(body)): Checked<Caller, JsonBytes>,
) -> Result<Response, ApiError> {
    let general: Fields;
    let input = match body.as_deref() {
        None => CheckInput::default(),
        // (an object only: a derived struct would also read an array)
        Some(bytes)
            if let Some(input) = bytes
                .trim_ascii_start()
                .starts_with(b"{")
                .then(|| serde_json::from_slice::<CheckInput>(bytes).ok())
                .flatten() =>
        {
            input
        }
        Some(bytes) => {
            general = Fields::from_bytes(bytes, KNOWN)?;
            CheckInput::from_fields(&general)
        }
    };
    let key = input
        .key
        .and_then(Raw::str)
        .ok_or_else(|| ApiError::invalid("id", "key must be a string id"))?;
    let key = ProviderId::parse(key)?;
    let policy = if input.plan.is_some() {
        if input.limit.is_some() || input.window.is_some() || input.algorithm.is_some() {
            return Err(ApiError::BadRequest {
                code: "invalid_json",
                detail: "a body with plan must not carry limit, window or algorithm".into(),
            });
        }
        let name = input
            .plan
            .and_then(Raw::str)
            .ok_or_else(|| ApiError::invalid("plan", "plan must be a string"))?;
        app.plans.get(name).cloned().ok_or_else(|| ApiError::BadRequest {
            code: "unknown_plan",
            detail: format!("no plan named {name:?}"),
        })?
    } else {
        let limit = input
            .limit
            .and_then(Raw::u64)
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", "limit must be an integer 1..=1000000"))?;
        let window = match input.window {
            Some(Raw::Str(text)) => Window::parse(text)?,
            Some(Raw::U64(secs)) => Window::from_secs(secs)?,
            _ => return Err(InvalidInput("window").into()),
        };
        let algorithm = match input.algorithm {
            None => Algorithm::SlidingWindow,
            Some(Raw::Null) => return Err(ApiError::invalid("algorithm", "unknown algorithm")),
            Some(raw) => Algorithm::parse(raw.str().unwrap_or(""))?,
        };
        Policy {
            name: "custom".into(),
            limit,
            window,
            algorithm,
            plan: None,
        }
    };
    let cost = match input.cost {
        None => 1,
        Some(raw) => raw
            .u64()
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

const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// A structured field: `"<policy name>";<a>=<n>;<b>=<m>` (checked: plan names come from
/// the configuration). Built by hand: two `format!` calls were a tenth of this handler.
fn field(name: &str, (a, n): (&str, u64), (b, m): (&str, u64)) -> Option<HeaderValue> {
    let mut numbers = (itoa::Buffer::new(), itoa::Buffer::new());
    let (n, m) = (numbers.0.format(n), numbers.1.format(m));
    let mut text = String::with_capacity(name.len() + a.len() + b.len() + n.len() + m.len() + 6);
    for part in ["\"", name, "\";", a, "=", n, ";", b, "=", m] {
        text.push_str(part);
    }
    HeaderValue::try_from(text).ok()
}

fn respond(policy: &Policy, d: &RateDecision, cost: u64) -> Response {
    let reset_secs = d.reset_ms.div_ceil(1000);
    let to_reset = d.reset_ms.saturating_sub(d.now_ms).div_ceil(1000);
    let retry_after = d.retry_after_ms.div_ceil(1000);
    let structured = [
        (
            POLICY,
            field(&policy.name, ("q", policy.limit), ("w", policy.window.secs())),
        ),
        (RATELIMIT, field(&policy.name, ("r", d.remaining), ("t", to_reset))),
    ];
    let numbers = [(X_LIMIT, d.limit), (X_REMAINING, d.remaining), (X_RESET, reset_secs)];
    let headers = structured
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .chain(numbers.map(|(name, n)| (name, HeaderValue::from(n))));
    if d.allowed || cost == 0 {
        let body = CheckBody {
            allowed: d.allowed,
            limit: d.limit,
            remaining: d.remaining,
            reset: reset_secs,
            retry_after: if d.allowed { 0 } else { retry_after },
        };
        let mut response = Json(body).into_response();
        response.headers_mut().extend(headers);
        return response;
    }
    let headers = headers
        .chain([(header::RETRY_AFTER, HeaderValue::from(retry_after))])
        .collect();
    let mut members = Map::new();
    members.insert("limit".into(), json!(d.limit));
    members.insert("remaining".into(), json!(d.remaining));
    members.insert("reset".into(), json!(reset_secs));
    members.insert("retryAfter".into(), json!(retry_after));
    members.insert("violated-policies".into(), json!([policy.name]));
    ApiError::RateLimited { members, headers }.into_response()
}
