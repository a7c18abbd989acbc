//! Extractors whose rejections are our own [`ApiError`]s.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::{header, request::Parts},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::domain::{Amount, IdempotencyKey, ProviderId};

/// Bodies over this many bytes are refused with `413`.
pub const MAX_BODY: usize = 64 * 1024;

/// A JSON object body (an empty body is `{}`: every POST field has a default). Checks the
/// media type, the size and the shape; handlers read the fields with [`Fields`].
pub struct JsonObject(pub Map<String, Value>);

fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match json_bytes(req, state).await? {
            None => Ok(JsonObject(Map::new())),
            Some(bytes) => parse_object(&bytes).map(JsonObject),
        }
    }
}

/// The bytes of a JSON request body, its size and media type checked (`None`: empty), for
/// handlers that read the usual body into a struct and fall back to [`Fields::from_bytes`].
pub struct JsonBytes(pub Option<Bytes>);

impl<S: Send + Sync> FromRequest<S> for JsonBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_bytes(req, state).await.map(JsonBytes)
    }
}

/// The body of a JSON request, its size and media type checked; `None` when it is empty.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Option<Bytes>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_json(v.to_str().unwrap_or("")));
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else if caused_by::<super::serve::BodyDeadlineElapsed>(&rejection) {
            ApiError::RequestTimeout
        } else {
            ApiError::InvalidJson("the body could not be read".into())
        }
    })?;
    if bytes.len() > MAX_BODY {
        return Err(ApiError::PayloadTooLarge);
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    Ok(Some(bytes))
}

/// Whether `err` or an error in its chain of sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<E>() {
            return true;
        }
        next = err.source();
    }
    false
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::InvalidJson("the body must be a JSON object".into())),
        Err(err) => Err(ApiError::InvalidJson(format!("the body is not valid JSON: {err}"))),
    }
}

/// The body of a consume or refund: `{}` (or none) is an amount of 1, else `{"amount": n}`.
pub struct ChangeRequest(pub Amount);

impl<S: Send + Sync> FromRequest<S> for ChangeRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        /// The usual body, read without building a map. Anything else (another field, a
        /// null, a float, a duplicate) takes the general path, which answers it as before.
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Usual {
            amount: i64,
        }
        let Some(bytes) = json_bytes(req, state).await? else {
            return Ok(ChangeRequest(Amount::new(1)?));
        };
        // (an object only: a derived struct would also read the array `[1]`)
        if bytes.trim_ascii_start().starts_with(b"{")
            && let Ok(Usual { amount }) = serde_json::from_slice::<Usual>(&bytes)
        {
            return Ok(ChangeRequest(Amount::new(amount)?));
        }
        let fields = Fields::new(JsonObject(parse_object(&bytes)?), &["amount"])?;
        let amount = match fields.get("amount") {
            None if !fields.has("amount") => Amount::new(1)?,
            None => {
                return Err(ApiError::invalid("amount", "amount must be an integer 1..=1000000"));
            }
            Some(value) => Amount::from_json(value)?,
        };
        Ok(ChangeRequest(amount))
    }
}

/// The body of a POST without fields: none, or `{}` (its media type and size checked like
/// any body; any member is an unknown field).
pub struct NoFields;

impl<S: Send + Sync> FromRequest<S> for NoFields {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Fields::new(JsonObject::from_request(req, state).await?, &[]).map(|_| NoFields)
    }
}

/// Reads the fields of a [`JsonObject`], refusing any field the endpoint does not know.
pub struct Fields(Map<String, Value>);

impl Fields {
    pub fn new(JsonObject(map): JsonObject, known: &[&str]) -> Result<Self, ApiError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::InvalidJson(format!("unknown field {unknown:?}")));
        }
        Ok(Self(map))
    }

    /// The general path: a JSON object body, refusing any field the endpoint does not know.
    pub fn from_bytes(bytes: &[u8], known: &[&str]) -> Result<Self, ApiError> {
        Self::new(JsonObject(parse_object(bytes)?), known)
    }

    /// A present, non-null field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A present field, null or not.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// The `{provider}` path segment, validated.
pub struct ProviderPath(pub ProviderId);

impl<S: Send + Sync> FromRequestParts<S> for ProviderPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::invalid("id", "the provider id is not valid"))?;
        if raw.is_empty() {
            return Err(ApiError::NotFound); // an empty segment matches no route
        }
        Ok(ProviderPath(ProviderId::parse(&raw)?))
    }
}

/// The optional `Idempotency-Key` header, validated.
pub struct Idempotency(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for Idempotency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get("idempotency-key") {
            None => Ok(Idempotency(None)),
            Some(value) => Ok(Idempotency(Some(IdempotencyKey::parse(value.as_bytes())?))),
        }
    }
}

/// The parts extractors `T` (the caller's key, the path, headers), then the body extractor
/// `B`. A request that `T` refuses has its body read (and dropped) before the refusal is
/// answered: refused at once, body bytes that had not arrived yet stayed unread, hyper
/// closed the connection after the answer, and a client that reused it at once lost its
/// next request ("server disconnected"; about once in 4000 refused requests on a loaded
/// machine). On the usual path this is what axum does itself.
pub struct Checked<T, B>(pub T, pub B);

impl<S, T, B> FromRequest<S> for Checked<T, B>
where
    S: Send + Sync,
    T: FromRequestParts<S> + Send,
    B: FromRequest<S, Rejection = ApiError>,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let checked = T::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response);
        match checked {
            Ok(checked) => match B::from_request(Request::from_parts(parts, body), state).await {
                Ok(body) => Ok(Checked(checked, body)),
                Err(refused) => Err(refused.into_response()),
            },
            Err(refused) => {
                discard(&parts.headers, body).await;
                Err(refused)
            }
        }
    }
}

/// Reads a refused request's body to its end, so that the connection stays usable (see
/// [`Checked`]); for at most a second, and not when it is declared over [`MAX_BODY`] or the
/// client waits for `100 Continue` (reading would invite the upload): the connection
/// closes after the refusal then, as it did before.
pub async fn discard(headers: &axum::http::HeaderMap, body: axum::body::Body) {
    use axum::body::HttpBody;
    if body.is_end_stream() || body.size_hint().lower() > MAX_BODY as u64 || headers.contains_key(header::EXPECT) {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), axum::body::to_bytes(body, MAX_BODY)).await;
}
