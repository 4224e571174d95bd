//! Shared test support: a real `redis-server` per test on a free loopback port, the
//! guest fixtures built once per test binary, and applications written to temporary
//! directories.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use bytes::Bytes;
use serde_json::Value;
use spillway_testhost::{App, AppOptions};

/// The workspace root.
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// Builds the guest fixtures and Spillway's components for wasm32-wasip2 (once per
/// test binary) and returns the directory holding their `.wasm` files.
pub(crate) fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .args(["-p", "fixture-probe", "-p", "fixture-subscriber", "-p", "intake", "-p", "processor", "-p", "cache", "-p", "apply-builtin", "-p", "fixture-apply-faulty", "-p", "leaderboard"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the guest fixtures failed");
        target_dir().join("wasm32-wasip2/release")
    })
}

/// Absolute path of a fixture's `.wasm`.
pub(crate) fn fixture(name: &str) -> String {
    fixtures().join(format!("{name}.wasm")).display().to_string()
}

/// A `redis-server` of our own on a free loopback port, stopped on drop.
pub(crate) struct Redis {
    child: Child,
    /// Its port.
    pub(crate) port: u16,
    dir: tempfile::TempDir,
    persistence: &'static [&'static str],
    /// `requirepass`, when it has one: every client must authenticate.
    password: Option<String>,
}

/// A password no other text in a test contains: a fresh one per server, so that
/// finding it anywhere (an answer, a log line) can only mean it leaked. It is
/// letters, digits and dashes, so it reads the same however it is encoded; a
/// caller may add characters that need encoding after it.
pub(crate) fn fresh_secret(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{what}-pw-{:x}{nanos:08x}{n:04x}", std::process::id())
}

/// No persistence: the tests' default.
const NO_PERSISTENCE: &[&str] = &["--save", "", "--appendonly", "no"];
/// AOF with a sync per write: nothing acknowledged is lost when Redis is killed.
pub(crate) const AOF_ALWAYS: &[&str] = &["--save", "", "--appendonly", "yes", "--appendfsync", "always"];
/// Cluster mode (no persistence): a one-node Redis Cluster once it owns every
/// slot ([`Redis::start_cluster_node`]). It refuses, as any cluster does, a
/// command or script whose keys are in different hash slots (`CROSSSLOT`).
const CLUSTER_NODE: &[&str] = &["--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];

impl Redis {
    /// Starts a server and waits until it answers.
    pub(crate) fn start() -> Self {
        Self::start_with(NO_PERSISTENCE)
    }

    /// Starts a one-node Redis Cluster holding all 16,384 slots (so no key is
    /// redirected), and waits until the cluster is up.
    pub(crate) fn start_cluster_node() -> Self {
        let server = Self::start_with(CLUSTER_NODE);
        let mut c = server.conn();
        let _: () = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383).query(&mut c).expect("CLUSTER ADDSLOTSRANGE");
        for _ in 0..500 {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).expect("CLUSTER INFO");
            if info.contains("cluster_state:ok") {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the one-node cluster did not come up");
    }

    /// Starts a server with these persistence options.
    pub(crate) fn start_with(persistence: &'static [&'static str]) -> Self {
        Self::start_full(persistence, None)
    }

    /// Starts a server that requires a password (`requirepass`, a fresh one), as
    /// a production Redis does; [`Redis::url`] carries it.
    pub(crate) fn start_secured() -> Self {
        // Characters a URL must encode, and `{:?}` escapes: the password must
        // stay hidden however an error spells it.
        Self::start_full(NO_PERSISTENCE, Some(format!("{}\"/@#:%x", fresh_secret("redis"))))
    }

    fn start_full(persistence: &'static [&'static str], password: Option<String>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("tempdir");
            let child = Self::spawn(port, dir.path(), persistence, password.as_deref());
            let mut server = Self { child, port, dir, persistence, password: password.clone() };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(port: u16, dir: &Path, persistence: &[&str], password: Option<&str>) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]).args(persistence);
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        cmd.arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see .ci/run)")
    }

    /// SIGKILLs the server.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data directory (AOF reloaded).
    pub(crate) fn restart(&mut self) {
        self.child = Self::spawn(self.port, self.dir.path(), self.persistence, self.password.as_deref());
        assert!(self.wait_ready(), "redis-server did not come back");
    }

    fn wait_ready(&mut self) -> bool {
        let client = redis::Client::open(self.url()).expect("url");
        for _ in 0..500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // port taken meanwhile: try another
            }
            if let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return true;
                }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// `redis://127.0.0.1:<port>`, with `:<password>@` (percent-encoded) when it
    /// has one.
    pub(crate) fn url(&self) -> String {
        match &self.password {
            Some(pw) => {
                let pw = percent_encoding::utf8_percent_encode(pw, percent_encoding::NON_ALPHANUMERIC);
                format!("redis://:{pw}@127.0.0.1:{}", self.port)
            }
            None => self.host(),
        }
    }

    /// `redis://127.0.0.1:<port>`, never with credentials: the
    /// `allowed_outbound_hosts` entry (`redis_host`).
    pub(crate) fn host(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its password, if it requires one.
    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A synchronous connection for assertions.
    pub(crate) fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).expect("url").get_connection().expect("connect")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key layout of the app as the tests configure it (the default prefix and
/// shard count): where a shard's stream, dead letters, flags are.
pub(crate) fn layout() -> spillway_core::layout::Layout {
    spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 }
}

