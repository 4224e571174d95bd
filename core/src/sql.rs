//! The database schema and statements (SQLite and PostgreSQL-compatible SQL).
//!
//! A batch is applied in ONE transaction of a handful of statements, whatever its
//! size: the fence is advanced and checked in one statement (a holder whose lease
//! expired has a lower fencing token and is refused), the batch's records are read in
//! one query, written back in one multi-row upsert (and one delete), and every write
//! id is recorded in one multi-row insert, so a redelivered write changes nothing.
//! Statements over many rows are split into [`chunks`] that stay under the engines'
//! bound-parameter limits.

/// Creates the tables if needed (schema version 2: write outcomes carry their shard
/// and stream time, so they can be pruned safely, see [`PRUNE_WRITES`]).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spillway_records (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
  etag TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spillway_writes (
  id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
  version INTEGER, reason TEXT, applied_at INTEGER NOT NULL,
  shard INTEGER, entry_ms INTEGER);
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

/// The index pruning walks (after the columns exist).
pub const PRUNE_INDEX: &str = "CREATE INDEX IF NOT EXISTS spillway_writes_by_entry ON spillway_writes (shard, entry_ms)";

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

/// At most this many bound parameters per statement (SQLite allows 32,766 since
/// 3.32, PostgreSQL 65,535).
pub const MAX_PARAMS: usize = 16_000;

/// Splits `n` rows of `columns` parameters each into ranges that fit [`MAX_PARAMS`].
pub fn chunks(n: usize, columns: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = (MAX_PARAMS / columns.max(1)).max(1);
    (0..n).step_by(per).map(move |start| start..(start + per).min(n))
}

/// Write ids already recorded, among `?1..?n`.
pub fn applied_ids(n: usize) -> String {
    format!("SELECT id FROM spillway_writes WHERE id IN ({})", placeholders(1, n))
}

/// Current records of keys `?1..?n`: `key, value, version, etag, updated_at`.
pub fn records(n: usize) -> String {
    format!("SELECT key, value, version, etag, updated_at FROM spillway_records WHERE key IN ({})", placeholders(1, n))
}

/// One record by key.
pub const RECORD: &str = "SELECT key, value, version, etag, updated_at FROM spillway_records WHERE key = ?1";

/// Upserts `n` records: params `(key, value, version, etag, updated_at)` per row.
pub fn upsert_records(n: usize) -> String {
    format!(
        "INSERT INTO spillway_records (key, value, version, etag, updated_at) VALUES {}
  ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version,
  etag = excluded.etag, updated_at = excluded.updated_at",
        rows(n, 5)
    )
}

/// Deletes records with keys `?1..?n`.
pub fn delete_records(n: usize) -> String {
    format!("DELETE FROM spillway_records WHERE key IN ({})", placeholders(1, n))
}

/// Columns of one [`insert_writes`] row.
pub const WRITE_COLUMNS: usize = 8;

/// Records `n` write outcomes: params `(id, key, status, version, reason, applied_at,
/// shard, entry_ms)` per row.
pub fn insert_writes(n: usize) -> String {
    format!(
        "INSERT INTO spillway_writes (id, key, status, version, reason, applied_at, shard, entry_ms) VALUES {}",
        rows(n, WRITE_COLUMNS)
    )
}

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

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
}

/// `(?1, .., ?c), (?c+1, ..), ..` for `n` rows of `c` columns.
fn rows(n: usize, c: usize) -> String {
    (0..n).map(|r| format!("({})", placeholders(r * c + 1, c))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placeholder lists are numbered from 1, row by row.
    #[test]
    fn placeholders_number_from_one() {
        assert_eq!(applied_ids(3), "SELECT id FROM spillway_writes WHERE id IN (?1, ?2, ?3)");
        assert!(upsert_records(2).contains("VALUES (?1, ?2, ?3, ?4, ?5), (?6, ?7, ?8, ?9, ?10)"));
        assert_eq!(schema_statements().count(), 3);
    }

    /// Chunks cover every row once and never exceed the parameter bound.
    #[test]
    fn chunks_cover_rows_within_the_bound() {
        let c: Vec<_> = chunks(5_000, WRITE_COLUMNS).collect();
        assert_eq!(c.first().map(|r| r.start), Some(0));
        assert_eq!(c.last().map(|r| r.end), Some(5_000));
        assert!(c.windows(2).all(|w| w[0].end == w[1].start));
        assert!(c.iter().all(|r| r.len() * WRITE_COLUMNS <= MAX_PARAMS));
        assert_eq!(chunks(0, 5).count(), 0);
    }

    /// The v1 -> v2 migration reads shard and stream time out of the write id.
    #[test]
    fn migration_parses_ids() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch(
            "CREATE TABLE spillway_writes (id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
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
        db.execute(PRUNE_INDEX, []).unwrap();
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params![12, 1_795_472_253_740_i64, 10]).unwrap(), 1);
    }
}
