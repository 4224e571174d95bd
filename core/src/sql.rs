//! The database schema and statements (SQLite and PostgreSQL-compatible SQL).
//!
//! A batch is applied in ONE transaction: the fence is advanced (a holder whose lease
//! expired has a lower fencing token and is refused), the writes' records are
//! updated, and every write id is recorded, so a redelivered write changes nothing.

/// Creates the tables if needed.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spillway_records (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
  etag TEXT NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spillway_writes (
  id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
  version INTEGER, reason TEXT, applied_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS spillway_fences (
  shard INTEGER PRIMARY KEY, token INTEGER NOT NULL);
";

/// The schema as single statements (for APIs that run one statement per call).
pub fn schema_statements() -> impl Iterator<Item = &'static str> {
    SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty())
}

/// Starts the batch transaction (taking the write lock at once).
pub const BEGIN: &str = "BEGIN IMMEDIATE";
/// Commits it.
pub const COMMIT: &str = "COMMIT";
/// Abandons it.
pub const ROLLBACK: &str = "ROLLBACK";

/// Advances the shard's fence to `?2` unless a newer token was seen: params
/// `(shard, token)`. Follow with [`FENCE_CHECK`].
pub const FENCE_ADVANCE: &str = "INSERT INTO spillway_fences (shard, token) VALUES (?1, ?2)
  ON CONFLICT(shard) DO UPDATE SET token = excluded.token WHERE excluded.token >= spillway_fences.token";

/// The shard's current fence: params `(shard)`. The batch may commit only if it
/// equals the holder's token.
pub const FENCE_CHECK: &str = "SELECT token FROM spillway_fences WHERE shard = ?1";

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

/// Upsert a record: `(key, value, version, etag, updated_at)`.
pub const UPSERT_RECORD: &str = "INSERT INTO spillway_records (key, value, version, etag, updated_at)
  VALUES (?1, ?2, ?3, ?4, ?5)
  ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version,
  etag = excluded.etag, updated_at = excluded.updated_at";

/// Delete a record: `(key)`.
pub const DELETE_RECORD: &str = "DELETE FROM spillway_records WHERE key = ?1";

/// Record a write's outcome: `(id, key, status, version, reason, applied_at)`.
pub const INSERT_WRITE: &str = "INSERT INTO spillway_writes (id, key, status, version, reason, applied_at)
  VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// A write's outcome by id: `status, version, reason, key`.
pub const WRITE_STATUS: &str = "SELECT status, version, reason, key FROM spillway_writes WHERE id = ?1";

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placeholder lists are numbered from 1.
    #[test]
    fn placeholders_number_from_one() {
        assert_eq!(applied_ids(3), "SELECT id FROM spillway_writes WHERE id IN (?1, ?2, ?3)");
        assert_eq!(schema_statements().count(), 3);
    }
}
