//! The scripts as typed calls: each call's keys and arguments built in one
//! place, by name, from the layout (the scripts and what each key and argument
//! means are in [`crate::scripts`]). A call is run by the components' Redis
//! client; its reply is read by [`crate::reply`].

use crate::layout::{CONSUMER, GROUP, Layout};
use crate::schedule::{ALARM_LEAD_MS, Timing};
use crate::tenant::Quota;
use crate::scripts;

/// One script call: the script, its keys (all in one shard's hash slot) and its
/// arguments, in the script's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The script's text.
    pub script: &'static str,
    /// KEYS.
    pub keys: Vec<String>,
    /// ARGV.
    pub args: Vec<String>,
}

/// What [`Call::read_batch`] needs beyond the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Entries per batch.
    pub count: usize,
    /// The most payload bytes per batch (at least one entry is read); 0: no
    /// limit.
    pub bytes: usize,
    /// Deliveries before an entry is dead-lettered.
    pub max_attempts: u32,
    /// The lease's TTL (renewed by the read).
    pub lease_ttl_ms: u64,
    /// How long outcomes are kept.
    pub retention_ms: u64,
}

/// One entry to dead-letter: its stream id, the write, and why (empty: the
/// error recorded) after how many deliveries (empty: the count recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Stream entry id.
    pub entry: String,
    /// The write as accepted.
    pub payload: String,
    /// Why.
    pub error: String,
    /// Deliveries made.
    pub attempts: String,
    /// The tenant it was charged to, if any.
    pub tenant: Option<String>,
}

/// Upper bounds (ms) of the apply-delay histogram's buckets (and `inf`): how
/// long after a write was due (accepted, or scheduled for) its outcome was
/// acknowledged. Kept in each shard's stats hash as `delay_le_<bound>` (the
/// writes in that bucket alone) and `delay_sum_ms`.
pub const DELAY_BUCKETS_MS: [u64; 11] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 60_000];

/// The stats field of the bucket of `bound` (`None`: above the last).
pub fn delay_field(bound: Option<u64>) -> String {
    match bound {
        Some(b) => format!("delay_le_{b}"),
        None => "delay_le_inf".to_owned(),
    }
}

/// A batch's apply delays, counted per bucket.
#[derive(Debug, Default)]
struct DelayCounts {
    buckets: [u64; DELAY_BUCKETS_MS.len() + 1],
    sum_ms: u64,
}

impl DelayCounts {
    fn add(&mut self, ms: u64) {
        let at = DELAY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(DELAY_BUCKETS_MS.len());
        self.buckets[at] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    /// The stats fields to add to, and by how much (none for an empty bucket).
    fn fields(&self) -> Vec<(String, u64)> {
        let bounds = DELAY_BUCKETS_MS.iter().map(|b| Some(*b)).chain([None]);
        let mut out: Vec<(String, u64)> = bounds.zip(self.buckets).filter(|(_, n)| *n > 0).map(|(b, n)| (delay_field(b), n)).collect();
        if self.sum_ms > 0 {
            out.push(("delay_sum_ms".to_owned(), self.sum_ms));
        }
        out
    }
}

/// The time part (ms) of a stream entry id `<ms>-<seq>` (0 if it has none).
fn entry_ms(id: &str) -> u64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

/// A yes/no argument as the scripts read it: `1` or `0`.
fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}

/// How long a shard whose batch failed backs off before it is tried again
/// (infrastructure failures are retried with backoff, then dead-lettered):
/// `base_ms` after the first failed delivery, doubling with each further
/// one, at most a minute; 0 with no base.
pub fn backoff_ms(base_ms: u64, attempt: u32) -> u64 {
    const MAX_MS: u64 = 60_000;
    if base_ms == 0 {
        return 0;
    }
    base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(MAX_MS)
}

