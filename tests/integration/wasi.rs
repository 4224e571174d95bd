use serde_json::json;

use crate::support::{TestApp, probe, probe_manifest};

/// The guest sees exactly its `environment`, working clocks and random numbers.
#[tokio::test(flavor = "multi_thread")]
async fn environment_clocks_random() {
    let t = TestApp::write(&probe_manifest(r#"environment = { MODE = "test", EMPTY = "" }"#, ""), &[]);
    let app = t.load();
    let env = probe(&app, "/", json!({"op": "env"})).await;
    assert_eq!(env["ok"], json!([["EMPTY", ""], ["MODE", "test"]]));
    let w = probe(&app, "/", json!({"op": "wasi"})).await["ok"].clone();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for key in ["wall_secs", "p3_wall_secs"] {
        let t = w[key].as_u64().unwrap();
        assert!(t.abs_diff(now) < 60, "{key} = {t}, host {now}");
    }
    assert!(w["monotonic_ns"].as_u64().unwrap() > 0);
    assert_ne!(w["random_a"], w["random_b"]);
    assert_eq!(w["random_bytes"], 8);
}

/// Guest stdout and stderr reach the host (captured for the test).
#[tokio::test(flavor = "multi_thread")]
async fn guest_output_is_captured() {
    let t = TestApp::write(&probe_manifest("", ""), &[]);
    let app = t.load();
    probe(&app, "/", json!({"op": "log", "stdout": "to-stdout-123", "stderr": "to-stderr-456"})).await;
    let out = app.guest_output();
    assert!(out.contains("to-stdout-123") && out.contains("to-stderr-456"), "{out}");
}
