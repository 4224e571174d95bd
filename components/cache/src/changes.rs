//! `GET /v1/records/{key}/changes`: the key's change feed as Server-Sent Events.
//!
//! Every applied version is one event, in order: `id:` is the version, `data:` the
//! record it produced (`{"key", "version", "value" | "deleted": true, "updated_at",
//! "write_id"}`). Without `Last-Event-ID` the feed opens with the current record
//! (read as `GET /v1/records/{key}` reads it); with it, it carries on after that
//! version, so an `EventSource` that reconnects misses nothing. Versions come from
//! the write outcomes (kept `status_retention_secs`); versions the log no longer
//! has are stood in for by the current record (or its deletion), so a client that
//! was away too long still ends up at the current version.
//!
//! A version is sent only once its write is acknowledged (its entry has left the
//! shard's stream): by then the cache has it, so a client that reads the record
//! after an event gets that version or newer. Between events the feed blocks on
//! the shard's notices (no polling); a response streams for `change_feed_secs`
//! (hosted platforms end requests after 30 s) and then ends with `retry:`, and
//! the client reconnects.

use futures::SinkExt as _;
use serde_json::{Value as Json, json};
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::settings::Settings;
use spillway_spin::db::{Db, SqlValue as Value, integer, text};
use spillway_spin::status::Notices;
use spillway_spin::{Redis, bin};
use spin_sdk::http::BoxBody;

use crate::entry::{Stored, stored};
use crate::fill::cached_or_filled;
use crate::read::path_key;

/// Versions read per query at most (steps back along the key's chain): a client
/// further behind catches up with the current record.
const PAGE: i64 = 10_000;
/// A comment line at least this often keeps proxies from closing an idle stream.
const KEEP_ALIVE_MS: u64 = 15_000;
/// What the client waits before reconnecting (`retry:`), in milliseconds.
const RETRY_MS: u64 = 1_000;

/// Starts the feed: checks the request, then streams from a task of its own.
pub(crate) async fn feed(raw_key: &str, headers: &http::HeaderMap) -> Result<http::Response<BoxBody>, Problem> {
    let s = spillway_spin::settings().await?;
    let key = path_key(&s, raw_key)?;
    let after = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v >= 0)
                .ok_or_else(|| Problem::invalid("Last-Event-ID must be a version (a whole number from 0)", "/headers/last-event-id"))?,
        ),
    };
    // Follow the notices from before the first read, so nothing falls in between.
    let notices = Notices::follow(&s, s.layout.shard_of(&key)).await?;
    let (mut tx, body) = spin_sdk::http::body::stream::<String>();
    spin_sdk::wasip3::spawn(async move {
        let deadline = spillway_spin::monotonic_ms().saturating_add(s.change_feed_secs.saturating_mul(1000));
        if let Err(p) = stream(&s, &key, after, notices, deadline, &mut tx).await {
            // The status line has gone: the error travels as an event of its own.
            // A client already gone cannot be told; nothing else is lost.
            let _ = tx.send(format!("event: error\ndata: {}\n\n", p.body())).await;
        }
    });
    http::Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(spin_sdk::http::box_body(body))
        .map_err(|e| Problem::unavailable(&e.to_string()))
}

/// The record as a read shows it now (cache first, so it is acknowledged), as an
/// event's `(version, data)`; a deleted key's tombstone as `deleted`.
async fn snapshot(s: &Settings, key: &str) -> Result<Option<(i64, Json)>, Problem> {
    if let Some(entry) = cached_or_filled(s, key).await? {
        let record: Json = serde_json::from_str(&entry.body).map_err(|e| Problem::unavailable(&e.to_string()))?;
        return Ok(Some((record["version"].as_i64().unwrap_or(0), record)));
    }
    Ok(match stored(key).await? {
        Stored::Deleted(v) => Some((v, json!({"key": key, "version": v, "deleted": true}))),
        _ => None,
    })
}

