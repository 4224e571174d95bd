//! Applying a round of batches (one per shard) in ONE database transaction of a
//! handful of statements: fence checks, ordered apply, write ids recorded with the
//! data (the exactly-once effect), and outcomes past their retention pruned.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use futures::channel::oneshot;
use serde_json::Value as Json;
use spillway_core::apply::{Outcome, Record, StepResult, StepWrites, canonical, plan_with};
use spillway_core::call::Call;
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::record::{RecordError, RecordRow};
use spillway_core::settings::Settings;
use spillway_spin::db::{Db, SqlValue as Value, integer, text};
#[cfg(not(feature = "builtin-apply"))]
use spillway_spin::pipeline;
use spillway_spin::Redis;

/// Outcomes pruned per batch at most (a round prunes its shards' together, up
/// to this many times its batches): pruning keeps up with a full write rate
/// without ever making one transaction long.
const PRUNE_PER_BATCH: i64 = 1_000;

/// What a committed round did.
#[derive(Default)]
pub(crate) struct Applied {
    /// New state of every key a write of the round changed, or an earlier
    /// delivery of one of its writes did (for the cache).
    pub(crate) state: BTreeMap<String, Option<Record>>,
    /// Entries to dead-letter (they were left out): past their attempt limit
    /// and not in the database, or their key's apply step kept failing.
    pub(crate) dead: Vec<Dead>,
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
    /// Outcomes per shard, `(applied, rejected)`, to count when the shard's batch
    /// is acknowledged: this delivery's, and those an earlier delivery recorded.
    pub(crate) per_shard: HashMap<u32, (u64, u64)>,
    /// Shards whose batch was refused because a newer lease holder has written
    /// (their entries are that holder's now), with the fencing token the
    /// database has seen.
    pub(crate) fenced: BTreeMap<u32, i64>,
}

/// An entry to dead-letter.
pub(crate) struct Dead {
    pub(crate) shard: u32,
    pub(crate) entry: String,
    pub(crate) payload: String,
    /// Why (empty: the error recorded with its failed deliveries).
    pub(crate) error: String,
    /// Calls or deliveries it failed (empty: the deliveries counted).
    pub(crate) attempts: String,
}

impl Applied {
    fn merge(&mut self, other: Self) {
        self.state.extend(other.state);
        self.dead.extend(other.dead);
        self.applied += other.applied;
        self.rejected += other.rejected;
        for (shard, (a, r)) in other.per_shard {
            let e = self.per_shard.entry(shard).or_default();
            e.0 += a;
            e.1 += r;
        }
        self.fenced.extend(other.fenced);
    }
}

/// One batch read from a shard's stream.
pub(crate) struct Batch {
    pub(crate) shard: u32,
    /// The lease's fencing token.
    pub(crate) fence: i64,
    /// `(stream entry id, payload)` in stream order.
    pub(crate) entries: Vec<(String, String)>,
    /// Each entry's key (see [`key_of`]), in the same order.
    pub(crate) keys: Vec<Result<String, String>>,
    /// The tenant of each entry that has one (see `spillway_core::tenant`),
    /// by entry id: settled when the entry is acknowledged or dead-lettered.
    pub(crate) tenants: HashMap<String, String>,
    /// Entries past their attempt limit (see `scripts::READ_BATCH`): applied only
    /// if an earlier delivery committed them (then refreshed and acknowledged),
    /// else dead-lettered.
    pub(crate) over: HashSet<String>,
    /// The batch is delivered again (an earlier delivery did not finish): its
    /// round is applied carefully, each apply-step call marked (see
    /// `scripts::READ_BATCH`), so that a step that traps is blamed alone.
    pub(crate) careful: bool,
    /// The lease's token (a careful round's marks are made as the holder).
    pub(crate) token: String,
    /// Outcomes of this shard from before this stream time can be forgotten.
    pub(crate) prune_before_ms: i64,
    /// How long reading it from Redis took (for the batch's log line).
    pub(crate) read_ms: u64,
    /// The highest delivery count of its entries (how long the shard backs
    /// off if the batch fails, see `call::backoff_ms`).
    pub(crate) attempt: u32,
}

