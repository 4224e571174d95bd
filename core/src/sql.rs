//! The database schema and statements (SQLite and PostgreSQL-compatible SQL).
//!
//! A batch is applied in ONE transaction of a handful of statements, whatever its
//! size: the fence is advanced and checked in one statement (a holder whose lease
//! expired has a lower fencing token and is refused), the batch's records are read in
//! one query, written back in one upsert (and one delete), and every write id is
//! recorded in one insert, so a redelivered write changes nothing.
//!
//! Statements over many rows take ONE parameter: a JSON array that SQLite unpacks
//! itself (`json_each`), rather than thousands of bound values, each of which
//! would cross the Wasm boundary and the host on its own. Rows are arrays, their
//! columns in the order each statement names.

/// Creates the tables if needed (schema version 3).
///
/// - Version 2: write outcomes carry their shard and stream time, so they can be
///   pruned safely (see [`PRUNE_WRITES`]).
/// - Version 3: a deleted record stays as a tombstone (`deleted = 1`) holding the
///   version its deletion reached, so versions never go back when a key is
///   re-created; and an applied write's outcome keeps the value it produced
///   (`value`, canonical JSON; a deletion has `reason = 'deleted'` and no value):
///   the key's change feed, kept as long as the outcomes.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spillway_records (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
  etag TEXT NOT NULL, updated_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS spillway_writes (
  id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
  version INTEGER, reason TEXT, applied_at INTEGER NOT NULL,
  shard INTEGER, entry_ms INTEGER, value TEXT);
CREATE TABLE IF NOT EXISTS spillway_fences (
  shard INTEGER PRIMARY KEY, token INTEGER NOT NULL);
";

/// The schema as single statements (for APIs that run one statement per call).
pub fn schema_statements() -> impl Iterator<Item = &'static str> {
    SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// Whether `spillway_writes` already has the version-2 columns (SQLite): one row with
/// a count, 0 for a database made by version 1.
pub const HAS_V2_COLUMNS: &str = "SELECT count(*) FROM pragma_table_info('spillway_writes') WHERE name = 'entry_ms'";

/// Migrates a version-1 `spillway_writes` (SQLite), in one transaction with
/// [`BEGIN`]: adds the columns and fills them from the write ids
/// (`<shard>-<ms>-<seq>`).
pub const MIGRATE_V2: [&str; 3] = [
    "ALTER TABLE spillway_writes ADD COLUMN shard INTEGER",
    "ALTER TABLE spillway_writes ADD COLUMN entry_ms INTEGER",
    "UPDATE spillway_writes SET
       shard = CAST(substr(id, 1, instr(id, '-') - 1) AS INTEGER),
       entry_ms = CAST(substr(substr(id, instr(id, '-') + 1), 1, instr(substr(id, instr(id, '-') + 1), '-') - 1) AS INTEGER)",
];

/// Version 3's steps: each a check (a count, 0 while the step is due) and the
/// change, applied one by one, as either table may be older than the other.
/// Outcomes applied before it have no value and are left out of change feeds.
pub const MIGRATE_V3: [(&str, &str); 2] = [
    (
        "SELECT count(*) FROM pragma_table_info('spillway_writes') WHERE name = 'value'",
        "ALTER TABLE spillway_writes ADD COLUMN value TEXT",
    ),
    (
        "SELECT count(*) FROM pragma_table_info('spillway_records') WHERE name = 'deleted'",
        "ALTER TABLE spillway_records ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
    ),
];

/// The indexes (after the columns exist): the one pruning walks, and a key's
/// applied versions in order (the change feed).
pub const INDEXES: [&str; 2] = [
    "CREATE INDEX IF NOT EXISTS spillway_writes_by_entry ON spillway_writes (shard, entry_ms)",
    "CREATE INDEX IF NOT EXISTS spillway_writes_by_key ON spillway_writes (key, version) WHERE status = 'applied'",
];

/// Puts the database in write-ahead-log mode (a property of the file, kept once
/// set): a commit is one append and one sync of the log rather than the rollback
/// journal's several, and readers (cache misses, status reads) are not blocked by
/// the processor's transaction. `synchronous` stays `FULL`: a commit is on disk
/// before the batch is acknowledged. Engines without it ignore or refuse it.
pub const WAL: &str = "PRAGMA journal_mode=WAL";

/// Starts the batch transaction (taking the write lock at once).
pub const BEGIN: &str = "BEGIN IMMEDIATE";
/// Commits it.
pub const COMMIT: &str = "COMMIT";
/// Abandons it.
pub const ROLLBACK: &str = "ROLLBACK";

/// Advances the shard's fence to `?2` unless a newer token was seen, and returns the
/// token when it did: params `(shard, token)`. No row back means a newer holder has
/// written since: the batch must not commit.
pub const FENCE: &str = "INSERT INTO spillway_fences (shard, token) VALUES (?1, ?2)
  ON CONFLICT(shard) DO UPDATE SET token = excluded.token WHERE excluded.token >= spillway_fences.token
  RETURNING token";

/// Write ids already recorded, among the JSON array of ids `?1`.
pub const APPLIED_IDS: &str = "SELECT id FROM spillway_writes WHERE id IN (SELECT value FROM json_each(?1))";

/// Stored state of the JSON array of keys `?1`, tombstones included: `key, value,
/// version, etag, updated_at, deleted` (a tombstone's value is `null`).
pub const RECORDS: &str = "SELECT key, value, version, etag, updated_at, deleted FROM spillway_records
  WHERE key IN (SELECT value FROM json_each(?1))";

/// One key's stored state (same columns as [`RECORDS`]; a tombstone says the key
/// was deleted at that version).
pub const RECORD: &str = "SELECT key, value, version, etag, updated_at, deleted FROM spillway_records WHERE key = ?1";

