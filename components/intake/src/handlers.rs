//! Request handling for `POST /v1/writes`.

use serde_json::json;
use spillway_core::call::{Call, EnqueueLimits, Queued};
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::reply::{Enqueued, Rung, Throttle};
use spillway_core::schedule::{Due, PAST_TOLERANCE_MS, Timing};
use spillway_core::settings::Settings;
use spillway_core::tenant;
use spillway_core::write::{self, parse_request_for};
use spillway_spin::redis::Replicas;
use spillway_spin::{Redis, json, problem, status};
use spillway_spin::mirror::{Mirrored, mirror};
use spin_sdk::http::Request;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

pub(crate) async fn handle(req: Request) -> http::Response<String> {
    match accept(req).await {
        Ok(r) => r,
        Err(p) => {
            crate::answered::note(&p);
            problem(&p)
        }
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
    let minimal = preference(req.headers(), "return").is_some_and(|v| v.eq_ignore_ascii_case("minimal"));
    let by_header = settings.tenancy.source == tenant::Source::Header;
    let header_tenant = match req.headers().get(tenant::HEADER).filter(|_| by_header) {
        None => None,
        Some(v) => Some(v.to_str().ok().filter(|t| tenant::valid_name(t)).map(str::to_owned).ok_or_else(|| {
            Problem::invalid(
                &format!("Spillway-Tenant must be {}", tenant::NAME_RULE),
                "/headers/spillway-tenant",
            )
        })?),
    };
    // A tenant named by the header whose refusal holds even for one write
    // is refused before its body is read: a flood past a quota costs this
    // host as little as it can (see `crate::throttle`).
    if idem.is_none()
        && let Some(t) = header_tenant.as_deref()
        && let Some(p) = crate::throttle::refused(&[(t, 1)]).await
    {
        return Err(p);
    }
    let body = spillway_spin::read_body(req, limits.max_body_bytes).await?;
    let batch = parse_request_for(&body, &limits, spillway_spin::pipeline::operations())?;
    check_timing(&settings, &batch, idem.is_none())?;
    let tenants = tenants_of(&settings, &batch, header_tenant.as_deref())?;
    // A tenant refused a moment ago, with a refusal sure to hold for this
    // request, is refused again here (a request with an Idempotency-Key may
    // be the retry of an accepted one: the script answers it).
    if idem.is_none() && let Some(p) = crate::throttle::refused(&writes_per_tenant(&tenants)).await {
        return Err(p);
    }
    let deadline = wait.map(|ms| spillway_spin::monotonic_ms() + ms);
    // Within the request's deadline. A timeout here is an unknown outcome: the
    // enqueue may be in Redis already, or arrive when Redis resumes.
    let replica_wait = if settings.min_replicas > 0 { settings.replica_timeout_ms } else { 0 };
    let accepted = match spillway_spin::deadline::request(&settings, replica_wait, enqueue(&settings, &batch, &tenants, idem.as_deref(), &body)).await {
        Err(p) if p.is_timeout() => return Err(Problem::outcome_unknown(&p, idem.is_some())),
        r => r?,
    };
    // A tenant's refusal, answered after its hold (outside the request's
    // deadline: the outcome is known).
    let accepted = match accepted {
        // Not for a write with an expiry: its id is in the body only.
        Ok(a) => Accepted { minimal: minimal && !batch.batch && !a.ids.iter().any(|id| id.contains('|')), ..a },
        Err(refused) => return Err(crate::throttle::answer(refused).await),
    };
    match deadline {
        Some(deadline) => outcome(&settings, accepted, !batch.batch, deadline, wait.unwrap_or(0)).await,
        None => Ok(accepted.response(!batch.batch)),
    }
}

/// Each write's times within bounds, on this instance's clock (a delay
/// itself counts from acceptance, on Redis's clock). An `apply_at` too far in
/// the past is refused here only without an `Idempotency-Key`: with one, the
/// enqueue script refuses it after looking the key up, so that a late retry of
/// an accepted request replays its answer.
fn check_timing(s: &Settings, batch: &write::WriteBatch, check_past: bool) -> Result<(), Problem> {
    let now = u64::try_from(spillway_spin::now_ms()).unwrap_or(0);
    let horizon = s.schedule_horizon_secs.saturating_mul(1000);
    for (i, timing) in batch.timing.iter().enumerate() {
        let pointer = pointer_of(batch, i);
        match timing.due {
            // Only how far ahead: a time in the past is checked by the script.
            Some(Due::At(at)) if !check_past => Timing { due: Some(Due::At(at.max(now))), ..*timing }.check(now, horizon, &pointer)?,
            _ => timing.check(now, horizon, &pointer)?,
        }
    }
    Ok(())
}

/// The tenant each write is charged to (see `spillway_core::tenant`): the
/// request's `Spillway-Tenant`, or each key's prefix with `tenant_from =
/// key:<separator>` (a prefix outside the tenant charset is refused, naming
/// its write; the header is then not read).
fn tenants_of<'b>(s: &Settings, batch: &'b write::WriteBatch, header: Option<&'b str>) -> Result<Vec<Option<&'b str>>, Problem> {
    match s.tenancy.source {
        tenant::Source::Header => Ok(vec![header; batch.writes.len()]),
        tenant::Source::KeyPrefix(_) => batch
            .writes
            .iter()
            .enumerate()
            .map(|(i, w)| match s.tenancy.of_key(w.key()) {
                Some(t) if !tenant::valid_name(t) => Err(Problem::invalid(
                    &format!("the key's tenant (its part before the separator) must be {}", tenant::NAME_RULE),
                    &format!("{}/key", pointer_of(batch, i)),
                )),
                t => Ok(t),
            })
            .collect(),
    }
}

/// How many of the request's writes each tenant has.
fn writes_per_tenant<'t>(tenants: &[Option<&'t str>]) -> Vec<(&'t str, u64)> {
    let mut out: Vec<(&str, u64)> = Vec::new();
    for t in tenants.iter().flatten() {
        match out.iter_mut().find(|(n, _)| n == t) {
            Some((_, c)) => *c += 1,
            None => out.push((t, 1)),
        }
    }
    out
}

