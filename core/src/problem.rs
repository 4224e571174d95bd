//! RFC 9457 problem details: the one error shape of Spillway's HTTP API.

use serde::Serialize;

/// Base of the stable `type` URIs.
pub const TYPE_BASE: &str = "https://spillway.dev/problems/";

/// A problem: `type`, `title`, `status`, `detail`, and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What went wrong this time.
    pub detail: String,
    /// JSON pointer of the offending field, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds after which to retry (429, 503), sent as `Retry-After`.
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl Problem {
    /// A problem of kind `code` (the last segment of its `type`).
    pub fn new(status: u16, code: &str, title: &str, detail: &str) -> Self {
        Self {
            kind: format!("{TYPE_BASE}{code}"),
            title: title.to_owned(),
            status,
            detail: detail.to_owned(),
            field: None,
            retry_after: None,
        }
    }

    /// The code: the last segment of the `type`.
    pub fn code(&self) -> &str {
        self.kind.strip_prefix(TYPE_BASE).unwrap_or(&self.kind)
    }

    /// Sets the field at fault.
    pub fn at(mut self, field: &str) -> Self {
        self.field = (!field.is_empty()).then(|| field.to_owned());
        self
    }

    /// 400: the body is not JSON.
    pub fn malformed(detail: &str) -> Self {
        Self::new(400, "malformed-json", "Malformed JSON", detail)
    }

    /// 413: the body is over the limit (`size` when known).
    pub fn too_large(size: Option<usize>, limit: usize) -> Self {
        let detail = match size {
            Some(size) => format!("the body is {size} bytes; the limit is {limit}"),
            None => format!("the body is over the limit of {limit} bytes"),
        };
        Self::new(413, "body-too-large", "Request body too large", &detail)
    }

    /// 422: valid JSON that breaks a rule.
    pub fn invalid(detail: &str, field: &str) -> Self {
        Self::new(422, "invalid-write", "Invalid write", detail).at(field)
    }

    /// 404.
    pub fn not_found(detail: &str) -> Self {
        Self::new(404, "not-found", "Not found", detail)
    }

    /// 429 with `Retry-After`.
    pub fn queue_full(detail: &str, retry_after: u32) -> Self {
        let mut p = Self::new(429, "queue-full", "Queue full", detail);
        p.retry_after = Some(retry_after);
        p
    }

    /// 503 with `Retry-After`: a backend is unreachable.
    pub fn unavailable(detail: &str) -> Self {
        let mut p = Self::new(503, "unavailable", "Service unavailable", detail);
        p.retry_after = Some(1);
        p
    }

    /// 401/403 for admin endpoints.
    pub fn unauthorized(status: u16, detail: &str) -> Self {
        let code = if status == 401 { "unauthorized" } else { "forbidden" };
        let title = if status == 401 { "Unauthorized" } else { "Forbidden" };
        Self::new(status, code, title, detail)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}
