//! Tenants this instance has seen refused by their quotas, refused again here
//! without a Redis call while that refusal holds.
//!
//! The enqueue script is the authority on quotas (see `spillway_core::tenant`);
//! but a tenant flooding past its quota would otherwise cost a body parse and a
//! script run per refused request, in this host and in Redis, which everyone's
//! writes share. A reused instance (up to 128 requests) remembers each refusal
//! for as long as it is sure to hold: a rate refusal until the bucket has the
//! tokens the script named, a depth refusal for [`DEPTH_RECHECK_MS`]. A request
//! with an `Idempotency-Key` always asks the script (a retry of an accepted
//! request replays its answer). The requests refused here are counted with the
//! tenant's next enqueue from this instance.

use std::cell::RefCell;

use spillway_core::problem::Problem;
use spillway_core::tenant::Refusals;

/// How long a tenant found holding its depth of writes is refused here before
/// the script is asked again (its writes may have been applied meanwhile).
pub(crate) const DEPTH_RECHECK_MS: u64 = 250;

thread_local! {
    static REFUSALS: RefCell<Refusals> = RefCell::new(Refusals::default());
}

/// The answer to a request of `tenant` at monotonic time `now_ms`, if a
/// refusal of it still holds.
pub(crate) fn check(tenant: &str, now_ms: u64) -> Option<Problem> {
    REFUSALS.with_borrow_mut(|r| r.check(tenant, now_ms))
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
