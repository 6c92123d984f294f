//! Errors as the API answers them: a status and `{"error": {"status": 422, "message": "..."}}`,
//! and the body and query extractors that turn bad input into such an error.
//!
//! Input is checked here, at the edge, once for every endpoint: what cannot succeed is refused
//! with a 4xx before a handler runs, never stored or published to fail downstream.
//! - A body must be `Content-Type: application/json` (415), at most [`MAX_BODY_BYTES`] (413),
//!   well-formed JSON (400) and a JSON object (422); no string in it (nor any key) may hold
//!   the NUL character or be longer than [`MAX_STRING_CHARS`] (422 naming the field). A field
//!   of the wrong type or shape is a 422 naming the field.
//! - A query parameter may not hold NUL or be longer than [`MAX_QUERY_CHARS`] (400 naming it).
//! - Each text field is a [`Text`] with its own documented limit (`maxLength` in the OpenAPI
//!   document), and skills are [`Skills`].

use std::borrow::Cow;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use firstline_shared::domain::SkillSet;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, repeated.
    pub status: u16,
    /// What is wrong, for a person.
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("request failed: {e:#}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; it is logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        // What the database refuses is the request's fault; the constraint says why.
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::CHECK_VIOLATION || *code == SqlState::FOREIGN_KEY_VIOLATION {
                return Self::invalid(db.message().to_string());
            }
            if *code == SqlState::UNIQUE_VIOLATION {
                return Self::conflict(db.message().to_string());
            }
        }
        Self::internal(anyhow::Error::from(e))
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::error!("no database connection: {e}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unavailable; try again",
        )
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(e)
    }
}

/// The largest request body, in bytes (413 beyond it). Every field's limit fits in it, and so
/// nothing the API publishes can come near NATS's `max_payload` (1 MB by default).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The longest string anywhere in a body, nested objects included (business hours, survey);
/// most fields have a smaller limit of their own.
pub const MAX_STRING_CHARS: usize = 5000;
/// The longest query parameter value.
pub const MAX_QUERY_CHARS: usize = 200;

const NUL: &str = "may not contain the NUL character (\\u0000)";

/// What is wrong with `text` as a string of at most `max` characters, if anything.
fn text_problem(text: &str, max: usize) -> Option<String> {
    if text.contains('\0') {
        return Some(NUL.to_string());
    }
    let n = text.chars().count();
    (n > max).then(|| format!("at most {max} characters, not {n}"))
}

/// Text of at most `MAX` characters without the NUL character: a request field. A longer one
/// (or one with NUL) fails to deserialize, so the body or query is refused naming the field;
/// the OpenAPI document gives the limit as `maxLength`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Text<const MAX: usize>(pub String);

/// As the string (a message's `{:?}` quotes the text, not the type).
impl<const MAX: usize> std::fmt::Debug for Text<MAX> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl<const MAX: usize> Text<MAX> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<const MAX: usize> std::ops::Deref for Text<MAX> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> From<Text<MAX>> for String {
    fn from(t: Text<MAX>) -> String {
        t.0
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Text<MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text_problem(&text, MAX) {
            Some(problem) => Err(D::Error::custom(problem)),
            None => Ok(Self(text)),
        }
    }
}

impl<const MAX: usize> utoipa::PartialSchema for Text<MAX> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX))
            .description(Some(format!(
                "Text of at most {MAX} characters, without the NUL character"
            )))
            .into()
    }
}

impl<const MAX: usize> ToSchema for Text<MAX> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("Text{MAX}"))
    }
}

/// Skills in a request (SPEC D4): at most [`Skills::MAX`] of at most 64 characters each;
/// trimmed and lower-cased like stored ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skills(pub SkillSet);

impl Skills {
    pub const MAX: usize = 50;
}

impl<'de> Deserialize<'de> for Skills {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let skills = Vec::<Text<64>>::deserialize(deserializer)?;
        if skills.len() > Self::MAX {
            return Err(D::Error::custom(format!(
                "at most {} skills, not {}",
                Self::MAX,
                skills.len()
            )));
        }
        Ok(Self(SkillSet::new(skills.iter().map(|s| s.as_str()))))
    }
}

impl utoipa::PartialSchema for Skills {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(<Text<64> as utoipa::PartialSchema>::schema())
            .max_items(Some(Self::MAX))
            .description(Some(
                "Skills (SPEC D4): trimmed, compared case-insensitively, stored lower-case",
            ))
            .into()
    }
}

impl ToSchema for Skills {}

/// A JSON request body; see the module's rules.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        require_json(&req)?;
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(Self)
    }
}

