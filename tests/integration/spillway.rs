//! Support for the Spillway application tests: the repository's own `spin.toml`,
//! loaded in process with a fresh Redis and database, its Redis trigger running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use spillway_testhost::{App, AppOptions};

use crate::pg::PgDb;
use crate::support::{Redis, fixtures, workspace};

/// A records table (current schema) whose every insert fails: an infrastructure
/// fault, not a rejection. Created before the app's first batch, it is kept.
pub(crate) const FAILING_RECORDS: &str = "CREATE TABLE spillway_records (key TEXT PRIMARY KEY, value TEXT NOT NULL CHECK (0),
  version INTEGER NOT NULL, etag TEXT NOT NULL, updated_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
  head TEXT) WITHOUT ROWID";

/// [`FAILING_RECORDS`] in PostgreSQL.
const FAILING_RECORDS_PG: &str = "CREATE TABLE spillway_records (key TEXT PRIMARY KEY, value TEXT NOT NULL CHECK (false),
  version BIGINT NOT NULL, etag TEXT NOT NULL, updated_at BIGINT NOT NULL, deleted BIGINT NOT NULL DEFAULT 0,
  head TEXT COLLATE \"C\")";

/// The system of record a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// Spin's `default` SQLite database (a file in the state directory).
    Sqlite,
    /// A PostgreSQL database of its own on the tests' server.
    Postgres,
}

/// Runs each named test body (an `async fn(Engine)`) once per engine, as
/// `<name>::sqlite` and `<name>::postgres`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn sqlite() {
                    super::$name(crate::spillway::Engine::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn postgres() {
                    super::$name(crate::spillway::Engine::Postgres).await
                }
            }
        )*
    };
}
pub(crate) use on_both_engines;

/// The database as the tests read it, behind the app's back: the SQLite file in
/// the state directory or the test's PostgreSQL database. Statements are plain
/// SQL both engines read the same way (literals, no parameters).
pub(crate) enum Store {
    Sqlite(std::path::PathBuf),
    Postgres(PgDb),
}

impl Store {
    /// The store for `engine`, and the variables that point the app at it.
    pub(crate) fn new(engine: Engine, state: &std::path::Path) -> (Self, Vec<(String, String)>) {
        match engine {
            Engine::Sqlite => (Self::Sqlite(state.join("sqlite_db.db")), Vec::new()),
            Engine::Postgres => {
                let db = PgDb::create_secured();
                let vars = vec![("database".to_owned(), db.url.clone()), ("database_host".to_owned(), db.host.clone())];
                (Self::Postgres(db), vars)
            }
        }
    }

    /// The first column of the first row as an integer (`None` for no row, NULL,
    /// or a missing table).
    pub(crate) async fn int(&self, sql: &str) -> Option<i64> {
        self.text(sql).await.and_then(|t| t.parse().ok())
    }

    /// The first column of the first row as text (`None` for no row, NULL, or a
    /// missing table).
    pub(crate) async fn text(&self, sql: &str) -> Option<String> {
        match self {
            Self::Sqlite(path) => {
                let db = rusqlite::Connection::open(path).ok()?;
                db.busy_timeout(Duration::from_secs(10)).ok()?;
                db.query_row(sql, [], |r| {
                    Ok(match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Integer(i) => Some(i.to_string()),
                        rusqlite::types::ValueRef::Real(f) => Some(f.to_string()),
                        rusqlite::types::ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                        _ => None,
                    })
                })
                .ok()
                .flatten()
            }
            Self::Postgres(db) => {
                let rows = crate::pg::client(db).await.simple_query(sql).await.ok()?;
                rows.into_iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                    _ => None,
                })?
            }
        }
    }

    /// Runs statements (panics on an error).
    pub(crate) async fn exec(&self, sql: &str) {
        match self {
            Self::Sqlite(path) => {
                let db = rusqlite::Connection::open(path).unwrap();
                db.busy_timeout(Duration::from_secs(10)).unwrap();
                db.execute_batch(sql).unwrap();
            }
            Self::Postgres(db) => crate::pg::client(db).await.batch_execute(sql).await.unwrap(),
        }
    }

    /// Creates a records table every insert into fails ([`FAILING_RECORDS`]).
    pub(crate) async fn fail_records(&self) {
        self.exec(match self {
            Self::Sqlite(_) => FAILING_RECORDS,
            Self::Postgres(_) => FAILING_RECORDS_PG,
        })
        .await;
    }

    /// The sum of field `n` over all records.
    pub(crate) async fn sum_of_n(&self) -> i64 {
        let sql = match self {
            Self::Sqlite(_) => "SELECT sum(json_extract(value, '$.n')) FROM spillway_records",
            Self::Postgres(_) => "SELECT sum((value::jsonb->>'n')::bigint) FROM spillway_records",
        };
        self.int(sql).await.unwrap_or(0)
    }
}

/// The admin token the tests configure.
pub(crate) const ADMIN: &str = "test-admin-token";

