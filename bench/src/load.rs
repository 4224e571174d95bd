//! Load generation: keep-alive HTTP/1.1 clients (every answer under test carries
//! `Content-Length`) and native Redis clients, each recording latencies in an HDR
//! histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// What a load run measured.
pub(crate) struct Measured {
    /// Operations completed (requests, or writes where a request carries many).
    pub(crate) ops: u64,
    /// Wall time of the run.
    pub(crate) elapsed: Duration,
    /// Latency per request, microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Requests answered with an error status, and the first such answer.
    pub(crate) failed: (u64, Option<String>),
}

impl Measured {
    /// Operations per second.
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// A latency percentile in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// A keep-alive HTTP/1.1 connection.
pub(crate) struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    pub(crate) async fn open(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        Ok(Self { stream: BufReader::new(stream) })
    }

    /// Sends `request` (a whole HTTP/1.1 request) and returns status and body.
    pub(crate) async fn send(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.stream.get_mut().write_all(request).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status line")?;
        let mut len = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            }
        }
        let mut body = vec![0; len.context("an answer without Content-Length")?];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

/// An HTTP/1.1 request with a JSON body.
pub(crate) fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    request_with(method, path, body, &[])
}

/// [`request`] with more headers.
pub(crate) fn request_with(method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: bench\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        r.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// `clients` connections to `addr`, each sending `make(client, n)` one after another
/// for `duration`; each 2xx answer counts `ops_per_request` operations, any other is
/// counted as failed (and reported: a figure made of failures would mean nothing).
pub(crate) async fn http(
    addr: &str,
    clients: usize,
    duration: Duration,
    ops_per_request: u64,
    make: impl Fn(usize, u64) -> Vec<u8> + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let make = Arc::new(make);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (make, addr) = (make.clone(), addr.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut hist = histogram();
            let (mut n, mut tries) = (0u64, 0u64);
            let mut failed = (0, None);
            while start.elapsed() < duration {
                let req = make(c, tries);
                tries += 1;
                let t = Instant::now();
                let (status, body) = conn.send(&req).await?;
                if !(200..300).contains(&status) {
                    failed.0 += 1;
                    failed.1.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
                    continue;
                }
                hist.record(t.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok((n, hist, failed))
        }));
    }
    finish(tasks, start, ops_per_request).await
}

/// `count` requests `make(i)` over `clients` connections, as fast as they go.
pub(crate) async fn http_count(
    addr: &str,
    clients: usize,
    count: usize,
    make: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (make, addr, next) = (make.clone(), addr.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut hist = histogram();
            let mut n = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let (status, body) = conn.send(&make(i)).await?;
                if !(200..300).contains(&status) {
                    bail!("{status}: {}", String::from_utf8_lossy(&body));
                }
                hist.record(t.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok((n, hist, (0, None)))
        }));
    }
    finish(tasks, start, 1).await
}

/// `clients` native Redis connections each running `EVALSHA` of `script` with
/// `make(client, n)` as keys and arguments, for `duration`.
pub(crate) async fn redis_script(
    url: &str,
    clients: usize,
    duration: Duration,
    script: &'static str,
    make: impl Fn(usize, u64) -> (Vec<String>, Vec<String>) + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let make = Arc::new(make);
    let client = redis::Client::open(url)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (make, client) = (make.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = client.get_multiplexed_async_connection().await?;
            let script = redis::Script::new(script);
            let mut hist = histogram();
            let mut n = 0u64;
            while start.elapsed() < duration {
                let (keys, args) = make(c, n);
                let mut inv = script.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                for a in &args {
                    inv.arg(a);
                }
                let t = Instant::now();
                let _: redis::Value = inv.invoke_async(&mut conn).await?;
                hist.record(t.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok((n, hist, (0, None)))
        }));
    }
    finish(tasks, start, 1).await
}

type Outcome = anyhow::Result<(u64, Histogram<u64>, (u64, Option<String>))>;

async fn finish(tasks: Vec<tokio::task::JoinHandle<Outcome>>, start: Instant, ops_per_request: u64) -> anyhow::Result<Measured> {
    let mut latency = histogram();
    let mut requests = 0;
    let mut failed: (u64, Option<String>) = (0, None);
    for t in tasks {
        let (n, h, (f, first)) = t.await??;
        requests += n;
        latency.add(h)?;
        failed.0 += f;
        if failed.1.is_none() {
            failed.1 = first;
        }
    }
    Ok(Measured { ops: requests * ops_per_request, elapsed: start.elapsed(), latency, failed })
}
