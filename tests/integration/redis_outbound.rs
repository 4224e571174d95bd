use redis::Commands as _;
use serde_json::json;
use spillway_testhost::App;

use crate::support::{Redis, TestApp, free_port, probe, probe_manifest};

fn app_for(port: u16) -> App {
    let t = TestApp::write(
        &probe_manifest(
            r#"allowed_outbound_hosts = ["redis://127.0.0.1:{{ redis_port }}"]"#,
            r#"[variables]
redis_port = { default = "6379" }"#,
        ),
        &[],
    );
    let mut opts = t.options();
    opts.variables.insert("redis_port".into(), port.to_string());
    let app = App::load(&opts).unwrap();
    std::mem::forget(t.dir); // keep the directory for the app's lifetime
    app
}

/// The typed commands work against a real server.
#[tokio::test(flavor = "multi_thread")]
async fn typed_commands() {
    let redis = Redis::start();
    let app = app_for(redis.port);
    let out = probe(
        &app,
        "/",
        json!({"op": "redis", "address": redis.url(), "commands": [
            ["set", "k", "v"], ["get", "k"], ["get", "none"], ["incr", "n"], ["incr", "n"],
            ["sadd", "s", "a", "b"], ["srem", "s", "a"], ["smembers", "s"], ["del", "k", "n", "zz"],
            ["publish", "chan", "hi"]
        ]}),
    )
    .await;
    assert_eq!(out, json!({"ok": [null, "v", null, 1, 2, 2, 1, ["b"], 2, null]}));
    assert!(!redis.conn().exists::<_, bool>("k").unwrap());
}

/// `execute` flattens nested replies into one list as Spin does, with status, int,
/// nil and binary values.
#[tokio::test(flavor = "multi_thread")]
async fn execute_flattens_replies() {
    let redis = Redis::start();
    let app = app_for(redis.port);
    let out = probe(
        &app,
        "/",
        json!({"op": "redis", "address": redis.url(), "commands": [
            ["SET", "a", "x"], ["GET", "nope"], ["PING"], ["INCRBY", "c", "5"],
            ["EVAL", "return {1, {2, 'x'}, 'y'}", "0"]
        ]}),
    )
    .await;
    assert_eq!(
        out["ok"],
        json!([
            [{"status": "OK"}], [{"nil": null}], [{"status": "PONG"}], [{"int": 5}],
            [{"int": 1}, {"int": 2}, {"binary": "x"}, {"binary": "y"}]
        ])
    );
}

/// A Redis error reply reaches the guest as `other` with the server's message.
#[tokio::test(flavor = "multi_thread")]
async fn error_reply_is_other() {
    let redis = Redis::start();
    let app = app_for(redis.port);
    let out = probe(&app, "/", json!({"op": "redis", "address": redis.url(), "commands": [["SET", "l", "x"], ["LPUSH", "l", "y"]]})).await;
    assert_eq!(out["err"], "other");
    assert!(out["detail"].as_str().unwrap().contains("WRONGTYPE"), "{out}");
}

/// An address outside `allowed_outbound_hosts` is refused with `invalid-address`
/// before any connection is made.
#[tokio::test(flavor = "multi_thread")]
async fn disallowed_address_is_invalid_address() {
    let redis = Redis::start();
    let app = app_for(redis.port + 1);
    let out = probe(&app, "/", json!({"op": "redis", "address": redis.url(), "commands": []})).await;
    assert_eq!(out, json!({"err": "invalid-address", "detail": null}));
    let localhost = format!("redis://localhost:{}", redis.port);
    let out = probe(&app_for(redis.port), "/", json!({"op": "redis", "address": localhost, "commands": []})).await;
    assert_eq!(out["err"], "invalid-address", "hosts compare literally");
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut redis.conn()).unwrap();
    assert_eq!(clients.lines().count(), 1, "only our own connection: {clients}");
}

/// An allowed address with no server is an `other` error, not a trap.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_server_is_other() {
    let port = free_port();
    let out = probe(&app_for(port), "/", json!({"op": "redis", "address": format!("redis://127.0.0.1:{port}"), "commands": []})).await;
    assert_eq!(out["err"], "other", "{out}");
}
