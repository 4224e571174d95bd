use serde_json::json;

use crate::spillway::{ADMIN, Engine, Spillway, burst, on_both_engines};

/// A write accepted with 202 is applied and then readable, and its status says
/// applied with the resulting version.
async fn accepted_write_is_applied_and_readable(engine: Engine) {
    let s = Spillway::builder().engine(engine).with_trigger().start().await;
    let (status, v) = s.write(json!({"key": "user:1", "op": "put", "value": {"name": "Ada"}})).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status_url"], format!("/v1/writes/{id}"));
    let st = s.settled(&id).await;
    assert_eq!(st, json!({"id": id, "status": "applied", "version": 1, "key": "user:1"}));
    let (code, headers, rec) = s.call("GET", "/v1/records/user%3A1", None, &[]).await;
    assert_eq!(code, 200, "{rec}");
    assert_eq!(rec["value"], json!({"name": "Ada"}));
    assert_eq!(rec["version"], 1);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", spillway_core::apply::etag(&json!({"name": "Ada"}))));
    let (code, _, _) = s.call("GET", "/v1/records/user%3A1", None, &[("if-none-match", &etag)]).await;
    assert_eq!(code, 304);
    let (code, _, drained) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(code, 200, "{drained}");
}

/// Entry order of write ids within one shard: `(ms, seq)`.
fn entry_order(id: &str) -> (u64, u64) {
    let id = spillway_core::layout::WriteId::parse(id).unwrap();
    let (ms, seq) = id.entry.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Appends to one key from many concurrent clients land in the order intake
/// accepted them.
async fn appends_land_in_acceptance_order(engine: Engine) {
    let s = std::sync::Arc::new(Spillway::builder().engine(engine).with_trigger().start().await);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (status, v) = s.write(json!({"key": "log", "op": "append", "field": "items", "value": i})).await;
            assert_eq!(status, 202, "{v}");
            (v["id"].as_str().unwrap().to_owned(), i)
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        accepted.push(t.await.unwrap());
    }
    s.wait_recorded(200).await;
    // Settled (acknowledged): the cache has the last batch's result.
    for (id, _) in &accepted {
        s.settled(id).await;
    }
    accepted.sort_by_key(|(id, _)| entry_order(id));
    let expected: Vec<i32> = accepted.iter().map(|(_, i)| *i).collect();
    let (code, _, rec) = s.call("GET", "/v1/records/log", None, &[]).await;
    assert_eq!(code, 200);
    let got: Vec<i32> = serde_json::from_value(rec["value"]["items"].clone()).unwrap();
    assert_eq!(got, expected);
    assert_eq!(rec["version"], 200);
}

