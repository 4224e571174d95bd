//! Deadlines: with Redis, PostgreSQL or the key-value store's server paused
//! (SIGSTOP: connections open, nothing answers) or dead, every request answers
//! within its deadline plus a bound, with the documented status, and reads
//! degrade; after resuming, everything accepted is applied exactly once, with
//! no operator.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::pg::PgServer;
use crate::spillway::{Spillway, on_both_engines};
use crate::support::{Redis, eventually, layout};

/// Short deadlines, so that a stalled call is told from a slow one at once.
const CALL_MS: &str = "300";
const REQUEST_MS: &str = "1000";

/// How long past its deadline an answer may come on a shared, noisy machine:
/// a bound, far below a hang (and the client's own give-up, 30 s).
const SLACK: Duration = Duration::from_millis(2500);

/// A request's answer and how long it took; a request that hangs fails the
/// test after 30 s instead of holding it.
async fn timed(s: &Spillway, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Value, Duration) {
    let started = Instant::now();
    let (code, h, v) = tokio::time::timeout(Duration::from_secs(30), s.call(method, path, body, headers))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} did not answer within 30 s"));
    (code, h, v, started.elapsed())
}

/// Asserts a 503 of `code` with `Retry-After`, within `bound`.
fn assert_timeout((status, headers, body, took): &(u16, http::HeaderMap, Value, Duration), code: &str, bound: Duration) {
    assert_eq!(*status, 503, "{body}");
    assert_eq!(body["type"], format!("https://spillway.dev/problems/{code}"), "{body}");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{body}");
    assert!(*took < bound, "answered after {took:?}, over {bound:?}: {body}");
}

/// Retries `body` (same `Idempotency-Key`) as a client honouring
/// `Retry-After` does, until it is not a 503; returns the answer.
async fn retry_write(s: &Spillway, body: &Value, key: &str) -> (u16, Value) {
    for _ in 0..30 {
        let (code, h, v) = s.call("POST", "/v1/writes", Some(body.clone()), &[("idempotency-key", key)]).await;
        if code != 503 {
            return (code, v);
        }
        let secs: u64 = h.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).expect("a 503 says when to retry");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    panic!("still 503 after 30 retries");
}

/// Redis paused mid-request: the write's answer says its outcome is unknown
/// (naming Redis) within the deadline; a cached read is served and a miss is
/// a fast 503; once Redis resumes, a retry with the same key settles it, and
/// it is applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_redis_leaves_writes_unknown_until_a_retry_settles_them_once() {
    let s = Spillway::builder().vars(&[("call_timeout_ms", CALL_MS), ("request_timeout_ms", REQUEST_MS)]).start().await;
    for key in ["seen", "evicted"] {
        let (code, v) = s.write(json!({"key": key, "op": "put", "value": {"n": 0}})).await;
        assert_eq!(code, 202, "{v}");
    }
    let (code, v) = s.write(json!({"key": "seen", "op": "merge", "patch": {}})).await;
    assert_eq!(code, 202, "{v}");
    s.drain().await;
    assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
    let (code, _, _) = s.admin("DELETE", "/v1/cache/evicted", None).await;
    assert_eq!(code, 204);

    s.redis.pause();
    let write = json!({"key": "counter", "op": "incr", "field": "n", "by": 1});
    let keyed = timed(&s, "POST", "/v1/writes", Some(write.clone()), &[("idempotency-key", "stall-1")]).await;
    assert_timeout(&keyed, "outcome-unknown", Duration::from_millis(1000) + SLACK);
    let detail = keyed.2["detail"].as_str().unwrap();
    assert!(detail.contains("Redis (redis_address)") && detail.contains("same Idempotency-Key"), "{detail}");
    let bare = timed(&s, "POST", "/v1/writes", Some(json!({"key": "other", "op": "put", "value": 1})), &[]).await;
    assert_timeout(&bare, "outcome-unknown", Duration::from_millis(1000) + SLACK);
    assert!(bare.2["detail"].as_str().unwrap().contains("no Idempotency-Key"), "{}", bare.2);
    // Reads: the cached record is served (the cache is the local store); a
    // miss, without Redis's fill lock, is read from the database (and not
    // cached); a write's status needs Redis and fails fast, naming it.
    let hit = timed(&s, "GET", "/v1/records/seen", None, &[]).await;
    assert_eq!((hit.0, &hit.2["value"]), (200, &json!({"n": 0})), "{}", hit.2);
    let miss = timed(&s, "GET", "/v1/records/evicted", None, &[]).await;
    assert_eq!((miss.0, &miss.2["value"]), (200, &json!({"n": 0})), "{}", miss.2);
    assert!(miss.3 < Duration::from_millis(1000) + SLACK, "{:?}", miss.3);
    let absent = timed(&s, "GET", "/v1/records/never", None, &[]).await;
    assert_eq!(absent.0, 404, "{}", absent.2);
    let status = timed(&s, "GET", &format!("/v1/writes/{}", v["id"].as_str().unwrap()), None, &[]).await;
    assert_timeout(&status, "redis-timeout", Duration::from_millis(1000) + SLACK);

    s.redis.resume();
    let (code, v) = retry_write(&s, &write, "stall-1").await;
    assert_eq!(code, 202, "{v}");
    s.drain().await;
    assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
    // Exactly once: the write that was in flight and its retry are one.
    let (code, _, record) = s.call("GET", "/v1/records/counter?consistent=true", None, &[]).await;
    assert_eq!((code, &record["value"]["n"]), (200, &json!(1)), "{record}");
    assert_eq!(s.store.int("SELECT count(*) FROM spillway_writes WHERE key = 'counter'").await, Some(1));
}

