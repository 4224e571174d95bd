//! The capacity model's inputs (`docs/capacity.md`): what each kind of
//! request costs Redis, the database and the host, measured one kind at a time
//! on servers of the step's own (a fresh Redis holding the queue and the
//! cache, a database on the benchmark's PostgreSQL, one host serving HTTP and
//! another the processor, started once the writes are in); and Spillway end
//! to end on a three-master Redis Cluster against one Redis, in turns.
//!
//! Costs are CPU time (Redis's `used_cpu_*`, the host process's `utime` +
//! `stime`), not wall time: they add up however the machine's cores are
//! shared, which is what a capacity model needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use spillway_core::cluster::{SlotMap, key_slot, node_url};
use spillway_core::layout::Layout;
use spillway_redis_server::RedisServer;

use crate::load::{self, request};
use crate::report::Row;
use crate::{batch, end_to_end, host_with_env, incr, workspace};

/// Redis's counters: calls per command (the commands scripts run included,
/// as Redis counts them) and its CPU seconds.
struct RedisCounts {
    calls: BTreeMap<String, u64>,
    cpu_s: f64,
}

fn redis_counts(c: &mut redis::Connection) -> anyhow::Result<RedisCounts> {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(c)?;
    let mut calls = BTreeMap::new();
    for line in stats.lines() {
        let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let n = fields.split(',').find_map(|f| f.strip_prefix("calls=")).context("cmdstat without calls")?;
        calls.insert(name.to_owned(), n.parse()?);
    }
    let cpu: String = redis::cmd("INFO").arg("cpu").query(c)?;
    let field = |name: &str| cpu.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    Ok(RedisCounts { calls, cpu_s: field("used_cpu_user:") + field("used_cpu_sys:") })
}

/// A process's CPU seconds (user + system).
fn process_cpu_s(pid: u32) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf").arg("CLK_TCK").output();
        out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / ticks
}

/// CPU seconds of every PostgreSQL process now running (the server's
/// backends; the benchmark runs one server).
fn postgres_cpu_s() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(process_cpu_s)
        .sum()
}

/// The database's counters, from `pg_stat_statements`: statements (the
/// benchmark's own left out), transactions (`COMMIT`s), rows written.
#[derive(Default, Clone, Copy)]
struct DbCounts {
    statements: f64,
    transactions: f64,
    rows_written: f64,
    /// Its processes' CPU seconds.
    cpu_s: f64,
}

fn db_counts(db: &spillway_pg_server::PgDb) -> Option<DbCounts> {
    let row = db
        .sql(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(calls) FILTER (WHERE upper(query) LIKE 'COMMIT%'), 0), \
             coalesce(sum(rows) FILTER (WHERE upper(ltrim(query)) ~ '^(INSERT|UPDATE|DELETE|WITH)'), 0) \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query NOT LIKE '%pg_stat%'",
        )
        .ok()?;
    let n: Vec<f64> = row.trim().split('|').filter_map(|f| f.parse().ok()).collect();
    (n.len() == 3).then(|| DbCounts { statements: n[0], transactions: n[1], rows_written: n[2], cpu_s: postgres_cpu_s() })
}

/// What one phase cost, per operation.
struct Phase {
    ops: u64,
    /// Redis commands per operation, by command (the benchmark's own left
    /// out).
    calls: BTreeMap<String, f64>,
    redis_cpu_us: f64,
    host_cpu_us: f64,
    db: Option<DbCounts>,
}

impl Phase {
    fn calls_per_op(&self) -> f64 {
        self.calls.values().sum()
    }

    /// The commands that make up most of the calls, most first.
    fn top_calls(&self) -> String {
        let mut v: Vec<(&String, &f64)> = self.calls.iter().filter(|(_, n)| **n >= 0.005).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        v.iter().take(8).map(|(name, n)| format!("{n:.2} {name}")).collect::<Vec<_>>().join(", ")
    }
}

/// Counters before a phase.
struct Mark {
    redis: RedisCounts,
    host_cpu_s: f64,
    db: Option<DbCounts>,
}

fn mark(redis: &mut redis::Connection, pid: u32, db: Option<&spillway_pg_server::PgDb>) -> anyhow::Result<Mark> {
    Ok(Mark { redis: redis_counts(redis)?, host_cpu_s: process_cpu_s(pid), db: db.and_then(db_counts) })
}

