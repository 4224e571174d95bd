//! The database (Spin SQLite), the one place that talks to `spin:sqlite`.
//!
//! Spin's asynchronous `execute` answers as soon as SQLite has the statement: a
//! statement error (`no such table`, a constraint) arrives with the rows, not at the
//! call. [`Db::query`] checks both places, so callers see one `Result`.

use spillway_core::problem::Problem;
use spillway_core::sql;
use spin_sdk::sqlite::{Connection, Value};

pub use spin_sdk::sqlite::Value as SqlValue;

/// An open connection to the `default` database.
pub struct Db(Connection);

/// A database failure: the message SQLite gave, wherever Spin reported it.
fn db_err(e: spin_sdk::sqlite::Error) -> Problem {
    Problem::unavailable(&format!("database: {e:?}"))
}

/// Whether `p` says a table does not exist (nothing was ever applied).
pub fn is_missing_table(p: &Problem) -> bool {
    p.detail.contains("no such table")
}

impl Db {
    /// Opens the `default` database.
    pub async fn open() -> Result<Self, Problem> {
        Connection::open_default().await.map(Self).map_err(db_err)
    }

    /// Opens the `default` database and creates (or migrates) Spillway's tables,
    /// idempotently: concurrent processors may all run this at once.
    pub async fn open_with_schema() -> Result<Self, Problem> {
        let db = Self::open().await?;
        // Best effort: a database that cannot switch (e.g. a remote one) still works.
        let _ = db.query(sql::WAL, Vec::new()).await;
        for stmt in sql::schema_statements() {
            db.query(stmt, Vec::new()).await?;
        }
        db.migrate(sql::HAS_V2_COLUMNS, &sql::MIGRATE_V2).await?;
        for (done, steps) in sql::MIGRATE_V3 {
            db.migrate(done, steps).await?;
        }
        for stmt in sql::INDEXES {
            db.query(stmt, Vec::new()).await?;
        }
        Ok(db)
    }

    /// Runs `steps` in one transaction unless `done` (a count query) says they
    /// have run; checked again under the write lock, as another processor may win.
    async fn migrate(&self, done: &str, steps: &[&str]) -> Result<(), Problem> {
        let has = async || -> Result<bool, Problem> {
            let rows = self.query(done, Vec::new()).await?;
            Ok(rows.first().and_then(|r| r.first()).and_then(integer).unwrap_or(0) > 0)
        };
        if has().await? {
            return Ok(());
        }
        self.query(sql::BEGIN, Vec::new()).await?;
        let migrated = async {
            if !has().await? {
                for stmt in steps {
                    self.query(stmt, Vec::new()).await?;
                }
            }
            self.query(sql::COMMIT, Vec::new()).await
        }
        .await;
        if let Err(p) = migrated {
            let _ = self.query(sql::ROLLBACK, Vec::new()).await;
            return Err(p);
        }
        Ok(())
    }

    /// Runs one statement and returns its rows' values.
    pub async fn query(&self, stmt: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>, Problem> {
        let r = self.0.execute(stmt, params).await.map_err(db_err)?;
        let rows = r.collect().await.map_err(db_err)?;
        Ok(rows.into_iter().map(|r| r.values).collect())
    }

    /// The rows of a read. A missing table reads as no rows (the processor
    /// creates the tables on its first batch); a missing column means the tables
    /// are older than this code (an upgrade no processor has run yet): they are
    /// migrated here (idempotent) and the read runs again.
    pub async fn read(&self, stmt: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>, Problem> {
        match self.query(stmt, params.clone()).await {
            Ok(rows) => Ok(rows),
            Err(p) if is_missing_table(&p) => Ok(Vec::new()),
            Err(p) if p.detail.contains("no such column") => {
                Self::open_with_schema().await?;
                self.query(stmt, params).await
            }
            Err(p) => Err(p),
        }
    }

    /// The first row of a read (see [`Db::read`]), if any.
    pub async fn first_row(&self, stmt: &str, params: Vec<Value>) -> Result<Option<Vec<Value>>, Problem> {
        Ok(self.read(stmt, params).await?.into_iter().next())
    }
}

/// A text value.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(t) => Some(t.clone()),
        _ => None,
    }
}

/// An integer value.
pub fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        _ => None,
    }
}
