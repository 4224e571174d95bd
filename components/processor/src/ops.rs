//! Seeing and running it: `GET /v1/stats` (JSON), `GET /metrics` (Prometheus /
//! OpenMetrics text), the `GET /dashboard` page and `POST /v1/dead/purge`.
//!
//! Every figure comes from Redis: per shard, one script call reads the queue
//! (depth, delivered but unacknowledged, oldest entry), the dead letters, the lease
//! and the shard's counters, which the scripts that change a write's fate keep
//! (accepted, applied, rejected, dead, retried, replayed, purged; accepted and
//! applied also per 10 s for the last minute's throughput). Cache hits and misses
//! are counted by the cache instances.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value as Json, json};
use spillway_core::layout::md5_hex;
use spillway_core::call::{Call, DELAY_BUCKETS_MS, delay_field};
use spillway_core::problem::Problem;
use spillway_core::reply::ShardStats;
use spillway_core::settings::Settings;
use spillway_spin::{Redis, bin, int, json, respond};

/// The outcome counters, in the order they are reported.
const COUNTERS: [&str; 9] = ["accepted", "applied", "rejected", "dead", "retried", "replayed", "purged", "scheduled", "cancelled"];
/// The throughput window: the current 10-second bucket and the five before it.
const WINDOW_BUCKETS: u64 = 6;

/// One shard's figures.
struct Shard {
    shard: u32,
    depth: u64,
    unacknowledged: u64,
    oldest_age_ms: Option<u64>,
    dead_letters: u64,
    /// Scheduled writes not yet in the stream, and when the next is due (ms
    /// from now; 0 when overdue).
    scheduled: u64,
    next_due_in_ms: Option<u64>,
    /// A short digest of the lease holder's token (not the token).
    holder: Option<String>,
    /// The holder's node (`node_name`), if it has one.
    node: Option<String>,
    lease_ms_left: Option<i64>,
    counters: HashMap<String, u64>,
    /// Accepted and applied over the window.
    window: HashMap<String, u64>,
    /// Seconds the window covers (50 to 60: its newest bucket is under way).
    window_secs: f64,
}

struct Snapshot {
    /// The shards whose figures could be read.
    shards: Vec<Shard>,
    /// The shards whose server failed (named in `hazards`).
    unavailable: Vec<u32>,
    cache_hits: u64,
    cache_misses: u64,
    hazards: Vec<String>,
    /// The nodes seen draining (with `node_name`), and how long ago (ms).
    nodes: Vec<(String, u64)>,
    /// Each tenant's figures (see `spillway_core::tenant`), summed over the
    /// servers (or shards) that keep them.
    tenants: BTreeMap<String, Tenant>,
}

/// A tenant's figures.
#[derive(Default)]
struct Tenant {
    /// Writes accepted and not yet settled.
    waiting: u64,
    /// Writes accepted, ever.
    accepted: u64,
    /// Requests refused by its quotas, ever.
    throttled: u64,
}

/// The apply-delay histogram (see `spillway_core::call::DELAY_BUCKETS_MS`)
/// over all shards: the writes per bucket (its own, not cumulative; the last
/// is above every bound), and the sum of the delays in ms.
fn delays(shards: &[Shard]) -> (Vec<(Option<u64>, u64)>, u64) {
    let bounds = DELAY_BUCKETS_MS.iter().map(|b| Some(*b)).chain([None]);
    let buckets = bounds.map(|b| (b, shards.iter().map(|sh| sh.counters.get(&delay_field(b)).copied().unwrap_or(0)).sum())).collect();
    (buckets, shards.iter().map(|sh| sh.counters.get("delay_sum_ms").copied().unwrap_or(0)).sum())
}

/// The smallest bucket bound at or below which a share `q` of the writes
/// were applied (`None`: above the last bound, or no writes).
fn delay_quantile(buckets: &[(Option<u64>, u64)], q: f64) -> Option<u64> {
    let count: u64 = buckets.iter().map(|(_, n)| n).sum();
    let mut seen = 0;
    for (bound, n) in buckets {
        seen += n;
        if count > 0 && seen as f64 >= q * count as f64 {
            return *bound;
        }
    }
    None
}

/// The apply-delay histogram as a Prometheus histogram (seconds).
#[derive(Debug)]
struct DelayHistogram {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum_secs: f64,
}

