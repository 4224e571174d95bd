use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::spillway::Spillway;

/// Milliseconds since the Unix epoch on this machine's clock (Redis's too:
/// it runs here).
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The recorded outcomes of `ids`: `(id, applied_at ms, entry_ms)`, read from
/// the database (no traffic to the app).
fn recorded(s: &Spillway, ids: &[String]) -> Vec<(String, i64, i64)> {
    let db = s.db();
    let mut out = Vec::new();
    for id in ids {
        if let Ok(row) = db.query_row("SELECT applied_at, entry_ms FROM spillway_writes WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?))) {
            out.push((id.clone(), row.0, row.1));
        }
    }
    out
}

/// Waits (bounded, reading the database only) until every one of `ids` has
/// an outcome recorded, then until each status has left `pending` (its batch
/// acknowledged, so reads of its key see it); returns the outcomes.
async fn wait_applied(s: &Spillway, ids: &[String], bound: Duration) -> Vec<(String, i64, i64)> {
    let start = Instant::now();
    loop {
        let got = recorded(s, ids);
        if got.len() == ids.len() {
            for id in ids {
                s.settled(id).await;
            }
            return got;
        }
        assert!(start.elapsed() < bound, "{} of {} scheduled writes applied after {bound:?}; output:\n{}", got.len(), ids.len(), s.app.guest_output());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

/// Writes with `delay_ms` or `apply_at` are accepted at once (202, status
/// `scheduled` with their due time), and applied at or after that time with no
/// request sent after them: the alarm's expired-key event wakes the processor
/// (the Redis trigger), which waits out the lead. None is applied early, and
/// each within a few seconds of its time (the benchmark measures the
/// lateness; this bound only says the wake-up came).
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_writes_are_applied_when_due_with_no_traffic() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let mut ids = Vec::new();
    for (i, delay) in [700u64, 1200, 1900, 2600].iter().enumerate() {
        let (code, v) = s.write(json!({"key": format!("due-{i}"), "op": "put", "value": {"n": i}, "delay_ms": delay})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(id_of(&v));
    }
    let at = now_ms() + 1500;
    let at_text = chrono_free_rfc3339(at);
    let (code, v) = s.write(json!({"key": "due-at", "op": "put", "value": 1, "apply_at": at_text})).await;
    assert_eq!(code, 202, "{v}");
    ids.push(id_of(&v));
    // Scheduled, with the due time the id carries.
    let (code, _, st) = s.call("GET", &format!("/v1/writes/{}", ids[4]), None, &[]).await;
    assert_eq!((code, st["status"].as_str(), st["due_at_ms"].as_u64()), (200, Some("scheduled"), Some(at)), "{st}");
    assert_eq!(st["due_at"].as_str(), Some(at_text.as_str()));
    assert_eq!(ids[4].split('-').nth(1), Some(at.to_string().as_str()), "the id carries the due time");
    let (_, _, rec) = s.call("GET", "/v1/records/due-0", None, &[]).await;
    assert_eq!(rec["status"], 404, "not applied before it is due: {rec}");
    // No request from here on.
    let got = wait_applied(&s, &ids, Duration::from_secs(20)).await;
    for (id, applied_at, due) in &got {
        let late = applied_at - due;
        eprintln!("{id}: applied {late} ms after its due time");
        assert!(late >= 0, "{id} applied {} ms before it was due", -late);
        assert!(late < 5000, "{id} applied {late} ms late: no wake-up came");
    }
}

/// RFC 3339 in UTC with milliseconds, written here so the test does not
/// share the code under test.
fn chrono_free_rfc3339(ms: u64) -> String {
    let out = std::process::Command::new("date").args(["-u", "-d", &format!("@{}", ms / 1000), "+%Y-%m-%dT%H:%M:%S"]).output().unwrap();
    format!("{}.{:03}Z", String::from_utf8(out.stdout).unwrap().trim(), ms % 1000)
}

/// A key's writes apply in order of due time, then of acceptance: writes
/// without a time are due when accepted, two writes for the same `apply_at`
/// keep the order they were accepted in, and delays interleave by due time.
#[tokio::test(flavor = "multi_thread")]
async fn a_keys_writes_apply_in_order_of_due_time_then_acceptance() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let at = now_ms() + 2500;
    let append = |v: &str| json!({"key": "order", "op": "append", "field": "seen", "value": v});
    let with = |mut w: Value, k: &str, v: Value| {
        w[k] = v;
        w
    };
    let writes = [
        append("now-1"),
        with(append("delay-4000"), "delay_ms", json!(4000)),
        with(append("at-first"), "apply_at", json!(at)),
        with(append("at-second"), "apply_at", json!(at)),
        with(append("delay-1000"), "delay_ms", json!(1000)),
        append("now-2"),
    ];
    let mut ids = Vec::new();
    for w in writes {
        let (code, v) = s.write(w).await;
        assert_eq!(code, 202, "{v}");
        ids.push(id_of(&v));
    }
    // And two in one request, for the same time: request order.
    let (code, v) = s.write(json!({"writes": [with(append("batch-a"), "apply_at", json!(at)), with(append("batch-b"), "apply_at", json!(at))]})).await;
    assert_eq!(code, 202, "{v}");
    ids.extend(v["writes"].as_array().unwrap().iter().map(id_of));
    wait_applied(&s, &ids, Duration::from_secs(20)).await;
    let (code, _, rec) = s.call("GET", "/v1/records/order", None, &[]).await;
    assert_eq!(code, 200, "{rec}");
    assert_eq!(rec["value"]["seen"], json!(["now-1", "now-2", "delay-1000", "at-first", "at-second", "batch-a", "batch-b", "delay-4000"]), "{rec}");
    assert_eq!(rec["version"], 8);
}

/// `DELETE /v1/writes/{id}` cancels a scheduled write: `200 cancelled`, its
/// status says so, it is never applied (a later write of its shard is), and a
/// second cancel answers the same. A write already queued or applied is `409`
/// with a problem naming its status; an unknown id is `404`.
#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_write_can_be_cancelled_until_it_is_due() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let (_, v) = s.write(json!({"key": "c", "op": "put", "value": "cancelled", "delay_ms": 3000})).await;
    let cancelled = id_of(&v);
    let (_, v) = s.write(json!({"key": "c", "op": "put", "value": "later", "delay_ms": 3500})).await;
    let later = id_of(&v);
    let (code, _, out) = s.call("DELETE", &format!("/v1/writes/{cancelled}"), None, &[]).await;
    assert_eq!((code, out.clone()), (200, json!({"id": cancelled, "status": "cancelled"})), "{out}");
    let (code, _, again) = s.call("DELETE", &format!("/v1/writes/{cancelled}"), None, &[]).await;
    assert_eq!((code, again["status"].as_str()), (200, Some("cancelled")), "{again}");
    wait_applied(&s, std::slice::from_ref(&later), Duration::from_secs(20)).await;
    assert!(recorded(&s, std::slice::from_ref(&cancelled)).is_empty(), "the cancelled write was applied");
    let (_, _, rec) = s.call("GET", "/v1/records/c", None, &[]).await;
    assert_eq!((rec["value"].as_str(), rec["version"].as_i64()), (Some("later"), Some(1)), "{rec}");
    let (code, _, st) = s.call("GET", &format!("/v1/writes/{cancelled}"), None, &[]).await;
    assert_eq!((code, st["status"].as_str()), (200, Some("cancelled")), "{st}");
    // Too late: applied.
    let (code, _, p) = s.call("DELETE", &format!("/v1/writes/{later}"), None, &[]).await;
    assert_eq!((code, p["type"].as_str()), (409, Some("https://spillway.dev/problems/too-late")), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("is applied"), "{p}");
    // Too late: queued (no processor runs).
    s.stop_trigger();
    let (_, v) = s.write(json!({"key": "c", "op": "delete"})).await;
    let (code, _, p) = s.call("DELETE", &format!("/v1/writes/{}", id_of(&v)), None, &[]).await;
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("is pending"), "{p}");
    for unknown in ["3-1796317200000-1000000000000000001", "nope", "99-1-1"] {
        let (code, _, p) = s.call("DELETE", &format!("/v1/writes/{unknown}"), None, &[]).await;
        assert_eq!(code, 404, "{unknown}: {p}");
    }
}