impl Batch {
    /// The keys its writes are for (an entry that is not a write has none).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.keys.iter().filter_map(|k| k.as_ref().ok())
    }
}

/// Each entry's key, read once when its batch is read: the key, or why the
/// payload is not a write.
pub(crate) fn key_of(payload: &str) -> Result<String, String> {
    serde_json::from_str::<Envelope>(payload).map(|w| w.key).map_err(|e| e.to_string())
}

/// Applies the batches of several shards in ONE transaction (one commit, one disk
/// sync, for all of them: shards own disjoint keys, so their batches are
/// independent). If that transaction fails, each batch is tried in a transaction of
/// its own, so a batch that cannot be applied fails alone. Returns what committed
/// and the shards whose batch failed. `planned` is told when the first
/// transaction has planned its writes (or failed before): what is left is
/// writing them and the commit.
pub(crate) async fn apply_round(s: &Settings, db: &Db, batches: &[Batch], planned: oneshot::Sender<()>) -> (Applied, Vec<(u32, Problem)>) {
    let mut planned = Some(planned);
    let first = in_transaction(s, db, batches, &mut planned).await;
    drop(planned);
    match first {
        Ok(a) => (a, Vec::new()),
        Err(p) if batches.len() == 1 => (Applied::default(), vec![(batches[0].shard, p)]),
        Err(_) => {
            let mut applied = Applied::default();
            let mut failed = Vec::new();
            for b in batches {
                match in_transaction(s, db, std::slice::from_ref(b), &mut None).await {
                    Ok(a) => applied.merge(a),
                    Err(p) => failed.push((b.shard, p)),
                }
            }
            (applied, failed)
        }
    }
}

async fn in_transaction(s: &Settings, db: &Db, batches: &[Batch], planned: &mut Option<oneshot::Sender<()>>) -> Result<Applied, Problem> {
    db.query(db.sql().begin, vec![]).await?;
    let applied = async {
        if let Some(stmt) = db.sql().in_transaction {
            // PostgreSQL takes at most 2^31 - 1 ms.
            db.query(stmt, vec![Value::Text(s.lease_ttl_ms.min(i32::MAX as u64).to_string())]).await?;
        }
        apply_in_tx(s, db, batches, planned).await
    };
    match applied.await {
        Ok(a) => match db.query(db.sql().commit, vec![]).await {
            Ok(_) => Ok(a),
            Err(p) => {
                // A failed COMMIT leaves the transaction open; the connection serves
                // the rest of the drain.
                spillway_spin::log_ignored("rollback after a failed commit", db.query(db.sql().rollback, vec![]).await);
                Err(p.into())
            }
        },
        Err(p) => {
            spillway_spin::log_ignored("rollback", db.query(db.sql().rollback, vec![]).await);
            Err(p)
        }
    }
}

/// The one parameter of a batch statement: its rows as a JSON array.
fn json_param<T: serde::Serialize>(rows: &[T]) -> Value {
    Value::Text(serde_json::to_string(rows).unwrap_or_else(|_| "[]".into()))
}

