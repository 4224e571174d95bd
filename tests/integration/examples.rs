//! The apply step replaced by a manifest change (`[component.<id>.dependencies]`),
//! through the whole pipeline: the two examples under `examples/` (Rust and
//! Python), and a faulty implementation whose failing keys are dead-lettered
//! while the rest goes on.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::spillway::Spillway;
use crate::support::{fixture, fixtures, workspace};

/// The ids of a batch's writes, in order.
fn ids(accepted: &Value) -> Vec<String> {
    accepted["writes"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap().to_owned()).collect()
}

/// Each write's final status (`applied` / `rejected` / `dead`) and, when
/// rejected, its reason.
async fn outcomes(s: &Spillway, ids: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for id in ids {
        let st = s.settled(id).await;
        out.push((st["status"].as_str().unwrap_or_default().to_owned(), st["reason"].as_str().unwrap_or_default().to_owned()));
    }
    out
}

/// The Python example, built with componentize-py (once per test binary).
fn inventory_wasm() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let ws = workspace();
            let out = fixtures().join("inventory.wasm");
            let status = std::process::Command::new("componentize-py")
                .current_dir(&ws)
                .args(["-d", "wit", "-w", "spillway:pipeline/provider@0.1.0", "componentize", "-p", "examples/inventory-python", "app", "-o"])
                .arg(&out)
                .status()
                .expect("componentize-py runs (pip install -r examples/inventory-python/requirements.txt)");
            assert!(status.success(), "componentize-py built the example");
            out
        })
        .clone()
}

/// The Rust example: intake accepts only the operations the leaderboard
/// declares; the processor applies them, rejecting impossible scores with a
/// reason; the board keeps each player's best.
#[tokio::test(flavor = "multi_thread")]
async fn rust_leaderboard_through_the_pipeline() {
    let s = Spillway::builder().apply(Path::new(&fixture("leaderboard"))).with_trigger().start().await;
    let (code, v) = s.write(json!({"key": "board", "op": "put", "value": 1})).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("expected score or reset"), "{v}");
    let (code, v) = s.write(json!({"op": "score", "player": "ann", "points": 1})).await;
    assert_eq!((code, v["field"].as_str()), (422, Some("/key")), "{v}");

    let (code, v) = s
        .write(json!({"writes": [
            {"key": "board", "op": "score", "player": "ann", "points": 120},
            {"key": "board", "op": "score", "player": "bob", "points": 5_000_000},
            {"key": "board", "op": "score", "player": "bob", "points": 90},
            {"key": "board", "op": "score", "player": "ann", "points": 80},
            {"key": "board", "op": "score", "player": "cy", "points": -4},
            {"key": "board", "op": "score", "player": "cy", "points": 100, "if_version": 3},
            {"key": "other", "op": "score", "player": "dee", "points": 7},
            {"key": "other", "op": "reset"}
        ]}))
        .await;
    assert_eq!(code, 202, "{v}");
    let got = outcomes(&s, &ids(&v)).await;
    let statuses: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["applied", "rejected", "applied", "applied", "rejected", "applied", "applied", "applied"]);
    assert!(got[1].1.contains("impossible score 5000000"), "{got:?}");
    assert!(got[4].1.contains("impossible score -4"), "{got:?}");

    let (code, _, board) = s.call("GET", "/v1/records/board", None, &[]).await;
    assert_eq!(code, 200, "{board}");
    assert_eq!(board["value"], json!({"top": [{"player": "ann", "points": 120}, {"player": "cy", "points": 100}, {"player": "bob", "points": 90}]}));
    assert_eq!(board["version"], 4);
    let (code, _, _) = s.call("GET", "/v1/records/other", None, &[]).await;
    assert_eq!(code, 404, "reset deletes the board");
}

/// The Python example (componentize-py): stock is restocked and ordered;
/// orders beyond the stock or above the buyer's price are rejected with the
/// reason.
#[tokio::test(flavor = "multi_thread")]
async fn python_inventory_through_the_pipeline() {
    let s = Spillway::builder().apply(&inventory_wasm()).with_trigger().start().await;
    let (code, v) = s.write(json!({"key": "sku-1", "op": "incr", "field": "stock"})).await;
    assert_eq!(code, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("expected restock or order"), "{v}");

    let (code, v) = s
        .write(json!({"writes": [
            {"key": "sku-1", "op": "order", "quantity": 1},
            {"key": "sku-1", "op": "restock", "quantity": 10, "price": 5},
            {"key": "sku-1", "op": "order", "quantity": 3},
            {"key": "sku-1", "op": "order", "quantity": 8},
            {"key": "sku-1", "op": "order", "quantity": 2, "max_price": 4},
            {"key": "sku-1", "op": "order", "quantity": 7, "max_price": 5},
            {"key": "sku-1", "op": "order", "quantity": 0}
        ]}))
        .await;
    assert_eq!(code, 202, "{v}");
    let got = outcomes(&s, &ids(&v)).await;
    let statuses: Vec<&str> = got.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["rejected", "applied", "applied", "rejected", "rejected", "applied", "rejected"], "{got:?}");
    assert!(got[0].1.contains("only 0 in stock"), "{got:?}");
    assert!(got[3].1.contains("only 7 in stock, 8 ordered"), "{got:?}");
    assert!(got[4].1.contains("above max_price 4"), "{got:?}");
    assert!(got[6].1.contains("quantity must be"), "{got:?}");
    let (code, _, rec) = s.call("GET", "/v1/records/sku-1", None, &[]).await;
    assert_eq!(code, 200, "{rec}");
    assert_eq!(rec["value"], json!({"stock": 0, "price": 5, "sold": 10}));
    assert_eq!(rec["version"], 3);
}

