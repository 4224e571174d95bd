//! The HTTP trigger: Spin's routing and `spin-*` request headers, WASIp3 instances
//! reused as Spin 4 reuses them, a hyper server on a TCP address (Nagle left on, as
//! Spin leaves it) and an in-process call for tests.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use wasmtime::component::{GuestTaskId, Linker};
use wasmtime::{Store, StoreContextMut};
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::handler::{
    HandlerState, Instance, Proxy, ProxyHandler, ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};

use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::app::{App, InstanceReuse, LoadedComponent};
use crate::state::StoreData;

/// One segment of a route pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// One `[[trigger.http]]` route.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    raw: String,
    based: String,
    segments: Vec<Segment>,
    wildcard: bool,
    component: String,
}

impl Route {
    fn parse(raw: &str, component: &str) -> anyhow::Result<Self> {
        let mut based = if raw.starts_with('/') { raw.to_owned() } else { format!("/{raw}") };
        if based.ends_with('/') {
            based.pop();
        }
        let (prefix, wildcard) = match based.strip_suffix("/...").or_else(|| based.strip_suffix("/*")) {
            Some(p) => (p.to_owned(), true),
            None if based == "..." || based == "/..." => (String::new(), true),
            None => (based.clone(), false),
        };
        let segments = prefix
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s == "..." || s == "*" {
                    bail!("route {raw:?}: a wildcard may only end a route");
                }
                Ok(match s.strip_prefix(':') {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            raw: raw.to_owned(),
            based,
            segments,
            wildcard,
            component: component.to_owned(),
        })
    }

    /// Ranks for specificity, routefinder-style: literal before param before wildcard,
    /// segment by segment; on a tie the shorter route first.
    fn ranks(&self) -> Vec<u8> {
        let mut r: Vec<u8> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 0,
                Segment::Param(_) => 1,
            })
            .collect();
        if self.wildcard {
            r.push(2);
        }
        r
    }

    fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() < self.segments.len() || (!self.wildcard && parts.len() != self.segments.len()) {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), (*part).to_owned())),
            }
        }
        Some(params)
    }

    /// `spin-path-info`: what the wildcard matched (`""` for exact routes).
    fn path_info(&self, path: &str) -> String {
        if !self.wildcard {
            return String::new();
        }
        let mut rest = path;
        for _ in &self.segments {
            let trimmed = rest.trim_start_matches('/');
            let end = trimmed.find('/').unwrap_or(trimmed.len());
            rest = &trimmed[end..];
        }
        rest.to_owned()
    }

    /// How `spin up` prints the route after the base URL.
    fn display(&self) -> String {
        if self.wildcard {
            let prefix = self.based.strip_suffix("/...").or_else(|| self.based.strip_suffix("/*")).unwrap_or("");
            format!("{prefix} (wildcard)")
        } else {
            self.based.clone()
        }
    }
}

/// All HTTP routes, most specific first.
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub(crate) fn add(&mut self, raw: &str, component: &str) -> anyhow::Result<()> {
        let route = Route::parse(raw, component)?;
        if raw.trim_start_matches('/').starts_with(".well-known/spin/") {
            bail!("route {raw:?}: routes under /.well-known/spin/ are handled by the Spin runtime");
        }
        // A duplicate raw route replaces the earlier one, as in Spin.
        self.routes.retain(|r| r.based != route.based);
        self.routes.push(route);
        // Stable sort: among routes of the same shape, manifest order decides.
        self.routes.sort_by_key(Route::ranks);
        Ok(())
    }

    fn find(&self, path: &str) -> Option<(&Route, Vec<(String, String)>)> {
        self.routes.iter().find_map(|r| r.matches(path).map(|p| (r, p)))
    }

    /// `(component id, printed route)` in router order, as `spin up` lists them.
    pub(crate) fn listing(&self) -> Vec<(String, String)> {
        self.routes.iter().map(|r| (r.component.clone(), r.display())).collect()
    }
}

/// Adds the headers Spin gives a component for a matched request.
fn add_spin_headers(
    headers: &mut http::HeaderMap,
    route: &Route,
    params: &[(String, String)],
    uri: &http::Uri,
    client: SocketAddr,
) -> anyhow::Result<()> {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("localhost")
        .to_owned();
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let component_route = route.raw.strip_suffix("/...").unwrap_or(&route.raw);
    let matched = if route.based == "/" { "" } else { route.based.as_str() };
    let mut add = |name: String, value: String| -> anyhow::Result<()> {
        headers.append(
            http::HeaderName::try_from(name.as_str())?,
            http::HeaderValue::try_from(value)?,
        );
        Ok(())
    };
    add("spin-path-info".into(), route.path_info(uri.path()))?;
    add("spin-full-url".into(), format!("http://{host}{pq}"))?;
    add("spin-matched-route".into(), matched.to_owned())?;
    add("spin-base-path".into(), "/".into())?;
    add("spin-raw-component-route".into(), route.raw.clone())?;
    add("spin-component-route".into(), component_route.to_owned())?;
    add("spin-client-addr".into(), client.to_string())?;
    for (name, value) in params {
        add(format!("spin-path-match-{}", name.to_ascii_lowercase().replace('_', "-")), value.clone())?;
    }
    Ok(())
}

