use serde_json::json;
use spillway_testhost::App;

use crate::support::{TestApp, probe, probe_manifest};

fn app() -> TestApp {
    TestApp::write(
        &probe_manifest(
            r#"variables = { greeting = "hello {{ who }}!", token = "{{ secret_token }}" }"#,
            r#"[variables]
who = { default = "world" }
secret_token = { required = true, secret = true }"#,
        ),
        &[],
    )
}

async fn var(app: &App, name: &str) -> serde_json::Value {
    probe(app, "/", json!({"op": "variable", "name": name})).await
}

/// Component variables are templates over application variables; overrides win over
/// defaults.
#[tokio::test(flavor = "multi_thread")]
async fn templates_defaults_and_overrides() {
    let t = app();
    let mut opts = t.options();
    opts.variables.insert("secret_token".into(), "s3cret".into());
    let a = App::load(&opts).unwrap();
    assert_eq!(var(&a, "greeting").await, json!({"ok": "hello world!"}));
    assert_eq!(var(&a, "token").await, json!({"ok": "s3cret"}));
    opts.variables.insert("who".into(), "spin".into());
    let b = App::load(&opts).unwrap();
    assert_eq!(var(&b, "greeting").await, json!({"ok": "hello spin!"}));
}

/// An undeclared name is `undefined` and a malformed one `invalid-name`, with Spin's
/// messages; application variables are not visible unless mapped.
#[tokio::test(flavor = "multi_thread")]
async fn error_variants() {
    let t = app();
    let mut opts = t.options();
    opts.variables.insert("secret_token".into(), "x".into());
    let a = App::load(&opts).unwrap();
    assert_eq!(var(&a, "who").await, json!({"err": "undefined", "detail": "no variable for \"probe\".\"who\""}));
    let v = var(&a, "Bad").await;
    assert_eq!(v["err"], "invalid-name");
    assert!(v["detail"].as_str().unwrap().contains("invalid character 'B'"), "{v}");
}

/// A required variable with no value stops the app at load, naming the variable
/// and how to set it.
#[test]
fn required_variable_without_value_fails_to_load() {
    let t = app();
    let e = App::load(&t.options()).err().expect("load fails");
    let msg = format!("{e:#}");
    assert!(msg.contains("secret_token") && msg.contains("SPIN_VARIABLE_SECRET_TOKEN"), "{msg}");
}

/// A template naming an unknown variable is a load error that names it.
#[test]
fn unknown_template_variable_fails_to_load() {
    let t = TestApp::write(&probe_manifest(r#"variables = { a = "{{ nope }}" }"#, ""), &[]);
    let msg = format!("{:#}", App::load(&t.options()).err().expect("load fails"));
    assert!(msg.contains("unknown variable \"nope\"") && msg.contains("probe"), "{msg}");
}
