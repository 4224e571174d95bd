//! RFC 9457 problem details: the one error shape of Spillway's HTTP API.

use serde::Serialize;

/// Base of the stable `type` URIs.
pub const TYPE_BASE: &str = "https://spillway.dev/problems/";

/// The problem types intake's refusals are usually of (429 for a full queue
/// or schedule, 503 for a Redis server unreachable, slow or refusing
/// Spillway, or replicas not confirming): `spillway_intake_refused_total`
/// gives each from 0, so that its first refusal shows as an increase.
pub const INTAKE_REFUSALS: [&str; 6] = ["queue-full", "schedule-full", "unavailable", "outcome-unknown", "deadline-exceeded", "credentials-refused"];

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

    /// 429 with `Retry-After`: a shard holds as many scheduled writes as it may.
    pub fn schedule_full(detail: &str, retry_after: u32) -> Self {
        let mut p = Self::new(429, "schedule-full", "Schedule full", detail);
        p.retry_after = Some(retry_after);
        p
    }

    /// 429 with `Retry-After`: a tenant's writes are over one of its quotas
    /// (`type`: `tenant-rate-limited` or `tenant-queue-full`).
    pub fn tenant_throttled(kind: &str, title: &str, detail: &str, retry_after: u32) -> Self {
        let mut p = Self::new(429, kind, title, detail);
        p.retry_after = Some(retry_after.max(1));
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
        } else if let Some((code, title, why)) = redis_refusal(cause) {
            Self::new(503, code, title, &format!("{what} {why}"))
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

    /// 503 with `Retry-After`: a call to `dependency` (named `what`, e.g.
    /// `Redis (redis_address)`) did not answer within `ms` (`call_timeout_ms`)
    /// and was abandoned. The type names the dependency.
    pub fn timeout(dependency: Dependency, what: &str, ms: u64) -> Self {
        let mut p = Self::new(
            503,
            dependency.timeout_code(),
            dependency.timeout_title(),
            &format!("{what} did not answer within {ms} ms (call_timeout_ms); retry later"),
        );
        p.retry_after = Some(1);
        p
    }

    /// 503 with `Retry-After`: the request did not finish within `ms`
    /// (`request_timeout_ms`, plus any wait it asked for) and was abandoned.
    pub fn deadline_exceeded(ms: u64) -> Self {
        let mut p = Self::new(
            503,
            "deadline-exceeded",
            "Deadline exceeded",
            &format!("the request did not finish within {ms} ms (request_timeout_ms and any wait asked for): a dependency is slow; retry later"),
        );
        p.retry_after = Some(1);
        p
    }

    /// Whether a dependency (or the whole request) ran out of time: the call
    /// was abandoned, and what it asked for may still happen.
    pub fn is_timeout(&self) -> bool {
        self.code().ends_with("-timeout") || self.code() == "deadline-exceeded"
    }

    /// 503 with `Retry-After`: writes whose enqueue ran out of time (`cause`) may
    /// or may not have been accepted. With an `Idempotency-Key` (`keyed`), a
    /// retry with the same key and body settles it without doubling a write.
    pub fn outcome_unknown(cause: &Problem, keyed: bool) -> Self {
        let advice = if keyed {
            "retry with the same Idempotency-Key and body: the writes are accepted once (202, or the first answer replayed)"
        } else {
            "the request had no Idempotency-Key, so a retry may apply them twice: check the records first, and send an Idempotency-Key to make retries safe"
        };
        let mut p = Self::new(
            503,
            "outcome-unknown",
            "Outcome unknown",
            &format!("the writes may or may not have been accepted ({}); {advice}", cause.detail.trim_end_matches("; retry later")),
        );
        p.retry_after = Some(1);
        p.cause = cause.cause.clone();
        p
    }

    /// 503 with `Retry-After`: writes stored on the primary that only `acked`
    /// of `wanted` replicas confirmed within `ms` (`min_replicas`,
    /// `replica_timeout_ms`). Like [`Problem::outcome_unknown`]: they could
    /// still be lost with the primary, and a retry with the same
    /// `Idempotency-Key` settles them without doubling.
    pub fn not_replicated(acked: i64, wanted: u32, ms: u64, keyed: bool) -> Self {
        let cause = Self::new(
            503,
            "outcome-unknown",
            "Outcome unknown",
            &format!("stored on the primary, but {acked} of the {wanted} replicas asked for (min_replicas) confirmed them within {ms} ms (replica_timeout_ms): lost if the primary fails now"),
        );
        Self::outcome_unknown(&cause, keyed)
    }

    /// Whether Redis refused a change at its memory limit (nothing of it was
    /// stored).
    pub fn is_redis_full(&self) -> bool {
        self.code() == "redis-full"
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

/// A dependency whose calls have a deadline (see [`Problem::timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// A Redis server (the queue, locks, statuses).
    Redis,
    /// The database (SQLite or PostgreSQL).
    Database,
    /// The key-value store (the cache).
    KeyValue,
}

impl Dependency {
    /// The code of its timeout's problem type.
    pub fn timeout_code(self) -> &'static str {
        match self {
            Self::Redis => "redis-timeout",
            Self::Database => "database-timeout",
            Self::KeyValue => "key-value-timeout",
        }
    }

    fn timeout_title(self) -> &'static str {
        match self {
            Self::Redis => "Redis timed out",
            Self::Database => "Database timed out",
            Self::KeyValue => "Key-value store timed out",
        }
    }
}

