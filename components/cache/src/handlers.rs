//! Handlers for records and write status.

use serde_json::{Value as Json, json};
use spillway_core::layout::{FILL_LOCK_TTL_MS, WriteId, decode_key};
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_core::sql;
use spillway_spin::{Redis, authorize, bin, int, json, problem, respond, text, token};
use spin_sdk::key_value::Store;
use spillway_spin::db::{Db, SqlValue as Value};

/// The OpenAPI 3.1 document of the whole API (kept in `api/openapi.json`).
const OPENAPI: &str = include_str!("../../../api/openapi.json");

pub(crate) async fn handle(req: spin_sdk::http::Request) -> http::Response<String> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if path == "/v1/openapi.json" {
        if method != http::Method::GET {
            return spillway_spin::method_not_allowed("GET");
        }
        return spillway_spin::respond(200, "application/json", OPENAPI.to_owned(), &[]);
    }
    let (allow, route) = if path.starts_with("/v1/records/") {
        ("GET", Route::Record)
    } else if path.starts_with("/v1/writes/") {
        ("GET", Route::Write)
    } else if path.starts_with("/v1/cache/") {
        ("PUT, DELETE", Route::Cache)
    } else {
        return problem(&Problem::not_found(&format!("no resource at {path}")));
    };
    if !allow.split(", ").any(|m| m == method.as_str()) {
        return spillway_spin::method_not_allowed(allow);
    }
    let settings = match spillway_spin::settings().await {
        Ok(s) => s,
        Err(p) => return problem(&p),
    };
    let result = match route {
        Route::Record => record(&settings, &path["/v1/records/".len()..], req.headers()).await,
        Route::Write => write_status(&settings, &path["/v1/writes/".len()..], req.uri().query()).await,
        Route::Cache => match authorize(req.headers(), settings.admin_token.as_deref()) {
            Ok(()) => cache_admin(&settings, &path["/v1/cache/".len()..], method == http::Method::DELETE).await,
            Err(p) => Err(p),
        },
    };
    result.unwrap_or_else(|p| problem(&p))
}

enum Route {
    Record,
    Write,
    Cache,
}

fn kv_err(e: spin_sdk::key_value::Error) -> Problem {
    Problem::unavailable(&format!("key-value store: {e:?}"))
}

/// The first row of `stmt`; none when nothing has been applied yet (no tables).
async fn query(stmt: &str, params: Vec<Value>) -> Result<Option<Vec<Value>>, Problem> {
    Db::open().await?.first_row(stmt, params).await
}

/// The record from the database, as the cache stores it.
async fn from_db(key: &str) -> Result<Option<Json>, Problem> {
    let Some(row) = query(sql::RECORD, vec![Value::Text(key.to_owned())]).await? else {
        return Ok(None);
    };
    let (Some(Value::Text(value)), Some(Value::Integer(version)), Some(Value::Text(etag)), Some(Value::Integer(updated_at))) =
        (row.get(1), row.get(2), row.get(3), row.get(4))
    else {
        return Err(Problem::unavailable("database row has an unexpected shape"));
    };
    let value: Json = serde_json::from_str(value).map_err(|e| Problem::unavailable(&e.to_string()))?;
    Ok(Some(json!({"key": key, "value": value, "version": version, "etag": etag, "updated_at": updated_at})))
}

/// A cache entry: the record's JSON as `GET /v1/records/{key}` answers it, and its
/// ETag (read out of it without building the whole document).
struct Entry {
    body: String,
    etag: String,
}

impl Entry {
    fn parse(bytes: Vec<u8>) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Tag<'a> {
            #[serde(borrow)]
            etag: std::borrow::Cow<'a, str>,
        }
        let body = String::from_utf8(bytes).ok()?;
        let etag = serde_json::from_str::<Tag<'_>>(&body).ok()?.etag.into_owned();
        Some(Self { body, etag })
    }

    fn from_json(v: &Json) -> Self {
        Self { body: v.to_string(), etag: v["etag"].as_str().unwrap_or_default().to_owned() }
    }
}

thread_local! {
    /// The store, opened once per instance (a reused instance serves many reads).
    static STORE: std::cell::RefCell<Option<std::rc::Rc<Store>>> = const { std::cell::RefCell::new(None) };
}

async fn store() -> Result<std::rc::Rc<Store>, Problem> {
    if let Some(s) = STORE.with_borrow(Clone::clone) {
        return Ok(s);
    }
    let s = std::rc::Rc::new(Store::open_default().await.map_err(kv_err)?);
    STORE.with_borrow_mut(|c| *c = Some(s.clone()));
    Ok(s)
}

async fn cached(store: &Store, cache_key: &str) -> Result<Option<Entry>, Problem> {
    match store.get(cache_key).await {
        Ok(v) => Ok(v.and_then(Entry::parse)),
        Err(e) => {
            STORE.with_borrow_mut(|c| *c = None);
            Err(kv_err(e))
        }
    }
}

