use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::spillway::Spillway;

const PROBLEMS: &str = "https://spillway.dev/problems/";

/// POSTs `body` as `tenant` (the `Spillway-Tenant` header; none if empty).
async fn write_as(s: &Spillway, tenant: &str, body: Value) -> (u16, http::HeaderMap, Value) {
    let headers: Vec<(&str, &str)> = if tenant.is_empty() { vec![] } else { vec![("spillway-tenant", tenant)] };
    s.call("POST", "/v1/writes", Some(body), &headers).await
}

fn put(key: &str) -> Value {
    json!({"key": key, "op": "put", "value": 1})
}

/// The tenants' figures in `/v1/stats`.
async fn tenants(s: &Spillway) -> Value {
    let (code, _, stats) = s.admin("GET", "/v1/stats", None).await;
    assert_eq!(code, 200, "{stats}");
    stats["tenants"].clone()
}

/// Writes queued in every shard stream and schedule (what a refusal must not
/// change).
fn queued(s: &Spillway) -> i64 {
    let l = crate::support::layout();
    let mut c = s.redis.conn();
    (0..l.shards).map(|n| redis::cmd("XLEN").arg(l.stream(n)).query::<i64>(&mut c).unwrap() + redis::cmd("ZCARD").arg(l.sched(n)).query::<i64>(&mut c).unwrap()).sum()
}

/// A tenant over its rate is refused with `429 tenant-rate-limited` and a
/// `Retry-After`, and nothing of the refused request is queued; other tenants
/// and writes without a tenant are not held back by it; its bucket refills.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_over_its_rate_is_refused_until_its_bucket_refills() {
    let s = Spillway::builder().vars(&[("tenant_rate", "5")]).start().await;
    for i in 0..5 {
        let (code, _, v) = write_as(&s, "acme", put(&format!("a{i}"))).await;
        assert_eq!(code, 202, "write {i} within the burst: {v}");
    }
    let before = queued(&s);
    let (code, headers, p) = write_as(&s, "acme", put("a5")).await;
    assert_eq!((code, p["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-rate-limited"))), "{p}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    assert!(p["detail"].as_str().unwrap().contains("tenant acme"), "{p}");
    assert_eq!(queued(&s), before, "nothing of the refused request was queued");
    // The instance that was told refuses the tenant again itself, before it
    // reads the body: a body that is not even a write gets the same 429, so
    // a flood past its quota costs no parse.
    let (code, _, p) = write_as(&s, "acme", json!("not a write")).await;
    assert_eq!((code, p["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-rate-limited"))), "{p}");
    // Others are not held back.
    assert_eq!(write_as(&s, "beta", put("b0")).await.0, 202);
    assert_eq!(write_as(&s, "", put("c0")).await.0, 202);
    let t = tenants(&s).await;
    assert_eq!((t["acme"]["accepted"].as_u64(), t["acme"]["throttled"].as_u64(), t["beta"]["accepted"].as_u64()), (Some(5), Some(1), Some(1)), "{t}");
    // The bucket refills at 5 writes per second: accepted again within a
    // couple of seconds (polled, bounded). The refusals meanwhile (most made
    // by the instance itself, which remembers the script's) are all counted.
    let (started, mut refused) = (Instant::now(), 2);
    loop {
        let (code, h, v) = write_as(&s, "acme", put("a5")).await;
        if code == 202 {
            break;
        }
        assert_eq!((code, v["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-rate-limited"))), "{v}");
        assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
        refused += 1;
        assert!(started.elapsed() < Duration::from_secs(5), "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 1, "polled while refused");
    assert_eq!(tenants(&s).await["acme"]["throttled"].as_u64(), Some(refused), "every refused request counted once");
    // A request with more of a tenant's writes than its bucket holds can
    // never be accepted: a 422 that says so, not a 429 to retry for ever.
    let six: Vec<Value> = (0..6).map(|i| put(&format!("big{i}"))).collect();
    let (code, _, p) = write_as(&s, "beta", json!({"writes": six})).await;
    assert_eq!((code, p["field"].as_str()), (422, Some("/writes")), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("split"), "{p}");
    // Likewise a request with more writes than the tenant's depth.
    let s = Spillway::builder().vars(&[("tenant_depth", "2")]).start().await;
    let (code, _, p) = write_as(&s, "acme", json!({"key": "k", "op": "put", "value": 1, "ttl_ms": 1000})).await;
    assert_eq!(code, 202, "a write and its expiry fit: {p}");
    let s = Spillway::builder().vars(&[("tenant_depth", "1")]).start().await;
    let (code, _, p) = write_as(&s, "acme", json!({"key": "k", "op": "put", "value": 1, "ttl_ms": 1000})).await;
    assert_eq!((code, p["field"].as_str()), (422, Some("/writes")), "two entries never fit a depth of 1: {p}");
    assert_eq!(queued(&s), 0);
}

