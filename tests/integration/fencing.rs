use std::time::{Duration, Instant};

use redis::Script;
use spillway_core::call::{BatchLimits, Call};
use spillway_core::layout::Layout;
use spillway_core::scripts;
use spillway_core::sql::postgres::DIALECT as PG;
use spillway_core::sql::sqlite as sql;

use crate::pg::PgDb;
use crate::support::Redis;

/// The shard these tests use.
const SHARD: u32 = 3;

/// `LEASE_ACQUIRE` on [`SHARD`] for `token`: its fencing token, or 0.
fn acquire(c: &mut redis::Connection, l: &Layout, token: &str, ttl_ms: u64) -> i64 {
    Script::new(scripts::LEASE_ACQUIRE).key(l.lease(SHARD)).key(l.fence(SHARD)).arg(token).arg(ttl_ms).arg("0").invoke(c).unwrap()
}

/// `READ_BATCH` on [`SHARD`] for `token`: up to `count` entries, resuming after
/// `resume` (`"0"`: from the start of what is pending; `""`: new entries).
fn read_batch<T: redis::FromRedisValue>(c: &mut redis::Connection, l: &Layout, token: &str, count: usize, resume: &str) -> T {
    let limits = BatchLimits { count, bytes: 0, max_attempts: 5, lease_ttl_ms: 60_000, retention_ms: 1000 };
    crate::support::invoke(c, &Call::read_batch(l, SHARD, token, limits, Some(resume)))
}

/// The fence statement's parameter for one shard (a round's rows: `[[shard, token]]`).
fn fence(shard: i64, token: i64) -> String {
    serde_json::json!([[shard, token]]).to_string()
}

fn commit(db: &mut rusqlite::Connection, shard: i64, token: i64, value: &str) -> bool {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
    let advanced: Option<i64> = tx.query_row(sql::FENCE, [fence(shard, token)], |r| r.get(1)).ok();
    if advanced != Some(token) {
        return false; // dropped: rolled back
    }
    let row = serde_json::json!([["k", value, token, "e", 0, 0, null]]).to_string();
    tx.execute(sql::UPSERT_RECORDS, [row]).unwrap();
    tx.commit().unwrap();
    true
}

/// [`commit`] in PostgreSQL, with the app's statements.
async fn commit_pg(db: &tokio_postgres::Client, shard: i64, token: i64, value: &str) -> bool {
    db.batch_execute(PG.begin).await.unwrap();
    let advanced: Option<i64> = db.query(PG.fence, &[&fence(shard, token)]).await.unwrap().first().map(|r| r.get(1));
    if advanced != Some(token) {
        db.batch_execute(PG.rollback).await.unwrap();
        return false;
    }
    let row = serde_json::json!([["k", value, token, "e", 0, 0, null]]).to_string();
    db.execute(PG.upsert_records, &[&row]).await.unwrap();
    db.batch_execute(PG.commit).await.unwrap();
    true
}

/// The app's schema in a fresh PostgreSQL database; a client to it.
async fn pg_schema() -> (PgDb, tokio_postgres::Client) {
    let db = PgDb::create();
    let c = crate::pg::client(&db).await;
    for stmt in spillway_core::sql::postgres::SCHEMA {
        c.batch_execute(stmt).await.unwrap();
    }
    (db, c)
}