async fn record(s: &Settings, raw_key: &str, headers: &http::HeaderMap) -> Result<http::Response<String>, Problem> {
    let key = decode_key(raw_key).ok_or_else(|| Problem::invalid("the key is not valid percent-encoded UTF-8", "/path/key"))?;
    if key.is_empty() || key.chars().count() > s.limits.max_key_len {
        return Err(Problem::not_found("no such record"));
    }
    let l = &s.layout;
    let store = store().await?;
    let cache_key = l.cache_key(&key);
    let mut entry = cached(&store, &cache_key).await?;
    if entry.is_none() {
        entry = fill(s, &store, &cache_key, &key).await?.as_ref().map(Entry::from_json);
    }
    let Some(entry) = entry else {
        return Err(Problem::not_found(&format!("no record {key:?}")));
    };
    let etag = format!("\"{}\"", entry.etag);
    if let Some(want) = headers.get("if-match").and_then(|v| v.to_str().ok())
        && !want.split(',').any(|t| t.trim() == etag || t.trim() == "*") {
            return Err(Problem::new(412, "precondition-failed", "Precondition failed", &format!("the record's ETag is {etag}, not {want}"))
                .at("/headers/if-match"));
        }
    let matches = headers
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return Ok(respond(304, "application/json", String::new(), &[("etag", etag)]));
    }
    Ok(respond(200, "application/json", entry.body, &[("etag", etag), ("cache-control", "no-cache".into())]))
}

/// Cache miss: one filler per key reads the database and fills the cache under the
/// single-flight lock (the same lock the processor takes to refresh, so an older
/// value cannot overwrite a newer one); others wait for it, then fall back to the
/// database without filling.
async fn fill(s: &Settings, store: &Store, cache_key: &str, key: &str) -> Result<Option<Json>, Problem> {
    let redis = Redis::new(&s.redis_address);
    let lock = s.layout.fill_lock(key);
    let me = token();
    for _ in 0..100 {
        let got = redis.eval(scripts::LOCKS_ACQUIRE, std::slice::from_ref(&lock), &[me.clone(), FILL_LOCK_TTL_MS.to_string()]).await?;
        if got.first().and_then(int) == Some(1) {
            let result = async {
                let entry = from_db(key).await?;
                if let Some(e) = &entry {
                    store.set(cache_key, e.to_string().as_bytes()).await.map_err(kv_err)?;
                }
                Ok(entry)
            }
            .await;
            redis.eval(scripts::LOCKS_RELEASE, std::slice::from_ref(&lock), &[me]).await?;
            return result;
        }
        spillway_spin::wait_ms(2).await;
        if let Some(e) = store.get(cache_key).await.map_err(kv_err)?.and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok(Some(e));
        }
    }
    from_db(key).await
}

/// The outcome recorded with the data, if the write has been applied or rejected.
async fn recorded_status(sid: &str) -> Result<Option<Json>, Problem> {
    let Some(row) = query(sql::WRITE_STATUS, vec![Value::Text(sid.to_owned())]).await? else {
        return Ok(None);
    };
    let status = match row.first() {
        Some(Value::Text(t)) => t.clone(),
        _ => String::new(),
    };
    let mut body = json!({"id": sid, "status": status});
    if let Some(Value::Integer(v)) = row.get(1) {
        body["version"] = json!(v);
    }
    if let Some(Value::Text(r)) = row.get(2) {
        body["reason"] = json!(r);
    }
    if let Some(Value::Text(k)) = row.get(3) {
        body["key"] = json!(k);
    }
    Ok(Some(body))
}

/// Longest `?wait=` in seconds: well inside a hosted platform's 30 s request limit.
const MAX_WAIT_SECS: f64 = 25.0;

/// `?wait=<seconds>` (0 to 25, decimals allowed) in milliseconds, if given.
fn wait_param(query: Option<&str>) -> Result<Option<u64>, Problem> {
    let Some(v) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("wait="))) else {
        return Ok(None);
    };
    match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&secs) && !v.starts_with('+') => Ok(Some((secs * 1000.0) as u64)),
        _ => Err(Problem::invalid(&format!("wait must be a number of seconds from 0 to {MAX_WAIT_SECS}"), "/query/wait")),
    }
}

