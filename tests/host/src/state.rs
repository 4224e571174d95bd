//! Per-store state: what one request or message sees.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::app::ComponentCaps;
use crate::http::ChainTargets;

/// The data of one wasmtime store: WASI, WASI HTTP and the Spin capabilities of the
/// component it runs.
pub struct StoreData {
    pub(crate) table: ResourceTable,
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) caps: Arc<ComponentCaps>,
    hooks: OutboundHttp,
    /// This instance's number, unique in the process (the hosted platform's
    /// key-value store tells requests apart by it).
    pub(crate) instance: u64,
    /// The instance's memory limit (the hosted platform's 128 MiB), if any,
    /// and its component's peak.
    pub(crate) limits: Limits,
    /// When the instance was made, under the platform's time limit (see
    /// `Peak::longest_instance`).
    pub(crate) born: Option<std::time::Instant>,
}

impl Drop for StoreData {
    fn drop(&mut self) {
        if let Some(born) = self.born {
            let us = u64::try_from(born.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.caps.peaks.instance_us.fetch_max(us, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl StoreData {
    /// State for one instance of the component described by `caps`.
    pub(crate) fn new(caps: Arc<ComponentCaps>) -> Self {
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestOutput::new(&caps, Stream::Stdout))
            .stderr(GuestOutput::new(&caps, Stream::Stderr));
        for (k, v) in &caps.environment {
            wasi.env(k, v);
        }
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundHttp { caps: caps.clone() },
            limits: Limits { total: 0, caps: caps.clone() },
            born: None,
            caps,
            instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// An instance's resource limits: its memory, all its linear memories together
/// (a composed component has one per part), within the hosted platform's limit
/// if any; it keeps its component's largest total, and says so when growth is
/// refused.
pub(crate) struct Limits {
    /// The instance's linear memories together, in bytes (they never shrink).
    total: usize,
    caps: Arc<ComponentCaps>,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let total = self.total - current.min(self.total) + desired;
        if let Some(limit) = self.caps.memory_limit.filter(|l| total > *l) {
            self.caps.peaks.memory_refused.fetch_add(1, Relaxed);
            eprintln!(
                "Instance of component {:?} refused memory: it asked for {total} bytes in all; the platform's limit is {limit} bytes",
                self.caps.id
            );
            return Ok(false);
        }
        self.total = total;
        self.caps.peaks.memory.fetch_max(total, Relaxed);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, _desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StoreData {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Which of the guest's output streams.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Guest stdout/stderr: written through to the host's stderr, as Spin does (so a test
/// harness captures it and shows it when a test fails), and kept in the application's
/// output log when capture is on.
#[derive(Clone)]
struct GuestOutput {
    log: Option<Arc<Mutex<Vec<u8>>>>,
    stream: Stream,
}

impl GuestOutput {
    fn new(caps: &ComponentCaps, stream: Stream) -> Self {
        Self {
            log: caps.output.clone(),
            stream,
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let text = String::from_utf8_lossy(buf);
        // Spin shows both guest streams on its stderr. `eprint!` rather than a raw
        // handle write: libtest captures it per test and shows it when a test fails.
        match self.stream {
            Stream::Stdout | Stream::Stderr => eprint!("{text}"),
        }
        if let Some(log) = &self.log {
            log.lock().expect("poisoned").extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = std::io::stderr().flush();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// Outbound HTTP hooks: only Spin's service chaining
/// (`http://<component>.spin.internal`, allowed by `allowed_outbound_hosts`, e.g.
/// `http://<component>.spin.internal` or `http://*.spin.internal`) is served, by
/// the app's own component in process; every other request is denied (this host
/// makes no network requests; Spin denies a host missing from
/// `allowed_outbound_hosts` the same way).
struct OutboundHttp {
    caps: Arc<ComponentCaps>,
}

impl wasmtime_wasi_http::WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let chained = ChainTargets::target(request.uri()).and_then(|id| {
            // As Spin: the request's own URL against `allowed_outbound_hosts`
            // (scheme `https` when it names none), then served in process whatever
            // its scheme.
            let url = request.uri().to_string();
            if !self.caps.allowed_hosts.allows_url(&url, "https") {
                eprintln!(
                    "Warning: A component ({}) tried to make an HTTP request to disallowed destination '{}'.",
                    self.caps.id,
                    crate::outbound::destination(&url, "https")
                );
                return None;
            }
            self.caps.chain.send(&id, request)
        });
        match chained {
            Some(response) => Box::new(async move {
                let done: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send> = Box::new(async { Ok(()) });
                Ok((response.await, done))
            }),
            None => Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) }),
        }
    }
}