impl prometheus_client::encoding::EncodeMetric for DelayHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(self.sum_secs, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// The tenants' figures, from the hash each server (each shard, with
/// `redis_cluster`) keeps them in.
async fn tenants(s: &Settings, note: &mut impl FnMut(String)) -> BTreeMap<String, Tenant> {
    let homes: BTreeSet<u32> = (0..s.layout.shards).map(|n| s.idempotency_shard(n)).collect();
    let reads = homes.iter().map(|home| async move { Redis::for_shard(s, *home).execute("HGETALL", vec![bin(&s.layout.tenants(*home))]).await });
    let mut out: BTreeMap<String, Tenant> = BTreeMap::new();
    for r in futures::future::join_all(reads).await {
        let flat = match r {
            Ok(flat) => flat,
            Err(p) => {
                note(p.detail);
                continue;
            }
        };
        for pair in flat.chunks(2) {
            let (Some(field), Some(v)) = (pair.first().and_then(spillway_spin::redis::text), pair.get(1).and_then(int)) else { continue };
            let Some((kind, name)) = field.split_once(':') else { continue };
            let t = out.entry(name.to_owned()).or_default();
            let v = v.max(0) as u64;
            match kind {
                "d" => t.waiting += v,
                "a" => t.accepted += v,
                "x" => t.throttled += v,
                _ => {}
            }
        }
    }
    out
}

async fn shard(s: &Settings, shard: u32) -> Result<Shard, Problem> {
    let r = Redis::for_shard(s, shard).call(&Call::shard_stats(&s.layout, shard)).await?;
    let r = ShardStats::parse(&spillway_spin::redis::values(&r)).map_err(spillway_spin::redis::malformed)?;
    let oldest_age_ms = r.oldest.as_deref().and_then(|id| id.split('-').next()?.parse::<u64>().ok()).map(|ms| r.now_ms.saturating_sub(ms));
    // A shard backing off after a failed batch shows as such (see
    // `scripts::BACKING_OFF`), a holder as a digest of its token.
    let holder = r.holder.as_ref().map(|t| if t == spillway_core::scripts::BACKING_OFF { t.clone() } else { md5_hex(t.as_bytes())[..8].to_owned() });
    let node = r.holder.as_ref().and_then(|t| Some(t.split_once('~')?.0.to_owned()));
    let mut counters = HashMap::new();
    let mut window = HashMap::new();
    let bucket_now = r.now_ms / 10_000;
    for (field, v) in r.counters {
        match field.split_once('@') {
            None => {
                counters.insert(field, v);
            }
            Some((name, bucket)) => {
                if bucket.parse::<u64>().is_ok_and(|b| b + WINDOW_BUCKETS > bucket_now) {
                    *window.entry(name.to_owned()).or_default() += v;
                }
            }
        }
    }
    Ok(Shard {
        shard,
        depth: r.depth,
        unacknowledged: r.unacknowledged,
        oldest_age_ms,
        dead_letters: r.dead_letters,
        scheduled: r.scheduled,
        next_due_in_ms: r.next_due_ms.map(|due| due.saturating_sub(r.now_ms)),
        lease_ms_left: holder.as_ref().map(|_| r.lease_ms_left),
        holder,
        node,
        counters,
        window,
        window_secs: ((WINDOW_BUCKETS - 1) * 10_000 + r.now_ms % 10_000) as f64 / 1000.0,
    })
}

/// Every figure Redis can give. A server that fails (down, or refusing
/// Spillway's credentials) does not hide the others: its shards are listed as
/// unavailable and the failure, named as an answer names it, is a hazard.
async fn snapshot(s: &Settings) -> Snapshot {
    let mut hazards: Vec<String> = Vec::new();
    let mut note = |h: String| {
        if !hazards.contains(&h) {
            hazards.push(h);
        }
    };
    let mut shards = Vec::new();
    let mut unavailable = Vec::new();
    for (n, r) in futures::future::join_all((0..s.layout.shards).map(|n| shard(s, n))).await.into_iter().enumerate() {
        match r {
            Ok(sh) => shards.push(sh),
            Err(p) => {
                unavailable.push(n as u32);
                note(p.detail);
            }
        }
    }
    let cache = Redis::for_shard(s, 0).execute("HMGET", vec![bin(&s.layout.cache_stats()), bin("hits"), bin("misses")]).await.unwrap_or_else(|p| {
        note(p.detail);
        Vec::new()
    });
    for h in spillway_spin::hazards::check_servers(s).await {
        note(h);
    }
    let nodes = crate::drain::nodes_seen(s, None).await.unwrap_or_else(|p| {
        note(p.detail);
        Vec::new()
    });
    let tenants = tenants(s, &mut note).await;
    Snapshot {
        tenants,
        nodes,
        shards,
        unavailable,
        cache_hits: cache.first().and_then(int).unwrap_or(0).max(0) as u64,
        cache_misses: cache.get(1).and_then(int).unwrap_or(0).max(0) as u64,
        hazards,
    }
}

/// `GET /v1/stats`.
pub(crate) async fn stats(s: &Settings) -> Result<http::Response<String>, Problem> {
    let snap = snapshot(s).await;
    let mut totals: serde_json::Map<String, Json> = COUNTERS.iter().map(|c| ((*c).to_owned(), json!(0))).collect();
    let (mut depth, mut unacked, mut dead_letters, mut oldest) = (0, 0, 0, None::<u64>);
    let (mut scheduled, mut next_due) = (0, None::<u64>);
    let (mut accepted_window, mut applied_window) = (0, 0);
    let window_secs = snap.shards.first().map_or(60.0, |sh| sh.window_secs);
    let shards: Vec<Json> = snap
        .shards
        .iter()
        .map(|sh| {
            depth += sh.depth;
            unacked += sh.unacknowledged;
            dead_letters += sh.dead_letters;
            oldest = oldest.max(sh.oldest_age_ms);
            scheduled += sh.scheduled;
            next_due = match (next_due, sh.next_due_in_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            accepted_window += sh.window.get("accepted").copied().unwrap_or(0);
            applied_window += sh.window.get("applied").copied().unwrap_or(0);
            let mut o = json!({
                "shard": sh.shard,
                "depth": sh.depth,
                "unacknowledged": sh.unacknowledged,
                "oldest_unapplied_age_ms": sh.oldest_age_ms,
                "dead_letters": sh.dead_letters,
                "in_schedule": sh.scheduled,
                "next_due_in_ms": sh.next_due_in_ms,
                "lease": sh.holder.as_ref().map(|h| json!({"holder": h, "node": sh.node, "expires_in_ms": sh.lease_ms_left})),
            });
            for c in COUNTERS {
                let v = sh.counters.get(c).copied().unwrap_or(0);
                o[c] = json!(v);
                totals[c] = json!(totals[c].as_u64().unwrap_or(0) + v);
            }
            o
        })
        .collect();
    totals.insert("depth".into(), json!(depth));
    totals.insert("unacknowledged".into(), json!(unacked));
    totals.insert("dead_letters".into(), json!(dead_letters));
    totals.insert("oldest_unapplied_age_ms".into(), json!(oldest));
    totals.insert("in_schedule".into(), json!(scheduled));
    totals.insert("next_due_in_ms".into(), json!(next_due));
    let (buckets, sum_ms) = delays(&snap.shards);
    let count: u64 = buckets.iter().map(|(_, n)| n).sum();
    let body = json!({
        "shards": shards,
        "totals": totals,
        "throughput": {
            "window_secs": window_secs,
            "accepted_per_sec": accepted_window as f64 / window_secs,
            "applied_per_sec": applied_window as f64 / window_secs,
        },
        "apply_delay_ms": {
            "buckets": buckets.iter().map(|(le, n)| json!({"le": le, "count": n})).collect::<Vec<_>>(),
            "count": count,
            "sum": sum_ms,
            "p50_le": delay_quantile(&buckets, 0.5),
            "p99_le": delay_quantile(&buckets, 0.99),
        },
        "cache": {"hits": snap.cache_hits, "misses": snap.cache_misses},
        "nodes": snap.nodes.iter().map(|(name, ago)| json!({
            "name": name,
            "seen_ms_ago": ago,
            "leases": snap.shards.iter().filter(|sh| sh.node.as_deref() == Some(name.as_str())).count(),
        })).collect::<Vec<_>>(),
        "tenants": snap.tenants.iter().map(|(name, t)| (name.clone(), json!({
            "waiting": t.waiting,
            "accepted": t.accepted,
            "throttled": t.throttled,
        }))).collect::<serde_json::Map<_, _>>(),
        "hazards": snap.hazards,
        "unavailable_shards": snap.unavailable,
    });
    Ok(json(200, &body, &[("cache-control", "no-store".into())]))
}

type Labels = Vec<(String, String)>;

/// `GET /metrics`: the same figures for a Prometheus scraper, encoded by
/// `prometheus-client` (OpenMetrics text, which Prometheus reads).
pub(crate) async fn metrics(s: &Settings) -> Result<http::Response<String>, Problem> {
    let snap = snapshot(s).await;
    let mut registry = Registry::with_prefix("spillway");
    let gauge = |registry: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Gauge>::default();
        registry.register(name, help, f.clone());
        f
    };
    let depth = gauge(&mut registry, "queue_depth", "Writes queued in the shard's stream (not yet applied).");
    let unacked = gauge(&mut registry, "unacknowledged", "Writes delivered to a processor and not yet acknowledged.");
    let oldest = gauge(&mut registry, "oldest_unapplied_age_milliseconds", "Age of the shard's oldest unapplied write (0 when none).");
    let dead = gauge(&mut registry, "dead_letters", "Writes in the shard's dead-letter stream.");
    let lease = gauge(&mut registry, "lease_held", "1 while a processor holds the shard's lease.");
    let scheduled = gauge(&mut registry, "writes_in_schedule", "Scheduled writes (delay_ms, apply_at, ttl_ms expiries) not yet moved into the shard's queue.");
    let counters: Vec<(&str, Family<Labels, Counter>)> = COUNTERS
        .iter()
        .map(|c| {
            let f = Family::<Labels, Counter>::default();
            registry.register(format!("writes_{c}"), format!("Writes {c}, since the counters began."), f.clone());
            (*c, f)
        })
        .collect();
    for sh in &snap.shards {
        let labels = vec![("shard".to_owned(), sh.shard.to_string())];
        depth.get_or_create(&labels).set(sh.depth as i64);
        unacked.get_or_create(&labels).set(sh.unacknowledged as i64);
        oldest.get_or_create(&labels).set(sh.oldest_age_ms.unwrap_or(0) as i64);
        dead.get_or_create(&labels).set(sh.dead_letters as i64);
        scheduled.get_or_create(&labels).set(sh.scheduled as i64);
        lease.get_or_create(&labels).set(i64::from(sh.holder.as_deref().is_some_and(|h| h != spillway_core::scripts::BACKING_OFF)));
        for (name, family) in &counters {
            family.get_or_create(&labels).inc_by(sh.counters.get(*name).copied().unwrap_or(0));
        }
    }
    let waiting = gauge(&mut registry, "tenant_writes_waiting", "A tenant's writes accepted and not yet settled (what tenant_depth bounds).");
    let tenant_counter = |registry: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Counter>::default();
        registry.register(name, help, f.clone());
        f
    };
    let accepted = tenant_counter(&mut registry, "tenant_writes_accepted", "A tenant's writes accepted, since the counters began.");
    let throttled = tenant_counter(&mut registry, "tenant_requests_throttled", "A tenant's requests refused by its quotas (tenant_rate, tenant_depth), since the counters began.");
    for (name, t) in &snap.tenants {
        let labels = vec![("tenant".to_owned(), name.clone())];
        waiting.get_or_create(&labels).set(t.waiting as i64);
        accepted.get_or_create(&labels).inc_by(t.accepted);
        throttled.get_or_create(&labels).inc_by(t.throttled);
    }
    let (buckets, sum_ms) = delays(&snap.shards);
    let delay = DelayHistogram {
        buckets: buckets.iter().map(|(le, n)| (le.map_or(f64::INFINITY, |ms| ms as f64 / 1000.0), *n)).collect(),
        count: buckets.iter().map(|(_, n)| n).sum(),
        sum_secs: sum_ms as f64 / 1000.0,
    };
    registry.register(
        "write_apply_delay_seconds",
        "How long after a write was due (accepted, or scheduled for) its outcome was acknowledged.",
        delay,
    );
    let hits = Counter::<u64>::default();
    hits.inc_by(snap.cache_hits);
    registry.register("cache_hits", "Record reads answered from the cache.", hits);
    let misses = Counter::<u64>::default();
    misses.inc_by(snap.cache_misses);
    registry.register("cache_misses", "Record reads that missed the cache.", misses);
    let hazards = Gauge::<i64>::default();
    hazards.set(snap.hazards.len() as i64);
    registry.register("redis_hazards", "Redis settings or failures that put writes at risk (see /v1/stats for which).", hazards);
    let unavailable = Gauge::<i64>::default();
    unavailable.set(snap.unavailable.len() as i64);
    registry.register("unavailable_shards", "Shards whose Redis server failed when read (see /v1/stats for why).", unavailable);
    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| Problem::unavailable(&format!("metrics encoding: {e}")))?;
    Ok(respond(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", out, &[("cache-control", "no-store".into())]))
}

/// The dashboard page: charts drawn by its own script from `/v1/stats`, polled
/// every second; nothing is loaded from anywhere else (the CSP forbids it). The page
/// holds no data, so it is served without the token; the stats it reads need it
/// (given as `#token=...`, which the browser does not send) unless `stats_public`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// `GET /dashboard`.
pub(crate) fn dashboard() -> http::Response<String> {
    let csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    respond(200, "text/html; charset=utf-8", DASHBOARD.to_owned(), &[("content-security-policy", csp.into()), ("cache-control", "no-cache".into())])
}

