//! Draining shards in rounds: the lease (lock) protocol, batch reads through the
//! consumer group, one transaction per round, cache refresh, acknowledgement, and
//! the no-lost-wake-up handshake with the doorbell flag.
//!
//! Read-your-writes rests on the order of the last three steps: the cache is
//! refreshed (under each key's fill lock) before the batch's entries are
//! acknowledged, and a write's status reads `applied` only once its entry has left
//! the stream (see the cache component). So whoever has seen `applied` with version
//! v reads v or newer from the cache.

use std::collections::{BTreeMap, HashMap, HashSet};

use spillway_core::apply::Record;
use spillway_core::layout::{FILL_LOCK_TTL_MS, GROUP};
use spillway_core::problem::Problem;
use spillway_core::reply::{self, BatchRead, Grant};
use spillway_core::record::RecordDoc;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::db::Db;
use spillway_spin::kv::Kv;
use spillway_spin::{Redis, int, token};

use crate::db::{self, Batch};
use crate::lease::Lease;

/// How often a drain looks for more shards with work while it runs.
const RESCAN_MS: u64 = 100;

/// What a drain did.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
    pub(crate) batches: u64,
    pub(crate) busy: Vec<u32>,
    /// Shards left with work when the drain's time budget ran out, handed to a
    /// fresh invocation (rung again).
    pub(crate) handed_on: Vec<u32>,
}

/// Which shards one invocation drains.
pub(crate) enum Scope {
    /// Only this shard (`POST /v1/drain?shard=n`).
    Only(u32),
    /// This shard, if any, and every shard with queued writes and no lease holder,
    /// looked up again every [`RESCAN_MS`] while the drain runs.
    Claimable(Option<u32>),
}

/// A shard whose lease this drain holds, and where its reading stands.
#[derive(Clone)]
struct Held {
    lease: Lease,
    /// The doorbell flag was cleared after an empty read (see [`drain`]).
    cleared: bool,
    /// While resuming (`Some`), the pending entries a previous holder left are read
    /// from this id on, in order; once they are exhausted (`None`), the pending
    /// entries are our own batches in flight and reads take only new entries.
    resume: Option<String>,
}

impl std::ops::Deref for Held {
    type Target = Lease;

    fn deref(&self) -> &Lease {
        &self.lease
    }
}

/// What one read of a held shard gave.
enum Read {
    /// The lease was lost: the new holder carries on.
    Lost,
    /// A batch (possibly empty), and where resuming goes on (see [`Held`]).
    Batch(Batch, Option<String>),
}

