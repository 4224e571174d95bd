use redis::Commands as _;
use serde_json::json;
use spillway_testhost::App;

use crate::support::{Redis, TestApp, free_port, probe, probe_manifest};

/// The default store is Spin's SQLite file under `.spin/`, with Spin's table, and
/// every operation works on it.
#[tokio::test(flavor = "multi_thread")]
async fn default_store_is_spins_sqlite_file() {
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["default"]"#, ""), &[]);
    let app = t.load();
    let out = probe(
        &app,
        "/",
        json!({"op": "kv", "label": "default", "actions": [
            ["set", "a", "1"], ["set", "b", "2"], ["set", "a", "3"],
            ["get", "a"], ["get", "missing"], ["exists", "b"], ["delete", "b"], ["exists", "b"], ["keys"]
        ]}),
    )
    .await;
    assert_eq!(out, json!({"ok": [null, null, null, "3", null, true, null, false, ["a"]]}));
    let db = rusqlite::Connection::open(t.path(".spin/sqlite_key_value.db")).unwrap();
    let (store, value): (String, Vec<u8>) = db
        .query_row("SELECT store, value FROM spin_key_value WHERE key = 'a'", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!((store.as_str(), value.as_slice()), ("default", b"3".as_slice()));
}

/// A label the component does not list is refused with `access-denied`.
#[tokio::test(flavor = "multi_thread")]
async fn undeclared_label_is_access_denied() {
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["default"]"#, ""), &[]);
    let app = t.load();
    let out = probe(&app, "/", json!({"op": "kv", "label": "other", "actions": []})).await;
    assert_eq!(out, json!({"err": "access-denied", "detail": null}));
    let t = TestApp::write(&probe_manifest("", ""), &[]);
    let out = probe(&t.load(), "/", json!({"op": "kv", "label": "default", "actions": []})).await;
    assert_eq!(out["err"], "access-denied");
}

/// With runtime config `type = "redis"`, the store lives in Redis under the keys as
/// given.
#[tokio::test(flavor = "multi_thread")]
async fn redis_store_per_runtime_config() {
    let redis = Redis::start();
    let rc = format!("[key_value_store.cache]\ntype = \"redis\"\nurl = \"{}\"\n", redis.url());
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["cache"]"#, ""), &[("rc.toml", &rc)]);
    let mut opts = t.options();
    opts.runtime_config = Some(t.path("rc.toml"));
    let app = App::load(&opts).unwrap();
    let out = probe(
        &app,
        "/",
        json!({"op": "kv", "label": "cache", "actions": [["set", "k1", "v1"], ["set", "k2", "v2"], ["delete", "k2"], ["get", "k1"], ["exists", "k2"], ["keys"]]}),
    )
    .await;
    assert_eq!(out, json!({"ok": [null, null, null, "v1", false, ["k1"]]}));
    let stored: String = redis.conn().get("k1").unwrap();
    assert_eq!(stored, "v1");
}

/// A Redis store that cannot be reached fails with `other`, not a trap, and (as in
/// Spin, whose Redis store connects when it is opened) already at `open`.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_redis_store_is_other_error() {
    let rc = format!("[key_value_store.cache]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n", free_port());
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["cache"]"#, ""), &[("rc.toml", &rc)]);
    let mut opts = t.options();
    opts.runtime_config = Some(t.path("rc.toml"));
    let app = App::load(&opts).unwrap();
    let out = probe(&app, "/", json!({"op": "kv", "label": "cache", "actions": [["get", "k"]]})).await;
    assert_eq!(out["err"], "other", "{out}");
    let out = probe(&app, "/", json!({"op": "kv", "label": "cache", "actions": []})).await;
    assert_eq!(out["err"], "other", "the open itself fails: {out}");
}

/// A listed label with no configured store stops the app at load, as in Spin.
#[test]
fn unconfigured_label_fails_to_load() {
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["nowhere"]"#, ""), &[]);
    let msg = format!("{:#}", App::load(&t.options()).err().expect("load fails"));
    assert!(msg.contains("unknown key_value_stores label \"nowhere\" for component \"probe\""), "{msg}");
}

/// With runtime config `type = "spin"` and a relative `path`, the store is a SQLite
/// file beside the runtime config file, as in Spin.
#[tokio::test(flavor = "multi_thread")]
async fn spin_store_path_is_relative_to_runtime_config() {
    let rc = "[key_value_store.local]\ntype = \"spin\"\npath = \"data/kv.db\"\n";
    let t = TestApp::write(&probe_manifest(r#"key_value_stores = ["local"]"#, ""), &[("rc.toml", rc)]);
    let mut opts = t.options();
    opts.runtime_config = Some(t.path("rc.toml"));
    let app = App::load(&opts).unwrap();
    let out = probe(&app, "/", json!({"op": "kv", "label": "local", "actions": [["set", "x", "1"]]})).await;
    assert_eq!(out, json!({"ok": [null]}));
    let db = rusqlite::Connection::open(t.path("data/kv.db")).unwrap();
    let store: String = db.query_row("SELECT store FROM spin_key_value WHERE key = 'x'", [], |r| r.get(0)).unwrap();
    assert_eq!(store, "local");
}
