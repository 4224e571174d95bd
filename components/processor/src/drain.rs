//! Draining shards in rounds: the lease (lock) protocol, batch reads through the
//! consumer group, one transaction per round, cache refresh, acknowledgement, and
//! the no-lost-wake-up handshake with the doorbell flag.
//!
//! Read-your-writes rests on the order of the last three steps: the cache is
//! refreshed (under each key's fill lock) before the batch's entries are
//! acknowledged, and a write's status reads `applied` only once its entry has left
//! the stream (see the cache component). So whoever has seen `applied` with version
//! v reads v or newer from the cache.
//!
//! A round's refresh and acknowledgement run beside the next round's read and
//! commit, never beside a commit of one of its own keys, and the rounds'
//! refreshes run in order: a key's cache entries are written in the order of
//! its commits, so a fill that read a newer commit is never overwritten by an
//! older refresh.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::channel::oneshot;
use spillway_core::apply::Record;
use spillway_core::call::{Call, DeadLetter};
use spillway_core::layout::{FILL_LOCK_TTL_MS, WriteId};
use spillway_core::problem::Problem;
use spillway_core::reply::{self, BatchRead, Grant};
use spillway_core::record::RecordDoc;
use spillway_core::settings::Settings;
use spillway_spin::db::Db;
use spillway_spin::kv::CacheWriter;
use spillway_spin::mirror::{Mirrored, mirror};
use spillway_spin::{Redis, int, token};

use crate::db::{self, Batch};
use crate::lease::{Lease, Then};

/// How often a drain looks for more shards with work while it runs.
const RESCAN_MS: u64 = 100;

/// How often a drain with nothing to apply looks again while it waits for a
/// scheduled write due within the alarm's lead (`schedule::ALARM_LEAD_MS`):
/// also how long a doorbell of another shard may wait behind it.
const WAIT_STEP_MS: u64 = 10;