/// Without call deadlines, the request's own deadline still bounds it.
#[tokio::test(flavor = "multi_thread")]
async fn the_request_deadline_alone_bounds_a_request() {
    let s = Spillway::builder().vars(&[("call_timeout_ms", "0"), ("request_timeout_ms", "800")]).start().await;
    let (code, v) = s.write(json!({"key": "a", "op": "put", "value": 1})).await;
    assert_eq!(code, 202, "{v}");
    s.redis.pause();
    let miss = timed(&s, "GET", "/v1/records/never", None, &[]).await;
    assert_timeout(&miss, "deadline-exceeded", Duration::from_millis(800) + SLACK);
    let write = timed(&s, "POST", "/v1/writes", Some(json!({"key": "a", "op": "put", "value": 2})), &[("idempotency-key", "d-1")]).await;
    assert_timeout(&write, "outcome-unknown", Duration::from_millis(800) + SLACK);
    assert!(write.2["detail"].as_str().unwrap().contains("800 ms (request_timeout_ms"), "{}", write.2);
    s.redis.resume();
}

/// PostgreSQL paused: writes are still accepted; a cached record is served, a
/// miss, a consistent read and a write's status are 503 naming the database,
/// within the deadline, and at once while it stays stalled. The processor
/// gives up its round and its lease, and once the database resumes applies
/// everything accepted, exactly once, with no operator.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_database_keeps_writes_flowing_and_cached_reads_served() {
    if !spillway_pg_server::installed() {
        panic!("PostgreSQL is not installed (see .ci/run)");
    }
    let pg = PgServer::start();
    let vars = [("call_timeout_ms", "500"), ("request_timeout_ms", "1500"), ("lease_ttl_ms", "2000")];
    let s = Spillway::builder().pg(pg.create_secured()).vars(&vars).start().await;
    for key in ["cached", "evicted"] {
        let (code, v) = s.write(json!({"key": key, "op": "put", "value": {"v": key}})).await;
        assert_eq!(code, 202, "{v}");
    }
    s.drain().await;
    let (code, _, _) = s.admin("DELETE", "/v1/cache/evicted", None).await;
    assert_eq!(code, 204);
    let (_, _, cached_write) = s.call("POST", "/v1/writes", Some(json!({"key": "cached", "op": "merge", "patch": {"w": 1}})), &[]).await;
    s.drain().await;
    s.start_trigger().await;

    pg.pause();
    let bound = Duration::from_millis(1500) + SLACK;
    let hit = timed(&s, "GET", "/v1/records/cached", None, &[]).await;
    assert_eq!((hit.0, &hit.2["value"]), (200, &json!({"v": "cached", "w": 1})), "{}", hit.2);
    let miss = timed(&s, "GET", "/v1/records/evicted", None, &[]).await;
    assert_timeout(&miss, "database-timeout", bound);
    assert!(miss.2["detail"].as_str().unwrap().contains("The database (database) did not answer within 500 ms"), "{}", miss.2);
    // While it stays stalled, the instance does not wait for it again.
    let again = timed(&s, "GET", "/v1/records/evicted?consistent=true", None, &[]).await;
    assert_timeout(&again, "database-timeout", Duration::from_millis(400));
    let status = timed(&s, "GET", &format!("/v1/writes/{}", cached_write["id"].as_str().unwrap()), None, &[]).await;
    assert_timeout(&status, "database-timeout", bound);
    // Writes are accepted meanwhile (intake needs only Redis); the processor
    // they wake cannot open the database and leaves them queued.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (code, v) = s.write(json!({"key": "during", "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    eventually("the processor's database calls time out", Duration::from_secs(20), async || logged_timeout(&s, "The database (database)")).await;

    pg.resume();
    // No operator: the shard's doorbell flag expires and resumes it.
    settle_all(&s, &ids).await;
    assert_eq!(s.store.int("SELECT count(*) FROM spillway_writes WHERE key = 'during'").await, Some(20));
    let (code, _, record) = s.call("GET", "/v1/records/during?consistent=true", None, &[]).await;
    assert_eq!((code, &record["value"]["n"]), (200, &json!(20)), "{record}");
    let (code, _, record) = s.call("GET", "/v1/records/evicted", None, &[]).await;
    assert_eq!((code, &record["value"]), (200, &json!({"v": "evicted"})), "{record}");
}

