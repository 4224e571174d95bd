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
use spillway_core::record::ChangeRow;
use spillway_spin::db::{Db, SqlValue as Value};
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
    notices: Notices,
    deadline: u64,
    tx: &mut futures::channel::mpsc::Sender<String>,
) -> Result<(), Problem> {
    if !send(tx, format!("retry: {RETRY_MS}\n\n")).await {
        return Ok(());
    }
    let last = match after {
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
    let mut feed = Feed { s, key, last, stream_key: s.layout.stream(shard), redis: Redis::for_shard(s, shard), db: Db::open().await?, tx };
    let mut first_look = after.is_some();
    let mut notices = notices;
    loop {
        let rows = feed.page().await?;
        let gap = feed.fill_gap(&rows, first_look).await?;
        first_look = false;
        match gap {
            Gap::Closed => return Ok(()),
            Gap::Sent => continue,
            Gap::None => {}
        }
        let Some(sent) = feed.send_acknowledged(&rows).await? else { return Ok(()) };
        if sent > 0 && sent == rows.len() {
            // All sent: look again at once (more may have been acknowledged).
            continue;
        }
        let now = spillway_spin::monotonic_ms();
        if now >= deadline {
            return Ok(());
        }
        if !notices.next(deadline.min(now + KEEP_ALIVE_MS)).await? && !send(feed.tx, ": keep-alive\n\n".to_owned()).await {
            return Ok(());
        }
    }
}

/// Sends one text; false when the client has gone.
async fn send(tx: &mut futures::channel::mpsc::Sender<String>, text: String) -> bool {
    tx.send(text).await.is_ok()
}

/// What a look for a gap in the log did.
enum Gap {
    /// No gap.
    None,
    /// The current record was sent for the versions the log no longer has.
    Sent,
    /// The client has gone.
    Closed,
}

/// One change feed after its start: where it stands and where it reads.
struct Feed<'a> {
    s: &'a Settings,
    key: &'a str,
    /// The last version sent.
    last: i64,
    stream_key: String,
    redis: Redis,
    db: Db,
    tx: &'a mut futures::channel::mpsc::Sender<String>,
}

impl Feed<'_> {
    /// The next page of the key's applied versions after the last sent.
    async fn page(&self) -> Result<Vec<ChangeRow>, Problem> {
        let rows = self.db.read(self.db.sql().changes, vec![Value::Text(self.key.to_owned()), Value::Integer(self.last), Value::Integer(PAGE)]).await?;
        rows.iter().map(|r| ChangeRow::from_row(r).map_err(|e| spillway_spin::backend_failed("The database (database)", &e.to_string()))).collect()
    }

    /// Versions after the last sent that the log no longer has (pruned after the
    /// retention, or from before it existed): the current record stands in for
    /// them, if it is newer; else the feed carries on with what is kept (from
    /// just before the page's first version).
    async fn fill_gap(&mut self, rows: &[ChangeRow], first_look: bool) -> Result<Gap, Problem> {
        let first = rows.first().map(|r| r.version);
        let gap = match first {
            Some(first) => first > self.last + 1,
            None => first_look && stored(self.key).await?.version() > self.last,
        };
        if !gap {
            return Ok(Gap::None);
        }
        match snapshot(self.s, self.key).await? {
            Some((version, data)) if version > self.last => {
                if !send(self.tx, event(version, &data)).await {
                    return Ok(Gap::Closed);
                }
                self.last = version;
                Ok(Gap::Sent)
            }
            _ => {
                if let Some(first) = first {
                    self.last = first - 1;
                }
                Ok(Gap::None)
            }
        }
    }

    /// Sends the page's versions whose writes have been acknowledged (entries
    /// older than the stream's oldest), in order, up to the first that has not;
    /// how many were sent (`None`: the client has gone).
    async fn send_acknowledged(&mut self, rows: &[ChangeRow]) -> Result<Option<usize>, Problem> {
        let oldest = if rows.is_empty() {
            None
        } else {
            let r = self.redis.execute("XRANGE", vec![bin(&self.stream_key), bin("-"), bin("+"), bin("COUNT"), bin("1")]).await?;
            r.first().and_then(spillway_spin::text).and_then(|e| entry_time(&e))
        };
        let mut sent = 0;
        for row in rows {
            let acked = match (oldest, WriteId::parse(&row.write_id).and_then(|w| entry_time(&w.entry))) {
                (Some(oldest), Some(t)) => t < oldest,
                (None, _) => true,
                (Some(_), None) => false,
            };
            if !acked {
                break;
            }
            let mut data = json!({"key": self.key, "version": row.version, "write_id": row.write_id, "updated_at": row.applied_at});
            match &row.value {
                Some(v) => data["value"] = serde_json::from_str(v).unwrap_or(Json::Null),
                None => data["deleted"] = json!(true),
            }
            if !send(self.tx, event(row.version, &data)).await {
                return Ok(None);
            }
            self.last = row.version;
            sent += 1;
        }
        Ok(Some(sent))
    }
}