/// Bad times are refused with a problem naming the member, and change
/// nothing: a negative or fractional delay, a date that is no RFC 3339 date,
/// one further in the past than the tolerance, one beyond the horizon, both
/// members at once.
#[tokio::test(flavor = "multi_thread")]
async fn bad_times_are_refused_and_change_nothing() {
    let s = Spillway::builder().vars(&[("schedule_horizon_secs", "60")]).start().await;
    let w = |k: &str, v: Value| {
        let mut w = json!({"key": "t", "op": "put", "value": 1});
        w[k] = v;
        w
    };
    let now = now_ms();
    for (body, field) in [
        (w("delay_ms", json!(-1)), "/delay_ms"),
        (w("delay_ms", json!(2.5)), "/delay_ms"),
        (w("delay_ms", json!(61_000)), "/delay_ms"),
        (w("apply_at", json!("next tuesday")), "/apply_at"),
        (w("apply_at", json!("2026-02-30T00:00:00Z")), "/apply_at"),
        (w("apply_at", json!(now - 3_600_000)), "/apply_at"),
        (w("apply_at", json!(now + 3_600_000)), "/apply_at"),
        (json!({"writes": [{"key": "t", "op": "delete"}, {"key": "t", "op": "delete", "delay_ms": 5, "apply_at": now}]}), "/writes/1/apply_at"),
    ] {
        let (code, headers, p) = s.call("POST", "/v1/writes", Some(body.clone()), &[]).await;
        assert_eq!((code, p["field"].as_str()), (422, Some(field)), "{body}: {p}");
        assert_eq!(headers["content-type"], "application/problem+json");
    }
    let depth: u64 = (0..16).map(|i| redis::cmd("XLEN").arg(crate::support::layout().stream(i)).query::<u64>(&mut s.redis.conn()).unwrap()).sum();
    let scheduled: u64 = (0..16).map(|i| redis::cmd("ZCARD").arg(crate::support::layout().sched(i)).query::<u64>(&mut s.redis.conn()).unwrap()).sum();
    assert_eq!((depth, scheduled), (0, 0), "nothing was queued or scheduled");
    // Within the tolerance, a past time is now.
    let (code, v) = s.write(w("apply_at", json!(now - 1000))).await;
    assert_eq!(code, 202, "{v}");
    s.drain().await;
    assert_eq!(s.settled(&id_of(&v)).await["status"], "applied");
}

