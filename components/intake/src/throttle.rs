//! Tenants this instance has seen refused by their quotas, refused again here
//! without a Redis call while that refusal holds.
//!
//! The enqueue script is the authority on quotas (see `spillway_core::tenant`);
//! but a tenant flooding past its quota would otherwise cost a body parse and a
//! script run per refused request, in this host and in Redis, which everyone's
//! writes share. A reused instance (up to 128 requests) remembers each refusal
//! for as long as it is sure to hold (a rate refusal: while the bucket, refilled
//! since, is short of a request's writes; a depth refusal: [`DEPTH_RECHECK_MS`]),
//! refuses that tenant's requests itself meanwhile, and answers them only once the
//! `Retry-After` the refusal gave has passed, with a random part of a second
//! more (at most two seconds later): a
//! client that honours `Retry-After` never meets this, one that does not
//! waits as it was told instead of keeping the host busy. Once a remembered
//! rate refusal ends (the bucket refilled), the next request asks the script;
//! refused again before the `Retry-After` this instance told the tenant (a
//! flood's other requests took the tokens first), its answer is held the same
//! way, so that each instance asks the script for a flooding tenant about
//! once per `Retry-After`, not once per refill. A request
//! with an `Idempotency-Key` always asks the script (a retry of an accepted
//! request replays its answer). Only where one server holds every shard (the
//! default): with several, or a cluster, each enforces a share of the quota,
//! and a refusal by one says nothing of the others. The requests refused here
//! are counted with the tenant's next enqueue from this instance.

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

/// The first refusal that is sure to hold for a request with `writes`
/// writes of each tenant (see `spillway_core::tenant::Refusals`), answered
/// once its hold is over.
pub(crate) async fn refused(writes: &[(&str, u64)]) -> Option<Problem> {
    // Most requests are of no tenant refused here: no clock or random read.
    if !REFUSALS.with_borrow(|r| writes.iter().any(|(t, _)| r.remembers(t))) {
        return None;
    }
    let now = spillway_spin::monotonic_ms();
    let jitter = u64::from(spillway_spin::random_u32());
    let (p, hold) = REFUSALS.with_borrow_mut(|r| writes.iter().find_map(|(t, n)| r.check(t, *n, now, jitter)))?;
    spillway_spin::wait_ms(hold).await;
    Some(p)
}

/// Remembers that the script refused `tenant` for its rate: its bucket held
/// `tokens_milli` thousandths of a token, refilled at `rate` up to `burst`.
/// The answer, held (see [`answer`]), if the tenant came back before it was
/// told to.
pub(crate) fn note_rate(tenant: &str, problem: &Problem, bucket: (u64, u64, u64)) -> Option<(Problem, u64)> {
    let jitter = u64::from(spillway_spin::random_u32());
    REFUSALS.with_borrow_mut(|r| r.note_rate(tenant, problem, spillway_spin::monotonic_ms(), bucket, jitter))
}

/// Remembers that the script refused `tenant` for its depth, for
/// [`DEPTH_RECHECK_MS`]; the answer as [`note_rate`]'s.
pub(crate) fn note_depth(tenant: &str, problem: &Problem) -> Option<(Problem, u64)> {
    let jitter = u64::from(spillway_spin::random_u32());
    REFUSALS.with_borrow_mut(|r| r.note_for(tenant, problem, spillway_spin::monotonic_ms(), DEPTH_RECHECK_MS, jitter))
}

/// A refusal's answer, after its hold (0: at once).
pub(crate) async fn answer((problem, hold_ms): (Problem, u64)) -> Problem {
    if hold_ms > 0 {
        spillway_spin::wait_ms(hold_ms).await;
    }
    problem
}

/// The requests of `tenant` refused here since the last call, to be counted
/// in Redis by the enqueue about to be made.
pub(crate) fn take_uncounted(tenant: &str) -> u64 {
    REFUSALS.with_borrow_mut(|r| r.take_uncounted(tenant))
}
