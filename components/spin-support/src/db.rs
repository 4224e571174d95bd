//! The database, the one place that talks to `spin:sqlite` or `spin:postgres`.
//!
//! The `database` variable picks the engine: `sqlite` (Spin's `default`
//! database) or a PostgreSQL URL. Callers name statements of the engine's
//! [`Dialect`] ([`Db::sql`]) and pass [`SqlValue`]s; rows come back as
//! [`SqlValue`]s whatever the engine, so the code above is written once.
//!
//! Spin's asynchronous `execute` (SQLite) answers as soon as SQLite has the
//! statement: a statement error (`no such table`, a constraint) arrives with the
//! rows, not at the call. [`Db::query`] checks both places, so callers see one
//! `Result`.

use spillway_core::problem::{Dependency, Problem};
use spillway_core::sql::{Dialect, Step, dialect_for};
use spin_sdk::{pg, sqlite};

pub use spillway_core::sql::SqlValue;

enum Conn {
    Sqlite(sqlite::Connection),
    Postgres(pg::Connection),
}

/// An open connection and its engine's statements.
pub struct Db {
    conn: Conn,
    sql: &'static Dialect,
    /// A statement ran out of time and was abandoned: what the connection is
    /// doing is unknown (in a transaction, the statement may still run), so it
    /// runs nothing more; a new connection starts clean, and dropping this one
    /// rolls its transaction back.
    abandoned: std::cell::Cell<bool>,
}

/// A database failure, classified once, where Spin reports it: the kinds the
/// code acts on, and the answer it becomes at the HTTP edge (`From`), which
/// names the database and never repeats the engine's text.
#[derive(Debug, Clone)]
pub struct DbError {
    /// What the code may act on.
    pub kind: DbErrorKind,
    problem: Problem,
}

/// The kinds of [`DbError`] the code acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// A table does not exist (nothing was ever applied).
    MissingTable,
    /// A column does not exist (tables older than this code).
    MissingColumn,
    /// The server ended the session (see `SESSION_ENDED`): the connection
    /// runs nothing more.
    ConnectionLost,
    /// Anything else: unreachable, refused, a statement that failed.
    Other,
}

impl From<DbError> for Problem {
    fn from(e: DbError) -> Self {
        e.problem
    }
}

/// How much longer than a call a schema step may take (a table rewritten or a
/// lock waited for on upgrade), so that a large database can be migrated.
const SCHEMA_EXTRA_MS: u64 = 60_000;

/// How answers name the database: by its variable.
const WHAT: &str = "The database (database)";

/// Classifies the engine's message (PostgreSQL's with its SQLSTATE code in
/// brackets) and logs it, credentials masked.
fn db_error(cause: &str) -> DbError {
    let kind = if cause.contains("no such table") || cause.contains("[42P01]") {
        DbErrorKind::MissingTable
    } else if cause.contains("no such column") || cause.contains("[42703]") {
        DbErrorKind::MissingColumn
    } else {
        DbErrorKind::Other
    };
    DbError { kind, problem: crate::backend_failed(WHAT, cause) }
}

fn sqlite_err(e: sqlite::Error) -> DbError {
    db_error(&format!("{e:?}"))
}

fn pg_err(e: pg::Error) -> DbError {
    if let pg::Error::PgError(pg::PgError::QueryFailed(pg::QueryError::DbError(d))) = &e
        && SESSION_ENDED.contains(&d.code.as_str())
    {
        return DbError { kind: DbErrorKind::ConnectionLost, problem: crate::backend::backend_failed(WHAT, &format!("{} [{}]", d.message, d.code)) };
    }
    let detail = match &e {
        pg::Error::PgError(pg::PgError::QueryFailed(pg::QueryError::DbError(d))) => format!("{} [{}]", d.message, d.code),
        pg::Error::PgError(pg::PgError::QueryFailed(pg::QueryError::Text(t))) => t.clone(),
        pg::Error::PgError(pg::PgError::ConnectionFailed(t)) => format!("connection failed: {t}"),
        other => other.to_string(),
    };
    db_error(&detail)
}

