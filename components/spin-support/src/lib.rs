//! The Spin side shared by Spillway's components (the pure logic is in
//! `spillway-core`): settings read from Spin variables, one Redis connection kept per
//! instance, Lua script calls with flat replies, and HTTP responses that always carry
//! `Content-Length`.
//!
//! # Layout
//!
//! - this file: settings, Redis (connection, scripts by SHA), HTTP helpers.
//! - [`db`]: the database (SQLite or PostgreSQL), errors checked where Spin reports them.
//! - [`kv`]: the key-value store through `wasi:keyvalue` batch calls.
//! - [`hazards`]: Redis settings Spillway depends on, checked and reported.
//! - [`pipeline`]: the apply step, an imported interface.
//! - [`status`]: write status, and waiting for outcomes without polling.

pub mod db;
pub mod hazards;
pub mod kv;
pub mod pipeline;
pub mod status;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use spillway_core::problem::Problem;
use spillway_core::settings::Settings;
use spin_sdk::redis::{Connection, RedisParameter, RedisResult};
use spin_sdk::variables;

/// Every variable a component may read; undeclared ones fall back to defaults.
const VARIABLES: &[&str] = &[
    "redis_address", "key_prefix", "shard_count", "batch_size", "lease_ttl_ms", "max_attempts",
    "queue_depth_limit", "idempotency_ttl_secs", "admin_token", "max_body_bytes", "max_batch",
    "max_key_len", "max_value_bytes", "max_json_depth", "status_retention_secs", "change_feed_secs", "stats_public", "database", "wake_url", "drain_budget_secs", "shard_redis_addresses", "redis_cluster",
];

thread_local! {
    static SETTINGS: RefCell<Option<Rc<Settings>>> = const { RefCell::new(None) };
}

/// Rings the doorbell of `shards`: over HTTP where a wake URL is set (no Redis
/// trigger; one wake is enough, as the woken drain also claims every other shard
/// with queued writes and no holder), else on the doorbell channel, on
/// `redis_address` (where the processor's Redis trigger listens, whichever
/// server holds the shards). Best effort, as [`wake`].
pub async fn ring(s: &Settings, shards: &[u32]) {
    if s.wake_url.is_some() {
        if let Some(first) = shards.first() {
            wake(s, *first).await;
        }
        return;
    }
    let redis = Redis::new(&s.redis_address);
    for shard in shards {
        if let Err(p) = redis.execute("PUBLISH", vec![bin(&s.layout.doorbell_channel()), bin(&shard.to_string())]).await {
            eprintln!("doorbell: {}", p.detail);
        }
    }
}

/// Wakes a processor for `shard` where there is no Redis trigger: `POST
/// <wake_url>?shard=n` (service chaining on one app). The processor answers at
/// once and drains after answering. Best effort: a wake that fails leaves the
/// shard's doorbell flag set, and the next write after half its TTL rings again
/// (see `scripts::ENQUEUE`); a cron on the same endpoint is the safety net.
pub async fn wake(s: &Settings, shard: u32) {
    let Some(url) = &s.wake_url else { return };
    match spin_sdk::http::post(format!("{url}?shard={shard}"), "").await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => eprintln!("{}", redact(&format!("wake {url}: status {}", r.status()))),
        Err(e) => eprintln!("{}", redact(&format!("wake {url}: {e}"))),
    }
}

/// Reads [`Settings`] from the component's Spin variables, once per instance: a
/// reused WASIp3 instance serves up to 128 requests, and reading every variable
/// on each one would be a host call per variable on the hot path. Shared, not copied, by the
/// instance's requests.
pub async fn settings() -> Result<Rc<Settings>, Problem> {
    if let Some(s) = SETTINGS.with_borrow(Clone::clone) {
        return Ok(s);
    }
    let s = Rc::new(load_settings().await?);
    SETTINGS.with_borrow_mut(|c| *c = Some(s.clone()));
    Ok(s)
}

async fn load_settings() -> Result<Settings, Problem> {
    let mut values = std::collections::HashMap::new();
    for name in VARIABLES {
        if let Ok(v) = variables::get(*name).await {
            values.insert(*name, v);
        }
    }
    Settings::load(|n| values.get(n).cloned())
        .map_err(|e| Problem::new(500, "misconfigured", "Misconfigured", &e.to_string()))
}

thread_local! {
    /// One connection per Redis server (by address), kept for the instance.
    static REDIS: RefCell<HashMap<String, Rc<Connection>>> = RefCell::new(HashMap::new());
    /// SHA1 of each script loaded into Redis, keyed by the script constant's address.
    static SHAS: RefCell<HashMap<usize, String>> = RefCell::new(HashMap::new());
}

/// A value of a flat reply as text (status or binary).
pub fn text(v: &RedisResult) -> Option<String> {
    match v {
        RedisResult::Status(s) => Some(s.clone()),
        RedisResult::Binary(b) => String::from_utf8(b.clone()).ok(),
        RedisResult::Int64(i) => Some(i.to_string()),
        RedisResult::Nil => None,
    }
}