/// A component that serves HTTP, with its pool of reusable instances.
pub(crate) struct HttpComponent {
    handler: ProxyHandler<HttpHandler>,
    /// How long a request may take before it is cut off (the hosted
    /// platform's limit), if at all.
    limit: Option<std::time::Duration>,
    caps: Arc<crate::app::ComponentCaps>,
}

impl HttpComponent {
    /// Runs the request (routed, `spin-*` headers set) on an instance; a failed
    /// handler is an empty 500 (the error is logged), one past the request
    /// limit an empty 504.
    async fn call(&self, req: http::Request<WasiBody>) -> http::Response<WasiBody> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        let handled = self.handler.handle((), req);
        let result = match self.limit {
            None => handled.await,
            Some(limit) => match tokio::time::timeout(limit, handled).await {
                Ok(r) => r,
                Err(_) => {
                    eprintln!("Request cut off: it ran past the platform's limit of {limit:?}");
                    self.caps.peaks.cut_off.fetch_add(1, Relaxed);
                    self.caps.peaks.request_us.fetch_max(u64::try_from(limit.as_micros()).unwrap_or(u64::MAX), Relaxed);
                    return empty(http::StatusCode::GATEWAY_TIMEOUT);
                }
            },
        };
        self.caps.peaks.request_us.fetch_max(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Relaxed);
        match result {
            Ok(r) => r,
            // The instance's own cut-off (its epoch deadline) can end the
            // handler before the timeout above is polled on a loaded machine:
            // still the platform's time limit, answered as such.
            Err(_) if self.limit.is_some_and(|limit| started.elapsed() >= limit) => {
                eprintln!("Request cut off: its instance ran past the platform's limit");
                empty(http::StatusCode::GATEWAY_TIMEOUT)
            }
            Err(e) => {
                eprintln!("Error processing request: {e:?}");
                empty(http::StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

/// The domain of service chaining: `http://<component>.spin.internal/...` is
/// served by that component of the same app, in process.
const CHAINING_SUFFIX: &str = ".spin.internal";

/// The app's HTTP components as service chaining reaches them (set once the app
/// is built; weak, as the components' own state points here).
#[derive(Default)]
pub(crate) struct ChainTargets(OnceLock<Weak<HashMap<String, HttpComponent>>>);

impl ChainTargets {
    pub(crate) fn set(&self, components: &Arc<HashMap<String, HttpComponent>>) {
        let _ = self.0.set(Arc::downgrade(components));
    }

    /// The component a request addresses by service chaining, if it does.
    pub(crate) fn target(uri: &http::Uri) -> Option<String> {
        let host = uri.host()?;
        host.strip_suffix(CHAINING_SUFFIX).filter(|id| !id.is_empty() && !id.contains('.')).map(str::to_owned)
    }

    /// Serves `req` with component `id`, as Spin's service chaining does: the
    /// whole path is the wildcard's (a synthetic `/...` route), the chaining
    /// `Host` header is dropped, and the client address is `0.0.0.0:0`. `None`
    /// when the app has no HTTP component `id`.
    pub(crate) fn send(&self, id: &str, req: http::Request<WasiBody>) -> Option<impl Future<Output = http::Response<WasiBody>> + Send + use<>> {
        let components = self.0.get()?.upgrade()?;
        if !components.contains_key(id) {
            return None;
        }
        let id = id.to_owned();
        Some(async move {
            let (mut parts, body) = req.into_parts();
            parts.headers.remove(http::header::HOST);
            parts.headers.remove(http::header::CONNECTION);
            let route = Route::parse("/...", &id).expect("a valid route");
            let client = SocketAddr::from(([0, 0, 0, 0], 0));
            if let Err(e) = add_spin_headers(&mut parts.headers, &route, &[], &parts.uri, client) {
                eprintln!("Error processing request: {e:?}");
                return empty(http::StatusCode::BAD_REQUEST);
            }
            components[&id].call(http::Request::from_parts(parts, body)).await
        })
    }
}

impl HttpComponent {
    pub(crate) fn new(loaded: Arc<LoadedComponent>, linker: Arc<Linker<StoreData>>, reuse: InstanceReuse, limit: Option<std::time::Duration>) -> anyhow::Result<Self> {
        let pre = linker
            .instantiate_pre(&loaded.component)
            .map_err(anyhow::Error::from)
            .context("its imports cannot be satisfied")?;
        let pre = ServicePre::new(pre).map_err(anyhow::Error::from).context("it does not export wasi:http/handler@0.3.0")?;
        Ok(Self {
            caps: loaded.caps.clone(),
            handler: ProxyHandler::new(HttpHandler { pre, loaded, reuse, limit }),
            limit,
        })
    }
}

struct HttpHandler {
    pre: ServicePre<StoreData>,
    loaded: Arc<LoadedComponent>,
    reuse: InstanceReuse,
    /// The platform's time limit, if any (see [`HttpComponent`]).
    limit: Option<std::time::Duration>,
}

impl HandlerState for HttpHandler {
    type StoreData = StoreData;
    type WorkerExpiration = IdleExpiration;
    type WorkerState = HttpWorker;

    async fn instantiate(&self) -> wasmtime::Result<Instance<StoreData, IdleExpiration, HttpWorker>> {
        let mut store = crate::engine::new_store(StoreData::new(self.loaded.caps.clone()));
        // A memory limit (the hosted platform's): growth beyond it fails. Every
        // instance's growth is watched, for the component's peak.
        store.limiter(|data| &mut data.limits);
        // The platform's time limit also ends the instance (a fresh one per
        // request there): the guest traps the first time it runs once the
        // limit has passed, work after its response included.
        if let Some(limit) = self.limit {
            let born = std::time::Instant::now();
            store.data_mut().born = Some(born);
            let caps = self.loaded.caps.clone();
            let ticks = |left: std::time::Duration| (left.as_millis() / crate::engine::EPOCH_TICK.as_millis()).max(1) as u64;
            store.set_epoch_deadline(ticks(limit));
            store.epoch_deadline_callback(move |_| match limit.checked_sub(born.elapsed()) {
                Some(left) if !left.is_zero() => Ok(wasmtime::UpdateDeadline::Continue(ticks(left))),
                _ => {
                    caps.peaks.cut_off.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("Instance cut off: component {:?} ran past the platform's limit of {limit:?}", caps.id);
                    Ok(wasmtime::UpdateDeadline::Interrupt)
                }
            });
        }
        let service = self.pre.instantiate_async(&mut store).await?;
        Ok(Instance {
            store,
            proxy: Proxy::P3(service),
            view: <StoreData as wasmtime_wasi_http::WasiHttpView>::http,
            expiration: IdleExpiration {
                idle: self.reuse.idle_timeout,
                sleep: Box::pin(tokio::time::sleep(self.reuse.idle_timeout)),
            },
            state: HttpWorker {
                reuse: self.reuse,
                component: self.loaded.caps.id.clone(),
            },
        })
    }
}

struct HttpWorker {
    reuse: InstanceReuse,
    component: String,
}

impl WorkerState for HttpWorker {
    type StoreData = StoreData;
    type RequestData = ();

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if total >= self.reuse.max_requests {
            ShouldAccept::Never
        } else if concurrent >= self.reuse.max_concurrent {
            ShouldAccept::No
        } else {
            ShouldAccept::Yes
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, StoreData>,
        _data: (),
        _task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        // No request timeout, as Spin's default.
        Box::pin(std::future::pending())
    }

    fn drop(&self, _store: Store<StoreData>, result: wasmtime::Result<()>) {
        if let Err(e) = result {
            // wasmtime reports a worker dropped without finishing as "worker
            // panicked"; when no panic is unwinding, it was cancelled (the runtime
            // shut down), which is not a failure.
            let cancelled = !std::thread::panicking() && e.to_string() == "worker panicked";
            if !cancelled {
                eprintln!("Component {} instance failed: {e:?}", self.component);
            }
        }
    }
}

struct IdleExpiration {
    idle: std::time::Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl WorkerExpiration for IdleExpiration {
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>, state: WorkerStatus, start: Instant) -> Poll<()> {
        if state != WorkerStatus::Idle {
            return Poll::Pending;
        }
        let deadline = tokio::time::Instant::from_std(start + self.idle);
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

/// A response with its whole body, from [`App::handle`].
pub type FullResponse = http::Response<Bytes>;

fn empty(status: http::StatusCode) -> http::Response<WasiBody> {
    let mut r = http::Response::new(
        http_body_util::Empty::new()
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

impl App {
    /// Routes `req` to its component as Spin would and returns the response. No route
    /// gives an empty 404; a failed handler an empty 500 (the error is logged).
    pub async fn dispatch(&self, req: http::Request<WasiBody>, client: SocketAddr) -> http::Response<WasiBody> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.path() == "/.well-known/spin/health" {
            let mut r = http::Response::new(Full::new(Bytes::from_static(b"OK")).map_err(|n| match n {}).boxed_unsync());
            r.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from_static("2"));
            return r;
        }
        let Some((route, params)) = self.router.find(parts.uri.path()) else {
            return empty(http::StatusCode::NOT_FOUND);
        };
        parts.headers.remove(http::header::CONNECTION);
        if parts.uri.authority().is_none() {
            // The guest sees an absolute URI, as behind Spin's listener.
            let host = parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_owned();
            let pq = parts.uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned());
            if let Ok(uri) = format!("http://{host}{pq}").parse() {
                parts.uri = uri;
            }
        }
        if let Err(e) = add_spin_headers(&mut parts.headers, route, &params, &parts.uri, client) {
            eprintln!("Error processing request: {e:?}");
            return empty(http::StatusCode::BAD_REQUEST);
        }
        let Some(component) = self.http.get(&route.component) else {
            return empty(http::StatusCode::NOT_FOUND);
        };
        component.call(http::Request::from_parts(parts, body)).await
    }

    /// Sends one request through the app in process (no socket) and collects the
    /// response body.
    pub async fn handle(&self, req: http::Request<Bytes>) -> anyhow::Result<FullResponse> {
        let req = req.map(|b| Full::new(b).map_err(|n| match n {}).boxed_unsync());
        let client = SocketAddr::from(([127, 0, 0, 1], 0));
        let res = self.dispatch(req, client).await;
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|e| anyhow::anyhow!("response body failed: {e:?}"))?;
        Ok(http::Response::from_parts(parts, body.to_bytes()))
    }

    /// `Serving …` / `Available Routes:` as `spin up` prints them.
    pub fn route_listing(&self, base_url: &str) -> String {
        let mut out = format!("\nServing {base_url}\nAvailable Routes:\n");
        for (id, route) in self.router.listing() {
            out.push_str(&format!("  {id}: {base_url}{route}\n"));
        }
        out
    }

    /// Serves HTTP on `listener` until the future is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        loop {
            let (stream, client) = listener.accept().await?;
            let app = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let req = req.map(|b| b.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
                        Ok::<_, std::convert::Infallible>(app.dispatch(req, client).await)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                    && !e.is_incomplete_message() {
                        eprintln!("connection from {client} failed: {e}");
                    }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        let mut r = Router::default();
        for (route, id) in routes {
            r.add(route, id).unwrap();
        }
        r
    }

    fn target(r: &Router, path: &str) -> Option<String> {
        r.find(path).map(|(route, _)| route.component.clone())
    }

    /// Exact beats wildcard, and the longest wildcard prefix wins, whatever the order.
    #[test]
    fn precedence() {
        let r = router(&[("/...", "all"), ("/v1/...", "v1"), ("/v1/records/...", "records"), ("/v1/records", "exact")]);
        assert_eq!(target(&r, "/v1/records").as_deref(), Some("exact"));
        assert_eq!(target(&r, "/v1/records/").as_deref(), Some("exact"));
        assert_eq!(target(&r, "/v1/records/a/b").as_deref(), Some("records"));
        assert_eq!(target(&r, "/v1/writes").as_deref(), Some("v1"));
        assert_eq!(target(&r, "/v1recordsx").as_deref(), Some("all"));
        assert_eq!(target(&r, "/").as_deref(), Some("all"));
        let r = router(&[("/v1/records", "exact")]);
        assert_eq!(target(&r, "/v1/records/x"), None);
    }

    /// `spin-path-info` is what the wildcard matched, as Spin computes it.
    #[test]
    fn path_info() {
        let r = Route::parse("/foo/...", "c").unwrap();
        assert_eq!(r.path_info("/foo"), "");
        assert_eq!(r.path_info("/foo/"), "/");
        assert_eq!(r.path_info("/foo/bar"), "/bar");
        assert_eq!(r.path_info("/foo/bar/"), "/bar/");
        assert_eq!(Route::parse("/...", "c").unwrap().path_info("/x/y"), "/x/y");
        assert_eq!(Route::parse("/foo", "c").unwrap().path_info("/foo"), "");
    }

    /// `:name` segments match one segment and are reported.
    #[test]
    fn params() {
        let r = router(&[("/users/:user_id/...", "u")]);
        let (_, p) = r.find("/users/42/posts").unwrap();
        assert_eq!(p, vec![("user_id".to_owned(), "42".to_owned())]);
    }
}
