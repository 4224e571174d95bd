//! The statements in SQLite's dialect (Spin's `spin:sqlite`): what each one does,
//! its parameters and columns are documented on [`super::Dialect`]. Rows passed as
//! one JSON array are unpacked by `json_each`.

/// Creates the tables if needed (schema version 3, see [`super::Dialect::schema`]).
/// Both tables are `WITHOUT ROWID`, clustered by their primary key.
pub const SCHEMA_STATEMENTS: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS spillway_records (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
  etag TEXT NOT NULL, updated_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
  head TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS spillway_writes (
  id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
  version INTEGER, reason TEXT, applied_at INTEGER NOT NULL,
  shard INTEGER, entry_ms INTEGER, value TEXT, prev TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS spillway_fences (
  shard INTEGER PRIMARY KEY, token INTEGER NOT NULL)",
];

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

/// Version 3's steps, one per table (either may be older than the other): a
/// check (a count, 0 while the step is due) and the statements, run in one
/// transaction. Each table is rebuilt as `WITHOUT ROWID` with the new column
/// (its old indexes go with it). Outcomes applied before it have no value and are
/// left out of change feeds; records deleted before it have no tombstone.
pub const MIGRATE_V3: [(&str, &[&str]); 2] = [
    (
        "SELECT count(*) FROM pragma_table_info('spillway_writes') WHERE name = 'value'",
        &[
            "CREATE TABLE spillway_writes_v3 (
               id TEXT PRIMARY KEY, key TEXT NOT NULL, status TEXT NOT NULL,
               version INTEGER, reason TEXT, applied_at INTEGER NOT NULL,
               shard INTEGER, entry_ms INTEGER, value TEXT, prev TEXT) WITHOUT ROWID",
            "INSERT INTO spillway_writes_v3 (id, key, status, version, reason, applied_at, shard, entry_ms)
               SELECT id, key, status, version, reason, applied_at, shard, entry_ms FROM spillway_writes",
            "DROP TABLE spillway_writes",
            "ALTER TABLE spillway_writes_v3 RENAME TO spillway_writes",
        ],
    ),
    (
        "SELECT count(*) FROM pragma_table_info('spillway_records') WHERE name = 'deleted'",
        &[
            "CREATE TABLE spillway_records_v3 (
               key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL,
               etag TEXT NOT NULL, updated_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
               head TEXT) WITHOUT ROWID",
            "INSERT INTO spillway_records_v3 (key, value, version, etag, updated_at)
               SELECT key, value, version, etag, updated_at FROM spillway_records",
            "DROP TABLE spillway_records",
            "ALTER TABLE spillway_records_v3 RENAME TO spillway_records",
        ],
    ),
];

/// Indexes after version 3: none; version 2's pruning index is dropped where it
/// is left.
pub const INDEXES: [&str; 1] = ["DROP INDEX IF EXISTS spillway_writes_by_entry"];

/// Whether version 2's pruning index is gone (a row when it is).
pub const NO_OLD_INDEX: &str = "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'spillway_writes_by_entry')";

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

/// Advances the fences of the JSON array `?1` of `[shard, token]` rows (one
/// round's shards), each unless a newer token was seen, in shard order, and
/// returns `shard, token` for each one that advanced. A shard without a row back
/// has had a newer holder write since: its batch must not commit. (`WHERE true`
/// lets SQLite tell the upsert clause from a join.)
pub const FENCE: &str = "INSERT INTO spillway_fences (shard, token)
  SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]') FROM json_each(?1) AS j WHERE true ORDER BY 1
  ON CONFLICT(shard) DO UPDATE SET token = excluded.token WHERE excluded.token >= spillway_fences.token
  RETURNING shard, token";

/// Write ids already recorded, among the JSON array of ids `?1`, with their
/// status: `id, status`.
pub const APPLIED_IDS: &str = "SELECT id, status FROM spillway_writes WHERE id IN (SELECT value FROM json_each(?1))";

/// Stored state of the JSON array of keys `?1`, tombstones included: `key, value,
/// version, etag, updated_at, deleted, head` (a tombstone's value is `null`;
/// `head` is the id of the key's latest applied write).
pub const RECORDS: &str = "SELECT key, value, version, etag, updated_at, deleted, head FROM spillway_records
  WHERE key IN (SELECT value FROM json_each(?1))";

/// One key's stored state (same columns as [`RECORDS`]; a tombstone says the key
/// was deleted at that version).
pub const RECORD: &str = "SELECT key, value, version, etag, updated_at, deleted, head FROM spillway_records WHERE key = ?1";

