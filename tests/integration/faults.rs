//! The fault suite: a workload whose every write is unique, a history of what
//! the client was told, a fault injected while it runs, and a checker that
//! reads the history and the database afterwards and reports what was lost,
//! duplicated, unexpected, out of order or stale, and how long the system took
//! to apply everything acknowledged once the fault healed.
//!
//! The workload appends a unique token per write to an array field of a few
//! keys, one client per key sending in order (each write with an
//! `Idempotency-Key`, retried with it on `503 outcome-unknown` as a client
//! should). A key's final array then says everything: a token missing that was
//! acknowledged is lost, one present twice is duplicated, one present that was
//! refused is unexpected, and the acknowledged tokens must appear in the order
//! they were acknowledged. After each write answered `200` (`Prefer: wait`) with
//! its version, the key is read at once: an older version is a stale read.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::pg::PgServer;
use crate::spillway::Spillway;
use crate::support::{AOF_ALWAYS, AOF_EVERYSEC, Redis, Tmpfs, eventually};

/// What the client was told about one write, in the end (after its retries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Accepted (202, or 200 with its outcome): the write id.
    Ok(String),
    /// Refused, and known to have changed nothing (4xx, `503 unavailable`
    /// before anything was sent is counted as unknown, to be safe).
    Fail,
    /// Unknown: a timeout, `503 outcome-unknown`, a dropped connection.
    Indeterminate,
}

/// One write of the history.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) key: String,
    pub(crate) token: String,
    pub(crate) outcome: Outcome,
}

/// A read of a key right after a write to it said `applied` at `expected`.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    pub(crate) expected: i64,
    pub(crate) got: i64,
}

/// What the client recorded.
#[derive(Debug, Default, Clone)]
pub(crate) struct History {
    /// Per key, in the order the client sent them (one client per key).
    pub(crate) ops: Vec<Op>,
    pub(crate) reads: Vec<Read>,
    /// The refusals the client was answered (and retried), by problem type.
    pub(crate) refused: BTreeMap<String, usize>,
}

impl History {
    /// Adds another client group's history (of other keys).
    pub(crate) fn merge(&mut self, other: Self) {
        self.ops.extend(other.ops);
        self.reads.extend(other.reads);
        for (kind, n) in other.refused {
            *self.refused.entry(kind).or_default() += n;
        }
    }
}

/// The checker's verdict on one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) writes: usize,
    pub(crate) acknowledged: usize,
    pub(crate) indeterminate: usize,
    pub(crate) lost: usize,
    pub(crate) duplicated: usize,
    pub(crate) unexpected: usize,
    pub(crate) order_violations: usize,
    pub(crate) stale_reads: usize,
}

impl Report {
    /// Whether the run kept the contract.
    pub(crate) fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.order_violations == 0 && self.stale_reads == 0
    }
}

/// Checks `history` against each key's final array of tokens.
pub(crate) fn check(history: &History, finals: &BTreeMap<String, Vec<String>>) -> Report {
    let mut r = Report { writes: history.ops.len(), ..Report::default() };
    let empty = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        let fin = finals.get(key).unwrap_or(&empty);
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for t in fin {
            *seen.entry(t.as_str()).or_default() += 1;
        }
        let position: HashMap<&str, usize> = fin.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        let mut last = None;
        for op in &ops {
            let count = seen.get(op.token.as_str()).copied().unwrap_or(0);
            r.duplicated += count.saturating_sub(1);
            match op.outcome {
                Outcome::Ok(_) => {
                    r.acknowledged += 1;
                    match position.get(op.token.as_str()) {
                        None => r.lost += 1,
                        Some(&p) => {
                            if last.is_some_and(|l| p < l) {
                                r.order_violations += 1;
                            }
                            last = Some(p);
                        }
                    }
                }
                Outcome::Fail if count > 0 => r.unexpected += 1,
                Outcome::Fail => {}
                Outcome::Indeterminate => r.indeterminate += 1,
            }
        }
        // Tokens no write of the history sent.
        r.unexpected += fin.iter().filter(|t| !ops.iter().any(|op| &op.token == *t)).count();
    }
    r.stale_reads = history.reads.iter().filter(|rd| rd.got < rd.expected).count();
    r
}

/// A small seeded generator (xorshift), so a scenario's timings repeat.
pub(crate) struct Seeded(u64);

impl Seeded {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `lo..hi`.
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo).max(1)
    }
}

