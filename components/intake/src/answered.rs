//! Error answers this instance gave without Redis's part in them (a Redis
//! server unreachable or too slow, replicas not confirming): counted in Redis
//! by the next enqueue from this instance (see `scripts::ENQUEUE`), so that
//! `spillway_intake_refused_total` shows them beside the refusals Redis
//! counts itself (a full queue or schedule). An instance that ends before
//! Redis answers again loses its counts: during an outage the metric to
//! watch is `spillway_unavailable_shards`.

use std::cell::RefCell;

use spillway_core::problem::Problem;

thread_local! {
    static ANSWERED: RefCell<Vec<(String, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Counts `p` if it is a server-side error (5xx).
pub(crate) fn note(p: &Problem) {
    if p.status >= 500 {
        add(vec![(p.code().to_owned(), 1)]);
    }
}

/// The counts not yet in Redis, for the call about to be made.
pub(crate) fn take() -> Vec<(String, u64)> {
    ANSWERED.with_borrow_mut(std::mem::take)
}

/// Adds counts (given back when their call failed).
pub(crate) fn add(counts: Vec<(String, u64)>) {
    ANSWERED.with_borrow_mut(|a| {
        for (code, k) in counts {
            match a.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += k,
                None => a.push((code, k)),
            }
        }
    });
}