/// A shard holds at most `scheduled_limit` scheduled writes: beyond, intake
/// answers 429 `schedule-full` with `Retry-After`, adding nothing; writes
/// due now are still taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_holds_at_most_its_scheduled_limit() {
    let s = Spillway::builder().vars(&[("scheduled_limit", "3")]).start().await;
    let w = |n: u64| json!({"key": "lim", "op": "put", "value": n, "delay_ms": 60_000});
    for n in 0..3 {
        let (code, v) = s.write(w(n)).await;
        assert_eq!(code, 202, "{v}");
    }
    let (code, headers, p) = s.call("POST", "/v1/writes", Some(w(3)), &[]).await;
    assert_eq!((code, p["type"].as_str()), (429, Some("https://spillway.dev/problems/schedule-full")), "{p}");
    assert_eq!(headers["retry-after"], "1");
    let shard = crate::support::layout().shard_of("lim");
    let held: u64 = redis::cmd("ZCARD").arg(crate::support::layout().sched(shard)).query(&mut s.redis.conn()).unwrap();
    assert_eq!(held, 3);
    let (code, v) = s.write(json!({"key": "lim", "op": "put", "value": "now"})).await;
    assert_eq!(code, 202, "{v}");
}

/// More writes due at once than one call moves (100): a write accepted after
/// they are due still applies after all of them, in order, and each
/// keeps the id it was given.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_accepted_after_a_large_due_backlog_applies_after_it() {
    let s = Spillway::builder().start().await;
    let at = now_ms() + 3000;
    let mut ids = Vec::new();
    for r in 0..3 {
        let writes: Vec<Value> = (0..100).map(|i| json!({"key": "backlog", "op": "append", "field": "l", "value": r * 100 + i, "apply_at": at})).collect();
        let (code, v) = s.write(json!({"writes": writes})).await;
        assert_eq!(code, 202, "{v}");
        ids.extend(v["writes"].as_array().unwrap().iter().map(id_of));
    }
    // Past the due time, with no processor: the next write moves 100 and
    // queues itself behind the other 200.
    tokio::time::sleep(Duration::from_millis((at + 50).saturating_sub(now_ms()))).await;
    let (code, v) = s.write(json!({"key": "backlog", "op": "append", "field": "l", "value": "last"})).await;
    assert_eq!(code, 202, "{v}");
    ids.push(id_of(&v));
    let shard = crate::support::layout().shard_of("backlog");
    let (queued, scheduled): (u64, u64) = (
        redis::cmd("XLEN").arg(crate::support::layout().stream(shard)).query(&mut s.redis.conn()).unwrap(),
        redis::cmd("ZCARD").arg(crate::support::layout().sched(shard)).query(&mut s.redis.conn()).unwrap(),
    );
    assert_eq!((queued, scheduled), (100, 201), "one call moves 100; the new write waits in the schedule");
    s.drain().await;
    wait_applied(&s, &ids, Duration::from_secs(20)).await;
    let (_, _, rec) = s.call("GET", "/v1/records/backlog", None, &[]).await;
    let mut expected: Vec<Value> = (0..300).map(|n| json!(n)).collect();
    expected.push(json!("last"));
    assert_eq!(rec["value"]["l"], Value::Array(expected));
    for id in [&ids[0], &ids[299], &ids[300]] {
        assert_eq!(s.settled(id).await["status"], "applied", "{id}");
    }
}

