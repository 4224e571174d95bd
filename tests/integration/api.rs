use serde_json::{Value, json};

use crate::spillway::{Engine, Spillway, on_both_engines};

const TYPE: &str = "https://spillway.dev/problems/";

/// Every key in the test's Redis and every queued entry: what "changes nothing" checks.
fn redis_state(s: &Spillway) -> (Vec<String>, usize) {
    let mut c = s.redis.conn();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    keys.sort();
    let queued = keys.iter().filter(|k| k.ends_with(":stream")).map(|k| redis::cmd("XLEN").arg(k).query::<usize>(&mut c).unwrap()).sum();
    (keys, queued)
}

async fn records_in_db(s: &Spillway) -> i64 {
    s.store.int("SELECT count(*) FROM spillway_records").await.unwrap_or(0)
}

async fn refused(s: &Spillway, body: &str, content_type: &str, status: u16, code: &str, field: Option<&str>) -> Value {
    let before = (redis_state(s), records_in_db(s).await);
    let req = http::Request::post("http://127.0.0.1:3000/v1/writes")
        .header("content-type", content_type)
        .body(bytes::Bytes::from(body.to_owned()))
        .unwrap();
    let res = s.app.handle(req).await.unwrap();
    assert_eq!(res.status(), status, "{}", String::from_utf8_lossy(res.body()));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().contains_key("x-request-id"));
    let p: Value = serde_json::from_slice(res.body()).unwrap();
    assert_eq!(p["type"], format!("{TYPE}{code}"), "{p}");
    assert_eq!(p["status"], status);
    assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
    assert_eq!(p["field"].as_str(), field, "{p}");
    assert_eq!((redis_state(s), records_in_db(s).await), before, "a refused request changed nothing");
    p
}

