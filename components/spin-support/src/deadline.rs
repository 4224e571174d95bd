//! Deadlines: every call to a dependency races a timer, and a request races
//! its own deadline. The loser is dropped: a host call's future dropped before
//! it finishes is cancelled (the component model's `subtask.cancel`), so
//! nothing waits for a stalled server. What the call asked for may still
//! happen (the server may have it already): a timeout is an unknown outcome,
//! never a failure that is known to have changed nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;

use futures::future::{Either, select};
use spillway_core::problem::{Dependency, Problem};

/// `fut`'s output, unless `ms` (0: no limit) ran out first (`None`: `fut` was
/// dropped, cancelling its host calls).
pub async fn within<F: Future>(ms: u64, fut: F) -> Option<F::Output> {
    if ms == 0 {
        return Some(fut.await);
    }
    match select(pin!(fut), pin!(crate::wait_ms(ms))).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(((), _)) => None,
    }
}

/// The instance's `call_timeout_ms` (its default before the settings are read:
/// reading them is itself a call).
pub fn call_timeout_ms() -> u64 {
    crate::settings::with_loaded(|s| s.map_or(2000, |s| s.call_timeout_ms))
}

/// How long, after a call to a server ran out of time, further calls to it
/// from the same instance fail at once (as long as the `Retry-After` the
/// answer gives): a server known to be stalled is not waited for again by
/// every request, and the first call after the pause finds out whether it is
/// back.
pub const TRIPPED_MS: u64 = 1000;

thread_local! {
    /// Servers (as answers name them) whose last call ran out of time, and
    /// until when (monotonic ms) calls to them fail at once.
    static TRIPPED: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

/// `fut`, a call to `dependency` (named `what` in answers), within
/// `call_timeout_ms`: its output, or a timeout. A timeout also makes the
/// instance's calls to `what` fail at once for [`TRIPPED_MS`].
pub async fn guarded<F: Future>(dependency: Dependency, what: &str, fut: F) -> Result<F::Output, Problem> {
    guarded_for(dependency, what, 0, fut).await
}

/// [`guarded`], for a call that may take `extra_ms` beyond a call's time by
/// design (a `WAIT` for replicas).
pub async fn guarded_for<F: Future>(dependency: Dependency, what: &str, extra_ms: u64, fut: F) -> Result<F::Output, Problem> {
    let ms = match call_timeout_ms() {
        0 => 0,
        ms => ms.saturating_add(extra_ms),
    };
    let now = crate::monotonic_ms();
    if TRIPPED.with_borrow(|t| t.get(what).is_some_and(|until| now < *until)) {
        return Err(Problem::timeout(dependency, what, ms));
    }
    match within(ms, fut).await {
        Some(out) => Ok(out),
        None => {
            TRIPPED.with_borrow_mut(|t| t.insert(what.to_owned(), crate::monotonic_ms() + TRIPPED_MS));
            eprintln!("{}", serde_json::json!({"event": "timeout", "backend": what, "ms": ms}));
            Err(Problem::timeout(dependency, what, ms))
        }
    }
}

/// [`guarded`] for a call that answers a `Result`; on expiry `on_timeout`
/// runs first (e.g. to drop a kept connection that may still carry the
/// abandoned reply).
pub async fn call<T>(dependency: Dependency, what: &str, on_timeout: impl FnOnce(), fut: impl Future<Output = Result<T, Problem>>) -> Result<T, Problem> {
    guarded(dependency, what, fut).await.inspect_err(|_| on_timeout())?
}

/// A request's handling within `request_timeout_ms` plus `wait_ms` (a wait the
/// request asked for); on expiry it is dropped and answered
/// [`Problem::deadline_exceeded`].
pub async fn request<T>(s: &spillway_core::settings::Settings, wait_ms: u64, fut: impl Future<Output = Result<T, Problem>>) -> Result<T, Problem> {
    if s.request_timeout_ms == 0 {
        return fut.await;
    }
    let ms = s.request_timeout_ms.saturating_add(wait_ms);
    match within(ms, fut).await {
        Some(r) => r,
        None => {
            eprintln!("{}", serde_json::json!({"event": "deadline_exceeded", "ms": ms}));
            Err(Problem::deadline_exceeded(ms))
        }
    }
}
