//! Spillway as separate `spillway-host up` processes (what a crash test kills), the
//! manifests they run, and a minimal keep-alive HTTP client to talk to them.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader as TokioBufReader};
use tokio::net::TcpStream;

use crate::netns::Netns;
use crate::spillway::ADMIN;
use crate::support::{free_port, workspace};

/// One `spillway-host up` process, killed on drop.
pub(crate) struct Host {
    pub(crate) child: Child,
    pub(crate) port: u16,
    /// What it printed on stdout after it was ready.
    pub(crate) stdout: Arc<Mutex<Vec<String>>>,
    /// What it printed on stderr (the components' log lines, the host's warnings).
    pub(crate) stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The two manifests of a split deployment, written into `dir`: `processor.toml` (the
/// repository's spin.toml: every trigger) and `front.toml` (HTTP only: intake and
/// reads, no Redis triggers, so it never processes).
pub(crate) fn manifests(dir: &Path) -> (PathBuf, PathBuf) {
    let ws = workspace();
    let full = std::fs::read_to_string(ws.join("spin.toml"))
        .unwrap()
        .replace("= \"target/", &format!("= \"{}/target/", ws.display()));
    let mut front = String::new();
    for block in full.split("\n\n") {
        if !block.contains("[[trigger.redis]]") {
            front.push_str(block);
            front.push_str("\n\n");
        }
    }
    let (processor, front_path) = (dir.join("processor.toml"), dir.join("front.toml"));
    std::fs::write(&processor, &full).unwrap();
    std::fs::write(&front_path, front).unwrap();
    (front_path, processor)
}

/// Starts `spillway-host up` on `manifest` with state in `state` and the variables
/// `vars` (plus Redis and the admin token), and waits until it serves (and, with
/// `wait_for_channels`, until its Redis triggers are subscribed).
pub(crate) fn spawn(manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool) -> Host {
    spawn_with_env(manifest, state, redis_url, vars, wait_for_channels, &[])
}

/// [`spawn`], or why the host exited before it served (a supervisor tries
/// again).
pub(crate) fn try_spawn(manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool) -> Result<Host, String> {
    try_spawn_with_env(manifest, state, redis_url, vars, wait_for_channels, &[])
}

/// [`spawn`] with environment variables for the host process (e.g.
/// `SSL_CERT_FILE`, the CA a TLS Redis's certificate is checked against).
pub(crate) fn spawn_with_env(manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool, env: &[(&str, &Path)]) -> Host {
    // One that exits before it serves fails the test here, not in a client
    // waiting on a port nothing serves.
    try_spawn_with_env(manifest, state, redis_url, vars, wait_for_channels, env).unwrap_or_else(|why| panic!("{why}"))
}

/// [`spawn`] (waiting for its Redis triggers) with extra arguments to `up`
/// (e.g. `--runtime-config-file`), inside the network namespace `ns` if given
/// (listening on its address there: [`Host::port`] is on `ns.ns_ip`).
pub(crate) fn spawn_with(ns: Option<&Netns>, manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], args: &[&str]) -> Host {
    try_spawn_full(ns, args, manifest, state, redis_url, vars, true, &[]).unwrap_or_else(|why| panic!("{why}"))
}

/// [`spawn`] with extra arguments to `up` (e.g. `--emulate akamai-functions`).
pub(crate) fn spawn_args(manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool, args: &[&str]) -> Host {
    try_spawn_full(None, args, manifest, state, redis_url, vars, wait_for_channels, &[]).unwrap_or_else(|why| panic!("{why}"))
}

/// A runtime config in `dir` that puts the key-value store (the record cache)
/// on the Redis at `url`, as a deployment of several processes shares it; its
/// path.
pub(crate) fn cache_on_redis(dir: &Path, url: &str) -> PathBuf {
    let rc = dir.join("runtime-config.toml");
    std::fs::write(&rc, format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{url}\"\n")).unwrap();
    rc
}

fn try_spawn_with_env(manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool, env: &[(&str, &Path)]) -> Result<Host, String> {
    try_spawn_full(None, &[], manifest, state, redis_url, vars, wait_for_channels, env)
}

#[allow(clippy::too_many_arguments)]
fn try_spawn_full(ns: Option<&Netns>, args: &[&str], manifest: &Path, state: &Path, redis_url: &str, vars: &[(&str, &str)], wait_for_channels: bool, env: &[(&str, &Path)]) -> Result<Host, String> {
    let port = free_port();
    let mut cmd = match ns {
        Some(ns) => {
            let [program, rest @ ..] = ns.exec_prefix();
            let mut cmd = Command::new(program);
            cmd.args(rest).arg(crate::support::host_program());
            cmd
        }
        None => Command::new(crate::support::host_program()),
    };
    let ip = ns.map_or("127.0.0.1".to_owned(), |ns| ns.ns_ip.to_string());
    cmd.args(["up", "--listen", &format!("{ip}:{port}")]).args(args).arg("-f")
        .arg(manifest)
        .arg("--state-dir")
        .arg(state)
        .args(["--variable", &format!("redis_address={redis_url}")])
        .args(["--variable", &format!("redis_host={}", spillway_core::redact::server_of(redis_url).expect("a Redis URL"))])
        .args(["--variable", &format!("admin_token={ADMIN}")]);
    for (k, v) in vars {
        cmd.args(["--variable", &format!("{k}={v}")]);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, *v)));
    let mut child = cmd
        .env("SPILLWAY_HOST_CACHE_DIR", workspace().join("target/wasmtime-cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let err_sink = stderr.clone();
    let err = BufReader::new(child.stderr.take().unwrap());
    let err_reader = std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            err_sink.lock().unwrap().push(line);
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        ready = if wait_for_channels { line.starts_with('\t') && line.contains("expired") } else { line.starts_with("  ") };
        if ready {
            break;
        }
    }
    if !ready {
        let status = child.wait().ok();
        let _ = err_reader.join();
        return Err(format!("spillway-host exited before it served ({status:?}): {}", stderr.lock().unwrap().join("\n")));
    }
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let sink = stdout.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Ok(Host { child, port, stdout, stderr })
}

/// A minimal keep-alive HTTP/1.1 client: our responses always carry Content-Length.
pub(crate) struct Conn {
    stream: TokioBufReader<TcpStream>,
}

impl Conn {
    pub(crate) async fn open(port: u16) -> Self {
        Self { stream: TokioBufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap()) }
    }

    /// Sends a request with a JSON body; `headers` are complete `name: value\r\n` lines.
    pub(crate) async fn request(&mut self, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
        self.try_request(method, path, headers, body).await.unwrap()
    }

    /// [`Conn::request`], with I/O errors returned.
    pub(crate) async fn try_request(&mut self, method: &str, path: &str, headers: &str, body: &str) -> std::io::Result<(u16, String)> {
        let req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}", body.len());
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await?;
        let status: u16 = status_line.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
