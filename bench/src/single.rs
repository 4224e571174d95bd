//! Single writes against their shape (issue: single writes on Spin): the
//! floor, the shape of a single write's host interactions (body + one Redis
//! command) and Spillway's intake, at many clients and at one (median and
//! p99), and the Redis commands each accepted write costs (`INFO
//! commandstats`, processor included), so that an added round trip shows.

use std::time::Duration;

use spillway_core::layout::Layout;

use crate::load::{self, Measured, request};
use crate::report::Row;

/// Calls per accepted write of each Redis command run since `CONFIG
/// RESETSTAT`, most first, and their total.
pub(crate) fn commands_per_write(redis: &mut redis::Connection, writes: u64) -> anyhow::Result<(f64, Vec<(String, f64)>)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(redis)?;
    let mut per: Vec<(String, f64)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls: f64 = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            // Leaves out the benchmark's reads of these stats (its XLEN polls stay in, as the row says).
            (!["info", "config"].contains(&name)).then(|| (name.to_uppercase(), calls / writes.max(1) as f64))
        })
        .collect();
    per.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok((per.iter().map(|(_, n)| n).sum(), per))
}

/// The commands figure as a row.
pub(crate) fn commands_row(total: f64, per: &[(String, f64)]) -> Row {
    let top: Vec<String> = per.iter().filter(|(_, n)| *n >= 0.05).map(|(c, n)| format!("{c} {n:.2}")).collect();
    Row {
        scenario: "Redis commands per accepted single write (INFO commandstats, processor and the benchmark's XLEN polls included)".into(),
        value: total,
        unit: "commands",
        latency: None,
        baseline: None,
        peak_rss_mib: None,
        note: top.join(", "),
    }
}

/// One client, one request after another: the floor, the write's shape and
/// intake (also with `Prefer: return=minimal`), a warm read and its shape;
/// each against its shape, in throughput and p99. Also returns the
/// shape's rate and p99.
pub(crate) async fn one_client(base: &str, spillway: &str, duration: Duration, one_write: &str) -> anyhow::Result<(Vec<Row>, [f64; 2])> {
    let floor = load::http(base, 1, duration, 1, |_, _| request("GET", "/hello", "")).await?;
    let body = one_write.to_owned();
    let shape = load::http(base, 1, duration, 1, move |_, _| request("POST", "/shape/body-redis", &body)).await?;
    anyhow::ensure!(shape.failed.0 == 0, "the shape failed: {:?}", shape.failed.1);
    let intake = crate::single_writes(spillway, 1, duration).await?;
    let minimal = crate::single_writes_with(spillway, 1, duration, &[("prefer", "return=minimal")]).await?;
    for (what, m) in [("intake", &intake), ("intake with return=minimal", &minimal)] {
        anyhow::ensure!(m.failed.0 == 0, "{what} failed at one client: {:?}", m.failed.1);
    }
    // A warm read and its shape (one key-value get), one client: a read
    // answers with a body right after a host call, as a write does.
    let read_shape = load::http(base, 1, duration, 1, |_, _| request("GET", "/shape/kv", "")).await?;
    let read = load::http(spillway, 1, duration, 1, |_, _| request("GET", "/v1/records/k1", "")).await?;
    for (what, m) in [("the read's shape", &read_shape), ("the warm read", &read)] {
        anyhow::ensure!(m.failed.0 == 0, "{what} failed at one client: {:?}", m.failed.1);
    }
    let p99 = |m: &Measured| m.ms(0.99);
    Ok((vec![
        Row::from("one client: floor (hello-world)", "req/s", &floor),
        Row::from("one client: shape (floor + body + one Redis command)", "req/s", &shape)
            .against("floor", floor.rate())
            .note(format!("p99 {:.1}x the floor's", p99(&shape) / p99(&floor))),
        Row::from("one client: Spillway single-write intake", "req/s", &intake).against("its shape", shape.rate()).note(format!(
            "target >= 0.9x its shape, p99 <= 2x the shape's: p99 {:.1}x the shape's, p50 {:.1}x",
            p99(&intake) / p99(&shape),
            intake.ms(0.5) / shape.ms(0.5)
        )),
        Row::from("one client: Spillway single-write intake, `Prefer: return=minimal` (a 202 with no body)", "req/s", &minimal)
            .against("its shape", shape.rate())
            .note(format!("p99 {:.1}x the shape's, p50 {:.1}x", p99(&minimal) / p99(&shape), minimal.ms(0.5) / shape.ms(0.5))),
        Row::from("one client: shape (floor + one key-value get)", "req/s", &read_shape)
            .against("floor", floor.rate())
            .note(format!("p99 {:.1}x the floor's", p99(&read_shape) / p99(&floor))),
        Row::from("one client: Spillway warm read (one record)", "req/s", &read)
            .against("its shape", read_shape.rate())
            .note(format!("{:.2}x the floor; p99 {:.1}x the shape's, p50 {:.1}x", read.rate() / floor.rate(), p99(&read) / p99(&read_shape), read.ms(0.5) / read_shape.ms(0.5))),
    ], [shape.rate(), p99(&shape)]))
}

/// Runs `load` with the processor held off: the benchmark takes every
/// shard's lease first (once the queue is empty), so a processor woken by
/// a doorbell finds each shard held and does nothing; then lets the leases
/// expire, and an expired lease resumes its shard, as after a processor
/// that died holding it. What intake costs on its own, apart from the
/// processor's work on the same machine. The leases last `hold` at most (a
/// load that outlasts them is an error: its figures would include the
/// processor) and are given back on every path.
pub(crate) async fn held_off<T>(
    redis: &mut redis::Connection,
    layout: &Layout,
    hold: Duration,
    load: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    crate::until_drained(redis, layout, Duration::from_secs(600)).await?;
    // Held for `hold` at most: a benchmark stopped here leaves the shards
    // to their lease's expiry, which resumes them.
    let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
    let taken = take_all(redis, layout, hold_ms).await;
    let out = match taken {
        Ok(()) => load.await,
        Err(e) => Err(e),
    };
    // Given back on every path, each shard whatever the others' answers.
    let mut given_back = Ok(());
    for shard in 0..layout.shards {
        let r: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], 1) end return -1")
            .arg(1)
            .arg(layout.lease(shard))
            .arg(HOLDER)
            .query(redis);
        match r {
            // Expired while the load ran: the row measured the processor too.
            Ok(-1) if out.is_ok() => given_back = Err(anyhow::anyhow!("shard {shard}'s lease ran out before the load ended (hold {hold:?})")),
            Ok(_) => {}
            Err(e) => given_back = Err(e.into()),
        }
    }
    let out = out?;
    given_back?;
    crate::until_drained(redis, layout, Duration::from_secs(600)).await?;
    Ok(out)
}

/// Takes every shard's lease for `hold_ms`, waiting (bounded) for a
/// processor still holding one after the queue emptied.
async fn take_all(redis: &mut redis::Connection, layout: &Layout, hold_ms: u64) -> anyhow::Result<()> {
    let mut left: Vec<u32> = (0..layout.shards).collect();
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while !left.is_empty() {
        anyhow::ensure!(std::time::Instant::now() < give_up, "shards {left:?} stayed held by a processor");
        let mut still = Vec::new();
        for shard in left {
            let taken: Option<String> = redis::cmd("SET").arg(layout.lease(shard)).arg(HOLDER).arg("NX").arg("PX").arg(hold_ms).query(redis)?;
            if taken.is_none() {
                still.push(shard);
            }
        }
        left = still;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The lease token the benchmark holds shards with (see [`held_off`]).
const HOLDER: &str = "benchmark-holds-off-the-processor";