/// Drains shards in rounds. Spin hands a Redis trigger's messages to the component
/// one at a time, so one invocation answering only its own shard would leave the
/// others waiting behind it; instead each round reads one batch from every shard
/// held (concurrently), applies them all in ONE database transaction (one disk sync
/// for all), refreshes the cache once for all, and acknowledges each. Shards join
/// as their leases are won and leave when empty. While a round is applied, the next
/// batch of each shard that filled its batch is already being read.
///
/// The doorbell handshake, per shard: on an empty read the flag is cleared and the
/// shard read once more (a write added before the clear is seen; one added after
/// rings again); on a second empty read the lease is released, and if the flag is
/// set again by then (a ring that found the lease held) the shard is taken again.
///
/// Returns the failures, per shard (`None`: finding the shards with work failed).
pub(crate) async fn drain(s: &Settings, db: &Db, scope: Scope, stats: &mut Stats) -> Vec<(Option<u32>, Problem)> {
    let l = &s.layout;
    let (mut wanted, rescan) = match scope {
        Scope::Only(shard) => (vec![shard], false),
        Scope::Claimable(first) => (first.into_iter().collect::<Vec<_>>(), true),
    };
    let explicit: Vec<u32> = wanted.clone();
    let mut held: Vec<Held> = Vec::new();
    let mut failures = Vec::new();
    // A shard that failed is not taken again in this invocation: its watch retries
    // it after a lease TTL, and its attempts are not burnt in a tight loop.
    let mut failed: HashSet<u32> = HashSet::new();
    let mut scanned_at = 0;
    let mut prefetched: HashMap<u32, Result<Read, Problem>> = HashMap::new();
    let deadline = (s.drain_budget_secs > 0).then(|| spillway_spin::monotonic_ms() + s.drain_budget_secs.saturating_mul(1000));
    loop {
        if deadline.is_some_and(|d| spillway_spin::monotonic_ms() >= d) && !held.is_empty() {
            // Out of time (a hosted platform ends a request at 30 s): release the
            // shards and ring again, so a fresh invocation carries on. Entries
            // read ahead stay pending: the next holder resumes them first.
            // Released with a retry: should the ring below be lost, the shard's
            // watch expires one lease TTL from now and resumes it.
            for h in held.drain(..) {
                release(s, &h, true).await;
                stats.handed_on.push(h.shard);
            }
            eprintln!("{}", serde_json::json!({"event": "handed_on", "shards": stats.handed_on, "budget_secs": s.drain_budget_secs}));
            spillway_spin::ring(s, &stats.handed_on).await;
            return failures;
        }
        if rescan && (held.is_empty() || spillway_spin::monotonic_ms() >= scanned_at + RESCAN_MS) {
            scanned_at = spillway_spin::monotonic_ms();
            match claimable(s).await {
                Ok(found) => wanted.extend(found),
                Err(p) if held.is_empty() && wanted.is_empty() => failures.push((None, p)),
                Err(_) => {}
            }
        }
        for shard in std::mem::take(&mut wanted) {
            if failed.contains(&shard) || held.iter().any(|h| h.shard == shard) {
                continue;
            }
            match acquire(s, shard).await {
                Ok(Some(h)) => held.push(h),
                Ok(None) if explicit.contains(&shard) => stats.busy.push(shard),
                Ok(None) => {}
                Err(p) => failures.push((Some(shard), p)),
            }
        }
        if held.is_empty() {
            return failures;
        }

        let fresh: Vec<Held> = held.iter().filter(|h| !prefetched.contains_key(&h.shard)).cloned().collect();
        let mut reads: HashMap<u32, Result<Read, Problem>> = fresh.iter().map(|h| h.shard).zip(futures::future::join_all(fresh.iter().map(|h| read_batch(s, h))).await).collect();
        reads.extend(prefetched.drain());
        let mut batches = Vec::new();
        let mut keep = Vec::new();
        for mut h in held.drain(..) {
            match reads.remove(&h.shard).unwrap_or(Ok(Read::Lost)) {
                Err(p) => {
                    release(s, &h, true).await;
                    failed.insert(h.shard);
                    failures.push((Some(h.shard), p));
                }
                Ok(Read::Lost) => {}
                // Still resuming (every entry of this pending batch had gone).
                Ok(Read::Batch(b, Some(cursor))) if b.entries.is_empty() => {
                    h.resume = Some(cursor);
                    keep.push(h);
                }
                Ok(Read::Batch(b, None)) if b.entries.is_empty() => {
                    h.resume = None;
                    if !h.cleared {
                        if let Err(p) = Redis::for_shard(s, h.shard).execute("DEL", vec![spillway_spin::bin(&l.bell(h.shard))]).await {
                            failures.push((Some(h.shard), p));
                        }
                        h.cleared = true;
                        keep.push(h);
                    } else {
                        release(s, &h, false).await;
                        let rung = Redis::for_shard(s, h.shard).execute("EXISTS", vec![spillway_spin::bin(&l.bell(h.shard))]).await;
                        if rung.ok().and_then(|r| r.first().and_then(int)).unwrap_or(0) > 0 {
                            wanted.push(h.shard);
                        }
                    }
                }
                Ok(Read::Batch(b, resume)) => {
                    h.cleared = false;
                    h.resume = resume;
                    batches.push(b);
                    keep.push(h);
                }
            }
        }
        held = keep;
        if batches.is_empty() {
            continue;
        }
        // Shards that filled their batch of new entries most likely have more: read
        // their next batch while this round is applied (not while resuming: the
        // pending entries must all come first, in order).
        // Nor in a careful round: a read then could drop the blame marker (see
        // `scripts::READ_BATCH`) between its setting and the call it marks.
        let careful = batches.iter().any(|b| b.careful);
        let ahead: Vec<Held> = held
            .iter()
            .filter(|h| !careful && h.resume.is_none() && batches.iter().any(|b| b.shard == h.shard && b.entries.len() >= s.batch_size))
            .cloned()
            .collect();
        let round = finish_round(s, db, &batches, &mut held, &mut failed, &mut failures, stats);
        let next = futures::future::join_all(ahead.iter().map(|h| read_batch(s, h)));
        let ((), next) = futures::future::join(round, next).await;
        // A shard that left in this round (failed, fenced) leaves its read-ahead in
        // the stream's pending list, for the next holder.
        prefetched = ahead.iter().map(|h| h.shard).zip(next).filter(|(shard, _)| held.iter().any(|h| h.shard == *shard)).collect();
    }
}

