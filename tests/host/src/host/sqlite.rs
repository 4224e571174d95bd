//! `spin:sqlite/sqlite@3.1.0` over rusqlite (bundled SQLite), as Spin's in-process
//! databases: a new connection per `open` to the label's file, values mapped by
//! storage class, every SQLite error as `io(<message>)`. Where Spin reports an error
//! is kept too: the synchronous `execute` at the call, the asynchronous one (what
//! spin-sdk 7 uses) in the result future beside the row stream.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wasmtime::component::{Accessor, FutureReader, Resource, StreamReader};

use super::spin::sqlite::sqlite::{
    Error, Host, HostConnection, HostConnectionWithStore, QueryResult, RowResult, Value,
};
use super::{Spin, SpinView};

/// A configured database: a file, or (`None`) one in-memory database shared by all
/// connections.
pub(crate) struct SqliteDb {
    path: Option<PathBuf>,
    memory: Mutex<Option<Arc<Mutex<rusqlite::Connection>>>>,
    /// Statements executed so far (tests count database reads with it).
    executed: Arc<AtomicU64>,
}

/// An open connection: the resource behind `connection`, and its database's count
/// of executed statements.
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Connection(Arc<Mutex<rusqlite::Connection>>, Arc<AtomicU64>);

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
}

impl SqliteDb {
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            memory: Mutex::new(None),
            executed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Statements executed on this database since the app was loaded.
    pub(crate) fn executed(&self) -> u64 {
        self.executed.load(Ordering::Relaxed)
    }

    fn connect(&self) -> Result<Arc<Mutex<rusqlite::Connection>>, Error> {
        match &self.path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let c = rusqlite::Connection::open(p).map_err(io)?;
                c.busy_timeout(std::time::Duration::from_secs(5)).map_err(io)?;
                Ok(Arc::new(Mutex::new(c)))
            }
            None => {
                let mut m = self.memory.lock().map_err(io_poison)?;
                if m.is_none() {
                    *m = Some(Arc::new(Mutex::new(rusqlite::Connection::open_in_memory().map_err(io)?)));
                }
                Ok(m.as_ref().expect("set above").clone())
            }
        }
    }
}

fn io_poison<T>(_: T) -> Error {
    Error::Io("connection lock poisoned".into())
}

fn to_sql(v: Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Integer(i) => V::Integer(i),
        Value::Real(f) => V::Real(f),
        Value::Text(t) => V::Text(t),
        Value::Blob(b) => V::Blob(b),
        Value::Null => V::Null,
    }
}