/// A lease holder whose lease expired cannot commit: the new holder has a newer
/// fencing token, the old one can neither renew (reading renews) nor read, and the database refuses
/// its transaction (the real scripts against a real Redis, the real SQL against
/// SQLite and PostgreSQL).
#[tokio::test(flavor = "multi_thread")]
async fn expired_lease_holder_cannot_commit() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = Layout { prefix: "spillway:".into(), shards: 16 };
    let a = acquire(&mut c, &l, "holder-a", 100);
    assert_eq!(a, 1);
    assert_eq!(acquire(&mut c, &l, "holder-b", 5000), 0, "the lease excludes a second holder");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::cmd("EXISTS").arg(l.lease(SHARD)).query::<i64>(&mut c).unwrap() == 1 {
        assert!(Instant::now() < deadline, "the lease never expired");
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = acquire(&mut c, &l, "holder-b", 5000);
    assert_eq!(b, 2, "fencing tokens only grow");

    let ttl_before: i64 = redis::cmd("PTTL").arg(l.lease(SHARD)).query(&mut c).unwrap();
    let read: Vec<String> = read_batch(&mut c, &l, "holder-a", 10, "0");
    assert_eq!(read, vec!["lost"]);
    let ttl_after: i64 = redis::cmd("PTTL").arg(l.lease(SHARD)).query(&mut c).unwrap();
    assert!(ttl_after <= ttl_before && ttl_after <= 5000, "an expired holder's read does not renew the new holder's lease");
    let released: i64 = Script::new(scripts::LEASE_RELEASE).key(l.lease(SHARD)).key(l.watch(SHARD)).arg("holder-a").arg(0).arg(0).invoke(&mut c).unwrap();
    assert_eq!(released, 0, "an expired holder cannot release the new holder's lease");

    let dir = tempfile::tempdir().unwrap();
    let mut db = rusqlite::Connection::open(dir.path().join("db.sqlite")).unwrap();
    for stmt in sql::SCHEMA_STATEMENTS {
        db.execute(stmt, []).unwrap();
    }
    assert!(commit(&mut db, 3, b, "\"from b\""));
    assert!(!commit(&mut db, 3, a, "\"from a\""), "the stale holder's commit is refused");
    let value: String = db.query_row("SELECT value FROM spillway_records WHERE key = 'k'", [], |r| r.get(0)).unwrap();
    assert_eq!(value, "\"from b\"");

    let (_pg, c) = pg_schema().await;
    assert!(commit_pg(&c, 3, b, "\"from b\"").await);
    assert!(!commit_pg(&c, 3, a, "\"from a\"").await, "the stale holder's commit is refused");
    let value: String = c.query_one("SELECT value FROM spillway_records WHERE key = 'k'", &[]).await.unwrap().get(0);
    assert_eq!(value, "\"from b\"");
}

/// PostgreSQL runs transactions at once (SQLite one at a time): when a stale
/// holder and the new one overlap, the fence row's lock orders them. A stale
/// holder that fences after the new one waits for it and is then refused; one
/// that fenced first commits before the new holder goes on, and the new holder
/// reads what it wrote.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_fence_orders_overlapping_holders() {
    let (db, new) = pg_schema().await;
    let stale = crate::pg::client(&db).await;
    // The new holder (token 2) fences first; the stale one (token 1) waits.
    new.batch_execute(PG.begin).await.unwrap();
    assert_eq!(new.query(PG.fence, &[&fence(3, 2)]).await.unwrap().len(), 1);
    stale.batch_execute(PG.begin).await.unwrap();
    let waiting = tokio::spawn(async move {
        let rows = stale.query(PG.fence, &[&fence(3, 1)]).await.unwrap();
        stale.batch_execute(PG.rollback).await.unwrap();
        rows.len()
    });
    let row = serde_json::json!([["k", "\"from new\"", 2, "e", 0, 0, null]]).to_string();
    new.execute(PG.upsert_records, &[&row]).await.unwrap();
    // The stale holder is blocked on the fence row's lock (seen by the server).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = new.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'", &[]).await.unwrap();
        if row.get::<_, i64>(0) == 1 {
            break;
        }
        assert!(!waiting.is_finished() && Instant::now() < deadline, "the stale holder does not wait on the fence row");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    new.batch_execute(PG.commit).await.unwrap();
    assert_eq!(waiting.await.unwrap(), 0, "then it is refused");

    // The other order: the stale holder (token 3) fenced first and commits; the
    // newer one (token 4) waits, then sees its record.
    let (db, first) = pg_schema().await;
    let second = crate::pg::client(&db).await;
    first.batch_execute(PG.begin).await.unwrap();
    assert_eq!(first.query(PG.fence, &[&fence(3, 3)]).await.unwrap().len(), 1);
    second.batch_execute(PG.begin).await.unwrap();
    let waiting = tokio::spawn(async move {
        let fenced = second.query(PG.fence, &[&fence(3, 4)]).await.unwrap().len();
        let keys = serde_json::json!(["k"]).to_string();
        let seen: Option<String> = second.query(PG.records, &[&keys]).await.unwrap().first().map(|r| r.get(1));
        second.batch_execute(PG.commit).await.unwrap();
        (fenced, seen)
    });
    let row = serde_json::json!([["k", "\"from first\"", 1, "e", 0, 0, null]]).to_string();
    first.execute(PG.upsert_records, &[&row]).await.unwrap();
    first.batch_execute(PG.commit).await.unwrap();
    assert_eq!(waiting.await.unwrap(), (1, Some("\"from first\"".to_owned())));
}

