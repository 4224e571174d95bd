//! The HTTP-only deployment (`deploy/http-only/spin.toml`): no Redis trigger, no
//! SQLite. Intake wakes the processor over Spin's service chaining, drains stay
//! within their time budget by handing the rest on, and nothing calls the drain.

use serde_json::json;

use crate::spillway::{Spillway, batch_of_incr, burst};
use crate::support::workspace;

/// A write is applied with no drain call, no cron and no Redis trigger (the app
/// has none): one at a time, and a batch spread over many shards. (How soon is
/// the benchmark's figure: `write -> applied` on this manifest.)
#[tokio::test(flavor = "multi_thread")]
async fn writes_are_applied_without_a_redis_trigger_or_a_drain_call() {
    let manifest: toml::Table = std::fs::read_to_string(workspace().join("deploy/http-only/spin.toml")).unwrap().parse().unwrap();
    assert!(manifest["trigger"].get("redis").is_none(), "no Redis trigger");
    assert!(manifest["component"].as_table().unwrap().values().all(|c| c.get("sqlite_databases").is_none()), "no SQLite");
    let s = Spillway::builder().http_only().start().await;
    for round in 0..20 {
        let (code, v) = s.write(json!({"key": format!("k{}", round % 5), "op": "incr", "field": "n"})).await;
        assert_eq!(code, 202, "{v}");
        let st = s.settled(v["id"].as_str().unwrap()).await;
        assert_eq!(st["status"], "applied", "{st}");
    }
    let (code, v) = s.write(batch_of_incr(0, 100, 50)).await;
    assert_eq!(code, 202, "{v}");
    for w in v["writes"].as_array().unwrap() {
        let st = s.settled(w["id"].as_str().unwrap()).await;
        assert_eq!(st["status"], "applied", "{st}");
    }
    assert_eq!(s.store.sum_of_n().await, 120);
}

/// A drain stops at its time budget and wakes a fresh invocation for the rest
/// (as a hosted platform ends a request at 30 s): 20,000 increments posted as a
/// burst are all applied exactly once, with no drain call, and the processor
/// handed on at least once. With one attempt allowed, none is dead-lettered: a
/// drain hands on no batch it has read (ahead) and not applied, which the next
/// holder would receive as a second delivery.
#[tokio::test(flavor = "multi_thread")]
async fn drains_hand_on_at_their_budget() {
    let vars = [("drain_budget_secs", "1"), ("batch_size", "10"), ("max_attempts", "1")];
    let s = std::sync::Arc::new(Spillway::builder().http_only().vars(&vars).start().await);
    burst(&s, 20_000, 100).await;
    s.wait_recorded(20_000).await;
    assert_eq!(s.store.sum_of_n().await, 20_000);
    let output = s.app.guest_output();
    let handed_on = output.lines().filter(|l| l.contains(r#""event":"handed_on""#)).count();
    assert!(handed_on >= 1, "no drain reached its budget; output:\n{output}");
}

/// `/v1/wake` is the cron's safety net: with writes queued and no one woken (the
/// wake was lost), a bare GET drains them before it answers; a bad shard is
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn wake_endpoint_drains_what_is_queued() {
    let s = Spillway::builder().http_only().start().await;
    let (code, _, p) = s.call("GET", "/v1/wake?shard=99", None, &[]).await;
    assert_eq!((code, p["type"].as_str()), (422, Some("https://spillway.dev/problems/invalid-write")), "{p}");
    let (code, _, _) = s.call("DELETE", "/v1/wake", None, &[]).await;
    assert_eq!(code, 405);
    // A wake that was lost: every doorbell flag already set (as by a ring whose
    // wake failed), so the write below rings nothing.
    let mut c = s.redis.conn();
    let layout = spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 };
    for shard in 0..16 {
        let _: () = redis::cmd("SET").arg(layout.bell(shard)).arg(i64::MAX / 2).arg("PX").arg(60_000).query(&mut c).unwrap();
    }
    let (code, v) = s.write(json!({"key": "second", "op": "put", "value": 2})).await;
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}?wait=1"), None, &[]).await;
    assert_eq!(st["status"], "pending", "nothing woke the processor: {st}");
    // The cron's GET drains before it answers: applied by then.
    let (code, _, body) = s.call("GET", "/v1/wake", None, &[]).await;
    assert_eq!((code, &body["woken"]), (200, &json!(true)), "{body}");
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
    assert_eq!(st["status"], "applied", "{st}");
    // Intake's POST answers at once (nothing left to claim here).
    let (code, _, body) = s.call("POST", "/v1/wake?shard=3", None, &[]).await;
    assert_eq!((code, &body["shard"]), (202, &json!(3)), "{body}");
}
