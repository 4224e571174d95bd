use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::spillway::{ADMIN, Spillway, batch_of_incr};

/// 1,000 rounds of "increment a hot key, wait until its status says applied with
/// version v, read the record" while 8 readers keep reading it and another client
/// keeps dropping its cache entry (so reads race cache fills against the
/// processor's refresh): every read after `applied` returns v or newer. The
/// rounds run on [`LANES`] hot keys at once, each with its own readers and
/// dropper.
async fn read_your_writes(s: Spillway) {
    let seen = ryw_rounds(s, 1000, LANES, true).await;
    assert!(seen.stale.is_empty(), "reads older than an applied write: {:?}", seen.stale);
}

/// Hot keys whose rounds run side by side (a key's rounds run one after
/// another).
const LANES: u64 = 4;

/// What [`ryw_rounds`] saw.
#[derive(Default)]
struct Seen {
    /// `(key, round, version applied, version read)` of each stale read.
    stale: Vec<(String, u64, u64, serde_json::Value)>,
    /// Writes that ended other than `applied` (counted when not strict).
    not_applied: usize,
    /// Cache drops refused (counted when not strict).
    refused_drops: usize,
}

/// `rounds` rounds of the read-your-writes run, spread over `lanes` hot keys;
/// `strict`: every request must succeed and every write be applied (else what
/// failed is counted).
async fn ryw_rounds(s: Spillway, rounds: u64, lanes: u64, strict: bool) -> Seen {
    let s = Arc::new(s);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let keys: Vec<String> = (0..lanes.clamp(1, rounds.max(1))).map(|i| format!("hot-{i}")).collect();
    for key in &keys {
        let (code, v) = s.write(json!({"key": key, "op": "put", "value": {"n": 0}})).await;
        assert_eq!(code, 202, "{v}");
        s.settled(v["id"].as_str().unwrap()).await;
    }
    let mut background = Vec::new();
    for key in &keys {
        for _ in 0..8 / keys.len() {
            let (s, stop, reads, key) = (s.clone(), stop.clone(), reads.clone(), key.clone());
            background.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (code, _, rec) = s.call("GET", &format!("/v1/records/{key}"), None, &[]).await;
                    assert_eq!(code, 200, "{rec}");
                    reads.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }));
        }
        let (s, stop, refused, key) = (s.clone(), stop.clone(), refused.clone(), key.clone());
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (code, _, p) = s.admin("DELETE", &format!("/v1/cache/{key}"), None).await;
                if code != 204 {
                    assert!(!strict, "{code} {p}");
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let lanes = keys.iter().enumerate().map(|(i, key)| {
        let s = s.clone();
        let mine = (0..rounds).filter(|r| r % keys.len() as u64 == i as u64).count() as u64;
        async move {
            let mut seen = Seen::default();
            let mut version = 1;
            for round in 1..=mine {
                let (code, v) = s.write(json!({"key": key, "op": "incr", "field": "n"})).await;
                assert_eq!(code, 202, "{v}");
                let waited = std::time::Instant::now();
                let st = loop {
                    // Answered as soon as the write leaves `pending`.
                    let (_, _, st) = s.call("GET", &format!("/v1/writes/{}?wait=5", v["id"].as_str().unwrap()), None, &[]).await;
                    if st["status"] != "pending" || waited.elapsed() > std::time::Duration::from_secs(60) {
                        break st;
                    }
                };
                if st["status"] != "applied" {
                    assert!(!strict, "{st}");
                    seen.not_applied += 1;
                    // Still pending after a minute: the shard stalled (its
                    // refresh refused by a store out of its write budget),
                    // and this key's later rounds would wait behind it.
                    if st["status"] == "pending" {
                        break;
                    }
                    continue;
                }
                // Versions never go back; when not strict, a write given up
                // on earlier may have been applied since.
                let applied = st["version"].as_u64().unwrap_or(0);
                if strict {
                    assert_eq!(applied, version + 1, "{st}");
                } else {
                    assert!(applied > version, "{st}");
                }
                version = applied;
                let (code, _, rec) = s.call("GET", &format!("/v1/records/{key}"), None, &[]).await;
                assert_eq!(code, 200, "{rec}");
                if rec["version"].as_u64().unwrap() < version {
                    seen.stale.push((key.clone(), round, version, rec["version"].clone()));
                }
            }
            seen
        }
    });
    let mut seen = Seen::default();
    for lane in futures::future::join_all(lanes).await {
        seen.stale.extend(lane.stale);
        seen.not_applied += lane.not_applied;
    }
    stop.store(true, Ordering::Relaxed);
    for b in background {
        b.await.unwrap();
    }
    seen.refused_drops = refused.load(Ordering::Relaxed) as usize;
    eprintln!(
        "read-your-writes: {rounds} rounds on {} keys, {} concurrent reads, {} stale, {} writes not applied, {} cache drops refused",
        keys.len(),
        reads.load(Ordering::Relaxed),
        seen.stale.len(),
        seen.not_applied,
        seen.refused_drops
    );
    seen
}

