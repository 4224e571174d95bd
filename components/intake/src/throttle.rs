//! Tenants this instance has seen refused by their quotas, refused again here
//! without a Redis call while that refusal holds.
//!
//! The enqueue script is the authority on quotas (see `spillway_core::tenant`);
//! but a tenant flooding past its quota would otherwise cost a body parse and a
//! script run per refused request, in this host and in Redis, which everyone's
//! writes share. A reused instance (up to 128 requests) remembers each refusal
//! for as long as it is sure to hold (a rate refusal: until the bucket has the
//! tokens the script named; a depth refusal: [`DEPTH_RECHECK_MS`]), refuses
//! that tenant's requests itself meanwhile, and answers them only once the
//! `Retry-After` the refusal gave has passed, with a random part of a second
//! more (at most two seconds later): a
//! client that honours `Retry-After` never meets this, one that does not
//! waits as it was told instead of keeping the host busy. A request
//! with an `Idempotency-Key` always asks the script (a retry of an accepted
//! request replays its answer). The requests refused here are counted with the
//! tenant's next enqueue from this instance.

use std::cell::RefCell;

use spillway_core::problem::Problem;
use spillway_core::tenant::Refusals;

/// How long a tenant found holding its depth of writes is refused here before
/// the script is asked again (its writes may have been applied meanwhile):
/// the `Retry-After` its refusal gives.
pub(crate) const DEPTH_RECHECK_MS: u64 = 1000;

thread_local! {
    static REFUSALS: RefCell<Refusals> = RefCell::new(Refusals::default());
}

/// The answer to a request of `tenant` at monotonic time `now_ms`, if a
/// refusal of it still holds, and how long to hold it before answering (see
/// `spillway_core::tenant::Refusals`).
pub(crate) fn check(tenant: &str, now_ms: u64) -> Option<(Problem, u64)> {
    let jitter = u64::from(spillway_spin::random_u32());
    REFUSALS.with_borrow_mut(|r| r.check(tenant, now_ms, jitter))
}

/// [`check`] for each of `tenants`: the first refusal that holds, answered
/// once its hold is over.
pub(crate) async fn refused(tenants: impl IntoIterator<Item = &str>) -> Option<Problem> {
    let now = spillway_spin::monotonic_ms();
    let (p, hold) = tenants.into_iter().find_map(|t| check(t, now))?;
    spillway_spin::wait_ms(hold).await;
    Some(p)
}

/// Remembers that the script refused `tenant` with `problem`, which holds
/// for `for_ms` from `now_ms`.
pub(crate) fn note(tenant: &str, problem: &Problem, now_ms: u64, for_ms: u64) {
    REFUSALS.with_borrow_mut(|r| r.note(tenant, problem, now_ms, for_ms));
}

/// The requests of `tenant` refused here since the last call, to be counted
/// in Redis by the enqueue about to be made.
pub(crate) fn take_uncounted(tenant: &str) -> u64 {
    REFUSALS.with_borrow_mut(|r| r.take_uncounted(tenant))
}
