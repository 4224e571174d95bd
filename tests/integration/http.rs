use serde_json::{Value, json};
use spillway_testhost::{App, Hosted, InstanceReuse};

use crate::support::{TestApp, get, probe};

const ROUTES: &str = r#"spin_manifest_version = 2
[application]
name = "routes"
[[trigger.http]]
route = "/..."
component = "all"
[[trigger.http]]
route = "/v1/records/..."
component = "records"
[[trigger.http]]
route = "/v1/records"
component = "exact"
[[trigger.http]]
route = "/users/:user_id/..."
component = "users"
[component.all]
source = "{probe}"
[component.records]
source = "{probe}"
[component.exact]
source = "{probe}"
[component.users]
source = "{probe}"
"#;

async fn seen(app: &App, path: &str) -> Value {
    let (status, body) = get(app, path).await;
    assert_eq!(status, 200, "{path}");
    serde_json::from_slice(&body).unwrap()
}

/// A wildcard route gives the component Spin's `spin-*` headers with Spin's values.
#[tokio::test(flavor = "multi_thread")]
async fn spin_headers_match_spin() {
    let app = TestApp::write(ROUTES, &[]).load();
    let v = seen(&app, "/v1/records/abc?x=1").await;
    let h = &v["headers"];
    assert_eq!(h["spin-path-info"], "/abc");
    assert_eq!(h["spin-full-url"], "http://127.0.0.1:3000/v1/records/abc?x=1");
    assert_eq!(h["spin-matched-route"], "/v1/records/...");
    assert_eq!(h["spin-base-path"], "/");
    assert_eq!(h["spin-raw-component-route"], "/v1/records/...");
    assert_eq!(h["spin-component-route"], "/v1/records");
    assert_eq!(h["spin-client-addr"], "127.0.0.1:0");
    assert_eq!(v["uri"], "http://127.0.0.1:3000/v1/records/abc?x=1");
    assert_eq!(v["method"], "GET");
}

/// Exact beats wildcard and the longest wildcard wins, whatever the manifest order;
/// `:name` segments arrive as `spin-path-match-*` headers.
#[tokio::test(flavor = "multi_thread")]
async fn routing_precedence() {
    let app = TestApp::write(ROUTES, &[]).load();
    let exact = seen(&app, "/v1/records").await;
    assert_eq!(exact["headers"]["spin-matched-route"], "/v1/records");
    assert_eq!(exact["headers"]["spin-path-info"], "");
    let other = seen(&app, "/v1/writes/1").await;
    assert_eq!(other["headers"]["spin-matched-route"], "/...");
    assert_eq!(other["headers"]["spin-path-info"], "/v1/writes/1");
    let user = seen(&app, "/users/42/posts").await;
    assert_eq!(user["headers"]["spin-path-match-user-id"], "42");
    assert_eq!(user["headers"]["spin-path-info"], "/posts");
}

/// A path no route matches gets Spin's empty 404.
#[tokio::test(flavor = "multi_thread")]
async fn unmatched_path_is_an_empty_404() {
    let app = TestApp::write(&ROUTES.replace("route = \"/...\"", "route = \"/only\""), &[]).load();
    let (status, body) = get(&app, "/nothing/here").await;
    assert_eq!(status, 404);
    assert!(body.is_empty());
}

/// A guest that traps answers an empty 500, and the app keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_trap_is_a_500_and_serving_goes_on() {
    let app = TestApp::write(ROUTES, &[]).load();
    let req = http::Request::post("http://127.0.0.1:3000/x")
        .body(bytes::Bytes::from(json!({"op": "panic"}).to_string()))
        .unwrap();
    let res = app.handle(req).await.unwrap();
    assert_eq!(res.status(), 500);
    assert!(res.body().is_empty());
    assert_eq!(seen(&app, "/x").await["method"], "GET");
}

/// The hosted platform's limits as the host emulates them (here 300 ms and
/// 32 MiB): a request whose response is not begun in time is cut off (`504`)
/// and its instance stopped, not left running; an instance that asks for more
/// memory than the limit, all its linear memories together, is refused it (the
/// guest fails: `500`). The component's peaks count both and stay within the
/// limits.
#[tokio::test(flavor = "multi_thread")]
async fn the_hosted_platforms_time_and_memory_limits_hold() {
    let t = TestApp::write(ROUTES, &[]);
    let mut opts = t.options();
    let limits = Hosted { request_limit: std::time::Duration::from_millis(300), memory_limit: 32 << 20, ..Hosted::AKAMAI_FUNCTIONS };
    opts.hosted = Some(limits);
    let app = App::load(&opts).unwrap();
    let post = async |cmd: Value| {
        let req = http::Request::post("http://127.0.0.1:3000/x").body(bytes::Bytes::from(cmd.to_string())).unwrap();
        app.handle(req).await.unwrap().status().as_u16()
    };
    assert_eq!(post(json!({"op": "alloc", "mib": 4})).await, 200, "within the limits");
    let within = app.peaks()["all"];
    assert!(within.memory_bytes >= 4 << 20 && within.memory_bytes < limits.memory_limit, "{within:?}");
    assert_eq!((within.cut_off, within.memory_refused), (0, 0), "{within:?}");
    assert_eq!(post(json!({"op": "busy", "ms": 3000})).await, 504, "cut off at the time limit");
    // The instance is stopped at the limit, not left to run its 3 s.
    crate::support::eventually("the cut-off instance is gone", std::time::Duration::from_secs(10), async || app.peaks()["all"].longest_instance >= limits.request_limit).await;
    let cut = app.peaks()["all"];
    assert!(cut.cut_off >= 1 && cut.longest_instance < std::time::Duration::from_millis(1500), "{cut:?}");
    assert_eq!(post(json!({"op": "alloc", "mib": 64})).await, 500, "refused the memory");
    let refused = app.peaks()["all"];
    assert!(refused.memory_refused >= 1 && refused.memory_bytes <= limits.memory_limit, "{refused:?}");
}

async fn counters(reuse: InstanceReuse) -> Vec<u64> {
    let t = TestApp::write(ROUTES, &[]);
    let mut opts = t.options();
    opts.reuse = reuse;
    let app = App::load(&opts).unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(probe(&app, "/c", json!({"op": "counter"})).await["ok"].as_u64().unwrap());
    }
    out
}

/// Sequential requests reuse one WASIp3 instance, as Spin 4 does by default; with
/// reuse off every request gets a fresh instance.
#[tokio::test(flavor = "multi_thread")]
async fn instance_reuse_and_isolation() {
    assert_eq!(counters(InstanceReuse::SPIN_DEFAULT).await, vec![1, 2, 3]);
    assert_eq!(counters(InstanceReuse::PER_REQUEST).await, vec![1, 1, 1]);
    let two = InstanceReuse { max_requests: 2, ..InstanceReuse::SPIN_DEFAULT };
    assert_eq!(counters(two).await, vec![1, 2, 1]);
}