/// On the emulated hosted platform (`Hosted::AKAMAI_FUNCTIONS`), the HTTP-only
/// manifest with its cache in Redis (`cache_store=redis`, its default): the
/// 1,000 rounds, 0 stale.
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_on_the_hosted_platform() {
    read_your_writes(Spillway::builder().hosted().start().await).await;
}

/// The same with the cache in the platform's key-value store
/// (`cache_store=kv`): what breaks, kept as a documented negative result. The
/// store takes 50 writes a second and shows another request a write only after
/// it has replicated, so reads after `applied` return older versions and
/// cache writes are refused. The test holds that the emulation shows it (a
/// run where nothing broke would mean the emulation no longer models the
/// platform).
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_breaks_on_the_hosted_platform_with_its_key_value_store() {
    // One hot key: its store's 50 writes a second are not shared out over
    // several keys' fills and refreshes.
    let seen = ryw_rounds(Spillway::builder().hosted().vars(&[("cache_store", "kv")]).start().await, 15, 1, false).await;
    // What breaks: reads older than an applied write, or a write the shard
    // stalls on (its refresh refused by the store's write budget).
    assert!(!seen.stale.is_empty() || seen.not_applied > 0, "the platform's store gives stale reads after applied, or stalls a shard");
}

/// Read-your-writes with the cache in Spin's default SQLite key-value store.
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_sqlite_cache() {
    read_your_writes(Spillway::builder().with_trigger().start().await).await;
}

/// Read-your-writes with the cache in Redis (`cache_store=redis`: outbound
/// Redis, each entry beside its shard's keys). (The key-value store on Redis
/// through runtime config runs the same code as the SQLite store above.)
#[tokio::test(flavor = "multi_thread")]
async fn read_your_writes_cache_store_redis() {
    read_your_writes(Spillway::builder().vars(&[("cache_store", "redis")]).with_trigger().start().await).await;
}

/// `GET /v1/writes/{id}?wait=s` holds the request until the write leaves `pending`:
/// it answers `applied` once a drain applies it, `rejected` likewise, and `pending`
/// when the time runs out; a bad `wait` is a 422 naming the parameter.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_write_instead_of_polling() {
    let s = Arc::new(Spillway::builder().start().await);
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
    s.drain().await;
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
    s.drain().await;
    let (_, _, st) = waiter.await.unwrap();
    assert_eq!(st["status"], "rejected", "{st}");
    assert!(st["reason"].as_str().unwrap().contains("below the minimum 0"), "{st}");
    for bad in ["abc", "-1", "26", "NaN", "inf", ""] {
        let (code, _, p) = s.call("GET", &format!("/v1/writes/{id}?wait={bad}"), None, &[]).await;
        assert_eq!((code, p["field"].as_str()), (422, Some("/query/wait")), "wait={bad}: {p}");
    }
}