/// Waits until `check` holds, polling every 10 ms; panics naming `what` after
/// `within`.
pub(crate) async fn eventually(what: &str, within: std::time::Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A loopback port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// An application in a temporary directory.
pub(crate) struct TestApp {
    /// The directory holding `spin.toml` (and `.spin/`).
    pub(crate) dir: tempfile::TempDir,
}

impl TestApp {
    /// Writes `manifest` (with `{probe}` and `{subscriber}` replaced by the fixtures'
    /// paths) and any extra files.
    pub(crate) fn write(manifest: &str, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = manifest
            .replace("{probe}", &fixture("fixture_probe"))
            .replace("{subscriber}", &fixture("fixture_subscriber"));
        std::fs::write(dir.path().join("spin.toml"), manifest).expect("write manifest");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write file");
        }
        Self { dir }
    }

    /// Options for this app (guest output captured, no process environment).
    pub(crate) fn options(&self) -> AppOptions {
        let mut o = AppOptions::new(self.dir.path().join("spin.toml"));
        o.env_variables = false;
        o.capture_output = true;
        o
    }

    /// Loads the app.
    pub(crate) fn load(&self) -> App {
        App::load(&self.options()).expect("app loads")
    }

    /// Path of a file in the app directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// POSTs a probe command and returns the JSON answer.
pub(crate) async fn probe(app: &App, path: &str, cmd: Value) -> Value {
    let req = http::Request::post(format!("http://127.0.0.1:3000{path}"))
        .header("host", "127.0.0.1:3000")
        .header("content-type", "application/json")
        .body(Bytes::from(cmd.to_string()))
        .expect("request");
    let res = app.handle(req).await.expect("response");
    assert_eq!(res.status(), 200, "probe failed; guest output:\n{}", app.guest_output());
    serde_json::from_slice(res.body()).expect("probe answers JSON")
}

/// GETs `path` and returns status and body.
pub(crate) async fn get(app: &App, path: &str) -> (u16, Bytes) {
    let req = http::Request::get(format!("http://127.0.0.1:3000{path}"))
        .header("host", "127.0.0.1:3000")
        .body(Bytes::new())
        .expect("request");
    let res = app.handle(req).await.expect("response");
    (res.status().as_u16(), res.into_body())
}

/// A minimal manifest serving the probe on `/...` with extra component keys.
pub(crate) fn probe_manifest(extra_component: &str, extra_top: &str) -> String {
    format!(
        r#"spin_manifest_version = 2
[application]
name = "probe-app"
{extra_top}
[[trigger.http]]
route = "/..."
component = "probe"

[component.probe]
source = "{{probe}}"
{extra_component}
"#
    )
}