/// Spillway running in process.
pub(crate) struct Spillway {
    pub(crate) app: Arc<App>,
    pub(crate) redis: Redis,
    pub(crate) state: tempfile::TempDir,
    /// The system of record.
    pub(crate) store: Store,
    /// The Redis triggers' task (behind a lock: a test restarts them, as an
    /// orchestrator restarts a processor, while its clients run).
    trigger: std::sync::Mutex<Option<tokio::task::JoinHandle<anyhow::Result<()>>>>,
    /// The tmpfs the state is on, with [`Builder::disk`].
    pub(crate) disk: Option<crate::support::Tmpfs>,
}

impl Drop for Spillway {
    fn drop(&mut self) {
        if let Some(t) = self.trigger.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
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
        ("redis_host".to_owned(), redis.host()),
        ("admin_token".to_owned(), ADMIN.to_owned()),
    ]);
    for (k, v) in vars {
        o.variables.insert((*k).to_owned(), (*v).to_owned());
    }
    o
}

/// How a test's Spillway is set up: [`Spillway::builder`], then what differs
/// from the defaults (the repository's `spin.toml`, SQLite, a Redis of its own
/// that requires a password, the record cache in the local key-value store, no
/// Redis trigger), then [`Builder::start`].
#[must_use]
pub(crate) struct Builder {
    redis: Option<Redis>,
    engine: Engine,
    vars: Vec<(String, String)>,
    trigger: bool,
    kv_on_redis: bool,
    kv_at: Option<String>,
    pg: Option<PgDb>,
    http_only: bool,
    hosted: bool,
    apply: Option<std::path::PathBuf>,
    edit: Option<Box<dyn Fn(String) -> String>>,
    disk: Option<u64>,
}

impl Builder {
    /// Against this Redis (else one of its own, with a password).
    pub(crate) fn redis(mut self, redis: Redis) -> Self {
        self.redis = Some(redis);
        self
    }

    /// With `engine` as the system of record (PostgreSQL: a database of its own
    /// whose role logs in with a password).
    pub(crate) fn engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// With these variables (over the defaults and the servers' addresses).
    pub(crate) fn vars(mut self, vars: &[(&str, &str)]) -> Self {
        self.vars.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    /// Subscribes the Redis triggers (doorbell, expired-key events) at start.
    pub(crate) fn with_trigger(mut self) -> Self {
        self.trigger = true;
        self
    }

    /// The record cache on the same Redis, as `runtime-config.toml` puts it.
    pub(crate) fn kv_on_redis(mut self) -> Self {
        self.kv_on_redis = true;
        self
    }

    /// The record cache on the Redis at `url` (runtime config), a server of
    /// its own that a test may pause or kill.
    pub(crate) fn kv_at(mut self, url: String) -> Self {
        self.kv_at = Some(url);
        self
    }

    /// On PostgreSQL, in `db` (e.g. on a server of the test's own that it
    /// pauses).
    pub(crate) fn pg(mut self, db: PgDb) -> Self {
        self.engine = Engine::Postgres;
        self.pg = Some(db);
        self
    }

    /// The HTTP-only manifest (`deploy/http-only/spin.toml`: no Redis trigger,
    /// no SQLite), on PostgreSQL.
    pub(crate) fn http_only(mut self) -> Self {
        self.http_only = true;
        self.engine = Engine::Postgres;
        self
    }

    /// The HTTP-only manifest on the emulated hosted platform
    /// (`Hosted::AKAMAI_FUNCTIONS`: its key-value store's write rate and
    /// replication delay, a fresh instance per request, 30 s per request,
    /// 128 MiB per instance), on PostgreSQL.
    pub(crate) fn hosted(mut self) -> Self {
        self.hosted = true;
        self.http_only()
    }

    /// The apply step replaced by the component at `apply` (both dependency
    /// tables, intake's and the processor's), as a user changes it.
    pub(crate) fn apply(mut self, apply: &std::path::Path) -> Self {
        self.apply = Some(apply.to_path_buf());
        self
    }

    /// The manifest's text passed through `edit` first.
    pub(crate) fn edit(mut self, edit: impl Fn(String) -> String + 'static) -> Self {
        self.edit = Some(Box::new(edit));
        self
    }

    /// The state (the SQLite database, the local key-value store) on a tmpfs
    /// of `bytes`, a disk the test can fill ([`Spillway::disk`]).
    pub(crate) fn disk(mut self, bytes: u64) -> Self {
        self.disk = Some(bytes);
        self
    }

    /// Starts it.
    pub(crate) async fn start(self) -> Spillway {
        let redis = self.redis.unwrap_or_else(Redis::start_secured);
        let state = tempfile::tempdir().unwrap();
        let disk = self.disk.map(|bytes| crate::support::Tmpfs::mount_on(state.path(), bytes));
        let (store, db_vars) = match self.pg {
            Some(db) => {
                let vars = vec![("database".to_owned(), db.url.clone()), ("database_host".to_owned(), db.host.clone())];
                (Store::Postgres(db), vars)
            }
            None => Store::new(self.engine, state.path()),
        };
        let vars: Vec<(&str, &str)> = self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut opts = options(&redis, state.path(), &vars);
        // The test's own variables win (e.g. a wrong database password).
        for (k, v) in db_vars {
            opts.variables.entry(k).or_insert(v);
        }
        let ws = workspace();
        if self.http_only {
            opts.manifest = ws.join("deploy/http-only/spin.toml");
        } else if self.apply.is_some() || self.edit.is_some() {
            let mut manifest = std::fs::read_to_string(ws.join("spin.toml")).unwrap();
            if let Some(apply) = &self.apply {
                let builtin = "path = \"target/wasm32-wasip2/release/apply_builtin.wasm\"";
                assert_eq!(manifest.matches(builtin).count(), 2, "spin.toml names the built-in step for intake and the processor");
                manifest = manifest.replace(builtin, &format!("path = \"{}\"", apply.display()));
            }
            manifest = manifest.replace("= \"target/", &format!("= \"{}/target/", ws.display()));
            if let Some(edit) = &self.edit {
                manifest = edit(manifest);
            }
            let path = state.path().join("spin.toml");
            std::fs::write(&path, manifest).unwrap();
            opts.manifest = path;
        }
        let kv_url = self.kv_at.or_else(|| self.kv_on_redis.then(|| redis.url()));
        if let Some(url) = kv_url {
            let rc = state.path().join("runtime-config.toml");
            std::fs::write(&rc, format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{url}\"\n")).unwrap();
            opts.runtime_config = Some(rc);
        }
        if self.hosted {
            opts.hosted = Some(spillway_testhost::Hosted::AKAMAI_FUNCTIONS);
        }
        let app = Arc::new(App::load(&opts).unwrap_or_else(|e| panic!("spillway loads ({}): {e:#}", opts.manifest.display())));
        let s = Spillway { app, redis, state, store, trigger: None.into(), disk };
        if self.trigger && !self.http_only {
            s.start_trigger().await;
        }
        s
    }
}