/// The workload: `per_key` appends to each of `keys` keys, one client per key,
/// retrying a `503` with the same `Idempotency-Key` (honouring `Retry-After`)
/// until `give_up` has passed; returns the history. Each token ends with `pad`
/// (to make the writes larger); with `wait`, each write asks for its outcome
/// (`Prefer: wait=2`) and the key is read after it.
pub(crate) async fn workload(s: &Spillway, run: &str, keys: usize, per_key: usize, give_up: Duration, pad: &str, wait: bool) -> History {
    let clients = (0..keys).map(|k| async move {
        let key = format!("{run}-k{k}");
        let mut ops = Vec::new();
        let mut reads = Vec::new();
        let mut refused = BTreeMap::<String, usize>::new();
        for i in 0..per_key {
            let token = format!("{run}-{k}-{i}{pad}");
            let idem = format!("{run}-{k}-{i}");
            let body = json!({"key": key, "op": "append", "field": "log", "value": token});
            let started = Instant::now();
            let outcome = loop {
                let headers = [("idempotency-key", idem.as_str()), ("prefer", if wait { "wait=2" } else { "wait=0" })];
                let answer = tokio::time::timeout(Duration::from_secs(10), s.call("POST", "/v1/writes", Some(body.clone()), &headers)).await;
                let Ok((code, h, v)) = answer else { break Outcome::Indeterminate };
                if code == 429 || code == 503 {
                    let kind = v["type"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned();
                    *refused.entry(kind).or_default() += 1;
                }
                match code {
                    200 | 202 => {
                        if code == 200 && v["status"] == "applied" {
                            let (_, _, rec) = s.call("GET", &format!("/v1/records/{key}"), None, &[]).await;
                            if let (Some(expected), Some(got)) = (v["version"].as_i64(), rec["version"].as_i64()) {
                                reads.push(Read { expected, got });
                            }
                        }
                        break Outcome::Ok(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                    429 | 503 if started.elapsed() < give_up => {
                        let secs: u64 = h.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
                        tokio::time::sleep(Duration::from_millis(secs * 1000)).await;
                    }
                    // A refusal that says nothing was stored (the checker
                    // holds it to that: a refused write must never appear).
                    503 if refused_nothing_stored(&v) => break Outcome::Fail,
                    503 => break Outcome::Indeterminate,
                    _ => break Outcome::Fail,
                }
            };
            ops.push(Op { key: key.clone(), token, outcome });
        }
        (ops, reads, refused)
    });
    let mut h = History::default();
    for (ops, reads, refused) in futures::future::join_all(clients).await {
        h.merge(History { ops, reads, refused });
    }
    h
}

/// Whether a `503` says Redis refused the write, so nothing of it was stored.
fn refused_nothing_stored(v: &serde_json::Value) -> bool {
    let kind = v["type"].as_str().unwrap_or_default();
    ["redis-full", "redis-busy", "redis-cannot-persist", "redis-read-only"].iter().any(|k| kind.ends_with(k))
}

/// Waits (up to `bound`) until every acknowledged write of `h` is applied,
/// sending nothing that wakes the processor; returns how long it took, or
/// `None` if it did not happen within `bound`.
pub(crate) async fn recovered(s: &Spillway, h: &History, bound: Duration) -> Option<Duration> {
    let ids = h.ops.iter().filter_map(|op| match &op.outcome {
        Outcome::Ok(id) => Some(id.as_str()),
        _ => None,
    });
    all_applied(s, ids, Instant::now(), bound).await
}

/// Waits until every write of `ids` is applied: how long after `since` that
/// was, or `None` past `bound` (from `since`).
pub(crate) async fn all_applied(s: &Spillway, ids: impl IntoIterator<Item = &str>, since: Instant, bound: Duration) -> Option<Duration> {
    for id in ids {
        loop {
            let (_, _, v) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
            if v["status"] == "applied" {
                break;
            }
            if since.elapsed() > bound {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Some(since.elapsed())
}

/// Each key's final array, read from the database.
pub(crate) async fn finals(s: &Spillway, h: &History) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for op in &h.ops {
        if out.contains_key(&op.key) {
            continue;
        }
        let (_, _, v) = s.call("GET", &format!("/v1/records/{}?consistent=true", op.key), None, &[]).await;
        let log: Vec<String> = v["value"]["log"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()).unwrap_or_default();
        out.insert(op.key.clone(), log);
    }
    out
}

fn op(key: &str, token: &str, outcome: Outcome) -> Op {
    Op { key: key.into(), token: token.into(), outcome }
}

/// The checker on histories whose verdict is known: each defect is counted
/// where it is, and a clean run is clean.
#[test]
fn the_checker_counts_each_kind_of_defect() {
    let ok = |t: &str| Outcome::Ok(format!("id-{t}"));
    let h = History {
        ops: vec![
            op("a", "a1", ok("a1")),
            op("a", "a2", ok("a2")),
            op("a", "a3", Outcome::Indeterminate),
            op("a", "a4", Outcome::Fail),
            op("b", "b1", ok("b1")),
            op("b", "b2", ok("b2")),
            op("b", "b3", ok("b3")),
        ],
        reads: vec![Read { expected: 2, got: 2 }, Read { expected: 3, got: 1 }],
        refused: BTreeMap::new(),
    };
    let clean = BTreeMap::from([("a".to_owned(), vec!["a1".into(), "a2".into()]), ("b".to_owned(), vec!["b1".into(), "b2".into(), "b3".into()])]);
    let mut r = check(&History { reads: vec![], ..h.clone() }, &clean);
    assert_eq!(r, Report { writes: 7, acknowledged: 5, indeterminate: 1, ..Report::default() });
    assert!(r.clean());
    // a2 lost, a1 twice, a4 applied though refused, b's order broken, a token
    // nobody sent, one stale read.
    let broken = BTreeMap::from([
        ("a".to_owned(), vec!["a1".into(), "a1".into(), "a4".into(), "zz".into()]),
        ("b".to_owned(), vec!["b2".into(), "b1".into(), "b3".into()]),
    ]);
    r = check(&h, &broken);
    assert_eq!((r.lost, r.duplicated, r.unexpected, r.order_violations, r.stale_reads), (1, 1, 2, 1, 1), "{r:?}");
    assert!(!r.clean());
    // An indeterminate write may be applied (once) or not.
    let with_a3 = BTreeMap::from([("a".to_owned(), vec!["a1".into(), "a2".into(), "a3".into()]), ("b".to_owned(), vec!["b1".into(), "b2".into(), "b3".into()])]);
    assert!(check(&History { reads: vec![], ..h }, &with_a3).clean());
}

/// One scenario's result as the suite prints it (a row of the table in
/// docs/testing.md).
pub(crate) fn report_line(scenario: &str, r: &Report, recover: Option<Duration>) -> String {
    format!(
        "fault suite | {scenario} | writes {} | acknowledged {} | indeterminate {} | lost {} | duplicated {} | unexpected {} | order violations {} | stale reads {} | recovered in {}",
        r.writes,
        r.acknowledged,
        r.indeterminate,
        r.lost,
        r.duplicated,
        r.unexpected,
        r.order_violations,
        r.stale_reads,
        recover.map_or("never (within the bound)".to_owned(), |d| format!("{} ms", d.as_millis())),
    )
}

/// Redis paused (SIGSTOP) and resumed in seeded cycles while the workload
/// runs, the processor on its Redis trigger: nothing acknowledged is lost,
/// nothing doubled or reordered, no read after `applied` is stale, and
/// everything is applied once Redis stays up.
#[tokio::test(flavor = "multi_thread")]
async fn redis_stalled_in_cycles_keeps_the_contract() {
    let vars = [("call_timeout_ms", "300"), ("request_timeout_ms", "1000"), ("lease_ttl_ms", "1000")];
    let s = Spillway::builder().vars(&vars).with_trigger().start().await;
    let mut rng = Seeded::new(0x5eed_2101);
    let cycles: Vec<(u64, u64)> = (0..5).map(|_| (rng.between(150, 600), rng.between(200, 700))).collect();
    let faults = async {
        for (stalled, running) in &cycles {
            tokio::time::sleep(Duration::from_millis(*running)).await;
            s.redis.pause();
            tokio::time::sleep(Duration::from_millis(*stalled)).await;
            s.redis.resume();
        }
    };
    let (history, ()) = futures::future::join(workload(&s, "stall", 6, 30, Duration::from_secs(20), "", true), faults).await;
    let recover = recovered(&s, &history, Duration::from_secs(60)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{}", report_line("Redis stalled in cycles (SIGSTOP 150-600 ms, 5 times)", &report, recover));
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}; cycles {cycles:?}");
    assert_eq!(report.writes, 180);
    assert!(report.acknowledged > 0, "{report:?}");
}

/// The checker catches a broken run: Redis evicting keys under memory
/// pressure (`allkeys-lru`, a hazard Spillway reports) loses queued writes
/// that were acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn the_checker_flags_a_redis_that_evicts_queued_writes() {
    let s = Spillway::builder().start().await;
    let mut c = s.redis.conn();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok()).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + 400_000).query(&mut c).unwrap();
    // Writes of 4 KiB each, queued (no processor yet): more than fits.
    let history = workload(&s, "evict", 4, 60, Duration::from_secs(5), &format!("-{}", "x".repeat(4096)), false).await;
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).query(&mut c).unwrap();
    s.drain().await;
    let recover = recovered(&s, &history, Duration::from_secs(5)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{}", report_line("broken on purpose: Redis evicting (allkeys-lru, maxmemory)", &report, recover));
    assert!(report.lost > 0 && !report.clean(), "the checker must flag the evicted writes: {report:?}");
}

/// PostgreSQL crashed (SIGKILL to the postmaster and every backend, mid-round
/// or between rounds) and restarted on its data at seeded moments while the
/// workload runs, the processor on its Redis trigger: exactly once, in order,
/// nothing lost, everything applied once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_crashed_and_restarted_keeps_the_contract() {
    let mut pg = PgServer::start();
    let vars = [("call_timeout_ms", "500"), ("request_timeout_ms", "1500"), ("lease_ttl_ms", "1000")];
    let s = Spillway::builder().pg(pg.create_secured()).vars(&vars).with_trigger().start().await;
    let mut rng = Seeded::new(0x5eed_2102);
    let crashes: Vec<u64> = (0..3).map(|_| rng.between(300, 1200)).collect();
    let faults = async {
        for wait in &crashes {
            tokio::time::sleep(Duration::from_millis(*wait)).await;
            tokio::task::block_in_place(|| pg.crash_and_restart());
        }
    };
    let (history, ()) = futures::future::join(workload(&s, "pgcrash", 6, 30, Duration::from_secs(20), "", true), faults).await;
    let recover = recovered(&s, &history, Duration::from_secs(60)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{}", report_line("PostgreSQL crashed (SIGKILL) and restarted, 3 times", &report, recover));
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}; crashes after {crashes:?} ms");
    assert_eq!((report.writes, report.acknowledged + report.indeterminate), (180, 180), "{report:?}");
}

/// A connection to PostgreSQL dropped after a `COMMIT` reached the server and
/// before its answer came back (an ambiguous commit: a proxy in front of the
/// database cuts it), at seeded moments while the workload runs, the processor
/// on its Redis trigger. The processor cannot tell whether its round
/// committed; the batch is delivered again, found in the database and
/// acknowledged: exactly once, in order, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn an_ambiguous_commit_is_applied_exactly_once() {
    let db = crate::pg::PgDb::create_secured();
    let port: u16 = db.host.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the database's port");
    let cutter = crate::commit_cutter::CommitCutter::start(port).await;
    let via = |url: &str| url.replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{}", cutter.port));
    let proxied = crate::pg::PgDb { url: via(&db.url), host: via(&db.host), password: db.password.clone() };
    let vars = [("call_timeout_ms", "500"), ("request_timeout_ms", "1500"), ("lease_ttl_ms", "1000")];
    let s = Spillway::builder().pg(proxied).vars(&vars).with_trigger().start().await;
    let mut rng = Seeded::new(0x5eed_2109);
    let gaps: Vec<u64> = (0..4).map(|_| rng.between(200, 700)).collect();
    let faults = async {
        for gap in &gaps {
            tokio::time::sleep(Duration::from_millis(*gap)).await;
            cutter.arm();
        }
    };
    let (history, ()) = futures::future::join(workload(&s, "ambiguous", 6, 30, Duration::from_secs(20), "", true), faults).await;
    let recover = recovered(&s, &history, Duration::from_secs(60)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | commits cut {}", report_line("PostgreSQL connection dropped after COMMIT, before its answer", &report, recover), cutter.cut());
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}; gaps {gaps:?}");
    assert!(cutter.cut() > 0, "a commit was cut");
}