/// The JSON pointer of the request's `i`-th write.
fn pointer_of(batch: &write::WriteBatch, i: usize) -> String {
    if batch.batch { format!("/writes/{i}") } else { String::new() }
}

/// `Prefer: wait=<seconds>` (RFC 7240), in milliseconds, at most
/// [`status::MAX_WAIT_SECS`]. As the RFC asks, a preference the server cannot
/// read is ignored, not an error; a longer wait is cut to the bound.
fn prefer_wait(headers: &http::HeaderMap) -> Option<u64> {
    let secs: f64 = preference(headers, "wait")?.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0)?;
    Some((secs.min(status::MAX_WAIT_SECS) * 1000.0) as u64)
}

/// The value of the `Prefer` preference `name` (RFC 7240: names are
/// case-insensitive, parameters after `;` are ignored, a quoted value is
/// unquoted), the first one if it is given twice.
fn preference<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            let (n, value) = pref.split(';').next()?.split_once('=')?;
            n.trim().eq_ignore_ascii_case(name).then(|| value.trim().trim_matches('"'))
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
        let waited = match WriteId::parse(write_id(id)) {
            Some(parsed) => status::wait_for(s, &parsed, deadline).await.ok(),
            None => None,
        };
        let Some(mut body) = waited.filter(status::settled) else {
            return Ok(accepted.response(single));
        };
        body["status_url"] = json!(format!("/v1/writes/{}", write_id(id)));
        if let Some((_, expiry)) = id.split_once('|') {
            body["expiry_id"] = json!(expiry);
        }
        outcomes.push(body);
    }
    let mut headers = vec![("preference-applied", format!("wait={}", wait_ms.div_ceil(1000)))];
    if accepted.replayed {
        headers.push(("idempotent-replayed", "true".to_owned()));
    }
    let body = if single { outcomes.swap_remove(0) } else { json!({ "writes": outcomes }) };
    Ok(json(200, &body, &headers))
}

/// A write's id as `ENQUEUE` gives it: `<id>` or, for a write with `ttl_ms`,
/// `<id>|<its expiry's id>`.
fn write_id(given: &str) -> &str {
    given.split_once('|').map_or(given, |(id, _)| id)
}

/// A write's entry in a `202`: its id and status URL, and the id of its
/// expiry (`ttl_ms`), a write of its own.
fn entry(given: &str) -> serde_json::Value {
    let id = write_id(given);
    let mut e = json!({"id": id, "status_url": format!("/v1/writes/{id}")});
    if let Some((_, expiry)) = given.split_once('|') {
        e["expiry_id"] = json!(expiry);
    }
    e
}

