use serde_json::json;
use spillway_testhost::App;

use crate::support::{TestApp, probe, probe_manifest};

/// Statements run against the default database file; values keep their storage class.
#[tokio::test(flavor = "multi_thread")]
async fn statements_and_value_mapping() {
    let t = TestApp::write(&probe_manifest(r#"sqlite_databases = ["default"]"#, ""), &[]);
    let app = t.load();
    let out = probe(
        &app,
        "/",
        json!({"op": "sqlite", "db": "default", "statements": [
            {"sql": "CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)"},
            {"sql": "INSERT INTO t VALUES (?, ?, ?, ?, ?)", "params": [7, 1.5, "x", {"blob": "bin"}, null]},
            {"sql": "SELECT i, r, s, b, n FROM t"}
        ]}),
    )
    .await;
    let results = out["ok"].as_array().unwrap();
    assert_eq!(results[1]["changes"], 1);
    assert_eq!(results[2]["columns"], json!(["i", "r", "s", "b", "n"]));
    assert_eq!(results[2]["rows"], json!([[7, 1.5, "x", {"blob": "bin"}, null]]));
    let db = rusqlite::Connection::open(t.path(".spin/sqlite_db.db")).unwrap();
    let n: i64 = db.query_row("SELECT i FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 7);
}

/// SQL errors come back as `io(<SQLite's message>)`, and, as in Spin, from the row
/// stream's result rather than from `execute` itself: a statement on a table that
/// does not exist yet "succeeds" at the call (regression: the cache answered 503 on
/// a fresh app under Spin because it only expected the error at the call).
#[tokio::test(flavor = "multi_thread")]
async fn sql_errors_are_io_and_arrive_with_the_rows() {
    let t = TestApp::write(&probe_manifest(r#"sqlite_databases = ["default"]"#, ""), &[]);
    let app = t.load();
    for sql in ["SELECT * FROM nope", "SELEKT 1", "INSERT INTO t VALUES (1)"] {
        let out = probe(&app, "/", json!({"op": "sqlite", "db": "default", "statements": [{"sql": sql}]})).await;
        assert_eq!(out["err"], "io", "{sql}: {out}");
        assert_eq!(out["detail"]["at"], "rows", "{sql}: {out}");
    }
    let out = probe(&app, "/", json!({"op": "sqlite", "db": "default", "statements": [{"sql": "SELECT * FROM nope"}]})).await;
    assert_eq!(out, json!({"err": "io", "detail": {"detail": "no such table: nope", "at": "rows"}}));
}

/// A database the component does not list is `access-denied`.
#[tokio::test(flavor = "multi_thread")]
async fn undeclared_database_is_access_denied() {
    let t = TestApp::write(&probe_manifest("", ""), &[]);
    let out = probe(&t.load(), "/", json!({"op": "sqlite", "db": "default", "statements": []})).await;
    assert_eq!(out, json!({"err": "access-denied", "detail": null}));
}

/// A database label defined only in the runtime config is usable; without it the
/// app does not load, with Spin's message.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_config_database() {
    let db_path = tempfile::tempdir().unwrap();
    let file = db_path.path().join("orders.db");
    let rc = format!("[sqlite_database.orders]\ntype = \"spin\"\npath = \"{}\"\n", file.display());
    let t = TestApp::write(&probe_manifest(r#"sqlite_databases = ["orders"]"#, ""), &[("rc.toml", &rc)]);
    let msg = format!("{:#}", App::load(&t.options()).err().expect("load fails without runtime config"));
    assert!(msg.contains("Component probe uses database 'orders'"), "{msg}");
    let mut opts = t.options();
    opts.runtime_config = Some(t.path("rc.toml"));
    let app = App::load(&opts).unwrap();
    probe(&app, "/", json!({"op": "sqlite", "db": "orders", "statements": [{"sql": "CREATE TABLE o (id)"}]})).await;
    let db = rusqlite::Connection::open(&file).unwrap();
    let n: i64 = db.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'o'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1);
}