impl Call {
    /// `LEASE_ACQUIRE`: takes `shard`'s lease for `token` (also from a shard
    /// backing off, with `end_backoff`: an operator's drain).
    pub fn lease_acquire(l: &Layout, shard: u32, token: &str, ttl_ms: u64, end_backoff: bool) -> Self {
        Self {
            script: scripts::LEASE_ACQUIRE,
            keys: vec![l.lease(shard), l.fence(shard)],
            args: vec![token.to_owned(), ttl_ms.to_string(), flag(end_backoff)],
        }
    }

    /// `FENCE_RAISE`: raises `shard`'s fencing counter to `at_least` if it is
    /// below.
    pub fn fence_raise(l: &Layout, shard: u32, at_least: i64) -> Self {
        Self { script: scripts::FENCE_RAISE, keys: vec![l.fence(shard)], args: vec![at_least.to_string()] }
    }

    /// `LEASE_RELEASE`: releases `token`'s lease; with `retry_ms` > 0 the
    /// shard's watch stays that long (its expiry is the retry), and with
    /// `backoff_ms` > 0 the shard backs off that long first.
    pub fn lease_release(l: &Layout, shard: u32, token: &str, retry_ms: u64, backoff_ms: u64) -> Self {
        Self {
            script: scripts::LEASE_RELEASE,
            keys: vec![l.lease(shard), l.watch(shard)],
            args: vec![token.to_owned(), retry_ms.to_string(), backoff_ms.to_string()],
        }
    }

    /// `RELEASE_EMPTY`: releases the leases of `held` (shard and token, all
    /// on one server, or one shard with `redis_cluster`) and reads their
    /// doorbell flags.
    pub fn release_empty<'t>(l: &Layout, held: impl IntoIterator<Item = (u32, &'t str)>) -> Self {
        let (mut keys, mut args) = (Vec::new(), Vec::new());
        for (shard, token) in held {
            keys.extend([l.lease(shard), l.watch(shard), l.bell(shard)]);
            args.push(token.to_owned());
        }
        Self { script: scripts::RELEASE_EMPTY, keys, args }
    }

    /// `READ_BATCH`: renews `token`'s lease and reads the next batch (from
    /// `resume` while resuming a previous holder's pending entries).
    pub fn read_batch(l: &Layout, shard: u32, token: &str, limits: BatchLimits, resume: Option<&str>) -> Self {
        Self {
            script: scripts::READ_BATCH,
            keys: vec![
                l.lease(shard),
                l.stream(shard),
                l.attempts(shard),
                l.watch(shard),
                l.applying(shard),
                l.sched(shard),
                l.sched_writes(shard),
                l.alarm(shard),
            ],
            args: vec![
                token.to_owned(),
                GROUP.into(),
                CONSUMER.into(),
                limits.count.to_string(),
                limits.max_attempts.to_string(),
                limits.lease_ttl_ms.to_string(),
                limits.retention_ms.to_string(),
                resume.unwrap_or_default().to_owned(),
                limits.bytes.to_string(),
                ALARM_LEAD_MS.to_string(),
            ],
        }
    }

    /// `ACK`: acknowledges `entries` and counts the batch's new outcomes.
    /// The entries are `(id, tenant, outcome)`; the tenants' figures are kept
    /// in `tenant_home`'s slot (see `Settings::idempotency_shard`). For each
    /// entry with an outcome here (applied or rejected, not dead-lettered),
    /// `now_ms` (the processor's clock) less its time (when it was accepted, or
    /// due) is its apply delay, counted in the shard's histogram.
    pub fn ack<'e>(
        l: &Layout,
        shard: u32,
        tenant_home: u32,
        (applied, rejected): (u64, u64),
        now_ms: u64,
        entries: impl IntoIterator<Item = (&'e str, Option<&'e str>, bool)>,
    ) -> Self {
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        let mut delays = DelayCounts::default();
        for (id, tenant, outcome) in entries {
            if outcome {
                delays.add(now_ms.saturating_sub(entry_ms(id)));
            }
            let tenant = tenant.unwrap_or("");
            match groups.iter_mut().find(|(t, _)| *t == tenant) {
                Some((_, ids)) => ids.push(id),
                None => groups.push((tenant, vec![id])),
            }
        }
        let mut args = vec![GROUP.to_owned(), applied.to_string(), rejected.to_string()];
        let fields = delays.fields();
        args.push(fields.len().to_string());
        for (field, n) in fields {
            args.extend([field, n.to_string()]);
        }
        for (tenant, ids) in groups {
            args.extend([tenant.to_owned(), ids.len().to_string()]);
            args.extend(ids.into_iter().map(str::to_owned));
        }
        let keys = vec![l.stream(shard), l.attempts(shard), l.done(shard), l.stats(shard), l.tenants(tenant_home)];
        Self { script: scripts::ACK, keys, args }
    }

    /// `DEAD_LETTER`: moves `dead` to the shard's dead letters (`None` when there
    /// are none: no call).
    pub fn dead_letter(l: &Layout, shard: u32, tenant_home: u32, retention_ms: u64, dead: &[DeadLetter]) -> Option<Self> {
        if dead.is_empty() {
            return None;
        }
        let mut args = vec![GROUP.to_owned(), shard.to_string(), retention_ms.to_string()];
        for d in dead {
            args.extend([d.entry.clone(), d.payload.clone(), d.error.clone(), d.attempts.clone(), d.tenant.clone().unwrap_or_default()]);
        }
        let keys =
            vec![l.stream(shard), l.attempts(shard), l.dead(shard), l.dead_status_prefix(shard), l.done(shard), l.stats(shard), l.tenants(tenant_home)];
        Some(Self { script: scripts::DEAD_LETTER, keys, args })
    }

    /// `RECORD_ERROR`: records `error` for `entries` and counts the retries.
    pub fn record_error(l: &Layout, shard: u32, error: &str, entries: impl IntoIterator<Item = String>) -> Self {
        let mut args = vec![error.to_owned()];
        args.extend(entries);
        Self { script: scripts::RECORD_ERROR, keys: vec![l.attempts(shard), l.stats(shard)], args }
    }
}