/// Writes the enqueue script queued (or had queued, for a replayed
/// `Idempotency-Key`).
struct Accepted {
    ids: Vec<String>,
    replayed: bool,
    /// A single write's client asked for `Prefer: return=minimal` (and the
    /// write has no expiry, whose id only the body gives): the `202` has no
    /// body, its `Location` names the write.
    minimal: bool,
}

impl Accepted {
    /// `202 Accepted` with each write's id and status URL (a single write's
    /// `Location` only, with `Prefer: return=minimal`).
    fn response(self, single: bool) -> http::Response<String> {
        let Accepted { ids, replayed, minimal } = self;
        let mut headers = Vec::new();
        if replayed {
            headers.push(("idempotent-replayed", "true".to_owned()));
        }
        if minimal {
            headers.push(("location", format!("/v1/writes/{}", write_id(&ids[0]))));
            headers.push(("preference-applied", "return=minimal".to_owned()));
            return spillway_spin::respond(202, "", String::new(), &headers);
        }
        let body = if single {
            headers.push(("location", format!("/v1/writes/{}", write_id(&ids[0]))));
            entry(&ids[0])
        } else {
            json!({"writes": ids.iter().map(|id| entry(id)).collect::<Vec<_>>()})
        };
        json(202, &body, &headers)
    }
}