/// The phase since `before`: `ops` operations, `polls` of `XLEN` the
/// benchmark made itself (and its `INFO`s) left out.
fn since(before: &Mark, redis: &mut redis::Connection, pid: u32, db: Option<&spillway_pg_server::PgDb>, ops: u64, polls: u64) -> anyhow::Result<Phase> {
    let after = redis_counts(redis)?;
    let per = |n: f64| n / ops.max(1) as f64;
    let mut calls = BTreeMap::new();
    for (name, n) in &after.calls {
        let mut delta = n.saturating_sub(before.redis.calls.get(name).copied().unwrap_or(0));
        match name.as_str() {
            "info" => continue,
            "xlen" => delta = delta.saturating_sub(polls),
            _ => {}
        }
        if delta > 0 {
            calls.insert(name.clone(), per(delta as f64));
        }
    }
    let db = match (before.db, db.and_then(db_counts)) {
        (Some(b), Some(a)) => Some(DbCounts {
            statements: a.statements - b.statements,
            transactions: a.transactions - b.transactions,
            rows_written: a.rows_written - b.rows_written,
            cpu_s: a.cpu_s - b.cpu_s,
        }),
        _ => None,
    };
    Ok(Phase {
        ops,
        calls,
        redis_cpu_us: per((after.cpu_s - before.redis.cpu_s) * 1e6),
        host_cpu_us: per((process_cpu_s(pid) - before.host_cpu_s) * 1e6),
        db,
    })
}

