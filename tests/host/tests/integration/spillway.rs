//! Support for the Spillway application tests: the repository's own `spin.toml`,
//! loaded in process with a fresh Redis and database, its Redis trigger running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use spillway_testhost::{App, AppOptions};

use crate::support::{Redis, fixtures, workspace};

/// A records table (current schema) whose every insert fails: an infrastructure
/// fault, not a rejection. Created before the app's first batch, it is kept.
pub(crate) const FAILING_RECORDS: &str = "CREATE TABLE spillway_records (key TEXT PRIMARY KEY, value TEXT NOT NULL CHECK (0),
  version INTEGER NOT NULL, etag TEXT NOT NULL, updated_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
  head TEXT) WITHOUT ROWID";

/// The admin token the tests configure.
pub(crate) const ADMIN: &str = "test-admin-token";

/// Spillway running in process.
pub(crate) struct Spillway {
    pub(crate) app: Arc<App>,
    pub(crate) redis: Redis,
    pub(crate) state: tempfile::TempDir,
    trigger: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Spillway {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.abort();
        }
    }
}

/// Options for the repository's app against `redis`, state in `state`.
pub(crate) fn options(redis: &Redis, state: &std::path::Path, vars: &[(&str, &str)]) -> AppOptions {
    fixtures();
    let mut o = AppOptions::new(workspace().join("spin.toml"));
    o.env_variables = false;
    o.capture_output = true;
    o.state_dir = Some(state.to_path_buf());
    o.variables = BTreeMap::from([
        ("redis_address".to_owned(), redis.url()),
        ("admin_token".to_owned(), ADMIN.to_owned()),
    ]);
    for (k, v) in vars {
        o.variables.insert((*k).to_owned(), (*v).to_owned());
    }
    o
}

impl Spillway {
    /// Starts the app with its Redis-trigger subscriptions (unless `trigger` is
    /// false) against a Redis of its own.
    pub(crate) async fn start(vars: &[(&str, &str)], trigger: bool) -> Self {
        Self::start_on(Redis::start(), vars, trigger).await
    }

    /// Like [`Spillway::start`], against `redis`.
    pub(crate) async fn start_on(redis: Redis, vars: &[(&str, &str)], trigger: bool) -> Self {
        Self::start_with(redis, vars, trigger, false).await
    }

    /// Like [`Spillway::start`], with the key-value store (the record cache) on the
    /// same Redis, as `runtime-config.toml` puts it.
    pub(crate) async fn start_kv_on_redis(vars: &[(&str, &str)], trigger: bool) -> Self {
        Self::start_with(Redis::start(), vars, trigger, true).await
    }

    async fn start_with(redis: Redis, vars: &[(&str, &str)], trigger: bool, kv_on_redis: bool) -> Self {
        let state = tempfile::tempdir().unwrap();
        let mut opts = options(&redis, state.path(), vars);
        if kv_on_redis {
            let rc = state.path().join("runtime-config.toml");
            std::fs::write(&rc, format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n", redis.url())).unwrap();
            opts.runtime_config = Some(rc);
        }
        let app = Arc::new(App::load(&opts).expect("spillway loads"));
        let mut s = Self { app, redis, state, trigger: None };
        if trigger {
            s.start_trigger().await;
        }
        s
    }

    /// Subscribes the Redis triggers (the doorbell and expired-key events) now.
    pub(crate) async fn start_trigger(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.trigger = Some(tokio::spawn(self.app.clone().run_redis_triggers(move |_| {
            let _ = tx.send(());
        })));
        rx.await.expect("Redis triggers subscribed");
    }

    /// Sends a request; returns status, headers and JSON body (Null when empty).
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Value) {
        call(&self.app, method, path, body, headers).await
    }

    /// POSTs writes (one write object or a batch) as JSON.
    pub(crate) async fn write(&self, body: Value) -> (u16, Value) {
        let (s, _, v) = self.call("POST", "/v1/writes", Some(body), &[]).await;
        (s, v)
    }

    /// Waits (bounded) until write `id` is no longer pending; returns its status.
    pub(crate) async fn settled(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, _, v) = self.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
            assert_eq!(s, 200, "{v}");
            if v["status"] != "pending" {
                return v;
            }
            assert!(Instant::now() < deadline, "write {id} still pending; output:\n{}", self.app.guest_output());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The SQLite database (the system of record).
    pub(crate) fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.state.path().join("sqlite_db.db")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    /// Waits (bounded) until `n` write outcomes are recorded, without sending any
    /// traffic to the app.
    pub(crate) async fn wait_recorded(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let count: i64 = self.db().query_row("SELECT count(*) FROM spillway_writes", [], |r| r.get(0)).unwrap_or(0);
            if count >= n {
                assert_eq!(count, n, "more outcomes than writes");
                return;
            }
            assert!(Instant::now() < deadline, "only {count} of {n} writes recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends a request to `app`.
pub(crate) async fn call(app: &App, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Value) {
    let mut req = http::Request::builder().method(method).uri(format!("http://127.0.0.1:3000{path}")).header("host", "127.0.0.1:3000");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or(Bytes::new(), |b| Bytes::from(b.to_string()));
    let res = app.handle(req.body(body).unwrap()).await.unwrap();
    let status = res.status().as_u16();
    let (parts, body) = res.into_parts();
    let json = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body))) };
    (status, parts.headers, json)
}

/// A batch request of `n` increments of field `n`, write `i` to key `k{i % keys}`,
/// for `i` from `from`.
pub(crate) fn batch_of_incr(from: usize, n: usize, keys: usize) -> Value {
    json!({"writes": (from..from + n).map(|i| json!({"key": format!("k{}", i % keys), "op": "incr", "field": "n"})).collect::<Vec<_>>()})
}

/// Posts `writes` increments over `keys` keys as requests of 100, 16 at a time;
/// returns the 202 bodies in request order.
pub(crate) async fn burst(s: &Arc<Spillway>, writes: usize, keys: usize) -> Vec<Value> {
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for r in 0..writes / 100 {
        let s = s.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let (status, v) = s.write(batch_of_incr(r * 100, 100, keys)).await;
            drop(permit);
            assert_eq!(status, 202, "{v}");
            v
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