/// Applies a round's batches in one transaction, refreshes the cache and
/// acknowledges; shards whose batch failed (or was fenced) leave `held`.
#[allow(clippy::too_many_arguments, reason = "the drain's state, borrowed for one round")]
async fn finish_round(
    s: &Settings,
    db: &Db,
    batches: &[Batch],
    held: &mut Vec<Held>,
    failed: &mut HashSet<u32>,
    failures: &mut Vec<(Option<u32>, Problem)>,
    stats: &mut Stats,
) {
    let l = &s.layout;
    let started = spillway_spin::monotonic_ms();
    let (applied, errors) = db::apply_round(s, db, batches).await;
    let apply_ms = spillway_spin::monotonic_ms() - started;
    for (shard, p) in &errors {
        if let Some(b) = batches.iter().find(|b| b.shard == *shard) {
            log_failure(b, "apply", p.cause_or_detail());
        }
    }
    for (shard, p) in errors {
        let ids = batches.iter().filter(|b| b.shard == shard).flat_map(|b| b.entries.iter().map(|(id, _)| id.clone()));
        // What the write's status and dead letter will say: the safe message (the
        // backend's own text is in the log line above).
        let mut args = vec![p.detail.clone()];
        args.extend(ids);
        spillway_spin::log_ignored("recording a batch's failure", Redis::for_shard(s, shard).eval(scripts::RECORD_ERROR, &[l.attempts(shard), l.stats(shard)], &args).await);
        drop_held(s, held, shard, true).await;
        failed.insert(shard);
        failures.push((Some(shard), p));
    }
    // Fenced: a newer holder has written; these entries are its now.
    held.retain(|h| !applied.fenced.contains(&h.shard));
    let owners: Vec<&Held> = held.iter().filter(|h| batches.iter().any(|b| b.shard == h.shard)).collect();
    let refresh_started = spillway_spin::monotonic_ms();
    let refreshed = refresh_cache(s, &applied.state, &owners).await;
    let cache_ms = spillway_spin::monotonic_ms() - refresh_started;
    let done: Vec<&Batch> = batches.iter().filter(|b| owners.iter().any(|h| h.shard == b.shard)).collect();
    let lost = match refreshed {
        Ok(lost) => lost,
        Err(p) => {
            // Committed, not acknowledged: redelivered later, found applied, and
            // refreshed then.
            for b in &done {
                log_failure(b, "cache", p.cause_or_detail());
                // What the write's status and dead letter will say: the safe message (the
        // backend's own text is in the log line above).
        let mut args = vec![p.detail.clone()];
                args.extend(b.entries.iter().map(|(id, _)| id.clone()));
                spillway_spin::log_ignored("recording a batch's failure", Redis::for_shard(s, b.shard).eval(scripts::RECORD_ERROR, &[l.attempts(b.shard), l.stats(b.shard)], &args).await);
                drop_held(s, held, b.shard, true).await;
                failed.insert(b.shard);
                failures.push((Some(b.shard), p.clone()));
            }
            return;
        }
    };
    // Lease lost during the refresh: the new holder redelivers and refreshes.
    held.retain(|h| !lost.contains(&h.shard));
    let done: Vec<&Batch> = done.into_iter().filter(|b| !lost.contains(&b.shard)).collect();
    // Writes past their attempt limit that the database does not have: out of the
    // stream to the dead letters (before the batch's acknowledgement, which would
    // forget their errors).
    let mut undead = HashSet::new();
    for b in &done {
        let mut args = vec![GROUP.to_owned(), b.shard.to_string(), s.status_retention_secs.saturating_mul(1000).to_string()];
        for d in applied.dead.iter().filter(|d| d.shard == b.shard) {
            args.extend([d.entry.clone(), d.payload.clone(), d.error.clone(), d.attempts.clone()]);
        }
        if args.len() > 3 {
            let keys = [l.stream(b.shard), l.attempts(b.shard), l.dead(b.shard), l.dead_status_prefix(b.shard), l.done(b.shard), l.stats(b.shard)];
            if let Err(p) = Redis::for_shard(s, b.shard).eval(scripts::DEAD_LETTER, &keys, &args).await {
                log_failure(b, "dead-letter", p.cause_or_detail());
                // Not acknowledged either (that would drop them): redelivered later.
                undead.insert(b.shard);
                failures.push((Some(b.shard), p));
            }
        }
    }
    for shard in &undead {
        drop_held(s, held, *shard, true).await;
        failed.insert(*shard);
    }
    let done: Vec<&Batch> = done.into_iter().filter(|b| !undead.contains(&b.shard)).collect();
    let acks = done.iter().map(|b| {
        let (new_applied, new_rejected) = applied.per_shard.get(&b.shard).copied().unwrap_or_default();
        let mut args = vec![GROUP.to_owned(), new_applied.to_string(), new_rejected.to_string()];
        args.extend(b.entries.iter().map(|(id, _)| id.clone()));
        let keys = [l.stream(b.shard), l.attempts(b.shard), l.done(b.shard), l.stats(b.shard)];
        async move {
            let started = spillway_spin::monotonic_ms();
            let r = Redis::for_shard(s, b.shard).eval(scripts::ACK, &keys, &args).await;
            (b, r, spillway_spin::monotonic_ms() - started)
        }
    });
    for (b, r, ack_ms) in futures::future::join_all(acks).await {
        let shard = b.shard;
        match &r {
            Ok(_) => {
                let (new_applied, new_rejected) = applied.per_shard.get(&shard).copied().unwrap_or_default();
                log_batch(b, new_applied, new_rejected, [b.read_ms, apply_ms, cache_ms, ack_ms]);
            }
            Err(p) => log_failure(b, "ack", p.cause_or_detail()),
        }
        if let Err(p) = r {
            // Applied but still pending: this tenure reads only new entries, so
            // let the watch's retry start a tenure that resumes them.
            drop_held(s, held, shard, true).await;
            failed.insert(shard);
            failures.push((Some(shard), p));
        }
    }
    stats.applied += applied.applied;
    stats.rejected += applied.rejected;
    stats.batches += done.len() as u64;
}

