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

/// `GET /v1/writes/{id}?wait=s` holds the request until the write leaves `pending`:
/// it answers `applied` once a drain applies it, `rejected` likewise, and `pending`
/// when the time runs out; a bad `wait` is a 422 naming the parameter.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_write_instead_of_polling() {
    let s = Arc::new(Spillway::start(&[], false).await);
    let auth = format!("Bearer {ADMIN}");
    let (_, v) = s.write(json!({"key": "w", "op": "put", "value": {"n": 1}})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    // Nothing drains: the wait runs out and says pending.
    let started = std::time::Instant::now();
    let (code, _, st) = s.call("GET", &format!("/v1/writes/{id}?wait=0.3"), None, &[]).await;
    assert_eq!((code, st["status"].as_str()), (200, Some("pending")), "{st}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300), "it waited the time given");
    // A waiter is answered when the write is applied.
    let waiter = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move { s.call("GET", &format!("/v1/writes/{id}?wait=20"), None, &[]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the waiter is held while the write is pending");
    s.call("POST", "/v1/drain", None, &[("authorization", &auth)]).await;
    let (code, _, st) = waiter.await.unwrap();
    assert_eq!((code, st.clone()), (200, json!({"id": id, "status": "applied", "version": 1, "key": "w"})), "{st}");
    // Rejected likewise.
    let (_, v) = s.write(json!({"key": "w", "op": "incr", "field": "n", "by": -5, "min": 0})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let waiter = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move { s.call("GET", &format!("/v1/writes/{id}?wait=20"), None, &[]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    s.call("POST", "/v1/drain", None, &[("authorization", &auth)]).await;
    let (_, _, st) = waiter.await.unwrap();
    assert_eq!(st["status"], "rejected", "{st}");
    assert!(st["reason"].as_str().unwrap().contains("below the minimum 0"), "{st}");
    for bad in ["abc", "-1", "26", "NaN", "inf", ""] {
        let (code, _, p) = s.call("GET", &format!("/v1/writes/{id}?wait={bad}"), None, &[]).await;
        assert_eq!((code, p["field"].as_str()), (422, Some("/query/wait")), "wait={bad}: {p}");
    }
}