/// Upserts records from the JSON array `?1` of rows `[key, value (canonical JSON
/// text), version, etag, updated_at, deleted (0 or 1), head]`. (`WHERE true` lets
/// SQLite tell the upsert clause from a join.)
pub const UPSERT_RECORDS: &str = "INSERT INTO spillway_records (key, value, version, etag, updated_at, deleted, head)
  SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
         json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),
         json_extract(j.value, '$[6]')
  FROM json_each(?1) AS j WHERE true
  ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version,
  etag = excluded.etag, updated_at = excluded.updated_at, deleted = excluded.deleted, head = excluded.head";

/// Records write outcomes from the JSON array `?1` of rows `[id, key, status,
/// version, reason, applied_at, shard, entry_ms, value, prev]` (JSON null for
/// none; `value` is the canonical JSON text an applied write produced, `prev` the
/// id of the key's applied write before it).
pub const INSERT_WRITES: &str = "INSERT INTO spillway_writes (id, key, status, version, reason, applied_at, shard, entry_ms, value, prev)
  SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
         json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),
         json_extract(j.value, '$[6]'), json_extract(j.value, '$[7]'), json_extract(j.value, '$[8]'),
         json_extract(j.value, '$[9]')
  FROM json_each(?1) AS j";

/// The applied versions of key `?1` after version `?2`, in order (the change
/// feed): `version, value, reason, id, applied_at`, found by walking the key's
/// chain back from its record's `head`, at most `?3` steps (a client further
/// behind gets the newest `?3`). A deletion has reason `deleted` and no value. The
/// walk stops where the chain does: at version `?2 + 1`, or where outcomes were
/// pruned or predate the chain, so a first version above `?2 + 1` means the ones
/// between are gone.
pub const CHANGES: &str = "WITH RECURSIVE chain(id, version, value, reason, applied_at, prev, steps) AS (
    SELECT w.id, w.version, w.value, w.reason, w.applied_at, w.prev, 1
    FROM spillway_records AS r JOIN spillway_writes AS w ON w.id = r.head
    WHERE r.key = ?1 AND w.version > ?2
  UNION ALL
    SELECT w.id, w.version, w.value, w.reason, w.applied_at, w.prev, c.steps + 1
    FROM chain AS c JOIN spillway_writes AS w ON w.id = c.prev
    WHERE c.version > ?2 + 1 AND w.version > ?2 AND c.steps < ?3)
  SELECT version, value, reason, id, applied_at FROM chain ORDER BY version";

/// Forgets up to `?2` outcomes, in all, of the shards of the JSON array `?1` of
/// `[shard, before_ms]` rows whose stream time is before the shard's bound,
/// walking the primary key: a write id is `<shard>-<ms>-<seq>` with 13-digit
/// milliseconds (until the year 2286), so one shard's ids are one key range, in
/// stream order, and `'<shard>-<ms>'` bounds it. (`CROSS JOIN` keeps the bounds
/// the outer loop: each shard one range of the key.)
///
/// Safe for exactly-once as long as a shard's bound is at most the stream time of
/// its oldest entry still in its stream: a write can be delivered (again) only while its
/// entry is in the stream (pending or unacknowledged), entry ids only grow, and a
/// replayed dead letter gets a new id. So an outcome older than every entry still
/// in the stream belongs to a write that can never come back.
pub const PRUNE_WRITES: &str = "DELETE FROM spillway_writes WHERE id IN (
  SELECT w.id FROM json_each(?1) AS b CROSS JOIN spillway_writes AS w
  WHERE w.id > json_extract(b.value, '$[0]') || '-' AND w.id < json_extract(b.value, '$[0]') || '-' || json_extract(b.value, '$[1]')
  LIMIT ?2)";

/// A write's outcome by id: `status, version, reason, key`.
pub const WRITE_STATUS: &str = "SELECT status, version, reason, key FROM spillway_writes WHERE id = ?1";

/// Whether the three tables exist (a row only when all do).
pub const HAS_TABLES: &str = "SELECT count(*) FROM sqlite_master WHERE type = 'table'
  AND name IN ('spillway_records', 'spillway_writes', 'spillway_fences') HAVING count(*) = 3";