/// Upserts records from the JSON array `?1` of rows `[key, value (canonical JSON
/// text), version, etag, updated_at, deleted (0 or 1)]`. (`WHERE true` lets
/// SQLite tell the upsert clause from a join.)
pub const UPSERT_RECORDS: &str = "INSERT INTO spillway_records (key, value, version, etag, updated_at, deleted)
  SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
         json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]')
  FROM json_each(?1) AS j WHERE true
  ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version,
  etag = excluded.etag, updated_at = excluded.updated_at, deleted = excluded.deleted";

/// Records write outcomes from the JSON array `?1` of rows `[id, key, status,
/// version, reason, applied_at, shard, entry_ms, value]` (JSON null for none;
/// `value` is the canonical JSON text an applied write produced).
pub const INSERT_WRITES: &str = "INSERT INTO spillway_writes (id, key, status, version, reason, applied_at, shard, entry_ms, value)
  SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
         json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),
         json_extract(j.value, '$[6]'), json_extract(j.value, '$[7]'), json_extract(j.value, '$[8]')
  FROM json_each(?1) AS j";

/// Up to `?3` applied versions of key `?1` after version `?2`, in order (the change
/// feed): `version, value, reason, id, applied_at`. A deletion has reason
/// `deleted` and no value; outcomes from before schema version 3 (no value) are
/// left out.
pub const CHANGES: &str = "SELECT version, value, reason, id, applied_at FROM spillway_writes
  WHERE key = ?1 AND status = 'applied' AND version > ?2 AND (value IS NOT NULL OR reason = 'deleted')
  ORDER BY version LIMIT ?3";

/// Forgets up to `?3` outcomes of shard `?1` whose stream time is before `?2`.
///
/// Safe for exactly-once as long as `?2` is at most the stream time of the shard's
/// oldest entry still in its stream: a write can be delivered (again) only while its
/// entry is in the stream (pending or unacknowledged), entry ids only grow, and a
/// replayed dead letter gets a new id. So an outcome older than every entry still
/// in the stream belongs to a write that can never come back.
pub const PRUNE_WRITES: &str = "DELETE FROM spillway_writes WHERE id IN (
  SELECT id FROM spillway_writes WHERE shard = ?1 AND entry_ms < ?2 LIMIT ?3)";

/// A write's outcome by id: `status, version, reason, key`.
pub const WRITE_STATUS: &str = "SELECT status, version, reason, key FROM spillway_writes WHERE id = ?1";

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch statements take their rows as one JSON array, and SQLite reads
    /// every column (text, integer, null) back out of it as it was.
    #[test]
    fn json_rows_round_trip() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        for stmt in schema_statements() {
            db.execute(stmt, []).unwrap();
        }
        let rows = r#"[["a","{\"n\":1}",1,"e1",10,0],["b","[1,\"x\"]",2,"e2",20,0]]"#;
        assert_eq!(db.execute(UPSERT_RECORDS, [rows]).unwrap(), 2);
        let again = r#"[["a","{\"n\":2}",2,"e3",11,0]]"#;
        db.execute(UPSERT_RECORDS, [again]).unwrap();
        let mut q = db.prepare(RECORDS).unwrap();
        let got: Vec<(String, String, i64)> = q
            .query_map([r#"["a","b","zz"]"#], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![("a".into(), r#"{"n":2}"#.into(), 2), ("b".into(), r#"[1,"x"]"#.into(), 2)]);
        let outcomes = r#"[["3-5-0","a","applied",2,null,11,3,5,"{\"n\":2}"],["3-5-1","","rejected",null,"bad",11,3,5,null]]"#;
        assert_eq!(db.execute(INSERT_WRITES, [outcomes]).unwrap(), 2);
        let (version, reason): (Option<i64>, Option<String>) =
            db.query_row("SELECT version, reason FROM spillway_writes WHERE id = '3-5-1'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((version, reason.as_deref()), (None, Some("bad")));
        let ids: Vec<String> = db.prepare(APPLIED_IDS).unwrap().query_map([r#"["3-5-0","3-9-9"]"#], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        assert_eq!(ids, vec!["3-5-0"]);
        let changes: Vec<(i64, Option<String>)> =
            db.prepare(CHANGES).unwrap().query_map(rusqlite::params!["a", 1, 10], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        assert_eq!(changes, vec![(2, Some(r#"{"n":2}"#.to_owned()))]);
    }

    /// The v1 -> v2 migration reads shard and stream time out of the write id; v3
    /// adds its columns to the result.
    #[test]
    fn migration_parses_ids() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE spillway_records (key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
             etag TEXT NOT NULL, updated_at INTEGER NOT NULL);
             CREATE TABLE spillway_writes (id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
             version INTEGER, reason TEXT, applied_at INTEGER NOT NULL);
             INSERT INTO spillway_writes VALUES ('12-1795472253739-4', 'k', 'applied', 1, NULL, 0);",
        )
        .unwrap();
        let before: i64 = db.query_row(HAS_V2_COLUMNS, [], |r| r.get(0)).unwrap();
        assert_eq!(before, 0);
        for s in MIGRATE_V2 {
            db.execute(s, []).unwrap();
        }
        let (shard, ms): (i64, i64) = db.query_row("SELECT shard, entry_ms FROM spillway_writes", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((shard, ms), (12, 1_795_472_253_739));
        for (_, s) in MIGRATE_V3 {
            db.execute(s, []).unwrap();
        }
        for s in INDEXES {
            db.execute(s, []).unwrap();
        }
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params![12, 1_795_472_253_740_i64, 10]).unwrap(), 1);
    }
}
