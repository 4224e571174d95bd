use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;

use crate::spillway::{ADMIN, Spillway};

/// 1,000 rounds of "increment a hot key, wait until its status says applied with
/// version v, read the record" while 8 readers keep reading it and another client
/// keeps dropping its cache entry (so reads race cache fills against the
/// processor's refresh): every read after `applied` returns v or newer.
async fn read_your_writes(s: Spillway) {
    let s = Arc::new(s);
    let (code, v) = s.write(json!({"key": "hot", "op": "put", "value": {"n": 0}})).await;
    assert_eq!(code, 202, "{v}");
    s.settled(v["id"].as_str().unwrap()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut background = Vec::new();
    for _ in 0..8 {
        let (s, stop, reads) = (s.clone(), stop.clone(), reads.clone());
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (code, _, rec) = s.call("GET", "/v1/records/hot", None, &[]).await;
                assert_eq!(code, 200, "{rec}");
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_micros(500)).await;
            }
        }));
    }
    {
        let (s, stop) = (s.clone(), stop.clone());
        let auth = format!("Bearer {ADMIN}");
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (code, _, _) = s.call("DELETE", "/v1/cache/hot", None, &[("authorization", &auth)]).await;
                assert_eq!(code, 204);
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut stale = Vec::new();
    for round in 1..=1000u64 {
        let (code, v) = s.write(json!({"key": "hot", "op": "incr", "field": "n"})).await;
        assert_eq!(code, 202, "{v}");
        let st = loop {
            let (_, _, st) = s.call("GET", &format!("/v1/writes/{}", v["id"].as_str().unwrap()), None, &[]).await;
            if st["status"] != "pending" {
                break st;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };
        assert_eq!(st["status"], "applied", "{st}");
        let version = st["version"].as_u64().unwrap();
        assert_eq!(version, round + 1);
        let (code, _, rec) = s.call("GET", "/v1/records/hot", None, &[]).await;
        assert_eq!(code, 200, "{rec}");
        if rec["version"].as_u64().unwrap() < version {
            stale.push((round, version, rec["version"].clone()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        b.await.unwrap();
    }
    eprintln!("read-your-writes: 1000 rounds, {} concurrent reads, {} stale", reads.load(Ordering::Relaxed), stale.len());
    assert!(stale.is_empty(), "reads older than an applied write: {stale:?}");
}

/// Read-your-writes with the cache in Spin's default SQLite key-value store.
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_sqlite_cache() {
    read_your_writes(Spillway::start(&[], true).await).await;
}

/// Read-your-writes with the cache on Redis (runtime config).
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_redis_cache() {
    read_your_writes(Spillway::start_kv_on_redis(&[], true).await).await;
}
