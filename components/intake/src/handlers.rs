//! Request handling for `POST /v1/writes`.

use serde_json::json;
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_core::write::parse_request;
use spillway_spin::{Redis, json, problem, status, text};
use spin_sdk::http::Request;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub(crate) async fn handle(req: Request) -> http::Response<String> {
    match accept(req).await {
        Ok(r) => r,
        Err(p) => problem(&p),
    }
}

async fn accept(req: Request) -> Result<http::Response<String>, Problem> {
    if req.method() != http::Method::POST {
        return Ok(spillway_spin::method_not_allowed("POST"));
    }
    let settings = spillway_spin::settings().await?;
    let limits = settings.limits;
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" {
        return Err(Problem::new(415, "unsupported-media-type", "Unsupported media type", "send the writes as application/json"));
    }
    let idem = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().map_err(|_| Problem::invalid("Idempotency-Key must be visible ASCII", "").at("/headers/idempotency-key"))?;
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Problem::invalid(
                    &format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
                    "/headers/idempotency-key",
                ));
            }
            Some(k.to_owned())
        }
    };
    let wait = prefer_wait(req.headers());
    let body = spillway_spin::read_body(req, limits.max_body_bytes).await?;
    let batch = parse_request(&body, &limits)?;
    let deadline = wait.map(|ms| spillway_spin::monotonic_ms() + ms);
    let accepted = enqueue(&settings, &batch.writes, idem.as_deref(), &body).await?;
    match deadline {
        Some(deadline) => outcome(&settings, accepted, !batch.batch, deadline, wait.unwrap_or(0)).await,
        None => Ok(accepted.response(!batch.batch)),
    }
}

/// `Prefer: wait=<seconds>` (RFC 7240), in milliseconds, at most
/// [`status::MAX_WAIT_SECS`]. As the RFC asks, a preference the server cannot
/// read is ignored, not an error; a longer wait is cut to the bound.
fn prefer_wait(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            let (name, value) = pref.split(';').next()?.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let secs: f64 = value.trim().trim_matches('"').parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0)?;
            Some((secs.min(status::MAX_WAIT_SECS) * 1000.0) as u64)
        })
}

/// `POST /v1/writes` with `Prefer: wait`: 200 with every write's outcome if they
/// all leave `pending` before the deadline, else (or if the wait fails) 202 as
/// without the preference.
async fn outcome(s: &Settings, accepted: Accepted, single: bool, deadline: u64, wait_ms: u64) -> Result<http::Response<String>, Problem> {
    let mut outcomes = Vec::with_capacity(accepted.ids.len());
    for id in &accepted.ids {
        // The writes are queued: whatever goes wrong while waiting, the answer is
        // the 202 they earned (an error here would invite a retry that doubles them).
        let waited = match WriteId::parse(id) {
            Some(parsed) => status::wait_for(s, &parsed, deadline).await.ok(),
            None => None,
        };
        let Some(mut body) = waited.filter(|b| b["status"] != "pending") else {
            return Ok(accepted.response(single));
        };
        body["status_url"] = json!(format!("/v1/writes/{id}"));
        outcomes.push(body);
    }
    let mut headers = vec![("preference-applied", format!("wait={}", wait_ms.div_ceil(1000)))];
    if accepted.replayed {
        headers.push(("idempotent-replayed", "true".to_owned()));
    }
    let body = if single { outcomes.swap_remove(0) } else { json!({ "writes": outcomes }) };
    Ok(json(200, &body, &headers))
}

/// Writes the enqueue script queued (or had queued, for a replayed
/// `Idempotency-Key`).
struct Accepted {
    ids: Vec<String>,
    replayed: bool,
}

impl Accepted {
    /// `202 Accepted` with each write's id and status URL.
    fn response(self, single: bool) -> http::Response<String> {
        let Accepted { ids, replayed } = self;
        let mut headers = Vec::new();
        if replayed {
            headers.push(("idempotent-replayed", "true".to_owned()));
        }
        let entry = |id: &String| json!({"id": id, "status_url": format!("/v1/writes/{id}")});
        let body = if single {
            headers.push(("location", format!("/v1/writes/{}", ids[0])));
            entry(&ids[0])
        } else {
            json!({"writes": ids.iter().map(entry).collect::<Vec<_>>()})
        };
        json(202, &body, &headers)
    }
}

async fn enqueue(
    s: &Settings,
    writes: &[spillway_core::write::Write],
    idem: Option<&str>,
    body: &[u8],
) -> Result<Accepted, Problem> {
    let layout = &s.layout;
    let mut shards: Vec<u32> = Vec::new();
    let mut slots = Vec::with_capacity(writes.len());
    for w in writes {
        let shard = layout.shard_of(&w.key);
        let slot = match shards.iter().position(|s| *s == shard) {
            Some(i) => i,
            None => {
                shards.push(shard);
                shards.len() - 1
            }
        };
        slots.push(slot + 1);
    }
    let mut keys = vec![layout.idempotency(idem.unwrap_or(""))];
    for s in &shards {
        keys.push(layout.stream(*s));
        keys.push(layout.bell(*s));
        keys.push(layout.lease(*s));
        keys.push(layout.stats(*s));
    }
    let mut args = vec![
        if idem.is_some() { "1" } else { "0" }.to_owned(),
        idem.map(|_| spillway_core::layout::md5_hex(body)).unwrap_or_default(),
        s.idempotency_ttl_secs.to_string(),
        s.queue_depth_limit.to_string(),
        layout.doorbell_channel(),
        s.lease_ttl_ms.to_string(),
        shards.len().to_string(),
    ];
    args.extend(shards.iter().map(u32::to_string));
    args.push(writes.len().to_string());
    for (w, slot) in writes.iter().zip(&slots) {
        args.push(slot.to_string());
        args.push(serde_json::to_string(w).map_err(|e| Problem::invalid(&e.to_string(), ""))?);
    }
    let redis = Redis::new(&s.redis_address);
    // Once per instance: expiry events back on after a Redis restart, so a crashed
    // processor's shards are resumed (see spillway_core::hazards).
    spillway_spin::hazards::ensure(&redis).await;
    let reply = redis.eval(scripts::ENQUEUE, &keys, &args).await?;
    let status = reply.first().and_then(text).unwrap_or_default();
    let mut ids: Vec<String> = reply.iter().skip(1).filter_map(text).collect();
    // The shards this request rang (after `rang`): where no Redis trigger
    // listens, a processor is woken over HTTP, after the answer (the writes are
    // durable already). One wake is enough: the woken drain also claims every
    // other shard with queued writes and no holder.
    if let Some(at) = ids.iter().position(|v| v == "rang") {
        let first: Option<u32> = ids.split_off(at).get(1).and_then(|v| v.parse().ok());
        if let (Some(shard), Some(_)) = (first, &s.wake_url) {
            let s = s.clone();
            spin_sdk::wasip3::spawn(async move { spillway_spin::wake(&s, shard).await });
        }
    }
    match status.as_str() {
        "ok" | "replay" if !ids.is_empty() => Ok(Accepted { ids, replayed: status == "replay" }),
        "conflict" => Err(Problem::new(
            409,
            "idempotency-key-reused",
            "Idempotency key reused",
            "this Idempotency-Key was used with a different request body",
        )
        .at("/headers/idempotency-key")),
        "full" => Err(Problem::queue_full(
            &format!("shard {} is over its queue depth limit of {}; retry later", ids.first().map_or("?", |s| s), s.queue_depth_limit),
            1,
        )),
        other => Err(Problem::unavailable(&format!("unexpected reply from the enqueue script: {other:?}"))),
    }
}