/// An optional JSON body: none (or only white space) is `T::default()`; any other body is held
/// to the same rules as a [`Body`].
#[derive(Debug)]
pub struct OptionalBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = require_json(&req);
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        json?;
        parse_json(&bytes).map(Self)
    }
}

fn require_json(req: &Request) -> ApiResult<()> {
    let json = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        });
    if json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, sent with Content-Type: application/json",
        ))
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> ApiResult<bytes::Bytes> {
    bytes::Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(r.status(), r.body_text())
        }
    })
}

/// `bytes` as a `T`, by the module's rules: 400 for malformed JSON, 422 naming the field for
/// the rest.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(format!(
            "the body must be a JSON object, not {}",
            json_kind(&value)
        )));
    }
    check_strings(&value, &mut String::new())?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(format!("invalid body: {inner}"))
        } else {
            ApiError::invalid(format!("{path}: {inner}"))
        }
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses NUL in any string or key of `value` and strings longer than [`MAX_STRING_CHARS`],
/// naming where (`business_hours.closed_message`, `handover_keywords[2]`).
fn check_strings(value: &Value, path: &mut String) -> ApiResult<()> {
    let here = |path: &str, problem: String| {
        let at = if path.is_empty() { "body" } else { path };
        Err(ApiError::invalid(format!("{at}: {problem}")))
    };
    match value {
        Value::String(s) => {
            if let Some(problem) = text_problem(s, MAX_STRING_CHARS) {
                return here(path, problem);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_strings(item, path)?;
                path.truncate(len);
            }
        }
        Value::Object(fields) => {
            for (key, item) in fields {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                if key.contains('\0') {
                    return here(path, format!("a field name {NUL}"));
                }
                path.push_str(key);
                check_strings(item, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Query parameters; a bad one (NUL, too long, wrong type) is a 400 naming it.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|r| ApiError::bad_request(r.body_text()))?;
        for (name, value) in &pairs.0 {
            if let Some(problem) =
                text_problem(name, MAX_QUERY_CHARS).or_else(|| text_problem(value, MAX_QUERY_CHARS))
            {
                return Err(ApiError::bad_request(format!(
                    "query parameter {name:?}: {problem}"
                )));
            }
        }
        match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// A path of one parameter, kept as text: each handler parses it and answers 404 when it names
/// nothing.
#[derive(Debug)]
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

impl PathId {
    /// The id as a UUID; anything else names no `what`.
    pub fn uuid(&self, what: &str) -> ApiResult<uuid::Uuid> {
        self.0
            .parse()
            .map_err(|_| ApiError::not_found(format!("no {what} {:?}", self.0)))
    }
}

/// The answer to a path that names no endpoint.
pub async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no endpoint {}", uri.path()))
}

/// The answer to a method an endpoint does not have (the `Allow` header lists those it has).
pub async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} has no {method}: see the Allow header", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Input {
        #[serde(default)]
        name: Text<5>,
        #[serde(default)]
        nested: Option<Value>,
        #[serde(default)]
        skills: Skills,
    }

    fn refusal(body: &str) -> (u16, String) {
        let e = parse_json::<Input>(body.as_bytes()).unwrap_err();
        (e.status.as_u16(), e.message)
    }

    #[test]
    fn bodies_are_refused_naming_the_field_and_the_limit() {
        let ok =
            parse_json::<Input>(br#"{"name": "ab", "skills": [" EN "], "nested": 1}"#).unwrap();
        assert_eq!(ok.name.as_str(), "ab");
        assert_eq!(ok.skills.0.to_vec(), ["en"]);
        assert_eq!(ok.nested, Some(Value::from(1)));
        assert_eq!(refusal(r#"{"name": "#).0, 400);
        assert_eq!(
            refusal("[]"),
            (422, "the body must be a JSON object, not an array".into())
        );
        assert_eq!(
            refusal(r#"{"name": "abcdef"}"#),
            (422, "name: at most 5 characters, not 6".into())
        );
        let (status, message) = refusal(r#"{"nested": {"a": ["x", "\u0000"]}}"#);
        assert_eq!(status, 422);
        assert!(
            message.starts_with("nested.a[1]: may not contain the NUL"),
            "{message}"
        );
        let (_, message) = refusal(r#"{"name": 5}"#);
        assert!(message.starts_with("name: invalid type"), "{message}");
        let many: Vec<String> = (0..51).map(|i| format!("s{i}")).collect();
        let (_, message) = refusal(&serde_json::json!({ "skills": many }).to_string());
        assert_eq!(message, "skills: at most 50 skills, not 51");
        let long = "x".repeat(MAX_STRING_CHARS + 1);
        let (_, message) = refusal(&serde_json::json!({ "nested": long }).to_string());
        assert_eq!(message, "nested: at most 5000 characters, not 5001");
    }
}
