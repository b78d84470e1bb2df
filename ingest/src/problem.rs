//! RFC 9457 problem documents: every error a client sees. They say what the
//! client did wrong (the attribute, the JSON pointer), never internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `https://sluice.dev/problems/malformed`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    /// What was wrong, for a person.
    pub detail: String,
    /// What was wrong, for a program: the CloudEvent attribute, the header,
    /// the JSON pointer inside `data`, or each failing event of a batch.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<FieldError>)]
    pub errors: Vec<Value>,
    /// Sent as the `Retry-After` header (429, 503).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// One entry of a problem's `errors`: the members present name what was wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// Position of the event in a batch.
    pub index: Option<usize>,
    /// The CloudEvent attribute (`id`, `source`, `time`, an extension, ...).
    pub attribute: Option<String>,
    /// The HTTP header (`ce-id`, `content-type`, `authorization`).
    pub header: Option<String>,
    /// JSON pointer inside `data` (RFC 6901) that fails the command's schema.
    pub pointer: Option<String>,
    /// Where a body is not valid JSON.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// What is wrong there.
    pub problem: Option<String>,
    /// For a refused event of a batch: its own status, detail and errors.
    pub status: Option<u16>,
    pub detail: Option<String>,
    #[schema(no_recursion)]
    pub errors: Option<Vec<FieldError>>,
    /// For a batch that was partly queued before a 503: the operation of an
    /// event that is queued.
    pub operation_id: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://sluice.dev/problems/{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    pub fn with_errors(mut self, errors: Vec<Value>) -> Self {
        self.errors = errors;
        self
    }

    /// Names the CloudEvent attribute that is wrong.
    pub fn at_attribute(self, attribute: &str) -> Self {
        let entry = json!({"attribute": attribute, "problem": self.detail});
        self.with_errors(vec![entry])
    }

    /// Names the HTTP header that is wrong.
    pub fn at_header(self, header: &str) -> Self {
        let entry = json!({"header": header, "problem": self.detail});
        self.with_errors(vec![entry])
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", "Malformed request", detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Missing or unknown API key", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Request too large", detail)
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type", detail)
    }

    pub fn invalid_data(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-data", "Data fails its schema", detail)
    }

    pub fn rate_limited(detail: impl Into<String>, seconds: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests", detail).retry_after(seconds)
    }

    /// 503, and nothing was queued.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail).retry_after(1)
    }

    /// 503, and the command may or may not be queued: the broker took it but
    /// never confirmed. Retrying the same CloudEvent is safe.
    pub fn unconfirmed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unconfirmed", "Command not confirmed", detail).retry_after(1)
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
