//! Entry points: the doorbell message, `POST /v1/drain`, the dead letters, and
//! the operator's views (`/v1/stats`, `/metrics`, in [`ops`]).

use serde_json::json;
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::db::{Db, SqlValue};
use spillway_spin::{Redis, authorize, bin, json, problem, text};
use spin_sdk::http::Request;

use crate::drain::{self, Scope, Stats};
use crate::ops;

/// A message on either subscribed channel: the doorbell (a shard number) or Redis's
/// expired-key events (a key name). An expired lease or doorbell flag means a
/// processor died holding, or before taking, that shard: resume it. Other expired
/// keys (idempotency records, other applications' keys) are ignored at once.
pub(crate) async fn on_message(message: &[u8]) -> anyhow::Result<()> {
    let settings = spillway_spin::settings().await.map_err(|p| anyhow::anyhow!(p.detail))?;
    let text = std::str::from_utf8(message)?.trim();
    let shard = match text.parse::<u32>() {
        Ok(shard) => {
            anyhow::ensure!(shard < settings.layout.shards, "doorbell for shard {shard}, but there are {}", settings.layout.shards);
            shard
        }
        Err(_) => match settings.layout.shard_of_expired(text) {
            Some(shard) => shard,
            None => return Ok(()),
        },
    };
    drain_claimable(&settings, Some(shard)).await
}

/// Drains `shard` (if any) and every shard with queued writes and no holder: a
/// doorbell, an expired lease or flag, or a wake.
async fn drain_claimable(settings: &Settings, shard: Option<u32>) -> anyhow::Result<()> {
    spillway_spin::hazards::check_all(settings).await;
    let db = Db::open_with_schema().await.map_err(|p| anyhow::anyhow!(p.detail))?;
    let mut stats = Stats::default();
    let failures = drain::drain(settings, &db, Scope::Claimable(shard), &mut stats).await;
    match failures.first() {
        None => Ok(()),
        Some(_) => {
            let all: Vec<String> = failures.iter().map(|(shard, p)| format!("shard {}: {}", shard.map_or("?".into(), |s| s.to_string()), p.detail)).collect();
            anyhow::bail!("{}", all.join("; "))
        }
    }
}

pub(crate) async fn handle(req: Request) -> http::Response<String> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let allow = match path.as_str() {
        "/v1/drain" | "/v1/dead/replay" | "/v1/dead/purge" => "POST",
        "/v1/dead" | "/v1/stats" | "/metrics" | "/dashboard" => "GET",
        // GET too: a platform's cron sends a bare GET.
        "/v1/wake" => "GET, POST",
        _ => return problem(&Problem::not_found(&format!("no resource at {path}"))),
    };
    if !allow.split(", ").any(|m| m == req.method().as_str()) {
        return spillway_spin::method_not_allowed(allow);
    }
    if path == "/dashboard" {
        return ops::dashboard();
    }
    let settings = match spillway_spin::settings().await {
        Ok(s) => s,
        Err(p) => return problem(&p),
    };
    if path == "/v1/wake" {
        return wake(settings, req.uri().query(), req.method()).await.unwrap_or_else(|p| problem(&p));
    }
    // Stats and metrics are admin endpoints unless `stats_public` opens them.
    let public = settings.stats_public && matches!(path.as_str(), "/v1/stats" | "/metrics");
    if !public && let Err(p) = authorize(req.headers(), settings.admin_token.as_deref()) {
        return problem(&p);
    }
    let result = match path.as_str() {
        "/v1/drain" => drain_endpoint(&settings, req.uri().query()).await,
        "/v1/dead" => dead_letters(&settings).await,
        "/v1/stats" => ops::stats(&settings).await,
        "/metrics" => ops::metrics(&settings).await,
        "/v1/dead/purge" => match spillway_spin::read_body(req, settings.limits.max_body_bytes).await {
            Ok(body) => ops::purge(&settings, &body).await,
            Err(p) => Err(p),
        },
        _ => replay(&settings, req).await,
    };
    result.unwrap_or_else(|p| problem(&p))
}