/// With `node_name`: how long a shard beyond a drain's share may stay
/// claimable (seen so by its scans) before the drain takes it anyway. Spin
/// hands a trigger's messages to a component one at a time, so the doorbell of
/// a shard no node took waits behind each node's running drain: its scans
/// are what take it then.
const BEYOND_SHARE_AFTER_MS: u64 = 500;

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
    /// The delivery count of the latest batch read (see [`Batch::attempt`]).
    attempt: u32,
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
/// batch of each of its shards is already being read (of a shard that filled its
/// batch at once, of the others once the round's writes are planned), and the last
/// round's cache refresh and acknowledgement (its [`Tail`]) still run: a write
/// that arrives while a large round is applied waits for that commit, not for
/// its whole round.
///
/// The doorbell handshake, per shard: on an empty read the flag is cleared and the
/// shard read once more (a write added before the clear is seen; one added after
/// rings again); on a second empty read the lease is released, and if the flag is
/// set again by then (a ring that found the lease held) the shard is taken again.
///
/// A shard whose batch failed backs off before its next delivery (see
/// `call::backoff_ms`): no doorbell or scan takes it until then, only an
/// operator's drain (`by_operator`).
///
/// Returns the failures, per shard (`None`: finding the shards with work failed).
pub(crate) async fn drain(s: &Settings, db: &Db, scope: Scope, by_operator: bool, stats: &mut Stats) -> Vec<(Option<u32>, Problem)> {
    let (wanted, rescan) = match scope {
        Scope::Only(shard) => (vec![shard], false),
        Scope::Claimable(first) => (first.into_iter().collect::<Vec<_>>(), true),
    };
    let mut d = Drain {
        s,
        db,
        by_operator,
        explicit: wanted.clone(),
        wanted,
        held: Vec::new(),
        emptying: Vec::new(),
        failed: HashSet::new(),
        unreachable: HashSet::new(),
        failures: Vec::new(),
        stats,
        share: Share { of: usize::MAX, read_at: None, passed_over: HashMap::new(), shrunk: false, shedding: HashSet::new() },
        due_in_ms: None,
    };
    // WASI's monotonic clock starts near zero with each instance: the
    // first round with batches looks for rung shards whenever it comes, not
    // once the instance is older than a step.
    let (mut scanned_at, mut probed_at): (u64, Option<u64>) = (0, None);
    let mut prefetched: HashMap<u32, Result<Read, Problem>> = HashMap::new();
    let deadline = (s.drain_budget_secs > 0).then(|| spillway_spin::monotonic_ms() + s.drain_budget_secs.saturating_mul(1000));
    let out_of_time = || deadline.is_some_and(|t| spillway_spin::monotonic_ms() >= t);
    // The last round's tail, running beside this round's read and commit.
    let mut behind = Behind::default();
    loop {
        // A statement ran out of time: this connection runs nothing more, and
        // taking more shards would only burn their writes' attempts. Their
        // watches resume them on a fresh invocation.
        if db.abandoned() {
            d.catch_up(&mut behind).await;
            for h in std::mem::take(&mut d.held) {
                h.lease.release(s, Then::BackOff { attempt: h.attempt }).await;
            }
            return d.failures;
        }
        // A batch read ahead before the time was up is applied first (handed
        // on, it would be delivered again, and counted as a second attempt),
        // in one last round that takes no more shards.
        let out_of_time_now = out_of_time();
        if out_of_time_now && !d.held.is_empty() && prefetched.is_empty() {
            d.catch_up(&mut behind).await;
            d.hand_on().await;
            return d.failures;
        }
        let last_round = out_of_time_now && !prefetched.is_empty();
        if !last_round && rescan && (d.held.is_empty() || spillway_spin::monotonic_ms() >= scanned_at + RESCAN_MS) {
            scanned_at = spillway_spin::monotonic_ms();
            behind.beside(d.scan()).await;
            if d.share.shrunk {
                // Shedding lets leases go: not one whose round is still
                // being acknowledged.
                d.catch_up(&mut behind).await;
                d.shed(&prefetched).await;
            }
        }
        // A shard that left meanwhile (a tail settled above found its lease
        // lost) leaves its read-ahead behind: taken again, it is a new tenure,
        // which resumes its pending entries first.
        prefetched.retain(|shard, _| d.held.iter().any(|h| h.shard == *shard));
        if !last_round {
            behind.beside(d.take_wanted()).await;
        }
        if d.held.is_empty() {
            d.catch_up(&mut behind).await;
            if !d.held.is_empty() {
                continue;
            }
            // Nothing to apply, but a scheduled write due within the lead:
            // wait for it (looking again every step for other work), so that
            // it is applied on time whatever the alarm's own lateness.
            match d.due_in_ms.take().filter(|_| rescan) {
                Some(ms) => spillway_spin::wait_ms(ms.clamp(1, WAIT_STEP_MS)).await,
                None => return d.failures,
            }
            continue;
        }
        // A shard is let go after two empty reads in a row (see `empty`), so
        // never while the tail of its last batch runs: that tail is the last
        // round's, settled before this round's tail starts.
        let batches = behind.beside(d.read(std::mem::take(&mut prefetched))).await;
        if batches.is_empty() {
            d.catch_up(&mut behind).await;
            continue;
        }
        // A key of this round whose last round's cache refresh has not run
        // yet: that refresh must come first (a cache fill meanwhile could read
        // this round's commit, and the refresh then write an older value).
        if let Some(tail_keys) = behind.keys() && batches.iter().any(|b| b.keys().any(|k| tail_keys.contains(k))) {
            d.catch_up(&mut behind).await;
        }
        // Each shard's next batch is read while this round is applied: at once
        // for a shard that filled its batch of new entries (it most likely has
        // more), and for the others once the round's writes are planned, beside
        // their writing and the commit, so that a write that arrived during the
        // plan is read by the time the round commits and applied in the next
        // round. Not while resuming: the pending entries must all come first,
        // in order. Nor once the drain's time is up: it hands its shards on
        // with nothing read ahead (see `Drain::hand_on`).
        // Nor in a careful round: a read then could drop the blame marker (see
        // `scripts::READ_BATCH`) between its setting and the call it marks.
        let careful = batches.iter().any(|b| b.careful);
        // Nor beside the last round's tail: a step that traps ends the
        // instance, and a redelivery must find this round's entries first
        // in the pending list (its blame marker is the holder's), not the
        // last round's still unacknowledged.
        if careful {
            d.catch_up(&mut behind).await;
        }
        let reading_on = !out_of_time();
        let (mut ahead, mut later) = (Vec::new(), Vec::new());
        for h in d.held.iter().filter(|h| reading_on && !careful && h.resume.is_none() && !d.share.shedding.contains(&h.shard)) {
            match batches.iter().find(|b| b.shard == h.shard) {
                Some(b) if b.entries.len() >= s.batch_size => ahead.push(h.clone()),
                Some(_) => later.push(h.clone()),
                None => {}
            }
        }
        // The shards this round's read found empty, for their handshake
        // beside the apply (taken after the catch-ups above, which settle
        // them too, see `Drain::settle`).
        let emptying = std::mem::take(&mut d.emptying);
        let share = d.byte_share(emptying.len());
        let (planned, plan_made) = oneshot::channel();
        let next = futures::future::join(futures::future::join_all(ahead.iter().map(|h| read_batch(s, h, share))), async {
            // A round that failed before its plan reads nothing more: its
            // shards may leave, and a batch read for one would be delivered
            // again to the next holder, as a second attempt. (One that fails
            // after it, in its writing or commit, may still leave a shard with
            // a batch read ahead, as a full shard's always could: those writes
            // count one delivery more.)
            if plan_made.await.is_err() {
                return Vec::new();
            }
            futures::future::join_all(later.iter().map(|h| read_batch(s, h, share))).await
        });
        // Meanwhile, the shards rung since the last look: their rings wait
        // behind this drain (see `rung`).
        let now = spillway_spin::monotonic_ms();
        let look = rescan && d.held.len() + emptying.len() < s.layout.shards as usize && probed_at.is_none_or(|at| now >= at + WAIT_STEP_MS);
        let unheld: Vec<u32> = if look {
            probed_at = Some(now);
            (0..s.layout.shards).filter(|shard| !d.held.iter().chain(&emptying).any(|h| h.shard == *shard)).collect()
        } else {
            Vec::new()
        };
        // And the handshake of the shards this round's read found empty.
        let handshake = empty(s, emptying);
        let ((applied, apply_ms), (next, next_later), rang, emptied) = futures::future::join4(behind.beside(d.apply(&batches, planned)), next, async move {
            if unheld.is_empty() { Vec::new() } else { rung(s, &unheld).await }
        }, handshake)
        .await;
        d.emptied(emptied);
        d.want(rang);
        // This round's tail follows the last one's.
        d.catch_up(&mut behind).await;
        behind.start(d.tail(batches, applied, apply_ms));
        // A shard that left in this round (failed, fenced) leaves its read-ahead in
        // the stream's pending list, for the next holder (`later`, last, is
        // short of its reads if the round failed before its plan).
        prefetched = ahead
            .iter()
            .chain(&later)
            .map(|h| h.shard)
            .zip(next.into_iter().chain(next_later))
            .filter(|(shard, _)| d.held.iter().any(|h| h.shard == *shard))
            .collect();
    }
}

/// The nodes seen draining within three lease TTLs, and how long ago each
/// (ms); `name`, if given, says this node is alive first.
pub(crate) async fn nodes_seen(s: &Settings, name: Option<&str>) -> Result<Vec<(String, u64)>, Problem> {
    let call = Call::nodes_seen(&s.layout, name, s.lease_ttl_ms.saturating_mul(3));
    let reply = Redis::for_shard(s, 0).call(&call).await?;
    reply::nodes_seen(&spillway_spin::redis::values(&reply)).map_err(spillway_spin::redis::malformed)
}

/// One invocation's drain: the shards it holds and wants, and what failed.
struct Drain<'a> {
    s: &'a Settings,
    db: &'a Db,
    /// An operator's drain: it takes shards that back off too.
    by_operator: bool,
    /// Shards to take next.
    wanted: Vec<u32>,
    /// Shards asked for by name (a busy one is reported).
    explicit: Vec<u32>,
    held: Vec<Held>,
    /// Held shards found empty by a read that found batches too, out of
    /// `held` until their doorbell handshake (see [`Drain::read`]).
    emptying: Vec<Held>,
    /// A shard that failed is not taken again in this invocation: its watch
    /// retries it after a lease TTL, and its attempts are not burnt in a tight
    /// loop.
    failed: HashSet<u32>,
    /// Shards whose lease call failed in this drain: only the scans try them
    /// again, not each look at the doorbell flags (see [`Drain::want`]).
    unreachable: HashSet<u32>,
    failures: Vec<(Option<u32>, Problem)>,
    stats: &'a mut Stats,
    share: Share,
    /// From the latest scan: how soon the next scheduled write of an unheld
    /// shard is due, if within the alarm's lead.
    due_in_ms: Option<u64>,
}