/// One JSON line on stderr (where Spin collects a component's logs) per applied
/// batch: shard, fencing token, writes, new outcomes, first and last write id, and
/// how long each step took (the apply and cache steps are the round's, shared by
/// the shards in it).
fn log_batch(b: &Batch, applied: u64, rejected: u64, [read_ms, apply_ms, cache_ms, ack_ms]: [u64; 4]) {
    let line = serde_json::json!({
        "event": "batch", "shard": b.shard, "fence": b.fence, "writes": b.entries.len(),
        "applied": applied, "rejected": rejected,
        "first": b.entries.first().map(|(id, _)| format!("{}-{id}", b.shard)),
        "last": b.entries.last().map(|(id, _)| format!("{}-{id}", b.shard)),
        "ms": {"read": read_ms, "apply": apply_ms, "cache": cache_ms, "ack": ack_ms},
    });
    eprintln!("{line}");
}

/// One JSON line on stderr per failed batch: which step failed and why.
fn log_failure(b: &Batch, step: &str, error: &str) {
    let line = serde_json::json!({
        "event": "batch_failed", "shard": b.shard, "fence": b.fence, "writes": b.entries.len(), "step": step,
        "first": b.entries.first().map(|(id, _)| format!("{}-{id}", b.shard)),
        "last": b.entries.last().map(|(id, _)| format!("{}-{id}", b.shard)),
        "error": error,
    });
    eprintln!("{line}");
}