impl Call {
    /// `CLAIMABLE`: which of `shards` (one server's, or one shard with
    /// `redis_cluster`) have queued writes (or scheduled ones due) and no lease
    /// holder (or back off, with `end_backoff`: an operator's drain), and how
    /// soon the next scheduled write of the others is due.
    pub fn claimable(l: &Layout, shards: &[u32], end_backoff: bool) -> Self {
        Self {
            script: scripts::CLAIMABLE,
            keys: shards.iter().flat_map(|n| [l.stream(*n), l.lease(*n), l.sched(*n), l.alarm(*n)]).collect(),
            args: [flag(end_backoff), ALARM_LEAD_MS.to_string()].into_iter().chain(shards.iter().map(u32::to_string)).collect(),
        }
    }

    /// `NODES_SEEN`: `name` (if any) is alive; the nodes seen within
    /// `window_ms`.
    pub fn nodes_seen(l: &Layout, name: Option<&str>, window_ms: u64) -> Self {
        Self { script: scripts::NODES_SEEN, keys: vec![l.nodes()], args: vec![name.unwrap_or_default().to_owned(), window_ms.max(1).to_string()] }
    }

    /// `SHARD_STATS`: one shard's figures.
    pub fn shard_stats(l: &Layout, shard: u32) -> Self {
        Self {
            script: scripts::SHARD_STATS,
            keys: vec![l.stream(shard), l.lease(shard), l.dead(shard), l.stats(shard), l.sched(shard)],
            args: vec![GROUP.to_owned()],
        }
    }

