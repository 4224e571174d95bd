//! Seeing and running it: `GET /v1/stats` (JSON), `GET /metrics` (Prometheus /
//! OpenMetrics text), the `GET /dashboard` page and `POST /v1/dead/purge`.
//!
//! Every figure comes from Redis: per shard, one script call reads the queue
//! (depth, delivered but unacknowledged, oldest entry), the dead letters, the lease
//! and the shard's counters, which the scripts that change a write's fate keep
//! (accepted, applied, rejected, dead, retried, replayed, purged; accepted and
//! applied also per 10 s for the last minute's throughput). Cache hits and misses
//! are counted by the cache instances.

use std::collections::HashMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{Value as Json, json};
use spillway_core::layout::{GROUP, WriteId, md5_hex};
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::{Redis, bin, int, json, respond, text};

/// The outcome counters, in the order they are reported.
const COUNTERS: [&str; 7] = ["accepted", "applied", "rejected", "dead", "retried", "replayed", "purged"];
/// The throughput window: the current 10-second bucket and the five before it.
const WINDOW_BUCKETS: u64 = 6;

/// One shard's figures.
struct Shard {
    shard: u32,
    depth: u64,
    unacknowledged: u64,
    oldest_age_ms: Option<u64>,
    dead_letters: u64,
    /// A short digest of the lease holder's token (not the token).
    holder: Option<String>,
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
}

async fn shard(s: &Settings, shard: u32) -> Result<Shard, Problem> {
    let l = &s.layout;
    let r = Redis::for_shard(s, shard).eval(scripts::SHARD_STATS, &[l.stream(shard), l.lease(shard), l.dead(shard), l.stats(shard)], &[GROUP.to_owned()]).await?;
    let n = |i: usize| r.get(i).and_then(int).unwrap_or(0).max(0) as u64;
    let now_ms = n(6);
    let oldest_age_ms = r
        .get(2)
        .and_then(text)
        .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()))
        .map(|ms| now_ms.saturating_sub(ms));
    let holder = r.get(4).and_then(text).filter(|t| !t.is_empty()).map(|t| md5_hex(t.as_bytes())[..8].to_owned());
    let mut counters = HashMap::new();
    let mut window = HashMap::new();
    let bucket_now = now_ms / 10_000;
    for pair in r.get(7..).unwrap_or_default().chunks(2) {
        let (Some(field), Some(v)) = (pair.first().and_then(text), pair.get(1).and_then(int)) else { continue };
        let v = v.max(0) as u64;
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
        depth: n(0),
        unacknowledged: n(1),
        oldest_age_ms,
        dead_letters: n(3),
        lease_ms_left: holder.as_ref().and_then(|_| r.get(5).and_then(int)),
        holder,
        counters,
        window,
        window_secs: ((WINDOW_BUCKETS - 1) * 10_000 + now_ms % 10_000) as f64 / 1000.0,
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
    for address in s.redis_servers() {
        for h in spillway_spin::hazards::check(&Redis::new(address)).await {
            note(h);
        }
    }
    Snapshot {
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
            accepted_window += sh.window.get("accepted").copied().unwrap_or(0);
            applied_window += sh.window.get("applied").copied().unwrap_or(0);
            let mut o = json!({
                "shard": sh.shard,
                "depth": sh.depth,
                "unacknowledged": sh.unacknowledged,
                "oldest_unapplied_age_ms": sh.oldest_age_ms,
                "dead_letters": sh.dead_letters,
                "lease": sh.holder.as_ref().map(|h| json!({"holder": h, "expires_in_ms": sh.lease_ms_left})),
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
    let body = json!({
        "shards": shards,
        "totals": totals,
        "throughput": {
            "window_secs": window_secs,
            "accepted_per_sec": accepted_window as f64 / window_secs,
            "applied_per_sec": applied_window as f64 / window_secs,
        },
        "cache": {"hits": snap.cache_hits, "misses": snap.cache_misses},
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
        lease.get_or_create(&labels).set(i64::from(sh.holder.is_some()));
        for (name, family) in &counters {
            family.get_or_create(&labels).inc_by(sh.counters.get(*name).copied().unwrap_or(0));
        }
    }
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

/// `POST /v1/dead/purge`: `{"ids": [...]}`, `{"shard": n}` or `{"all": true}`
/// (said explicitly: a purge cannot be undone): the dead letters are dropped and
/// their writes' status says `purged`.
pub(crate) async fn purge(s: &Settings, body: &[u8]) -> Result<http::Response<String>, Problem> {
    let l = &s.layout;
    const EXPECTED: &str = "say what to purge: {\"ids\": [...]}, {\"shard\": n} or {\"all\": true}";
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::invalid(EXPECTED, ""));
    }
    let (ids, only): (Vec<WriteId>, Option<u32>) = {
        let v: Json = serde_json::from_slice(body).map_err(|e| Problem::malformed(&e.to_string()))?;
        let obj = v.as_object().filter(|o| o.len() == 1).ok_or_else(|| Problem::invalid(EXPECTED, ""))?;
        if let Some(all) = obj.get("all") {
            if all != &Json::Bool(true) {
                return Err(Problem::invalid("all must be true", "/all"));
            }
            (Vec::new(), None)
        } else if let Some(list) = obj.get("ids") {
            let list = list.as_array().ok_or_else(|| Problem::invalid("ids must be an array of write ids", "/ids"))?;
            let ids = list
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    id.as_str()
                        .and_then(WriteId::parse)
                        .filter(|w| w.shard < l.shards)
                        .ok_or_else(|| Problem::invalid("not a write id", &format!("/ids/{i}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err(Problem::invalid("ids must name at least one write (send no body to purge all)", "/ids"));
            }
            (ids, None)
        } else if let Some(shard) = obj.get("shard") {
            // An integral number, however written (3 or 3.0).
            let n = shard.as_u64().or_else(|| shard.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e9).map(|f| f as u64));
            let shard = n.filter(|n| *n < u64::from(l.shards)).ok_or_else(|| {
                Problem::invalid(&format!("shard must be a number below {}", l.shards), "/shard")
            })?;
            (Vec::new(), Some(shard as u32))
        } else {
            return Err(Problem::invalid(EXPECTED, ""));
        }
    };
    let retention_ms = s.status_retention_secs.saturating_mul(1000).to_string();
    let mut purged = Vec::new();
    for shard in 0..l.shards {
        let mine: Vec<String> = ids.iter().filter(|w| w.shard == shard).map(ToString::to_string).collect();
        if (!ids.is_empty() && mine.is_empty()) || only.is_some_and(|o| o != shard) {
            continue;
        }
        let mut args = vec![shard.to_string(), retention_ms.clone()];
        args.extend(mine);
        let out = Redis::for_shard(s, shard).eval(scripts::PURGE, &[l.dead(shard), l.dead_status_prefix(shard), l.stats(shard)], &args).await?;
        purged.extend(out.iter().filter_map(text));
    }
    Ok(json(200, &json!({"purged": purged}), &[]))
}
