//! A backend's failure as an answer, and credentials kept out of what is said.

use spillway_core::problem::Problem;

/// Masks credentials in `text` (user information in URLs, and every configured
/// secret once the settings are read): for anything a log line or an
/// operator's record repeats from a backend.
pub fn redact(text: &str) -> String {
    crate::settings::with_loaded(|s| match s {
        Some(s) => s.redactor.redact(text),
        None => spillway_core::redact::strip_userinfo(text),
    })
}

/// A backend failure as an answer: `what` failed with `cause` (its own error
/// text). The client gets a stable problem type and a message that names the
/// backend ([`Problem::backend`]); the cause, credentials masked, goes to one
/// JSON log line and stays in the problem for the operators' records.
pub fn backend_failed(what: &str, cause: &str) -> Problem {
    let cause = redact(cause);
    eprintln!("{}", serde_json::json!({"event": "backend_failed", "backend": what, "error": cause}));
    Problem::backend(what, &cause)
}


/// Logs a failure that is not the request's to report (a rollback after an
/// error, a best-effort mark): one JSON line, `what` failed and why.
pub fn log_ignored<T, E: Into<Problem>>(what: &str, result: Result<T, E>) {
    if let Err(p) = result.map_err(Into::into) {
        eprintln!("{}", serde_json::json!({"event": "ignored_failure", "what": what, "error": p.cause_or_detail()}));
    }
}