/// An implementation that traps on some keys and returns an error on others:
/// only those keys' writes are dead-lettered (the error's with its message,
/// the trap's after `max_attempts` deliveries), every other write of the same
/// batches is applied exactly once, and the pipeline goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_apply_step_dead_letters_only_its_keys() {
    let vars = [("shard_count", "1"), ("lease_ttl_ms", "500"), ("max_attempts", "3")];
    let s = Spillway::builder().apply(Path::new(&fixture("fixture_apply_faulty"))).vars(&vars).with_trigger().start().await;
    let mut writes = Vec::new();
    for i in 0..40 {
        writes.push(json!({"key": format!("good-{}", i % 10), "op": "incr", "field": "n"}));
        if i % 10 == 3 {
            writes.push(json!({"key": "trap-a", "op": "incr", "field": "n"}));
            writes.push(json!({"key": "error-b", "op": "incr", "field": "n"}));
        }
    }
    let mut accepted = Vec::new();
    for chunk in writes.chunks(16) {
        let (code, v) = s.write(json!({"writes": chunk})).await;
        assert_eq!(code, 202, "{v}");
        accepted.extend(ids(&v).into_iter().zip(chunk.iter().map(|w| w["key"].as_str().unwrap().to_owned())));
    }
    for (id, key) in &accepted {
        let st = s.settled(id).await;
        let expected = if key.starts_with("good-") { "applied" } else { "dead" };
        assert_eq!(st["status"], expected, "{key}: {st}");
    }
    for i in 0..10 {
        let (_, _, rec) = s.call("GET", &format!("/v1/records/good-{i}"), None, &[]).await;
        assert_eq!(rec["value"], json!({"n": 4}), "good-{i}: every increment once");
    }
    let (code, _, dead) = s.admin("GET", "/v1/dead", None).await;
    assert_eq!(code, 200, "{dead}");
    let dead = dead["dead"].as_array().unwrap();
    assert_eq!(dead.len(), 8, "{dead:?}");
    for d in dead {
        let key = d["write"]["key"].as_str().unwrap();
        let error = d["error"].as_str().unwrap();
        match key {
            "error-b" => assert!(error.contains("the faulty fixture refuses error-b"), "{d}"),
            "trap-a" => assert!(error.contains("trapped"), "{d}"),
            other => panic!("{other} dead-lettered: {d}"),
        }
    }
    // The pipeline goes on.
    let (_, v) = s.write(json!({"key": "good-0", "op": "incr", "field": "n"})).await;
    assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
}

/// Spin's rule for dependencies: one inherits none of its parent's
/// configuration unless the manifest says so (the environment here), and a
/// dependency that matches no import, or a form this host does not fetch, is a
/// load error naming it.
#[tokio::test(flavor = "multi_thread")]
async fn dependencies_inherit_only_what_the_manifest_grants() {
    let faulty = fixture("fixture_apply_faulty");
    let with_env = |m: String| m.replace("[component.processor]\n", "[component.processor]\nenvironment = { GREETING = \"hi\" }\n");
    for (inherit, expected) in [(false, 0), (true, 1)] {
        let s = Spillway::builder().apply(Path::new(&faulty)).edit(move |m| {
            let m = with_env(m);
            if inherit { m.replace("[component.processor]\n", "[component.processor]\ndependencies_inherit_configuration = true\n") } else { m }
        }).with_trigger().start()
        .await;
        let (_, v) = s.write(json!({"key": "env-probe", "op": "delete"})).await;
        assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
        let (_, _, rec) = s.call("GET", "/v1/records/env-probe", None, &[]).await;
        assert_eq!(rec["value"], json!({"env": expected}), "inherit {inherit}");
    }

    let redis = crate::support::Redis::start();
    let state = tempfile::tempdir().unwrap();
    let ws = workspace();
    let manifest = std::fs::read_to_string(ws.join("spin.toml")).unwrap().replace("= \"target/", &format!("= \"{}/target/", ws.display()));
    for (from, to, says) in [
        ("\"spillway:pipeline/apply@0.1.0\" = { path", "\"spillway:pipeline/other@0.1.0\" = { path", "doesn't match any imports of component"),
        ("\"spillway:pipeline/apply@0.1.0\" = { path", "\"spillway:pipeline/apply@0.1.0\" = { pth", "expected `path`"),
        ("\"spillway:pipeline/apply@0.1.0\" = { path", "\"spillway:pipeline/apply@0.1.0\" = { version = \"0.1.0\" }\nx = { path", "not supported by this host"),
    ] {
        let path = state.path().join("spin.toml");
        std::fs::write(&path, manifest.replacen(from, to, 1)).unwrap();
        let mut opts = crate::spillway::options(&redis, state.path(), &[]);
        opts.manifest = path;
        let e = spillway_testhost::App::load(&opts).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains(says), "{to}: {e}");
    }
}
