//! A record on the wire: the `records` row as both engines return it, and the
//! document `GET /v1/records/{key}` answers, which the cache stores as it is.
//! One definition each, for the processor that writes them and the cache that
//! reads them.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::sql::SqlValue;

/// A row of the `record` / `records` statements (`key, value, version, etag,
/// updated_at, deleted, head`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    /// The record key.
    pub key: String,
    /// The value, canonical JSON text (`null` for a tombstone).
    pub value: String,
    /// Its version; for a tombstone, the version its deletion reached.
    pub version: i64,
    /// MD5 of the canonical value.
    pub etag: String,
    /// When the last write was applied (ms since the epoch).
    pub updated_at: i64,
    /// A tombstone: deleted at `version`.
    pub deleted: bool,
    /// The id of the key's latest applied write (the head of its change chain).
    pub head: Option<String>,
}

/// A row or document that is not what the schema says.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A column is missing or of another type.
    #[error("the records row has no {0} column of the expected type")]
    Column(&'static str),
    /// The stored value is not JSON.
    #[error("the stored value of {key:?} is not JSON: {reason}")]
    Value {
        /// The record key.
        key: String,
        /// The parser's words.
        reason: String,
    },
}

impl RecordRow {
    /// Reads a row; a column of another shape is an error naming it.
    pub fn from_row(row: &[SqlValue]) -> Result<Self, RecordError> {
        let text = |i: usize, name| match row.get(i) {
            Some(SqlValue::Text(t)) => Ok(t.clone()),
            _ => Err(RecordError::Column(name)),
        };
        let int = |i: usize, name| match row.get(i) {
            Some(SqlValue::Integer(n)) => Ok(*n),
            _ => Err(RecordError::Column(name)),
        };
        Ok(Self {
            key: text(0, "key")?,
            value: text(1, "value")?,
            version: int(2, "version")?,
            etag: text(3, "etag")?,
            updated_at: int(4, "updated_at")?,
            deleted: matches!(row.get(5), Some(SqlValue::Integer(1))),
            head: match row.get(6) {
                Some(SqlValue::Text(h)) => Some(h.clone()),
                _ => None,
            },
        })
    }

    /// The live record's document; `None` for a tombstone.
    pub fn document(&self) -> Result<Option<RecordDoc>, RecordError> {
        if self.deleted {
            return Ok(None);
        }
        let value = serde_json::from_str(&self.value).map_err(|e| RecordError::Value { key: self.key.clone(), reason: e.to_string() })?;
        Ok(Some(RecordDoc { etag: self.etag.clone(), key: self.key.clone(), updated_at: self.updated_at, value, version: self.version }))
    }
}

/// A record as `GET /v1/records/{key}` answers it and the cache stores it
/// (fields in the order the API has always written them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDoc {
    /// MD5 of the canonical value (the ETag, unquoted).
    pub etag: String,
    /// The record key.
    pub key: String,
    /// When the last write was applied (ms since the epoch).
    pub updated_at: i64,
    /// The value.
    pub value: Json,
    /// The version: the number of writes applied to the key.
    pub version: i64,
}

impl RecordDoc {
    /// The document's JSON text (what the cache stores and a read answers).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A row of the `changes` statement (`version, value, reason, id,
/// applied_at`): one applied version of a key, for its change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// The version the write produced.
    pub version: i64,
    /// The value it produced (canonical JSON text); `None` for a deletion.
    pub value: Option<String>,
    /// The write's id.
    pub write_id: String,
    /// When it was applied (ms since the epoch).
    pub applied_at: Option<i64>,
}

impl ChangeRow {
    /// Reads a row; a column of another shape is an error naming it.
    pub fn from_row(row: &[SqlValue]) -> Result<Self, RecordError> {
        let version = match row.first() {
            Some(SqlValue::Integer(v)) => *v,
            _ => return Err(RecordError::Column("version")),
        };
        let write_id = match row.get(3) {
            Some(SqlValue::Text(id)) => id.clone(),
            _ => return Err(RecordError::Column("id")),
        };
        let value = match row.get(1) {
            Some(SqlValue::Text(v)) => Some(v.clone()),
            _ => None,
        };
        let applied_at = match row.get(4) {
            Some(SqlValue::Integer(t)) => Some(*t),
            _ => None,
        };
        Ok(Self { version, value, write_id, applied_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(deleted: i64, value: &str) -> Vec<SqlValue> {
        vec![
            SqlValue::Text("k".into()),
            SqlValue::Text(value.into()),
            SqlValue::Integer(3),
            SqlValue::Text("e".into()),
            SqlValue::Integer(9),
            SqlValue::Integer(deleted),
            SqlValue::Null,
        ]
    }

    /// A row reads into its document; a tombstone has none; a malformed row or
    /// value is an error that names what is wrong, never a default.
    #[test]
    fn rows_read_into_documents_or_errors() {
        let r = RecordRow::from_row(&row(0, r#"{"n":1}"#)).unwrap();
        let doc = r.document().unwrap().unwrap();
        assert_eq!(doc.to_text(), r#"{"etag":"e","key":"k","updated_at":9,"value":{"n":1},"version":3}"#);
        assert_eq!(serde_json::from_str::<RecordDoc>(&doc.to_text()).unwrap(), doc);
        let gone = RecordRow::from_row(&row(1, "null")).unwrap();
        assert_eq!((gone.deleted, gone.version, gone.document()), (true, 3, Ok(None)));
        let mut short = row(0, "{}");
        short[2] = SqlValue::Text("3".into());
        assert_eq!(RecordRow::from_row(&short), Err(RecordError::Column("version")));
        assert!(matches!(RecordRow::from_row(&row(0, "{oops")).unwrap().document(), Err(RecordError::Value { .. })));
    }

    /// A change row reads by column; a deletion has no value.
    #[test]
    fn change_rows() {
        let r = [SqlValue::Integer(4), SqlValue::Null, SqlValue::Text("deleted".into()), SqlValue::Text("1-2-0".into()), SqlValue::Integer(7)];
        assert_eq!(ChangeRow::from_row(&r), Ok(ChangeRow { version: 4, value: None, write_id: "1-2-0".into(), applied_at: Some(7) }));
        assert_eq!(ChangeRow::from_row(&r[..3]), Err(RecordError::Column("id")));
    }
}