/// A value of a flat reply as an integer.
pub fn int(v: &RedisResult) -> Option<i64> {
    match v {
        RedisResult::Int64(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// Redis, through Spin's outbound Redis, with the connection kept for the life of
/// the instance (WASIp3 instances serve many requests) and reopened after an error.
pub struct Redis {
    address: String,
}

impl Redis {
    /// Redis at `address`.
    pub fn new(address: &str) -> Self {
        Self { address: address.to_owned() }
    }

    /// The server that holds `shard`'s keys (see `Settings::redis_for`).
    pub fn for_shard(s: &Settings, shard: u32) -> Self {
        Self::new(s.redis_for(shard))
    }

    /// Its address.
    pub fn address(&self) -> &str {
        &self.address
    }

    async fn conn(&self) -> Result<Rc<Connection>, Problem> {
        if let Some(c) = REDIS.with_borrow(|r| r.get(&self.address).cloned()) {
            return Ok(c);
        }
        let c = Rc::new(Connection::open(&self.address).await.map_err(|e| redis_failed(&self.address, &e))?);
        REDIS.with_borrow_mut(|r| r.insert(self.address.clone(), c.clone()));
        Ok(c)
    }

    /// Runs one command; a failure drops the kept connection and is a 503.
    pub async fn execute(&self, command: &str, args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, Problem> {
        self.execute_or_noscript(command, args).await.map_err(|e| e.unwrap_or_else(|| Problem::unavailable("NOSCRIPT")))
    }

    /// Like [`Redis::execute`], except that a `NOSCRIPT` refusal (Redis has
    /// forgotten a script) is `Err(None)` and keeps the connection: it is an answer,
    /// not a failure of the connection.
    async fn execute_or_noscript(&self, command: &str, args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, Option<Problem>> {
        let conn = self.conn().await?;
        match conn.execute(command, args).await {
            Ok(r) => Ok(r),
            // redis-rs words it `NoScript` (1.x) or `NoScriptError` (0.32, Spin's).
            Err(spin_sdk::redis::Error::Other(m)) if m.to_ascii_lowercase().contains("noscript") => Err(None),
            Err(e) => {
                // The next connection may reach a restarted Redis, which has
                // forgotten settings made at run time: check them again.
                REDIS.with_borrow_mut(|r| r.remove(&self.address));
                hazards::forget(&self.address);
                Err(Some(redis_failed(&self.address, &e)))
            }
        }
    }

    /// Runs one of the fixed Lua scripts with `keys` and `args`, by its SHA1
    /// (`EVALSHA`): the script text travels once per instance (`SCRIPT LOAD`), and
    /// again only if Redis has forgotten it (restart, `SCRIPT FLUSH`).
    pub async fn eval(&self, script: &'static str, keys: &[String], args: &[String]) -> Result<Vec<RedisResult>, Problem> {
        let slot = script.as_ptr() as usize;
        let mut reloaded = false;
        loop {
            let sha = match SHAS.with_borrow(|m| m.get(&slot).cloned()) {
                Some(sha) => sha,
                None => {
                    let reply = self.execute("SCRIPT", vec![bin("LOAD"), bin(script)]).await?;
                    let sha = reply.first().and_then(text).ok_or_else(|| Problem::unavailable("SCRIPT LOAD gave no SHA1"))?;
                    SHAS.with_borrow_mut(|m| m.insert(slot, sha.clone()));
                    sha
                }
            };
            let mut params = Vec::with_capacity(2 + keys.len() + args.len());
            params.push(bin(&sha));
            params.push(RedisParameter::Int64(keys.len() as i64));
            params.extend(keys.iter().map(|k| bin(k)));
            params.extend(args.iter().map(|a| bin(a)));
            match self.execute_or_noscript("EVALSHA", params).await {
                Ok(r) => return Ok(r),
                Err(None) if !reloaded => {
                    SHAS.with_borrow_mut(|m| m.remove(&slot));
                    reloaded = true;
                }
                Err(None) => return Err(Problem::unavailable("Redis keeps forgetting Spillway's scripts (NOSCRIPT)")),
                Err(Some(p)) => return Err(p),
            }
        }
    }
}

/// A binary Redis argument.
pub fn bin(s: &str) -> RedisParameter {
    RedisParameter::Binary(s.as_bytes().to_vec())
}

/// A failure of the Redis server at `address` as an answer (see
/// [`backend_failed`]), naming the server by its variable.
pub(crate) fn redis_failed(address: &str, e: &spin_sdk::redis::Error) -> Problem {
    let name = SETTINGS.with_borrow(|s| match s {
        Some(s) => s.redis_name(address),
        None => spillway_core::redact::server_of(address).unwrap_or_else(|| "a Redis server".to_owned()),
    });
    backend_failed(&format!("Redis ({name})"), &format!("{e:?}"))
}

/// Masks credentials in `text` (user information in URLs, and every configured
/// secret once the settings are read): for anything a log line or an
/// operator's record repeats from a backend.
pub fn redact(text: &str) -> String {
    SETTINGS.with_borrow(|s| match s {
        Some(s) => s.redactor.redact(text),
        None => spillway_core::redact::strip_userinfo(text),
    })
}

/// A backend failure as an answer: `what` failed with `cause` (its own error
/// text). The client gets a stable problem type and a message that names the
/// backend ([`Problem::backend`]); the cause, credentials masked, goes to one
/// JSON log line and stays in the problem for the operators' records.
pub fn backend_failed(what: &str, cause: &str) -> Problem {
    let cause = redact(cause);
    eprintln!("{}", serde_json::json!({"event": "backend_failed", "backend": what, "error": cause}));
    Problem::backend(what, &cause)
}

/// A response with a known body: `Content-Length` is always set (see DESIGN.md).
pub fn respond(status: u16, content_type: &str, body: String, headers: &[(&str, String)]) -> http::Response<String> {
    let mut b = http::Response::builder()
        .status(status)
        .header("content-length", body.len());
    if !body.is_empty() {
        b = b.header("content-type", content_type);
    }
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(body).unwrap_or_else(|_| {
        http::Response::builder().status(500).header("content-length", 0).body(String::new()).expect("static")
    })
}

/// A JSON response.
pub fn json(status: u16, value: &serde_json::Value, headers: &[(&str, String)]) -> http::Response<String> {
    respond(status, "application/json", value.to_string(), headers)
}

/// An `application/problem+json` response.
pub fn problem(p: &Problem) -> http::Response<String> {
    let mut headers = Vec::new();
    if let Some(s) = p.retry_after {
        headers.push(("retry-after", s.to_string()));
    }
    respond(p.status, "application/problem+json", p.body(), &headers)
}

/// 405 with `Allow`.
pub fn method_not_allowed(allow: &str) -> http::Response<String> {
    let p = Problem::new(405, "method-not-allowed", "Method not allowed", &format!("allowed: {allow}"));
    respond(405, "application/problem+json", p.body(), &[("allow", allow.to_owned())])
}

/// Checks `Authorization: Bearer <token>` in constant time; admin endpoints are
/// disabled (403) when no token is configured.
pub fn authorize(headers: &http::HeaderMap, token: Option<&str>) -> Result<(), Problem> {
    let Some(token) = token else {
        return Err(Problem::unauthorized(403, "admin endpoints are disabled: no admin_token is configured"));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Problem::unauthorized(401, "missing Authorization: Bearer <token>"))?;
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Problem::unauthorized(403, "the token is not valid"))
    }
}

/// Compares without an early exit: the time depends on the lengths only, not on
/// where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

thread_local! {
    /// This instance's random id prefix and its request counter.
    static REQUEST_IDS: RefCell<Option<(String, u64)>> = const { RefCell::new(None) };
}

/// The request id: the client's `X-Request-Id` when it is 1 to 128 characters of
/// `A-Z a-z 0-9 . _ -`, else a new one: 24 random hex digits drawn once per
/// instance and a counter, so a reused instance makes one call for randomness, not
/// one per request.
pub fn request_id(headers: &http::HeaderMap) -> String {
    if let Some(id) = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return id.to_owned();
    }
    REQUEST_IDS.with_borrow_mut(|ids| {
        let (prefix, n) = ids.get_or_insert_with(|| (token()[..24].to_owned(), 0));
        *n += 1;
        format!("{prefix}{:08x}", *n)
    })
}

/// Adds the request id to a response.
pub fn with_request_id<B>(mut res: http::Response<B>, id: &str) -> http::Response<B> {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Reads a request body, refusing (413) as soon as it passes `limit` bytes, whether
/// or not the client sent `Content-Length`: an oversized body is never buffered.
pub async fn read_body(req: spin_sdk::http::Request, limit: usize) -> Result<Vec<u8>, Problem> {
    use http_body_util::BodyExt as _;
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        return Err(Problem::too_large(Some(len), limit));
    }
    match http_body_util::Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Problem::too_large(None, limit)),
        Err(e) => Err(Problem::malformed(&format!("the body could not be read: {e}"))),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds on the WASI monotonic clock (for deadlines).
pub fn monotonic_ms() -> u64 {
    spin_sdk::wasip3::clocks::monotonic_clock::now() / 1_000_000
}

/// Waits `ms` milliseconds (WASI monotonic clock).
pub async fn wait_ms(ms: u64) {
    spin_sdk::wasip3::clocks::monotonic_clock::wait_for(ms * 1_000_000).await;
}

/// A random token (lease and lock owner).
pub fn token() -> String {
    let r = spin_sdk::wasip3::random::random::get_random_bytes(16);
    r.iter().map(|b| format!("{b:02x}")).collect()
}
