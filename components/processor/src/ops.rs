//! Seeing and running it: `GET /v1/stats` (JSON), `GET /metrics` (Prometheus
//! text), the `GET /dashboard` page and `POST /v1/dead/purge`.
//!
//! Every figure comes from Redis: per shard, one script call reads the queue
//! (depth, delivered but unacknowledged, oldest entry), the dead letters, the lease
//! and the shard's counters, which the scripts that change a write's fate keep
//! (accepted, applied, rejected, dead, retried, replayed, purged; accepted and
//! applied also per 10 s for the last minute's throughput). Cache hits and misses
//! are counted by the cache instances.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value as Json, json};
use spillway_core::layout::md5_hex;
use spillway_core::call::{Call, DELAY_BUCKETS_MS, delay_field};
use spillway_core::exposition::{Exposition, Kind};
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
    /// Redis's clock when read (ms since the epoch).
    now_ms: u64,
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
        now_ms: r.now_ms,
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
    // The time the figures are of (Redis's clock), for a reader to turn two
    // readings into rates.
    let now_ms = snap.shards.iter().map(|sh| sh.now_ms).max().unwrap_or_else(|| u64::try_from(spillway_spin::now_ms()).unwrap_or(0));
    let body = json!({
        "now_ms": now_ms,
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
        "intake_refused": refusals(&snap.shards),
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

/// `GET /metrics`: the same figures for a Prometheus scraper, in the text
/// format (0.0.4; see `spillway_core::exposition`), named as Prometheus's
/// conventions have it (base units, `_total` counters).
pub(crate) async fn metrics(s: &Settings) -> Result<http::Response<String>, Problem> {
    let snap = snapshot(s).await;
    let mut e = Exposition::default();
    let per_shard = |e: &mut Exposition, name: &str, kind: Kind, help: &str, value: &dyn Fn(&Shard) -> f64| {
        let mut f = e.family(name, kind, help);
        for sh in &snap.shards {
            f.sample(&[("shard", &sh.shard.to_string())], value(sh));
        }
    };
    per_shard(&mut e, "spillway_queue_depth", Kind::Gauge, "Writes queued in the shard's stream (not yet applied).", &|sh| sh.depth as f64);
    per_shard(&mut e, "spillway_writes_unacknowledged", Kind::Gauge, "Writes delivered to a processor and not yet acknowledged.", &|sh| sh.unacknowledged as f64);
    per_shard(&mut e, "spillway_oldest_unapplied_age_seconds", Kind::Gauge, "Age of the shard's oldest unapplied write (0 when none).", &|sh| {
        sh.oldest_age_ms.unwrap_or(0) as f64 / 1000.0
    });
    per_shard(&mut e, "spillway_dead_letters", Kind::Gauge, "Writes in the shard's dead-letter stream.", &|sh| sh.dead_letters as f64);
    per_shard(&mut e, "spillway_lease_held", Kind::Gauge, "1 while a processor holds the shard's lease.", &|sh| {
        f64::from(u8::from(sh.holder.as_deref().is_some_and(|h| h != spillway_core::scripts::BACKING_OFF)))
    });
    per_shard(
        &mut e,
        "spillway_writes_in_schedule",
        Kind::Gauge,
        "Scheduled writes (delay_ms, apply_at, ttl_ms expiries) not yet moved into the shard's queue.",
        &|sh| sh.scheduled as f64,
    );
    for c in COUNTERS {
        per_shard(&mut e, &format!("spillway_writes_{c}_total"), Kind::Counter, &format!("Writes {c}, since the counters began."), &|sh| {
            sh.counters.get(c).copied().unwrap_or(0) as f64
        });
    }
    let mut f = e.family(
        "spillway_intake_refused_total",
        Kind::Counter,
        "Requests intake answered 429 for a full queue or schedule, or 5xx, by problem type (tenant quotas are counted per tenant).",
    );
    for (reason, n) in refusals(&snap.shards) {
        f.sample(&[("reason", &reason)], n as f64);
    }
    let tenants = |e: &mut Exposition, name: &str, kind: Kind, help: &str, value: &dyn Fn(&Tenant) -> u64| {
        let mut f = e.family(name, kind, help);
        for (tenant, t) in &snap.tenants {
            f.sample(&[("tenant", tenant)], value(t) as f64);
        }
    };
    tenants(&mut e, "spillway_tenant_writes_waiting", Kind::Gauge, "A tenant's writes accepted and not yet settled (what tenant_depth bounds).", &|t| t.waiting);
    tenants(&mut e, "spillway_tenant_writes_accepted_total", Kind::Counter, "A tenant's writes accepted, since the counters began.", &|t| t.accepted);
    tenants(
        &mut e,
        "spillway_tenant_requests_throttled_total",
        Kind::Counter,
        "A tenant's requests refused by its quotas (tenant_rate, tenant_depth), since the counters began.",
        &|t| t.throttled,
    );
    let (buckets, sum_ms) = delays(&snap.shards);
    let buckets: Vec<(Option<f64>, u64)> = buckets.iter().map(|(le, n)| (le.map(|ms| ms as f64 / 1000.0), *n)).collect();
    e.family(
        "spillway_write_apply_delay_seconds",
        Kind::Histogram,
        "How long after a write was due (accepted, or scheduled for) its outcome was acknowledged.",
    )
    .histogram(&[], &buckets, sum_ms as f64 / 1000.0);
    e.family("spillway_cache_hits_total", Kind::Counter, "Record reads answered from the cache.").sample(&[], snap.cache_hits as f64);
    e.family("spillway_cache_misses_total", Kind::Counter, "Record reads that missed the cache.").sample(&[], snap.cache_misses as f64);
    let mut f = e.family(
        "spillway_redis_hazards",
        Kind::Gauge,
        "Redis servers with a setting or failure that puts writes at risk, by kind (see /v1/stats for which).",
    );
    for kind in spillway_core::hazards::KINDS {
        f.sample(&[("kind", kind)], snap.hazards.iter().filter(|h| spillway_core::hazards::kind(h) == kind).count() as f64);
    }
    e.family("spillway_unavailable_shards", Kind::Gauge, "Shards whose Redis server failed when read (see /v1/stats for why).")
        .sample(&[], snap.unavailable.len() as f64);
    Ok(respond(200, spillway_core::exposition::CONTENT_TYPE, e.finish(), &[("cache-control", "no-store".into())]))
}

/// Intake's refusals counted so far, by problem type, summed over the shards
/// (see `scripts::ENQUEUE`: `refused:<type>` in a shard's stats), the usual
/// types from 0.
fn refusals(shards: &[Shard]) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = spillway_core::problem::INTAKE_REFUSALS.iter().map(|r| ((*r).to_owned(), 0)).collect();
    for sh in shards {
        for (field, n) in &sh.counters {
            if let Some(reason) = field.strip_prefix("refused:") {
                *out.entry(reason.to_owned()).or_default() += n;
            }
        }
    }
    out
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