/// The flash-sale hold (the README's pattern): a reservation (`incr stock -1`
/// with `min: 0`, waited for), then a scheduled compensating write that gives
/// the unit back; paying cancels it. An order that pays keeps its unit, one
/// that does not gets it back when the hold lapses, one refused as sold out
/// schedules nothing, and a payment after the lapse finds the release applied
/// (409), so the order is refused rather than oversold.
#[tokio::test(flavor = "multi_thread")]
async fn a_flash_sale_hold_is_given_back_unless_the_order_pays() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let (code, v) = s.write(json!({"key": "sku-9", "op": "put", "value": {"stock": 2}})).await;
    assert_eq!(code, 202, "{v}");
    s.settled(&id_of(&v)).await;
    let hold_ms = 5000;
    // Reserve, waiting for the outcome; on success, schedule the release.
    let reserve = |order: &'static str| {
        let s = &s;
        async move {
            let idem = format!("reserve-{order}");
            let (code, _, r) = s
                .call("POST", "/v1/writes", Some(json!({"key": "sku-9", "op": "incr", "field": "stock", "by": -1, "min": 0})), &[("prefer", "wait=10"), ("idempotency-key", &idem)])
                .await;
            assert_eq!(code, 200, "{r}");
            if r["status"] != "applied" {
                return None;
            }
            let idem = format!("release-{order}");
            let (code, _, release) = s
                .call("POST", "/v1/writes", Some(json!({"key": "sku-9", "op": "incr", "field": "stock", "by": 1, "delay_ms": hold_ms})), &[("idempotency-key", &idem)])
                .await;
            assert_eq!(code, 202, "{release}");
            Some(id_of(&release))
        }
    };
    let paid = reserve("A").await.expect("A holds a unit");
    let lapsed = reserve("B").await.expect("B holds a unit");
    assert_eq!(reserve("C").await, None, "sold out: C is refused and schedules nothing");
    // A pays within the hold: its release is cancelled, the sale is final.
    let (code, _, out) = s.call("DELETE", &format!("/v1/writes/{paid}"), None, &[]).await;
    assert_eq!((code, out["status"].as_str()), (200, Some("cancelled")), "{out}");
    // B does not: its unit comes back when the hold lapses.
    assert_eq!(s.settled(&lapsed).await["status"], "applied");
    let (code, _, p) = s.call("DELETE", &format!("/v1/writes/{lapsed}"), None, &[]).await;
    assert_eq!(code, 409, "B's payment after the lapse is refused: {p}");
    let (_, _, rec) = s.call("GET", "/v1/records/sku-9", None, &[]).await;
    assert_eq!(rec["value"]["stock"], 1, "A's unit sold, B's back on sale: {rec}");
    assert_eq!(s.settled(&paid).await["status"], "cancelled");
}

