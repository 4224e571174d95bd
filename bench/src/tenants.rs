//! Fairness between tenants: a quiet tenant's accepted -> applied latency
//! alone, then while another floods as fast as it can (64 clients, batches
//! over all shards, retrying at once when refused), with both held to the
//! same quotas; and how much of the flood was accepted against its quota.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::load::{self, request};
use crate::report::Row;

/// The quotas every tenant has in this step: a rate well within what this
/// machine applies, a burst of one of the flood's requests (a larger burst
/// lets a tenant put that many writes in one processor round, ahead of the
/// others' on its shards), and a depth of one second's worth.
pub(crate) const RATE: u64 = 500;
pub(crate) const BURST: u64 = 100;
pub(crate) const DEPTH: u64 = 500;

/// A request as `tenant` (the `Spillway-Tenant` header).
fn as_tenant(tenant: &str, body: &str) -> Vec<u8> {
    let r = request("POST", "/v1/writes", body);
    let head = b"host: bench\r\n";
    let at = r.windows(head.len()).position(|w| w == head).map_or(0, |i| i + head.len());
    let mut out = r[..at].to_vec();
    out.extend_from_slice(format!("spillway-tenant: {tenant}\r\n").as_bytes());
    out.extend_from_slice(&r[at..]);
    out
}

/// The quiet tenant: one write every 10 ms (100 per second, a client per
/// write in flight, so a slow answer does not slow the pace) for `secs`;
/// the ids it was given.
async fn quiet(addr: &str, tag: &str, secs: u64) -> anyhow::Result<Vec<String>> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    for i in 0..secs * 100 {
        tick.tick().await;
        let addr = addr.to_owned();
        let body = format!(r#"{{"key":"quiet-{tag}-{}","op":"incr","field":"n","by":1}}"#, i % 50);
        sends.push(tokio::spawn(async move {
            let mut conn = load::Conn::open(&addr).await?;
            let (status, reply) = conn.send(&as_tenant("quiet", &body)).await?;
            let reply: serde_json::Value = serde_json::from_slice(&reply)?;
            reply["id"].as_str().map(str::to_owned).with_context(|| format!("the quiet tenant's write refused ({status}): {reply}"))
        }));
    }
    let mut ids = Vec::with_capacity(sends.len());
    for s in sends {
        ids.push(s.await??);
    }
    Ok(ids)
}