/// `GET /v1/writes/{id}[?wait=s]`: the write's status; with `wait`, held until the
/// write leaves `pending` or the time is up. Waiting costs no polling: the
/// processor adds a notice to the shard's `done` stream whenever writes leave
/// `pending`, and the wait blocks on it (`XREAD BLOCK`, on a connection of its own
/// so other requests of this instance are not held up), checking again on each.
async fn write_status(s: &Settings, raw: &str, query: Option<&str>) -> Result<http::Response<String>, Problem> {
    let wait = wait_param(query)?;
    let Some(id) = WriteId::parse(raw).filter(|id| id.shard < s.layout.shards) else {
        return Err(Problem::not_found(&format!("no write {raw:?}")));
    };
    let Some(wait_ms) = wait else {
        return Ok(json(200, &status_once(s, &id).await?, &[]));
    };
    let redis = Redis::new(&s.redis_address);
    let done = s.layout.done(id.shard);
    let deadline = spillway_spin::monotonic_ms() + wait_ms;
    // The newest notice before looking: anything after it may concern this write.
    let newest = redis.execute("XREVRANGE", vec![bin(&done), bin("+"), bin("-"), bin("COUNT"), bin("1")]).await?;
    let mut last = newest.first().and_then(text).unwrap_or_else(|| "0-0".into());
    loop {
        let body = status_once(s, &id).await?;
        let now = spillway_spin::monotonic_ms();
        if body["status"] != "pending" || now >= deadline {
            return Ok(json(200, &body, &[]));
        }
        let block = (deadline - now).max(1).to_string();
        let reply = redis
            .execute_alone("XREAD", vec![bin("BLOCK"), bin(&block), bin("STREAMS"), bin(&done), bin(&last)])
            .await?;
        // Flattened: the stream's name, then (entry id, field, value) per notice.
        if let Some(newest) = reply.get(1..).unwrap_or_default().chunks(3).rev().find_map(|c| c.first().and_then(text)) {
            last = newest;
        }
    }
}

/// A write's status now.
async fn status_once(s: &Settings, id: &WriteId) -> Result<Json, Problem> {
    let sid = id.to_string();
    let l = &s.layout;
    let redis = Redis::new(&s.redis_address);
    let pending = || json!({"id": sid, "status": "pending"});
    let in_stream = async || -> Result<bool, Problem> {
        let r = redis.execute("XRANGE", vec![bin(&l.stream(id.shard)), bin(&id.entry), bin(&id.entry)]).await?;
        Ok(!r.is_empty())
    };
    if let Some(body) = recorded_status(&sid).await? {
        // Read-your-writes: an applied write is reported once its entry has left
        // the stream, because the processor acknowledges a batch only after it has
        // refreshed the cache. Until then (a moment, or until a crashed processor's
        // batch is redelivered) it is still pending for readers.
        if body["status"] == "applied" && in_stream().await? {
            return Ok(pending());
        }
        return Ok(body);
    }
    let dead = redis.execute("GET", vec![bin(&l.dead_status(id.shard, &id.entry))]).await?;
    if let Some(err) = dead.first().and_then(text) {
        if let Some(new_id) = err.strip_prefix("replayed:") {
            return Ok(json!({"id": sid, "status": "replayed", "replayed_as": new_id}));
        }
        return Ok(json!({"id": sid, "status": "dead", "reason": err}));
    }
    if in_stream().await? {
        return Ok(pending());
    }
    // Applied (and acknowledged) between the database read and the Redis reads.
    match recorded_status(&sid).await? {
        Some(body) => Ok(body),
        None => Err(Problem::not_found(&format!(
            "no write {sid} (outcomes are kept for status_retention_secs after a write is accepted)"
        ))),
    }
}

/// `PUT /v1/cache/{key}` refreshes the entry from the database; `DELETE` drops it.
/// Both under the key's fill lock, like every cache write.
async fn cache_admin(s: &Settings, raw_key: &str, delete: bool) -> Result<http::Response<String>, Problem> {
    let key = decode_key(raw_key).ok_or_else(|| Problem::invalid("the key is not valid percent-encoded UTF-8", "/path/key"))?;
    if key.is_empty() || key.chars().count() > s.limits.max_key_len {
        return Err(Problem::invalid(&format!("the key must be 1 to {} characters", s.limits.max_key_len), "/path/key"));
    }
    let store = store().await?;
    let redis = Redis::new(&s.redis_address);
    let lock = s.layout.fill_lock(&key);
    let me = token();
    for _ in 0..500 {
        let got = redis.eval(scripts::LOCKS_ACQUIRE, std::slice::from_ref(&lock), &[me.clone(), FILL_LOCK_TTL_MS.to_string()]).await?;
        if got.first().and_then(int) == Some(1) {
            let cache_key = s.layout.cache_key(&key);
            let result = async {
                if delete {
                    store.delete(&cache_key).await.map_err(kv_err)?;
                    return Ok(respond(204, "application/json", String::new(), &[]));
                }
                let Some(entry) = from_db(&key).await? else {
                    store.delete(&cache_key).await.map_err(kv_err)?;
                    return Err(Problem::not_found(&format!("no record {key:?}")));
                };
                store.set(&cache_key, entry.to_string().as_bytes()).await.map_err(kv_err)?;
                Ok(json(200, &entry, &[]))
            }
            .await;
            redis.eval(scripts::LOCKS_RELEASE, std::slice::from_ref(&lock), &[me]).await?;
            return result;
        }
        spillway_spin::wait_ms(2).await;
    }
    Err(Problem::unavailable("the record's cache lock stayed busy"))
}
