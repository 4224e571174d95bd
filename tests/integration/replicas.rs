//! Replica acknowledgement (`min_replicas`): intake answers 202 only once a
//! replica holds the writes (Redis `WAIT`), so a failover to that replica loses
//! none of them; without it, the replica's lag is lost, and the test says how
//! much.

use std::time::Duration;

use serde_json::{Value, json};

use crate::spillway::Spillway;
use crate::support::{AOF_ALWAYS, Redis, layout};

/// Whether `redis` holds write `id` in its shard's stream.
fn holds(redis: &Redis, id: &str) -> bool {
    let parsed = spillway_core::layout::WriteId::parse(id).expect("a write id");
    let found: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(layout().stream(parsed.shard)).arg(&parsed.entry).arg(&parsed.entry).query(&mut redis.conn()).unwrap();
    !found.is_empty()
}

/// A 202 means the replica has the write; with the replica paused the answer
/// is a 503 saying the outcome is unknown, and a retry with the same key once
/// it is back is a 202 for the same write, applied once.
#[tokio::test(flavor = "multi_thread")]
async fn a_202_waits_for_the_replica_and_a_retry_settles_what_it_had_not_confirmed() {
    let primary = Redis::start_secured();
    let replica = Redis::start_replica_of(&primary);
    let s = Spillway::builder().redis(primary).vars(&[("min_replicas", "1"), ("replica_timeout_ms", "300")]).start().await;
    let (code, v) = s.write(json!({"key": "a", "op": "put", "value": 1})).await;
    assert_eq!(code, 202, "{v}");
    assert!(holds(&replica, v["id"].as_str().unwrap()), "answered 202 before the replica had the write");

    replica.pause();
    let write = json!({"key": "counter", "op": "incr", "field": "n", "by": 1});
    let started = std::time::Instant::now();
    let (code, h, v) = s.call("POST", "/v1/writes", Some(write.clone()), &[("idempotency-key", "rep-1")]).await;
    assert_eq!((code, v["type"].as_str()), (503, Some("https://spillway.dev/problems/outcome-unknown")), "{v}");
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(v["detail"].as_str().unwrap().contains("0 of the 1 replicas"), "{v}");
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_millis(2500), "{:?}", started.elapsed());

    replica.resume();
    let (code, h, v) = s.call("POST", "/v1/writes", Some(write.clone()), &[("idempotency-key", "rep-1")]).await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(h.get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"), "the write stored before is the one answered");
    let id = v["id"].as_str().unwrap().to_owned();
    assert!(holds(&replica, &id));
    s.drain().await;
    assert_eq!(s.settled(&id).await["status"], "applied");
    assert_eq!(s.store.int("SELECT count(*) FROM spillway_writes WHERE key = 'counter'").await, Some(1));
}

/// The failover the issue describes: the replica falls behind (cut off from
/// the primary; a SIGSTOP would not do: what the primary sent waits in the
/// replica's socket and is applied when it resumes), writes go on, the primary
/// is SIGKILLed with the processor not running, the replica is promoted and the
/// app pointed at it. Returns (answered 202, of those applied after the
/// failover).
async fn failover(min_replicas: &str) -> (usize, usize) {
    let primary = Redis::start_with(AOF_ALWAYS);
    let mut replica = Redis::start_replica_of(&primary);
    let vars = [("min_replicas", min_replicas), ("replica_timeout_ms", "200")];
    let s = Spillway::builder().redis(primary).vars(&vars).start().await;
    let mut acknowledged = Vec::new();
    let mut write = async |i: usize| {
        let (code, v) = s.write(json!({"key": format!("k{i}"), "op": "put", "value": i})).await;
        match code {
            202 => acknowledged.push(v["id"].as_str().unwrap().to_owned()),
            503 => assert_eq!(v["type"], "https://spillway.dev/problems/outcome-unknown", "{v}"),
            _ => panic!("{code} {v}"),
        }
    };
    for i in 0..20 {
        write(i).await;
    }
    // Everything so far on the replica (a write of the test's own, and WAIT
    // on its connection), then it falls behind.
    let mut c = s.redis.conn();
    let _: () = redis::cmd("SET").arg("test:marker").arg(1).query(&mut c).unwrap();
    let synced: i64 = redis::cmd("WAIT").arg(1).arg(10_000).query(&mut c).unwrap();
    assert_eq!(synced, 1, "the replica caught up");
    replica.detach();
    for i in 20..40 {
        write(i).await;
    }
    s.redis.kill();
    replica.promote();
    drop(s);
    let after = Spillway::builder().redis(replica).vars(&vars).start().await;
    after.drain().await;
    let mut applied = 0;
    for id in &acknowledged {
        let (_, _, v) = after.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        if v["status"] == "applied" {
            applied += 1;
        }
    }
    (acknowledged.len(), applied)
}

