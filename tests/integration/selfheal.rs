use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::processes::{Conn, manifests, spawn, try_spawn};
use crate::spillway::{Spillway, batch_of_incr, burst};
use crate::support::{AOF_ALWAYS, Redis, fixtures};

/// Writes applied so far, read from the database (never through the app, which
/// would be traffic).
fn total_applied(db: &rusqlite::Connection) -> i64 {
    db.query_row("SELECT coalesce(sum(json_extract(value, '$.n')), 0) FROM spillway_records", [], |r| r.get(0)).unwrap_or(0)
}

/// Waits (bounded) until the counters in `db` add up to `n`; returns how long it took.
async fn wait_total(db: &rusqlite::Connection, n: i64, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let total = total_applied(db);
        assert!(total <= n, "{total} increments applied for {n} accepted: something was applied twice");
        if total == n {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "only {total} of {n} writes applied after {bound:?}, with no further traffic");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes accepted while no processor listens lose their doorbell (pub/sub is at
/// most once) and leave the flags set; once a processor subscribes, the flags'
/// expiry events resume every shard and everything is applied, with no request
/// sent after the writes.
#[tokio::test(flavor = "multi_thread")]
async fn lost_doorbells_are_answered_without_traffic() {
    let ttl = 500;
    let s = Spillway::builder().vars(&[("lease_ttl_ms", "500")]).start().await;
    for r in 0..10 {
        let (code, v) = s.write(batch_of_incr(r * 100, 100, 100)).await;
        assert_eq!(code, 202, "{v}");
    }
    let rung: usize = (0..16).map(|i| redis::cmd("EXISTS").arg(crate::support::layout().bell(i)).query::<usize>(&mut s.redis.conn()).unwrap()).sum();
    assert!(rung > 0, "the doorbell flags are set, their rings lost");
    s.start_trigger().await;
    let took = wait_total(&s.db(), 1000, Duration::from_secs(30)).await;
    let bound = Duration::from_millis(ttl + 2000);
    eprintln!("lost doorbells: all applied {took:?} after the processor subscribed (flag TTL {ttl}ms)");
    assert!(took <= bound, "applied after {took:?}, more than the flag TTL + 2 s");
}

/// The processor process is SIGKILLed while it holds a shard's lease during a
/// load and restarted (as a supervisor would); no request is sent after the load.
/// Every shard left with queued writes is resumed within the lease TTL + 2 s of the
/// crash (by the expiry of the dead holder's lease and of the doorbell flags whose
/// rings died with it; by the shard's watch if the restart missed those), and every
/// accepted write is applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn killed_processor_is_resumed_without_traffic() {
    resume_after_kill(vec![Redis::start()], &[]).await;
}

/// The same on a three-master Redis Cluster, the app given one seed node (which
/// its Redis trigger listens to). A node publishes only its own keys'
/// expired-key events, so the shards on the two other nodes are resumed
/// through their leases' and flags' mirrors on the seed, within 1.5 lease TTLs
/// + 2 s; with the watch (restart too late for those) as before. Only those
/// nodes' shards are written to: an event of the seed's own would have the
/// processor look at every shard.
#[tokio::test(flavor = "multi_thread")]
async fn killed_processor_is_resumed_without_traffic_on_a_cluster() {
    resume_after_kill(Redis::start_cluster(3, 0), &crate::cluster::CLUSTER_VARS).await;
}

/// The kill run on `nodes` (the first is the app's `redis_address`).
async fn resume_after_kill(nodes: Vec<Redis>, extra: &[(&str, &str)]) {
    fixtures();
    const CLIENTS: usize = 8;
    const WRITES: usize = CLIENTS * 40 * 100;
    let ttl = Duration::from_millis(2000);
    let redis = &nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (front_toml, processor_toml) = manifests(dir.path());
    let mut vars = vec![("lease_ttl_ms", "2000"), ("batch_size", "50")];
    vars.extend_from_slice(extra);
    let front = spawn(&front_toml, &state, &redis.url(), &vars, false);
    let mut processor = spawn(&processor_toml, &state, &redis.url(), &vars, true);

    // Each shard's node (one server: the only one).
    let owner: Vec<usize> = if nodes.len() == 1 {
        vec![0; 16]
    } else {
        let owners = crate::cluster::owners(redis);
        owners.iter().map(|o| nodes.iter().position(|n| *o == format!("127.0.0.1:{}", n.port)).expect("an owner among the nodes")).collect()
    };
    // On a cluster, only keys of shards on the other nodes: no expiry of the
    // seed's own (whose event would have the processor look at every shard)
    // resumes them.
    let keys: Arc<Vec<String>> = Arc::new((0..1000).map(|k| format!("k{k}")).filter(|k| nodes.len() == 1 || owner[crate::support::layout().shard_of(k) as usize] != 0).collect());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let port = front.port;
        let keys = keys.clone();
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(port).await;
            for r in 0..WRITES / CLIENTS / 100 {
                let from = (c * 1000 + r) * 100;
                let writes: Vec<_> = (from..from + 100).map(|i| json!({"key": keys[i % keys.len()], "op": "incr", "field": "n"})).collect();
                let body = json!({ "writes": writes }).to_string();
                let (status, reply) = conn.request("POST", "/v1/writes", "", &body).await;
                assert_eq!(status, 202, "{reply}");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let mut conns: Vec<redis::Connection> = nodes.iter().map(Redis::conn).collect();
    let xlen = |conns: &mut [redis::Connection], shard: usize| -> usize { redis::cmd("XLEN").arg(crate::support::layout().stream(shard as u32)).query(&mut conns[owner[shard]]).unwrap() };
    // Kill it while it holds a lease, mid-drain.
    let deadline = Instant::now() + Duration::from_secs(30);
    let holding = loop {
        let leases: Vec<String> = conns.iter_mut().flat_map(|c| redis::cmd("KEYS").arg("spillway:{s*}:lease").query::<Vec<String>>(c).unwrap()).collect();
        if !leases.is_empty() {
            break leases;
        }
        assert!(Instant::now() < deadline, "the processor never took a lease");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    processor.kill();
    let killed = Instant::now();
    let mut left: Vec<(usize, usize)> = (0..16).map(|s| (s, xlen(&mut conns, s))).filter(|(_, n)| *n > 0).collect();
    let queued: usize = left.iter().map(|(_, n)| n).sum();
    let elsewhere = left.iter().filter(|(s, _)| owner[*s] != 0).count();
    eprintln!("SIGKILL while holding {holding:?}: {queued} writes queued in {} shards, {elsewhere} of them not on the seed", left.len());
    assert!(queued > 0, "killed with work left");
    if nodes.len() > 1 {
        assert_eq!(elsewhere, left.len(), "work left on the nodes the trigger does not listen to, and only there");
    }
    processor = spawn(&processor_toml, &state, &redis.url(), &vars, true);
    let restarted = killed.elapsed();

    // Resumed: each shard's queue has moved since the crash.
    while !left.is_empty() {
        assert!(killed.elapsed() < Duration::from_secs(60), "shards {left:?} never resumed, with no further traffic");
        left.retain(|(s, n)| xlen(&mut conns, *s) >= *n);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resumed = killed.elapsed();
    let db = rusqlite::Connection::open(state.join("sqlite_db.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let took = wait_total(&db, WRITES as i64, Duration::from_secs(120)).await + resumed;
    eprintln!("killed processor: restarted after {restarted:?}, every shard resumed after {resumed:?}, all applied after {took:?} (lease TTL {ttl:?})");
    // A mirror lives 1.5 lease TTLs.
    let heard = if nodes.len() > 1 { ttl * 3 / 2 } else { ttl };
    let bound = if restarted < heard { heard + Duration::from_secs(2) } else { 3 * ttl + Duration::from_secs(2) };
    assert!(resumed <= bound, "resumed {resumed:?} after the crash; bound {bound:?}");
    let outcomes: i64 = db.query_row("SELECT count(*) FROM spillway_writes WHERE status = 'applied'", [], |r| r.get(0)).unwrap();
    assert_eq!(outcomes, WRITES as i64, "one outcome per accepted write");
    drop(processor);
}

/// A fresh app, before anything was ever applied (no tables yet), answers 404 for
/// a record and `pending` for a queued write, as it must on Spin, where the missing
/// table is reported with the rows rather than at the call.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_app_answers_404_and_pending() {
    let s = Spillway::builder().start().await;
    let (code, _, p) = s.call("GET", "/v1/records/never-written", None, &[]).await;
    assert_eq!((code, p["type"].as_str()), (404, Some("https://spillway.dev/problems/not-found")), "{p}");
    let (code, v) = s.write(json!({"key": "k", "op": "put", "value": 1})).await;
    assert_eq!(code, 202, "{v}");
    let (code, _, st) = s.call("GET", &format!("/v1/writes/{}", v["id"].as_str().unwrap()), None, &[]).await;
    assert_eq!((code, st["status"].as_str()), (200, Some("pending")), "{st}");
    let (code, _, _) = s.call("GET", "/v1/writes/3-1-0", None, &[]).await;
    assert_eq!(code, 404);
    let tables: i64 = s.db().query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0)).unwrap_or(0);
    assert_eq!(tables, 0, "nothing was applied, no tables were made");
}

/// With a 1 s retention, 100,000 writes leave a bounded number of outcome rows:
/// the processor prunes outcomes older than the retention (and older than every
/// entry still queued) as it goes, while the newest outcomes stay queryable.
#[tokio::test(flavor = "multi_thread")]
async fn outcomes_are_pruned_after_the_retention() {
    const WRITES: usize = 100_000;
    let s = std::sync::Arc::new(Spillway::builder().vars(&[("status_retention_secs", "1")]).with_trigger().start().await);
    let accepted = burst(&s, WRITES, 1000).await;
    let last = accepted.last().unwrap()["writes"][99]["id"].as_str().unwrap().to_owned();
    wait_total(&s.db(), WRITES as i64, Duration::from_secs(120)).await;
    let rows: i64 = s.db().query_row("SELECT count(*) FROM spillway_writes", [], |r| r.get(0)).unwrap();
    eprintln!("retention 1 s: {rows} outcome rows left of {WRITES} writes");
    assert!(rows < (WRITES as i64) * 3 / 4, "{rows} outcome rows for {WRITES} writes");
    let st = s.settled(&last).await;
    assert_eq!(st["status"], "applied", "the newest outcomes are kept: {st}");
    // Redis holds nothing that grows with the number of writes: once the queue is
    // empty, every key without a TTL is a shard's stream (empty), fencing counter, stats hash,
    // dead-letter stream or capped notice stream; the rest (leases, watches, fill
    // locks, ...) expire.
    let mut c = s.redis.conn();
    crate::support::eventually("every queued write applied", Duration::from_secs(60), async || {
        (0..16).map(|i| redis::cmd("XLEN").arg(crate::support::layout().stream(i)).query::<usize>(&mut c).unwrap()).sum::<usize>() == 0
    })
    .await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    let mut lasting = 0;
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut c).unwrap();
        if ttl == -1 {
            assert!(
                [":stream", ":fence", ":dead", ":done", ":stats", "cache-stats"].iter().any(|end| k.ends_with(end)),
                "{k} has no TTL"
            );
            if k.ends_with(":stats") {
                let fields: usize = redis::cmd("HLEN").arg(k).query(&mut c).unwrap();
                assert!(fields <= 40, "{k}: the counters keep only the last minute's buckets ({fields} fields)");
            }
            lasting += 1;
        }
    }
    assert!(lasting <= 16 * 5 + 1, "{lasting} keys without a TTL");
    let notices: usize = (0..16).map(|i| redis::cmd("XLEN").arg(crate::support::layout().done(i)).query::<usize>(&mut c).unwrap()).max().unwrap_or(0);
    assert!(notices < 1000, "the outcome notices are capped ({notices})");
}

/// A retention reaching back before 2001 (a "keep forever" value) forgets no
/// outcome: write ids compare as text, and a bound of 12-digit milliseconds
/// would sort after every id of its shard. Regression: each round forgot its
/// shard's outcomes, its own included.
#[tokio::test(flavor = "multi_thread")]
async fn a_retention_reaching_before_2001_forgets_no_outcome() {
    let s = Spillway::builder().vars(&[("status_retention_secs", "999999999")]).start().await;
    for _ in 0..3 {
        let (code, v) = s.write(json!({"key": "k", "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        s.drain().await;
    }
    let rows: i64 = s.db().query_row("SELECT count(*) FROM spillway_writes", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 3, "every outcome kept");
}

/// Redis settings that would lose or strand writes are reported (in the drain reply
/// and once on the processor's stderr), and expired-key events are turned on.
#[tokio::test(flavor = "multi_thread")]
async fn redis_hazards_are_reported_and_expiry_events_turned_on() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("allkeys-lru").query(&mut c).unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("").query(&mut c).unwrap();
    let s = Spillway::builder().redis(redis).start().await;
    let (code, _, out) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(code, 200, "{out}");
    let warnings: Vec<String> = serde_json::from_value(out["warnings"].clone()).unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("maxmemory-policy is allkeys-lru"), "{warnings:?}");
    assert!(warnings[1].contains("appendonly is off"), "{warnings:?}");
    let flags: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query(&mut s.redis.conn()).unwrap();
    assert!(flags[1].contains('E') && flags[1].contains('x'), "{flags:?}");
    let logged = s.app.guest_output();
    assert_eq!(logged.matches("spillway: warning: Redis maxmemory-policy").count(), 1, "{logged}");
}

/// Redis is SIGKILLed during a load of single writes and restarted with its AOF
/// (`appendfsync always`); the processor, whose Redis trigger ends with the
/// connection, is restarted as a supervisor would. Clients retry each write with its
/// `Idempotency-Key` until they get 202. Every write acknowledged with 202 is
/// applied exactly once, with no drain call.
#[tokio::test(flavor = "multi_thread")]
async fn redis_restart_loses_and_doubles_nothing() {
    fixtures();
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 400;
    const KEYS: usize = 50;
    let redis = Redis::start_with(AOF_ALWAYS);
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (front_toml, processor_toml) = manifests(dir.path());
    let vars = [("lease_ttl_ms", "1000")];
    let front = spawn(&front_toml, &state, &url, &vars, false);

    // The supervisor: start the processor again whenever it has exited.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restarts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The first processor is up before the load starts (then the kill ends it).
    let first = spawn(&processor_toml, &state, &url, &vars, true);
    let supervisor = {
        let (stop, restarts, state, url) = (stop.clone(), restarts.clone(), state.clone(), url.clone());
        std::thread::spawn(move || {
            let mut p = Some(first);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if p.as_mut().is_none_or(|h| h.child.try_wait().unwrap().is_some()) {
                    std::thread::sleep(Duration::from_millis(100));
                    // It exits again at once while Redis is down.
                    p = try_spawn(&processor_toml, &state, &url, &vars, true).ok();
                    restarts.fetch_add(usize::from(p.is_some()), std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (port, sent) = (front.port, sent.clone());
        clients.push(tokio::spawn(async move {
            let mut accepted = vec![0i64; KEYS];
            let mut conn = Conn::open(port).await;
            for i in 0..PER_CLIENT {
                let key = (c * 31 + i) % KEYS;
                let body = format!(r#"{{"key":"k{key}","op":"incr","field":"n"}}"#);
                let header = format!("idempotency-key: w-{c}-{i}\r\n");
                loop {
                    match conn.try_request("POST", "/v1/writes", &header, &body).await {
                        Ok((202, _)) => break,
                        Ok((503, _)) => {}
                        Ok((status, reply)) => panic!("{status}: {reply}"),
                        Err(_) => conn = Conn::open(port).await,
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                accepted[key] += 1;
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            accepted
        }));
    }
    while sent.load(std::sync::atomic::Ordering::SeqCst) < CLIENTS * PER_CLIENT / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    redis.kill();
    eprintln!("SIGKILL redis at {} accepted", sent.load(std::sync::atomic::Ordering::SeqCst));
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let mut expected = vec![0i64; KEYS];
    for c in clients {
        for (k, n) in c.await.unwrap().into_iter().enumerate() {
            expected[k] += n;
        }
    }
    let db = rusqlite::Connection::open(state.join("sqlite_db.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    wait_total(&db, (CLIENTS * PER_CLIENT) as i64, Duration::from_secs(60)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    supervisor.join().unwrap();
    assert!(restarts.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the processor exited with its trigger and was restarted");
    for (k, n) in expected.iter().enumerate() {
        let v: i64 = db.query_row("SELECT json_extract(value, '$.n') FROM spillway_records WHERE key = ?1", [format!("k{k}")], |r| r.get(0)).unwrap();
        assert_eq!(v, *n, "k{k}");
    }
}