/// A Redis server's refusal of a command it did not run (so nothing of it
/// happened), recognised in its error text: the problem type, title, and what
/// the server did, as the detail's end.
pub fn redis_refusal(cause: &str) -> Option<(&'static str, &'static str, &'static str)> {
    let c = cause.to_ascii_lowercase();
    if c.contains("oom") && c.contains("maxmemory") {
        Some((
            "redis-full",
            "Redis is full",
            "is at its memory limit (maxmemory, policy noeviction) and refused the change: nothing was stored. Retry later: the processor frees memory as it applies the queue; or raise maxmemory",
        ))
    } else if c.contains("busy running a script") {
        Some(("redis-busy", "Redis is busy", "is busy running a long script and refused the command: nothing was done. Retry later"))
    } else if c.contains("misconf") {
        Some((
            "redis-cannot-persist",
            "Redis cannot persist",
            "cannot write its append-only file or snapshot (a full or failing disk) and refuses changes: nothing was stored. Retry once its disk is fixed",
        ))
    } else if c.contains("readonly") && c.contains("replica") {
        Some(("redis-read-only", "Redis is a replica", "is a read-only replica and refused the change: nothing was stored. Point that variable at the primary"))
    } else {
        None
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
    fn redis_refusals_say_what_redis_refused_and_that_nothing_happened() {
        for (cause, code) in [
            ("Other(\"OOM: command not allowed when used memory > 'maxmemory'.\")", "redis-full"),
            ("Other(\"BUSY: Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.\")", "redis-busy"),
            ("Other(\"MISCONF: Errors writing to the AOF file: No space left on device\")", "redis-cannot-persist"),
            ("Other(\"ReadOnly: You can't write against a read only replica.\")", "redis-read-only"),
        ] {
            let p = Problem::backend("Redis (redis_address)", cause);
            assert_eq!((p.status, p.code(), p.retry_after), (503, code, Some(1)), "{cause}");
            assert!(p.detail.starts_with("Redis (redis_address) ") && p.detail.contains("nothing was"), "{}", p.detail);
            assert!(!p.body().contains(cause));
        }
        assert_eq!(Problem::backend("Redis (redis_address)", "Io(Connection reset by peer)").code(), "unavailable");
    }

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

    /// A timeout names its dependency in the type and the variable in the
    /// detail, asks for a retry later, and an unknown outcome says how to
    /// settle it, with or without an idempotency key.
    #[test]
    fn timeouts_name_the_dependency_and_unknown_outcomes_say_how_to_settle() {
        let p = Problem::timeout(Dependency::Database, "The database (database)", 250);
        assert_eq!((p.status, p.code(), p.retry_after), (503, "database-timeout", Some(1)));
        assert_eq!(p.detail, "The database (database) did not answer within 250 ms (call_timeout_ms); retry later");
        assert!(p.is_timeout() && Problem::deadline_exceeded(5).is_timeout());
        assert!(!Problem::unavailable("x").is_timeout());
        assert_eq!(Problem::timeout(Dependency::KeyValue, "k", 1).code(), "key-value-timeout");
        let r = Problem::timeout(Dependency::Redis, "Redis (redis_address)", 300);
        let keyed = Problem::outcome_unknown(&r, true);
        assert_eq!((keyed.status, keyed.code(), keyed.retry_after), (503, "outcome-unknown", Some(1)));
        assert!(keyed.detail.contains("Redis (redis_address) did not answer within 300 ms") && keyed.detail.contains("same Idempotency-Key"), "{}", keyed.detail);
        assert!(Problem::outcome_unknown(&r, false).detail.contains("no Idempotency-Key"));
        let unreplicated = Problem::not_replicated(0, 1, 500, true);
        assert_eq!((unreplicated.status, unreplicated.code(), unreplicated.retry_after), (503, "outcome-unknown", Some(1)));
        assert!(unreplicated.detail.contains("0 of the 1 replicas") && unreplicated.detail.contains("same Idempotency-Key"), "{}", unreplicated.detail);
    }
}