/// With `min_replicas=1` no write answered 202 is lost in the failover (the
/// writes made while the replica was behind were answered 503, not 202).
#[tokio::test(flavor = "multi_thread")]
async fn a_failover_loses_no_acknowledged_write_with_min_replicas() {
    let (acknowledged, applied) = failover("1").await;
    assert_eq!(acknowledged, 20, "only the writes the replica confirmed are answered 202");
    assert_eq!(applied, acknowledged, "lost {} acknowledged writes", acknowledged - applied);
}

/// Without it, the writes of the replica's lag were answered 202 and are lost:
/// the window an operator accepts with `min_replicas=0` (and what the test
/// above would catch).
#[tokio::test(flavor = "multi_thread")]
async fn without_min_replicas_a_failover_loses_the_replicas_lag() {
    let (acknowledged, applied) = failover("0").await;
    assert_eq!(acknowledged, 40);
    assert_eq!(acknowledged - applied, 20, "the writes made while the replica was behind");
}

/// `min_replicas` asks for more replicas than there are: every write is a 503
/// that changes nothing a retry cannot settle, never a 202. Each 503 is
/// counted (`intake_refused`, `spillway_intake_refused_total`) by the
/// instance's next write.
#[tokio::test(flavor = "multi_thread")]
async fn asking_for_more_replicas_than_exist_never_answers_202() {
    let s = Spillway::builder().vars(&[("min_replicas", "2"), ("replica_timeout_ms", "100")]).start().await;
    for i in 0..3 {
        let (code, v) = s.write(json!({"key": "x", "op": "put", "value": i})).await;
        assert_eq!((code, &v["type"]), (503, &Value::from("https://spillway.dev/problems/outcome-unknown")), "{v}");
        assert!(v["detail"].as_str().unwrap().contains("0 of the 2 replicas"), "{v}");
    }
    let (code, _, stats) = s.admin("GET", "/v1/stats", None).await;
    assert_eq!(code, 200, "{stats}");
    assert_eq!(stats["intake_refused"]["outcome-unknown"], 2, "the first two, counted by the writes after them: {stats}");
    assert_eq!(stats["intake_refused"]["queue-full"], 0, "{stats}");
}