/// Accepted -> applied of `ids` (the stream time of acceptance to the
/// processor's commit time, both on this machine's clock, read from the
/// SQLite database at `db`), microseconds in a histogram.
async fn accepted_to_applied(db: &Path, ids: &[String]) -> anyhow::Result<load::Measured> {
    let sqlite = rusqlite::Connection::open(db)?;
    sqlite.busy_timeout(Duration::from_secs(10))?;
    let mut latency = load::histogram();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut left = ids.to_vec();
    while !left.is_empty() {
        if Instant::now() > deadline {
            bail!("{} of the quiet tenant's writes not applied within 120 s", left.len());
        }
        let mut still = Vec::new();
        for id in left {
            match sqlite.query_row("SELECT applied_at - entry_ms FROM spillway_writes WHERE id = ?1", [&id], |r| r.get::<_, i64>(0)) {
                Ok(ms) => latency.record((ms.max(0) as u64).saturating_mul(1000).max(1))?,
                Err(rusqlite::Error::QueryReturnedNoRows) => still.push(id),
                Err(e) => return Err(e.into()),
            }
        }
        left = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(load::Measured { ops: ids.len() as u64, elapsed: Duration::ZERO, latency, failed: (0, None) })
}

/// Waits (bounded) until the database has exactly `n` outcomes.
async fn all_recorded(db: &Path, n: u64) -> anyhow::Result<()> {
    let sqlite = rusqlite::Connection::open(db)?;
    sqlite.busy_timeout(Duration::from_secs(10))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got: u64 = sqlite.query_row("SELECT count(*) FROM spillway_writes", [], |r| r.get(0))?;
        if got == n {
            return Ok(());
        }
        if got > n || Instant::now() > deadline {
            bail!("{got} outcomes recorded, not the {n} writes accepted");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the flood did: writes accepted and refused (by a quota: 429), and
/// any other answer.
struct Flood {
    accepted: AtomicU64,
    throttled: AtomicU64,
    other: AtomicU64,
}

/// 64 clients posting batches of 100 increments over 10,000 keys (every
/// shard) as tenant `flood`, each sending again as soon as it is answered,
/// until `stop`.
fn flood(addr: &str, stop: Arc<AtomicBool>) -> (Arc<Flood>, Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) {
    let f = Arc::new(Flood { accepted: AtomicU64::new(0), throttled: AtomicU64::new(0), other: AtomicU64::new(0) });
    let tasks = (0..64u64)
        .map(|c| {
            let (addr, stop, f) = (addr.to_owned(), stop.clone(), f.clone());
            tokio::spawn(async move {
                let mut conn = load::Conn::open(&addr).await?;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let writes: Vec<String> =
                        (0..100).map(|i| format!(r#"{{"key":"flood-{}","op":"incr","field":"n","by":1}}"#, (c * 7919 + n * 100 + i) % 10_000)).collect();
                    let (status, _) = conn.send(&as_tenant("flood", &format!(r#"{{"writes":[{}]}}"#, writes.join(",")))).await?;
                    match status {
                        202 => f.accepted.fetch_add(100, Ordering::Relaxed),
                        429 => f.throttled.fetch_add(100, Ordering::Relaxed),
                        _ => f.other.fetch_add(1, Ordering::Relaxed),
                    };
                    n += 1;
                }
                Ok(())
            })
        })
        .collect();
    (f, tasks)
}

/// The rows: the quiet tenant's p99 during the flood against its p99 alone
/// (the target: within 2x), and the flood's accepted rate against its quota.
/// `addr` serves an app with every tenant's quota at [`RATE`] and [`DEPTH`]
/// (`quotas`) or none, whose database is `db`.
pub(crate) async fn rows(addr: &str, db: &Path, smoke: bool, quotas: bool) -> anyhow::Result<Vec<Row>> {
    let secs = if smoke { 2 } else { 10 };
    let alone_ids = quiet(addr, "alone", secs).await?;
    let alone = accepted_to_applied(db, &alone_ids).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (f, tasks) = flood(addr, stop.clone());
    // The flood fills its quota first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (started, at_start) = (Instant::now(), f.accepted.load(Ordering::Relaxed));
    let during_ids = quiet(addr, "flooded", secs).await?;
    let (flood_secs, at_end) = (started.elapsed().as_secs_f64(), f.accepted.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let during = accepted_to_applied(db, &during_ids).await?;
    let accepted = f.accepted.load(Ordering::Relaxed);
    let rate = (at_end - at_start) as f64 / flood_secs.max(0.001);
    // Held to its quota, not dropped: every write it was answered 202 for is applied.
    all_recorded(db, (alone_ids.len() + during_ids.len()) as u64 + accepted).await?;
    let throttled = f.throttled.load(Ordering::Relaxed);
    if f.other.load(Ordering::Relaxed) > 0 {
        bail!("{} of the flood's requests answered neither 202 nor 429", f.other.load(Ordering::Relaxed));
    }
    let ratio = during.ms(0.99) / alone.ms(0.99).max(0.001);
    let limits = if quotas { format!("quotas {RATE}/s, burst {BURST}, depth {DEPTH}") } else { "no quotas".to_owned() };
    let quiet_row = crate::latency_row(&format!("quiet tenant (100 writes/s) accepted -> applied while another floods (64 clients, batches of 100, {limits})"), &during)
        .against("the quiet tenant's p50 alone", alone.ms(0.5))
        .note(format!("p99 {:.1} ms = {ratio:.2}x its p99 alone ({:.1} ms; target: within 2x)", during.ms(0.99), alone.ms(0.99)));
    if !quotas {
        return Ok(vec![quiet_row.note(format!("the flood had {accepted} writes accepted, {:.0} per second", rate))]);
    }
    Ok(vec![
        quiet_row,
        Row {
            scenario: "flooding tenant: writes accepted per second, 64 clients retrying at once".to_owned(),
            value: rate,
            unit: "writes/s",
            latency: None,
            baseline: Some(("its quota (tenant_rate)".to_owned(), RATE as f64)),
            peak_rss_mib: None,
            note: format!("{accepted} accepted, {throttled} refused with 429 (the quota's share of its attempts: {:.1}%)", 100.0 * accepted as f64 / (accepted + throttled).max(1) as f64),
        },
    ])
}