/// Redis busy running a long script (an operator's or another app's, killed
/// after a few hundred milliseconds with `SCRIPT KILL`), in seeded cycles,
/// while the workload runs, the processor on its Redis trigger: intake answers
/// `503 redis-busy` (nothing stored), never a 202 it cannot keep; nothing is
/// lost, doubled or reordered, and everything is applied once Redis is free.
#[tokio::test(flavor = "multi_thread")]
async fn redis_busy_with_a_long_script_refuses_and_loses_nothing() {
    let vars = [("call_timeout_ms", "1000"), ("request_timeout_ms", "2000"), ("lease_ttl_ms", "2000")];
    let s = Spillway::builder().vars(&vars).with_trigger().start().await;
    // Redis answers BUSY to everyone else once a script has run this long.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("busy-reply-threshold").arg(50).query(&mut s.redis.conn()).unwrap();
    let mut rng = Seeded::new(0x5eed_2103);
    let cycles: Vec<(u64, u64)> = (0..4).map(|_| (rng.between(300, 700), rng.between(200, 600))).collect();
    let faults = async {
        for (busy, running) in &cycles {
            let mut c = s.redis.conn();
            let script = std::thread::spawn(move || redis::cmd("EVAL").arg("while true do end").arg(0).query::<()>(&mut c));
            tokio::time::sleep(Duration::from_millis(*busy)).await;
            let mut killer = s.redis.conn();
            crate::support::eventually("SCRIPT KILL answered", Duration::from_secs(5), async || redis::cmd("SCRIPT").arg("KILL").query::<()>(&mut killer).is_ok()).await;
            assert!(script.join().unwrap().is_err(), "the script was killed");
            tokio::time::sleep(Duration::from_millis(*running)).await;
        }
    };
    // Half the clients wait for each write's outcome and read it back, half
    // only send (so that writes arrive while Redis is busy).
    let clients = futures::future::join(workload(&s, "busy-w", 3, 30, Duration::from_secs(20), "", true), workload(&s, "busy-s", 3, 100, Duration::from_secs(20), "", false));
    let ((mut history, sent), ()) = futures::future::join(clients, faults).await;
    history.merge(sent);
    let recover = recovered(&s, &history, Duration::from_secs(60)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | refusals {:?}", report_line("Redis busy running a script (300-700 ms, 4 times)", &report, recover), history.refused);
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}; cycles {cycles:?}");
    assert!(history.refused.get("redis-busy").is_some_and(|n| *n > 0), "intake said Redis was busy: {:?}", history.refused);
}