/// Waits until `layout`'s streams on `redis` are empty; how many `XLEN`s that
/// took.
async fn drained(redis: &mut redis::Connection, layout: &Layout, bound: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut polls = 0;
    loop {
        let mut queued = 0;
        for s in 0..layout.shards {
            queued += redis::cmd("XLEN").arg(layout.stream(s)).query::<u64>(redis)?;
            polls += 1;
        }
        if queued == 0 {
            return Ok(polls);
        }
        anyhow::ensure!(start.elapsed() < bound, "{queued} writes still queued after {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn phase_row(scenario: &str, p: &Phase, host: &str) -> Row {
    let mut note = format!("Redis CPU {:.1} µs/op; {host} CPU {:.1} µs/op; commands: {}", p.redis_cpu_us, p.host_cpu_us, p.top_calls());
    if let Some(db) = p.db {
        let rounds = db.transactions.max(1.0);
        note.push_str(&format!(
            "; database: {:.0} transactions ({:.0} writes, {:.1} statements and {:.0} rows written per transaction), PostgreSQL CPU {:.1} µs/op",
            db.transactions,
            p.ops as f64 / rounds,
            db.statements / rounds,
            db.rows_written / rounds,
            db.cpu_s * 1e6 / p.ops.max(1) as f64
        ));
    }
    Row { scenario: scenario.to_owned(), value: p.calls_per_op(), unit: "Redis cmds/op", latency: None, baseline: None, peak_rss_mib: None, note }
}

/// The repository's manifest without its Redis triggers (intake and reads
/// only: no processing), every path absolute.
fn http_only_part(target: &Path) -> anyhow::Result<String> {
    let full = std::fs::read_to_string(workspace().join("spin.toml"))?;
    let blocks: Vec<&str> = full.split("\n\n").filter(|b| !b.contains("[[trigger.redis]]")).collect();
    Ok(blocks.join("\n\n").replace("= \"target/", &format!("= \"{}/", target.display())))
}

/// The cost rows: single writes, batch writes, applying them, warm reads.
pub(crate) async fn costs(target: &Path, work: &Path, clients: usize, duration: Duration) -> anyhow::Result<Vec<Row>> {
    let server = RedisServer::start();
    let url = server.url();
    let mut redis = server.conn();
    let db = spillway_pg_server::installed().then(spillway_pg_server::PgDb::create);
    if let Some(db) = &db {
        db.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").map_err(|e| anyhow::anyhow!("pg_stat_statements: {e}"))?;
    }
    let rc = work.join("capacity-runtime-config.toml");
    std::fs::write(&rc, format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{url}\"\n"))?;
    let rc_arg = rc.to_str().context("a UTF-8 path")?;
    let mut vars = vec![("redis_address", url.as_str()), ("admin_token", "bench"), ("queue_depth_limit", "100000000")];
    if let Some(db) = &db {
        vars.extend([("database", db.url.as_str()), ("database_host", db.host.as_str())]);
    }
    let front_toml = work.join("capacity-front.toml");
    std::fs::write(&front_toml, http_only_part(target)?)?;
    let args = ["--runtime-config-file", rc_arg];
    let (front, front_addr) = host_with_env(target, &front_toml, &work.join("capacity-front"), &vars, &[], &args)?;
    let front_pid = front.0.id();
    let layout = Layout { prefix: "spillway:".into(), shards: 16 };
    let mut rows = Vec::new();

    let m = mark(&mut redis, front_pid, db.as_ref())?;
    let single = load::http(&front_addr, clients, duration, 1, |c, n| request("POST", "/v1/writes", &incr(&format!("k{}", (c as u64 * 7919 + n) % 1000)))).await?;
    rows.push(phase_row("capacity: a single write accepted (one per request)", &since(&m, &mut redis, front_pid, None, single.ops, 0)?, "host"));

    let m = mark(&mut redis, front_pid, db.as_ref())?;
    let batches = load::http(&front_addr, clients, duration.min(Duration::from_secs(3)), 100, |c, n| request("POST", "/v1/writes", &batch((c * 1_000_000) + n as usize * 100, 1000))).await?;
    rows.push(phase_row("capacity: a write accepted in a batch of 100", &since(&m, &mut redis, front_pid, None, batches.ops, 0)?, "host"));

    // The processor, on a host of its own, applies what is queued.
    let (processor, _) = host_with_env(target, &workspace().join("spin.toml"), &work.join("capacity-processor"), &vars, &[], &args)?;
    let processor_pid = processor.0.id();
    let m = mark(&mut redis, processor_pid, db.as_ref())?;
    let polls = drained(&mut redis, &layout, Duration::from_secs(900)).await?;
    rows.push(phase_row("capacity: a write applied (its share of a round)", &since(&m, &mut redis, processor_pid, db.as_ref(), single.ops + batches.ops, polls)?, "processor host"));
    drop(processor);

    // Every key's record is in the cache now (the processor's refresh).
    let m = mark(&mut redis, front_pid, db.as_ref())?;
    let reads = load::http(&front_addr, clients, duration, 1, |c, n| request("GET", &format!("/v1/records/k{}", (c as u64 * 7919 + n) % 1000), "")).await?;
    anyhow::ensure!(reads.failed.0 == 0, "warm reads failed: {:?}", reads.failed.1);
    rows.push(phase_row("capacity: a warm read (cache on Redis)", &since(&m, &mut redis, front_pid, None, reads.ops, 0)?, "host"));
    drop(front);
    Ok(rows)
}

/// `XLEN` of every shard's stream on a cluster, each at the node that owns it.
struct ClusterQueue {
    conns: Vec<redis::Connection>,
    owner: Vec<usize>,
}

impl ClusterQueue {
    fn new(nodes: &[RedisServer], layout: &Layout) -> anyhow::Result<Self> {
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut nodes[0].conn())?;
        let map = SlotMap::parse_nodes(&text).map_err(|e| anyhow::anyhow!(e))?;
        let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
        let owner = (0..layout.shards)
            .map(|s| {
                let node = map.owner(key_slot(layout.stream(s).as_bytes())).context("an unowned slot")?;
                urls.iter().position(|u| *u == node_url(u, node)).context("an owner among the nodes")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { conns: nodes.iter().map(RedisServer::conn).collect(), owner })
    }
}

impl crate::Queue for ClusterQueue {
    fn queued(&mut self, layout: &Layout) -> anyhow::Result<u64> {
        let mut n = 0;
        for s in 0..layout.shards {
            n += redis::cmd("XLEN").arg(layout.stream(s)).query::<u64>(&mut self.conns[self.owner[s as usize]])?;
        }
        Ok(n)
    }
}

/// End to end (`writes` increments over 1,000 keys) on a fresh three-master
/// cluster given one seed, against the same on a fresh single Redis, in turns.
pub(crate) async fn cluster_against_one(target: &Path, work: &Path, writes: usize) -> anyhow::Result<Row> {
    let layout = Layout { prefix: "spillway:".into(), shards: 16 };
    let nodes = RedisServer::start_cluster(3, 0);
    let seed = nodes[0].url();
    let vars = [("redis_address", seed.as_str()), ("admin_token", "bench"), ("queue_depth_limit", "100000000"), ("redis_cluster", "true"), ("shard_redis_hosts", "redis://127.0.0.1:*")];
    let (p, addr) = host_with_env(target, &workspace().join("spin.toml"), &work.join("cluster-state"), &vars, &[], &[])?;
    let mut queue = ClusterQueue::new(&nodes, &layout)?;
    let on_cluster = end_to_end(&addr, &mut queue, &layout, writes, 1000).await?;
    drop(p);

    let one = RedisServer::start();
    let url = one.url();
    let vars = [("redis_address", url.as_str()), ("admin_token", "bench"), ("queue_depth_limit", "100000000")];
    let (p, addr) = host_with_env(target, &workspace().join("spin.toml"), &work.join("one-redis-state"), &vars, &[], &[])?;
    let on_one = end_to_end(&addr, &mut one.conn(), &layout, writes, 1000).await?;
    drop(p);
    Ok(Row {
        scenario: format!("end to end on a three-master Redis Cluster (one seed given), {writes} writes over 1,000 keys"),
        value: on_cluster,
        unit: "writes/s",
        latency: None,
        baseline: Some(("one Redis, the same job".into(), on_one)),
        peak_rss_mib: None,
        note: "each shard's calls at its own node: a batch's writes are enqueued with one call per shard instead of one per server".into(),
    })
}