    /// `REPLAY`: `ids` of `shard` back from its dead letters onto its stream;
    /// `seq_start` is random (see `scripts::ENQUEUE`).
    pub fn replay(l: &Layout, shard: u32, tenant_home: u32, bell_ttl_ms: u64, retention_ms: u64, seq_start: u32, ids: impl IntoIterator<Item = String>) -> Self {
        let mut args = vec![seq_start.to_string(), bell_ttl_ms.to_string(), shard.to_string(), retention_ms.to_string()];
        args.extend(ids);
        let keys = vec![
            l.dead(shard),
            l.dead_status_prefix(shard),
            l.stream(shard),
            l.bell(shard),
            l.stats(shard),
            l.sched(shard),
            l.sched_writes(shard),
            l.tenants(tenant_home),
        ];
        Self { script: scripts::REPLAY, keys, args }
    }

    /// `PURGE`: drops `ids` from `shard`'s dead letters (none: all of them).
    pub fn purge(l: &Layout, shard: u32, retention_ms: u64, ids: impl IntoIterator<Item = String>) -> Self {
        let mut args = vec![shard.to_string(), retention_ms.to_string()];
        args.extend(ids);
        Self { script: scripts::PURGE, keys: vec![l.dead(shard), l.dead_status_prefix(shard), l.stats(shard)], args }
    }

    /// `FILL_BEGIN`: a reader's claim to fill `key`'s cache entry.
    pub fn fill_begin(l: &Layout, key: &str, token: &str, ttl_ms: u64) -> Self {
        Self { script: scripts::FILL_BEGIN, keys: vec![l.fill_lock(key)], args: vec![token.to_owned(), ttl_ms.to_string()] }
    }

    /// `FILL_ABSENT`: the filler found no record: its lock becomes the
    /// negative entry for `ttl_ms`.
    pub fn fill_absent(l: &Layout, key: &str, token: &str, ttl_ms: u64) -> Self {
        Self { script: scripts::FILL_ABSENT, keys: vec![l.fill_lock(key)], args: vec![token.to_owned(), ttl_ms.to_string()] }
    }

    /// `LOCKS_ACQUIRE`: `key`'s fill lock for `token`.
    pub fn lock(l: &Layout, key: &str, token: &str, ttl_ms: u64) -> Self {
        Self { script: scripts::LOCKS_ACQUIRE, keys: vec![l.fill_lock(key)], args: vec![token.to_owned(), ttl_ms.to_string()] }
    }

    /// `LOCKS_RELEASE`: releases `locks` (fill-lock keys) held by `token`.
    pub fn unlock(locks: Vec<String>, token: &str) -> Self {
        Self { script: scripts::LOCKS_RELEASE, keys: locks, args: vec![token.to_owned()] }
    }

    /// `CANCEL`: takes the scheduled write at stream entry `entry` of `shard`
    /// out of its schedule, if it is still there.
    pub fn cancel(l: &Layout, shard: u32, tenant_home: u32, entry: &str, retention_ms: u64) -> Option<Self> {
        let (due, seq) = schedule_slot(entry)?;
        let keys = vec![l.sched(shard), l.sched_writes(shard), l.dead_status_prefix(shard), l.stats(shard), l.done(shard), l.tenants(tenant_home)];
        Some(Self { script: scripts::CANCEL, keys, args: vec![due, seq, retention_ms.to_string(), entry.to_owned()] })
    }

    /// `SCHEDULED`: whether the write at stream entry `entry` of `shard` is in
    /// its schedule.
    pub fn scheduled(l: &Layout, shard: u32, entry: &str) -> Option<Self> {
        let (due, seq) = schedule_slot(entry)?;
        Some(Self { script: scripts::SCHEDULED, keys: vec![l.sched(shard)], args: vec![due, seq] })
    }

    /// `CACHE_COUNT`: adds an instance's cache hits and misses.
    pub fn cache_count(l: &Layout, hits: u64, misses: u64) -> Self {
        Self { script: scripts::CACHE_COUNT, keys: vec![l.cache_stats()], args: vec![hits.to_string(), misses.to_string()] }
    }
}