/// With `node_name` (several Spin hosts share the queue): how many shards a
/// drain takes from its scans, so that the leases spread over the nodes. Each
/// node says it is alive as it drains (`scripts::NODES_SEEN`), and a drain
/// takes up to `ceil(shards / nodes seen)` from its scans, and hands back any
/// beyond that once more nodes are seen (see [`Drain::shed`]); the shard whose
/// doorbell started it, and one that stays claimable beyond
/// [`BEYOND_SHARE_AFTER_MS`] (a node gone, or busy), it takes regardless. An
/// operator's drain takes every shard.
struct Share {
    /// The most leases to hold from scans.
    of: usize,
    /// When the nodes were last counted (monotonic ms).
    read_at: Option<u64>,
    /// Claimable shards left to others, and when first seen so.
    passed_over: HashMap<u32, u64>,
    /// The share went down when the nodes were last counted: the excess is
    /// shed once (not a shard taken beyond the share later, see [`Drain::shed`]).
    shrunk: bool,
    /// Shards in excess kept until their batch read ahead is applied: read no
    /// further ahead, shed at the next scan.
    shedding: HashSet<u32>,
}

impl<'a> Drain<'a> {
    /// Counts the nodes again (each quarter lease TTL), saying this one is
    /// alive: the drain's share. A node is forgotten three lease TTLs after
    /// it was last seen.
    async fn count_nodes(&mut self) {
        let Some(name) = self.s.node_name.as_deref().filter(|_| !self.by_operator) else { return };
        let now = spillway_spin::monotonic_ms();
        if self.share.read_at.is_some_and(|at| now.saturating_sub(at) < self.s.lease_ttl_ms / 4) {
            return;
        }
        self.share.read_at = Some(now);
        match nodes_seen(self.s, Some(name)).await {
            Ok(nodes) => {
                let of = (self.s.layout.shards as usize).div_ceil(nodes.len().max(1));
                self.share.shrunk |= of < self.share.of;
                self.share.of = of;
            }
            Err(p) => spillway_spin::log_ignored("counting the nodes that drain", Err::<(), _>(p)),
        }
    }

    /// Out of time (a hosted platform ends a request at 30 s): releases the
    /// shards and rings again, so a fresh invocation carries on. Nothing read
    /// ahead is left behind (the drain applies it first, see [`drain`]): the
    /// next holder would resume it as a second delivery. Released with a
    /// retry: should the ring be lost, the shard's watch expires one lease TTL
    /// from now and resumes it.
    async fn hand_on(&mut self) {
        let held = std::mem::take(&mut self.held);
        let shards = self.let_go(held).await;
        self.stats.handed_on.extend(shards);
        eprintln!("{}", serde_json::json!({"event": "handed_on", "shards": self.stats.handed_on, "budget_secs": self.s.drain_budget_secs}));
    }

    /// Releases `leases` with a retry and rings their shards, for another
    /// invocation (or node) to take; their shards.
    async fn let_go(&self, leases: Vec<Held>) -> Vec<u32> {
        let shards: Vec<u32> = leases.iter().map(|h| h.shard).collect();
        for h in leases {
            h.lease.release(self.s, Then::Retry).await;
        }
        spillway_spin::ring(self.s, &shards).await;
        shards
    }

    /// Over its share (more nodes seen since it took its shards): hands the
    /// excess back, released with a retry and rung, for the other nodes to
    /// take (every node's trigger hears the ring; this one's is busy with this
    /// drain). It takes them back itself only if they stay claimable (see
    /// [`Share`]). Only when the share has just gone down: a shard taken
    /// beyond it later (left claimable too long: a node gone, or busy) is
    /// kept, or it would be shed and taken back, a fresh tenure each time,
    /// until that node is forgotten.
    async fn shed(&mut self, prefetched: &HashMap<u32, Result<Read, Problem>>) {
        self.share.shedding.clear();
        if !std::mem::take(&mut self.share.shrunk) || self.held.len() <= self.share.of {
            return;
        }
        // A shard with a batch read ahead is not let go before that batch is
        // applied (the next holder would have it delivered again, as a second
        // attempt): it is kept first, and if it is still in excess, read no
        // further ahead and shed at the next scan.
        self.held.sort_by_key(|h| !prefetched.contains_key(&h.shard));
        let (excess, kept): (Vec<Held>, Vec<Held>) = self.held.split_off(self.share.of).into_iter().partition(|h| !prefetched.contains_key(&h.shard));
        self.share.shedding = kept.iter().map(|h| h.shard).collect();
        if !kept.is_empty() {
            self.share.shrunk = true;
            self.held.extend(kept);
        }
        let shards = self.let_go(excess).await;
        let now = spillway_spin::monotonic_ms();
        self.share.passed_over.extend(shards.iter().map(|shard| (*shard, now)));
        eprintln!("{}", serde_json::json!({"event": "shards_shed", "shards": shards, "share": self.share.of, "node": self.s.node_name}));
    }

    /// Looks for shards with queued writes and no holder: those within the
    /// drain's share, and those left to others for too long (see [`Share`]).
    async fn scan(&mut self) {
        self.count_nodes().await;
        match claimable(self.s, self.by_operator).await {
            Ok(found) => {
                let now = spillway_spin::monotonic_ms();
                self.due_in_ms = found.wait_ms;
                let found = found.shards;
                self.share.passed_over.retain(|shard, _| found.contains(shard));
                for shard in found {
                    let first_seen = *self.share.passed_over.entry(shard).or_insert(now);
                    if self.held.len() + self.wanted.len() < self.share.of || now.saturating_sub(first_seen) >= BEYOND_SHARE_AFTER_MS {
                        self.share.passed_over.remove(&shard);
                        self.wanted.push(shard);
                    }
                }
            }
            Err(p) if self.held.is_empty() && self.wanted.is_empty() => self.failures.push((None, p)),
            Err(p) => spillway_spin::log_ignored("looking for shards with work", Err::<(), _>(p)),
        }
    }

