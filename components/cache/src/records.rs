//! `POST /v1/records:get`: many records in one request.
//!
//! Cache hits come through one `get-many` (`wasi:keyvalue/batch`; one by one where
//! the store cannot, as Spin's Redis store), and every miss is read in ONE database
//! query. Misses are not filled into the cache (filling takes each key's lock);
//! a record read from the database is at least as new as the cache's, so
//! read-your-writes holds either way.

use std::collections::{HashMap, HashSet};

use serde_json::{Value as Json, json};
use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_core::settings::Settings;
use spillway_core::write::check_key;
use spillway_spin::db::{Db, SqlValue as Value};
use spillway_spin::kv::CacheStore;

use crate::entry::{Entry, Stored};

/// The request body: `{"keys": [...]}`.
fn parse_keys(s: &Settings, body: &[u8]) -> Result<Vec<String>, Problem> {
    let doc: Json = serde_json::from_slice(body).map_err(|e| Problem::malformed(&format!("the body is not JSON: {e}")))?;
    let Some(obj) = doc.as_object() else {
        return Err(Problem::invalid("the body must be an object {\"keys\": [...]}", ""));
    };
    if let Some(extra) = obj.keys().find(|k| *k != "keys") {
        return Err(Problem::invalid(&format!("unknown member {extra:?}"), &format!("/{extra}")));
    }
    let Some(list) = obj.get("keys").and_then(Json::as_array) else {
        return Err(Problem::invalid("keys must be an array of record keys", "/keys"));
    };
    let max = s.limits.max_batch;
    if list.is_empty() || list.len() > max {
        return Err(Problem::invalid(&format!("keys must hold 1 to {max} keys"), "/keys"));
    }
    let mut keys = Vec::with_capacity(list.len());
    let mut seen = HashSet::new();
    for (i, k) in list.iter().enumerate() {
        let Some(k) = k.as_str() else {
            return Err(Problem::invalid("each key must be a string", &format!("/keys/{i}")));
        };
        check_key(k, &s.limits, &format!("/keys/{i}"))?;
        if seen.insert(k) {
            keys.push(k.to_owned());
        }
    }
    Ok(keys)
}

/// Answers `{"records": [record...], "absent": [key...]}`, both in request order
/// (a key asked twice is answered once). `?consistent=true` reads every key from
/// the database.
pub(crate) async fn get_many(s: &Settings, req: spin_sdk::http::Request, query: Option<&str>) -> Result<http::Response<String>, Problem> {
    let consistent = Query::parse(query, &["consistent"])?.flag("consistent")?;
    let mime = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !mime.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(Problem::new(415, "unsupported-media-type", "Unsupported media type", "send the keys as application/json"));
    }
    let body = spillway_spin::read_body(req, s.limits.max_body_bytes).await?;
    let keys = parse_keys(s, &body)?;

    let mut found: HashMap<&str, String> = HashMap::new();
    if !consistent {
        // A cache store that fails is gone around: every key from the database.
        match async { CacheStore::kept(s).await?.get_many(s, &keys).await }.await {
            Ok(values) => {
                for (key, value) in keys.iter().zip(values) {
                    if let Some(entry) = value.and_then(Entry::parse) {
                        found.insert(key, entry.body);
                    }
                }
            }
            Err(p) => crate::fill::log_bypassed(&p),
        }
    }
    let misses: Vec<&String> = keys.iter().filter(|k| !found.contains_key(k.as_str())).collect();
    if !misses.is_empty() {
        let param = Value::Text(serde_json::to_string(&misses).unwrap_or_else(|_| "[]".into()));
        let db = Db::open().await?;
        let rows = db.read(db.sql().records, vec![param]).await?;
        for row in rows {
            if let (key, Stored::Live(record)) = Stored::from_row(&row)?
                && let Some(k) = misses.iter().find(|m| ***m == key)
            {
                found.insert(k.as_str(), record.to_text());
            }
        }
    }
    // The records are already JSON text (from the cache): joined, not re-parsed.
    let mut records = Vec::new();
    let mut absent = Vec::new();
    for k in &keys {
        match found.get(k.as_str()) {
            Some(body) => records.push(body.as_str()),
            None => absent.push(k),
        }
    }
    let body = format!("{{\"records\":[{}],\"absent\":{}}}", records.join(","), json!(absent));
    Ok(spillway_spin::respond(200, "application/json", body, &[]))
}
