//! Write status, and waiting for something to be applied without polling.
//!
//! A write is `pending` until the processor has applied or rejected it, refreshed
//! the cache and acknowledged its stream entry; only then does its status say so
//! (read-your-writes: once a status says `applied` with version v, every read of
//! the key returns v or newer). The processor adds a notice to the shard's capped
//! `done` stream whenever writes leave `pending`; [`Notices`] blocks on it
//! (`XREAD BLOCK`, on a connection of its own so the instance's shared connection
//! is not held up), so a waiter checks again only when something happened.

use serde_json::{Value as Json, json};
use spillway_core::call::Call;
use spillway_core::layout::WriteId;
use spillway_core::problem::{Dependency, Problem};
use spillway_core::settings::Settings;
use spin_sdk::redis::Connection;

use crate::db::{Db, SqlValue as Value};
use crate::{Redis, bin, text};

/// Longest wait a request may ask for, in seconds: well inside a hosted platform's
/// 30 s request limit.
pub const MAX_WAIT_SECS: f64 = 25.0;

/// A number of seconds from 0 to [`MAX_WAIT_SECS`] (decimals allowed), in
/// milliseconds; `None` if `v` is not one.
pub fn wait_secs(v: &str) -> Option<u64> {
    match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&secs) && !v.starts_with('+') => Some((secs * 1000.0) as u64),
        _ => None,
    }
}

/// The notices of one shard's `done` stream, read from where they stood when this
/// was made: anything after that may concern what the caller waits for.
pub struct Notices {
    conn: Option<Connection>,
    address: String,
    stream: String,
    last: String,
}

impl Notices {
    /// Starts following shard `shard`'s notices.
    pub async fn follow(s: &Settings, shard: u32) -> Result<Self, Problem> {
        let stream = s.layout.done(shard);
        let redis = Redis::for_shard(s, shard);
        let newest = redis.execute("XREVRANGE", vec![bin(&stream), bin("+"), bin("-"), bin("COUNT"), bin("1")]).await?;
        let last = newest.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let address = redis.address_for(&stream).await;
        Ok(Self { conn: None, address, stream, last })
    }