    /// Takes the leases of the wanted shards that are free.
    async fn take_wanted(&mut self) {
        let mut wanted: Vec<u32> = Vec::new();
        for shard in std::mem::take(&mut self.wanted) {
            if !self.failed.contains(&shard) && !self.held.iter().any(|h| h.shard == shard) && !wanted.contains(&shard) {
                wanted.push(shard);
            }
        }
        // All at once: under load, one lease call after another would hold
        // the next round (and the writes waiting on these shards) back.
        let taken = futures::future::join_all(wanted.iter().map(|shard| acquire(self.s, *shard, self.by_operator))).await;
        for (shard, got) in wanted.into_iter().zip(taken) {
            match got {
                Ok(Some(h)) => self.held.push(h),
                Ok(None) if self.explicit.contains(&shard) => self.stats.busy.push(shard),
                Ok(None) => {}
                Err(p) => {
                    self.unreachable.insert(shard);
                    self.failures.push((Some(shard), p));
                }
            }
        }
    }

    /// Wants the shards rung while this drain ran (see [`rung`]) that are
    /// within its share, as a scan would (taking one beyond it is left to the
    /// scans, see [`Share`]), unless taking one failed in this drain.
    fn want(&mut self, rung: Vec<u32>) {
        for shard in rung.into_iter().filter(|shard| !self.unreachable.contains(shard)) {
            if self.held.len() + self.wanted.len() < self.share.of && !self.wanted.contains(&shard) && !self.held.iter().any(|h| h.shard == shard) {
                self.wanted.push(shard);
            }
        }
    }

    /// A shard leaves the drain after a failure: its lease released with a
    /// retry after its backoff, not taken again in this invocation, the
    /// failure reported.
    async fn fail(&mut self, shard: u32, p: Problem) {
        if let Some(i) = self.held.iter().position(|h| h.shard == shard) {
            let h = self.held.remove(i);
            h.lease.release(self.s, Then::BackOff { attempt: h.attempt }).await;
        }
        self.failed.insert(shard);
        self.failures.push((Some(shard), p));
    }

    /// Reads a batch from every held shard (those read ahead, from
    /// `prefetched`) and settles each shard's state: a lost lease leaves, a
    /// batch joins the round, an empty shard goes through the doorbell
    /// handshake (see [`drain`]). When the read found batches, the empty
    /// shards wait in `emptying` instead, their handshake left to run beside
    /// the round's apply (see [`Drain::emptied`]): a write that waited through
    /// a large round is applied one read after it, not one read and a
    /// handshake of every other shard.
    async fn read(&mut self, mut prefetched: HashMap<u32, Result<Read, Problem>>) -> Vec<Batch> {
        let s = self.s;
        let fresh: Vec<Held> = self.held.iter().filter(|h| !prefetched.contains_key(&h.shard)).cloned().collect();
        let share = self.byte_share(0);
        let reads = futures::future::join_all(fresh.iter().map(|h| read_batch(s, h, share))).await;
        prefetched.extend(fresh.iter().map(|h| h.shard).zip(reads));
        let (mut batches, mut empties) = (Vec::new(), Vec::new());
        for mut h in std::mem::take(&mut self.held) {
            match prefetched.remove(&h.shard).unwrap_or(Ok(Read::Lost)) {
                Err(p) => {
                    h.lease.release(s, Then::Retry).await;
                    self.failed.insert(h.shard);
                    self.failures.push((Some(h.shard), p));
                }
                Ok(Read::Lost) => {}
                // Still resuming (every entry of this pending batch had gone).
                Ok(Read::Batch(b, Some(cursor))) if b.entries.is_empty() => {
                    h.resume = Some(cursor);
                    self.held.push(h);
                }
                Ok(Read::Batch(b, None)) if b.entries.is_empty() => {
                    h.resume = None;
                    empties.push(h);
                }
                Ok(Read::Batch(b, resume)) => {
                    h.cleared = false;
                    h.resume = resume;
                    h.attempt = b.attempt;
                    batches.push(b);
                    self.held.push(h);
                }
            }
        }
        if !batches.is_empty() {
            self.emptying = empties;
            return batches;
        }
        // The shards found empty, all at once.
        let emptied = empty(s, empties).await;
        self.emptied(emptied);
        batches
    }

    /// Settles the shards that went through the doorbell handshake (see
    /// [`empty`]): kept, given back to be taken again, or failed.
    fn emptied(&mut self, emptied: Vec<Emptied>) {
        for e in emptied {
            self.held.extend(e.kept);
            self.wanted.extend(e.retake);
            self.failures.extend(e.failure);
        }
    }

    /// Each held shard's share of `round_bytes`: the most payload bytes its
    /// next batch reads (it reads one write whatever its size). `emptying`:
    /// held shards out of `held` for their doorbell handshake.
    fn byte_share(&self, emptying: usize) -> usize {
        (self.s.round_bytes / (self.held.len() + emptying).max(1)).max(1)
    }

    /// Applies a round's batches in one transaction; shards whose batch failed
    /// (or was fenced) leave. The rest of the round, its [`Tail`], is the
    /// caller's to run. `planned`: see [`db::apply_round`].
    async fn apply(&mut self, batches: &[Batch], planned: oneshot::Sender<()>) -> (db::Applied, u64) {
        let started = spillway_spin::monotonic_ms();
        let (applied, errors) = db::apply_round(self.s, self.db, batches, planned).await;
        let apply_ms = spillway_spin::monotonic_ms() - started;
        for (shard, p) in errors {
            let ids = batches.iter().filter(|b| b.shard == shard).flat_map(|b| b.entries.iter().map(|(id, _)| id.clone()));
            if let Some(b) = batches.iter().find(|b| b.shard == shard) {
                log_failure(b, "apply", p.cause_or_detail());
            }
            record_failure(self.s, shard, ids, &p).await;
            self.fail(shard, p).await;
        }
        // Fenced: a newer holder has written; these entries are its now. Unless
        // no newer holder exists: Redis's counter is behind the database's
        // fence (see `Lease::fenced_off`).
        for h in self.held.iter().filter(|h| applied.fenced.contains_key(&h.shard)) {
            let seen = applied.fenced[&h.shard];
            eprintln!("{}", serde_json::json!({"event": "batch_fenced", "shard": h.shard, "fence": h.fence, "database": seen}));
            h.lease.fenced_off(self.s, seen).await;
        }
        self.held.retain(|h| !applied.fenced.contains_key(&h.shard));
        (applied, apply_ms)
    }