/// Bad writes get the right status, stable type and field, and change nothing in
/// Redis or the database.
async fn bad_writes_are_refused_and_change_nothing(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("max_body_bytes", "2000"), ("max_batch", "3"), ("max_key_len", "16"), ("max_value_bytes", "100"), ("max_json_depth", "4")]).start().await;
    let (code, _) = s.write(json!({"key": "seed", "op": "put", "value": 1})).await;
    assert_eq!(code, 202);
    let j = "application/json";
    refused(&s, "{\"key\": ", j, 400, "malformed-json", None).await;
    // Sent without Content-Length: refused while streaming, never buffered whole.
    let p = refused(&s, &format!("{{\"key\":\"a\",\"op\":\"put\",\"value\":\"{}\"}}", "x".repeat(3000)), j, 413, "body-too-large", None).await;
    assert_eq!(p["detail"], "the body is over the limit of 2000 bytes");
    refused(&s, r#"{"key":"a","op":"delete"}"#, "text/plain", 415, "unsupported-media-type", None).await;
    refused(&s, r#"{"key":"a","op":"explode"}"#, j, 422, "invalid-write", Some("/op")).await;
    refused(&s, r#"{"key":"a","op":"put","value":1,"extra":2}"#, j, 422, "invalid-write", Some("/extra")).await;
    refused(&s, r#"{"key":"a","op":"put"}"#, j, 422, "invalid-write", Some("/value")).await;
    refused(&s, r#"{"op":"delete"}"#, j, 422, "invalid-write", Some("/key")).await;
    refused(&s, r#"{"key":"a","op":"put","value":1,"a/b":2}"#, j, 422, "invalid-write", Some("/a~1b")).await;
    refused(&s, r#"{"key":"aaaaaaaaaaaaaaaaa","op":"delete"}"#, j, 422, "invalid-write", Some("/key")).await;
    refused(&s, r#"{"writes":[{"key":"ok","op":"delete"},{"key":"a b","op":"delete"}]}"#, j, 422, "invalid-write", Some("/writes/1/key")).await;
    refused(&s, "{\"key\":\"a\\u0001\",\"op\":\"delete\"}", j, 422, "invalid-write", Some("/key")).await;
    refused(&s, &format!(r#"{{"key":"a","op":"put","value":"{}"}}"#, "v".repeat(200)), j, 422, "invalid-write", Some("/value")).await;
    refused(&s, r#"{"key":"a","op":"merge","patch":[[[[[1]]]]]}"#, j, 422, "invalid-write", Some("/patch")).await;
    refused(&s, r#"{"writes":[{"key":"a","op":"delete"},{"key":"b","op":"delete"},{"key":"c","op":"delete"},{"key":"d","op":"delete"}]}"#, j, 422, "invalid-write", Some("/writes")).await;
    refused(&s, r#"{"writes":[]}"#, j, 422, "invalid-write", Some("/writes")).await;
    refused(&s, r#"[1,2]"#, j, 422, "invalid-write", None).await;
}

/// Unknown routes and records are problem+json 404s; a wrong method is 405 with Allow;
/// every response carries a request id (the client's, when valid).
async fn routes_methods_and_request_ids(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let (code, h, p) = s.call("GET", "/v2/nothing", None, &[("x-request-id", "trace-42")]).await;
    assert_eq!((code, p["type"].as_str()), (404, Some("https://spillway.dev/problems/not-found")));
    assert_eq!(h["x-request-id"], "trace-42");
    let (code, h, _) = s.call("GET", "/v1/records/missing", None, &[("x-request-id", "bad id with spaces")]).await;
    assert_eq!(code, 404);
    assert_eq!(h["x-request-id"].len(), 32, "an invalid client id is replaced");
    let (code, h, p) = s.call("GET", "/v1/writes", None, &[]).await;
    assert_eq!((code, h["allow"].to_str().unwrap()), (405, "POST"));
    assert_eq!(p["type"], format!("{TYPE}method-not-allowed"));
    let (code, h, _) = s.call("DELETE", "/v1/records/x", None, &[]).await;
    assert_eq!((code, h["allow"].to_str().unwrap()), (405, "GET"));
    let (code, _, _) = s.call("GET", "/v1/writes/not-an-id", None, &[]).await;
    assert_eq!(code, 404);
}

/// Over the queue-depth limit, with the processor stopped, intake answers 429 with
/// Retry-After and enqueues nothing; once the processor runs, every write accepted
/// before is applied.
async fn backpressure_then_recovery(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("queue_depth_limit", "3"), ("shard_count", "1")]).start().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, v) = s.write(json!({"key": format!("k{i}"), "op": "put", "value": i})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let before = redis_state(&s);
    let (code, h, p) = s.call("POST", "/v1/writes", Some(json!({"key": "k9", "op": "put", "value": 9})), &[]).await;
    assert_eq!((code, p["type"].as_str()), (429, Some("https://spillway.dev/problems/queue-full")));
    assert_eq!(h["retry-after"], "1");
    assert_eq!(redis_state(&s), before);
    let (code, _, out) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!((code, out["applied"].as_u64()), (200, Some(3)), "{out}");
    for id in ids {
        let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        assert_eq!(st["status"], "applied");
    }
    let (code, _) = s.write(json!({"key": "k9", "op": "put", "value": 9})).await;
    assert_eq!(code, 202, "accepted again once drained");
}

/// With Redis unreachable, intake answers 503 with Retry-After.
async fn redis_down_is_503(engine: Engine) {
    let mut s = Spillway::builder().engine(engine).start().await;
    s.redis = crate::support::Redis::start(); // the app's Redis is dropped (stopped)
    let (code, h, p) = s.call("POST", "/v1/writes", Some(json!({"key": "a", "op": "delete"})), &[]).await;
    assert_eq!((code, p["type"].as_str()), (503, Some("https://spillway.dev/problems/unavailable")), "{p}");
    assert_eq!(h["retry-after"], "1");
    let (code, _, _) = s.call("GET", "/v1/writes/0-1-0", None, &[]).await;
    assert_eq!(code, 503);
}

/// Admin endpoints are disabled, not open, when no token is configured.
async fn admin_disabled_without_token(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("admin_token", "")]).start().await;
    for (method, path) in [("POST", "/v1/drain"), ("GET", "/v1/dead"), ("POST", "/v1/dead/replay"), ("DELETE", "/v1/cache/a"), ("PUT", "/v1/cache/a")] {
        let (code, _, p) = s.call(method, path, None, &[("authorization", "Bearer ")]).await;
        assert_eq!((code, p["type"].as_str()), (403, Some("https://spillway.dev/problems/forbidden")), "{method} {path}");
    }
}

/// Hostile keys stay inside the key prefix and never collide, and each reads back
/// as written; If-Match mismatches are 412; admin cache refresh and invalidate work.
async fn hostile_keys_stay_in_the_layout(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let keys = ["*", "{s1}:stream", "x:y", "é", "%2A", "spillway:{s0}:lease", "}{"];
    for (i, k) in keys.iter().enumerate() {
        let (code, v) = s.write(json!({"key": k, "op": "put", "value": i})).await;
        assert_eq!(code, 202, "{v}");
    }
    s.drain().await;
    let (all, _) = redis_state(&s);
    assert!(all.iter().all(|k| k.starts_with("spillway:")), "{all:?}");
    for (i, k) in keys.iter().enumerate() {
        let path = format!("/v1/records/{}", spillway_core::layout::encode_key(k));
        let (code, h, rec) = s.call("GET", &path, None, &[]).await;
        assert_eq!((code, rec["value"].as_u64()), (200, Some(i as u64)), "{k}: {rec}");
        let etag = h["etag"].to_str().unwrap().to_owned();
        let (code, _, p) = s.call("GET", &path, None, &[("if-match", "\"nope\"")]).await;
        assert_eq!((code, p["field"].as_str()), (412, Some("/headers/if-match")));
        let (code, _, _) = s.call("GET", &path, None, &[("if-match", &etag)]).await;
        assert_eq!(code, 200);
    }
    let cache_path = format!("/v1/cache/{}", spillway_core::layout::encode_key("*"));
    let (code, _, _) = s.admin("DELETE", &cache_path, None).await;
    assert_eq!(code, 204);
    let (code, _, rec) = s.admin("PUT", &cache_path, None).await;
    assert_eq!((code, rec["value"].as_u64()), (200, Some(0)));
    let (code, _, _) = s.admin("PUT", "/v1/cache/never-written", None).await;
    assert_eq!(code, 404);
}

/// The served OpenAPI document is the one kept in the repository.
async fn openapi_document_is_served(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let (code, _, doc) = s.call("GET", "/v1/openapi.json", None, &[]).await;
    assert_eq!(code, 200);
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(crate::support::workspace().join("api/openapi.json")).unwrap()).unwrap();
    assert_eq!(doc, kept);
    assert_eq!(doc["openapi"], "3.1.0");
}

/// Dead letters are listed and replayed onto the queue, then applied.
async fn dead_letters_list_and_replay(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("max_attempts", "1")]).start().await;
    s.store.fail_records().await;
    let (_, v) = s.write(json!({"key": "k", "op": "put", "value": 1})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    s.drain().await;
    s.drain().await;
    let (code, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(code, 200);
    assert_eq!(dead["dead"][0]["id"], id, "{dead}");
    assert_eq!(dead["dead"][0]["write"], json!({"key": "k", "op": "put", "value": 1}));
    // Repair the database, then replay.
    s.store.exec("DROP TABLE spillway_records").await;
    let (code, _, out) = s.admin("POST", "/v1/dead/replay", Some(json!({"ids": [id]}))).await;
    assert_eq!(code, 200, "{out}");
    let new_id = out["replayed"][0]["replayed_as"].as_str().unwrap().to_owned();
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
    assert_eq!(st, json!({"id": id, "status": "replayed", "replayed_as": new_id}));
    s.drain().await;
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{new_id}"), None, &[]).await;
    assert_eq!(st["status"], "applied", "{st}");
    let (_, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(dead["dead"], json!([]));
}

/// A dead letter whose write the database already applied (it committed, then its
/// acknowledgement kept failing) is not applied again by a replay: it is reported
/// as already applied and taken off the dead-letter list.
async fn replay_skips_dead_letters_already_applied(engine: Engine) {
    let s = Spillway::builder().engine(engine).vars(&[("max_attempts", "1")]).start().await;
    s.store.fail_records().await;
    let (_, v) = s.write(json!({"key": "k", "op": "incr", "field": "n"})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    s.drain().await;
    s.drain().await;
    let (_, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(dead["dead"][0]["id"], id, "{dead}");
    // The database has it (as if the commit went through and only the ack failed).
    s.store.exec("DROP TABLE spillway_records").await;
    s.store.exec(&format!("INSERT INTO spillway_writes (id, key, status, version, applied_at) VALUES ('{id}', 'k', 'applied', 1, 0)")).await;
    let (code, _, out) = s.admin("POST", "/v1/dead/replay", None).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out, json!({"replayed": [], "already_applied": [id]}));
    let (_, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(dead["dead"], json!([]));
    let queued: usize = (0..16).map(|i| redis::cmd("XLEN").arg(crate::support::layout().stream(i)).query::<usize>(&mut s.redis.conn()).unwrap()).sum();
    assert_eq!(queued, 0, "nothing was put back on the queue");
}

/// Scripts go by SHA1; when Redis forgets them (`SCRIPT FLUSH`, a restart) the next
/// request loads them again and succeeds. Regression: the `NOSCRIPT` answer was not
/// recognized in the client's wording, so warm instances answered 503.
async fn forgotten_scripts_are_loaded_again(engine: Engine) {
    let s = Spillway::builder().engine(engine).start().await;
    let (code, v) = s.write(json!({"key": "a", "op": "put", "value": 1})).await;
    assert_eq!(code, 202, "{v}");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut s.redis.conn()).unwrap();
    for _ in 0..3 {
        let (code, v) = s.write(json!({"key": "a", "op": "put", "value": 2})).await;
        assert_eq!(code, 202, "{v}");
    }
}

on_both_engines!(
    bad_writes_are_refused_and_change_nothing,
    routes_methods_and_request_ids,
    backpressure_then_recovery,
    redis_down_is_503,
    admin_disabled_without_token,
    hostile_keys_stay_in_the_layout,
    openapi_document_is_served,
    dead_letters_list_and_replay,
    replay_skips_dead_letters_already_applied,
    forgotten_scripts_are_loaded_again,
);