/// SQLSTATEs of a session the server ended: an idle-in-transaction timeout
/// (a holder silent for a lease TTL, see `Dialect::in_transaction`), an
/// administrator's or a shutdown's termination.
const SESSION_ENDED: [&str; 4] = ["25P03", "57P01", "57P02", "57P03"];

impl Db {
    /// Opens the configured database.
    pub async fn open() -> Result<Self, Problem> {
        let settings = crate::settings().await?;
        let sql = dialect_for(&settings.database).ok_or_else(|| Problem::unavailable("database: unknown engine"))?;
        let open = async {
            Ok(if sql.name == "postgres" {
                Conn::Postgres(pg::Connection::open(settings.database.as_str()).await.map_err(pg_err)?)
            } else {
                Conn::Sqlite(sqlite::Connection::open_default().await.map_err(sqlite_err)?)
            })
        };
        let conn = crate::deadline::call(Dependency::Database, WHAT, || (), open).await?;
        let db = Self { conn, sql, abandoned: std::cell::Cell::new(false) };
        for stmt in sql.on_open {
            db.query(stmt, Vec::new()).await?;
        }
        Ok(db)
    }

    /// The engine's statements.
    pub fn sql(&self) -> &'static Dialect {
        self.sql
    }

    /// Opens the database and creates (or migrates) Spillway's tables,
    /// idempotently: concurrent processors may all run this at once.
    pub async fn open_with_schema() -> Result<Self, Problem> {
        let db = Self::open().await?;
        // Best effort: a database that cannot switch still works (and says so).
        for stmt in db.sql.tune {
            crate::log_ignored("database tuning", db.query(stmt, Vec::new()).await);
        }
        // Every open but the first finds the schema current: one statement.
        let current = db.query_for(&spillway_core::sql::schema_current(db.sql.schema), Vec::new(), SCHEMA_EXTRA_MS).await?;
        if current.first().and_then(|r| r.first()).and_then(integer).unwrap_or(0) > 0 {
            return Ok(db);
        }
        for step in db.sql.schema {
            db.migrate(step).await?;
        }
        Ok(db)
    }

    /// Runs a schema step in one transaction unless its check says it has run;
    /// checked again under the write (or schema) lock, as another processor may
    /// win.
    async fn migrate(&self, step: &Step) -> Result<(), Problem> {
        let has = async || -> Result<bool, Problem> {
            let rows = self.query_for(step.done, Vec::new(), SCHEMA_EXTRA_MS).await?;
            Ok(rows.first().and_then(|r| r.first()).and_then(integer).unwrap_or(0) > 0)
        };
        if has().await? {
            return Ok(());
        }
        self.query_for(self.sql.begin, Vec::new(), SCHEMA_EXTRA_MS).await?;
        let migrated = async {
            if let Some(lock) = self.sql.schema_lock {
                self.query_for(lock, Vec::new(), SCHEMA_EXTRA_MS).await?;
            }
            if !has().await? {
                for stmt in step.statements {
                    self.query_for(stmt, Vec::new(), SCHEMA_EXTRA_MS).await?;
                }
            }
            self.query_for(self.sql.commit, Vec::new(), SCHEMA_EXTRA_MS).await?;
            Ok::<(), Problem>(())
        }
        .await;
        if let Err(p) = migrated {
            crate::log_ignored("schema rollback", self.query_for(self.sql.rollback, Vec::new(), SCHEMA_EXTRA_MS).await);
            return Err(p);
        }
        Ok(())
    }

    /// Runs one statement and returns its rows' values, within
    /// `call_timeout_ms`. A statement that runs out of time is abandoned, and
    /// so is the connection: it may still complete the statement (or, in a
    /// transaction, roll it back when dropped), and runs nothing more.
    pub async fn query(&self, stmt: &str, params: Vec<SqlValue>) -> Result<Vec<Vec<SqlValue>>, DbError> {
        self.query_for(stmt, params, 0).await
    }

    /// Whether a statement ran out of time on this connection (it runs
    /// nothing more: open another).
    pub fn abandoned(&self) -> bool {
        self.abandoned.get()
    }

    /// [`Db::query`], allowed `extra_ms` beyond a call's time.
    async fn query_for(&self, stmt: &str, params: Vec<SqlValue>, extra_ms: u64) -> Result<Vec<Vec<SqlValue>>, DbError> {
        if self.abandoned.get() {
            return Err(DbError { kind: DbErrorKind::Other, problem: Problem::timeout(Dependency::Database, WHAT, crate::deadline::call_timeout_ms()) });
        }
        match crate::deadline::guarded_for(Dependency::Database, WHAT, extra_ms, self.query_now(stmt, params)).await {
            // The server ended the session: nothing more can run on it.
            Ok(Err(e)) if e.kind == DbErrorKind::ConnectionLost => {
                self.abandoned.set(true);
                Err(e)
            }
            Ok(r) => r,
            Err(problem) => {
                self.abandoned.set(true);
                Err(DbError { kind: DbErrorKind::Other, problem })
            }
        }
    }

    async fn query_now(&self, stmt: &str, params: Vec<SqlValue>) -> Result<Vec<Vec<SqlValue>>, DbError> {
        match &self.conn {
            Conn::Sqlite(c) => {
                let params = params.into_iter().map(to_sqlite).collect::<Vec<_>>();
                let r = c.execute(stmt, params).await.map_err(sqlite_err)?;
                let rows = r.collect().await.map_err(sqlite_err)?;
                Ok(rows.into_iter().map(|r| r.values.into_iter().map(from_sqlite).collect()).collect())
            }
            Conn::Postgres(c) => {
                let params = params.into_iter().map(to_pg).collect::<Vec<_>>();
                let mut r = c.query(stmt, params).await.map_err(pg_err)?;
                let mut rows = Vec::new();
                while let Some(row) = r.rows().next().await {
                    rows.push(row.into_iter().map(from_pg).collect());
                }
                r.result().await.map_err(pg_err)?;
                Ok(rows)
            }
        }
    }

    /// The rows of a read. A missing table reads as no rows (the processor
    /// creates the tables on its first batch); a missing column means the tables
    /// are older than this code (an upgrade no processor has run yet): they are
    /// migrated here (idempotent) and the read runs again.
    pub async fn read(&self, stmt: &str, params: Vec<SqlValue>) -> Result<Vec<Vec<SqlValue>>, Problem> {
        match self.query(stmt, params.clone()).await {
            Ok(rows) => Ok(rows),
            Err(e) if e.kind == DbErrorKind::MissingTable => Ok(Vec::new()),
            Err(e) if e.kind == DbErrorKind::MissingColumn => {
                Self::open_with_schema().await?;
                Ok(self.query(stmt, params).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The first row of a read (see [`Db::read`]), if any.
    pub async fn first_row(&self, stmt: &str, params: Vec<SqlValue>) -> Result<Option<Vec<SqlValue>>, Problem> {
        Ok(self.read(stmt, params).await?.into_iter().next())
    }
}

fn to_sqlite(v: SqlValue) -> sqlite::Value {
    match v {
        SqlValue::Null => sqlite::Value::Null,
        SqlValue::Integer(i) => sqlite::Value::Integer(i),
        SqlValue::Text(t) => sqlite::Value::Text(t),
    }
}

fn from_sqlite(v: sqlite::Value) -> SqlValue {
    match v {
        sqlite::Value::Integer(i) => SqlValue::Integer(i),
        sqlite::Value::Text(t) => SqlValue::Text(t),
        _ => SqlValue::Null,
    }
}

fn to_pg(v: SqlValue) -> pg::ParameterValue {
    match v {
        SqlValue::Null => pg::ParameterValue::DbNull,
        SqlValue::Integer(i) => pg::ParameterValue::Int64(i),
        SqlValue::Text(t) => pg::ParameterValue::Str(t),
    }
}

fn from_pg(v: pg::DbValue) -> SqlValue {
    match v {
        pg::DbValue::Int64(i) => SqlValue::Integer(i),
        pg::DbValue::Int32(i) => SqlValue::Integer(i64::from(i)),
        pg::DbValue::Int16(i) => SqlValue::Integer(i64::from(i)),
        pg::DbValue::Str(t) => SqlValue::Text(t),
        _ => SqlValue::Null,
    }
}

pub use spillway_core::sql::{integer, text};