/// A tenant holding its depth of writes not yet settled is refused with
/// `429 tenant-queue-full` until the processor applies some; the others are
/// not. With a global queue limit above the tenant's depth, a flood by one
/// tenant leaves room for everyone else, which it would fill without a quota.
#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_tenant_is_held_to_its_depth_and_others_get_in() {
    let vars = [("shard_count", "1"), ("queue_depth_limit", "300"), ("tenant_depth", "200")];
    let s = Spillway::builder().vars(&vars).start().await;
    let batch = |tag: &str, n: usize| json!({"writes": (0..n).map(|i| put(&format!("{tag}{i}"))).collect::<Vec<_>>()});
    let mut accepted = 0;
    loop {
        let (code, _, v) = write_as(&s, "flood", batch(&format!("f{accepted}-"), 50)).await;
        if code == 429 {
            assert_eq!(v["type"], format!("{PROBLEMS}tenant-queue-full"), "{v}");
            assert!(v["detail"].as_str().unwrap().contains("tenant flood has 200 writes waiting"), "{v}");
            break;
        }
        assert_eq!(code, 202, "{v}");
        accepted += 50;
    }
    assert_eq!(accepted, 200, "held to its depth");
    // Room for the others: 100 more fit the shard's queue.
    let (code, _, v) = write_as(&s, "quiet", batch("q", 100)).await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(tenants(&s).await["flood"]["waiting"], 200);
    // Applied: the flood's depth is free again.
    s.drain().await;
    let t = tenants(&s).await;
    assert!(t["flood"]["waiting"].is_null() || t["flood"]["waiting"] == 0, "settled when acknowledged: {t}");
    assert_eq!((t["flood"]["accepted"].as_u64(), t["flood"]["throttled"].as_u64()), (Some(200), Some(1)), "writes accepted, requests refused: {t}");
    // Accepted again once the depth refusal this instance remembers (the
    // second its Retry-After says) is over.
    let started = Instant::now();
    loop {
        let (code, _, v) = write_as(&s, "flood", batch("again", 50)).await;
        if code == 202 {
            break;
        }
        assert_eq!((code, v["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-queue-full"))), "{v}");
        assert!(started.elapsed() < Duration::from_secs(4), "still refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tenant's depth counts every write until it settles, whichever way:
/// applied, cancelled, dead-lettered (and back with a replay); an expiry
/// (`ttl_ms`) is a write of its own. The dead letter keeps its tenant.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_depth_is_settled_on_every_path() {
    let s = Spillway::builder().vars(&[("tenant_depth", "100"), ("max_attempts", "1")]).start().await;
    let waiting = async || tenants(&s).await["acme"]["waiting"].as_u64().unwrap_or(0);
    // Dead-lettered, then replayed (the records' table refuses every row
    // until it is dropped, which recreates it as it should be).
    s.store.fail_records().await;
    let (_, _, v) = write_as(&s, "acme", put("doomed")).await;
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(waiting().await, 1);
    s.drain().await;
    s.drain().await;
    assert_eq!(s.settled(&id).await["status"], "dead");
    assert_eq!(waiting().await, 0, "dead-lettered");
    let (_, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(dead["dead"][0]["tenant"], "acme", "{dead}");
    s.store.exec("DROP TABLE spillway_records").await;
    let (code, _, out) = s.admin("POST", "/v1/dead/replay", Some(json!({"ids": [id]}))).await;
    assert_eq!((code, waiting().await), (200, 1), "replayed: {out}");
    s.drain().await;
    let new_id = out["replayed"][0]["replayed_as"].as_str().unwrap();
    assert_eq!(s.settled(new_id).await["status"], "applied");
    assert_eq!(waiting().await, 0, "applied");
    // An expiry counts; a cancelled write settles.
    let (code, _, _) = write_as(&s, "acme", json!({"key": "t", "op": "put", "value": 1, "ttl_ms": 600_000})).await;
    assert_eq!((code, waiting().await), (202, 2), "the write and its expiry");
    let (_, _, v) = write_as(&s, "acme", json!({"key": "later", "op": "put", "value": 1, "delay_ms": 600_000})).await;
    assert_eq!(waiting().await, 3);
    let (code, _, c) = s.call("DELETE", &format!("/v1/writes/{}", v["id"].as_str().unwrap()), None, &[]).await;
    assert_eq!((code, waiting().await), (200, 2), "cancelled: {c}");
    s.drain().await;
    assert_eq!(waiting().await, 1, "applied; its expiry still scheduled");
    // A scheduled write keeps its tenant when it becomes due, and settles
    // when applied.
    let (_, _, v) = write_as(&s, "acme", json!({"key": "soon", "op": "put", "value": 1, "delay_ms": 50})).await;
    assert_eq!(waiting().await, 2);
    let id = v["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    loop {
        s.drain().await;
        let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        if st["status"] == "applied" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never applied: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(waiting().await, 1, "the due write settled; the expiry remains");
}

/// An idempotent retry replays its first answer and is not charged again,
/// even with the tenant's bucket empty.
#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_retry_is_not_charged_twice() {
    let s = Spillway::builder().vars(&[("tenant_rate", "1"), ("tenant_burst", "1")]).start().await;
    let headers = [("spillway-tenant", "acme"), ("idempotency-key", "order-1")];
    let (code, _, first) = s.call("POST", "/v1/writes", Some(put("o1")), &headers).await;
    assert_eq!(code, 202, "{first}");
    let (code, h, again) = s.call("POST", "/v1/writes", Some(put("o1")), &headers).await;
    assert_eq!((code, &again["id"]), (202, &first["id"]), "{again}");
    assert_eq!(h["idempotent-replayed"], "true");
    let (code, _, _) = write_as(&s, "acme", put("o2")).await;
    assert_eq!(code, 429, "the bucket is empty: the replay did not refill it, nor did the first request pay twice");
    assert_eq!(tenants(&s).await["acme"]["accepted"], 1);
}

/// A tenant the script refuses again before the `Retry-After` it was told
/// (its refusal here ended as the bucket refilled, but other requests took
/// the tokens first) gets that answer held until the new refusal's time, as
/// a remembered refusal's are: a flood sent again at once is not a body
/// parse and a script call per request.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_refused_again_before_it_was_told_is_held() {
    let s = Spillway::builder().vars(&[("tenant_rate", "10"), ("tenant_burst", "2")]).start().await;
    let two = |k: &str| json!({"writes": [put(&format!("{k}a")), put(&format!("{k}b"))]});
    assert_eq!(write_as(&s, "acme", two("a")).await.0, 202, "the burst");
    let told = Instant::now();
    let (code, h, p) = write_as(&s, "acme", two("b")).await;
    assert_eq!((code, p["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-rate-limited"))), "{p}");
    assert_eq!(h["retry-after"], "1", "told to wait a second");
    // (That the first refusal is answered at once, unheld, is the unit
    // test's: here it would be a bound on speed.)
    // The bucket refills two tokens in 200 ms, so the refusal remembered
    // here ends then; meanwhile another instance or host takes them (the
    // bucket emptied in Redis behind this instance's back).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = s.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*bucket:acme").query(&mut c).unwrap();
    let (secs, micros): (String, String) = redis::cmd("TIME").query(&mut c).unwrap();
    let now_ms = secs.parse::<u64>().unwrap() * 1000 + micros.parse::<u64>().unwrap() / 1000;
    let _: () = redis::cmd("SET").arg(&keys[0]).arg(format!("0.000:{now_ms}")).arg("PX").arg(60_000).query(&mut c).unwrap();
    let (code, h, p) = write_as(&s, "acme", two("c")).await;
    assert_eq!((code, p["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-rate-limited"))), "{p}");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert!(told.elapsed() >= Duration::from_millis(1000), "answered no sooner than the second it was told, then: {:?}", told.elapsed());
    assert_eq!(tenants(&s).await["acme"]["throttled"].as_u64(), Some(2), "each refusal counted once, by the script");
}