/// A failover to a replica that lagged while the processor went on applying:
/// the new primary's stream ids restart below the ones the database recorded,
/// and its fencing counters are behind the database's fences. The old
/// primary's clock ran ahead of the replica's (modelled by setting its stream's
/// last id 60 s ahead, which is what such a clock gives `XADD *`), so the new
/// primary hands out again the very ids of the writes applied during the lag.
/// The processor must neither skip a new write that got an old one's id, nor
/// apply again an old write the new primary still holds, nor stall on the
/// fence: every acknowledged write is in the key's log, once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_failover_whose_stream_ids_and_fences_go_back_neither_skips_nor_stalls() {
    let primary = Redis::start_with(AOF_ALWAYS);
    let mut replica = Redis::start_replica_of(&primary);
    let db = crate::pg::PgDb::create_secured();
    let s = Spillway::builder().redis(primary).pg(db.clone()).start().await;
    let key = "failover-log";
    let stream = layout().stream(layout().shard_of(key));
    let mut c = s.redis.conn();
    let ahead = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 60_000;
    let _: String = redis::cmd("XADD").arg(&stream).arg(format!("{ahead}-0")).arg("w").arg("{}").query(&mut c).unwrap();
    let _: i64 = redis::cmd("XDEL").arg(&stream).arg(format!("{ahead}-0")).query(&mut c).unwrap();
    let mut sent = Vec::new();
    let append = async |s: &Spillway, sent: &mut Vec<(String, String)>, token: String| {
        let (code, v) = s.write(json!({"key": key, "op": "append", "field": "log", "value": token})).await;
        assert_eq!(code, 202, "{v}");
        sent.push((token, v["id"].as_str().unwrap().to_owned()));
    };
    // Before the lag: on the replica too.
    for i in 0..5 {
        append(&s, &mut sent, format!("before-{i}")).await;
    }
    let synced: i64 = redis::cmd("WAIT").arg(1).arg(10_000).query(&mut c).unwrap();
    assert_eq!(synced, 1, "the replica caught up");
    replica.detach();
    // During the lag: applied one by one (each round a new lease, so a new
    // fencing token the replica never sees), the first round applying the
    // writes from before the lag, whose acknowledgements the replica misses.
    for i in 0..5 {
        append(&s, &mut sent, format!("lag-{i}")).await;
        s.drain().await;
    }
    let s = s;
    s.redis.kill();
    replica.promote();
    drop(s);
    let after = Spillway::builder().redis(replica).pg(db).start().await;
    for i in 0..5 {
        append(&after, &mut sent, format!("after-{i}")).await;
    }
    let lag_ids: Vec<&str> = sent[5..10].iter().map(|(_, id)| id.as_str()).collect();
    let reused = sent[10..].iter().filter(|(_, id)| lag_ids.contains(&id.as_str())).count();
    eprintln!("failover: {reused} of the 5 writes after it got the id of a write applied during the lag");
    // A few rounds at most: the first may find its fence behind the
    // database's and must not leave the shard stuck there.
    for _ in 0..3 {
        after.drain().await;
    }
    let (_, _, v) = after.call("GET", &format!("/v1/records/{key}?consistent=true"), None, &[]).await;
    let log: Vec<&str> = v["value"]["log"].as_array().map(|a| a.iter().filter_map(|t| t.as_str()).collect()).unwrap_or_default();
    let expected: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(log, expected, "every acknowledged write once, in order");
    for (token, id) in &sent[10..] {
        let (_, _, v) = after.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        assert_eq!(v["status"], "applied", "{token} ({id}): {v}");
    }
}

/// An operator's replay of dead letters adds them as intake adds a request's
/// writes: the first new id's sequence part starts at a random number, not at
/// 0 or the stream's last one plus one, which is what `XADD *` gives and what
/// repeats, after a failover to a lagging replica, the ids of writes the
/// database already recorded (the replayed write would be skipped as a
/// redelivery). Also past a last id ahead of the clock.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_dead_letter_gets_an_id_no_earlier_write_can_have() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = layout();
    let shard = 2;
    let replay = |c: &mut redis::Connection, seq_start: u32| -> Vec<String> {
        let _: String = redis::cmd("XADD").arg(l.dead(shard)).arg("*").arg("id").arg(format!("{shard}-5-0")).arg("w").arg("{}").arg("error").arg("e").arg("attempts").arg(5).query(c).unwrap();
        crate::support::invoke(c, &spillway_core::call::Call::replay(&l, shard, 0, 5000, 60_000, seq_start, []))
    };
    let first = replay(&mut c, 123_456);
    assert_eq!(first[0], "2-5-0");
    assert!(first[1].starts_with("2-") && first[1].ends_with("-123456"), "the new id starts at the random number: {first:?}");
    // The stream's last id 60 s ahead (a primary whose clock ran ahead).
    let ahead = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 60_000;
    let _: String = redis::cmd("XADD").arg(l.stream(shard)).arg(format!("{ahead}-7")).arg("w").arg("{}").query(&mut c).unwrap();
    let second = replay(&mut c, 1_000);
    assert_eq!(second[1], format!("2-{ahead}-{}", 7 + 1 + 1_000), "past the last id, by the random number: {second:?}");
}