fn from_sql(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as V;
    match v {
        V::Null => Value::Null,
        V::Integer(i) => Value::Integer(i),
        V::Real(f) => Value::Real(f),
        V::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        V::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// Runs one statement: its columns, the rows produced before any error, and that
/// error. As in Spin, a statement that fails to prepare or bind (a syntax error, `no
/// such table`) has no columns and reports its error with the rows, not at the call.
fn run(conn: &rusqlite::Connection, sql: &str, params: Vec<Value>) -> (Vec<String>, Vec<RowResult>, Result<(), Error>) {
    let mut stmt = match conn.prepare_cached(sql) {
        Ok(s) => s,
        Err(e) => return (Vec::new(), Vec::new(), Err(io(e))),
    };
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let params: Vec<rusqlite::types::Value> = params.into_iter().map(to_sql).collect();
    let mut rows = match stmt.query(rusqlite::params_from_iter(params.iter())) {
        Ok(r) => r,
        Err(e) => return (columns, Vec::new(), Err(io(e))),
    };
    let mut out = Vec::new();
    loop {
        match rows.next() {
            Ok(Some(row)) => {
                let values = (0..columns.len())
                    .map(|i| row.get_ref(i).map(from_sql))
                    .collect::<Result<Vec<_>, _>>();
                match values {
                    Ok(values) => out.push(RowResult { values }),
                    Err(e) => return (columns, out, Err(io(e))),
                }
            }
            Ok(None) => return (columns, out, Ok(())),
            Err(e) => return (columns, out, Err(io(e))),
        }
    }
}

fn open(view: &mut SpinView<'_>, label: &str) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
    let Some(db) = view.caps.sqlite.get(label).cloned() else {
        return Ok(Err(Error::AccessDenied));
    };
    match db.connect() {
        Ok(c) => Ok(Ok(view.table.push(Connection(c, db.executed.clone()))?)),
        Err(e) => Ok(Err(e)),
    }
}

fn conn_of(view: &mut SpinView<'_>, c: &Resource<Connection>) -> wasmtime::Result<Arc<Mutex<rusqlite::Connection>>> {
    Ok(view.table.get(c)?.0.clone())
}

/// The connection, counting one statement executed on its database.
fn conn_executing(view: &mut SpinView<'_>, c: &Resource<Connection>) -> wasmtime::Result<Arc<Mutex<rusqlite::Connection>>> {
    let conn = view.table.get(c)?;
    conn.1.fetch_add(1, Ordering::Relaxed);
    Ok(conn.0.clone())
}

impl HostConnection for SpinView<'_> {
    fn open(&mut self, database: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        open(self, &database)
    }

    fn execute(
        &mut self,
        c: Resource<Connection>,
        statement: String,
        parameters: Vec<Value>,
    ) -> wasmtime::Result<Result<QueryResult, Error>> {
        let conn = conn_executing(self, &c)?;
        let guard = conn.lock().map_err(|_| wasmtime::format_err!("connection lock poisoned"))?;
        // The synchronous call reports every error at the call.
        Ok(match run(&guard, &statement, parameters) {
            (columns, rows, Ok(())) => Ok(QueryResult { columns, rows }),
            (_, _, Err(e)) => Err(e),
        })
    }

    fn last_insert_rowid(&mut self, c: Resource<Connection>) -> wasmtime::Result<i64> {
        let conn = conn_of(self, &c)?;
        let guard = conn.lock().map_err(|_| wasmtime::format_err!("connection lock poisoned"))?;
        Ok(guard.last_insert_rowid())
    }

    fn changes(&mut self, c: Resource<Connection>) -> wasmtime::Result<u64> {
        let conn = conn_of(self, &c)?;
        let guard = conn.lock().map_err(|_| wasmtime::format_err!("connection lock poisoned"))?;
        Ok(guard.changes())
    }

    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

async fn on_conn<T, R: Send + 'static>(
    accessor: &Accessor<T, Spin>,
    c: &Resource<Connection>,
    executing: bool,
    f: impl FnOnce(&rusqlite::Connection) -> R + Send + 'static,
) -> wasmtime::Result<R> {
    let conn = accessor.with(|mut access| if executing { conn_executing(&mut access.get(), c) } else { conn_of(&mut access.get(), c) })?;
    tokio::task::spawn_blocking(move || {
        let guard = conn.lock().map_err(|_| wasmtime::format_err!("connection lock poisoned"))?;
        Ok(f(&guard))
    })
    .await?
}

impl<T> HostConnectionWithStore<T> for Spin {
    async fn open_async(accessor: &Accessor<T, Self>, database: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        accessor.with(|mut access| open(&mut access.get(), &database))
    }

    async fn execute_async(
        accessor: &Accessor<T, Self>,
        c: Resource<Connection>,
        statement: String,
        parameters: Vec<Value>,
    ) -> wasmtime::Result<Result<(Vec<String>, StreamReader<RowResult>, FutureReader<Result<(), Error>>), Error>> {
        // Statement errors travel with the rows (Spin's `execute` answers as soon as
        // the statement is handed to SQLite); only a dead connection fails the call.
        let (columns, rows, result) = on_conn(accessor, &c, true, move |conn| run(conn, &statement, parameters)).await?;
        accessor.with(|mut access| {
            let rows = StreamReader::new(&mut access, rows)?;
            let result = FutureReader::new(&mut access, async move { wasmtime::error::Ok(result) })?;
            Ok(Ok((columns, rows, result)))
        })
    }

    async fn last_insert_rowid_async(accessor: &Accessor<T, Self>, c: Resource<Connection>) -> wasmtime::Result<i64> {
        on_conn(accessor, &c, false, |conn| conn.last_insert_rowid()).await
    }

    async fn changes_async(accessor: &Accessor<T, Self>, c: Resource<Connection>) -> wasmtime::Result<u64> {
        on_conn(accessor, &c, false, |conn| conn.changes()).await
    }
}

impl Host for SpinView<'_> {}