/// Whether a component logged a JSON line that `matches`.
fn logged(s: &Spillway, matches: impl Fn(&Value) -> bool) -> bool {
    s.app.guest_output().lines().filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok()).any(|l| matches(&l))
}

/// Whether a component logged a call to `backend` that ran out of time.
fn logged_timeout(s: &Spillway, backend: &str) -> bool {
    logged(s, |l| l["event"] == "timeout" && l["backend"] == backend)
}

/// Waits, without waking anything, until every write of `ids` is applied.
async fn settle_all(s: &Spillway, ids: &[String]) {
    for id in ids {
        eventually("every write accepted during the stall is applied, with no operator", Duration::from_secs(60), async || {
            let (_, _, v) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
            v["status"] == "applied"
        })
        .await;
    }
}

/// The database stalls in the middle of a processor's round (another
/// transaction holds Spillway's tables): the round's statement is abandoned
/// at its deadline, the shard's lease is given up while the stall lasts (no
/// holder outlives its round), nothing is dead-lettered, and once the tables
/// are free every write is applied exactly once with no operator.
async fn a_processor_stalled_mid_round_gives_up_and_resumes(engine: crate::spillway::Engine) {
    let vars = [("call_timeout_ms", "500"), ("request_timeout_ms", "1500"), ("lease_ttl_ms", "2000")];
    let s = Spillway::builder().engine(engine).vars(&vars).with_trigger().start().await;
    let (code, v) = s.write(json!({"key": "n", "op": "put", "value": {"n": 0}})).await;
    assert_eq!(code, 202, "{v}");
    s.settled(v["id"].as_str().unwrap()).await;

    // The stall: a transaction of the test's own holds every table.
    let holder = Holder::take(&s).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (code, v) = s.write(json!({"key": "n", "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let lease = layout().lease(layout().shard_of("n"));
    let mut redis = s.redis.conn();
    let given_up = tokio::time::timeout(Duration::from_secs(20), async {
        // A batch read under the lease, then its apply abandoned at the deadline.
        let mid_round = || logged(&s, |l| l["event"] == "batch_failed" && l["step"] == "apply" && l["error"].as_str().is_some_and(|e| e.contains("did not answer within 500 ms")));
        while !mid_round() || redis::cmd("EXISTS").arg(&lease).query::<bool>(&mut redis).unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(given_up.await.is_ok(), "a round's statement is abandoned and the shard's lease given up; output:\n{}", s.app.guest_output());
    holder.release().await;

    settle_all(&s, &ids).await;
    assert_eq!(s.store.int("SELECT count(*) FROM spillway_writes WHERE key = 'n'").await, Some(21));
    let (code, _, record) = s.call("GET", "/v1/records/n", None, &[]).await;
    assert_eq!((code, &record["value"]["n"]), (200, &json!(20)), "{record}");
    let (_, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(dead["dead"], json!([]), "{dead}");
}

on_both_engines!(a_processor_stalled_mid_round_gives_up_and_resumes);

/// A transaction of the test's own that holds Spillway's tables.
enum Holder {
    Sqlite(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>),
    Postgres(tokio_postgres::Client),
}

impl Holder {
    async fn take(s: &Spillway) -> Self {
        match &s.store {
            crate::spillway::Store::Sqlite(path) => {
                let (locked_tx, locked_rx) = std::sync::mpsc::channel();
                let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
                let path = path.clone();
                let t = std::thread::spawn(move || {
                    let c = rusqlite::Connection::open(path).unwrap();
                    c.execute_batch("BEGIN EXCLUSIVE").unwrap();
                    locked_tx.send(()).unwrap();
                    let _ = release_rx.recv();
                    c.execute_batch("COMMIT").unwrap();
                });
                locked_rx.recv().unwrap();
                Self::Sqlite(release_tx, t)
            }
            crate::spillway::Store::Postgres(db) => {
                let c = crate::pg::client(db).await;
                c.batch_execute("BEGIN; LOCK TABLE spillway_records, spillway_writes, spillway_fences IN ACCESS EXCLUSIVE MODE").await.unwrap();
                Self::Postgres(c)
            }
        }
    }

    async fn release(self) {
        match self {
            Self::Sqlite(tx, t) => {
                tx.send(()).unwrap();
                t.join().unwrap();
            }
            Self::Postgres(c) => c.batch_execute("COMMIT").await.unwrap(),
        }
    }
}

/// The key-value store's server paused, then dead: reads go around the cache
/// to the database within the deadline (single, many, at a version); writes
/// accepted meanwhile are applied once it is back, and read from the cache
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn reads_go_around_a_stalled_or_dead_cache_store() {
    let kv = Redis::start();
    let s = Spillway::builder().kv_at(kv.url()).vars(&[("call_timeout_ms", CALL_MS), ("request_timeout_ms", REQUEST_MS)]).start().await;
    let (code, v) = s.write(json!({"key": "k", "op": "put", "value": {"v": 1}})).await;
    assert_eq!(code, 202, "{v}");
    s.drain().await;
    let (code, _, r) = s.call("GET", "/v1/records/k", None, &[]).await;
    assert_eq!((code, &r["version"]), (200, &json!(1)), "{r}");
    let bound = Duration::from_millis(1000) + SLACK;

    for outage in ["paused", "dead"] {
        match outage {
            "paused" => kv.pause(),
            _ => kv.kill(),
        }
        let one = timed(&s, "GET", "/v1/records/k", None, &[]).await;
        assert_eq!((one.0, &one.2["value"]), (200, &json!({"v": 1})), "{outage}: {}", one.2);
        assert!(one.3 < bound, "{outage}: {:?}", one.3);
        let many = timed(&s, "POST", "/v1/records:get", Some(json!({"keys": ["k", "absent"]})), &[]).await;
        assert_eq!((many.0, &many.2["records"][0]["value"], &many.2["absent"]), (200, &json!({"v": 1}), &json!(["absent"])), "{outage}: {}", many.2);
        assert!(many.3 < bound, "{outage}: {:?}", many.3);
        let at = timed(&s, "GET", "/v1/records/k?min_version=1", None, &[]).await;
        assert_eq!(at.0, 200, "{outage}: {}", at.2);
        assert!(at.3 < bound, "{outage}: {:?}", at.3);
        match outage {
            "paused" => kv.resume(),
            _ => kv.restart(),
        }
    }
    // A write while the store is dead is applied once it is back, and the
    // cache then serves it (read-your-writes: `applied` after the refresh).
    kv.kill();
    let (code, v) = s.write(json!({"key": "k", "op": "put", "value": {"v": 2}})).await;
    assert_eq!(code, 202, "{v}");
    let out = s.drain().await;
    assert!(!out["errors"].as_array().unwrap().is_empty(), "the refresh fails while the store is down: {out}");
    let (_, _, status) = s.call("GET", &format!("/v1/writes/{}", v["id"].as_str().unwrap()), None, &[]).await;
    assert_eq!(status["status"], "pending", "not applied for readers until the cache has it: {status}");
    kv.restart();
    let id = v["id"].as_str().unwrap().to_owned();
    eventually("the write is applied once the store is back", Duration::from_secs(30), async || {
        s.drain().await;
        let (_, _, v) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        v["status"] == "applied"
    })
    .await;
    let (code, _, r) = s.call("GET", "/v1/records/k", None, &[]).await;
    assert_eq!((code, &r["value"], &r["version"]), (200, &json!({"v": 2}), &json!(2)), "{r}");
    assert_eq!(s.store.int("SELECT count(*) FROM spillway_writes WHERE key = 'k'").await, Some(2));
}
