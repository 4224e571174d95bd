//! The HTTP-only manifest on the emulated hosted platform (`Builder::hosted`,
//! `up --emulate akamai-functions`): a fresh instance per request, 30 s per
//! request, 128 MiB per instance, the platform's key-value store. What runs
//! there must stay inside those limits with no one calling the drain.

use std::sync::Arc;

use serde_json::json;
use spillway_testhost::{Hosted, Peak};

use crate::spillway::{Spillway, burst};

/// The peaks of `component`, checked against the platform's limits: no request
/// cut off, no instance refused memory, and the figures within the limits.
fn within_limits(s: &Spillway, component: &str) -> Peak {
    let peak = s.app.peaks()[component];
    let limits = Hosted::AKAMAI_FUNCTIONS;
    assert_eq!((peak.cut_off, peak.memory_refused), (0, 0), "{component}: {peak:?}");
    assert!(peak.longest_instance < limits.request_limit && peak.memory_bytes < limits.memory_limit, "{component}: {peak:?}");
    peak
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// 100,000 increments posted as a burst (requests of 100, 16 at a time) are
/// all applied exactly once with no drain call and no cron: intake's chained
/// wakes and the drains' hand-ons alone. Every request stays inside 30 s and
/// every instance inside 128 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_100k_writes_is_applied_exactly_with_no_drain_call() {
    let s = Arc::new(Spillway::builder().hosted().start().await);
    burst(&s, 100_000, 1000).await;
    s.wait_recorded(100_000).await;
    assert_eq!(s.store.sum_of_n().await, 100_000);
    for c in ["intake", "processor"] {
        let p = within_limits(&s, c);
        eprintln!("{c}: longest request {:?}, longest instance (work after the response included) {:?}, largest instance {:.1} MiB", p.longest_request, p.longest_instance, mib(p.memory_bytes));
    }
}

/// Large values at the default `batch_size` (1000): 3,200 writes of 64 KiB
/// queued on every shard at once (about 200 MiB, far beyond one instance's
/// 128 MiB) are applied by one woken drain whose rounds read `round_bytes`
/// (4 MiB by default) at most, so its instance stays inside the limit. Before rounds were
/// bounded in bytes, a round read up to 1000 writes from each of the 16 shards
/// and its instance was refused memory.
#[tokio::test(flavor = "multi_thread")]
async fn large_values_at_batch_size_1000_stay_within_an_instance_memory() {
    const WRITES: usize = 3200;
    const PER_REQUEST: usize = 15;
    let s = Arc::new(Spillway::builder().hosted().vars(&[("batch_size", "1000")]).start().await);
    // Every doorbell flag set first, so the writes ring nothing and queue up:
    // the drain then meets all of them at once.
    let layout = crate::support::layout();
    let mut c = s.redis.conn();
    for shard in 0..layout.shards {
        let _: () = redis::cmd("SET").arg(layout.bell(shard)).arg(i64::MAX / 2).arg("PX").arg(600_000).query(&mut c).unwrap();
    }
    let value = "v".repeat(65_000);
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut tasks = Vec::new();
    for r in 0..WRITES.div_ceil(PER_REQUEST) {
        let writes: Vec<_> = (r * PER_REQUEST..((r + 1) * PER_REQUEST).min(WRITES)).map(|i| json!({"key": format!("big-{i}"), "op": "put", "value": value})).collect();
        let (s, permit) = (s.clone(), sem.clone().acquire_owned().await.unwrap());
        tasks.push(tokio::spawn(async move {
            let (code, v) = s.write(json!({ "writes": writes })).await;
            drop(permit);
            assert_eq!(code, 202, "{v}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let queued: usize = (0..layout.shards).map(|n| redis::cmd("XLEN").arg(layout.stream(n)).query::<usize>(&mut c).unwrap()).sum();
    assert_eq!(queued, WRITES, "all queued before the drain");
    // One wake, as intake's ring after the flags expire: a write whose flag
    // is clear.
    let _: () = redis::cmd("DEL").arg(layout.bell(layout.shard_of("wake"))).query(&mut c).unwrap();
    let (code, v) = s.write(json!({"key": "wake", "op": "put", "value": 1})).await;
    assert_eq!(code, 202, "{v}");
    s.wait_recorded(WRITES as i64 + 1).await;
    let stored = s.store.int("SELECT count(*) FROM spillway_records WHERE key LIKE 'big-%'").await;
    assert_eq!(stored, Some(WRITES as i64));
    let p = within_limits(&s, "processor");
    eprintln!(
        "processor, {WRITES} writes of 64 KiB, batch_size 1000, round_bytes 4 MiB (the default): largest instance {:.1} MiB, longest instance {:?}",
        mib(p.memory_bytes),
        p.longest_instance
    );
}
