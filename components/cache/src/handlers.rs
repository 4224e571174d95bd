//! Handlers for records and write status.

use serde_json::{Value as Json, json};
use spillway_core::layout::{ABSENT_TTL_MS, FILL_LOCK_TTL_MS, WriteId, decode_key};
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::db::{Db, SqlValue as Value};
use spillway_spin::{Redis, authorize, int, json, problem, respond, status, token};
use spin_sdk::http::BoxBody;
use spin_sdk::key_value::Store;

use crate::{changes, records};

/// The OpenAPI 3.1 document of the whole API (kept in `api/openapi.json`).
const OPENAPI: &str = include_str!("../../../api/openapi.json");

pub(crate) async fn handle(req: spin_sdk::http::Request) -> http::Response<BoxBody> {
    let path = req.uri().path().to_owned();
    if req.method() == http::Method::GET
        && let Some(raw_key) = path.strip_prefix("/v1/records/").and_then(|p| p.strip_suffix("/changes"))
    {
        return match changes::feed(raw_key, req.headers()).await {
            Ok(r) => r,
            Err(p) => full(problem(&p)),
        };
    }
    full(handle_full(req).await)
}

/// A response whose body is all there.
fn full(r: http::Response<String>) -> http::Response<BoxBody> {
    r.map(spin_sdk::http::box_body)
}

async fn handle_full(req: spin_sdk::http::Request) -> http::Response<String> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if path == "/v1/openapi.json" {
        if method != http::Method::GET {
            return spillway_spin::method_not_allowed("GET");
        }
        return spillway_spin::respond(200, "application/json", OPENAPI.to_owned(), &[]);
    }
    let (allow, route) = if path == "/v1/records:get" {
        ("POST", Route::Records)
    } else if path.starts_with("/v1/records/") {
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
    let query = req.uri().query().map(str::to_owned);
    let result = match route {
        Route::Record => record(&settings, &path["/v1/records/".len()..], query.as_deref(), req.headers()).await,
        Route::Records => records::get_many(&settings, req, query.as_deref()).await,
        Route::Write => write_status(&settings, &path["/v1/writes/".len()..], query.as_deref()).await,
        Route::Cache => match authorize(req.headers(), settings.admin_token.as_deref()) {
            Ok(()) => cache_admin(&settings, &path["/v1/cache/".len()..], method == http::Method::DELETE).await,
            Err(p) => Err(p),
        },
    };
    result.unwrap_or_else(|p| problem(&p))
}

enum Route {
    Record,
    Records,
    Write,
    Cache,
}

pub(crate) fn kv_err(e: spin_sdk::key_value::Error) -> Problem {
    spillway_spin::backend_failed("The key-value store (default)", &format!("{e:?}"))
}

/// A key's state in the database.
pub(crate) enum Stored {
    /// The record, as the cache stores it.
    Live(Json),
    /// Deleted at this version (its tombstone).
    Deleted(i64),
    /// Never written (or written before tombstones were kept).
    Never,
}

impl Stored {
    /// The record's version, or the version its deletion reached.
    pub(crate) fn version(&self) -> i64 {
        match self {
            Stored::Live(r) => r["version"].as_i64().unwrap_or(0),
            Stored::Deleted(v) => *v,
            Stored::Never => 0,
        }
    }

    /// A row of the `record` / `records` statements.
    pub(crate) fn from_row(row: &[Value]) -> Result<(String, Self), Problem> {
        let (Some(Value::Text(key)), Some(Value::Text(value)), Some(Value::Integer(version)), Some(Value::Text(etag)), Some(Value::Integer(updated_at))) =
            (row.first(), row.get(1), row.get(2), row.get(3), row.get(4))
        else {
            return Err(Problem::unavailable("database row has an unexpected shape"));
        };
        if matches!(row.get(5), Some(Value::Integer(1))) {
            return Ok((key.clone(), Stored::Deleted(*version)));
        }
        let value: Json = serde_json::from_str(value).map_err(|e| Problem::unavailable(&e.to_string()))?;
        Ok((key.clone(), Stored::Live(json!({"key": key, "value": value, "version": version, "etag": etag, "updated_at": updated_at}))))
    }
}

