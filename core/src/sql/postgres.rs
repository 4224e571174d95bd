//! The statements in PostgreSQL's dialect (Spin's `spin:postgres`): what each one
//! does, its parameters and columns are documented on [`super::Dialect`].
//!
//! Spin's host binds a parameter with the type PostgreSQL infers for it and
//! refuses a mismatch (a 64-bit integer only binds to `bigint`, text only to a
//! text type), so every parameter is cast where it appears (`$1::bigint`,
//! `$1::text`), and every integer column is `bigint`, read back as a 64-bit
//! integer. Rows passed as one JSON array are unpacked by `jsonb_array_elements`.
//!
//! Write ids (and the columns naming them) are `COLLATE "C"`: pruning walks them
//! as byte strings (`'12-'` < `'12-1795…'`), which a linguistic collation, which
//! ignores punctuation, would not.

use super::{Dialect, Step};

/// The tables (schema version 3; PostgreSQL support began with it, so there is
/// nothing to migrate).
pub const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS spillway_records (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL,
  etag TEXT NOT NULL, updated_at BIGINT NOT NULL, deleted BIGINT NOT NULL DEFAULT 0,
  head TEXT COLLATE \"C\")",
    "CREATE TABLE IF NOT EXISTS spillway_writes (
  id TEXT COLLATE \"C\" PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
  version BIGINT, reason TEXT, applied_at BIGINT NOT NULL,
  shard BIGINT, entry_ms BIGINT, value TEXT, prev TEXT COLLATE \"C\")",
    "CREATE TABLE IF NOT EXISTS spillway_fences (
  shard BIGINT PRIMARY KEY, token BIGINT NOT NULL)",
];

/// Whether the three tables exist in the connection's schema (a row only when all
/// do).
pub const HAS_TABLES: &str = "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()
  AND tablename IN ('spillway_records', 'spillway_writes', 'spillway_fences') HAVING count(*) = 3";

/// Serialises schema creation across processors: `CREATE TABLE IF NOT EXISTS`
/// run by two sessions at once can fail in one of them (a duplicate type name).
/// Released at commit. The key is "SPIL".
pub const SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(1397770572)";

/// PostgreSQL's statements.
pub const DIALECT: Dialect = Dialect {
    name: "postgres",
    tune: &[],
    schema: &[Step { done: HAS_TABLES, statements: &SCHEMA }],
    schema_lock: Some(SCHEMA_LOCK),
    begin: "BEGIN",
    // One statement (one round trip) for both settings, local to the
    // transaction.
    in_transaction: Some("SELECT set_config('lock_timeout', '10s', true), set_config('idle_in_transaction_session_timeout', $1::text, true)"),
    // Outside a transaction this is a no-op (with a warning).
    on_open: &["ROLLBACK"],
    commit: "COMMIT",
    rollback: "ROLLBACK",
    // Under READ COMMITTED, a second holder's upsert waits on the first's row
    // lock and then checks its WHERE against the committed token.
    fence: "INSERT INTO spillway_fences (shard, token)
  SELECT (r->>0)::bigint, (r->>1)::bigint FROM jsonb_array_elements($1::text::jsonb) AS j(r) ORDER BY 1
  ON CONFLICT (shard) DO UPDATE SET token = excluded.token WHERE excluded.token >= spillway_fences.token
  RETURNING shard, token",
    fence_token: "SELECT token FROM spillway_fences WHERE shard = $1::bigint",
    applied_ids: "SELECT id, status FROM spillway_writes
  WHERE id IN (SELECT jsonb_array_elements_text($1::text::jsonb))",
    records: "SELECT key, value, version, etag, updated_at, deleted, head FROM spillway_records
  WHERE key IN (SELECT jsonb_array_elements_text($1::text::jsonb))",
    record: "SELECT key, value, version, etag, updated_at, deleted, head FROM spillway_records WHERE key = $1::text",
    upsert_records: "INSERT INTO spillway_records (key, value, version, etag, updated_at, deleted, head)
  SELECT r->>0, r->>1, (r->>2)::bigint, r->>3, (r->>4)::bigint, (r->>5)::bigint, r->>6
  FROM jsonb_array_elements($1::text::jsonb) AS j(r)
  ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
  etag = excluded.etag, updated_at = excluded.updated_at, deleted = excluded.deleted, head = excluded.head",
    insert_writes: "INSERT INTO spillway_writes (id, key, status, version, reason, applied_at, shard, entry_ms, value, prev)
  SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, r->>4, (r->>5)::bigint, (r->>6)::bigint, (r->>7)::bigint, r->>8, r->>9
  FROM jsonb_array_elements($1::text::jsonb) AS j(r)",
    changes: "WITH RECURSIVE chain(id, version, value, reason, applied_at, prev, steps) AS (
    SELECT w.id, w.version, w.value, w.reason, w.applied_at, w.prev, 1::bigint
    FROM spillway_records AS r JOIN spillway_writes AS w ON w.id = r.head
    WHERE r.key = $1::text AND w.version > $2::bigint
  UNION ALL
    SELECT w.id, w.version, w.value, w.reason, w.applied_at, w.prev, c.steps + 1
    FROM chain AS c JOIN spillway_writes AS w ON w.id = c.prev
    WHERE c.version > $2::bigint + 1 AND w.version > $2::bigint AND c.steps < $3::bigint)
  SELECT version, value, reason, id, applied_at FROM chain ORDER BY version",
    // Each shard's range walked in key order, at most the limit each, and in all.
    prune_writes: "DELETE FROM spillway_writes WHERE id IN (
  SELECT w.id FROM jsonb_array_elements($1::text::jsonb) AS b(r) CROSS JOIN LATERAL (
    SELECT id FROM spillway_writes WHERE id > (r->>0) || '-' AND id < (r->>0) || '-' || (r->>1) ORDER BY id LIMIT $2::bigint) AS w
  LIMIT $2::bigint)",
    write_status: "SELECT status, version, reason, key FROM spillway_writes WHERE id = $1::text",
};
