//! `GET /v1/records/{key}`: a record through the cache, from the database
//! (`consistent`), or at a version (`min_version`, waiting for it); ETags and
//! conditional reads.

use spillway_core::layout::decode_key;
use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_core::settings::Settings;
use spillway_spin::kv::CacheStore;
use spillway_spin::{respond, status};

use crate::entry::{Entry, Stored, from_db, stored};
use crate::fill::cached_or_filled;

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
pub(crate) const MIN_VERSION_WAIT_MS: u64 = 5_000;

/// `consistent`, `min_version` and `wait` (which only `min_version` uses), checked.
fn consistency(query: Option<&str>) -> Result<Consistency, Problem> {
    let query = Query::parse(query, &["consistent", "min_version", "wait"])?;
    let consistent = query.flag("consistent")?;
    let min_version = match query.get("min_version") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && !v.starts_with('+'))
                .ok_or_else(|| Problem::invalid("min_version must be a whole number from 0", "/query/min_version"))?,
        ),
    };
    let wait = match query.get("wait") {
        None => None,
        Some(v) => Some(status::wait_secs(v).ok_or_else(|| crate::status::bad_wait("/query/wait"))?),
    };
    Ok(match (consistent, min_version) {
        (_, Some(min)) => {
            Consistency::AtLeast { min, deadline: spillway_spin::monotonic_ms().saturating_add(wait.unwrap_or(MIN_VERSION_WAIT_MS)), consistent }
        }
        (true, None) => Consistency::Database,
        (false, None) => Consistency::Cached,
    })
}

pub(crate) async fn record(s: &Settings, raw_key: &str, query: Option<&str>, headers: &http::HeaderMap) -> Result<http::Response<String>, Problem> {
    let consistency = consistency(query)?;
    let key = path_key(s, raw_key)?;
    let entry = match consistency {
        Consistency::Cached => cached_or_filled(s, &key).await?,
        Consistency::Database => from_db(&key).await?.as_ref().map(Entry::from_doc),
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

/// `?min_version=v`: the cache if it has v or newer (unless `consistent`), else the
/// database; if the
/// database is behind too, the write is still being applied: wait for the shard's
/// notices and look again, until the deadline (then 412).
async fn at_least(s: &Settings, key: &str, min: i64, deadline: u64, consistent: bool) -> Result<Option<Entry>, Problem> {
    // A cache store that fails is gone around: the database answers.
    let cached = async { CacheStore::kept(s).await?.get(s, key).await };
    if !consistent
        && let Ok(found) = cached.await
        && let Some(entry) = found.and_then(Entry::parse).filter(|e| e.version() >= min)
    {
        return Ok(Some(entry));
    }
    let mut notices = status::Notices::follow(s, s.layout.shard_of(key)).await?;
    loop {
        let now = stored(key).await?;
        if now.version() >= min {
            return Ok(match now {
                Stored::Live(r) => Some(Entry::from_doc(&r)),
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