/// A key's state from the database.
pub(crate) async fn stored(key: &str) -> Result<Stored, Problem> {
    let db = Db::open().await?;
    match db.first_row(db.sql().record, vec![Value::Text(key.to_owned())]).await? {
        Some(row) => Ok(Stored::from_row(&row)?.1),
        None => Ok(Stored::Never),
    }
}

/// The record from the database, as the cache stores it.
async fn from_db(key: &str) -> Result<Option<Json>, Problem> {
    match stored(key).await? {
        Stored::Live(r) => Ok(Some(r)),
        _ => Ok(None),
    }
}

/// A cache entry: the record's JSON as `GET /v1/records/{key}` answers it, and its
/// ETag (read out of it without building the whole document).
pub(crate) struct Entry {
    pub(crate) body: String,
    etag: String,
}

impl Entry {
    pub(crate) fn parse(bytes: Vec<u8>) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Tag<'a> {
            #[serde(borrow)]
            etag: std::borrow::Cow<'a, str>,
        }
        let body = String::from_utf8(bytes).ok()?;
        let etag = serde_json::from_str::<Tag<'_>>(&body).ok()?.etag.into_owned();
        Some(Self { body, etag })
    }

    pub(crate) fn from_json(v: &Json) -> Self {
        Self { body: v.to_string(), etag: v["etag"].as_str().unwrap_or_default().to_owned() }
    }

    /// The record's version (parsed out of the entry).
    fn version(&self) -> i64 {
        #[derive(serde::Deserialize)]
        struct V {
            version: i64,
        }
        serde_json::from_str::<V>(&self.body).map_or(0, |v| v.version)
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

/// The record key in a path (percent-decoded), or why not.
pub(crate) fn path_key(s: &Settings, raw_key: &str) -> Result<String, Problem> {
    let key = decode_key(raw_key).ok_or_else(|| Problem::invalid("the key is not valid percent-encoded UTF-8", "/path/key"))?;
    if key.is_empty() || key.chars().count() > s.limits.max_key_len {
        return Err(Problem::not_found("no such record"));
    }
    Ok(key)
}

/// How a read may be answered.
enum Consistency {
    /// From the cache (read-your-writes holds: see [`spillway_spin::status`]).
    Cached,
    /// `?consistent=true`: from the database.
    Database,
    /// `?min_version=v`: version v or newer (from the database only, with
    /// `consistent=true`), waiting up to the deadline (monotonic ms) for it to be
    /// applied.
    AtLeast { min: i64, deadline: u64, consistent: bool },
}

/// How long `?min_version` waits by default for its version, in milliseconds.
const MIN_VERSION_WAIT_MS: u64 = 5_000;

/// `consistent`, `min_version` and `wait` (which only `min_version` uses), checked.
fn consistency(query: Option<&str>) -> Result<Consistency, Problem> {
    only_params(query, &["consistent", "min_version", "wait"])?;
    let consistent = consistent_param(query)?;
    let min_version = match query_param(query, "min_version") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && !v.starts_with('+'))
                .ok_or_else(|| Problem::invalid("min_version must be a whole number from 0", "/query/min_version"))?,
        ),
    };
    let wait = match query_param(query, "wait") {
        None => None,
        Some(v) => Some(status::wait_secs(v).ok_or_else(|| bad_wait("/query/wait"))?),
    };
    Ok(match (consistent, min_version) {
        (_, Some(min)) => {
            Consistency::AtLeast { min, deadline: spillway_spin::monotonic_ms().saturating_add(wait.unwrap_or(MIN_VERSION_WAIT_MS)), consistent }
        }
        (true, None) => Consistency::Database,
        (false, None) => Consistency::Cached,
    })
}