/// `POST /v1/writes` with `Prefer: wait=<s>` answers 200 with the outcomes when the
/// writes are applied in time (single and batch, applied and rejected), and 202
/// as without the preference when they are not; an unreadable preference is
/// ignored, as RFC 7240 asks.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_wait_answers_with_the_outcome() {
    let s = Arc::new(Spillway::builder().start().await);
    let drain_soon = |s: Arc<Spillway>| {
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            s.admin("POST", "/v1/drain", None).await
        })
    };
    let drain = drain_soon(s.clone());
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "p", "op": "put", "value": {"n": 5}})), &[("prefer", "wait=20")]).await;
    drain.await.unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["status"].as_str(), v["version"].as_i64(), v["key"].as_str()), (Some("applied"), Some(1), Some("p")), "{v}");
    assert_eq!(v["status_url"], format!("/v1/writes/{}", v["id"].as_str().unwrap()));
    assert_eq!(headers["preference-applied"], "wait=20");

    let drain = drain_soon(s.clone());
    let batch = json!({"writes": [
        {"key": "p", "op": "incr", "field": "n", "by": 1},
        {"key": "p", "op": "incr", "field": "n", "by": -100, "min": 0},
        {"key": "q", "op": "put", "value": 1},
    ]});
    let (code, _, v) = s.call("POST", "/v1/writes", Some(batch), &[("prefer", "respond-async, wait=20")]).await;
    drain.await.unwrap();
    assert_eq!(code, 200, "{v}");
    let got: Vec<(&str, Option<i64>)> = v["writes"].as_array().unwrap().iter().map(|w| (w["status"].as_str().unwrap(), w["version"].as_i64())).collect();
    assert_eq!(got, vec![("applied", Some(2)), ("rejected", None), ("applied", Some(1))], "{v}");
    assert!(v["writes"][1]["reason"].as_str().unwrap().contains("below the minimum"), "{v}");

    // Nobody applies it: 202 once the wait is over.
    let started = std::time::Instant::now();
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "p", "op": "delete"})), &[("prefer", "wait=0.3")]).await;
    assert_eq!(code, 202, "{v}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300), "it waited the time given");
    assert!(headers.contains_key("location") && v.get("status").is_none(), "the usual 202: {v}");
    // An unreadable preference: no wait at all.
    let started = std::time::Instant::now();
    let (code, _, _) = s.call("POST", "/v1/writes", Some(json!({"key": "p", "op": "delete"})), &[("prefer", "wait=soon")]).await;
    assert_eq!(code, 202);
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "not held for the longest wait (25 s)");
}