fn shard_param(s: &Settings, query: Option<&str>) -> Result<Option<u32>, Problem> {
    let Some(v) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("shard="))) else {
        return Ok(None);
    };
    match v.parse() {
        Ok(n) if n < s.layout.shards => Ok(Some(n)),
        _ => Err(Problem::invalid(&format!("shard must be a number below {}", s.layout.shards), "/query/shard")),
    }
}

async fn drain_endpoint(settings: &Settings, query: Option<&str>) -> Result<http::Response<String>, Problem> {
    let scope = match shard_param(settings, query)? {
        Some(s) => Scope::Only(s),
        None => Scope::Claimable(None),
    };
    let warnings = spillway_spin::hazards::check_all(settings).await;
    let db = Db::open_with_schema().await?;
    let mut stats = Stats::default();
    let errors: Vec<_> = drain::drain(settings, &db, scope, &mut stats)
        .await
        .into_iter()
        .map(|(shard, p)| json!({"shard": shard, "detail": p.detail}))
        .collect();
    Ok(json(200, &json!({
        "applied": stats.applied,
        "rejected": stats.rejected,
        "batches": stats.batches,
        "busy_shards": stats.busy,
        "handed_on": stats.handed_on,
        "errors": errors,
        "warnings": warnings,
    }), &[]))
}

/// `POST /v1/wake[?shard=n]` (and `GET`): the doorbell over HTTP, for platforms
/// without the Redis trigger. No token: it only applies writes already
/// accepted, a shard another invocation holds is left to it, and with no shard
/// to claim it costs one Redis call per server (no database connection).
///
/// - `POST` (intake, by service chaining): answers `202` at once and drains
///   after answering, within `drain_budget_secs`.
/// - `GET` (a platform's cron, the safety net): drains first, within the
///   budget, then answers `200`, so the drain does not depend on work after a
///   response.
async fn wake(settings: std::rc::Rc<Settings>, query: Option<&str>, method: &http::Method) -> Result<http::Response<String>, Problem> {
    let shard = shard_param(&settings, query)?;
    if method == http::Method::GET {
        wake_drain(settings, shard).await;
        return Ok(json(200, &json!({"woken": true, "shard": shard}), &[]));
    }
    spin_sdk::wasip3::spawn(wake_drain(settings, shard));
    Ok(json(202, &json!({"woken": true, "shard": shard}), &[]))
}

/// A wake's drain, if any shard is there to claim.
async fn wake_drain(settings: std::rc::Rc<Settings>, shard: Option<u32>) {
    match drain::claimable(&settings).await {
        Ok(found) if found.is_empty() => return,
        Ok(_) => {}
        Err(p) => eprintln!("wake: {}", p.detail),
    }
    if let Err(e) = drain_claimable(&settings, shard).await {
        eprintln!("wake: {e}");
    }
}

/// `GET /v1/dead`: every dead letter, oldest first per shard.
async fn dead_letters(s: &Settings) -> Result<http::Response<String>, Problem> {
    let mut out = Vec::new();
    for shard in 0..s.layout.shards {
        let flat = Redis::for_shard(s, shard).execute("XRANGE", vec![bin(&s.layout.dead(shard)), bin("-"), bin("+")]).await?;
        // Flattened entries: id, then field/value pairs (id, w, error, attempts).
        for entry in flat.chunks(9) {
            let t: Vec<String> = entry.iter().map(|v| text(v).unwrap_or_default()).collect();
            if t.len() < 9 {
                continue;
            }
            let write: serde_json::Value = serde_json::from_str(&t[4]).unwrap_or(serde_json::Value::Null);
            out.push(json!({"id": t[2], "write": write, "error": t[6], "attempts": t[8].parse::<u64>().unwrap_or(0)}));
        }
    }
    Ok(json(200, &json!({"dead": out}), &[]))
}

