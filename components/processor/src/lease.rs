//! A shard's lease: the lock that gives one processor a shard at a time.
//!
//! `SET lease token NX PX ttl` with a fencing token (a counter per shard) that
//! the database write checks, released and renewed by token in Lua (see
//! `scripts::LEASE_ACQUIRE`, `LEASE_RELEASE`, `READ_BATCH`): a holder whose
//! lease expired cannot release, renew or commit over the next holder.

use spillway_core::call::{BatchLimits, Call, backoff_ms};
use spillway_core::lease::Mirror;
use spillway_core::problem::Problem;
use spillway_core::reply::{BatchRead, LeaseAcquired};
use spillway_spin::redis::malformed;
use spillway_core::settings::Settings;
use spillway_spin::mirror::{Mirrored, Outcome, mirror};
use spillway_spin::{Redis, token};
use std::cell::Cell;

/// What follows a lease's release (a shard found empty is let go with its
/// flag read, see the drain's `empty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Then {
    /// A retry (the shard's watch), at once.
    Retry,
    /// A retry after the backoff for a batch whose `attempt`-th delivery
    /// failed (see `call::backoff_ms`).
    BackOff { attempt: u32 },
}

/// A lease this processor holds.
#[derive(Clone, Debug)]
pub(crate) struct Lease {
    /// The shard.
    pub(crate) shard: u32,
    /// Ours: what release and renewal compare.
    pub(crate) token: String,
    /// The fencing token the database write checks.
    pub(crate) fence: i64,
    /// The lease's mirror on the trigger's server (see `spillway_spin::mirror`).
    mirrored: Cell<Mirror>,
}

/// A lease's mirror lives this many halves of the lease TTL, and is set again
/// once it is half a TTL old: it then always outlives the lease, which each
/// round renews for one TTL. (A mirror that expired first would find the
/// shard held, and the lease's own expiry would not be heard.)
const MIRROR_HALVES: u64 = 3;

impl Lease {
    /// Takes `shard`'s lease, unless another processor holds it or the shard
    /// backs off after a failed batch (`None`); an operator's drain
    /// (`end_backoff`) ends a backoff.
    pub(crate) async fn acquire(s: &Settings, shard: u32, end_backoff: bool) -> Result<Option<Self>, Problem> {
        // Named after its node, if it has a name: `/v1/stats` shows who holds
        // what.
        let token = match &s.node_name {
            Some(node) => format!("{node}~{}", token()),
            None => token(),
        };
        let reply = Redis::for_shard(s, shard).call(&Call::lease_acquire(&s.layout, shard, &token, s.lease_ttl_ms, end_backoff)).await?;
        Ok(match LeaseAcquired::parse(&spillway_spin::redis::values(&reply)).map_err(malformed)? {
            LeaseAcquired::Won(fence) => {
                let lease = Self { shard, token, fence, mirrored: Cell::new(Mirror::Unneeded) };
                lease.mirror(s, true).await;
                Some(lease)
            }
            LeaseAcquired::Busy => None,
        })
    }

    /// Releases the lease after a failure, or to hand the shard on: the
    /// shard's watch stays, to expire one lease TTL after any backoff: that
    /// expiry is the retry, whatever else happens. After a failed batch
    /// ([`Then::BackOff`]) the shard backs off first. A release that fails
    /// leaves the lease to expire, which resumes the shard too; it is logged.
    pub(crate) async fn release(&self, s: &Settings, then: Then) {
        let (retry_ms, backoff) = match then {
            Then::Retry => (s.lease_ttl_ms, 0),
            Then::BackOff { attempt } => {
                let backoff = backoff_ms(s.retry_backoff_ms, attempt);
                (backoff + s.lease_ttl_ms, backoff)
            }
        };
        let released = Redis::for_shard(s, self.shard).call(&Call::lease_release(&s.layout, self.shard, &self.token, retry_ms, backoff)).await;
        if let Err(p) = released {
            eprintln!("{}", serde_json::json!({"event": "lease_release_failed", "shard": self.shard, "fence": self.fence, "error": p.detail}));
            // The lease expires of itself: its mirror too.
            return;
        }
        // The mirror follows the watch when it expires as the retry. (A shard
        // let go as done, by the drain's `empty`, leaves its mirror to
        // expire: deleting it could delete the next holder's, its lease taken
        // between our release and the delete, on another server; and an
        // expiry of a shard that is not held, or held anew, only has it
        // looked at again.)
        if !matches!(self.mirrored.get(), Mirror::Unneeded) {
            mirror(s, self.shard, Mirrored::Lease, Some(retry_ms)).await;
        }
    }

    /// Sets the lease's mirror, if the shard needs one, when `now` or once the
    /// last is half a TTL old.
    async fn mirror(&self, s: &Settings, now: bool) {
        let at = spillway_spin::monotonic_ms();
        let due = now || self.mirrored.get().due(at, s.lease_ttl_ms);
        if !due {
            return;
        }
        let ttl = s.lease_ttl_ms.saturating_mul(MIRROR_HALVES) / 2;
        self.mirrored.set(match mirror(s, self.shard, Mirrored::Lease, Some(ttl)).await {
            Outcome::Done => Mirror::SetAt(at),
            Outcome::Failed => Mirror::Retry,
            Outcome::Unneeded => Mirror::Unneeded,
        });
    }

    /// The database refused this holder's batch: it has seen fencing token
    /// `seen`, newer than ours. Normally a newer holder has the shard now. But
    /// if Redis's counter is behind `seen`, Redis has forgotten tenures the
    /// database remembers (a failover to a replica that had not received
    /// them): no newer holder exists, and every next holder would be refused
    /// too, the shard stalled until the counter caught up one tenure at a
    /// time. Then the counter is raised to `seen` and the lease released with a
    /// retry, so that the next holder's token passes the fence.
    pub(crate) async fn fenced_off(&self, s: &Settings, seen: i64) {
        let raised = Redis::for_shard(s, self.shard).call(&Call::fence_raise(&s.layout, self.shard, seen)).await;
        match raised.map(|r| matches!(spillway_spin::redis::values(&r).first(), Some(spillway_core::reply::Value::Int(1)))) {
            Ok(true) => {
                eprintln!("{}", serde_json::json!({"event": "fence_behind_database", "shard": self.shard, "fence": self.fence, "database": seen}));
                self.release(s, Then::Retry).await;
            }
            Ok(false) => {}
            Err(p) => spillway_spin::log_ignored("raising a fencing counter behind the database's", Err::<(), _>(p)),
        }
    }

    /// Renews the lease and reads the shard's next batch (from `resume` while a
    /// previous holder's pending entries are resumed); [`BatchRead::Lost`] when
    /// the lease is someone else's now.
    pub(crate) async fn read_batch(&self, s: &Settings, resume: Option<&str>, bytes: usize) -> Result<BatchRead, Problem> {
        let limits = BatchLimits {
            count: s.batch_size,
            bytes,
            max_attempts: s.max_attempts,
            lease_ttl_ms: s.lease_ttl_ms,
            retention_ms: s.status_retention_secs.saturating_mul(1000),
        };
        let reply = Redis::for_shard(s, self.shard).call(&Call::read_batch(&s.layout, self.shard, &self.token, limits, resume)).await?;
        let read = BatchRead::parse(&spillway_spin::redis::values(&reply)).map_err(malformed)?;
        // Renewed: the mirror must outlive the lease (timed from now, after
        // the renewal).
        if !matches!(read, BatchRead::Lost) {
            self.mirror(s, false).await;
        }
        Ok(read)
    }
}