/// `ttl_ms` on `put` and `merge`: the 202 names the expiry (a write of its
/// own, scheduled `ttl_ms` after the write is due). It deletes the record
/// when due, with a version, a recorded outcome (the change feed's entry) and
/// a status; unless a later write changed the record, in which case the
/// expiry is rejected, saying which write did, and the record stays. No
/// request is sent while the expiries come due.
#[tokio::test(flavor = "multi_thread")]
async fn expiring_records_are_deleted_unless_changed_since() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let (code, v) = s.write(json!({"key": "session-1", "op": "put", "value": {"user": "ann"}, "ttl_ms": 3000})).await;
    assert_eq!(code, 202, "{v}");
    let (put, expiry) = (id_of(&v), v["expiry_id"].as_str().expect("the expiry's id").to_owned());
    let due: u64 = expiry.split('-').nth(1).unwrap().parse().unwrap();
    let accepted: u64 = put.split('-').nth(1).unwrap().parse().unwrap();
    assert_eq!(due, accepted + 3000, "due ttl_ms after the write is");
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{expiry}"), None, &[]).await;
    assert_eq!(st["status"], "scheduled", "{st}");
    // Renewed: a later write of the key keeps the record past the first ttl.
    let (_, v) = s.write(json!({"key": "session-2", "op": "merge", "patch": {"user": "bob"}, "ttl_ms": 3000})).await;
    let kept_expiry = v["expiry_id"].as_str().unwrap().to_owned();
    let (_, v) = s.write(json!({"key": "session-2", "op": "merge", "patch": {"seen": 1}})).await;
    let renewal = id_of(&v);
    // No request from here on until both expiries have outcomes.
    wait_applied(&s, &[expiry.clone(), kept_expiry.clone()], Duration::from_secs(20)).await;
    let (code, _, st) = s.call("GET", &format!("/v1/writes/{expiry}"), None, &[]).await;
    assert_eq!((code, st["status"].as_str(), st["version"].as_i64(), st["key"].as_str()), (200, Some("applied"), Some(2), Some("session-1")), "{st}");
    let (code, _, rec) = s.call("GET", "/v1/records/session-1", None, &[]).await;
    assert_eq!(code, 404, "expired: {rec}");
    let reason: String = s.db().query_row("SELECT reason FROM spillway_writes WHERE id = ?1", [&expiry], |r| r.get(0)).unwrap();
    assert_eq!(reason, "deleted", "the change feed's entry for the deletion");
    let st = s.settled(&kept_expiry).await;
    assert_eq!(st["status"], "rejected", "{st}");
    assert!(st["reason"].as_str().unwrap().contains(&format!("write {renewal} changed the record")), "{st}");
    let (code, _, rec) = s.call("GET", "/v1/records/session-2", None, &[]).await;
    assert_eq!((code, rec["value"].clone()), (200, json!({"user": "bob", "seen": 1})), "{rec}");
    // Only put and merge expire; a ttl of zero is refused.
    for (bad, field) in [
        (json!({"key": "x", "op": "put", "value": 1, "ttl_ms": 0}), "/ttl_ms"),
        (json!({"key": "x", "op": "delete", "ttl_ms": 1000}), "/ttl_ms"),
    ] {
        let (code, _, p) = s.call("POST", "/v1/writes", Some(bad.clone()), &[]).await;
        assert_eq!((code, p["field"].as_str()), (422, Some(field)), "{bad}: {p}");
    }
}

/// A long request's own entries all take its first millisecond: the stream
/// is never carried past a write scheduled for the next milliseconds, so that
/// write keeps its id when it moves into the stream, and its expiry (which
/// names that id) deletes what it wrote.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_request_leaves_a_write_scheduled_just_after_it_its_id() {
    let s = Spillway::builder().vars(&[("max_batch", "2000"), ("max_body_bytes", "4194304")]).start().await;
    s.start_trigger().await;
    let mut writes: Vec<Value> = (0..1500).map(|i| json!({"key": "long", "op": "put", "value": i})).collect();
    writes.push(json!({"key": "long", "op": "put", "value": "last", "delay_ms": 2, "ttl_ms": 300}));
    let (code, v) = s.write(json!({"writes": writes})).await;
    assert_eq!(code, 202, "{v}");
    let last = &v["writes"][1500];
    let (id, expiry) = (id_of(last), last["expiry_id"].as_str().unwrap().to_owned());
    wait_applied(&s, &[id.clone(), expiry.clone()], Duration::from_secs(30)).await;
    let st = s.settled(&id).await;
    assert_eq!((st["status"].as_str(), st.get("moved_to")), (Some("applied"), None), "kept its id: {st}");
    let st = s.settled(&expiry).await;
    assert_eq!(st["status"], "applied", "the expiry found its write: {st}");
    let (code, _, rec) = s.call("GET", "/v1/records/long", None, &[]).await;
    assert_eq!(code, 404, "{rec}");
}