async fn record(s: &Settings, raw_key: &str, query: Option<&str>, headers: &http::HeaderMap) -> Result<http::Response<String>, Problem> {
    let consistency = consistency(query)?;
    let key = path_key(s, raw_key)?;
    let entry = match consistency {
        Consistency::Cached => cached_or_filled(s, &key).await?,
        Consistency::Database => from_db(&key).await?.as_ref().map(Entry::from_json),
        Consistency::AtLeast { min, deadline, consistent } => at_least(s, &key, min, deadline, consistent).await?,
    };
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

/// The record through the cache: a hit, or a miss filled from the database.
pub(crate) async fn cached_or_filled(s: &Settings, key: &str) -> Result<Option<Entry>, Problem> {
    let store = store().await?;
    let cache_key = s.layout.cache_key(key);
    if let Some(entry) = cached(&store, &cache_key).await? {
        count_read(s, true).await;
        return Ok(Some(entry));
    }
    count_read(s, false).await;
    Ok(fill(s, &store, &cache_key, key).await?.as_ref().map(Entry::from_json))
}

thread_local! {
    /// This instance's cache hits and misses not yet added to Redis, and when they
    /// last were (monotonic ms; none yet).
    static READS: std::cell::Cell<(u64, u64, Option<u64>)> = const { std::cell::Cell::new((0, 0, None)) };
}

/// Counts a read for the stats (a miss includes a key known to be absent). The
/// counts go to Redis with an instance's first read and then at most once a
/// second, from a task of their own, so no read waits for it; they are
/// approximate: an instance that retires takes up to its last second of counts.
async fn count_read(s: &Settings, hit: bool) {
    let (mut hits, mut misses, last) = READS.get();
    if hit {
        hits += 1;
    } else {
        misses += 1;
    }
    let now = spillway_spin::monotonic_ms();
    if last.is_some_and(|last| now < last + 1000) {
        READS.set((hits, misses, last));
        return;
    }
    READS.set((0, 0, Some(now)));
    let (address, key) = (s.redis_for(0).to_owned(), s.layout.cache_stats());
    spin_sdk::wasip3::spawn(async move {
        let counted = Redis::new(&address).eval(scripts::CACHE_COUNT, &[key], &[hits.to_string(), misses.to_string()]).await;
        if counted.is_err() {
            // Kept for the next flush.
            let (h, m, t) = READS.get();
            READS.set((h + hits, m + misses, t));
        }
    });
}

/// `?min_version=v`: the cache if it has v or newer (unless `consistent`), else the
/// database; if the
/// database is behind too, the write is still being applied: wait for the shard's
/// notices and look again, until the deadline (then 412).
async fn at_least(s: &Settings, key: &str, min: i64, deadline: u64, consistent: bool) -> Result<Option<Entry>, Problem> {
    if !consistent
        && let Some(entry) = cached(&*store().await?, &s.layout.cache_key(key)).await?.filter(|e| e.version() >= min)
    {
        return Ok(Some(entry));
    }
    let mut notices = status::Notices::follow(s, s.layout.shard_of(key)).await?;
    loop {
        let now = stored(key).await?;
        if now.version() >= min {
            return Ok(match now {
                Stored::Live(r) => Some(Entry::from_json(&r)),
                _ => None,
            });
        }
        if !notices.next(deadline).await? {
            return Err(Problem::new(
                412,
                "min-version-not-reached",
                "Version not reached",
                &format!("the record {key:?} is at version {}, not yet {min}; retry later or wait longer (wait, up to {} s)", now.version(), status::MAX_WAIT_SECS),
            )
            .at("/query/min_version"));
        }
    }
}

/// Cache miss: one filler per key reads the database and fills the cache under the
/// single-flight lock (the same lock the processor takes to refresh, so an older
/// value cannot overwrite a newer one); others wait for it, then fall back to the
/// database without filling. A key found absent is remembered for a while (the
/// negative entry, see `scripts::FILL_BEGIN`), until it is created.
async fn fill(s: &Settings, store: &Store, cache_key: &str, key: &str) -> Result<Option<Json>, Problem> {
    let redis = Redis::for_shard(s, s.layout.shard_of(key));
    let lock = s.layout.fill_lock(key);
    let me = token();
    // Wait up to a second for another filler (it normally takes milliseconds),
    // then read the database without filling.
    let give_up = spillway_spin::monotonic_ms() + 1000;
    while spillway_spin::monotonic_ms() < give_up {
        let got = redis.eval(scripts::FILL_BEGIN, std::slice::from_ref(&lock), &[me.clone(), FILL_LOCK_TTL_MS.to_string()]).await?;
        match got.first().and_then(int) {
            Some(2) => return Ok(None),
            Some(1) => {
                let entry = match from_db(key).await {
                    Ok(e) => e,
                    Err(p) => {
                        redis.eval(scripts::LOCKS_RELEASE, std::slice::from_ref(&lock), &[me]).await?;
                        return Err(p);
                    }
                };
                let Some(e) = entry else {
                    redis.eval(scripts::FILL_ABSENT, std::slice::from_ref(&lock), &[me, ABSENT_TTL_MS.to_string()]).await?;
                    return Ok(None);
                };
                let written = store.set(cache_key, e.to_string().as_bytes()).await.map_err(kv_err);
                redis.eval(scripts::LOCKS_RELEASE, std::slice::from_ref(&lock), &[me]).await?;
                written?;
                return Ok(Some(e));
            }
            _ => {}
        }
        spillway_spin::wait_ms(2).await;
        if let Some(e) = store.get(cache_key).await.map_err(kv_err)?.and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok(Some(e));
        }
    }
    from_db(key).await
}

