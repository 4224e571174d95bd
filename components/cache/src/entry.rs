//! A record as the cache holds it ([`Entry`]) and as the database has it
//! ([`Stored`]).

use spillway_core::problem::Problem;
use spillway_core::record::{RecordDoc, RecordRow};
use spillway_spin::db::{Db, SqlValue as Value};

/// A key's state in the database.
pub(crate) enum Stored {
    /// The record, as the cache stores it.
    Live(RecordDoc),
    /// Deleted at this version (its tombstone).
    Deleted(i64),
    /// Never written (or written before tombstones were kept).
    Never,
}

impl Stored {
    /// The record's version, or the version its deletion reached.
    pub(crate) fn version(&self) -> i64 {
        match self {
            Stored::Live(r) => r.version,
            Stored::Deleted(v) => *v,
            Stored::Never => 0,
        }
    }

    /// A row of the `record` / `records` statements (see [`RecordRow`]); a row
    /// of another shape is a failure, never a default.
    pub(crate) fn from_row(row: &[Value]) -> Result<(String, Self), Problem> {
        let row = RecordRow::from_row(row).map_err(malformed)?;
        let stored = match row.document().map_err(malformed)? {
            Some(doc) => Stored::Live(doc),
            None => Stored::Deleted(row.version),
        };
        Ok((row.key, stored))
    }
}

/// A records row or stored value that is not what the schema says.
fn malformed(e: spillway_core::record::RecordError) -> Problem {
    spillway_spin::backend_failed("The database (database)", &e.to_string())
}

/// A key's state from the database.
pub(crate) async fn stored(key: &str) -> Result<Stored, Problem> {
    let db = Db::open().await?;
    match db.first_row(db.sql().record, vec![Value::Text(key.to_owned())]).await? {
        Some(row) => Ok(Stored::from_row(&row)?.1),
        None => Ok(Stored::Never),
    }
}

/// The record from the database, as the cache stores it.
pub(crate) async fn from_db(key: &str) -> Result<Option<RecordDoc>, Problem> {
    match stored(key).await? {
        Stored::Live(r) => Ok(Some(r)),
        _ => Ok(None),
    }
}

/// A cache entry: the record's JSON as `GET /v1/records/{key}` answers it, and its
/// ETag (read out of it without building the whole document).
pub(crate) struct Entry {
    pub(crate) body: String,
    pub(crate) etag: String,
}

impl Entry {
    pub(crate) fn parse(bytes: Vec<u8>) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Tag<'a> {
            #[serde(borrow)]
            etag: std::borrow::Cow<'a, str>,
        }
        let body = String::from_utf8(bytes).ok()?;
        let etag = serde_json::from_str::<Tag<'_>>(&body).ok()?.etag.into_owned();
        Some(Self { body, etag })
    }

    pub(crate) fn from_doc(doc: &RecordDoc) -> Self {
        Self { body: doc.to_text(), etag: doc.etag.clone() }
    }

    /// The record's version (parsed out of the entry).
    pub(crate) fn version(&self) -> i64 {
        #[derive(serde::Deserialize)]
        struct V {
            version: i64,
        }
        serde_json::from_str::<V>(&self.body).map_or(0, |v| v.version)
    }
}

