//! Scheduled writes: how late they are applied (with no other traffic, on a
//! quiet Redis and on one holding many keys with a TTL), and what one costs in
//! Redis's memory against a queued write.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use spillway_core::call::{Call, EnqueueLimits, Queued};
use spillway_core::layout::Layout;
use spillway_core::schedule::{Due, Timing};

use crate::load::{self, request};
use crate::report::Row;

/// The lateness the documentation promises (p99), to compare against.
const BOUND_MS: f64 = 250.0;

/// `n` writes scheduled 1 to 3 s ahead on distinct keys (posted at once, by
/// one client), then nothing sent until each is applied: how long after its
/// due time each was applied (the processor's clock, read from the SQLite
/// database at `db`; Redis runs on the same machine). The measured lateness
/// goes into a histogram, in microseconds.
async fn lateness(addr: &str, db: &Path, n: usize, tag: &str) -> anyhow::Result<load::Measured> {
    let mut conn = load::Conn::open(addr).await?;
    let mut ids = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let delay = 1000 + (i * 7919) % 2000;
        let body = format!(r#"{{"key":"sched-{tag}-{i}","op":"put","value":{i},"delay_ms":{delay}}}"#);
        let (status, reply) = conn.send(&request("POST", "/v1/writes", &body)).await?;
        let reply: serde_json::Value = serde_json::from_slice(&reply)?;
        let id = reply["id"].as_str().with_context(|| format!("no write id ({status}): {reply}"))?;
        ids.push(id.to_owned());
    }
    let sqlite = rusqlite::Connection::open(db)?;
    sqlite.busy_timeout(Duration::from_secs(10))?;
    let mut latency = load::histogram();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left = ids;
    while !left.is_empty() {
        if Instant::now() > deadline {
            bail!("{} scheduled writes not applied within 60 s", left.len());
        }
        let mut still = Vec::new();
        for id in left {
            let row = sqlite.query_row("SELECT applied_at - entry_ms FROM spillway_writes WHERE id = ?1", [&id], |r| r.get::<_, i64>(0));
            match row {
                Ok(late_ms) => latency.record((late_ms.max(0) as u64).saturating_mul(1000).max(1))?,
                Err(rusqlite::Error::QueryReturnedNoRows) => still.push(id),
                Err(e) => return Err(e.into()),
            }
        }
        left = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(load::Measured { ops: n as u64, elapsed: started.elapsed(), latency, failed: (0, None) })
}

/// Redis's `used_memory`.
fn used_memory(redis: &mut redis::Connection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query(redis)?;
    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).context("no used_memory in INFO")
}

/// Bytes of Redis memory per write for `n` writes enqueued natively (intake's
/// script, 100 per call, over 16 shards under `prefix`), each due `timing`;
/// the keys are deleted after.
fn bytes_per_write(redis: &mut redis::Connection, prefix: &str, n: usize, timing: Timing) -> anyhow::Result<f64> {
    let layout = Layout { prefix: prefix.into(), shards: 16 };
    let before = used_memory(redis)?;
    for call_no in 0..n.div_ceil(100) {
        let shard = (call_no % 16) as u32;
        let limits = EnqueueLimits {
            idempotency: None,
            idempotency_ttl_secs: 60,
            queue_depth_limit: u64::MAX / 2,
            bell_ttl_ms: 5000,
            seq_start: call_no as u32,
            scheduled_limit: u64::MAX / 2,
            retention_ms: 60_000,
            past_ms: 60_000,
            answered: &[],
            doorbell: "",
        };
        let writes: Vec<Queued<'_>> = (0..100)
            .map(|i| Queued { shard, key: "k", timing, payload: format!(r#"{{"key":"k{}","op":"incr","field":"n","by":1}}"#, call_no * 100 + i), tenant: None })
            .collect();
        let call = Call::enqueue(&layout, &[shard], shard, limits, &writes, |_| (Default::default(), 0));
        let _: redis::Value = redis::cmd("EVAL").arg(call.script).arg(call.keys.len()).arg(&call.keys).arg(&call.args).query(redis)?;
    }
    let after = used_memory(redis)?;
    let _: () = redis::cmd("EVAL").arg("for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end").arg(0).arg(format!("{prefix}*")).query(redis)?;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// Keys with a TTL an hour away (`bench:ttl:*`), as idempotency records or a
/// cache would leave: Redis's expire cycle samples these, so an alarm key among
/// many expires later than its time.
fn volatile_keys(redis: &mut redis::Connection, n: usize) -> anyhow::Result<()> {
    for from in (0..n).step_by(10_000) {
        let to = (from + 10_000).min(n);
        let _: () = redis::cmd("EVAL")
            .arg("for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('SET', 'bench:ttl:' .. i, 1, 'EX', 3600) end")
            .arg(0)
            .arg(from)
            .arg(to - 1)
            .query(redis)?;
    }
    Ok(())
}

/// The rows: lateness on a quiet Redis and on one with many keys with a TTL
/// (the median against a write's own write -> applied median, `write_p50_ms`,
/// and the p99 against the documented bound), and memory per scheduled write
/// against a queued one.
pub(crate) async fn rows(addr: &str, db: &Path, redis: &mut redis::Connection, smoke: bool, write_p50_ms: f64) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let n = if smoke { 20 } else { 200 };
    let quiet = lateness(addr, db, n, "quiet").await?;
    let volatile = if smoke { 10_000 } else { 1_000_000 };
    volatile_keys(redis, volatile)?;
    let crowded = lateness(addr, db, n, "crowded").await?;
    let _: () = redis::cmd("EVAL").arg("for _, k in ipairs(redis.call('KEYS', 'bench:ttl:*')) do redis.call('DEL', k) end").arg(0).query(redis)?;
    for (what, m) in [("a quiet Redis".to_owned(), &quiet), (format!("{volatile} other keys with a TTL in Redis"), &crowded)] {
        let row = crate::latency_row(&format!("scheduled write: applied after its due time, {n} writes 1-3 s ahead, no other traffic, {what}"), m)
            .against("write -> applied, one at a time (median)", write_p50_ms)
            .note(format!("p99 {:.0} ms = {:.2}x the documented 250 ms bound; max {:.0} ms", m.ms(0.99), m.ms(0.99) / BOUND_MS, m.ms(1.0)));
        rows.push(row);
    }
    let many = if smoke { 10_000 } else { 1_000_000 };
    let queued = bytes_per_write(redis, "bench:queued:", many, Timing::default())?;
    let scheduled = bytes_per_write(redis, "bench:sched:", many, Timing { due: Some(Due::After(86_400_000)), ttl_ms: None })?;
    rows.push(
        Row {
            scenario: format!("Redis memory per scheduled write ({many} scheduled a day ahead, 16 shards, ~45-byte writes)"),
            value: scheduled,
            unit: "bytes",
            latency: None,
            baseline: None,
            peak_rss_mib: None,
            note: format!("{:.0} MiB in all", scheduled * many as f64 / 1_048_576.0),
        }
        .against("a queued write", queued),
    );
    Ok(rows)
}