    /// The tail of a round just applied, for the shards still held: to run
    /// (see [`Tail::run`]) and then [`Drain::settle`].
    fn tail(&self, batches: Vec<Batch>, applied: db::Applied, apply_ms: u64) -> Tail<'a> {
        let owners: Vec<Held> = self.held.iter().filter(|h| batches.iter().any(|b| b.shard == h.shard)).cloned().collect();
        Tail { s: self.s, owners, batches, applied, apply_ms, cache_ms: 0, lost: HashSet::new(), failed: Vec::new(), done: 0 }
    }

    /// Waits for the last round's tail, if any, and takes in what it did.
    async fn catch_up(&mut self, behind: &mut Behind<'a>) {
        if let Some(t) = behind.finish().await {
            self.settle(t).await;
        }
    }

    /// Takes in what a round's tail did: shards whose lease it found lost
    /// leave, and those whose step failed leave after their backoff. By
    /// tenure (the lease's token): a shard let go and taken again since is
    /// another tenure, not the tail's.
    async fn settle(&mut self, t: Settled) {
        self.held.retain(|h| !t.lost.contains(&h.token));
        self.emptying.retain(|h| !t.lost.contains(&h.token));
        for (shard, token, p) in t.failed {
            if let Some(i) = self.emptying.iter().position(|h| h.shard == shard && h.token == token) {
                // Waiting for its handshake: it leaves as a held shard would.
                self.held.push(self.emptying.remove(i));
            }
            if self.held.iter().any(|h| h.shard == shard && h.token == token) {
                self.fail(shard, p).await;
            } else {
                self.failures.push((Some(shard), p));
            }
        }
        self.stats.applied += t.applied;
        self.stats.rejected += t.rejected;
        self.stats.batches += t.batches;
    }
}

/// The steps of a round after its commit: the cache refresh, the dead
/// letters, and the acknowledgement (in that order: read-your-writes). They
/// run beside the next round's read and commit (see [`Behind`]), whose keys
/// they do not share; the next round's own tail starts only once this one
/// is done, so each key's cache entries are written in the order of its
/// commits.
struct Tail<'a> {
    s: &'a Settings,
    /// The leases of the shards in the round (a copy: the drain goes on).
    owners: Vec<Held>,
    batches: Vec<Batch>,
    applied: db::Applied,
    apply_ms: u64,
    cache_ms: u64,
    /// The tenures (lease tokens) of the shards whose lease was found lost.
    lost: HashSet<String>,
    /// Shards that failed a step, their tenure, and why.
    failed: Vec<(u32, String, Problem)>,
    /// Batches acknowledged.
    done: u64,
}

/// What a round's tail did, for [`Drain::settle`].
#[derive(Default)]
struct Settled {
    lost: HashSet<String>,
    failed: Vec<(u32, String, Problem)>,
    applied: u64,
    rejected: u64,
    batches: u64,
}

impl<'a> Tail<'a> {
    /// The tenure (lease token) under which this tail holds `shard`.
    fn tenure(&self, shard: u32) -> String {
        self.owners.iter().find(|h| h.shard == shard).map(|h| h.token.clone()).unwrap_or_default()
    }

    /// The keys whose cache entries this tail writes.
    fn keys(&self) -> impl Iterator<Item = &String> {
        self.applied.state.keys()
    }

    async fn run(mut self) -> Settled {
        let batches = std::mem::take(&mut self.batches);
        let Some(done) = self.refresh(&batches).await else {
            return Settled { lost: self.lost, failed: self.failed, ..Settled::default() };
        };
        let done = self.dead_letter(done).await;
        self.acknowledge(&done).await;
        Settled { lost: self.lost, failed: self.failed, applied: self.applied.applied, rejected: self.applied.rejected, batches: self.done }
    }

    /// Refreshes the cache with the round's records; the batches of the shards
    /// still held after it (`None`: the refresh failed, and every batch leaves:
    /// committed, not acknowledged, they are redelivered, found applied, and
    /// refreshed then).
    async fn refresh<'b>(&mut self, batches: &'b [Batch]) -> Option<Vec<&'b Batch>> {
        let done: Vec<&Batch> = batches.iter().filter(|b| self.owners.iter().any(|h| h.shard == b.shard)).collect();
        let owners: Vec<&Held> = self.owners.iter().collect();
        let started = spillway_spin::monotonic_ms();
        let refreshed = refresh_cache(self.s, &self.applied.state, &owners).await;
        self.cache_ms = spillway_spin::monotonic_ms() - started;
        match refreshed {
            Ok(lost) => {
                // Lease lost during the refresh: the new holder redelivers and
                // refreshes.
                let kept = done.into_iter().filter(|b| !lost.contains(&b.shard)).collect();
                self.lost.extend(self.owners.iter().filter(|h| lost.contains(&h.shard)).map(|h| h.token.clone()));
                Some(kept)
            }
            Err(p) => {
                for b in done {
                    log_failure(b, "cache", p.cause_or_detail());
                    record_failure(self.s, b.shard, b.entries.iter().map(|(id, _)| id.clone()), &p).await;
                    self.failed.push((b.shard, self.tenure(b.shard), p.clone()));
                }
                None
            }
        }
    }
    /// Writes past their attempt limit that the database does not have: out of
    /// the stream to the dead letters, before the batch's acknowledgement (which
    /// would forget their errors). Returns the batches to acknowledge; a shard
    /// whose dead-lettering failed leaves, unacknowledged (redelivered later).
    async fn dead_letter<'b>(&mut self, done: Vec<&'b Batch>) -> Vec<&'b Batch> {
        let s = self.s;
        let mut left = Vec::new();
        for b in &done {
            let dead: Vec<DeadLetter> = self
                .applied
                .dead
                .iter()
                .filter(|d| d.shard == b.shard)
                .map(|d| DeadLetter {
                    entry: d.entry.clone(),
                    payload: d.payload.clone(),
                    error: d.error.clone(),
                    attempts: d.attempts.clone(),
                    tenant: b.tenants.get(&d.entry).cloned(),
                })
                .collect();
            let home = s.idempotency_shard(b.shard);
            if let Some(call) = Call::dead_letter(&s.layout, b.shard, home, s.status_retention_secs.saturating_mul(1000), &dead)
                && let Err(p) = Redis::for_shard(s, b.shard).call(&call).await
            {
                log_failure(b, "dead-letter", p.cause_or_detail());
                left.push(b.shard);
                self.failed.push((b.shard, self.tenure(b.shard), p));
            }
        }
        done.into_iter().filter(|b| !left.contains(&b.shard)).collect()
    }

    /// Acknowledges each batch (all at once) and logs it; a shard whose
    /// acknowledgement failed leaves: applied but still pending, and this tenure
    /// reads only new entries, so the watch's retry starts a tenure that
    /// resumes them.
    async fn acknowledge(&mut self, done: &[&Batch]) {
        let (s, applied) = (self.s, &self.applied);
        let acks = done.iter().map(|b| {
            let (new_applied, new_rejected) = applied.per_shard.get(&b.shard).copied().unwrap_or_default();
            let dead: HashSet<&str> = applied.dead.iter().filter(|d| d.shard == b.shard).map(|d| d.entry.as_str()).collect();
            let entries = b.entries.iter().map(move |(id, _)| (id.as_str(), b.tenants.get(id).map(String::as_str), !dead.contains(id.as_str())));
            let now = u64::try_from(spillway_spin::now_ms()).unwrap_or(0);
            let call = Call::ack(&s.layout, b.shard, s.idempotency_shard(b.shard), (new_applied, new_rejected), now, entries);
            async move {
                let started = spillway_spin::monotonic_ms();
                let r = Redis::for_shard(s, b.shard).call(&call).await;
                (*b, r, spillway_spin::monotonic_ms() - started)
            }
        });
        let mut lines = Vec::with_capacity(done.len());
        let mut failed = Vec::new();
        for (b, r, ack_ms) in futures::future::join_all(acks).await {
            match r {
                Ok(_) => {
                    let (new_applied, new_rejected) = applied.per_shard.get(&b.shard).copied().unwrap_or_default();
                    lines.push(batch_line(b, new_applied, new_rejected, [b.read_ms, self.apply_ms, self.cache_ms, ack_ms]));
                }
                Err(p) => {
                    log_failure(b, "ack", p.cause_or_detail());
                    failed.push((b.shard, self.tenure(b.shard), p));
                }
            }
        }
        self.done += lines.len() as u64;
        self.failed.extend(failed);
        // The round's lines in one write: each write to stderr is a host call.
        if !lines.is_empty() {
            eprintln!("{}", lines.join("\n"));
        }
    }
}

