use std::time::{Duration, Instant};

use redis::Script;
use spillway_core::layout::{CONSUMER, GROUP, Layout};
use spillway_core::{scripts, sql};

use crate::support::Redis;

fn commit(db: &mut rusqlite::Connection, shard: i64, token: i64, value: &str) -> bool {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
    let advanced: Option<i64> = tx.query_row(sql::FENCE, (shard, token), |r| r.get(0)).ok();
    if advanced != Some(token) {
        return false; // dropped: rolled back
    }
    let row = serde_json::json!([["k", value, token, "e", 0]]).to_string();
    tx.execute(sql::UPSERT_RECORDS, [row]).unwrap();
    tx.commit().unwrap();
    true
}

/// A lease holder whose lease expired cannot commit: the new holder has a newer
/// fencing token, the old one can neither renew (reading renews) nor read, and the database refuses
/// its transaction (the real scripts against a real Redis, the real SQL against SQLite).
#[test]
fn expired_lease_holder_cannot_commit() {
    let redis = Redis::start();
    let mut c = redis.conn();
    let l = Layout { prefix: "spillway:".into(), shards: 16 };
    let acquire = |c: &mut redis::Connection, token: &str, ttl: u64| -> i64 {
        Script::new(scripts::LEASE_ACQUIRE).key(l.lease(3)).key(l.fence(3)).arg(token).arg(ttl).invoke(c).unwrap()
    };
    let a = acquire(&mut c, "holder-a", 100);
    assert_eq!(a, 1);
    assert_eq!(acquire(&mut c, "holder-b", 5000), 0, "the lease excludes a second holder");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis::cmd("EXISTS").arg(l.lease(3)).query::<i64>(&mut c).unwrap() == 1 {
        assert!(Instant::now() < deadline, "the lease never expired");
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = acquire(&mut c, "holder-b", 5000);
    assert_eq!(b, 2, "fencing tokens only grow");

    let ttl_before: i64 = redis::cmd("PTTL").arg(l.lease(3)).query(&mut c).unwrap();
    let read: Vec<String> = Script::new(scripts::READ_BATCH)
        .key(l.lease(3)).key(l.stream(3)).key(l.attempts(3)).key(l.dead(3)).key(l.dead_status_prefix(3)).key(l.watch(3))
        .arg("holder-a").arg(GROUP).arg(CONSUMER).arg(10).arg(5).arg(3).arg(60_000).arg(1000).arg(1)
        .invoke(&mut c)
        .unwrap();
    assert_eq!(read, vec!["lost"]);
    let ttl_after: i64 = redis::cmd("PTTL").arg(l.lease(3)).query(&mut c).unwrap();
    assert!(ttl_after <= ttl_before && ttl_after <= 5000, "an expired holder's read does not renew the new holder's lease");
    let released: i64 = Script::new(scripts::LEASE_RELEASE).key(l.lease(3)).key(l.watch(3)).arg("holder-a").arg(0).invoke(&mut c).unwrap();
    assert_eq!(released, 0, "an expired holder cannot release the new holder's lease");

    let dir = tempfile::tempdir().unwrap();
    let mut db = rusqlite::Connection::open(dir.path().join("db.sqlite")).unwrap();
    db.execute_batch(sql::SCHEMA).unwrap();
    assert!(commit(&mut db, 3, b, "\"from b\""));
    assert!(!commit(&mut db, 3, a, "\"from a\""), "the stale holder's commit is refused");
    let value: String = db.query_row("SELECT value FROM spillway_records WHERE key = 'k'", [], |r| r.get(0)).unwrap();
    assert_eq!(value, "\"from b\"");
}
