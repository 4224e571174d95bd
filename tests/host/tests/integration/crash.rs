use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::Commands as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader as TokioBufReader};
use tokio::net::TcpStream;

use crate::spillway::ADMIN;
use crate::support::{Redis, fixtures, free_port, workspace};

const KEYS: usize = 100;
const WRITES: usize = 20_000;
const CLIENTS: usize = 32;

/// One `spillway-host up` process.
struct Host {
    child: Child,
    port: u16,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(manifest: &Path, state: &Path, redis: &Redis, wait_for_channels: bool) -> Host {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway-host"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "-f"])
        .arg(manifest)
        .arg("--state-dir")
        .arg(state)
        .args(["--variable", &format!("redis_address={}", redis.url())])
        .args(["--variable", &format!("admin_token={ADMIN}")])
        .args(["--variable", "lease_ttl_ms=1000"])
        .env("SPILLWAY_HOST_CACHE_DIR", workspace().join("target/wasmtime-cache"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = if wait_for_channels { line.starts_with('\t') } else { line.starts_with("  ") };
        if ready {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Host { child, port }
}

/// A minimal keep-alive HTTP/1.1 client: our responses always carry Content-Length.
struct Conn {
    stream: TokioBufReader<TcpStream>,
}

impl Conn {
    async fn open(port: u16) -> Self {
        Self { stream: TokioBufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap()) }
    }

    async fn request(&mut self, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
        let req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}", body.len());
        self.stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.unwrap();
        let status: u16 = status_line.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// 20,000 concurrent increments over 100 keys, with two processor processes running
/// at once and each SIGKILLed and restarted mid-run: every key ends at exactly the
/// number of increments accepted for it. Nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread")]
async fn increments_survive_processor_crashes() {
    fixtures();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ws = workspace();
    let full = std::fs::read_to_string(ws.join("spin.toml"))
        .unwrap()
        .replace("source = \"target/", &format!("source = \"{}/target/", ws.display()));
    let start = full.find("[[trigger.redis]]").unwrap();
    let end = start + full[start..].find("\n\n").unwrap();
    let front_manifest = format!("{}{}", &full[..start], &full[end..]);
    std::fs::write(dir.path().join("processor.toml"), &full).unwrap();
    std::fs::write(dir.path().join("front.toml"), &front_manifest).unwrap();

    // The front serves intake and reads; only the two others process doorbells.
    let front = spawn(&dir.path().join("front.toml"), &state, &redis, false);
    let mut processors = [
        spawn(&dir.path().join("processor.toml"), &state, &redis, true),
        spawn(&dir.path().join("processor.toml"), &state, &redis, true),
    ];

    let accepted_total = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let total = accepted_total.clone();
        let port = front.port;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(port).await;
            let mut accepted: HashMap<usize, u64> = HashMap::new();
            for i in 0..WRITES / CLIENTS {
                let key = (c * 7919 + i) % KEYS;
                let body = format!(r#"{{"key":"counter-{key}","op":"incr","field":"n"}}"#);
                let (status, reply) = conn.request("POST", "/v1/writes", "", &body).await;
                assert_eq!(status, 202, "{reply}");
                *accepted.entry(key).or_default() += 1;
                total.fetch_add(1, Ordering::SeqCst);
            }
            accepted
        }));
    }

    // Kill each processor once mid-run, and bring it back.
    let mut kills = 0;
    for (n, threshold) in [WRITES / 4, WRITES / 2].into_iter().enumerate() {
        while accepted_total.load(Ordering::SeqCst) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let p = &mut processors[n];
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        let applied: i64 = rusqlite::Connection::open(state.join("sqlite_db.db"))
            .and_then(|db| db.query_row("SELECT count(*) FROM spillway_writes", [], |r| r.get(0)))
            .unwrap_or(0);
        eprintln!("SIGKILL processor {n} at {} accepted, {applied} applied", accepted_total.load(Ordering::SeqCst));
        kills += 1;
        processors[n] = spawn(&dir.path().join("processor.toml"), &state, &redis, true);
    }
    assert_eq!(kills, 2);

    let mut expected: HashMap<usize, u64> = HashMap::new();
    for c in clients {
        for (k, n) in c.await.unwrap() {
            *expected.entry(k).or_default() += n;
        }
    }
    assert_eq!(expected.values().sum::<u64>(), WRITES as u64);

    // The safety net (cron's drain) picks up whatever a killed holder left behind,
    // once its lease has expired.
    let mut conn = redis.conn();
    let mut admin = Conn::open(front.port).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let queued: usize = (0..16).map(|s| conn.xlen::<_, usize>(format!("spillway:{{s{s}}}:stream")).unwrap()).sum();
        if queued == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{queued} writes still queued");
        let (status, body) = admin.request("POST", "/v1/drain", &format!("authorization: Bearer {ADMIN}\r\n"), "").await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead: usize = (0..16).map(|s| conn.xlen::<_, usize>(format!("spillway:{{s{s}}}:dead")).unwrap()).sum();
    assert_eq!(dead, 0, "nothing dead-lettered");

    let db = rusqlite::Connection::open(state.join("sqlite_db.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let outcomes: i64 = db.query_row("SELECT count(*) FROM spillway_writes WHERE status = 'applied'", [], |r| r.get(0)).unwrap();
    assert_eq!(outcomes, WRITES as i64, "one outcome per accepted write");
    for (key, n) in expected {
        let value: String = db
            .query_row("SELECT value FROM spillway_records WHERE key = ?1", [format!("counter-{key}")], |r| r.get(0))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(v["n"].as_u64(), Some(n), "counter-{key}");
    }
}