/// SQLite's statements: the tables, then the migrations of databases made by
/// earlier versions.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "sqlite",
    tune: &[WAL],
    schema: &[
        super::Step { done: HAS_TABLES, statements: &SCHEMA_STATEMENTS },
        super::Step { done: HAS_V2_COLUMNS, statements: &MIGRATE_V2 },
        super::Step { done: MIGRATE_V3[0].0, statements: MIGRATE_V3[0].1 },
        super::Step { done: MIGRATE_V3[1].0, statements: MIGRATE_V3[1].1 },
        super::Step { done: NO_OLD_INDEX, statements: &INDEXES },
    ],
    schema_lock: None,
    begin: BEGIN,
    in_transaction: None,
    on_open: &[],
    commit: COMMIT,
    rollback: ROLLBACK,
    fence: FENCE,
    fence_token: "SELECT token FROM spillway_fences WHERE shard = ?1",
    applied_ids: APPLIED_IDS,
    records: RECORDS,
    record: RECORD,
    upsert_records: UPSERT_RECORDS,
    insert_writes: INSERT_WRITES,
    changes: CHANGES,
    prune_writes: PRUNE_WRITES,
    write_status: WRITE_STATUS,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-statement check of the whole schema says "due" on a fresh
    /// database and while any step's own check does (an old index still
    /// there), and "current" once every step's check says it has run.
    #[test]
    fn the_schema_is_checked_in_one_statement() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        let current = || db.query_row(&super::super::schema_current(DIALECT.schema), [], |r| r.get::<_, i64>(0)).unwrap() == 1;
        let each = || DIALECT.schema.iter().all(|step| db.query_row(step.done, [], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0);
        assert!(!current() && !each(), "a fresh database");
        for stmt in SCHEMA_STATEMENTS {
            db.execute_batch(stmt).unwrap();
        }
        assert!(current() && each(), "the tables made as they are now");
        db.execute_batch("CREATE INDEX spillway_writes_by_entry ON spillway_writes (shard, entry_ms)").unwrap();
        assert!(!current() && !each(), "the old index is there: its step is due");
        for stmt in INDEXES {
            db.execute_batch(stmt).unwrap();
        }
        assert!(current(), "and done again");
    }

    /// The batch statements take their rows as one JSON array, and SQLite reads
    /// every column (text, integer, null) back out of it as it was.
    #[test]
    fn json_rows_round_trip() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        for stmt in SCHEMA_STATEMENTS {
            db.execute(stmt, []).unwrap();
        }
        let rows = r#"[["a","{\"n\":1}",1,"e1",10,0,"3-4-0"],["b","[1,\"x\"]",2,"e2",20,0,null]]"#;
        assert_eq!(db.execute(UPSERT_RECORDS, [rows]).unwrap(), 2);
        let again = r#"[["a","{\"n\":2}",2,"e3",11,0,"3-5-0"]]"#;
        db.execute(UPSERT_RECORDS, [again]).unwrap();
        let mut q = db.prepare(RECORDS).unwrap();
        let got: Vec<(String, String, i64)> = q
            .query_map([r#"["a","b","zz"]"#], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![("a".into(), r#"{"n":2}"#.into(), 2), ("b".into(), r#"[1,"x"]"#.into(), 2)]);
        let outcomes = r#"[["3-4-0","a","applied",1,null,10,3,4,"{\"n\":1}",null],["3-5-0","a","applied",2,null,11,3,5,"{\"n\":2}","3-4-0"],
                          ["3-5-1","","rejected",null,"bad",11,3,5,null,null]]"#;
        assert_eq!(db.execute(INSERT_WRITES, [outcomes]).unwrap(), 3);
        let (version, reason): (Option<i64>, Option<String>) =
            db.query_row("SELECT version, reason FROM spillway_writes WHERE id = '3-5-1'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((version, reason.as_deref()), (None, Some("bad")));
        let ids: Vec<String> = db.prepare(APPLIED_IDS).unwrap().query_map([r#"["3-5-0","3-9-9"]"#], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        assert_eq!(ids, vec!["3-5-0"]);
        // The chain: after version 0 both versions, after 1 only the second, a cap
        // of one step gives the newest.
        let changes = |after: i64, steps: i64| -> Vec<(i64, Option<String>)> {
            db.prepare(CHANGES).unwrap().query_map(rusqlite::params!["a", after, steps], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
        };
        assert_eq!(changes(0, 100), vec![(1, Some(r#"{"n":1}"#.to_owned())), (2, Some(r#"{"n":2}"#.to_owned()))]);
        assert_eq!(changes(1, 100), vec![(2, Some(r#"{"n":2}"#.to_owned()))]);
        assert_eq!(changes(0, 1).len(), 1);
        assert!(changes(2, 100).is_empty());
    }

    /// A round's fences and pruning, one statement each for all its shards:
    /// a fence advances only to a token at least as new as the one seen, and
    /// says so by its row; pruning takes each shard's range before its own
    /// bound, within the limit in all, walking the key (never the table).
    #[test]
    fn round_statements_take_every_shard_at_once() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        for stmt in SCHEMA_STATEMENTS {
            db.execute(stmt, []).unwrap();
        }
        let fence = |rows: &str| -> Vec<(i64, i64)> {
            db.prepare(FENCE).unwrap().query_map([rows], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
        };
        assert_eq!(fence("[[3, 5], [1, 2]]"), vec![(1, 2), (3, 5)]);
        // Shard 3 has seen 5: an older holder's 4 is fenced off (no row), a
        // newer 6 and the same 2 pass.
        assert_eq!(fence("[[1, 2], [3, 4], [7, 6]]"), vec![(1, 2), (7, 6)]);
        let token: i64 = db.query_row("SELECT token FROM spillway_fences WHERE shard = 3", [], |r| r.get(0)).unwrap();
        assert_eq!(token, 5);

        for (id, shard, ms) in [("1-1000000000001-0", 1, 1), ("1-1000000000002-0", 1, 2), ("2-1000000000001-0", 2, 1), ("2-1000000000003-0", 2, 3), ("12-1000000000001-0", 12, 1)] {
            db.execute(
                "INSERT INTO spillway_writes (id, key, status, applied_at, shard, entry_ms) VALUES (?1, 'k', 'applied', 0, ?2, ?3)",
                rusqlite::params![id, shard, 1_000_000_000_000_i64 + ms],
            )
            .unwrap();
        }
        let left = || -> Vec<String> { db.prepare("SELECT id FROM spillway_writes ORDER BY id").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect() };
        // Shard 1 before ms ...002 (one), shard 2 before ...003 (one); shard
        // 12 is not named (shard 1's range is not shard 12's).
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params!["[[1, 1000000000002], [2, 1000000000003]]", 10]).unwrap(), 2);
        assert_eq!(left(), vec!["1-1000000000002-0", "12-1000000000001-0", "2-1000000000003-0"]);
        // The limit holds over all the shards together.
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params!["[[1, 1000000000009], [2, 1000000000009], [12, 1000000000009]]", 2]).unwrap(), 2);
        assert_eq!(left().len(), 1);
        let plan: Vec<String> = db
            .prepare(&format!("EXPLAIN QUERY PLAN {PRUNE_WRITES}"))
            .unwrap()
            .query_map(rusqlite::params!["[]", 1], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan.iter().any(|step| step.starts_with("SEARCH w USING PRIMARY KEY (id>? AND id<?)")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.starts_with("SCAN w")), "{plan:?}");
    }

    /// A retention reaching back before 2001 gives a bound of 12 digits,
    /// which sorts after every id of the shard: pruning would forget the
    /// outcomes of writes still in the stream. Bounds are taken from 2001 on.
    #[test]
    fn a_bound_before_2001_forgets_nothing() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        for stmt in SCHEMA_STATEMENTS {
            db.execute(stmt, []).unwrap();
        }
        let insert = || {
            db.execute("INSERT INTO spillway_writes (id, key, status, applied_at, shard, entry_ms) VALUES ('4-1795472253740-0', 'k', 'applied', 0, 4, 1795472253740)", [])
                .unwrap()
        };
        insert();
        let bounds = |before: i64| serde_json::json!([[4, before]]).to_string();
        let raw = 1_795_472_253_740 - 999_999_999 * 1000;
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params![bounds(crate::sql::prune_bound(raw)), 10]).unwrap(), 0, "nothing before 2001");
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params![bounds(raw), 10]).unwrap(), 1, "the raw bound sorts after the id");
        insert();
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params![bounds(crate::sql::prune_bound(-5)), 10]).unwrap(), 0);
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
             INSERT INTO spillway_records VALUES ('k', '{}', 1, 'e', 0);
             INSERT INTO spillway_writes VALUES ('12-1795472253739-4', 'k', 'applied', 1, NULL, 0),
               ('12-1795472253740-0', 'k', 'applied', 2, NULL, 0), ('1-1795472253739-0', 'j', 'applied', 1, NULL, 0);",
        )
        .unwrap();
        let before: i64 = db.query_row(HAS_V2_COLUMNS, [], |r| r.get(0)).unwrap();
        assert_eq!(before, 0);
        for s in MIGRATE_V2 {
            db.execute(s, []).unwrap();
        }
        let (shard, ms): (i64, i64) =
            db.query_row("SELECT shard, entry_ms FROM spillway_writes WHERE id = '12-1795472253739-4'", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((shard, ms), (12, 1_795_472_253_739));
        for (_, steps) in MIGRATE_V3 {
            for s in steps {
                db.execute(s, []).unwrap();
            }
        }
        for s in INDEXES {
            db.execute(s, []).unwrap();
        }
        // The rows came along, into clustered tables (no rowid any more).
        let (rows, deleted): (i64, i64) = db.query_row("SELECT count(*), sum(deleted) FROM spillway_records", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((rows, deleted), (1, 0));
        assert!(db.prepare("SELECT rowid FROM spillway_writes").is_err());
        // Pruning takes shard 12's ids before the bound, not shard 1's, not the bound's own.
        assert_eq!(db.execute(PRUNE_WRITES, rusqlite::params!["[[12, 1795472253740]]", 10]).unwrap(), 1);
        let left: Vec<String> = db.prepare("SELECT id FROM spillway_writes ORDER BY id").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        assert_eq!(left, vec!["1-1795472253739-0", "12-1795472253740-0"]);
    }
}