/// `POST /v1/writes` with `Prefer: return=minimal` (RFC 7240) answers a single
/// write's `202` with no body: its `Location` names the write, which is queued
/// and applied as usual. A batch, whose ids would have nowhere to go, gets the
/// usual body, as does a write with an expiry (its expiry's id is in the
/// body only); with `wait` too, an outcome in time is the usual `200`.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_return_minimal_answers_with_the_location_only() {
    let s = Arc::new(Spillway::builder().start().await);
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "m", "op": "incr", "field": "n"})), &[("prefer", "return=minimal")]).await;
    assert_eq!((code, &v), (202, &Value::Null), "no body");
    assert_eq!(headers["content-length"], "0");
    assert!(!headers.contains_key("content-type"), "{headers:?}");
    assert_eq!(headers["preference-applied"], "return=minimal");
    let location = headers["location"].to_str().unwrap().to_owned();
    let id = location.strip_prefix("/v1/writes/").expect("the write's status URL");
    s.drain().await;
    let st = s.settled(id).await;
    assert_eq!((st["status"].as_str(), st["version"].as_i64()), (Some("applied"), Some(1)), "{st}");

    // Names are case-insensitive; other preferences beside it are kept apart.
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "m", "op": "incr", "field": "n"})), &[("prefer", "respond-async, Return=Minimal")]).await;
    assert_eq!((code, &v, headers["preference-applied"].to_str().unwrap()), (202, &Value::Null, "return=minimal"));

    // A batch: the ids in the body, the preference not applied.
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(batch_of_incr(0, 2, 2)), &[("prefer", "return=minimal")]).await;
    assert_eq!((code, v["writes"].as_array().map(Vec::len)), (202, Some(2)), "{v}");
    assert!(!headers.contains_key("preference-applied"), "{headers:?}");

    // With a wait that the outcome beats: the outcome (drained until it is answered).
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { s.call("POST", "/v1/writes", Some(json!({"key": "m", "op": "incr", "field": "n"})), &[("prefer", "return=minimal, wait=20")]).await })
    };
    while !waiting.is_finished() {
        s.drain().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (code, _, v) = waiting.await.unwrap();
    assert_eq!((code, v["status"].as_str()), (200, Some("applied")), "{v}");
    // One it does not: the minimal 202.
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "m", "op": "incr", "field": "n"})), &[("prefer", "return=minimal, wait=0.2")]).await;
    assert_eq!((code, &v), (202, &Value::Null));
    assert!(headers["location"].to_str().unwrap().starts_with("/v1/writes/"));
    // A write with an expiry: its expiry's id is in the body only, so the body stays.
    let (code, headers, v) = s.call("POST", "/v1/writes", Some(json!({"key": "t", "op": "put", "value": 1, "ttl_ms": 60000})), &[("prefer", "return=minimal")]).await;
    assert_eq!(code, 202);
    assert!(v["expiry_id"].is_string() && !headers.contains_key("preference-applied"), "{v}");
    // Another value of `return`: the usual body.
    let (code, _, v) = s.call("POST", "/v1/writes", Some(json!({"key": "m", "op": "incr", "field": "n"})), &[("prefer", "return=representation")]).await;
    assert_eq!(code, 202);
    assert!(v["id"].is_string(), "{v}");
}