/// A bounded decrement never oversells: 1,000 concurrent decrements of a stock of 100
/// leave 0, with exactly 100 applied and 900 rejected.
async fn bounded_incr_never_oversells(engine: Engine) {
    let s = std::sync::Arc::new(Spillway::builder().engine(engine).with_trigger().start().await);
    let (_, v) = s.write(json!({"key": "sku-42", "op": "put", "value": {"stock": 100}})).await;
    let put_id = v["id"].as_str().unwrap().to_owned();
    s.settled(&put_id).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (status, v) = s.write(json!({"key": "sku-42", "op": "incr", "field": "stock", "by": -1, "min": 0})).await;
            assert_eq!(status, 202, "body: {v}; guest output:\n{}", s.app.guest_output());
            v["id"].as_str().unwrap().to_owned()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    s.wait_recorded(1001).await;
    let mut applied = 0;
    let mut rejected = 0;
    for id in &ids {
        // Settled: acknowledged, so the cache has the batch's result (a record
        // read before that, once the database has committed, may be older).
        let st = s.settled(id).await;
        match st["status"].as_str().unwrap() {
            "applied" => applied += 1,
            "rejected" => {
                rejected += 1;
                assert!(st["reason"].as_str().unwrap().contains("below the minimum 0"), "{st}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((applied, rejected), (100, 900));
    let (_, _, rec) = s.call("GET", "/v1/records/sku-42", None, &[]).await;
    assert_eq!(rec["value"], json!({"stock": 0}));
}

/// A burst of 50,000 writes rings the doorbell far fewer times than there are
/// writes, and every write is applied with no further traffic.
async fn burst_coalesces_doorbells_and_applies_everything(engine: Engine) {
    let s = std::sync::Arc::new(Spillway::builder().engine(engine).with_trigger().start().await);
    let client = redis::Client::open(s.redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("spillway:doorbell").await.unwrap();
    let rings = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = rings.clone();
    let listener = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while futures::StreamExt::next(&mut messages).await.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    const WRITES: usize = 50_000;
    burst(&s, WRITES, 1000).await;
    s.wait_recorded(WRITES as i64).await;
    let rings = rings.load(std::sync::atomic::Ordering::SeqCst);
    listener.abort();
    eprintln!("burst: {WRITES} writes, {rings} doorbells (processor invocations): {:.0} writes per invocation", WRITES as f64 / rings.max(1) as f64);
    assert!(rings > 0 && (rings as usize) * 20 < WRITES, "{rings} doorbells for {WRITES} writes");
    let total = s.store.sum_of_n().await;
    assert_eq!(total, WRITES as i64);
}

/// A retried request with the same `Idempotency-Key` and body gets the first answer
/// and enqueues nothing new; the same key with another body is refused.
async fn idempotency_key_dedupes_retries(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let body = json!({"writes": [{"key": "a", "op": "incr", "field": "n"}, {"key": "b", "op": "incr", "field": "n"}]});
    let key = [("idempotency-key", "order-1")];
    let (c1, h1, first) = s.call("POST", "/v1/writes", Some(body.clone()), &key).await;
    let (c2, h2, second) = s.call("POST", "/v1/writes", Some(body), &key).await;
    assert_eq!((c1, c2), (202, 202));
    assert_eq!(first, second);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    let mut conn = s.redis.conn();
    let queued: usize = (0..16).map(|i| redis::Commands::xlen::<_, usize>(&mut conn, crate::support::layout().stream(i)).unwrap()).sum();
    assert_eq!(queued, 2, "the retry enqueued nothing");
    let other = json!({"key": "a", "op": "delete"});
    let (c3, _, problem) = s.call("POST", "/v1/writes", Some(other), &key).await;
    assert_eq!(c3, 409);
    assert_eq!(problem["type"], "https://spillway.dev/problems/idempotency-key-reused");
    // Refused whatever shards the other body's writes fall on (the record is
    // one per server, not per shard of the first body).
    let layout = spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 };
    let elsewhere: Vec<String> = (0..200).map(|i| format!("k{i}")).filter(|k| ![layout.shard_of("a"), layout.shard_of("b")].contains(&layout.shard_of(k))).take(3).collect();
    for k in elsewhere {
        let (code, _, p) = s.call("POST", "/v1/writes", Some(json!({"key": k, "op": "put", "value": 1})), &key).await;
        assert_eq!(code, 409, "{k}: {p}");
    }
    let queued: usize = (0..16).map(|i| redis::Commands::xlen::<_, usize>(&mut conn, crate::support::layout().stream(i)).unwrap()).sum();
    assert_eq!(queued, 2, "nothing enqueued under a reused key");
}

/// A write that was committed but whose acknowledgement kept failing (here: its
/// cache refresh, its key's fill lock held by someone else) is not dead-lettered
/// when it runs out of attempts: the database has it, so it is acknowledged as
/// applied and its key refreshed, and reads see it (read-your-writes).
async fn committed_writes_are_not_dead_lettered(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("max_attempts", "2")]).start().await;
    let auth = format!("Bearer {ADMIN}");
    let auth = [("authorization", auth.as_str())];
    let drain = || s.call("POST", "/v1/drain", None, &auth);
    s.write(json!({"key": "held", "op": "put", "value": 1})).await;
    drain().await;
    let (_, _, v) = s.call("GET", "/v1/records/held", None, &[]).await;
    assert_eq!(v["version"], 1);
    let lock = spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 }.fill_lock("held");
    let _: () = redis::cmd("SET").arg(&lock).arg("someone-else").query(&mut s.redis.conn()).unwrap();
    let (_, v) = s.write(json!({"key": "held", "op": "put", "value": 2})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    for attempt in 1..=2 {
        let (_, _, out) = tokio::time::timeout(std::time::Duration::from_secs(60), drain()).await.expect("the drain gives up on a busy lock");
        assert_eq!(out["errors"].as_array().unwrap().len(), 1, "attempt {attempt}: {out}");
    }
    let committed = s.store.int(&format!("SELECT count(*) FROM spillway_writes WHERE id = '{id}'")).await.unwrap();
    assert_eq!(committed, 1, "the write committed on its first delivery");
    let _: () = redis::cmd("DEL").arg(&lock).query(&mut s.redis.conn()).unwrap();
    let (_, _, out) = drain().await;
    assert_eq!(out["errors"], json!([]), "{out}");
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
    assert_eq!((st["status"].as_str(), st["version"].as_i64()), (Some("applied"), Some(2)), "{st}");
    let (_, _, v) = s.call("GET", "/v1/records/held", None, &[]).await;
    assert_eq!(v["version"], 2, "the cache was refreshed: {v}");
    let (shard, _) = id.split_once('-').unwrap();
    let dead: i64 = redis::cmd("XLEN").arg(crate::support::layout().dead(shard.parse().unwrap())).query(&mut s.redis.conn()).unwrap();
    assert_eq!(dead, 0, "nothing was dead-lettered");
    let (_, _, stats) = s.call("GET", "/v1/stats", None, &auth).await;
    assert_eq!((stats["totals"]["applied"].as_u64(), stats["totals"]["dead"].as_u64()), (Some(2), Some(0)), "counted once, when acknowledged: {stats}");
}

/// A write whose batch keeps failing on infrastructure is retried, then moved to the
/// dead-letter stream with its error, and its status says dead.
async fn failing_writes_are_dead_lettered(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("max_attempts", "2")]).start().await;
    s.store.fail_records().await;
    let (_, v) = s.write(json!({"key": "doomed", "op": "put", "value": 1})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    for attempt in 1..=2 {
        let (code, _, out) = s.admin("POST", "/v1/drain", None).await;
        assert_eq!(code, 200);
        assert_eq!(out["errors"].as_array().unwrap().len(), 1, "attempt {attempt}: {out}");
        let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        assert_eq!(st["status"], "pending");
    }
    let (_, _, out) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(out["errors"], json!([]), "{out}");
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
    assert_eq!(st["status"], "dead", "{st}");
    // Which backend failed, in Spillway's words (the status is public: no
    // backend's own text); the engine's own ("CHECK constraint failed" /
    // "violates check constraint") is in the log line of the failed batch.
    assert!(st["reason"].as_str().unwrap().starts_with("The database (database) is unreachable or failed"), "{st}");
    assert!(!st["reason"].as_str().unwrap().to_lowercase().contains("constraint"), "{st}");
    assert!(s.app.guest_output().to_lowercase().contains("check constraint"), "the log has the engine's words");
    let (shard, entry) = id.split_once('-').unwrap();
    let dead: Vec<redis::Value> = redis::cmd("XRANGE").arg(crate::support::layout().dead(shard.parse().unwrap())).arg("-").arg("+").query(&mut s.redis.conn()).unwrap();
    assert_eq!(dead.len(), 1);
    let ttl: i64 = redis::cmd("PTTL").arg(crate::support::layout().dead_status(shard.parse().unwrap(), entry)).query(&mut s.redis.conn()).unwrap();
    assert!(ttl > 0, "a dead write's status is kept for the status retention, not forever");
    let attempts: i64 = redis::cmd("EXISTS").arg(crate::support::layout().attempts(shard.parse().unwrap())).query(&mut s.redis.conn()).unwrap();
    assert_eq!(attempts, 0, "its attempt counter is gone");
}

/// The drain endpoint needs the admin bearer token.
async fn drain_requires_the_admin_token(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let (code, _, p) = s.call("POST", "/v1/drain", None, &[]).await;
    assert_eq!((code, p["type"].as_str()), (401, Some("https://spillway.dev/problems/unauthorized")));
    let (code, _, _) = s.call("POST", "/v1/drain", None, &[("authorization", "Bearer wrong")]).await;
    assert_eq!(code, 403);
    let (code, _, _) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(code, 200);
}

/// A cache miss fills the cache only under the key's single-flight lock: while
/// another filler holds it, a reader waits, then answers from the database without
/// filling; once the lock is free, the next miss fills the cache.
async fn cache_fill_is_single_flight(engine: Engine) {
    let s = Spillway::builder().engine(engine).with_trigger().start().await;
    let kv_path = s.state.path().join("sqlite_key_value.db");
    let kv = move || -> i64 {
        let db = rusqlite::Connection::open(&kv_path).unwrap();
        db.query_row("SELECT count(*) FROM spin_key_value WHERE key = 'spillway:rec:hot'", [], |r| r.get(0)).unwrap()
    };
    single_flight(s, kv).await;
}

/// The same with `cache_store=redis`: the entry is a Redis key beside the
/// shard's.
#[tokio::test(flavor = "multi_thread")]
async fn cache_fill_is_single_flight_cache_store_redis() {
    let s = Spillway::builder().vars(&[("cache_store", "redis")]).with_trigger().start().await;
    let entry = crate::support::layout().cached("hot");
    let mut c = s.redis.conn();
    let cached = move || -> i64 { redis::cmd("EXISTS").arg(&entry).query(&mut c).unwrap() };
    single_flight(s, cached).await;
}

/// The single-flight run, `kv` counting the key's cache entries.
async fn single_flight(s: Spillway, mut kv: impl FnMut() -> i64) {
    let (_, v) = s.write(json!({"key": "hot", "op": "put", "value": {"a": 1}})).await;
    s.settled(v["id"].as_str().unwrap()).await;
    let (code, _, _) = s.admin("DELETE", "/v1/cache/hot", None).await;
    assert_eq!(code, 204);
    assert_eq!(kv(), 0);
    let lock = spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 }.fill_lock("hot");
    let mut c = s.redis.conn();
    let _: () = redis::cmd("SET").arg(&lock).arg("someone-else").arg("PX").arg(60_000).query(&mut c).unwrap();
    let (code, _, rec) = s.call("GET", "/v1/records/hot", None, &[]).await;
    assert_eq!((code, rec["value"].clone()), (200, json!({"a": 1})));
    assert_eq!(kv(), 0, "a reader without the lock does not fill");
    let _: () = redis::cmd("DEL").arg(&lock).query(&mut c).unwrap();
    let mut tasks = Vec::new();
    let s = std::sync::Arc::new(s);
    for _ in 0..20 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.call("GET", "/v1/records/hot", None, &[]).await.2["version"].clone() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), json!(1));
    }
    assert_eq!(kv(), 1, "the lock holder filled the cache");
}

on_both_engines!(
    accepted_write_is_applied_and_readable,
    appends_land_in_acceptance_order,
    bounded_incr_never_oversells,
    burst_coalesces_doorbells_and_applies_everything,
    idempotency_key_dedupes_retries,
    committed_writes_are_not_dead_lettered,
    failing_writes_are_dead_lettered,
    drain_requires_the_admin_token,
    cache_fill_is_single_flight,
);