/// Redis at its `maxmemory` with `noeviction` (the policy Spillway asks for),
/// filled by queued writes while no processor runs: intake answers `503
/// redis-full` and stores nothing, never a 202; then the processor, run with
/// the limit unchanged, still drains the queue (its own scripts must run on a
/// full Redis: applying is what frees the memory), every acknowledged write is
/// applied, and intake accepts again.
#[tokio::test(flavor = "multi_thread")]
async fn redis_at_maxmemory_refuses_writes_and_the_processor_still_drains_it() {
    redis_at_maxmemory(&[]).await;
}

/// The same with the record cache in that Redis (`cache_store=redis`): a
/// round's cache refresh is refused too, and its entries are dropped instead
/// (before, the round failed and was redelivered for as long as Redis stayed
/// full, and the queue never shrank).
#[tokio::test(flavor = "multi_thread")]
async fn redis_at_maxmemory_with_the_cache_in_it_still_drains() {
    redis_at_maxmemory(&[("cache_store", "redis")]).await;
}

async fn redis_at_maxmemory(vars: &[(&str, &str)]) {
    let s = Spillway::builder().vars(vars).start().await;
    let mut c = s.redis.conn();
    // Warm: the scripts loaded, the connections open with their buffers
    // grown, then the queue applied, so that what is measured next is what
    // the app needs without a queue.
    let pad = format!("-{}", "x".repeat(4096));
    let warm = workload(&s, "oom-warm", 4, 4, Duration::ZERO, &pad, false).await;
    assert!(warm.ops.iter().all(|op| matches!(op.outcome, Outcome::Ok(_))));
    s.drain().await;
    let info: String = redis::cmd("INFO").arg("memory").query(&mut c).unwrap();
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok()).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(used + 400_000).query(&mut c).unwrap();
    // Writes of 4 KiB each, queued: more than fits. A refused write is given
    // up at once (the processor is not running to make room).
    let history = workload(&s, "oom", 4, 60, Duration::ZERO, &pad, false).await;
    let refused = history.refused.get("redis-full").copied().unwrap_or(0);
    assert!(refused > 0, "Redis filled up and intake said so: {:?}", history.refused);
    for _ in 0..3 {
        s.drain().await;
    }
    let recover = recovered(&s, &history, Duration::from_secs(10)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | refusals {:?}", report_line("Redis at maxmemory (noeviction), drained without raising it", &report, recover), history.refused);
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
    assert!(report.acknowledged > 0 && report.acknowledged < report.writes, "{report:?}");
    let (code, v) = s.write(json!({"key": "after-oom", "op": "put", "value": pad})).await;
    assert_eq!(code, 202, "the drained queue made room: {v}");
}

