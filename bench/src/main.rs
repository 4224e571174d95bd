//! Spillway's benchmark: every figure next to a baseline measured in the same run,
//! reported as a ratio (the machines are shared and noisy; ratios travel).
//!
//! Baselines: the floor (a hello-world spin-sdk 7 component on the same host), the
//! Redis ceiling (intake's enqueue script run natively), the naive design (each
//! write straight into SQLite with a read-modify-write, no queue) and the peer
//! (BullMQ from the npm registry doing the same job on the same Redis, when `node`
//! and `npm` are there). Spillway: single-write intake, warm reads, batch intake,
//! and end to end (accepted -> applied) over 1,000 keys, 1 key and 100,000 keys.
//!
//! By default everything runs here: a `redis-server` of its own and the embedded
//! host (`spillway-host up`) serving the repository's `spin.toml`; with `--url` and
//! `--redis` the Spillway scenarios go to a running app instead (e.g. `spin up`).
//! Writes `RESULTS.md` and `results.png` into `--out`.
//!
//! # Layout
//!
//! - [`load`]: HTTP and Redis load generators with HDR histograms.
//! - [`report`]: the table, `RESULTS.md` and the chart.
//! - this file: arguments, the processes under test, the scenarios.

mod capacity;
mod load;
mod report;
mod schedule;
mod single;
mod tenants;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use spillway_core::call::{Call, EnqueueLimits, Queued};
use spillway_core::layout::Layout;
use spillway_core::scripts;
use spillway_core::schedule::Timing;

use crate::load::request;
use crate::report::Row;

/// Spillway's benchmark (see the crate docs).
#[derive(Parser)]
struct Args {
    /// Seconds per timed scenario.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Concurrent HTTP clients of the timed scenarios.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Writes per end-to-end scenario.
    #[arg(long, default_value_t = 100_000)]
    writes: usize,
    /// A seconds-long run that checks the benchmark works (CI): 1 s scenarios,
    /// 2,000 writes, no BullMQ. Its figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Base URL of a running Spillway (e.g. `http://127.0.0.1:3000` of `spin up`)
    /// instead of the embedded host; needs `--redis`.
    #[arg(long, requires = "redis")]
    url: Option<String>,
    /// The Redis that Spillway at `--url` uses (queue depths are read there; BullMQ
    /// and the Redis ceiling run there too).
    #[arg(long)]
    redis: Option<String>,
    /// Leave BullMQ out.
    #[arg(long)]
    no_bullmq: bool,
    /// Measure only the capacity model's inputs (docs/capacity.md) and print
    /// them; nothing is written.
    #[arg(long, conflicts_with = "url")]
    capacity_only: bool,
    /// Measure only fairness between tenants (a quiet one beside a flood)
    /// and print it; nothing is written.
    #[arg(long, conflicts_with_all = ["url", "capacity_only"])]
    tenants_only: bool,
    /// Measure only single writes against their shape (at `--clients` and at
    /// one client) and the Redis commands per write, and print them.
    #[arg(long, conflicts_with_all = ["capacity_only", "tenants_only"])]
    single_only: bool,
    /// The baselines (hello-world, shapes, naive) served elsewhere, e.g. by
    /// `spin up -f <the bench's baseline.toml>` beside Spillway's own `spin
    /// up` at `--url`, instead of by the embedded host.
    #[arg(long, requires = "url")]
    baseline_url: Option<String>,
    /// Where `RESULTS.md` and `results.png` go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// The embedded host's program to run (e.g. the one `cargo test` leaves in
    /// `target/debug/spillway-host-under-test`); by default `spillway-host` is
    /// built first.
    #[arg(long)]
    host: Option<PathBuf>,
    /// TrueType font for the chart's text.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("the workspace exists")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(spillway_redis_server::free_port())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the components, the fixtures and the host; and the processor with the
/// built-in operations called in process (`builtin-apply`: no component
/// boundary), kept as `processor_builtin_apply.wasm`, the apply step's baseline.
fn build(host: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from);
    let wasm = target.join("wasm32-wasip2/release");
    let guest = || {
        let mut c = Command::new(&cargo);
        c.current_dir(workspace()).args(["build", "--release", "--target", "wasm32-wasip2"]);
        c
    };
    run(guest().args(["-p", "processor", "--features", "builtin-apply"]))?;
    std::fs::copy(wasm.join("processor.wasm"), wasm.join("processor_builtin_apply.wasm"))?;
    run(guest().args(["-p", "intake", "-p", "processor", "-p", "cache", "-p", "apply-builtin", "-p", "fixture-hello", "-p", "fixture-naive", "-p", "fixture-shapes"]))?;
    let host = match host {
        Some(host) => host.to_path_buf(),
        None => {
            run(Command::new(&cargo).current_dir(workspace()).args(["build", "-p", "spillway-testhost"]))?;
            target.join("debug/spillway-host")
        }
    };
    HOST.set(host).map_err(|_| anyhow::anyhow!("the host was built twice"))?;
    Ok(target)
}

/// The repository's manifest with the processor built with `builtin-apply` (the
/// built-in operations in process) and so without its apply-step dependency;
/// every path absolute.
fn builtin_apply_manifest(target: &Path) -> anyhow::Result<String> {
    let ws = workspace();
    let text = std::fs::read_to_string(ws.join("spin.toml"))?;
    let dependency = "[component.processor.dependencies]\n\"spillway:pipeline/apply@0.1.0\" = { path = \"target/wasm32-wasip2/release/apply_builtin.wasm\" }\n";
    anyhow::ensure!(text.contains(dependency), "spin.toml no longer names the processor's apply step as expected");
    let processor = "source = \"target/wasm32-wasip2/release/processor.wasm\"";
    anyhow::ensure!(text.contains(processor), "spin.toml no longer names the processor's source as expected");
    Ok(text
        .replace(dependency, "")
        .replace(processor, &format!("source = \"{}\"", target.join("wasm32-wasip2/release/processor_builtin_apply.wasm").display()))
        .replace("= \"target/", &format!("= \"{}/", target.display())))
}