/// Enqueues `writes`: one `ENQUEUE` call per group of shards that share a
/// Redis server (per shard with `redis_cluster`), all groups at once, each
/// followed by a `WAIT` for `min_replicas` on its own connection. One server
/// (the default) is one call, all or nothing. With several, each group is all or
/// nothing on its own: a refusal (full, conflict) or a failure answers for the
/// whole request while other groups may have been accepted, and a retry with the
/// same `Idempotency-Key` completes the request without doubling a write (each
/// group keeps its own idempotency record; see `scripts::ENQUEUE`).
// A little over the usual length: the calls, the rings and the ids in request
// order are one sequence that must ring before it answers anything.
async fn enqueue(s: &Settings, batch: &write::WriteBatch, tenants: &[Option<&str>], idem: Option<&str>, body: &[u8]) -> Result<Result<Accepted, Refused>, Problem> {
    let (writes, timing) = (&batch.writes, &batch.timing);
    let layout = &s.layout;
    let shard_of: Vec<u32> = writes.iter().map(|w| layout.shard_of(w.key())).collect();
    let mut shards: Vec<u32> = Vec::new();
    for shard in &shard_of {
        if !shards.contains(shard) {
            shards.push(*shard);
        }
    }
    let groups = s.slot_groups(&shards);
    let body_md5 = idem.map(|_| spillway_core::layout::md5_hex(body)).unwrap_or_default();
    let replicas = (s.min_replicas > 0).then_some(Replicas { count: s.min_replicas, timeout_ms: s.replica_timeout_ms });
    // The error answers not yet counted ride on the first group's call.
    let answered = crate::answered::take();
    let channel = s.layout.doorbell_channel();
    let calls = groups.iter().enumerate().map(|(i, (address, group))| {
        let doorbell = if rings_itself(s, address) { channel.as_str() } else { "" };
        let call = enqueue_call(s, group, (writes, timing, tenants, &shard_of), (idem, &body_md5), if i == 0 { &answered } else { &[] }, doorbell);
        async move {
            let redis = Redis::new(address);
            // Once per instance and server: expiry events back on after a Redis
            // restart, so a crashed processor's shards are resumed (see
            // spillway_core::hazards).
            spillway_spin::hazards::ensure(&redis).await;
            match replicas {
                Some(r) => redis.call_replicated(&call, r).await,
                None => redis.call(&call).await.map(|reply| (reply, 0)),
            }
        }
    });
    // Each reply read by its type; a reply of another shape fails its group.
    let replies: Vec<GroupReply> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| {
            r.and_then(|(reply, acked)| {
                Ok((Enqueued::parse(&spillway_spin::redis::values(&reply)).map_err(spillway_spin::redis::malformed)?, acked))
            })
        })
        .collect();
    if replies.first().is_some_and(Result::is_err) {
        crate::answered::add(answered);
    }
    // Ring what was rung first, whatever else the replies say: a group accepted
    // beside one refused has its flag set, and no one else will ring it.
    // (Those of the trigger's own server the script rang itself.)
    let mut rung = Rung::default();
    for ((address, _), ((_, r), _)) in groups.iter().zip(&replies).filter_map(|(g, r)| Some((g, r.as_ref().ok()?))) {
        if !rings_itself(s, address) {
            rung.rang.extend(&r.rang);
        }
        rung.armed.extend(&r.armed);
    }
    ring(s, rung);
    // Ids back in request order: each group's ids are its writes' in order.
    let mut ids: Vec<Option<String>> = vec![None; writes.len()];
    let mut replayed = true;
    for ((_, group), reply) in groups.iter().zip(replies) {
        let ((enqueued, _), acked) = reply?;
        match enqueued {
            // Stored on the primary, not (yet) on as many replicas as asked.
            Enqueued::Accepted { .. } if acked < i64::from(s.min_replicas) => {
                return Err(Problem::not_replicated(acked, s.min_replicas, s.replica_timeout_ms, idem.is_some()));
            }
            Enqueued::Accepted { ids: given, replay } => {
                replayed &= replay;
                let mine = (0..writes.len()).filter(|i| group.contains(&shard_of[*i]));
                let mut given = given.into_iter();
                for i in mine {
                    ids[i] = given.next();
                }
            }
            Enqueued::Conflict => {
                return Err(Problem::new(
                    409,
                    "idempotency-key-reused",
                    "Idempotency key reused",
                    "this Idempotency-Key was used with a different request body",
                )
                .at("/headers/idempotency-key"));
            }
            Enqueued::Full { shard } => {
                return Err(Problem::queue_full(&format!("shard {shard} is over its queue depth limit of {}; retry later", s.queue_depth_limit), 1));
            }
            Enqueued::Past { index } => {
                let i = (0..writes.len()).filter(|i| group.contains(&shard_of[*i])).nth(index).unwrap_or(0);
                return Err(Problem::invalid(
                    &format!("apply_at is more than {PAST_TOLERANCE_MS} ms in the past"),
                    &format!("{}/apply_at", pointer_of(batch, i)),
                ));
            }
            Enqueued::FullScheduled { shard } => {
                return Err(Problem::schedule_full(
                    &format!("shard {shard} holds its limit of {} scheduled writes (scheduled_limit); retry later", s.scheduled_limit),
                    1,
                ));
            }
            Enqueued::Throttled { tenant, by } => {
                let name = group_tenants(group, tenants, &shard_of).get(tenant).copied().unwrap_or("?");
                let p = throttled(s, name, group[0], by);
                // Remembered where one server enforces the whole quota.
                let held = if s.tenant_share(group[0]) == s.layout.shards {
                    let quota = s.tenancy.quota(name);
                    match by {
                        Throttle::Rate { tokens_milli, .. } => crate::throttle::note_rate(name, &p, (tokens_milli, quota.rate, quota.burst)),
                        Throttle::Depth(_) => crate::throttle::note_depth(name, &p),
                        Throttle::OverDepth(_) | Throttle::Burst(_) => None,
                    }
                } else {
                    None
                };
                return Ok(Err(held.unwrap_or((p, 0))));
            }
        }
    }
    let ids: Vec<String> = ids.into_iter().collect::<Option<_>>().ok_or_else(|| Problem::unavailable("the enqueue script gave too few ids"))?;
    Ok(Ok(Accepted { ids, replayed, minimal: false }))
}

/// Whether the enqueue script on `address` publishes its rings itself: it is
/// the server the processor's Redis trigger listens to (`redis_address`, no
/// `wake_url`, not a cluster, whose seed may own none of the call's slots).
fn rings_itself(s: &Settings, address: &str) -> bool {
    s.wake_url.is_none() && !s.redis_cluster && address == s.redis_address
}

/// One group's `ENQUEUE` reply (with the shards it rang and armed) and how
/// many replicas confirmed it (0 without `min_replicas`).
type GroupReply = Result<((Enqueued, Rung), i64), Problem>;

/// Rings the shards rung that the script could not publish itself (on a
/// server other than the trigger's, or woken over HTTP) after the answer (the
/// writes are durable already; a ring lost with a dying instance leaves the
/// shard's flag to expire, which resumes it: heard through its mirror), and
/// mirrors the alarms set.
fn ring(s: &Settings, rung: Rung) {
    if rung.rang.is_empty() && rung.armed.is_empty() {
        return;
    }
    let s = s.clone();
    spin_sdk::wasip3::spawn(async move {
        spillway_spin::ring(&s, &rung.rang).await;
        for shard in rung.rang {
            mirror(&s, shard, Mirrored::Bell, Some(s.lease_ttl_ms)).await;
        }
        for (shard, ttl_ms) in rung.armed {
            mirror(&s, shard, Mirrored::Alarm, Some(ttl_ms)).await;
        }
    });
}