/// `GET /v1/writes/{id}[?wait=s]`: the write's status; with `wait`, held until the
/// write leaves `pending` or the time is up (see [`spillway_spin::status`]).
async fn write_status(s: &Settings, raw: &str, query: Option<&str>) -> Result<http::Response<String>, Problem> {
    only_params(query, &["wait"])?;
    let wait = match query_param(query, "wait") {
        None => None,
        Some(v) => Some(status::wait_secs(v).ok_or_else(|| bad_wait("/query/wait"))?),
    };
    let Some(id) = WriteId::parse(raw).filter(|id| id.shard < s.layout.shards) else {
        return Err(Problem::not_found(&format!("no write {raw:?}")));
    };
    let body = match wait {
        None => status::status(s, &id).await?,
        Some(ms) => status::wait_for(s, &id, spillway_spin::monotonic_ms() + ms).await?,
    };
    Ok(json(200, &body, &[]))
}

fn bad_wait(field: &str) -> Problem {
    Problem::invalid(&format!("wait must be a number of seconds from 0 to {}", status::MAX_WAIT_SECS), field)
}

/// Refuses query parameters other than `known` (each at most once): a misspelt
/// `min_version` must not silently become a plain read.
pub(crate) fn only_params(query: Option<&str>, known: &[&str]) -> Result<(), Problem> {
    let mut seen = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let Some((name, _)) = pair.split_once('=') else {
            return Err(Problem::invalid(&format!("query parameter {pair:?} needs a value ({pair}=...)"), &format!("/query/{pair}")));
        };
        if !known.contains(&name) {
            let shown = decode_key(name).unwrap_or_else(|| name.to_owned());
            return Err(Problem::invalid(&format!("unknown query parameter {shown:?}; known: {}", known.join(", ")), &format!("/query/{name}")));
        }
        if seen.contains(&name) {
            return Err(Problem::invalid(&format!("query parameter {name} is given twice"), &format!("/query/{name}")));
        }
        seen.push(name);
    }
    Ok(())
}

/// `?consistent=true|false` (false when absent).
pub(crate) fn consistent_param(query: Option<&str>) -> Result<bool, Problem> {
    match query_param(query, "consistent") {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Problem::invalid("consistent must be true or false", "/query/consistent")),
    }
}

/// The value of query parameter `name`, if given (first occurrence).
pub(crate) fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// `PUT /v1/cache/{key}` refreshes the entry from the database; `DELETE` drops it.
/// Both under the key's fill lock, like every cache write.
async fn cache_admin(s: &Settings, raw_key: &str, delete: bool) -> Result<http::Response<String>, Problem> {
    let key = decode_key(raw_key).ok_or_else(|| Problem::invalid("the key is not valid percent-encoded UTF-8", "/path/key"))?;
    if key.is_empty() || key.chars().count() > s.limits.max_key_len {
        return Err(Problem::invalid(&format!("the key must be 1 to {} characters", s.limits.max_key_len), "/path/key"));
    }
    let store = store().await?;
    let redis = Redis::for_shard(s, s.layout.shard_of(&key));
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