    /// Blocks until a new notice or until `deadline_ms` (monotonic); true if a
    /// notice came.
    pub async fn next(&mut self, deadline_ms: u64) -> Result<bool, Problem> {
        let now = crate::monotonic_ms();
        if now >= deadline_ms {
            return Ok(false);
        }
        let block = (deadline_ms - now).max(1);
        let read = async {
            let conn = match self.conn.take() {
                Some(c) => c,
                None => Connection::open(&self.address).await.map_err(|e| crate::redis::redis_failed(&self.address, &e))?,
            };
            let args = vec![bin("BLOCK"), bin(&block.to_string()), bin("STREAMS"), bin(&self.stream), bin(&self.last)];
            let reply = conn.execute("XREAD", args).await.map_err(|e| crate::redis::redis_failed(&self.address, &e))?;
            Ok::<_, Problem>((conn, reply))
        };
        // The block itself, and then a call's time for the answer (a timeout
        // drops the connection: the reply may still come on it).
        let ms = crate::deadline::call_timeout_ms();
        let (conn, reply) = match crate::deadline::within(if ms == 0 { 0 } else { block.saturating_add(ms) }, read).await {
            Some(r) => r?,
            None => return Err(Problem::timeout(Dependency::Redis, &crate::redis::redis_what(&self.address), ms)),
        };
        self.conn = Some(conn);
        match spillway_core::reply::newest_entry(&crate::redis::values(&reply)).map_err(crate::redis::malformed)? {
            Some(newest) => {
                self.last = newest;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The outcome recorded with the data, if the write has been applied or rejected.
async fn recorded(sid: &str) -> Result<Option<Json>, Problem> {
    let db = Db::open().await?;
    let Some(row) = db.first_row(db.sql().write_status, vec![Value::Text(sid.to_owned())]).await? else {
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
    if let (Some(Value::Text(r)), "rejected") = (row.get(2), status.as_str()) {
        body["reason"] = json!(r);
    }
    if let Some(Value::Text(k)) = row.get(3) {
        body["key"] = json!(k);
    }
    Ok(Some(body))
}

/// Whether a status is an outcome: neither `pending` nor `scheduled` (a wait
/// goes on through both).
pub fn settled(body: &Json) -> bool {
    !matches!(body["status"].as_str(), Some("pending" | "scheduled"))
}

/// Whether a write is in its shard's schedule (not yet moved into its stream).
async fn in_schedule(s: &Settings, redis: &Redis, id: &WriteId) -> Result<bool, Problem> {
    let Some(call) = Call::scheduled(&s.layout, id.shard, &id.entry) else { return Ok(false) };
    let reply = redis.call(&call).await?;
    Ok(reply.first().and_then(crate::int) == Some(1))
}

/// A write's status now.
pub async fn status(s: &Settings, id: &WriteId) -> Result<Json, Problem> {
    status_of(s, id, false).await
}

/// [`status`]; `hop`: this is the write a moved one became.
async fn status_of(s: &Settings, id: &WriteId, hop: bool) -> Result<Json, Problem> {
    let sid = id.to_string();
    let l = &s.layout;
    let redis = Redis::for_shard(s, id.shard);
    let pending = || json!({"id": sid, "status": "pending"});
    let in_stream = async || -> Result<bool, Problem> {
        let r = redis.execute("XRANGE", vec![bin(&l.stream(id.shard)), bin(&id.entry), bin(&id.entry)]).await?;
        Ok(!r.is_empty())
    };
    if let Some(body) = recorded(&sid).await? {
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
        if err == "purged" || err == "cancelled" {
            return Ok(json!({"id": sid, "status": err}));
        }
        // Moved into the stream under a new id (see `scripts::schedule_lua`),
        // which is never moved again: one hop.
        if let Some(entry) = err.strip_prefix("moved:").filter(|_| !hop) {
            let moved = WriteId { shard: id.shard, entry: entry.to_owned() };
            let mut body = Box::pin(status_of(s, &moved, true)).await?;
            body["id"] = json!(sid);
            body["moved_to"] = json!(moved.to_string());
            return Ok(body);
        }
        return Ok(json!({"id": sid, "status": "dead", "reason": err}));
    }
    // A queued write (the common case) is found with one look. Otherwise the
    // schedule, then the stream again: a write moved from the schedule into
    // the stream between the first two looks is found by the third.
    if in_stream().await? {
        return Ok(pending());
    }
    if in_schedule(s, &redis, id).await? {
        // The entry id of a scheduled write is its due time and sequence.
        let due: u64 = id.entry.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0);
        let now = u64::try_from(crate::now_ms()).unwrap_or(0);
        let status = if due > now { "scheduled" } else { "pending" };
        return Ok(json!({"id": sid, "status": status, "due_at": spillway_core::schedule::format_rfc3339(due), "due_at_ms": due}));
    }
    if in_stream().await? {
        return Ok(pending());
    }
    // Applied (and acknowledged) between the database read and the Redis reads,
    // or moved into the stream and applied since the schedule was read.
    match recorded(&sid).await? {
        Some(body) => Ok(body),
        None => Err(Problem::not_found(&format!(
            "no write {sid} (outcomes are kept for status_retention_secs after a write is accepted)"
        ))),
    }
}

/// A write's status once it has left `pending` (and `scheduled`), or as it
/// is at `deadline_ms` (monotonic).
pub async fn wait_for(s: &Settings, id: &WriteId, deadline_ms: u64) -> Result<Json, Problem> {
    let mut notices = Notices::follow(s, id.shard).await?;
    loop {
        let body = status(s, id).await?;
        if settled(&body) || !notices.next(deadline_ms).await? {
            // Out of time: one last look, as the last notice may have come just now.
            return if settled(&body) { Ok(body) } else { status(s, id).await };
        }
    }
}