/// Whether the write `id` is applied (`GET /v1/writes/{id}`).
async fn applied(s: &Spillway, id: &str) -> bool {
    s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await.2["status"] == "applied"
}

/// The database and the local key-value store (the record cache) on a disk
/// that fills up: a round cannot commit (SQLite answers `SQLITE_FULL`) or
/// cannot refresh the cache, so it is rolled back and its batch stays queued;
/// intake, on Redis, goes on accepting. Once space is given back (at a seeded
/// moment, the workload running, the processor on its Redis trigger)
/// everything is applied once, in order, and no read after `applied` is stale.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_the_database_rolls_rounds_back_and_loses_nothing() {
    let vars = [("lease_ttl_ms", "1000")];
    let s = Spillway::builder().disk(4 << 20).vars(&vars).with_trigger().start().await;
    // The database and the store exist, with their schema, before the disk fills.
    let warm = workload(&s, "disk-warm", 2, 2, Duration::ZERO, "", true).await;
    assert!(warm.ops.iter().all(|op| matches!(op.outcome, Outcome::Ok(_))), "{warm:?}");
    let disk = s.disk.as_ref().unwrap();
    disk.fill();
    // Space the files already have (free pages, a WAL already that long)
    // takes a few commits; then a round cannot commit and its write stays
    // queued.
    let big = "x".repeat(60 << 10);
    let mut stuck = None;
    for n in 0..40 {
        let (code, v) = s.write(json!({"key": format!("disk-probe-{n}"), "op": "put", "value": big})).await;
        assert_eq!(code, 202, "intake does not need the disk: {v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let _ = s.admin("POST", "/v1/drain", None).await;
        if !applied(&s, &id).await {
            stuck = Some(n);
            break;
        }
    }
    let stuck = stuck.expect("a round failed on the full disk");
    let mut rng = Seeded::new(0x5eed_2106);
    let full_for = rng.between(800, 2000);
    let faults = async {
        tokio::time::sleep(Duration::from_millis(full_for)).await;
        disk.free();
    };
    let (history, ()) = futures::future::join(workload(&s, "disk", 6, 30, Duration::from_secs(20), "-0123456789abcdef", true), faults).await;
    s.drain().await;
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | a round failed after {stuck} probes", report_line(&format!("the database's disk full for {full_for} ms"), &report, recover));
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
    assert_eq!(report.acknowledged, report.writes, "intake accepted every write: {report:?}");
}