/// A busy tenant's bucket outlives its refill: a bucket that expired once
/// full again (a few milliseconds after each write, at a high rate) would
/// publish an expired-key event, a processor invocation, per write. Its
/// refill is computed from its time, so keeping it changes no answer (the
/// refill itself: `a_tenant_over_its_rate_is_refused_until_its_bucket_refills`).
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_tenants_bucket_outlives_its_refill() {
    let s = Spillway::builder().vars(&[("tenant_rate", "1000"), ("tenant_burst", "10")]).start().await;
    for i in 0..3 {
        assert_eq!(write_as(&s, "acme", put(&format!("k{i}"))).await.0, 202);
    }
    let mut c = s.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*bucket:acme").query(&mut c).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut c).unwrap();
    assert!(ttl > 30_000, "full again 3 ms after the last write, and kept: PTTL {ttl} ms");
}

/// With `tenant_from = key:<separator>`, each key's prefix is its tenant
/// (a key without one has none), and overrides set named tenants' quotas;
/// a prefix outside the charset is refused, naming its write.
#[tokio::test(flavor = "multi_thread")]
async fn key_prefix_tenants_and_overrides() {
    let vars = [("tenant_from", "key::"), ("tenant_depth", "2"), ("tenant_overrides", r#"{"gold": {"depth": 5}}"#)];
    let s = Spillway::builder().vars(&vars).start().await;
    let keys = |tenant: &str, n: usize| json!({"writes": (0..n).map(|i| put(&format!("{tenant}:{i}"))).collect::<Vec<_>>()});
    assert_eq!(write_as(&s, "", keys("gold", 5)).await.0, 202, "gold's own depth");
    assert_eq!(write_as(&s, "", keys("free", 2)).await.0, 202);
    let (code, _, p) = write_as(&s, "", json!({"writes": [put("plain"), put("free:9")]})).await;
    assert_eq!((code, p["type"].as_str()), (429, Some(&*format!("{PROBLEMS}tenant-queue-full"))), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("tenant free"), "{p}");
    assert_eq!(write_as(&s, "header-ignored", put("plain")).await.0, 202, "no prefix, no tenant; the header is not read");
    let before = queued(&s);
    let (code, _, p) = write_as(&s, "", json!({"writes": [put("gold:6"), put("a/b:1")]})).await;
    assert_eq!((code, p["field"].as_str()), (422, Some("/writes/1/key")), "{p}");
    assert_eq!(queued(&s), before, "nothing of a refused request is queued");
    let t = tenants(&s).await;
    assert_eq!((t["gold"]["waiting"].as_u64(), t["free"]["waiting"].as_u64()), (Some(5), Some(2)), "{t}");
}

/// A tenant header outside the charset is a 422 naming the header, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_tenant_name_is_refused() {
    let s = Spillway::builder().vars(&[("tenant_rate", "100")]).start().await;
    let long = "x".repeat(65);
    for bad in ["a b", "acme:eu", long.as_str(), "a/b"] {
        let (code, h, p) = write_as(&s, bad, put("k")).await;
        assert_eq!((code, p["field"].as_str()), (422, Some("/headers/spillway-tenant")), "{bad}: {p}");
        assert_eq!(h["content-type"], "application/problem+json");
    }
    assert_eq!(queued(&s), 0);
    assert_eq!(tenants(&s).await, json!({}));
}