impl Spillway {
    /// A test's Spillway, set up step by step (see [`Builder`]).
    pub(crate) fn builder() -> Builder {
        Builder { redis: None, engine: Engine::Sqlite, vars: Vec::new(), trigger: false, kv_on_redis: false, kv_at: None, pg: None, http_only: false, hosted: false, apply: None, edit: None, disk: None }
    }

    /// Subscribes the Redis triggers (the doorbell and expired-key events) now
    /// (again, after they lost Redis).
    pub(crate) async fn start_trigger(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(self.app.clone().run_redis_triggers(move |_| {
            let _ = tx.send(());
        }));
        if let Some(old) = self.trigger.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replace(task) {
            old.abort();
        }
        rx.await.expect("Redis triggers subscribed");
    }

    /// Stops the Redis triggers (this Spillway processes no more on its own).
    pub(crate) fn stop_trigger(&self) {
        if let Some(old) = self.trigger.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            old.abort();
        }
    }

    /// Sends a request; returns status, headers and JSON body (Null when empty).
    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Value) {
        call(&self.app, method, path, body, headers).await
    }

    /// Sends a request with the admin token; returns status, headers and JSON
    /// body.
    pub(crate) async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, http::HeaderMap, Value) {
        self.call(method, path, body, &[("authorization", &format!("Bearer {ADMIN}"))]).await
    }

    /// `POST /v1/drain` as an operator: asserts 200 and returns the reply. A
    /// `503 database-timeout` (a statement past `call_timeout_ms` on a loaded
    /// machine, the round rolled back; or, on PostgreSQL, one waiting on a row
    /// lock that an abandoned transaction holds until the server's
    /// `lock_timeout`, 10 s) is tried again, as an operator would, for up to
    /// 20 s.
    pub(crate) async fn drain(&self) -> Value {
        let started = Instant::now();
        loop {
            let (code, _, out) = self.admin("POST", "/v1/drain", None).await;
            if code == 503 && out["type"] == "https://spillway.dev/problems/database-timeout" && started.elapsed() < Duration::from_secs(20) {
                continue;
            }
            assert_eq!(code, 200, "{out}");
            return out;
        }
    }

    /// POSTs writes (one write object or a batch) as JSON.
    pub(crate) async fn write(&self, body: Value) -> (u16, Value) {
        let (s, _, v) = self.call("POST", "/v1/writes", Some(body), &[]).await;
        (s, v)
    }

    /// Waits (bounded) until write `id` is no longer pending (nor scheduled);
    /// returns its status.
    pub(crate) async fn settled(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (s, _, v) = self.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
            assert_eq!(s, 200, "{v}");
            if v["status"] != "pending" && v["status"] != "scheduled" {
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
            let count = self.store.int("SELECT count(*) FROM spillway_writes").await.unwrap_or(0);
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