fn entry_ms(entry: &str) -> i64 {
    entry.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

/// What the processor reads of a queued write itself: its key (the rest is the
/// apply step's).
#[derive(serde::Deserialize)]
struct Envelope {
    key: String,
}

/// A round's entries, read past the fence: the writes by key, the ones that
/// do not parse, and which are past their attempt limit.
#[derive(Default)]
struct Entries {
    /// Shards whose batch was fenced off (a newer holder has written), with
    /// the database's token.
    fenced: BTreeMap<u32, i64>,
    /// `(write id, key, payload)`, in stream order per shard.
    writes: Vec<(String, String, String)>,
    /// `(write id, why)`: payloads that are not a write.
    unreadable: Vec<(String, String)>,
    /// Write id -> (shard, stream time ms).
    entry_of: HashMap<String, (i64, i64)>,
    /// `(shard, entry id, payload, write id)` past their attempt limit.
    over: Vec<(u32, String, String, String)>,
}

/// Checks the batches' fences (one statement for the round, in shard order, so
/// two processors whose rounds share shards, a stale holder and the new one,
/// cannot wait on each other in a cycle) and gathers the entries of the batches
/// that pass.
async fn fence_and_gather(db: &Db, batches: &[Batch]) -> Result<Entries, Problem> {
    let mut e = Entries::default();
    let mut in_order: Vec<&Batch> = batches.iter().collect();
    in_order.sort_by_key(|b| b.shard);
    let fences: Vec<(i64, i64)> = in_order.iter().map(|b| (i64::from(b.shard), b.fence)).collect();
    let advanced: HashMap<i64, i64> = db
        .query(db.sql().fence, vec![json_param(&fences)])
        .await?
        .iter()
        .filter_map(|r| Some((integer(r.first()?)?, integer(r.get(1)?)?)))
        .collect();
    for b in in_order {
        if advanced.get(&i64::from(b.shard)) != Some(&b.fence) {
            let rows = db.query(db.sql().fence_token, vec![Value::Integer(i64::from(b.shard))]).await?;
            e.fenced.insert(b.shard, rows.first().and_then(|r| r.first()).and_then(integer).unwrap_or(0));
            continue;
        }
        for ((entry, payload), key) in b.entries.iter().zip(&b.keys) {
            let id = WriteId::of_entry(b.shard, entry);
            e.entry_of.insert(id.clone(), (i64::from(b.shard), entry_ms(entry)));
            if b.over.contains(entry) {
                e.over.push((b.shard, entry.clone(), payload.clone(), id.clone()));
            }
            match key {
                Ok(key) => e.writes.push((id, key.clone(), payload.clone())),
                Err(err) => e.unreadable.push((id, err.clone())),
            }
        }
    }
    Ok(e)
}

/// The writes an earlier delivery already recorded, and their outcomes per
/// shard `(applied, rejected)`: counted when this batch is acknowledged (that
/// delivery's acknowledgement did not happen, or the entries would not be
/// here), so each write is counted once.
async fn recorded_before(db: &Db, e: &Entries) -> Result<(HashSet<String>, HashMap<u32, (u64, u64)>), Problem> {
    let ids: Vec<&String> = e.writes.iter().map(|(id, _, _)| id).chain(e.unreadable.iter().map(|(id, _)| id)).collect();
    let mut already = HashSet::new();
    let mut recorded: HashMap<u32, (u64, u64)> = HashMap::new();
    if ids.is_empty() {
        return Ok((already, recorded));
    }
    for row in db.query(db.sql().applied_ids, vec![json_param(&ids)]).await? {
        let Some(id) = row.first().and_then(text) else { continue };
        let shard = e.entry_of.get(&id).map_or(0, |(shard, _)| *shard as u32);
        let counts = recorded.entry(shard).or_default();
        if row.get(1).and_then(text).as_deref() == Some("applied") {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        already.insert(id);
    }
    Ok((already, recorded))
}

/// The records of `keys` as they stand: live ones, tombstones (the version a
/// deletion reached), and each key's latest applied write (the head of its
/// change chain). A row of another shape fails the batch; it is never skipped.
async fn current(db: &Db, keys: &[String]) -> Result<Current, Problem> {
    let mut c = Current::default();
    if keys.is_empty() {
        return Ok(c);
    }
    let malformed = |e: RecordError| spillway_spin::backend_failed("The database (database)", &e.to_string());
    for r in db.query(db.sql().records, vec![json_param(keys)]).await? {
        let row = RecordRow::from_row(&r).map_err(malformed)?;
        c.heads.insert(row.key.clone(), row.head.clone());
        match row.document().map_err(malformed)? {
            None => {
                c.tombstones.insert(row.key, row.version as u64);
            }
            Some(doc) => {
                c.existing.insert(doc.key, Record { value: doc.value, version: doc.version as u64, etag: doc.etag, updated_at: doc.updated_at });
            }
        }
    }
    Ok(c)
}

/// The records a round starts from (see [`current`]).
#[derive(Default)]
struct Current {
    existing: BTreeMap<String, Record>,
    tombstones: BTreeMap<String, u64>,
    heads: HashMap<String, Option<String>>,
}

/// Applies one round inside the open transaction: fences, already-recorded
/// writes, the plan (the apply step per key, in order), then the records, the
/// outcomes and the pruning, each in one statement. `planned` is told once
/// the plan is made.
async fn apply_in_tx(s: &Settings, db: &Db, batches: &[Batch], planned: &mut Option<oneshot::Sender<()>>) -> Result<Applied, Problem> {
    let mut e = fence_and_gather(db, batches).await?;
    let (already, recorded) = recorded_before(db, &e).await?;
    // Past the attempt limit and not in the database: left out, to be
    // dead-lettered after the commit. (Had an earlier delivery committed it, it is
    // in `already`: acknowledged as applied, its key refreshed.)
    let mut dead: Vec<Dead> = std::mem::take(&mut e.over)
        .into_iter()
        .filter(|(_, _, _, id)| !already.contains(id))
        .map(|(shard, entry, payload, _)| Dead { shard, entry, payload, error: String::new(), attempts: String::new() })
        .collect();
    let doomed: HashSet<String> = dead.iter().map(|d| WriteId::of_entry(d.shard, &d.entry)).collect();
    e.writes.retain(|(id, _, _)| !doomed.contains(id));
    e.unreadable.retain(|(id, _)| !doomed.contains(id));
    let keys: Vec<String> = e.writes.iter().map(|(_, key, _)| key.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let Current { existing, tombstones, mut heads } = current(db, &keys).await?;
    let now = spillway_spin::now_ms();
    let plan = plan_round(s, batches, &e, (existing, &tombstones, &heads), &already, now).await;
    if let Some(tx) = planned.take() {
        let _ = tx.send(());
    }
    dead.extend(failed_keys(s, &e, &plan.failed));

    let mut out = Outcomes { entry_of: &e.entry_of, now, rows: Vec::with_capacity(e.writes.len() + e.unreadable.len()), per_shard: recorded, applied: 0, rejected: 0 };
    for (id, key, outcome) in &plan.outcomes {
        match outcome {
            Outcome::Applied { version, value } => {
                // The change feed's entry: the value this write produced, linked to
                // the key's applied write before it.
                let value = value.as_ref().map(|v| String::from_utf8(canonical(v)).unwrap_or_default());
                let reason = value.is_none().then(|| "deleted".to_owned());
                let prev = heads.insert(key.clone(), Some(id.clone())).flatten();
                out.push(id, key, "applied", Some(*version), reason, value, prev);
            }
            Outcome::Rejected { reason } => out.push(id, key, "rejected", None, Some(reason.clone()), None, None),
        }
    }
    // Live records and tombstones (a deleted key keeps the version it reached),
    // each with the head of its change chain.
    let upserts: Vec<RecordUpsert> = plan
        .records
        .iter()
        .map(|(k, r)| {
            let head = heads.get(k).cloned().flatten();
            match r {
                Some(r) => RecordUpsert(k.clone(), String::from_utf8(canonical(&r.value)).unwrap_or_default(), r.version, r.etag.clone(), r.updated_at, 0, head),
                None => RecordUpsert(k.clone(), "null".into(), plan.deleted.get(k).copied().unwrap_or(0), String::new(), now, 1, head),
            }
        })
        .collect();
    if !upserts.is_empty() {
        db.query(db.sql().upsert_records, vec![json_param(&upserts)]).await?;
    }
    for (id, err) in e.unreadable.iter().filter(|(id, _)| !already.contains(id)) {
        out.push(id, "", "rejected", None, Some(format!("unreadable write: {err}")), None, None);
    }
    if !out.rows.is_empty() {
        db.query(db.sql().insert_writes, vec![json_param(&out.rows)]).await?;
    }
    let bounds: Vec<(i64, i64)> = batches.iter().filter(|b| !e.fenced.contains_key(&b.shard)).map(|b| (i64::from(b.shard), spillway_core::sql::prune_bound(b.prune_before_ms))).collect();
    if !bounds.is_empty() {
        let limit = PRUNE_PER_BATCH.saturating_mul(bounds.len() as i64);
        db.query(db.sql().prune_writes, vec![json_param(&bounds), Value::Integer(limit)]).await?;
    }
    let Outcomes { applied, rejected, per_shard, .. } = out;
    Ok(Applied { state: plan.records, dead, applied, rejected, per_shard, fenced: e.fenced })
}

/// What a round's keys hold before it: their records, tombstones, and last
/// applied writes (see [`Current`]).
type Stored<'a> = (BTreeMap<String, Record>, &'a BTreeMap<String, u64>, &'a HashMap<String, Option<String>>);

/// Plans the round: each key's writes through the apply step, in order; a
/// redelivered round carefully, each step call marked (see [`Careful`]).
async fn plan_round(
    s: &Settings,
    batches: &[Batch],
    e: &Entries,
    (existing, tombstones, heads): Stored<'_>,
    already: &HashSet<String>,
    now: i64,
) -> spillway_core::apply::Plan {
    let careful = batches.iter().any(|b| b.careful).then(|| Careful::new(s, batches.iter().filter(|b| !e.fenced.contains_key(&b.shard))));
    if let Some(c) = &careful {
        c.begin().await;
    }
    let mut marked: Option<(u32, Vec<String>)> = None;
    let plan = plan_with(existing, tombstones, heads, &e.writes, already, now, async |key, value, version, group| {
        if let Some(c) = &careful {
            c.mark(&mut marked, group).await;
        }
        step(s, key, value, version, group, now)
    })
    .await;
    if let Some(c) = &careful {
        c.end().await;
    }
    plan
}

/// A key whose step kept failing: its writes leave the queue, with the error.
fn failed_keys(s: &Settings, e: &Entries, failed: &[(String, Vec<String>, String)]) -> Vec<Dead> {
    if failed.is_empty() {
        return Vec::new();
    }
    let payloads: HashMap<&str, &str> = e.writes.iter().map(|(id, _, payload)| (id.as_str(), payload.as_str())).collect();
    let mut dead = Vec::new();
    for (_, ids, error) in failed {
        for id in ids {
            let (shard, _) = e.entry_of.get(id).copied().unwrap_or((0, 0));
            let entry = id.split_once('-').map_or(id.as_str(), |(_, e)| e);
            let payload = payloads.get(id.as_str()).copied().unwrap_or_default().to_owned();
            dead.push(Dead { shard: shard as u32, entry: entry.to_owned(), payload, error: error.clone(), attempts: s.max_attempts.max(1).to_string() });
        }
    }
    dead
}

/// A row of `upsert_records` (columns in the statement's order): key, value
/// (canonical JSON), version, etag, updated_at, deleted (0/1), head.
#[derive(serde::Serialize)]
struct RecordUpsert(String, String, u64, String, i64, i64, Option<String>);

/// A row of `insert_writes` (columns in the statement's order): id, key,
/// status, version, reason, recorded at, shard, stream time, value, previous
/// write of the key.
#[derive(serde::Serialize)]
struct OutcomeRow<'a>(&'a str, &'a str, &'a str, Option<u64>, Option<String>, i64, i64, i64, Option<String>, Option<String>);

/// The round's outcomes as they are recorded, and counted.
struct Outcomes<'a> {
    entry_of: &'a HashMap<String, (i64, i64)>,
    now: i64,
    rows: Vec<OutcomeRow<'a>>,
    per_shard: HashMap<u32, (u64, u64)>,
    applied: u64,
    rejected: u64,
}

impl<'a> Outcomes<'a> {
    #[allow(clippy::too_many_arguments, reason = "one per column of the row")]
    fn push(&mut self, id: &'a str, key: &'a str, status: &'a str, version: Option<u64>, reason: Option<String>, value: Option<String>, prev: Option<String>) {
        let (shard, ms) = self.entry_of.get(id).copied().unwrap_or((0, 0));
        let counts = self.per_shard.entry(shard as u32).or_default();
        if status == "applied" {
            counts.0 += 1;
            self.applied += 1;
        } else {
            counts.1 += 1;
            self.rejected += 1;
        }
        self.rows.push(OutcomeRow(id, key, status, version, reason, self.now, shard, ms, value, prev));
    }
}

/// One key's apply step: called again on an error, up to the attempt limit (a
/// trap ends the invocation instead).
fn step(s: &Settings, key: &str, value: Option<&Json>, version: u64, writes: &StepWrites<'_>, now: i64) -> StepResult {
    let mut result = Err("the apply step was not called".to_owned());
    for _ in 0..s.max_attempts.max(1) {
        #[cfg(not(feature = "builtin-apply"))]
        {
            result = pipeline::apply(key, value, version, writes, now);
        }
        #[cfg(feature = "builtin-apply")]
        {
            result = spillway_core::apply::builtin_step(key, value, version, writes, now);
        }
        if result.is_ok() {
            break;
        }
    }
    result
}

/// A careful round's blame markers (see `scripts::READ_BATCH`): one call per
/// server to start and to end the round, one per apply-step call.
struct Careful<'a> {
    s: &'a Settings,
    /// The round's shards with their lease tokens.
    shards: Vec<(u32, String)>,
}