/// A round's tail running beside the work that follows it (see [`Tail`]).
#[derive(Default)]
struct Behind<'a> {
    running: Option<futures::future::LocalBoxFuture<'a, Settled>>,
    /// The keys of the running tail's refresh.
    keys: HashSet<String>,
    finished: Option<Settled>,
}

impl<'a> Behind<'a> {
    fn start(&mut self, tail: Tail<'a>) {
        debug_assert!(self.running.is_none() && self.finished.is_none(), "a tail starts once the last one is settled");
        self.keys = tail.keys().cloned().collect();
        self.running = Some(Box::pin(tail.run()));
    }

    /// Runs `work`, letting the tail (if any) go on meanwhile.
    async fn beside<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        let Some(running) = self.running.take() else { return work.await };
        match futures::future::select(std::pin::pin!(work), running).await {
            futures::future::Either::Left((out, running)) => {
                self.running = Some(running);
                out
            }
            futures::future::Either::Right((settled, work)) => {
                self.finished = Some(settled);
                work.await
            }
        }
    }

    /// The keys the running tail has still to refresh (`None`: no tail runs).
    fn keys(&self) -> Option<&HashSet<String>> {
        self.running.as_ref().map(|_| &self.keys)
    }

    /// Waits for the tail (if any) to finish; what it did.
    async fn finish(&mut self) -> Option<Settled> {
        if let Some(running) = self.running.take() {
            self.finished = Some(running.await);
        }
        self.finished.take()
    }
}

/// Counts a failed attempt for each of `entries` with what their status
/// and dead letter will say: the safe message (the backend's own text is in
/// the batch's log line).
async fn record_failure(s: &Settings, shard: u32, entries: impl Iterator<Item = String>, p: &Problem) {
    let recorded = Redis::for_shard(s, shard).call(&Call::record_error(&s.layout, shard, &p.detail, entries)).await;
    spillway_spin::log_ignored("recording a batch's failure", recorded);
}

/// The JSON line on stderr (where Spin collects a component's logs) of an
/// applied batch: shard, fencing token, writes, new outcomes, first and last
/// write id, and how long each step took (the apply and cache steps are the
/// round's, shared by the shards in it).
fn batch_line(b: &Batch, applied: u64, rejected: u64, [read_ms, apply_ms, cache_ms, ack_ms]: [u64; 4]) -> String {
    let line = serde_json::json!({
        "event": "batch", "shard": b.shard, "fence": b.fence, "writes": b.entries.len(),
        "applied": applied, "rejected": rejected,
        "first": b.entries.first().map(|(id, _)| WriteId::of_entry(b.shard, id)),
        "last": b.entries.last().map(|(id, _)| WriteId::of_entry(b.shard, id)),
        "ms": {"read": read_ms, "apply": apply_ms, "cache": cache_ms, "ack": ack_ms},
    });
    line.to_string()
}

/// One JSON line on stderr per failed batch: which step failed and why.
fn log_failure(b: &Batch, step: &str, error: &str) {
    let line = serde_json::json!({
        "event": "batch_failed", "shard": b.shard, "fence": b.fence, "writes": b.entries.len(), "step": step,
        "first": b.entries.first().map(|(id, _)| WriteId::of_entry(b.shard, id)),
        "last": b.entries.last().map(|(id, _)| WriteId::of_entry(b.shard, id)),
        "error": error,
    });
    eprintln!("{line}");
}