/// `?consistent=true` reads the database, not the cache; `?min_version=v` answers
/// v or newer, waiting for it to be applied, else 412; versions keep growing
/// through a delete and a re-create; bad parameters are 422 with their field.
#[tokio::test(flavor = "multi_thread")]
async fn consistent_and_min_version_reads() {
    let s = Arc::new(Spillway::builder().start().await);
    let auth = format!("Bearer {ADMIN}");
    let auth = [("authorization", auth.as_str())];
    let drain = || s.call("POST", "/v1/drain", None, &auth);
    s.write(json!({"key": "c", "op": "put", "value": {"n": 1}})).await;
    drain().await;
    let (_, _, cached) = s.call("GET", "/v1/records/c", None, &[]).await;
    assert_eq!(cached["version"], 1);
    // The database changes behind the cache (as an operator's edit would).
    s.db().execute("UPDATE spillway_records SET value = '{\"n\":99}' WHERE key = 'c'", []).unwrap();
    let (_, _, v) = s.call("GET", "/v1/records/c", None, &[]).await;
    assert_eq!(v["value"]["n"], 1, "the default read is the cache's");
    let (code, _, v) = s.call("GET", "/v1/records/c?consistent=true", None, &[]).await;
    assert_eq!((code, v["value"]["n"].as_i64()), (200, Some(99)), "{v}");

    // Version 2 is accepted, not applied: min_version=2 runs out of time...
    s.write(json!({"key": "c", "op": "incr", "field": "n"})).await;
    let started = std::time::Instant::now();
    let (code, _, p) = s.call("GET", "/v1/records/c?min_version=2&wait=0.3", None, &[]).await;
    assert_eq!((code, p["field"].as_str()), (412, Some("/query/min_version")), "{p}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // ...or is answered as soon as it is applied.
    let reader = {
        let s = s.clone();
        tokio::spawn(async move { s.call("GET", "/v1/records/c?min_version=2&wait=20", None, &[]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!reader.is_finished(), "the read waits for version 2");
    drain().await;
    let (code, _, v) = reader.await.unwrap();
    assert_eq!((code, v["version"].as_i64(), v["value"]["n"].as_i64()), (200, Some(2), Some(100)), "{v}");
    let (code, _, v) = s.call("GET", "/v1/records/c?min_version=1", None, &[]).await;
    assert_eq!((code, v["version"].as_i64()), (200, Some(2)), "an older minimum is met at once");
    let (code, _, v) = s.call("GET", "/v1/records/c?min_version=2&consistent=true", None, &[]).await;
    assert_eq!((code, v["version"].as_i64()), (200, Some(2)), "{v}");

    // Deleted at version 3: min_version=3 is met by the deletion (404); a
    // re-created key carries on at version 4.
    s.write(json!({"key": "c", "op": "delete"})).await;
    drain().await;
    let (code, _, _) = s.call("GET", "/v1/records/c?min_version=3&wait=0", None, &[]).await;
    assert_eq!(code, 404);
    s.write(json!({"key": "c", "op": "put", "value": "again"})).await;
    drain().await;
    let (_, _, v) = s.call("GET", "/v1/records/c", None, &[]).await;
    assert_eq!((v["version"].as_i64(), v["value"].as_str()), (Some(4), Some("again")), "{v}");

    for (query, field) in [
        ("consistent=yes", "/query/consistent"),
        ("min_version=-1", "/query/min_version"),
        ("min_version=x", "/query/min_version"),
        ("min_version=", "/query/min_version"),
        ("min_version=1&wait=30", "/query/wait"),
        ("wait=-1", "/query/wait"),
        ("mni_version=1", "/query/mni_version"),
        ("min_version=1&min_version=2", "/query/min_version"),
    ] {
        let (code, _, p) = s.call("GET", &format!("/v1/records/c?{query}"), None, &[]).await;
        assert_eq!((code, p["field"].as_str()), (422, Some(field)), "{query}: {p}");
    }
}

/// A database written by the previous schema is read correctly before any
/// processor has run: the first read that needs the new columns migrates it.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_database_is_migrated_by_its_first_read() {
    let s = Spillway::builder().start().await;
    s.db()
        .execute_batch(
            "CREATE TABLE spillway_records (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
               etag TEXT NOT NULL, updated_at INTEGER NOT NULL);
             CREATE TABLE spillway_writes (id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
               version INTEGER, reason TEXT, applied_at INTEGER NOT NULL, shard INTEGER, entry_ms INTEGER);
             CREATE INDEX spillway_writes_by_entry ON spillway_writes (shard, entry_ms);
             INSERT INTO spillway_records VALUES ('old', '{\"n\":7}', 3, 'e', 1);",
        )
        .unwrap();
    let (code, _, v) = s.call("GET", "/v1/records/old?consistent=true", None, &[]).await;
    assert_eq!((code, v["version"].as_i64(), v["value"]["n"].as_i64()), (200, Some(3), Some(7)), "{v}");
    let (_, _, v) = s.call("POST", "/v1/records:get", Some(json!({"keys": ["old", "new"]})), &[]).await;
    assert_eq!((v["records"][0]["version"].as_i64(), v["absent"].clone()), (Some(3), json!(["new"])), "{v}");
    let columns: i64 = s
        .db()
        .query_row("SELECT count(*) FROM pragma_table_info('spillway_writes') WHERE name = 'value'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(columns, 1, "migrated");
    // And the processor carries on from there.
    s.write(json!({"key": "old", "op": "incr", "field": "n"})).await;
    s.drain().await;
    let (_, _, v) = s.call("GET", "/v1/records/old", None, &[]).await;
    assert_eq!((v["version"].as_i64(), v["value"]["n"].as_i64()), (Some(4), Some(8)), "{v}");
}