/// What the full disk found: a batch failing on the database was retried at
/// once by every drain that looked for work (every other shard's doorbell),
/// so a write burnt its `max_attempts` within a second and a short outage
/// dead-lettered it. A failed batch now backs off (`retry_backoff_ms`,
/// doubling per failed delivery): other shards' traffic does not take it,
/// the end of the backoff retries it with no traffic, and an operator's drain
/// retries at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_batch_backs_off_instead_of_burning_its_attempts() {
    let vars = [("max_attempts", "2"), ("retry_backoff_ms", "3000"), ("lease_ttl_ms", "1000")];
    let s = Spillway::builder().vars(&vars).with_trigger().start().await;
    s.store.fail_records().await;
    let l = crate::support::layout();
    let failures = |id: &str| {
        let first = format!("\"first\":\"{id}\"");
        s.app.guest_output().lines().filter(|line| line.contains("\"event\":\"batch_failed\"") && line.contains(&first)).count()
    };
    let (_, v) = s.write(json!({"key": "backoff-a", "op": "put", "value": 1})).await;
    let a = v["id"].as_str().unwrap().to_owned();
    let shard_a = l.shard_of("backoff-a");
    let lease = || -> Option<String> { redis::cmd("GET").arg(l.lease(shard_a)).query(&mut s.redis.conn()).unwrap() };
    eventually("the failed batch backs off", Duration::from_secs(5), async || failures(&a) == 1 && lease().as_deref() == Some("backoff")).await;
    // Writes to six other shards: each rings, and each drain looks for work.
    let mut shards = std::collections::BTreeSet::from([shard_a]);
    let others: Vec<String> = (0..).map(|n| format!("backoff-other-{n}")).filter(|k| shards.insert(l.shard_of(k))).take(6).collect();
    let mut ids = Vec::new();
    for key in &others {
        let (code, v) = s.write(json!({"key": key, "op": "put", "value": 1})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    eventually("the other shards' batches were tried", Duration::from_secs(5), async || ids.iter().all(|id| failures(id) >= 1)).await;
    assert_eq!((failures(&a), lease().as_deref()), (1, Some("backoff")), "no drain took the shard while it backs off");
    let (_, _, stats) = s.admin("GET", "/v1/stats", None).await;
    let listed = stats["shards"].as_array().unwrap().iter().find(|sh| sh["shard"] == shard_a).cloned().unwrap_or_default();
    assert_eq!(listed["lease"]["holder"], "backoff", "the stats say the shard backs off: {listed}");
    // The backoff's end is the retry, with no traffic.
    eventually("the backoff's end retries the batch", Duration::from_secs(10), async || failures(&a) == 2).await;
    assert_eq!(s.call("GET", &format!("/v1/writes/{a}"), None, &[]).await.2["status"], "pending", "two deliveries, not yet past max_attempts");
    // An operator's drain does not wait for the (now doubled) backoff.
    s.drain().await;
    assert_eq!(s.call("GET", &format!("/v1/writes/{a}"), None, &[]).await.2["status"], "dead");
}

/// Spillway (on its Redis trigger) on a Redis with `persistence` whose data
/// directory is a 2 MiB tmpfs, returned to fill.
async fn on_a_small_disk(persistence: &'static [&'static str]) -> (Tmpfs, Spillway) {
    let dir = tempfile::tempdir().unwrap().keep();
    let disk = Tmpfs::mount_on(&dir, 2 << 20);
    let vars = [("call_timeout_ms", "500"), ("request_timeout_ms", "1500"), ("lease_ttl_ms", "1000")];
    let s = Spillway::builder().redis(Redis::start_in(persistence, &dir)).vars(&vars).with_trigger().start().await;
    (disk, s)
}