impl<'a> Careful<'a> {
    fn new<'b>(s: &'a Settings, batches: impl Iterator<Item = &'b Batch>) -> Self {
        Self { s, shards: batches.map(|b| (b.shard, b.token.clone())).collect() }
    }

    fn marker_ttl_ms(&self) -> u64 {
        self.s.lease_ttl_ms.saturating_mul(3).max(60_000)
    }

    /// Every shard of the round marked, naming no write. Best effort here and
    /// below: unmarked, a trap counts against every write of the round, as any
    /// other failure does.
    async fn begin(&self) {
        let l = &self.s.layout;
        let shards: Vec<u32> = self.shards.iter().map(|(n, _)| *n).collect();
        for (address, group) in self.s.slot_groups(&shards) {
            spillway_spin::log_ignored("redelivery marker", Redis::new(address).call(&Call::mark_round(l, &group, self.marker_ttl_ms())).await);
        }
    }

    /// Names the writes of the coming call in their shard's marker (and takes
    /// the previous call's out); `marked` is that previous call.
    async fn mark(&self, marked: &mut Option<(u32, Vec<String>)>, writes: &StepWrites<'_>) {
        let l = &self.s.layout;
        // Write ids are `<shard>-<entry id>`.
        let split = |id: &str| id.split_once('-').map(|(shard, entry)| (shard.parse::<u32>().unwrap_or(u32::MAX), entry.to_owned()));
        let Some(shard) = writes.first().and_then(|(id, _)| split(id)).map(|(n, _)| n) else { return };
        let Some((_, token)) = self.shards.iter().find(|(n, _)| *n == shard) else { return };
        let entries: Vec<String> = writes.iter().filter_map(|(id, _)| split(id)).map(|(_, e)| e).collect();
        let previous = match marked.take() {
            Some((n, ids)) if n == shard => ids,
            Some((n, ids)) => {
                // The previous call's shard: its writes leave that marker.
                if let Some((_, token)) = self.shards.iter().find(|(m, _)| *m == n) {
                    let call = Call::mark_call(l, n, token, self.s.lease_ttl_ms, self.marker_ttl_ms(), &ids, &[]);
                    spillway_spin::log_ignored("redelivery marker", Redis::for_shard(self.s, n).call(&call).await);
                }
                Vec::new()
            }
            None => Vec::new(),
        };
        let call = Call::mark_call(l, shard, token, self.s.lease_ttl_ms, self.marker_ttl_ms(), &previous, &entries);
        spillway_spin::log_ignored("redelivery marker", Redis::for_shard(self.s, shard).call(&call).await);
        *marked = Some((shard, entries));
    }

    /// The calls are done: the markers go.
    async fn end(&self) {
        let l = &self.s.layout;
        let shards: Vec<u32> = self.shards.iter().map(|(n, _)| *n).collect();
        for (address, group) in self.s.slot_groups(&shards) {
            let keys = group.iter().map(|n| spillway_spin::bin(&l.applying(*n))).collect();
            spillway_spin::log_ignored("redelivery marker", Redis::new(address).execute("DEL", keys).await);
        }
    }
}
