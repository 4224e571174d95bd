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
    /// What the backend said (its error text, credentials masked): for log
    /// lines, the dead-letter record and telling failures apart, never for the
    /// client (see [`Problem::backend`]).
    #[serde(skip)]
    pub cause: Option<Box<String>>,
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
            cause: None,
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

    /// 503 with `Retry-After`: the backend named `what` (e.g. `Redis
    /// (redis_address)`, `the database`) failed with `cause` (credentials
    /// already masked). The client gets a stable type and a message written
    /// here, never the backend's own text, which may name hosts, users or
    /// secrets: `credentials-refused` when the server refused Spillway's
    /// credentials, else `unavailable`. The cause is kept for the log.
    pub fn backend(what: &str, cause: &str) -> Self {
        let mut p = if refuses_credentials(cause) {
            Self::new(
                503,
                "credentials-refused",
                "Credentials refused",
                &format!("{what} refused Spillway's credentials: check the user and password in that variable (the server log has the details)"),
            )
        } else {
            Self::new(503, "unavailable", "Service unavailable", &format!("{what} is unreachable or failed (the server log has the details)"))
        };
        p.retry_after = Some(1);
        p.cause = Some(Box::new(cause.to_owned()));
        p
    }

    /// The backend's own text when there is one, else the detail: what a log
    /// line or an operator's record says.
    pub fn cause_or_detail(&self) -> &str {
        self.cause.as_deref().map_or(&self.detail, String::as_str)
    }

    /// 401/403 for admin endpoints.
    pub fn unauthorized(status: u16, detail: &str) -> Self {
        let code = if status == 401 { "unauthorized" } else { "forbidden" };
        let title = if status == 401 { "Unauthorized" } else { "Forbidden" };
        Self::new(status, code, title, detail)
    }

    /// Whether the problem is a backend refusing Spillway's credentials.
    pub fn is_credentials_refused(&self) -> bool {
        self.code() == "credentials-refused"
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whether a backend's error text says it refused the credentials: Redis's
/// `NOAUTH` / `WRONGPASS` (and the wording of clients that report them),
/// PostgreSQL's SQLSTATE class 28 (`28P01` invalid password, `28000`) and its
/// messages.
pub fn refuses_credentials(cause: &str) -> bool {
    const MARKS: [&str; 10] = [
        "noauth",
        "wrongpass",
        "authentication required",
        "invalid username-password pair",
        "invalid password",
        "authenticationfailed",
        "password authentication failed",
        "no password supplied",
        "[28p01]",
        "[28000]",
    ];
    let lower = cause.to_ascii_lowercase();
    MARKS.iter().any(|m| lower.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Credential refusals of Redis and PostgreSQL, as their clients word them,
    /// are told apart from other failures; neither shows the cause.
    #[test]
    fn backend_failures_are_safe_and_tell_credentials_apart() {
        for refusal in [
            "Error::Other(\"WRONGPASS: invalid username-password pair or user is disabled.\")",
            "Other(\"NOAUTH: Authentication required.\")",
            "AuthenticationFailed: Password authentication failed",
            "connection failed: password authentication failed for user \"app\"",
            "db error [28P01]",
        ] {
            let p = Problem::backend("Redis (redis_address)", refusal);
            assert_eq!((p.status, p.code(), p.retry_after), (503, "credentials-refused", Some(1)), "{refusal}");
            assert!(p.detail.starts_with("Redis (redis_address) refused"), "{}", p.body());
            assert!(!p.body().contains(refusal) && p.cause_or_detail() == refusal);
        }
        let p = Problem::backend("the database", "Connection refused (os error 111) at 10.0.0.9");
        assert_eq!(p.code(), "unavailable");
        assert!(!p.body().contains("10.0.0.9"), "{}", p.body());
        assert_eq!(Problem::not_found("x").cause_or_detail(), "x");
    }
}
