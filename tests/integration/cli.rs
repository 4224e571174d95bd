use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use crate::support::{Redis, TestApp, free_port, probe_manifest, workspace};

fn host() -> Command {
    crate::support::fixtures();
    let mut c = Command::new(crate::support::host_program());
    c.env("SPILLWAY_HOST_CACHE_DIR", workspace().join("target/wasmtime-cache"));
    c
}

/// A running `spillway-host up`, killed on drop.
struct Up {
    child: Child,
    url: String,
    listing: Vec<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn up(t: &TestApp, env: &[(&str, &str)]) -> Up {
    let port = free_port();
    let mut child = host()
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "-f"])
        .arg(t.path("spin.toml"))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listing = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("  ");
        listing.push(line);
        if done {
            break;
        }
    }
    Up { child, url: format!("127.0.0.1:{port}"), listing }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `up` prints the routes like `spin up` and serves them over TCP.
#[test]
fn up_prints_routes_and_serves() {
    let t = TestApp::write(&probe_manifest("", ""), &[]);
    let u = up(&t, &[]);
    assert_eq!(u.listing, vec![
        String::new(),
        format!("Serving http://{}", u.url),
        "Available Routes:".to_owned(),
        format!("  probe: http://{} (wildcard)", u.url),
    ]);
    let res = http_get(&u.url, "/hello?x=1");
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(res.contains(&format!("\"spin-full-url\":\"http://{}/hello?x=1\"", u.url)), "{res}");
}

/// `SPIN_VARIABLE_<NAME>` in the environment sets a variable, as with Spin.
#[test]
fn environment_sets_variables() {
    let t = TestApp::write(
        &probe_manifest(r#"variables = { v = "{{ api_key }}" }"#, "[variables]\napi_key = { required = true }"),
        &[],
    );
    let u = up(&t, &[("SPIN_VARIABLE_API_KEY", "from-env")]);
    let mut s = TcpStream::connect(&u.url).unwrap();
    let body = r#"{"op":"variable","name":"v"}"#;
    write!(s, "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.ends_with(r#"{"ok":"from-env"}"#), "{out}");
}

fn fails(t: &TestApp, extra: &[&str]) -> String {
    let out = host().args(["up", "--listen", "127.0.0.1:0", "-f"]).arg(t.path("spin.toml")).args(extra).output().unwrap();
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Startup errors say what is wrong and where, and never panic.
#[test]
fn clear_startup_errors() {
    let bad_key = TestApp::write(&probe_manifest("colour = \"red\"", ""), &[]);
    let e = fails(&bad_key, &[]);
    assert!(e.contains("invalid manifest") && e.contains("colour"), "{e}");

    let missing = TestApp::write(&probe_manifest("", "").replace("{probe}", "/nonexistent/x.wasm"), &[]);
    let e = fails(&missing, &[]);
    assert!(e.contains("/nonexistent/x.wasm") && e.contains("does not exist"), "{e}");

    let required = TestApp::write(&probe_manifest("", "[variables]\ntoken = { required = true }"), &[]);
    let e = fails(&required, &[]);
    assert!(e.contains("no value for required variable(s): token (set SPIN_VARIABLE_TOKEN)"), "{e}");

    let rc = TestApp::write(&probe_manifest("", ""), &[("rc.toml", "[key_value_store.x]\ntype = \"mongo\"\n")]);
    let e = fails(&rc, &["--runtime-config-file", rc.path("rc.toml").to_str().unwrap()]);
    assert!(e.contains("rc.toml") && e.contains("'mongo' was not registered"), "{e}");
}

/// A Redis trigger whose server is down stops `up` with an error naming the address.
#[test]
fn unreachable_trigger_redis_is_reported() {
    let redis = Redis::start();
    let port = redis.port;
    drop(redis);
    let manifest = format!(
        r#"spin_manifest_version = 2
[application]
name = "sub"
[application.trigger.redis]
address = "redis://127.0.0.1:{port}"
[[trigger.redis]]
channel = "c"
component = "subscriber"
[component.subscriber]
source = "{{subscriber}}"
"#
    );
    let t = TestApp::write(&manifest, &[]);
    let e = fails(&t, &[]);
    assert!(e.contains(&format!("Redis trigger failed to connect to redis://127.0.0.1:{port}")), "{e}");
}

/// As Spin: when the Redis trigger's connection drops (Redis stops), the trigger
/// ends and `up` exits with "A trigger exited unexpectedly. Terminating." rather
/// than serving HTTP without its trigger (run it under a supervisor).
#[test]
fn up_exits_when_the_trigger_loses_redis() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, processor) = crate::processes::manifests(dir.path());
    let mut host = crate::processes::spawn(&processor, &dir.path().join("state"), &redis.url(), &[], true);
    drop(redis); // SIGKILL
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = host.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "up kept running without its trigger");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success(), "up exits with an error status when its trigger ends");
    let printed = host.stdout.lock().unwrap().join("\n");
    assert!(printed.contains("A trigger exited unexpectedly. Terminating."), "{printed}");
}