/// The doorbell handshake for shards found empty, all at once: the first time,
/// a shard's flag is cleared and it is kept, to be read once more; the second
/// time its lease is released, and the shard given back to be taken again if
/// the flag was set meanwhile. One call per server (per shard with
/// `redis_cluster`) for each step: a `DEL` of the flags, a `RELEASE_EMPTY`. A
/// failure to clear a flag is reported, the shard kept; one to release is
/// logged (the lease expires of itself, and the flag's expiry rings again if
/// it was set).
async fn empty(s: &Settings, shards: Vec<Held>) -> Vec<Emptied> {
    let (twice, once): (Vec<Held>, Vec<Held>) = shards.into_iter().partition(|h| h.cleared);
    let clear = async {
        let ids: Vec<u32> = once.iter().map(|h| h.shard).collect();
        let calls = s.slot_groups(&ids).into_iter().map(|(address, group)| async move {
            let bells = group.iter().map(|shard| spillway_spin::bin(&s.layout.bell(*shard))).collect();
            (group, Redis::new(address).execute("DEL", bells).await)
        });
        let mut failed: HashMap<u32, Problem> = HashMap::new();
        for (group, r) in futures::future::join_all(calls).await {
            if let Err(p) = r {
                failed.extend(group.into_iter().map(|shard| (shard, p.clone())));
            }
        }
        once.into_iter()
            .map(|mut h| {
                let failure = failed.remove(&h.shard).map(|p| (Some(h.shard), p));
                h.cleared = true;
                Emptied { kept: Some(h), retake: None, failure }
            })
            .collect::<Vec<_>>()
    };
    let release = async {
        let ids: Vec<u32> = twice.iter().map(|h| h.shard).collect();
        let twice = &twice;
        let calls = s.slot_groups(&ids).into_iter().map(|(address, group)| async move {
            let held = group.iter().filter_map(|shard| twice.iter().find(|h| h.shard == *shard)).map(|h| (h.shard, h.token.as_str()));
            let call = Call::release_empty(&s.layout, held);
            (group, Redis::new(address).call(&call).await)
        });
        let mut out = Vec::with_capacity(twice.len());
        for (group, r) in futures::future::join_all(calls).await {
            match r {
                Ok(flags) => out.extend(group.into_iter().zip(flags.iter().map(|f| int(f).unwrap_or(0) > 0).chain(std::iter::repeat(false))).map(|(shard, rung)| Emptied {
                    kept: None,
                    retake: rung.then_some(shard),
                    failure: None,
                })),
                // As `Lease::release` logs it, per shard.
                Err(p) => {
                    for h in twice.iter().filter(|h| group.contains(&h.shard)) {
                        eprintln!("{}", serde_json::json!({"event": "lease_release_failed", "shard": h.shard, "fence": h.fence, "error": p.detail}));
                    }
                }
            }
        }
        out
    };
    let (mut kept, released) = futures::future::join(clear, release).await;
    kept.extend(released);
    kept
}

/// What [`empty`] did with a shard: kept it, or let it go (to be taken again
/// if rung meanwhile); and what failed.
struct Emptied {
    kept: Option<Held>,
    retake: Option<u32>,
    failure: Option<(Option<u32>, Problem)>,
}

/// Which of `shards` have their doorbell flag set: a write was queued on each
/// since its holder last found it empty, and its ring (the trigger hands this
/// component one message at a time) waits for this drain to end. A drain looks
/// between its rounds (every [`WAIT_STEP_MS`] at most: one `MGET` per server,
/// per shard with `redis_cluster`, beside the round's own calls) and takes
/// them, so a write to a shard the drain does not hold waits for a round, not
/// for the next scan. A flag set for a shard another holder has costs a
/// failed lease call.
async fn rung(s: &Settings, shards: &[u32]) -> Vec<u32> {
    let groups = s.slot_groups(shards);
    let looks = groups.iter().map(|(address, group)| async move {
        let bells = group.iter().map(|shard| spillway_spin::bin(&s.layout.bell(*shard))).collect();
        (group, Redis::new(address).execute("MGET", bells).await)
    });
    let mut out = Vec::new();
    for (group, reply) in futures::future::join_all(looks).await {
        match reply {
            Ok(flags) => out.extend(group.iter().zip(flags).filter(|(_, flag)| spillway_spin::text(flag).is_some()).map(|(shard, _)| *shard)),
            Err(p) => spillway_spin::log_ignored("looking for shards rung during a drain", Err::<(), _>(p)),
        }
    }
    out
}

/// Shards with queued writes and no lease holder: one call per server (per
/// shard with `redis_cluster`), all at once.
pub(crate) async fn claimable(s: &Settings, end_backoff: bool) -> Result<reply::Claimable, Problem> {
    let l = &s.layout;
    let all: Vec<u32> = (0..l.shards).collect();
    let calls = s.slot_groups(&all).into_iter().map(|(address, group)| async move {
        Redis::new(address).call(&Call::claimable(l, &group, end_backoff)).await
    });
    let mut out = reply::Claimable::default();
    for reply in futures::future::join_all(calls).await {
        let found = reply::claimable(&spillway_spin::redis::values(&reply?)).map_err(spillway_spin::redis::malformed)?;
        for (shard, ttl_ms) in &found.armed {
            mirror(s, *shard, Mirrored::Alarm, Some(*ttl_ms)).await;
        }
        out.shards.extend(found.shards);
        out.wait_ms = match (out.wait_ms, found.wait_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(out)
}

/// Takes the shard's lease, unless another processor holds it; a fresh holder
/// resumes the pending entries a previous one left, from the start.
async fn acquire(s: &Settings, shard: u32, end_backoff: bool) -> Result<Option<Held>, Problem> {
    Ok(Lease::acquire(s, shard, end_backoff).await?.map(|lease| Held { lease, cleared: false, resume: Some("0".into()), attempt: 0 }))
}

/// The next batch of a held shard (renewing its lease), of at most `bytes` of
/// payload (at least one write).
async fn read_batch(s: &Settings, h: &Held, bytes: usize) -> Result<Read, Problem> {
    let started = spillway_spin::monotonic_ms();
    let BatchRead::Batch { prune_before_ms, cursor, armed_ms, entries: read } = h.lease.read_batch(s, h.resume.as_deref(), bytes).await? else {
        return Ok(Read::Lost);
    };
    if armed_ms.is_some() {
        mirror(s, h.shard, Mirrored::Alarm, armed_ms).await;
    }
    let mut entries = Vec::with_capacity(read.len());
    let mut tenants = HashMap::new();
    let mut over = HashSet::new();
    let attempt = read.iter().map(|e| u32::try_from(e.attempt).unwrap_or(u32::MAX)).max().unwrap_or(0);
    for e in read {
        if e.attempt > i64::from(s.max_attempts) {
            over.insert(e.id.clone());
        }
        if let Some(t) = e.tenant {
            tenants.insert(e.id.clone(), t);
        }
        entries.push((e.id, e.payload));
    }
    let read_ms = spillway_spin::monotonic_ms() - started;
    // Pending entries read again (a cursor) are a redelivery.
    let careful = cursor.is_some() && !entries.is_empty();
    let keys = entries.iter().map(|(_, payload)| db::key_of(payload)).collect();
    let batch = Batch { shard: h.shard, fence: h.fence, entries, keys, tenants, over, careful, token: h.token.clone(), prune_before_ms, read_ms, attempt };
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
    let owned: Vec<u32> = owners.iter().map(|h| h.shard).collect();
    let mut r = Refresh { s, state, owners, cache: CacheWriter::open(s)?, me: token(), lost: HashSet::new() };
    let mut pending: Vec<&String> = state.keys().collect();
    // Wait out a lock's whole TTL: a holder that died (a reader, or a processor
    // killed mid-refresh) leaves its locks until they expire. Our own refresh locks
    // live as long as the lease, so a dead processor's do not outlast its lease.
    let give_up = spillway_spin::monotonic_ms() + FILL_LOCK_TTL_MS.max(s.lease_ttl_ms) + 500;
    // One call per server (per shard with `redis_cluster`): its shards' leases and
    // the fill locks of their keys (a fill lock is in its key's shard).
    let groups = s.slot_groups(&owned);
    loop {
        // A key of a shard this drain does not hold (any more) is the holder's.
        for key in &pending {
            let shard = l.shard_of(key);
            if !owned.contains(&shard) {
                r.lost.insert(shard);
            }
        }
        pending.retain(|k| owned.contains(&l.shard_of(k)));
        if pending.is_empty() {
            return Ok(r.lost);
        }
        if spillway_spin::monotonic_ms() > give_up {
            return Err(Problem::unavailable("cache fill locks stayed busy; the batch will be retried"));
        }
        let calls = r.lock_calls(&groups, &pending);
        let waiting = r.write_locked(&calls).await?;
        pending = waiting.into_iter().filter(|k| !r.lost.contains(&l.shard_of(k))).collect();
        if !pending.is_empty() {
            spillway_spin::wait_ms(5).await;
        }
    }
}

/// One refresh of the cache (see [`refresh_cache`]).
struct Refresh<'a> {
    s: &'a Settings,
    state: &'a BTreeMap<String, Option<Record>>,
    owners: &'a [&'a Held],
    cache: CacheWriter,
    /// This refresh's lock token.
    me: String,
    /// Shards whose lease was found lost.
    lost: HashSet<u32>,
}