impl Call {
    /// `MARK_ROUND`: every shard of a careful round marked, naming no write.
    pub fn mark_round(l: &Layout, shards: &[u32], ttl_ms: u64) -> Self {
        Self { script: scripts::MARK_ROUND, keys: shards.iter().map(|n| l.applying(*n)).collect(), args: vec![ttl_ms.to_string()] }
    }

    /// `MARK_CALL`: the writes of the coming apply-step call enter `shard`'s
    /// marker and the previous call's (`previous`) leave it, as the lease
    /// holder (`token`).
    pub fn mark_call(l: &Layout, shard: u32, token: &str, lease_ttl_ms: u64, ttl_ms: u64, previous: &[String], entries: &[String]) -> Self {
        let mut args = vec![token.to_owned(), lease_ttl_ms.to_string(), ttl_ms.to_string(), previous.len().to_string()];
        args.extend(previous.iter().cloned());
        args.extend(entries.iter().cloned());
        Self { script: scripts::MARK_CALL, keys: vec![l.lease(shard), l.applying(shard)], args }
    }

    /// `LOCKS_ACQUIRE_LEASED`: the fill locks of `keys` for `token`, each only
    /// while its shard's lease (one of `leases`: `(shard, lease token)`) is
    /// still ours, renewing those leases for `lease_ttl_ms`.
    pub fn locks_leased(l: &Layout, leases: &[(u32, &str)], keys: &[&String], token: &str, lease_ttl_ms: u64) -> Self {
        let mut k: Vec<String> = leases.iter().map(|(shard, _)| l.lease(*shard)).collect();
        k.extend(keys.iter().map(|key| l.fill_lock(key)));
        let mut args = vec![leases.len().to_string(), token.to_owned(), lease_ttl_ms.to_string()];
        args.extend(leases.iter().map(|(_, t)| (*t).to_owned()));
        for key in keys {
            let shard = l.shard_of(key);
            args.push(leases.iter().position(|(s, _)| *s == shard).map_or(0, |i| i + 1).to_string());
        }
        Self { script: scripts::LOCKS_ACQUIRE_LEASED, keys: k, args }
    }
}

/// Where a scheduled write with stream entry id `entry` (`<due ms>-<sequence>`)
/// sits in its shard's schedule: its score (the due time) and its member, the
/// sequence in 16 digits (see `scripts::schedule_lua`); `None` if the sequence
/// is too long to be one.
fn schedule_slot(entry: &str) -> Option<(String, String)> {
    let (due, seq) = entry.split_once('-')?;
    (seq.len() <= 16).then(|| (due.to_owned(), format!("{seq:0>16}")))
}

/// What one `ENQUEUE` call carries besides its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnqueueLimits<'a> {
    /// The request's `Idempotency-Key`, if any, and the MD5 of its body.
    pub idempotency: Option<(&'a str, &'a str)>,
    /// How long an idempotency record is kept.
    pub idempotency_ttl_secs: u64,
    /// Entries per shard stream before the call is refused.
    pub queue_depth_limit: u64,
    /// The doorbell flag's TTL (the lease TTL).
    pub bell_ttl_ms: u64,
    /// A random number, where the sequence part of the request's first entry id
    /// in each stream starts (see `scripts::ENQUEUE`: ids a failed-over Redis
    /// hands out again must not be those of writes already applied).
    pub seq_start: u32,
    /// Scheduled writes per shard before the call is refused.
    pub scheduled_limit: u64,
    /// How long outcomes are kept (a scheduled write's moved-id record).
    pub retention_ms: u64,
    /// How far in the past an `apply_at` is still taken as now (further back
    /// is refused); checked in the script, after a replayed request is
    /// recognised.
    pub past_ms: u64,
    /// Error answers given without Redis since the last call (5xx, by
    /// problem type), to be counted by this one.
    pub answered: &'a [(String, u64)],
    /// The doorbell channel, for a call to the Redis trigger's server (the
    /// script publishes the shards it rings), or empty (the caller rings).
    pub doorbell: &'a str,
}