/// The alarm fires while another holder has the shard (an operator's drain,
/// another node) and that holder lets go without reading again: the woken
/// drain's scan sets the alarm again, so the write is applied once the shard
/// is free, and the write after it too, with no request sent.
#[tokio::test(flavor = "multi_thread")]
async fn an_alarm_that_fires_on_a_held_shard_is_set_again() {
    let s = Spillway::builder().start().await;
    s.start_trigger().await;
    let layout = crate::support::layout();
    let shard = layout.shard_of("held");
    let (_, v) = s.write(json!({"key": "held", "op": "put", "value": 1, "delay_ms": 2000})).await;
    let first = id_of(&v);
    let due: u64 = first.split('-').nth(1).unwrap().parse().unwrap();
    let (_, v) = s.write(json!({"key": "held", "op": "put", "value": 2, "delay_ms": 4000})).await;
    let second = id_of(&v);
    // Someone holds the shard (before the first write's alarm, 500 ms ahead
    // of it, fires) until the write is due and past, then lets go (deletes
    // its lease: no expired-key event).
    let _: () = redis::cmd("SET").arg(layout.lease(shard)).arg("someone").query(&mut s.redis.conn()).unwrap();
    assert!(now_ms() + 500 < due, "the lease is taken before the alarm fires");
    tokio::time::sleep(Duration::from_millis((due + 300).saturating_sub(now_ms()))).await;
    let _: () = redis::cmd("DEL").arg(layout.lease(shard)).query(&mut s.redis.conn()).unwrap();
    wait_applied(&s, &[first, second], Duration::from_secs(20)).await;
}

/// A retry of an accepted request with the same `Idempotency-Key` replays
/// its answer even once its `apply_at` has fallen further into the past than
/// the tolerance; a new request with that time is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_retry_of_a_scheduled_request_replays_it() {
    let s = Spillway::builder().start().await;
    let at = now_ms() - spillway_core::schedule::PAST_TOLERANCE_MS + 5000;
    let body = json!({"key": "retry", "op": "put", "value": 1, "apply_at": at});
    let (code, headers, first) = s.call("POST", "/v1/writes", Some(body.clone()), &[("idempotency-key", "late-retry")]).await;
    assert_eq!((code, headers.get("idempotent-replayed")), (202, None), "{first}");
    // Past the tolerance now.
    tokio::time::sleep(Duration::from_millis((at + spillway_core::schedule::PAST_TOLERANCE_MS + 50).saturating_sub(now_ms()))).await;
    let (code, headers, again) = s.call("POST", "/v1/writes", Some(body.clone()), &[("idempotency-key", "late-retry")]).await;
    assert_eq!((code, headers["idempotent-replayed"].to_str().unwrap(), again["id"].clone()), (202, "true", first["id"].clone()), "{again}");
    for key in [Some("fresh-key"), None] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        let (code, _, p) = s.call("POST", "/v1/writes", Some(body.clone()), &headers).await;
        assert_eq!((code, p["field"].as_str()), (422, Some("/apply_at")), "{key:?}: {p}");
    }
}

/// Among many keys with a TTL (here 200,000, as idempotency records leave),
/// Redis's sampling expiry reaches a given key only after many minutes; the
/// alarms' mirrors in `alarm_db` (a database of their own) still expire on
/// time, so scheduled writes are applied on time with no request sent.
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_writes_are_on_time_among_many_keys_with_a_ttl() {
    let s = Spillway::builder().start().await;
    let _: () = redis::cmd("EVAL")
        .arg("for i = 1, 200000 do redis.call('SET', 'other:' .. i, 1, 'EX', 3600) end")
        .arg(0)
        .query(&mut s.redis.conn())
        .unwrap();
    s.start_trigger().await;
    let mut ids = Vec::new();
    for (i, delay) in [1200u64, 2000, 2800].iter().enumerate() {
        let (code, v) = s.write(json!({"key": format!("crowd-{i}"), "op": "put", "value": i, "delay_ms": delay})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(id_of(&v));
    }
    for (id, applied_at, due) in wait_applied(&s, &ids, Duration::from_secs(30)).await {
        let late = applied_at - due;
        eprintln!("{id}: applied {late} ms after its due time, among 200,000 keys with a TTL");
        assert!((0..5000).contains(&late), "{id} applied {late} ms after its due time");
    }
}