/// Shards with queued writes and no lease holder: one call per server (per
/// shard with `redis_cluster`), all at once.
pub(crate) async fn claimable(s: &Settings) -> Result<Vec<u32>, Problem> {
    let l = &s.layout;
    let all: Vec<u32> = (0..l.shards).collect();
    let calls = s.slot_groups(&all).into_iter().map(|(address, group)| async move {
        let keys: Vec<String> = group.iter().flat_map(|n| [l.stream(*n), l.lease(*n)]).collect();
        let args: Vec<String> = group.iter().map(u32::to_string).collect();
        Redis::new(address).eval(scripts::CLAIMABLE, &keys, &args).await
    });
    let mut out = Vec::new();
    for reply in futures::future::join_all(calls).await {
        out.extend(reply::claimable(&spillway_spin::redis::values(&reply?)).map_err(|e| spillway_spin::backend_failed("Redis (a shard's server)", &e.to_string()))?);
    }
    Ok(out)
}

/// Takes the shard's lease, unless another processor holds it; a fresh holder
/// resumes the pending entries a previous one left, from the start.
async fn acquire(s: &Settings, shard: u32) -> Result<Option<Held>, Problem> {
    Ok(Lease::acquire(s, shard).await?.map(|lease| Held { lease, cleared: false, resume: Some("0".into()) }))
}

async fn release(s: &Settings, h: &Held, retry: bool) {
    h.lease.release(s, retry).await;
}

async fn drop_held(s: &Settings, held: &mut Vec<Held>, shard: u32, retry: bool) {
    if let Some(i) = held.iter().position(|h| h.shard == shard) {
        let h = held.remove(i);
        release(s, &h, retry).await;
    }
}

/// The next batch of a held shard (renewing its lease).
async fn read_batch(s: &Settings, h: &Held) -> Result<Read, Problem> {
    let started = spillway_spin::monotonic_ms();
    let BatchRead::Batch { prune_before_ms, cursor, entries: read } = h.lease.read_batch(s, h.resume.as_deref()).await? else {
        return Ok(Read::Lost);
    };
    let mut entries = Vec::with_capacity(read.len());
    let mut over = HashSet::new();
    for e in read {
        if e.attempt > i64::from(s.max_attempts) {
            over.insert(e.id.clone());
        }
        entries.push((e.id, e.payload));
    }
    let read_ms = spillway_spin::monotonic_ms() - started;
    // Pending entries read again (a cursor) are a redelivery.
    let careful = cursor.is_some() && !entries.is_empty();
    let batch = Batch { shard: h.shard, fence: h.fence, entries, over, careful, token: h.token.clone(), prune_before_ms, read_ms };
    Ok(Read::Batch(batch, cursor))
}

