//! The one error type of the HTTP layer, rendered as RFC 9457 problem details with a
//! stable `code`. Nothing internal reaches a client: a `500` is logged in full and answered
//! with a generic detail.

use axum::{
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::domain::{InvalidInput, QuotaError};

/// Every error a client can see.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: not JSON, not an object, or an unknown field.
    #[error("{0}")]
    InvalidJson(String),
    /// 400 `invalid_<field>`: a field, header or query parameter out of range or of the wrong type.
    #[error("invalid {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    /// 400 with its own code (e.g. `unknown_plan`, `invalid_body`).
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 401: missing or unknown credentials.
    #[error("missing or unknown credentials")]
    Unauthorized,
    /// 403: the admin API is off because `QUOTAD_ADMIN_TOKEN` is unset.
    #[error("the admin API is disabled")]
    AdminDisabled,
    /// 404: no such route.
    #[error("no such resource")]
    NotFound,
    /// 405: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 with its code (`sync_running`, `sync_incomplete`).
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// 408: the body did not arrive within its deadline (see [`super::serve::Deadlines`]);
    /// the connection closes after the answer (the rest of the body may still come).
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 413: a body over 64 KiB.
    #[error("the body is larger than 64 KiB")]
    PayloadTooLarge,
    /// 415: a body not sent as `application/json`.
    #[error("bodies must be sent as application/json")]
    UnsupportedMediaType,
    /// 422: an idempotency key reused with another amount.
    #[error("this Idempotency-Key was used with another amount")]
    IdempotencyKeyReused,
    /// 429 `quota_exceeded`: not enough quota left; nothing was consumed.
    #[error("quota exceeded")]
    QuotaExceeded { used: i64, limit: i64 },
    /// 429 `rate_limited`, with its members and headers already built.
    #[error("rate limited")]
    RateLimited {
        members: Map<String, Value>,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// 503: a dependency did not answer.
    #[error("a dependency is unavailable")]
    Unavailable,
    /// 500: a bug; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Invalid {
            field,
            detail: detail.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::Invalid { .. } | ApiError::BadRequest { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::QuotaExceeded { .. } | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> String {
        match self {
            ApiError::InvalidJson(_) => "invalid_json".into(),
            ApiError::Invalid { field, .. } => format!("invalid_{field}"),
            ApiError::BadRequest { code, .. } | ApiError::Conflict { code, .. } => (*code).into(),
            ApiError::Unauthorized => "unauthorized".into(),
            ApiError::AdminDisabled => "admin_disabled".into(),
            ApiError::NotFound => "not_found".into(),
            ApiError::MethodNotAllowed => "method_not_allowed".into(),
            ApiError::RequestTimeout => "request_timeout".into(),
            ApiError::PayloadTooLarge => "payload_too_large".into(),
            ApiError::UnsupportedMediaType => "unsupported_media_type".into(),
            ApiError::IdempotencyKeyReused => "idempotency_key_reused".into(),
            ApiError::QuotaExceeded { .. } => "quota_exceeded".into(),
            ApiError::RateLimited { .. } => "rate_limited".into(),
            ApiError::Unavailable => "unavailable".into(),
            ApiError::Internal(_) => "internal".into(),
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Internal(_) => "the server could not answer this request".into(),
            ApiError::Unavailable => "a dependency did not answer; retry later".into(),
            ApiError::QuotaExceeded { used, limit } => {
                format!("{used} of {limit} used: not enough quota left for this request")
            }
            other => other.to_string(),
        }
    }
}

impl From<InvalidInput> for ApiError {
    fn from(err: InvalidInput) -> Self {
        ApiError::invalid(err.0, format!("the {} is not valid", err.0.replace('_', " ")))
    }
}

impl From<QuotaError> for ApiError {
    fn from(err: QuotaError) -> Self {
        match err {
            QuotaError::KeyReused => ApiError::IdempotencyKeyReused,
            QuotaError::Unavailable(err) => {
                tracing::warn!(error = %err, "dependency unavailable");
                ApiError::Unavailable
            }
            QuotaError::Internal(err) => ApiError::Internal(err.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(message) = &self {
            tracing::error!(%message, "internal error");
        }
        let code = self.code();
        let mut body = json!({
            "type": format!("https://quotad.dev/problems/{code}"),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": code,
        });
        let mut extra_headers = Vec::new();
        match self {
            ApiError::QuotaExceeded { used, limit } => {
                body["used"] = json!(used);
                body["limit"] = json!(limit);
                body["remaining"] = json!((limit - used).max(0));
            }
            ApiError::RateLimited { members, headers } => {
                if let Value::Object(map) = &mut body {
                    map.extend(members);
                }
                extra_headers = headers;
            }
            // RFC 9110: a 401 names the scheme that would authenticate
            ApiError::Unauthorized => {
                extra_headers.push((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"quotad\""),
                ));
            }
            ApiError::RequestTimeout => {
                extra_headers.push((header::CONNECTION, HeaderValue::from_static("close")));
            }
            _ => {}
        }
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in extra_headers {
            headers.insert(name, value);
        }
        response
    }
}
