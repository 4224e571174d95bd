//! When a lease's mirror is set again (the processor's leases; see
//! `spillway_spin::mirror`).

/// Where a lease's mirror stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirror {
    /// The shard needs none (or it is not set yet).
    Unneeded,
    /// Set at this monotonic time (ms).
    SetAt(u64),
    /// Setting it failed: tried again at the next round. (Not a time: WASI's
    /// monotonic clock starts near zero with each instance, so no time
    /// stands for "long ago".)
    Retry,
}

impl Mirror {
    /// Whether the mirror is to be set again at monotonic time `now_ms`:
    /// once it is half a lease TTL old, or at once after a failure.
    pub fn due(self, now_ms: u64, lease_ttl_ms: u64) -> bool {
        match self {
            Self::Unneeded => false,
            Self::Retry => true,
            Self::SetAt(last) => now_ms.saturating_sub(last) >= lease_ttl_ms / 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed mirror is retried at the next round even in an instance
    /// younger than half a TTL (its clock near zero); a set one once it is
    /// half a TTL old; an unneeded one never.
    #[test]
    fn a_failed_mirror_is_due_at_once_in_a_young_instance() {
        assert!(Mirror::Retry.due(3, 5000));
        assert!(!Mirror::SetAt(0).due(100, 5000));
        assert!(Mirror::SetAt(0).due(2500, 5000));
        assert!(!Mirror::SetAt(2000).due(4000, 5000));
        assert!(!Mirror::Unneeded.due(1_000_000, 5000));
    }
}