impl<'a> Refresh<'a> {
    /// The `LOCKS_ACQUIRE_LEASED` calls for `pending`: one per group of shards
    /// (a server, or a shard with `redis_cluster`), with the leases of the
    /// group's shards and the fill locks of its keys.
    fn lock_calls(&self, groups: &[(&'a str, Vec<u32>)], pending: &[&'a String]) -> Vec<LockCall<'a>> {
        let (s, l) = (self.s, &self.s.layout);
        groups
            .iter()
            .filter_map(|(address, group)| {
                let mine: Vec<&String> = pending.iter().copied().filter(|k| group.contains(&l.shard_of(k))).collect();
                if mine.is_empty() {
                    return None;
                }
                let leases: Vec<(u32, &str)> = self.owners.iter().filter(|h| group.contains(&h.shard)).map(|h| (h.shard, h.token.as_str())).collect();
                let call = Call::locks_leased(l, &leases, &mine, &self.me, s.lease_ttl_ms);
                Some((*address, mine, call))
            })
            .collect()
    }

    /// Takes the locks, writes the keys whose lock was taken (one `set-many`,
    /// one `delete-many`) and releases them; returns the keys whose lock was
    /// busy (to try again), noting the shards whose lease was lost.
    async fn write_locked(&mut self, calls: &[LockCall<'a>]) -> Result<Vec<&'a String>, Problem> {
        let l = &self.s.layout;
        // The locks live a lease TTL from when they are taken, after this.
        let started = spillway_spin::monotonic_ms();
        let replies = futures::future::join_all(calls.iter().map(|(address, _, call)| async move { Redis::new(address).call(call).await })).await;
        let mut held: Vec<(&str, Vec<String>)> = Vec::new();
        let (mut sets, mut deletes, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
        for ((address, mine, _), got) in calls.iter().zip(replies) {
            let grants = Grant::parse_all(&spillway_spin::redis::values(&got?), mine.len())
                .map_err(spillway_spin::redis::malformed)?;
            let mut taken = Vec::new();
            for (key, grant) in mine.iter().zip(grants) {
                match grant {
                    Grant::Taken => {}
                    Grant::LeaseLost => {
                        self.lost.insert(l.shard_of(key));
                        continue;
                    }
                    Grant::Busy => {
                        waiting.push(*key);
                        continue;
                    }
                }
                taken.push(l.fill_lock(key));
                match &self.state[*key] {
                    Some(r) => sets.push(((*key).clone(), cache_entry(key, r).into_bytes())),
                    None => deletes.push((*key).clone()),
                }
            }
            if !taken.is_empty() {
                held.push((address, taken));
            }
        }
        let written_keys: Vec<String> = sets.iter().map(|(k, _)| k.clone()).chain(deletes.iter().cloned()).collect();
        let outlived = || spillway_spin::monotonic_ms().saturating_sub(started) >= self.s.lease_ttl_ms;
        // A refresh held up (a paused process, a slow Redis) until its locks may
        // have expired writes nothing: a newer refresh or fill may have been
        // written since.
        let late = outlived();
        let mut written = if late {
            Err(Problem::unavailable("the cache refresh was held up until its locks expired; nothing was written and the batch will be retried"))
        } else {
            self.cache.write(self.s, sets, deletes).await
        };
        // The batch calls are synchronous in Spin (no deadline can cut them
        // short). One that returns after the locks may have expired may have
        // landed after a newer refresh or fill: its keys are invalidated (a
        // deletion never makes the cache older) and the round is retried.
        if !late && outlived() {
            spillway_spin::log_ignored("invalidating a late refresh", self.cache.invalidate(self.s, written_keys).await);
            written = Err(Problem::unavailable("the cache refresh outlived its locks (the key-value store was slow); its keys were invalidated and the batch will be retried"));
        }
        let me = &self.me;
        let released = futures::future::join_all(
            held.into_iter().map(|(address, locks)| async move { Redis::new(address).call(&Call::unlock(locks, me)).await }),
        )
        .await;
        for r in released {
            r?;
        }
        written?;
        Ok(waiting)
    }
}

/// One `LOCKS_ACQUIRE_LEASED` call of a refresh: the server, its keys (in the
/// order of the locks), and the call.
type LockCall<'a> = (&'a str, Vec<&'a String>, Call);

/// The cache's JSON for a record (what `GET /v1/records/{key}` answers).
fn cache_entry(key: &str, r: &Record) -> String {
    RecordDoc { etag: r.etag.clone(), key: key.to_owned(), updated_at: r.updated_at, value: r.value.clone(), version: r.version as i64 }.to_text()
}