/// Writes the records' new state to the cache under each key's single-flight fill
/// lock, so a concurrent cache fill cannot put an older value back afterwards: the
/// locks in one script call (taken only while the key's shard lease is still ours,
/// so a holder that lost its lease cannot write after the new one, and renewing
/// the leases while it waits for busy locks), the values in
/// one `set-many` (one transaction on Spin's SQLite store) and the deletions in one
/// `delete-many`. Returns the shards whose lease was lost: their keys were not
/// written, and their batches must not be acknowledged (the new holder refreshes).
async fn refresh_cache(
    s: &Settings,
    state: &BTreeMap<String, Option<Record>>,
    owners: &[&Held],
) -> Result<HashSet<u32>, Problem> {
    let l = &s.layout;
    let kv = Kv::open_default()?;
    let me = token();
    let mut lost = HashSet::new();
    let mut pending: Vec<&String> = state.keys().collect();
    // Wait out a lock's whole TTL: a holder that died (a reader, or a processor
    // killed mid-refresh) leaves its locks until they expire. Our own refresh locks
    // live as long as the lease, so a dead processor's do not outlast its lease.
    let give_up = spillway_spin::monotonic_ms() + FILL_LOCK_TTL_MS.max(s.lease_ttl_ms) + 500;
    let owned: Vec<u32> = owners.iter().map(|h| h.shard).collect();
    // One call per server (per shard with `redis_cluster`): its shards' leases and
    // the fill locks of their keys (a fill lock is in its key's shard).
    let groups = s.slot_groups(&owned);
    loop {
        // A key of a shard this drain does not hold (any more) is the holder's.
        for key in &pending {
            let shard = l.shard_of(key);
            if !owned.contains(&shard) {
                lost.insert(shard);
            }
        }
        pending.retain(|k| owned.contains(&l.shard_of(k)));
        if pending.is_empty() {
            return Ok(lost);
        }
        if spillway_spin::monotonic_ms() > give_up {
            return Err(Problem::unavailable("cache fill locks stayed busy; the batch will be retried"));
        }
        let calls: Vec<LockCall<'_>> = groups
            .iter()
            .filter_map(|(address, group)| {
                let mine: Vec<&String> = pending.iter().copied().filter(|k| group.contains(&l.shard_of(k))).collect();
                if mine.is_empty() {
                    return None;
                }
                let leases: Vec<&&Held> = owners.iter().filter(|h| group.contains(&h.shard)).collect();
                let mut keys: Vec<String> = leases.iter().map(|h| l.lease(h.shard)).collect();
                keys.extend(mine.iter().map(|k| l.fill_lock(k)));
                let mut args = vec![leases.len().to_string(), me.clone(), s.lease_ttl_ms.to_string()];
                args.extend(leases.iter().map(|h| h.token.clone()));
                for key in &mine {
                    let shard = l.shard_of(key);
                    args.push(leases.iter().position(|h| h.shard == shard).map_or(0, |i| i + 1).to_string());
                }
                Some((*address, mine, keys, args))
            })
            .collect();
        let replies = futures::future::join_all(calls.iter().map(|(address, _, keys, args)| async move {
            Redis::new(address).eval(scripts::LOCKS_ACQUIRE_LEASED, keys, args).await
        }))
        .await;
        let mut held: Vec<(&str, Vec<String>)> = Vec::new();
        let mut sets = Vec::new();
        let mut deletes = Vec::new();
        let mut waiting = Vec::new();
        for ((address, mine, _, _), got) in calls.iter().zip(replies) {
            let grants = Grant::parse_all(&spillway_spin::redis::values(&got?), mine.len())
                .map_err(|e| spillway_spin::backend_failed("Redis (a shard's server)", &e.to_string()))?;
            let mut taken = Vec::new();
            for (key, grant) in mine.iter().zip(grants) {
                match grant {
                    Grant::Taken => {}
                    Grant::LeaseLost => {
                        lost.insert(l.shard_of(key));
                        continue;
                    }
                    Grant::Busy => {
                        waiting.push(*key);
                        continue;
                    }
                }
                taken.push(l.fill_lock(key));
                match &state[*key] {
                    Some(r) => sets.push((l.cache_key(key), cache_entry(key, r).into_bytes())),
                    None => deletes.push(l.cache_key(key)),
                }
            }
            if !taken.is_empty() {
                held.push((address, taken));
            }
        }
        let written = async {
            kv.set_many(sets)?;
            kv.delete_many(deletes)
        }
        .await;
        let released = futures::future::join_all(
            held.iter().map(|(address, locks)| async { Redis::new(address).eval(scripts::LOCKS_RELEASE, locks, std::slice::from_ref(&me)).await }),
        )
        .await;
        for r in released {
            r?;
        }
        written?;
        pending = waiting.into_iter().filter(|k| !lost.contains(&l.shard_of(k))).collect();
        if !pending.is_empty() {
            spillway_spin::wait_ms(5).await;
        }
    }
}

/// One `LOCKS_ACQUIRE_LEASED` call of a refresh: the server, its keys (in the
/// order of the locks), and the script's keys and arguments.
type LockCall<'a> = (&'a str, Vec<&'a String>, Vec<String>, Vec<String>);

/// The cache's JSON for a record (what `GET /v1/records/{key}` answers).
fn cache_entry(key: &str, r: &Record) -> String {
    RecordDoc { etag: r.etag.clone(), key: key.to_owned(), updated_at: r.updated_at, value: r.value.clone(), version: r.version as i64 }.to_text()
}