/// A new lease holder resumes every entry a previous holder left pending, in stream
/// order, before any new entry, even when that holder had read ahead (two batches
/// pending). Regression: the first read took one pending batch and then went on with
/// new entries, applying later writes before the second pending batch.
#[test]
fn resume_reads_every_pending_entry_in_order() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = Layout { prefix: "spillway:".into(), shards: 16 };
    let ids: Vec<String> = (0..6).map(|i| redis::cmd("XADD").arg(l.stream(SHARD)).arg("*").arg("w").arg(i.to_string()).query(&mut c).unwrap()).collect();
    let read = |c: &mut redis::Connection, token: &str, resume: &str| -> (String, Vec<String>) {
        let reply: Vec<String> = read_batch(c, &l, token, 2, resume);
        assert_eq!(reply[0], "ok");
        (reply[2].clone(), reply[4..].chunks(4).map(|e| e[0].clone()).collect())
    };
    // Holder A: a first batch, then a read-ahead, then it dies (nothing acknowledged).
    assert!(acquire(&mut c, &l, "a", 60_000) > 0);
    assert_eq!(read(&mut c, "a", "0"), (String::new(), ids[0..2].to_vec()));
    assert_eq!(read(&mut c, "a", ""), (String::new(), ids[2..4].to_vec()));
    let _: () = redis::cmd("DEL").arg(l.lease(SHARD)).query(&mut c).unwrap();
    // Holder B resumes: both pending batches, in order, then the new entries.
    assert!(acquire(&mut c, &l, "b", 60_000) > 0);
    let (cursor, first) = read(&mut c, "b", "0");
    assert_eq!((cursor.as_str(), first), (ids[1].as_str(), ids[0..2].to_vec()));
    let (cursor, second) = read(&mut c, "b", &cursor);
    assert_eq!((cursor.as_str(), second), (ids[3].as_str(), ids[2..4].to_vec()));
    assert_eq!(read(&mut c, "b", &cursor), (String::new(), ids[4..6].to_vec()));
}

