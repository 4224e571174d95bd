//! Entry points: the doorbell message, `POST /v1/drain`, the dead letters, and
//! the operator's views (`/v1/stats`, `/metrics`, in [`ops`]).

use serde_json::json;
use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_core::settings::Settings;
use spillway_spin::db::Db;
use spillway_spin::mirror::{Mirrored, mirror};
use spillway_spin::{Redis, answer, authorize, bin, int, json, problem};
use spin_sdk::http::Request;

use crate::drain::{self, Scope, Stats};
use crate::{dead, ops};

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
    let drained = drain_claimable(&settings, Some(shard)).await;
    if settings.layout.is_mirror(text) && !text.ends_with(":alarm") {
        rearm(&settings, shard).await;
    }
    drained
}

/// After a lease's mirror expired: if the shard is still held (its holder
/// alive after all, or its lease renewed late in a long round), the mirror is
/// set again to expire just after the lease does, whose own expiry is not heard
/// here. A shard stays watched as long as it is held.
async fn rearm(settings: &Settings, shard: u32) {
    let lease = settings.layout.lease(shard);
    match Redis::for_shard(settings, shard).execute("PTTL", vec![bin(&lease)]).await {
        Ok(reply) => {
            if let Some(ms) = reply.first().and_then(int).filter(|ms| *ms > 0) {
                mirror(settings, shard, Mirrored::Lease, Some(ms as u64 + REARM_MARGIN_MS)).await;
            }
        }
        Err(p) => spillway_spin::log_ignored("reading a held shard's lease after its mirror expired", Err::<(), _>(p)),
    }
}

/// How long after the lease a re-armed mirror expires.
const REARM_MARGIN_MS: u64 = 100;

/// Drains `shard` (if any) and every shard with queued writes and no holder: a
/// doorbell, an expired lease or flag, or a wake.
async fn drain_claimable(settings: &Settings, shard: Option<u32>) -> anyhow::Result<()> {
    // Each message gets a fresh instance: its setup (Redis's settings, the
    // database), both at once.
    let (_, db) = futures::future::join(spillway_spin::hazards::check_all(settings), Db::open_with_schema()).await;
    let db = db.map_err(|p| anyhow::anyhow!(p.detail))?;
    let mut stats = Stats::default();
    let failures = drain::drain(settings, &db, Scope::Claimable(shard), false, &mut stats).await;
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
        return answer(wake(settings, req.uri().query(), req.method()).await);
    }
    // Stats and metrics are admin endpoints unless `stats_public` opens them.
    let public = settings.stats_public && matches!(path.as_str(), "/v1/stats" | "/metrics");
    if !public && let Err(p) = authorize(req.headers(), settings.admin_token.as_deref()) {
        return problem(&p);
    }
    if path == "/v1/drain" {
        // As long as the queue asks (each call within its own deadline).
        return answer(drain_endpoint(&settings, req.uri().query()).await);
    }
    let result = spillway_spin::deadline::request(&settings, 0, async {
        match path.as_str() {
            "/v1/dead" => dead::list(&settings).await,
            "/v1/stats" => ops::stats(&settings).await,
            "/metrics" => ops::metrics(&settings).await,
            "/v1/dead/purge" => match spillway_spin::read_body(req, settings.limits.max_body_bytes).await {
                Ok(body) => dead::purge(&settings, &body).await,
                Err(p) => Err(p),
            },
            _ => dead::replay(&settings, req).await,
        }
    })
    .await;
    answer(result)
}

fn shard_param(s: &Settings, query: Option<&str>) -> Result<Option<u32>, Problem> {
    let query = Query::parse(query, &["shard"])?;
    let Some(v) = query.get("shard") else {
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
    let (warnings, db) = futures::future::join(spillway_spin::hazards::check_all(settings), Db::open_with_schema()).await;
    let db = db?;
    let mut stats = Stats::default();
    // An operator's drain retries at once: it ends any shard's backoff.
    let errors: Vec<_> = drain::drain(settings, &db, scope, true, &mut stats)
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
    match drain::claimable(&settings, false).await {
        Ok(found) if found.shards.is_empty() && found.wait_ms.is_none() => return,
        Ok(_) => {}
        Err(p) => eprintln!("wake: {}", p.detail),
    }
    if let Err(e) = drain_claimable(&settings, shard).await {
        eprintln!("wake: {e}");
    }
}