/// One event.
fn event(version: i64, data: &Json) -> String {
    format!("id: {version}\ndata: {data}\n\n")
}

/// Stream time `(ms, seq)` of an entry id `<ms>-<seq>`.
fn entry_time(entry: &str) -> Option<(u64, u64)> {
    let (ms, seq) = entry.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

async fn stream(
    s: &Settings,
    key: &str,
    after: Option<i64>,
    mut notices: Notices,
    deadline: u64,
    tx: &mut futures::channel::mpsc::Sender<String>,
) -> Result<(), Problem> {
    let send = async |tx: &mut futures::channel::mpsc::Sender<String>, text: String| tx.send(text).await.is_ok();
    if !send(tx, format!("retry: {RETRY_MS}\n\n")).await {
        return Ok(());
    }
    let mut last = match after {
        Some(v) => v,
        None => match snapshot(s, key).await? {
            Some((version, data)) => {
                if !send(tx, event(version, &data)).await {
                    return Ok(());
                }
                version
            }
            // No record the cache can show: start from its deletion, or before a
            // creation not yet acknowledged (its event comes from the log).
            None => match stored(key).await? {
                Stored::Live(r) => r.version - 1,
                other => other.version(),
            },
        },
    };
    let shard = s.layout.shard_of(key);
    let stream_key = s.layout.stream(shard);
    let redis = Redis::for_shard(s, shard);
    let db = Db::open().await?;
    let mut first_look = after.is_some();
    loop {
        let rows = db.read(db.sql().changes, vec![Value::Text(key.to_owned()), Value::Integer(last), Value::Integer(PAGE)]).await?;
        // Versions after `last` that the log no longer has (pruned after the
        // retention, or from before it existed): the current record stands in for
        // them, if it is newer; else the feed carries on with what is kept.
        let first = rows.first().and_then(|r| r.first()).and_then(integer);
        let gap = match first {
            Some(first) => first > last + 1,
            None => first_look && stored(key).await?.version() > last,
        };
        first_look = false;
        if gap {
            match snapshot(s, key).await? {
                Some((version, data)) if version > last => {
                    if !send(tx, event(version, &data)).await {
                        return Ok(());
                    }
                    last = version;
                    continue;
                }
                _ => {
                    if let Some(first) = first {
                        last = first - 1;
                    }
                }
            }
        }
        // Entries older than the stream's oldest have been acknowledged.
        let oldest = if rows.is_empty() {
            None
        } else {
            let r = redis.execute("XRANGE", vec![bin(&stream_key), bin("-"), bin("+"), bin("COUNT"), bin("1")]).await?;
            r.first().and_then(spillway_spin::text).and_then(|e| entry_time(&e))
        };
        let mut sent = 0;
        for row in &rows {
            let (Some(version), Some(id)) = (row.first().and_then(integer), row.get(3).and_then(text)) else { continue };
            let acked = match (oldest, WriteId::parse(&id).and_then(|w| entry_time(&w.entry))) {
                (Some(oldest), Some(t)) => t < oldest,
                (None, _) => true,
                (Some(_), None) => false,
            };
            if !acked {
                break;
            }
            let mut data = json!({"key": key, "version": version, "write_id": id, "updated_at": row.get(4).and_then(integer)});
            match row.get(1).and_then(text) {
                Some(v) => data["value"] = serde_json::from_str(&v).unwrap_or(Json::Null),
                None => data["deleted"] = json!(true),
            }
            if !send(tx, event(version, &data)).await {
                return Ok(());
            }
            last = version;
            sent += 1;
        }
        if sent > 0 && sent == rows.len() {
            // All sent: look again at once (more may have been acknowledged).
            continue;
        }
        let now = spillway_spin::monotonic_ms();
        if now >= deadline {
            return Ok(());
        }
        if !notices.next(deadline.min(now + KEEP_ALIVE_MS)).await? && !send(tx, ": keep-alive\n\n".to_owned()).await {
            return Ok(());
        }
    }
}