/// Blame for a trap: after a careful round's holder dies inside an apply-step
/// call, the next delivery counts an attempt (with the trap as its error)
/// against the writes named in the shard's marker only; a marking by a holder
/// whose lease is gone marks nothing; the marker goes once the pending entries
/// are exhausted. Without a marker every redelivered entry counts.
#[test]
fn blame_markers_count_only_the_call_in_flight() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = Layout { prefix: "spillway:".into(), shards: 16 };
    let ids: Vec<String> = (0..4).map(|i| redis::cmd("XADD").arg(l.stream(SHARD)).arg("*").arg("w").arg(i.to_string()).query(&mut c).unwrap()).collect();
    let read = |c: &mut redis::Connection, token: &str, resume: &str| -> Vec<(String, i64)> {
        let reply: Vec<redis::Value> = read_batch(c, &l, token, 10, resume);
        reply[4..].chunks(4).map(|e| (redis::from_redis_value(e[0].clone()).unwrap(), redis::from_redis_value(e[2].clone()).unwrap())).collect()
    };
    let mark = |c: &mut redis::Connection, token: &str, previous: &[&String], next: &[&String]| -> i64 {
        let script = Script::new(scripts::MARK_CALL);
        let mut call = script.key(l.lease(SHARD));
        call.key(l.applying(SHARD)).arg(token).arg(60_000).arg(60_000).arg(previous.len());
        for id in previous.iter().chain(next) {
            call.arg(id.as_str());
        }
        call.invoke(c).unwrap()
    };
    let attempts = |got: &[(String, i64)]| got.iter().map(|(_, n)| *n).collect::<Vec<_>>();

    // Holder A, first delivery; a careful round marks entry 0's call, then
    // entry 2's (entry 0 leaves the marker), and A dies inside that call.
    assert!(acquire(&mut c, &l, "a", 60_000) > 0);
    assert_eq!(attempts(&read(&mut c, "a", "0")), vec![1, 1, 1, 1]);
    let _: i64 = Script::new(scripts::MARK_ROUND).key(l.applying(SHARD)).arg(60_000).invoke(&mut c).unwrap();
    assert_eq!(mark(&mut c, "a", &[], &[&ids[0]]), 1);
    assert_eq!(mark(&mut c, "a", &[&ids[0]], &[&ids[2]]), 1);
    assert_eq!(mark(&mut c, "stale", &[&ids[2]], &[&ids[1]]), 0, "only the lease holder marks");
    let _: () = redis::cmd("DEL").arg(l.lease(SHARD)).query(&mut c).unwrap();

    // Holder B resumes: only entry 2 counts, with the trap as its error.
    assert!(acquire(&mut c, &l, "b", 60_000) > 0);
    assert_eq!(attempts(&read(&mut c, "b", "0")), vec![1, 1, 2, 1]);
    let err: Option<String> = redis::cmd("HGET").arg(l.attempts(SHARD)).arg(format!("err:{}", ids[2])).query(&mut c).unwrap();
    assert!(err.unwrap_or_default().contains("trapped"));
    let other: Option<String> = redis::cmd("HGET").arg(l.attempts(SHARD)).arg(format!("err:{}", ids[1])).query(&mut c).unwrap();
    assert_eq!(other, None);
    // Pending exhausted: the next read takes new entries and drops the marker.
    assert!(read(&mut c, "b", &ids[3]).is_empty());
    let marker: bool = redis::cmd("EXISTS").arg(l.applying(SHARD)).query(&mut c).unwrap();
    assert!(!marker, "the marker is gone");
    // B dies outside any call (no marker): every redelivered entry counts.
    let _: () = redis::cmd("DEL").arg(l.lease(SHARD)).query(&mut c).unwrap();
    assert!(acquire(&mut c, &l, "c", 60_000) > 0);
    assert_eq!(attempts(&read(&mut c, "c", "0")), vec![2, 2, 3, 2]);
}

/// The scripts' counters: an acknowledgement counts its outcomes in the shard's
/// stats hash, in total and in the current 10-second bucket, and drops buckets
/// older than a minute once the hash grows, so it stays bounded.
#[test]
fn stats_counters_keep_only_the_last_minute() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = Layout { prefix: "spillway:".into(), shards: 16 };
    let stats = l.stats(SHARD);
    let now_s: u64 = redis::cmd("TIME").query::<(u64, u64)>(&mut c).unwrap().0;
    let bucket = now_s / 10;
    for old in 1..=40u64 {
        let _: () = redis::cmd("HSET").arg(&stats).arg(format!("applied@{}", bucket - 100 - old)).arg(1).query(&mut c).unwrap();
    }
    let _: () = redis::cmd("HSET").arg(&stats).arg(format!("applied@{}", bucket - 2)).arg(5).query(&mut c).unwrap();
    let acked: i64 = crate::support::invoke(&mut c, &Call::ack(&l, SHARD, 0, (7, 2), 0, []));
    assert_eq!(acked, 0, "no entries to acknowledge");
    let fields: std::collections::HashMap<String, i64> = redis::cmd("HGETALL").arg(&stats).query(&mut c).unwrap();
    let now_field = format!("applied@{bucket}");
    assert_eq!((fields.get("applied"), fields.get("rejected")), (Some(&7), Some(&2)));
    assert!(fields.get(&now_field) == Some(&7) || fields.get(&format!("applied@{}", bucket + 1)) == Some(&7), "{fields:?}");
    assert_eq!(fields.get(&format!("applied@{}", bucket - 2)), Some(&5), "a bucket inside the minute stays");
    assert!(fields.len() <= 6, "buckets older than a minute are gone: {fields:?}");
}