/// One write of an `ENQUEUE` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued<'a> {
    /// Its key's shard.
    pub shard: u32,
    /// Its key.
    pub key: &'a str,
    /// When it is due, and when what it writes expires.
    pub timing: Timing,
    /// The write as queued (JSON).
    pub payload: String,
    /// The tenant it is charged to, if any.
    pub tenant: Option<&'a str>,
}

impl Call {
    /// `ENQUEUE`: the writes (in request order) of `group`'s shards, in one
    /// call; the idempotency record and the tenants' quota state in
    /// `idempotency_shard`'s slot, each tenant held to the quota `tenant(name)`
    /// gives (this call's share of it), which also says how many of its
    /// requests the caller refused on its own since it last counted them.
    pub fn enqueue(l: &Layout, group: &[u32], idempotency_shard: u32, limits: EnqueueLimits<'_>, writes: &[Queued<'_>], tenant: impl Fn(&str) -> (Quota, u64)) -> Self {
        let (key, md5) = limits.idempotency.unwrap_or(("", ""));
        let mut keys = vec![l.idempotency(idempotency_shard, key)];
        for &shard in group {
            keys.extend([l.stream(shard), l.bell(shard), l.lease(shard), l.stats(shard), l.sched(shard), l.sched_writes(shard), l.alarm(shard)]);
        }
        let mut args = vec![
            flag(limits.idempotency.is_some()),
            md5.to_owned(),
            limits.idempotency_ttl_secs.to_string(),
            limits.queue_depth_limit.to_string(),
            limits.bell_ttl_ms.to_string(),
            limits.seq_start.to_string(),
            limits.scheduled_limit.to_string(),
            ALARM_LEAD_MS.to_string(),
            limits.retention_ms.to_string(),
            limits.past_ms.to_string(),
            group.len().to_string(),
        ];
        args.extend(group.iter().map(u32::to_string));
        let mine: Vec<&Queued<'_>> = writes.iter().filter(|w| group.contains(&w.shard)).collect();
        let mut tenants: Vec<&str> = Vec::new();
        args.push(mine.len().to_string());
        for w in mine {
            let slot = group.iter().position(|g| *g == w.shard).unwrap_or(0) + 1;
            args.push(slot.to_string());
            args.push(w.timing.due.map(|d| d.arg()).unwrap_or_default());
            let key = serde_json::Value::String(w.key.to_owned());
            args.push(w.timing.ttl_ms.map(|ttl| format!("{ttl}:{key}")).unwrap_or_default());
            args.push(w.payload.clone());
            let tenant = w.tenant.map_or(0, |t| match tenants.iter().position(|n| *n == t) {
                Some(j) => j + 1,
                None => {
                    tenants.push(t);
                    tenants.len()
                }
            });
            args.push(tenant.to_string());
        }
        keys.push(l.tenants(idempotency_shard));
        args.push(tenants.len().to_string());
        for t in tenants {
            let (q, refused) = tenant(t);
            keys.push(l.bucket(idempotency_shard, t));
            args.extend([t.to_owned(), q.rate.to_string(), q.burst.to_string(), q.depth.to_string(), refused.to_string()]);
        }
        args.push(limits.answered.len().to_string());
        for (kind, n) in limits.answered {
            args.extend([kind.clone(), n.to_string()]);
        }
        args.push(limits.doorbell.to_owned());
        Self { script: scripts::ENQUEUE, keys, args }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Due;

    fn layout() -> Layout {
        Layout { prefix: "spillway:".into(), shards: 16 }
    }

    /// The backoff doubles from its base with each failed delivery, and is
    /// bounded; no base, no backoff.
    #[test]
    fn backoff_doubles_per_failed_delivery_up_to_a_minute() {
        let steps: Vec<u64> = (1..=5).map(|a| backoff_ms(500, a)).collect();
        assert_eq!(steps, [500, 1000, 2000, 4000, 8000]);
        assert_eq!(backoff_ms(500, 0), 500, "a first delivery");
        assert_eq!(backoff_ms(500, 9), 60_000);
        assert_eq!(backoff_ms(500, u32::MAX), 60_000);
        assert_eq!(backoff_ms(0, 3), 0);
    }

    /// Each call names its shard's keys in the script's order, and its
    /// arguments by position as the script reads them.
    #[test]
    fn calls_match_the_scripts() {
        let l = layout();
        let c = Call::lease_acquire(&l, 3, "tok", 5000, false);
        assert_eq!((c.keys, c.args), (vec!["spillway:{s3}:lease".to_owned(), "spillway:{s3}:fence".to_owned()], vec!["tok".to_owned(), "5000".to_owned(), "0".to_owned()]));
        assert_eq!(Call::lease_acquire(&l, 3, "tok", 5000, true).args[2], "1");
        let limits = BatchLimits { count: 10, bytes: 4096, max_attempts: 5, lease_ttl_ms: 5000, retention_ms: 60_000 };
        let r = Call::read_batch(&l, 3, "tok", limits, None);
        assert_eq!(r.args, ["tok", GROUP, CONSUMER, "10", "5", "5000", "60000", "", "4096", "500"]);
        assert!(r.keys.iter().all(|k| k.starts_with("spillway:{s3}:")), "one hash slot");
        assert_eq!(Call::read_batch(&l, 3, "tok", limits, Some("1-0")).args[7], "1-0");
        let ack = Call::ack(&l, 1, 0, (2, 0), 30, [("1-0", None, true), ("20-1", Some("acme"), true), ("1-2", None, true), ("2-0", None, false)]);
        assert_eq!(
            ack.args,
            [GROUP, "2", "0", "3", "delay_le_10", "1", "delay_le_50", "2", "delay_sum_ms", "68", "", "3", "1-0", "1-2", "2-0", "acme", "1", "20-1"],
            "delays per bucket (29, 10 and 29 ms; none for the dead letter), then the entries grouped by tenant, in order within each"
        );
        assert_eq!(ack.keys[4], l.tenants(0));
        assert_eq!(Call::dead_letter(&l, 1, 0, 9, &[]), None);
        let d = DeadLetter { entry: "1-0".into(), payload: "{}".into(), error: String::new(), attempts: String::new(), tenant: Some("acme".into()) };
        assert_eq!(Call::dead_letter(&l, 1, 0, 9, &[d]).unwrap().args, [GROUP, "1", "9", "1-0", "{}", "", "", "acme"]);
        assert_eq!(Call::record_error(&l, 1, "why", ["1-0".to_owned()]).keys, ["spillway:{s1}:attempts", "spillway:{s1}:stats"]);
        assert_eq!(Call::lease_release(&l, 2, "tok", 0, 0).args, ["tok", "0", "0"]);
        assert_eq!(Call::lease_release(&l, 2, "tok", 900, 400).args, ["tok", "900", "400"]);
        let released = Call::release_empty(&l, [(2, "a"), (5, "b")]);
        assert_eq!(released.keys, [l.lease(2), l.watch(2), l.bell(2), l.lease(5), l.watch(5), l.bell(5)]);
        assert_eq!(released.args, ["a", "b"]);
        let c = Call::claimable(&l, &[1, 2], false);
        assert_eq!((c.keys.len(), c.args), (8, vec!["0".to_owned(), "500".to_owned(), "1".to_owned(), "2".to_owned()]));
        assert_eq!(c.keys[4..], [l.stream(2), l.lease(2), l.sched(2), l.alarm(2)]);
        assert_eq!(Call::claimable(&l, &[1], true).args, ["1", "500", "1"]);
        let cancel = Call::cancel(&l, 5, 0, "1796317200000-1000042123456", 9).unwrap();
        assert_eq!(cancel.args, ["1796317200000", "0001000042123456", "9", "1796317200000-1000042123456"]);
        assert_eq!(Call::scheduled(&l, 5, "17-42").unwrap().args, ["17", "0000000000000042"]);
        assert_eq!(Call::scheduled(&l, 5, "17-12345678901234567"), None);
        assert_eq!(Call::replay(&l, 4, 0, 5000, 9, 77, ["4-1-0".to_owned()]).args, ["77", "5000", "4", "9", "4-1-0"]);
        assert_eq!(Call::purge(&l, 4, 9, []).args, ["4", "9"]);
        let f = Call::fill_begin(&l, "k", "tok", 100);
        assert_eq!((f.keys, f.args), (vec![l.fill_lock("k")], vec!["tok".to_owned(), "100".to_owned()]));
        assert_eq!(Call::unlock(vec![l.fill_lock("k")], "tok").args, ["tok"]);
        assert_eq!(Call::cache_count(&l, 2, 1).keys, [l.cache_stats()]);
        assert_eq!(Call::mark_round(&l, &[1, 2], 60_000).keys, [l.applying(1), l.applying(2)]);
        let m = Call::mark_call(&l, 1, "tok", 5000, 60_000, &["1-0".into()], &["2-0".into(), "3-0".into()]);
        assert_eq!(m.args, ["tok", "5000", "60000", "1", "1-0", "2-0", "3-0"]);
        let (a, b) = ("a".to_owned(), "b".to_owned());
        let (sa, sb) = (l.shard_of(&a), l.shard_of(&b));
        let leased = Call::locks_leased(&l, &[(sa, "ta"), (sb, "tb")], &[&a, &b], "me", 5000);
        assert_eq!(leased.keys, [l.lease(sa), l.lease(sb), l.fill_lock("a"), l.fill_lock("b")]);
        assert_eq!(leased.args[..5], ["2", "me", "5000", "ta", "tb"]);
        assert_eq!(leased.args[5], "1", "a's lease is the first");
        let answered = [("unavailable".to_owned(), 2)];
        let limits = EnqueueLimits {
            idempotency: Some(("k", "md5")),
            idempotency_ttl_secs: 60,
            queue_depth_limit: 10,
            bell_ttl_ms: 5000,
            seq_start: 77,
            scheduled_limit: 8,
            retention_ms: 9,
            past_ms: 60_000,
            answered: &answered,
            doorbell: "spillway:doorbell",
        };
        let q = |shard: u32, timing: Timing, payload: &str| Queued { shard, key: "k\"", timing, payload: payload.into(), tenant: None };
        let scheduled = Timing { due: Some(Due::After(5)), ttl_ms: Some(9) };
        let acme = Queued { tenant: Some("acme"), ..q(3, scheduled, "w2") };
        let quota = |t: &str| (Quota { rate: t.len() as u64, burst: 2, depth: 3 }, 7);
        let e = Call::enqueue(&l, &[3, 7], 3, limits, &[q(7, Timing::default(), "w1"), q(9, Timing::default(), "elsewhere"), acme], quota);
        assert_eq!(e.keys.len(), 17);
        assert_eq!(e.keys[0], l.idempotency(3, "k"));
        assert_eq!(e.keys[8..15], [l.stream(7), l.bell(7), l.lease(7), l.stats(7), l.sched(7), l.sched_writes(7), l.alarm(7)]);
        assert_eq!(e.keys[15..], [l.tenants(3), l.bucket(3, "acme")]);
        assert_eq!(
            e.args,
            ["1", "md5", "60", "10", "5000", "77", "8", "500", "9", "60000", "2", "3", "7", "2", "2", "", "", "w1", "0", "1", "d5", r#"9:"k\"""#, "w2", "1", "1", "acme", "4", "2", "3", "7", "1", "unavailable", "2", "spillway:doorbell"]
        );
        let plain = Call::enqueue(&l, &[3], 3, EnqueueLimits { idempotency: None, ..limits }, &[q(3, Timing::default(), "w")], quota);
        assert_eq!((plain.keys[0].clone(), &plain.args[..2]), (l.idempotency(3, ""), &["0".to_owned(), String::new()][..]));
    }
}