/// A tenant's refusal by the script, and how long to hold its answer (see
/// `crate::throttle`).
type Refused = (Problem, u64);

/// The tenants of `group`'s writes, each once, in the order `Call::enqueue`
/// lists them (by first write).
fn group_tenants<'t>(group: &[u32], tenants: &[Option<&'t str>], shard_of: &[u32]) -> Vec<&'t str> {
    let mut out: Vec<&str> = Vec::new();
    for (t, shard) in tenants.iter().zip(shard_of) {
        if let Some(t) = t.filter(|t| group.contains(shard) && !out.contains(t)) {
            out.push(t);
        }
    }
    out
}

/// The answer to a call a tenant's quota refused (`shard`: one of the call's,
/// whose share of the quota it checked).
fn throttled(s: &Settings, tenant: &str, shard: u32, by: Throttle) -> Problem {
    let share = s.tenant_share(shard);
    let quota = s.tenancy.quota(tenant);
    let note = if share < s.layout.shards { format!(", this server's share: {share} of {} shards", s.layout.shards) } else { String::new() };
    match by {
        Throttle::Rate { retry_ms: ms, .. } => Problem::tenant_throttled(
            "tenant-rate-limited",
            "Tenant rate limited",
            &format!("tenant {tenant} is over its quota of {} writes per second (tenant_rate{note}); retry in {ms} ms", quota.rate),
            u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX),
        ),
        Throttle::Depth(held) => Problem::tenant_throttled(
            "tenant-queue-full",
            "Tenant queue full",
            &format!("tenant {tenant} has {held} writes waiting, at its quota of {} (tenant_depth{note}); retry once some are applied", quota.depth),
            1,
        ),
        Throttle::Burst(burst) => Problem::invalid(
            &format!("the request has more of tenant {tenant}'s writes than its quota lets through at once ({burst}: tenant_burst{note}); split it"),
            "/writes",
        ),
        Throttle::OverDepth(depth) => Problem::invalid(
            &format!("the request has more of tenant {tenant}'s writes (an expiry counting as one) than it may have waiting ({depth}: tenant_depth{note}); split it"),
            "/writes",
        ),
    }
}

/// The request's writes, each write's timing, tenant and shard.
type Writes<'r> = (&'r [write::Accepted], &'r [Timing], &'r [Option<&'r str>], &'r [u32]);

/// One `ENQUEUE` call: the writes of `group`'s shards (and the error answers
/// not yet counted).
fn enqueue_call(
    s: &Settings,
    group: &[u32],
    (writes, timing, tenants, shard_of): Writes<'_>,
    (idem, body_md5): (Option<&str>, &str),
    answered: &[(String, u64)],
    doorbell: &str,
) -> Call {
    let limits = EnqueueLimits {
        idempotency: idem.map(|k| (k, body_md5)),
        idempotency_ttl_secs: s.idempotency_ttl_secs,
        queue_depth_limit: s.queue_depth_limit,
        bell_ttl_ms: s.lease_ttl_ms,
        seq_start: spillway_spin::random_u32(),
        scheduled_limit: s.scheduled_limit,
        retention_ms: s.status_retention_secs.saturating_mul(1000),
        past_ms: PAST_TOLERANCE_MS,
        answered,
        doorbell,
    };
    // Only this group's writes are serialized (a request over several groups
    // must not serialize every write once per group).
    let writes: Vec<Queued<'_>> = writes
        .iter()
        .zip(timing)
        .zip(tenants)
        .zip(shard_of)
        .filter(|(_, shard)| group.contains(shard))
        .map(|(((w, timing), tenant), shard)| Queued { shard: *shard, key: w.key(), timing: *timing, payload: w.payload(), tenant: *tenant })
        .collect();
    Call::enqueue(&s.layout, group, s.idempotency_shard(group[0]), limits, &writes, |t| {
        (s.tenancy.quota(t).share(s.tenant_share(group[0]), s.layout.shards), crate::throttle::take_uncounted(t))
    })
}
