//! Shared test support: a real `redis-server` per test on a free loopback port, the
//! guest fixtures built once per test binary, and applications written to temporary
//! directories.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// The embedded host's `spillway-host` program (the `up` command that the
/// crash and CLI tests run as processes), built by `cargo test` with the tests
/// (as `spillway-host-under-test`).
pub(crate) fn host_program() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_spillway-host-under-test"))
}

/// Absolute path of a fixture's `.wasm`.
pub(crate) fn fixture(name: &str) -> String {
    fixtures().join(format!("{name}.wasm")).display().to_string()
}

pub(crate) use spillway_redis_server::{AOF_ALWAYS, AOF_EVERYSEC, RedisServer as Redis, free_port, fresh_secret};

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

/// A small tmpfs mounted on a directory (as root), to fill a disk: the
/// database, the key-value store or Redis's AOF on it. Unmounted on drop.
pub(crate) struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on `dir` (an empty directory).
    pub(crate) fn mount_on(dir: &Path, bytes: u64) -> Self {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0777"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "mounting a tmpfs needs root (the fault suite's full disks): {}", String::from_utf8_lossy(&out.stderr));
        Self { dir: dir.to_path_buf() }
    }

    /// Fills what is left of it with a file (until the disk answers `ENOSPC`);
    /// [`Tmpfs::free`] removes it.
    pub(crate) fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.filler()).expect("the filler file");
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // What is left is less than a page: a byte at a time.
        while f.write(&[0]).is_ok_and(|n| n == 1) {}
    }

    /// Gives the space [`Tmpfs::fill`] took back.
    pub(crate) fn free(&self) {
        std::fs::remove_file(self.filler()).expect("the filler file is there");
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a server or a connection may still hold a file open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs one of Spillway's script calls (`spillway_core::call::Call`) as it is
/// built for the components, on `c`.
pub(crate) fn invoke<T: redis::FromRedisValue>(c: &mut redis::Connection, call: &spillway_core::call::Call) -> T {
    let script = redis::Script::new(call.script);
    let mut invocation = script.prepare_invoke();
    for k in &call.keys {
        invocation.key(k);
    }
    for a in &call.args {
        invocation.arg(a);
    }
    invocation.invoke(c).unwrap()
}