/// Redis's AOF on a disk that fills up, with `appendfsync always` (what the
/// operator guide asks for): Redis cannot write a write's record, so it exits
/// before answering it: no 202 for a write that is not on disk. Given space
/// back, it is restarted on its AOF (and the processor with it, as an
/// orchestrator does): every acknowledged write is there and applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_redis_aof_always_stops_redis_before_an_unsaved_202() {
    let (disk, s) = on_a_small_disk(AOF_ALWAYS).await;
    let mut rng = Seeded::new(0x5eed_2107);
    let (full_after, down_for) = (rng.between(300, 900), rng.between(300, 900));
    let faults = async {
        tokio::time::sleep(Duration::from_millis(full_after)).await;
        disk.fill();
        eventually("Redis exits on its AOF write error", Duration::from_secs(10), async || s.redis.exited()).await;
        let (down, _) = s.write(json!({"key": "aof-full-probe", "op": "put", "value": 1})).await;
        tokio::time::sleep(Duration::from_millis(down_for)).await;
        disk.free();
        tokio::task::block_in_place(|| s.redis.restart());
        s.start_trigger().await;
        down
    };
    let (history, down) = futures::future::join(workload(&s, "aof-full", 6, 30, Duration::from_secs(20), "-0123456789abcdef", true), faults).await;
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | refusals {:?}", report_line("Redis's AOF disk full (appendfsync always): Redis exits, restarted on its AOF", &report, recover), history.refused);
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
    assert_eq!(down, 503, "Redis was down and intake said so");
}

/// Redis's AOF on a disk that fills up, with `appendfsync everysec`: Redis
/// keeps running but refuses writes (`MISCONF`), which intake answers `503
/// redis-cannot-persist` (nothing stored); once space is back Redis writes
/// its AOF again by itself, and everything acknowledged is applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_redis_aof_everysec_refuses_writes_until_space_returns() {
    let (disk, s) = on_a_small_disk(AOF_EVERYSEC).await;
    let mut rng = Seeded::new(0x5eed_2108);
    let (full_after, full_for) = (rng.between(300, 900), rng.between(500, 1500));
    let aof_status = || -> String {
        let info: String = redis::cmd("INFO").arg("persistence").query(&mut s.redis.conn()).unwrap();
        info.lines().find_map(|l| l.strip_prefix("aof_last_write_status:")).unwrap_or_default().trim().to_owned()
    };
    let faults = async {
        tokio::time::sleep(Duration::from_millis(full_after)).await;
        disk.fill();
        eventually("Redis fails to write its AOF", Duration::from_secs(10), async || aof_status() == "err").await;
        // A write sent now is refused, and says nothing was stored.
        let (code, refused) = s.write(json!({"key": "aof-misconf-probe", "op": "put", "value": 1})).await;
        tokio::time::sleep(Duration::from_millis(full_for)).await;
        disk.free();
        eventually("Redis writes its AOF again", Duration::from_secs(10), async || aof_status() == "ok").await;
        (code, refused)
    };
    let (history, (code, refused)) = futures::future::join(workload(&s, "aof-misconf", 6, 30, Duration::from_secs(20), "-0123456789abcdef", true), faults).await;
    assert_eq!((code, refused["type"].as_str()), (503, Some("https://spillway.dev/problems/redis-cannot-persist")), "{refused}");
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    eprintln!("{} | refusals {:?}", report_line("Redis's AOF disk full (appendfsync everysec): writes refused (MISCONF)", &report, recover), history.refused);
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
    let (_, _, probe) = s.call("GET", "/v1/records/aof-misconf-probe?consistent=true", None, &[]).await;
    assert_eq!(probe["type"], "https://spillway.dev/problems/not-found", "the refused write was not stored: {probe}");
}