/// `POST /v1/dead/replay`: `{"ids": [...]}` (or an empty body: all) back onto the queue.
async fn replay(s: &Settings, req: Request) -> Result<http::Response<String>, Problem> {
    let body = spillway_spin::read_body(req, s.limits.max_body_bytes).await?;
    let ids: Vec<String> = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| Problem::malformed(&e.to_string()))?;
        match v.get("ids").and_then(|i| i.as_array()) {
            Some(a) if v.as_object().is_some_and(|o| o.len() == 1) => a
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    id.as_str()
                        .and_then(WriteId::parse)
                        .filter(|w| w.shard < s.layout.shards)
                        .map(|w| w.to_string())
                        .ok_or_else(|| Problem::invalid("not a write id", &format!("/ids/{i}")))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(Problem::invalid("expected {\"ids\": [write id, ...]}", "")),
        }
    };
    let l = &s.layout;
    let db = Db::open().await?;
    let mut replayed = Vec::new();
    let mut already = Vec::new();
    let mut rang = Vec::new();
    let walked: Result<(), Problem> = async {
        for shard in 0..l.shards {
            let redis = Redis::for_shard(s, shard);
            let mine: Vec<String> = ids.iter().filter(|id| id.starts_with(&format!("{shard}-"))).cloned().collect();
            if !ids.is_empty() && mine.is_empty() {
                continue;
            }
            // A dead letter whose write the database has applied (it committed, then
            // its acknowledgement kept failing) must not be applied again: it is taken
            // off the dead-letter stream instead, and reported.
            let dead: Vec<(String, String)> = dead_entries(&redis, l, shard)
                .await?
                .into_iter()
                .filter(|(_, id)| ids.is_empty() || mine.contains(id))
                .collect();
            if dead.is_empty() {
                continue;
            }
            let ids_json = serde_json::to_string(&dead.iter().map(|(_, id)| id).collect::<Vec<_>>()).unwrap_or_default();
            let applied: std::collections::HashSet<String> = match db.query(db.sql().applied_ids, vec![SqlValue::Text(ids_json)]).await {
                Ok(rows) => rows.iter().filter_map(|r| r.first().and_then(spillway_spin::db::text)).collect(),
                Err(p) if spillway_spin::db::is_missing_table(&p) => Default::default(),
                Err(p) => return Err(p),
            };
            let (done, todo): (Vec<_>, Vec<_>) = dead.into_iter().partition(|(_, id)| applied.contains(id));
            if !done.is_empty() {
                let mut args = vec![bin(&l.dead(shard))];
                args.extend(done.iter().map(|(entry, _)| bin(entry)));
                redis.execute("XDEL", args).await?;
                already.extend(done.into_iter().map(|(_, id)| id));
            }
            if todo.is_empty() {
                continue;
            }
            let retention_ms = s.status_retention_secs.saturating_mul(1000).to_string();
            let mut args = vec![String::new(), s.lease_ttl_ms.to_string(), shard.to_string(), retention_ms];
            args.extend(todo.into_iter().map(|(_, id)| id));
            let flat = redis.eval(scripts::REPLAY, &[l.dead(shard), l.dead_status_prefix(shard), l.stream(shard), l.bell(shard), l.stats(shard)], &args).await?;
            if !flat.is_empty() {
                rang.push(shard);
            }
            for pair in flat.chunks(2) {
                if let [old, new] = pair {
                    replayed.push(json!({"id": text(old), "replayed_as": text(new)}));
                }
            }
        }
        Ok(())
    }
    .await;
    // The replayed shards' doorbells (their flags were set by the script), also
    // when a later shard failed.
    spillway_spin::ring(s, &rang).await;
    walked?;
    Ok(json(200, &json!({"replayed": replayed, "already_applied": already}), &[]))
}

/// A shard's dead letters: `(dead-letter entry id, write id)`, oldest first.
async fn dead_entries(redis: &Redis, l: &spillway_core::layout::Layout, shard: u32) -> Result<Vec<(String, String)>, Problem> {
    let flat = redis.execute("XRANGE", vec![bin(&l.dead(shard)), bin("-"), bin("+")]).await?;
    // Flattened entries: entry id, then field/value pairs (id, w, error, attempts).
    Ok(flat
        .chunks(9)
        .filter(|e| e.len() == 9)
        .filter_map(|e| Some((text(&e[0])?, text(&e[2])?)))
        .collect())
}