/// The embedded host's program (see [`build`]).
static HOST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `spillway-host up` on `manifest`; returns it and its address once it serves.
fn host(target: &Path, manifest: &Path, state: &Path, vars: &[(&str, &str)]) -> anyhow::Result<(Proc, String)> {
    host_with_env(target, manifest, state, vars, &[], &[])
}

/// [`host`] with environment variables set for the host process and extra
/// arguments to `up` (e.g. `--runtime-config-file`).
fn host_with_env(target: &Path, manifest: &Path, state: &Path, vars: &[(&str, &str)], env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<(Proc, String)> {
    let port = free_port()?;
    let mut cmd = Command::new(HOST.get().context("the host is built first")?);
    cmd.args(["up", "--listen", &format!("127.0.0.1:{port}"), "-f"]).arg(manifest).arg("--state-dir").arg(state).args(args);
    cmd.envs(env.iter().copied());
    for (k, v) in vars {
        cmd.args(["--variable", &format!("{k}={v}")]);
        // The allowed_outbound_hosts entry: the same server without credentials.
        if *k == "redis_address" && !vars.iter().any(|(k, _)| *k == "redis_host") {
            let host = spillway_core::redact::server_of(v).context("redis_address is not a URL")?;
            cmd.args(["--variable", &format!("redis_host={host}")]);
        }
    }
    let mut child = cmd
        .env("SPILLWAY_HOST_CACHE_DIR", target.join("wasmtime-cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let waits_for_channels = std::fs::read_to_string(manifest)?.contains("[[trigger.redis]]");
    let mut ready = false;
    for line in lines.map_while(Result::ok) {
        if (waits_for_channels && line.starts_with('\t')) || (!waits_for_channels && line.starts_with("  ")) {
            ready = true;
            break;
        }
    }
    if !ready {
        bail!("the host did not start on {}", manifest.display());
    }
    Ok((Proc(child), format!("127.0.0.1:{port}")))
}

/// Resident memory of a process, MiB: now (`VmRSS`) or its peak (`VmHWM`).
fn rss_mib(pid: Option<u32>, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The host's resident memory (`VmRSS`) sampled every 10 ms, so each scenario
/// reports its own peak (`VmHWM` only knows the whole run's).
struct RssPeaks {
    pid: Option<u32>,
    /// The highest sample since the last [`RssPeaks::take`], KiB.
    peak_kib: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RssPeaks {
    fn start(pid: Option<u32>) -> Self {
        let peak_kib = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        if pid.is_some() {
            let peak = std::sync::Arc::downgrade(&peak_kib);
            std::thread::spawn(move || {
                while let Some(peak) = peak.upgrade() {
                    if let Some(mib) = rss_mib(pid, "VmRSS") {
                        peak.fetch_max((mib * 1024.0) as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    drop(peak);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        Self { pid, peak_kib }
    }

    /// The peak since the last call, MiB; the next peak starts from now.
    fn take(&self) -> Option<f64> {
        let now = (rss_mib(self.pid, "VmRSS")? * 1024.0) as u64;
        let peak = self.peak_kib.swap(now, std::sync::atomic::Ordering::Relaxed).max(now);
        Some(peak as f64 / 1024.0)
    }
}

/// Runs of the same end-to-end job on a fresh host for the memory-over-run-time
/// rows.
const MEMORY_RUNS: usize = 8;

/// Writes still queued in Spillway's streams.
/// Where the queue's length is read: one Redis, or a cluster's nodes.
trait Queue {
    /// Writes queued over every shard.
    fn queued(&mut self, layout: &Layout) -> anyhow::Result<u64>;
}

impl Queue for redis::Connection {
    fn queued(&mut self, layout: &Layout) -> anyhow::Result<u64> {
        let mut n = 0;
        for s in 0..layout.shards {
            n += redis::cmd("XLEN").arg(layout.stream(s)).query::<u64>(self)?;
        }
        Ok(n)
    }
}

fn queued(redis: &mut impl Queue, layout: &Layout) -> anyhow::Result<u64> {
    redis.queued(layout)
}

/// Seconds until the queue is empty (every accepted write applied and acknowledged).
async fn until_drained(redis: &mut impl Queue, layout: &Layout, bound: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while queued(redis, layout)? > 0 {
        if start.elapsed() > bound {
            bail!("{} writes still queued after {bound:?}", queued(redis, layout)?);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(start.elapsed())
}

/// The Redis ceiling's baseline: a write's one necessary command, as a script
/// (as intake's is one).
const XADD_ONLY: &str = "return redis.call('XADD', KEYS[1], '*', 'w', ARGV[1])";

/// The Redis ceiling's second baseline: the commands intake's script runs for
/// a single write on a shard with no schedule (the clock, the schedule's first
/// member, the depth, the entry, the two counters, the doorbell flag), bare in
/// one script: what the script costs beyond them is its own Lua.
const BARE_COMMANDS: &str = "redis.call('TIME') \
    redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES') \
    redis.call('XLEN', KEYS[1]) \
    redis.call('XADD', KEYS[1], '*', 'w', ARGV[1]) \
    redis.call('HINCRBY', KEYS[3], 'accepted', 1) \
    redis.call('HINCRBY', KEYS[3], 'accepted@0', 1) \
    return redis.call('SET', KEYS[4], 1, 'NX', 'GET', 'PX', 5000)";

fn incr(key: &str) -> String {
    format!(r#"{{"key":"{key}","op":"incr","field":"n"}}"#)
}

fn batch(from: usize, keys: usize) -> String {
    let writes: Vec<String> = (from..from + 100).map(|i| incr(&format!("k{}", i % keys))).collect();
    format!(r#"{{"writes":[{}]}}"#, writes.join(","))
}

/// Write -> applied, one write at a time: from the request until its status says
/// `applied` (`GET /v1/writes/{id}?wait=5` answers as soon as it is), `n` times.
async fn write_to_applied(addr: &str, n: usize) -> anyhow::Result<load::Measured> {
    let mut conn = load::Conn::open(addr).await?;
    let mut latency = load::histogram();
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let (status, body) = conn.send(&request("POST", "/v1/writes", &incr(&format!("w{}", i % 10)))).await?;
        let reply: serde_json::Value = serde_json::from_slice(&body)?;
        let id = reply["id"].as_str().with_context(|| format!("no write id ({status}): {reply}"))?;
        let (_, body) = conn.send(&request("GET", &format!("/v1/writes/{id}?wait=5"), "")).await?;
        let st: serde_json::Value = serde_json::from_slice(&body)?;
        if st["status"] != "applied" {
            bail!("write {id} not applied within 5 s: {st}");
        }
        latency.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(load::Measured { ops: n as u64, elapsed: started.elapsed(), latency, failed: (0, None) })
}

/// Fairness between tenants (see `tenants`), on an app of its own with every
/// tenant's quotas set, and (but in a smoke run) on one without quotas.
async fn tenant_rows(target: &Path, work: &Path, redis_url: &str, smoke: bool) -> anyhow::Result<Vec<Row>> {
    let quotas = [("tenant_rate", tenants::RATE.to_string()), ("tenant_burst", tenants::BURST.to_string()), ("tenant_depth", tenants::DEPTH.to_string())];
    let quotas: Vec<(&str, &str)> = quotas.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut rows = {
        let (_p, addr, _) = variant(target, work, redis_url, "tenants", &quotas)?;
        tenants::rows(&addr, &work.join("tenants-state").join("sqlite_db.db"), smoke, true).await?
    };
    // The comparison without quotas queues a flood's worth of writes to
    // drain: left out of the smoke run, whose figures mean nothing anyway.
    if !smoke {
        let (_p, addr, _) = variant(target, work, redis_url, "no-quotas", &[])?;
        rows.extend(tenants::rows(&addr, &work.join("no-quotas-state").join("sqlite_db.db"), smoke, false).await?);
    }
    Ok(rows)
}

/// The repository's app with `vars` over the benchmark's, on key prefix
/// `<name>:` of the same Redis (state in `<work>/<name>-state`): a variant
/// measured back to back with the default app. Its host, address and layout.
fn variant(target: &Path, work: &Path, redis_url: &str, name: &str, vars: &[(&str, &str)]) -> anyhow::Result<(Proc, String, Layout)> {
    let prefix = format!("{name}:");
    let mut all = vec![("redis_address", redis_url), ("admin_token", "bench"), ("queue_depth_limit", "100000000"), ("key_prefix", prefix.as_str())];
    all.extend_from_slice(vars);
    let (p, addr) = host(target, &workspace().join("spin.toml"), &work.join(format!("{name}-state")), &all)?;
    Ok((p, addr, Layout { prefix, shards: 16 }))
}

/// Single-write intake on `addr`: one increment per request over 1,000 keys.
pub(crate) async fn single_writes(addr: &str, clients: usize, duration: Duration) -> anyhow::Result<load::Measured> {
    single_writes_with(addr, clients, duration, &[]).await
}

/// [`single_writes`] with more headers on each request (e.g. `Prefer`).
pub(crate) async fn single_writes_with(addr: &str, clients: usize, duration: Duration, headers: &'static [(&'static str, &'static str)]) -> anyhow::Result<load::Measured> {
    load::http(addr, clients, duration, 1, move |c, n| load::request_with("POST", "/v1/writes", &incr(&format!("k{}", (c as u64 * 7919 + n) % 1000)), headers)).await
}

/// A latency row: the median in ms, with p50/p99/p99.9.
pub(crate) fn latency_row(scenario: &str, m: &load::Measured) -> Row {
    Row { scenario: scenario.to_owned(), value: m.ms(0.5), unit: "ms (p50)", latency: Some([m.ms(0.5), m.ms(0.99), m.ms(0.999)]), baseline: None, peak_rss_mib: None, note: String::new() }
}

/// End to end: `writes` increments over `keys` keys posted as batches of 100 by 16
/// clients, timed from the first request until the queue is empty.
async fn end_to_end(addr: &str, redis: &mut impl Queue, layout: &Layout, writes: usize, keys: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    load::http_count(addr, 16, writes / 100, move |i| request("POST", "/v1/writes", &batch(i * 100, keys))).await?;
    until_drained(redis, layout, Duration::from_secs(600)).await?;
    Ok(writes as f64 / start.elapsed().as_secs_f64())
}

/// BullMQ doing the same job on the same Redis: writes/s, or why it did not run.
fn bullmq(redis_url: &str, writes: usize, keys: usize) -> Result<f64, String> {
    let dir = workspace().join("bench/bullmq");
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    if !dir.join("node_modules/bullmq").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("npm: {e}"))?;
        if !out.status.success() {
            // npm's own reason (a registry it cannot reach, a lockfile it refuses).
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.lines().find(|l| l.contains("npm error") && l.trim_end() != "npm error").unwrap_or("no output");
            return Err(format!("npm ci failed: {why}"));
        }
    }
    let out = Command::new("node")
        .args(["peer.mjs", redis_url, &writes.to_string(), &keys.to_string()])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("node: {e}"))?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|_| format!("BullMQ peer failed: {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["checked"].as_u64().is_some_and(|c| c != writes as u64) {
        return Err(format!("BullMQ applied {} of {writes}", v["checked"]));
    }
    Ok(writes as f64 / (v["elapsed_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut args = Args::parse();
    if args.smoke {
        args.seconds = 1;
        args.writes = 2_000;
        args.no_bullmq = true;
    }
    let duration = Duration::from_secs(args.seconds);
    let work = std::env::temp_dir().join(format!("spillway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let target = build(args.host.as_deref())?;
    if args.capacity_only {
        let mut rows = capacity::costs(&target, &work, args.clients, duration).await?;
        rows.push(capacity::cluster_against_one(&target, &work, args.writes).await?);
        println!("{}", report::markdown(&rows));
        return Ok(());
    }
    if args.tenants_only {
        let redis = spillway_redis_server::RedisServer::start();
        println!("{}", report::markdown(&tenant_rows(&target, &work, &redis.url(), args.smoke).await?));
        return Ok(());
    }
    let mut procs = Vec::new();
    // The same server the tests start (no password: the Redis ceiling and
    // BullMQ connect to it plainly).
    let own_redis = args.redis.is_none().then(spillway_redis_server::RedisServer::start);
    let redis_url = match (&args.redis, &own_redis) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => unreachable!("a server is started when none is given"),
    };

    // The baselines' host: hello-world (the floor) and the naive design.
    let baseline = work.join("baseline.toml");
    let wasm = target.join("wasm32-wasip2/release");
    std::fs::write(
        &baseline,
        format!(
            "spin_manifest_version = 2\n[application]\nname = \"baselines\"\n\n[variables]\nredis_address = {{ required = true }}\n\n\
             [[trigger.http]]\nroute = \"/hello\"\ncomponent = \"hello\"\n\n\
             [[trigger.http]]\nroute = \"/naive\"\ncomponent = \"naive\"\n\n\
             [[trigger.http]]\nroute = \"/shape/...\"\ncomponent = \"shapes\"\n\n[component.hello]\nsource = \"{}\"\n\n\
             [component.naive]\nsource = \"{}\"\nsqlite_databases = [\"default\"]\n\n\
             [component.shapes]\nsource = \"{}\"\nallowed_outbound_hosts = [\"{{{{ redis_address }}}}\"]\nkey_value_stores = [\"default\"]\n\
             [component.shapes.variables]\nredis_address = \"{{{{ redis_address }}}}\"\n",
            wasm.join("fixture_hello.wasm").display(),
            wasm.join("fixture_naive.wasm").display(),
            wasm.join("fixture_shapes.wasm").display()
        ),
    )?;
    let base_addr = match &args.baseline_url {
        Some(url) => url.trim_start_matches("http://").trim_end_matches('/').to_owned(),
        None => {
            let (base_proc, base_addr) = host(&target, &baseline, &work.join("baseline-state"), &[("redis_address", redis_url.as_str())])?;
            procs.push(base_proc);
            base_addr
        }
    };

    // Spillway, with the queue limit out of the way of the batch-intake flood.
    let (spillway_addr, spillway_pid) = match &args.url {
        Some(url) => (url.trim_start_matches("http://").trim_end_matches('/').to_owned(), None),
        None => {
            let vars = [("redis_address", redis_url.as_str()), ("admin_token", "bench"), ("queue_depth_limit", "100000000")];
            let (p, addr) = host(&target, &workspace().join("spin.toml"), &work.join("spillway-state"), &vars)?;
            let pid = p.0.id();
            procs.push(p);
            (addr, Some(pid))
        }
    };
    let layout = Layout { prefix: "spillway:".into(), shards: 16 };
    let mut redis = redis::Client::open(redis_url.as_str())?.get_connection()?;
    let peaks = RssPeaks::start(spillway_pid);

    let steps = 22;
    let bar = ProgressBar::new(steps).with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")?);
    // Each step's time, printed at the end (a smoke run in CI should stay short).
    let took = std::cell::RefCell::new(vec![(String::from("build, servers and hosts"), started)]);
    let step = |msg: &str| {
        bar.set_message(msg.to_owned());
        bar.inc(1);
        took.borrow_mut().push((msg.to_owned(), Instant::now()));
    };
    let mut rows = Vec::new();
    let clients = args.clients;

    step("floor: hello-world");
    let floor = load::http(&base_addr, clients, duration, 1, |_, _| request("GET", "/hello", "")).await?;
    let floor_p99 = floor.ms(0.99);
    rows.push(Row::from("floor: hello-world component", "req/s", &floor));

    // The shapes of Spillway's requests without Spillway: the floor plus exactly
    // the host interactions a single write and a warm read make.
    step("request shapes");
    let one_write = incr("k1");
    let shape = async |path: &str, method: &str, body: &str| -> anyhow::Result<load::Measured> {
        let req = request(method, path, body);
        let m = load::http(&base_addr, clients, duration, 1, move |_, _| req.clone()).await?;
        anyhow::ensure!(m.failed.0 == 0, "the shape {path} failed: {:?}", m.failed.1);
        Ok(m)
    };
    let body_shape = shape("/shape/body", "POST", &one_write).await?;
    let redis_shape = shape("/shape/redis", "GET", "").await?;
    let write_shape = shape("/shape/body-redis", "POST", &one_write).await?;
    // A value the size of a small record's cache entry.
    let entry = format!(r#"{{"etag":"{:032x}","key":"k1","updated_at":1795523104289,"value":{{"n":79}},"version":79}}"#, 0);
    let (status, _) = load::Conn::open(&base_addr).await?.send(&request("PUT", "/shape/kv", &entry)).await?;
    anyhow::ensure!(status == 200, "PUT /shape/kv answered {status}");
    let read_shape = shape("/shape/kv", "GET", "").await?;
    for (name, m) in [
        ("shape: floor + read the request body", &body_shape),
        ("shape: floor + one outbound Redis command", &redis_shape),
        ("shape: floor + body + one Redis command (a single write's host interactions)", &write_shape),
        ("shape: floor + one key-value get (a warm read's host interactions)", &read_shape),
    ] {
        rows.push(Row::from(name, "req/s", m).against("floor", floor.rate()).note(format!("p99 {:.1}x the floor's", m.ms(0.99) / floor_p99)));
    }

    step("Redis ceiling");
    let ceiling_layout = Layout { prefix: "bench:ceiling:".into(), shards: 16 };
    let ceiling = load::redis_script(&redis_url, clients, duration, scripts::ENQUEUE, move |c, n| {
        let shard = ((c as u64 + n) % 16) as u32;
        let l = &ceiling_layout;
        let limits = EnqueueLimits {
            idempotency: None,
            idempotency_ttl_secs: 60,
            queue_depth_limit: 100_000_000,
            bell_ttl_ms: 5000,
            seq_start: n as u32,
            scheduled_limit: 100_000,
            retention_ms: 60_000,
            past_ms: 60_000,
            answered: &[],
            doorbell: "",
        };
        let call = Call::enqueue(l, &[shard], shard, limits, &[Queued { shard, key: "k", timing: Timing::default(), payload: incr("k"), tenant: None }], |_| (Default::default(), 0));
        (call.keys, call.args)
    })
    .await?;
    // The same writes as one XADD in a script: what the enqueue script costs
    // Redis beyond the one command a write needs.
    let xadd = load::redis_script(&redis_url, clients, duration, XADD_ONLY, |c, n| {
        (vec![format!("bench:ceiling:xadd:{}", (c as u64 + n) % 16)], vec![incr("k")])
    })
    .await?;
    let bare = load::redis_script(&redis_url, clients, duration, BARE_COMMANDS, |c, n| {
        let shard = (c as u64 + n) % 16;
        (["stream", "sched", "stats", "bell"].map(|k| format!("bench:ceiling:bare:{{s{shard}}}:{k}")).to_vec(), vec![incr("k")])
    })
    .await?;
    let _: () = redis::cmd("EVAL").arg("for _, k in ipairs(redis.call('KEYS', 'bench:ceiling:*')) do redis.call('DEL', k) end").arg(0).query(&mut redis)?;
    rows.push(Row::from("Redis ceiling: one XADD per write, in a script", "writes/s", &xadd));
    rows.push(
        Row::from("Redis ceiling: the commands intake's script runs for a write, bare in one script", "writes/s", &bare)
            .against("one XADD", xadd.rate()),
    );
    rows.push(
        Row::from("Redis ceiling: intake's script, native", "writes/s", &ceiling)
            .against("the same commands bare", bare.rate())
            .note(format!("{:.2}x one XADD", ceiling.rate() / xadd.rate())),
    );

    step("naive design");
    let naive = load::http(&base_addr, clients, duration, 1, |c, n| {
        request("POST", "/naive", &format!(r#"{{"key":"k{}","by":1}}"#, (c as u64 * 7919 + n) % 1000))
    })
    .await?;
    let naive_rate = naive.rate();
    rows.push(Row::from("naive design: read-modify-write per request", "writes/s", &naive).note("applied when answered"));

    step("single-write intake");
    peaks.take();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut redis)?;
    let single = single_writes(&spillway_addr, clients, duration).await?;
    let drained = until_drained(&mut redis, &layout, Duration::from_secs(600)).await?;
    let (commands, per_command) = single::commands_per_write(&mut redis, single.ops)?;
    rows.push(
        Row::from("Spillway single-write intake", "req/s", &single)
            .against("floor", floor.rate())
            .rss(peaks.take())
            .note(format!(
                "target >= 0.6x; p99 {:.1}x the floor's; {:.2}x its shape (floor + body + one Redis command)",
                single.ms(0.99) / floor_p99,
                single.rate() / write_shape.rate()
            )),
    );
    rows.push(Row {
        scenario: format!("queue empty after {}s of single-write load", args.seconds),
        value: drained.as_secs_f64(),
        unit: "s later",
        latency: None,
        baseline: None,
        peak_rss_mib: peaks.take(),
        note: "target <= 2 s".into(),
    });
    rows.push(single::commands_row(commands, &per_command));
    step("one client");
    let (one_client, one_shape) = single::one_client(&base_addr, &spillway_addr, duration, &one_write).await?;
    rows.extend(one_client);
    until_drained(&mut redis, &layout, Duration::from_secs(600)).await?;
    step("intake, processor held off");
    let (many, one) = single::held_off(&mut redis, &layout, 2 * duration + Duration::from_secs(60), async {
        Ok((single_writes(&spillway_addr, clients, duration).await?, single_writes(&spillway_addr, 1, duration).await?))
    })
    .await?;
    for (name, m, [shape, shape_p99]) in [("", &many, [write_shape.rate(), write_shape.ms(0.99)]), ("one client: ", &one, one_shape)] {
        let failed = if m.failed.0 > 0 { format!("; {} answered with an error, first: {:?}", m.failed.0, m.failed.1) } else { String::new() };
        rows.push(
            Row::from(&format!("{name}Spillway single-write intake, the processor held off (its leases taken)"), "req/s", m)
                .against("its shape", shape)
                .note(format!("intake's own cost, apart from the processor's work on the same cores; p99 {:.1}x the shape's{failed}", m.ms(0.99) / shape_p99)),
        );
    }
    if args.single_only {
        bar.finish_and_clear();
        println!("{}", report::markdown(&rows));
        return Ok(());
    }

    step("warm reads");
    let reads = load::http(&spillway_addr, clients, duration, 1, |_, _| request("GET", "/v1/records/k1", "")).await?;
    rows.push(
        Row::from("Spillway warm reads (one record)", "req/s", &reads)
            .against("floor", floor.rate())
            .rss(peaks.take())
            .note(format!(
                "target >= 0.6x; p99 {:.1}x the floor's; {:.2}x its shape (floor + one key-value get)",
                reads.ms(0.99) / floor_p99,
                reads.rate() / read_shape.rate()
            )),
    );

    // What the deadlines cost on the hot path: the same app with none
    // (call_timeout_ms = request_timeout_ms = 0, its own key prefix), measured
    // back to back with the default app, intake then reads.
    step("deadline cost");
    if args.url.is_none() {
        let (p, off_addr, off_layout) = variant(&target, &work, &redis_url, "nodeadline", &[("call_timeout_ms", "0"), ("request_timeout_ms", "0")])?;
        procs.push(p);
        let (off, on) = (single_writes(&off_addr, clients, duration).await?, single_writes(&spillway_addr, clients, duration).await?);
        until_drained(&mut redis, &off_layout, Duration::from_secs(600)).await?;
        until_drained(&mut redis, &layout, Duration::from_secs(600)).await?;
        rows.push(Row::from("single-write intake with deadlines (call and request)", "req/s", &on).against("the same without deadlines", off.rate()));
        let reads = async |addr: &str| load::http(addr, clients, duration, 1, |_, _| request("GET", "/v1/records/k1", "")).await;
        let (off, on) = (reads(&off_addr).await?, reads(&spillway_addr).await?);
        rows.push(Row::from("warm reads with deadlines (call and request)", "req/s", &on).against("the same without deadlines", off.rate()));
    }

    // What waiting for a replica costs (min_replicas = 1: Redis WAIT after each
    // enqueue): the same app against a primary with one replica, on its own
    // key prefix, measured back to back with the default app (the replica
    // copies both apps' writes either way; only the wait differs).
    step("replica acknowledgement");
    if let (None, Some(server)) = (&args.url, &own_redis) {
        let replica = spillway_redis_server::RedisServer::start_replica_of(server);
        let (p, rep_addr, rep_layout) = variant(&target, &work, &redis_url, "replicated", &[("min_replicas", "1")])?;
        procs.push(p);
        let (off, on) = (single_writes(&spillway_addr, clients, duration).await?, single_writes(&rep_addr, clients, duration).await?);
        rows.push(Row::from("single-write intake waiting for 1 replica (min_replicas)", "req/s", &on).against("the same without", off.rate()));
        let batch_time = duration.min(Duration::from_secs(3));
        let batches = async |addr: &str| {
            load::http(addr, clients, batch_time, 100, |c, n| request("POST", "/v1/writes", &batch((c * 1_000_000) + n as usize * 100, 1000))).await
        };
        let (off, on) = (batches(&spillway_addr).await?, batches(&rep_addr).await?);
        rows.push(Row::from("batch intake waiting for 1 replica (100 writes per request)", "writes/s", &on).against("the same without", off.rate()));
        until_drained(&mut redis, &rep_layout, Duration::from_secs(900)).await?;
        until_drained(&mut redis, &layout, Duration::from_secs(900)).await?;
        drop(replica);
    }

    step("write -> applied");
    let samples = if args.smoke { 20 } else { 200 };
    let trigger = write_to_applied(&spillway_addr, samples).await?;
    rows.push(latency_row("write -> applied, one at a time: Redis trigger (spin.toml)", &trigger));
    if args.url.is_some() {
        eprintln!("HTTP-only deployment not measured: --url given");
    } else if !spillway_pg_server::installed() {
        eprintln!("HTTP-only deployment not measured: PostgreSQL's programs are not installed");
    } else {
        // deploy/http-only/spin.toml: no Redis trigger, intake wakes the processor
        // by service chaining; PostgreSQL. Its own key prefix on the same Redis.
        let db = spillway_pg_server::PgDb::create();
        let vars = [
            ("redis_address", redis_url.as_str()),
            ("key_prefix", "httponly:"),
            ("admin_token", "bench"),
            ("database", db.url.as_str()),
            ("database_host", db.host.as_str()),
        ];
        let (p, addr) = host(&target, &workspace().join("deploy/http-only/spin.toml"), &work.join("http-only-state"), &vars)?;
        let pid = p.0.id();
        procs.push(p);
        let chained = write_to_applied(&addr, samples).await?;
        rows.push(
            latency_row("write -> applied, one at a time: HTTP-only (service chaining, PostgreSQL)", &chained)
                .against("Redis trigger", trigger.ms(0.5))
                .rss(rss_mib(Some(pid), "VmRSS"))
                .note(format!("target: applied within 1 s; p99 {:.1}x the Redis trigger's", chained.ms(0.99) / trigger.ms(0.99))),
        );
    }

    step("scheduled writes");
    match (&args.url, own_redis.is_some()) {
        (None, true) => {
            let mut plain = redis::Client::open(redis_url.as_str())?.get_connection()?;
            let db = work.join("spillway-state").join("sqlite_db.db");
            rows.extend(schedule::rows(&spillway_addr, &db, &mut plain, args.smoke, trigger.ms(0.5)).await?);
        }
        _ => eprintln!("scheduled writes not measured: --url or --redis given (the database and the Redis are the benchmark's own)"),
    }

    step("tenants");
    match &args.url {
        None => rows.extend(tenant_rows(&target, &work, &redis_url, args.smoke).await?),
        Some(_) => eprintln!("tenants not measured: --url given (the app's quotas are the benchmark's own)"),
    }

    step("batch intake");
    let batch_time = duration.min(Duration::from_secs(3));
    peaks.take();
    let batches = load::http(&spillway_addr, clients, batch_time, 100, |c, n| request("POST", "/v1/writes", &batch((c * 1_000_000) + n as usize * 100, 1000))).await?;
    rows.push(Row::from("Spillway batch intake (100 writes per request)", "writes/s", &batches).rss(peaks.take()).note("target >= 100k writes/s"));
    let backlog = queued(&mut redis, &layout)?;
    let drain_time = until_drained(&mut redis, &layout, Duration::from_secs(900)).await?;
    rows.push(Row {
        scenario: format!("drain the {backlog}-write backlog batch intake left"),
        value: backlog as f64 / drain_time.as_secs_f64().max(1e-9),
        unit: "writes/s",
        latency: None,
        baseline: None,
        peak_rss_mib: peaks.take(),
        note: "applied with no further traffic".into(),
    });
    let backlog_peak = rows.last().and_then(|r| r.peak_rss_mib);

    step("BullMQ peer");
    let peer = if args.no_bullmq { Err("left out (--no-bullmq or --smoke)".to_owned()) } else { bullmq(&redis_url, args.writes, 1000) };
    match &peer {
        Ok(rate) => rows.push(Row {
            scenario: format!("BullMQ 6.7 end to end, {} writes / 1,000 keys", args.writes),
            value: *rate,
            unit: "writes/s",
            latency: None,
            baseline: None,
            peak_rss_mib: None,
            note: "bulk 100, concurrency 64, HINCRBY".into(),
        }),
        Err(why) => eprintln!("BullMQ peer not measured: {why}"),
    }
    let peer_rate = peer.as_ref().ok().copied();

    // The 1,000-key job's peak, which the backlog's is measured against, and
    // its rate, which the hosted platform's is.
    let (mut job_peak, mut trigger_e2e) = (None, None);
    for (i, (keys, label)) in [(1000, "1,000 keys"), (1, "1 hot key"), (args.writes, "all distinct keys")].into_iter().enumerate() {
        step(&format!("end to end, {label}"));
        peaks.take();
        let rate = end_to_end(&spillway_addr, &mut redis, &layout, args.writes, keys).await?;
        let mut row = Row {
            scenario: format!("Spillway end to end, {} writes / {label}", args.writes),
            value: rate,
            unit: "writes/s",
            latency: None,
            baseline: None,
            peak_rss_mib: peaks.take(),
            note: String::new(),
        };
        row = match peer_rate {
            Some(p) => row.against("BullMQ, 1,000 keys", p).note("target >= 3x BullMQ"),
            None => row.against("naive design", naive_rate),
        };
        if i == 0 {
            job_peak = row.peak_rss_mib;
            trigger_e2e = Some(rate);
        }
        rows.push(row);
    }

    // The HTTP-only manifest on the emulated hosted platform (`up --emulate
    // akamai-functions`), on PostgreSQL, with each cache store, against the
    // Redis-trigger manifest's 1,000-key job above. With `kv` the platform's
    // key-value store takes 50 writes a second: a round's cache refresh of
    // more keys is refused, so that job is bounded in time and its row says
    // how far it got.
    step("the emulated hosted platform");
    if args.url.is_some() || !spillway_pg_server::installed() {
        eprintln!("hosted platform not measured: --url given, or PostgreSQL's programs are not installed");
    } else if let Some(trigger_rate) = trigger_e2e {
        for store in ["redis", "kv"] {
            let db = spillway_pg_server::PgDb::create();
            let prefix = format!("hosted-{store}:");
            let vars = [
                ("redis_address", redis_url.as_str()),
                ("key_prefix", prefix.as_str()),
                ("admin_token", "bench"),
                ("queue_depth_limit", "100000000"),
                ("database", db.url.as_str()),
                ("database_host", db.host.as_str()),
                ("cache_store", store),
            ];
            let manifest = workspace().join("deploy/http-only/spin.toml");
            let (p, addr) = host_with_env(&target, &manifest, &work.join(format!("hosted-{store}-state")), &vars, &[], &["--emulate", "akamai-functions"])?;
            let layout = Layout { prefix, shards: 16 };
            let scenario = format!("end to end on the emulated hosted platform: HTTP-only manifest, cache_store={store}, PostgreSQL, {} writes / 1,000 keys", args.writes);
            let row = match store {
                "redis" => Row { scenario, value: end_to_end(&addr, &mut redis, &layout, args.writes, 1000).await?, unit: "writes/s", latency: None, baseline: None, peak_rss_mib: None, note: String::new() },
                _ => {
                    let bound = Duration::from_secs(if args.smoke { 2 } else { 30 });
                    let start = Instant::now();
                    load::http_count(&addr, 16, args.writes / 100, move |i| request("POST", "/v1/writes", &batch(i * 100, 1000))).await?;
                    let left = match until_drained(&mut redis, &layout, bound.saturating_sub(start.elapsed())).await {
                        Ok(_) => 0,
                        Err(_) => queued(&mut redis, &layout)?,
                    };
                    let done = args.writes as u64 - left.min(args.writes as u64);
                    Row {
                        scenario,
                        value: done as f64 / start.elapsed().as_secs_f64(),
                        unit: "writes/s",
                        latency: None,
                        baseline: None,
                        peak_rss_mib: None,
                        note: format!("{left} writes still queued after {bound:?}: each round's cache refresh writes more keys than the store's 50 a second"),
                    }
                }
            };
            drop(p);
            rows.push(row.against("Redis-trigger manifest (SQLite), 1,000 keys", trigger_rate));
        }
    }

    // Memory must not grow with queue length: the peak while the batch-intake
    // backlog drained against the 1,000-key job's first (a 100,000-write queue at
    // most). Nor with run time: the same job again and again on a fresh host, its
    // last peak against its first; once with Spin's allocation defaults and once
    // with glibc's malloc arenas bounded and instances allocated on demand, which
    // tells the allocator's retained memory from Spillway's own.
    step("memory over run time and queue length");
    let mib = |scenario: String, value: f64, against: &str, base: f64, note: &str| {
        Row { scenario, value, unit: "MiB", latency: None, baseline: None, peak_rss_mib: Some(value), note: note.into() }.against(against, base)
    };
    if let (Some(first), Some(backlog_peak)) = (job_peak, backlog_peak) {
        rows.push(mib(
            format!("host peak RSS draining the {backlog}-write backlog"),
            backlog_peak,
            "the 1,000-key job's first run",
            first,
            "target: flat (no growth with queue length)",
        ));
    }
    if args.url.is_none() {
        let runs = if args.smoke { 2 } else { MEMORY_RUNS };
        let bounded = [("MALLOC_ARENA_MAX", "1"), ("SPIN_WASMTIME_POOLING", "0")];
        for (i, (label, env)) in [("Spin's allocation defaults", &[][..]), ("MALLOC_ARENA_MAX=1 + on-demand instances", &bounded[..])].into_iter().enumerate() {
            let prefix = format!("mem{i}:");
            let vars = [("redis_address", redis_url.as_str()), ("key_prefix", prefix.as_str()), ("queue_depth_limit", "100000000")];
            let (p, addr) = host_with_env(&target, &workspace().join("spin.toml"), &work.join(format!("memory-state-{i}")), &vars, env, &[])?;
            let fresh = RssPeaks::start(Some(p.0.id()));
            let layout = Layout { prefix, shards: 16 };
            let mut series = Vec::new();
            for _ in 0..runs {
                fresh.take();
                end_to_end(&addr, &mut redis, &layout, args.writes, 1000).await?;
                series.extend(fresh.take());
            }
            drop(p);
            if let (Some(first), Some(last)) = (series.first(), series.last()) {
                let each: Vec<String> = series.iter().map(|m| format!("{m:.0}")).collect();
                rows.push(mib(
                    format!("host peak RSS, {label}: run {runs} of the {} writes / 1,000 keys job, fresh host", args.writes),
                    *last,
                    "its first run",
                    *first,
                    &format!("target: flat (no growth with run time); each run: {} MiB", each.join(", ")),
                ));
            }
        }
    }

    step("the apply step's boundary");
    if args.url.is_some() {
        eprintln!("apply-step boundary not measured: --url given");
    } else {
        // The same end-to-end job on two fresh hosts (the first one's database
        // holds every write of the scenarios before): the repository's
        // manifest, and the processor calling the built-in operations in
        // process; each with its own key prefix on the same Redis. Measured in
        // turns, five times each (a run takes seconds, and two runs of one build
        // differ by up to a tenth on a shared machine), the best of each kept.
        let manifest = work.join("builtin-apply.toml");
        std::fs::write(&manifest, builtin_apply_manifest(&target)?)?;
        let mut fresh = Vec::new();
        for (prefix, manifest, state) in [("through:", workspace().join("spin.toml"), "through-state"), ("inproc:", manifest, "builtin-apply-state")] {
            let vars = [("redis_address", redis_url.as_str()), ("key_prefix", prefix), ("admin_token", "bench"), ("queue_depth_limit", "100000000")];
            let (p, addr) = host(&target, &manifest, &work.join(state), &vars)?;
            procs.push(p);
            fresh.push((addr, Layout { prefix: prefix.into(), shards: 16 }));
        }
        let (mut through, mut inproc) = (0f64, 0f64);
        for _ in 0..if args.smoke { 1 } else { 5 } {
            through = through.max(end_to_end(&fresh[0].0, &mut redis, &fresh[0].1, args.writes, 1000).await?);
            inproc = inproc.max(end_to_end(&fresh[1].0, &mut redis, &fresh[1].1, args.writes, 1000).await?);
        }
        rows.push(Row {
            scenario: format!("Spillway end to end through the apply component (the default), {} writes / 1,000 keys", args.writes),
            value: through,
            unit: "writes/s",
            latency: None,
            baseline: None,
            peak_rss_mib: None,
            note: "best of 5 alternating runs each".into(),
        }
        .against("built-in operations in process", inproc)
        .note("target: within 10% (>= 0.9x)"));
    }

    // The capacity model's inputs (docs/capacity.md): each kind of request's
    // cost on servers of its own, and a Redis Cluster against one Redis.
    step("capacity: costs per request, a cluster against one Redis");
    if args.url.is_some() {
        eprintln!("capacity inputs not measured: --url given");
    } else {
        rows.extend(capacity::costs(&target, &work, clients, duration).await?);
        rows.push(capacity::cluster_against_one(&target, &work, args.writes).await?);
    }
    bar.finish_and_clear();
    took.borrow_mut().push(("end".into(), Instant::now()));
    let steps_took: Vec<String> = took.borrow().windows(2).map(|w| format!("{} {:.0}s", w[0].0, (w[1].1 - w[0].1).as_secs_f64())).collect();
    eprintln!("steps took: {}", steps_took.join(", "));

    let peak = rss_mib(spillway_pid, "VmHWM");
    let table = report::markdown(&rows);
    println!("{table}");
    if let Some(p) = peak {
        println!("Spillway host peak RSS over the whole run: {p:.0} MiB");
    }
    std::fs::create_dir_all(&args.out)?;
    let mut md = format!(
        "# Spillway benchmark results\n\nWritten by `cargo run -p spillway-bench{}` ({}). Machine: {}. Every ratio compares \
         two figures measured in this run; absolute figures depend on the machine and its load.\n\n\
         Setup: {} clients for {} s per timed scenario; end to end = {} writes posted as batches of 100 by 16 clients, \
         timed until every write is applied and acknowledged (queue empty). {}; Redis {}.\n\n",
        if args.smoke { " -- --smoke" } else { "" },
        if args.smoke { "smoke run: the figures mean nothing" } else { "full run" },
        machine(),
        clients,
        args.seconds,
        args.writes,
        match &args.url {
            Some(u) => format!("Spillway at {u}"),
            None => "Spillway on the embedded host (`spillway-host up`, the repository's spin.toml, SQLite database and SQLite key-value cache)".into(),
        },
        redis_url
    );
    md.push_str(&table);
    if let Some(p) = peak {
        md.push_str(&format!("\nHost peak RSS over the whole run (VmHWM): {p:.0} MiB.\n"));
    }
    if let Err(why) = &peer {
        md.push_str(&format!("\nBullMQ peer not measured: {why}; end-to-end rows compare with the naive design.\n"));
    }
    std::fs::write(args.out.join("RESULTS.md"), md)?;
    if let Err(e) = report::chart(&rows, &args.out.join("results.png"), &args.font) {
        eprintln!("no chart: {e:#}");
    }
    println!("wrote {}", args.out.join("RESULTS.md").display());
    drop(procs);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