/// A lease that disappears early, mid-tenure (a clock jump on the Redis host
/// expires it; modelled by deleting it) while its holder, a processor process
/// on its Redis trigger, is paused (SIGSTOP) with its batch read: another
/// processor takes the shard, applies the batch and moves the fence on; the
/// first one, resumed, must be fenced off. Five seeded cycles while the
/// workload runs: nothing lost, doubled or reordered, no stale read.
///
/// It once found a stale read (1 in 240) while the two processors' caches were
/// two stores (the in-process host's and the process's own), which no
/// deployment of several processors has; they share one on Redis now, as a
/// deployment must, and the pause lands while the lease is held every cycle.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_that_disappears_early_is_fenced() {
    let db = crate::pg::PgDb::create_secured();
    let vars = [("lease_ttl_ms", "3000")];
    // One cache for both processors (on Redis), as a deployment shares it.
    let s = Spillway::builder().pg(db.clone()).kv_on_redis().vars(&vars).start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, full) = crate::processes::manifests(dir.path());
    let pg_vars = [("database", db.url.as_str()), ("database_host", db.host.as_str()), ("lease_ttl_ms", "3000")];
    let rc = crate::processes::cache_on_redis(dir.path(), &s.redis.url());
    let a = crate::processes::spawn_with(None, &full, dir.path(), &s.redis.url(), &pg_vars, &["--runtime-config-file", rc.to_str().unwrap()]);
    let leases: Vec<String> = (0..crate::support::layout().shards).map(|n| crate::support::layout().lease(n)).collect();
    let mut rng = Seeded::new(0x5eed_2104);
    let gaps: Vec<u64> = (0..5).map(|_| rng.between(50, 300)).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let faults = async {
        let mut c = s.redis.conn();
        let mut paused_holding = 0;
        for (cycle, gap) in gaps.iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(*gap)).await;
            // Paused while it holds a lease (it is the only processor running).
            // A round holds one for milliseconds, so the pause may land just
            // after it let go: then it is resumed and the pause tried again.
            let started = Instant::now();
            loop {
                while redis::cmd("EXISTS").arg(&leases).query::<i64>(&mut c).unwrap() == 0 {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        return paused_holding;
                    }
                    assert!(started.elapsed() < Duration::from_secs(10), "cycle {cycle}: the processor never held a lease: {}", a.stderr.lock().unwrap().join("\n"));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                nix_signal(a.child.id(), "STOP");
                if redis::cmd("DEL").arg(&leases).query::<i64>(&mut c).unwrap() > 0 {
                    paused_holding += 1;
                    break;
                }
                nix_signal(a.child.id(), "CONT");
            }
            // The other processor's round may time out, waiting on a row
            // lock the paused one holds mid-transaction: it is tried again.
            let (code, _, v) = s.admin("POST", "/v1/drain", None).await;
            assert!(code == 200 || v["type"] == "https://spillway.dev/problems/database-timeout", "{code} {v}");
            nix_signal(a.child.id(), "CONT");
        }
        paused_holding
    };
    // Half the clients wait for each write's outcome and read it back, half
    // only send: they keep the processor in its rounds, holding leases.
    let clients = async {
        let h = futures::future::join(workload(&s, "lease-w", 3, 40, Duration::from_secs(20), "", true), workload(&s, "lease-s", 3, 120, Duration::from_secs(20), "", false)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        h
    };
    let ((mut history, sent), paused_holding) = futures::future::join(clients, faults).await;
    history.merge(sent);
    s.drain().await;
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    let fenced = a.stderr.lock().unwrap().iter().filter(|l| l.contains("\"event\":\"batch_fenced\"")).count();
    eprintln!("{} | paused holding a lease {paused_holding} times, its batch fenced off {fenced} times", report_line("a lease deleted early while its holder is paused, another processor draining", &report, recover));
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}; gaps {gaps:?}");
    assert!(paused_holding > 0, "the fault hit a lease holder");
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn nix_signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid}");
}
