//! The database schema and statements, in each engine's dialect: SQLite (Spin's
//! `spin:sqlite`, the embedded default) and PostgreSQL (`spin:postgres`, for
//! platforms without SQLite). The code that runs them is the same for both: it
//! names a statement of the [`Dialect`] it was given, never an engine.
//!
//! A batch is applied in ONE transaction of a handful of statements, whatever its
//! size: the fence is advanced and checked in one statement (a holder whose lease
//! expired has a lower fencing token and is refused), the batch's records are read in
//! one query, written back in one upsert, and every write id is recorded in one
//! insert, so a redelivered write changes nothing.
//!
//! Statements over many rows take ONE parameter: a JSON array (text) that the
//! database unpacks itself, rather than thousands of bound values, each of which
//! would cross the Wasm boundary and the host on its own. Rows are arrays, their
//! columns in the order each statement names. Parameters are integers (64-bit),
//! text or null, and so are the columns read back.

pub mod postgres;
pub mod sqlite;

/// A parameter or column value: the types Spillway's schema uses, whatever the
/// engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlValue {
    /// SQL `NULL`.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// Text.
    Text(String),
}

/// The earliest stream time a pruning bound names: the first millisecond
/// with 13 digits (2001-09-09). Write ids compare as text
/// (`<shard>-<ms>-<seq>`), which orders them by time only while every
/// millisecond has 13 digits: a bound of fewer (a retention reaching back
/// before 2001, or a clock gone wrong) would sort after every id of its shard
/// and forget the outcomes of writes still in the stream. No write is older,
/// so the bound forgets nothing it should keep.
pub const EARLIEST_PRUNE_MS: i64 = 1_000_000_000_000;

/// `before_ms` as a bound of [`Dialect::prune_writes`]: never before
/// [`EARLIEST_PRUNE_MS`].
pub fn prune_bound(before_ms: i64) -> i64 {
    before_ms.max(EARLIEST_PRUNE_MS)
}

/// A text value.
pub fn text(v: &SqlValue) -> Option<String> {
    match v {
        SqlValue::Text(t) => Some(t.clone()),
        _ => None,
    }
}

/// An integer value.
pub fn integer(v: &SqlValue) -> Option<i64> {
    match v {
        SqlValue::Integer(i) => Some(*i),
        _ => None,
    }
}

/// A schema step: a check (a query whose first column is a count, above 0 once
/// the step has run, or no row) and the statements that make it so, run in one
/// transaction and only if the check, repeated under the schema lock, still says
/// the step is due.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Whether the step has run.
    pub done: &'static str,
    /// What it runs.
    pub statements: &'static [&'static str],
}

/// One engine's statements. Parameters are written `?n` in SQLite and `$n` in
/// PostgreSQL; the order below is the same for both.
#[derive(Debug)]
pub struct Dialect {
    /// The engine, for messages: `sqlite` or `postgres`.
    pub name: &'static str,
    /// Settings tried before the schema, best effort (SQLite's write-ahead log:
    /// a commit is one append and one sync of the log, and readers are not
    /// blocked by the processor's transaction; `synchronous` stays `FULL`).
    pub tune: &'static [&'static str],
    /// The schema (version 3) and the migrations from older ones, in order.
    ///
    /// - Version 2: write outcomes carry their shard and stream time.
    /// - Version 3: a deleted record stays as a tombstone (`deleted = 1`) holding
    ///   the version its deletion reached, so versions never go back when a key is
    ///   re-created; and an applied write's outcome keeps the value it produced
    ///   (`value`, canonical JSON; a deletion has `reason = 'deleted'` and no
    ///   value): the key's change feed, kept as long as the outcomes. The feed
    ///   needs a key's versions in order without an index by key (one would cost a
    ///   random B-tree insert per write, about a third of a round's database time):
    ///   each applied outcome names the key's previous applied write (`prev`) and
    ///   the record its latest (`head`), a chain [`Dialect::changes`] walks back.
    ///   Outcomes are pruned by walking their primary key (see
    ///   [`Dialect::prune_writes`]): no secondary index at all.
    pub schema: &'static [Step],
    /// Taken first in a schema step's transaction, where `begin` alone does not
    /// serialise concurrent creators.
    pub schema_lock: Option<&'static str>,
    /// Starts a transaction (taking the write lock at once where the engine has
    /// one).
    pub begin: &'static str,
    /// Run right after `begin` in a batch transaction, with one parameter, the
    /// lease TTL in milliseconds (text): PostgreSQL's bounds on a holder that
    /// never commits. A row lock is waited for at most 10 s, and a transaction
    /// whose client has said nothing for a lease TTL is ended by the server
    /// (`idle_in_transaction_session_timeout`): a processor cut off from the
    /// database mid-transaction has lost its lease by then, and its fence row's
    /// lock must not stall the shard's next holder for as long as the cut
    /// lasts (the server would not notice the client is gone for hours).
    pub in_transaction: Option<&'static str>,
    /// Run when a connection is opened: ends a transaction a previous user of a
    /// pooled connection left open (Spin's PostgreSQL pool hands a client back as
    /// it was; an instance that died mid-transaction would leave its locks, and
    /// its uncommitted rows, to the next user).
    pub on_open: &'static [&'static str],
    /// Commits it.
    pub commit: &'static str,
    /// Abandons it.
    pub rollback: &'static str,
    /// Advances the fences of one round's shards, each to its token unless a
    /// newer token was seen, in shard order (two processors whose rounds share
    /// shards, a stale holder and the new one, cannot wait on each other in a
    /// cycle): params `(JSON array of [shard, token] rows)`, columns `shard,
    /// token` for each fence that advanced. A shard without a row back has had
    /// a newer holder write since: its batch must not commit.
    pub fence: &'static str,
    /// The fencing token the database has seen for a shard: params `(shard)`,
    /// column `token`.
    pub fence_token: &'static str,
    /// Write ids already recorded, among the JSON array of ids, with their status:
    /// `id, status`.
    pub applied_ids: &'static str,
    /// Stored state of the JSON array of keys, tombstones included: `key, value,
    /// version, etag, updated_at, deleted, head` (a tombstone's value is `null`;
    /// `head` is the id of the key's latest applied write).
    pub records: &'static str,
    /// One key's stored state (same columns as [`Dialect::records`]).
    pub record: &'static str,
    /// Upserts records from the JSON array of rows `[key, value (canonical JSON
    /// text), version, etag, updated_at, deleted (0 or 1), head]`.
    pub upsert_records: &'static str,
    /// Records write outcomes from the JSON array of rows `[id, key, status,
    /// version, reason, applied_at, shard, entry_ms, value, prev]` (JSON null for
    /// none; `value` is the canonical JSON text an applied write produced, `prev`
    /// the id of the key's applied write before it).
    pub insert_writes: &'static str,
    /// The applied versions of a key after a version, in order (the change feed):
    /// params `(key, after, steps)`, columns `version, value, reason, id,
    /// applied_at`, found by walking the key's chain back from its record's
    /// `head`, at most `steps` steps (a client further behind gets the newest
    /// `steps`). A deletion has reason `deleted` and no value. The walk stops
    /// where the chain does: at version `after + 1`, or where outcomes were pruned
    /// or predate the chain, so a first version above `after + 1` means the ones
    /// between are gone.
    pub changes: &'static str,
    /// Forgets up to `limit` outcomes, in all, of one round's shards whose stream
    /// time is before the shard's bound (milliseconds): params `(JSON array of
    /// [shard, before_ms] rows, limit)`. It walks the primary key: a write id is
    /// `<shard>-<ms>-<seq>` with 13-digit milliseconds (until the year 2286), so
    /// one shard's ids are one key range, in stream order (byte order:
    /// PostgreSQL's ids are `COLLATE "C"`), and `'<shard>-<ms>'` bounds it.
    ///
    /// Safe for exactly-once as long as each bound is at most the stream time of
    /// its shard's oldest entry still in its stream: a write can be delivered
    /// (again) only while its entry is in the stream (pending or
    /// unacknowledged), entry ids only grow, and a replayed dead letter gets a new
    /// id. So an outcome older than every entry still in the stream belongs to a
    /// write that can never come back.
    pub prune_writes: &'static str,
    /// A write's outcome by id: `status, version, reason, key`.
    pub write_status: &'static str,
}

/// One query saying whether every step of `steps` has run (a row whose first
/// column is 1, else 0: an integer, as both engines' drivers read it the
/// same): the checks of all the steps at once, so that opening a database
/// whose schema is current (every open but the first) costs one statement,
/// not one per step.
pub fn schema_current(steps: &[Step]) -> String {
    let checks: Vec<String> = steps.iter().map(|s| format!("coalesce(({}) > 0, false)", s.done)).collect();
    format!("SELECT CASE WHEN {} THEN 1 ELSE 0 END", checks.join(" AND "))
}

/// The engine behind a `database` setting: `sqlite` (Spin's `default` database)
/// or a `postgres://` / `postgresql://` URL.
pub fn dialect_for(database: &str) -> Option<&'static Dialect> {
    if database == "sqlite" {
        Some(&sqlite::DIALECT)
    } else if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        Some(&postgres::DIALECT)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both dialects number the same parameters for the same statement: a
    /// statement that takes `n` in one takes `n` in the other.
    #[test]
    fn dialects_take_the_same_parameters() {
        fn count(s: &str, mark: char) -> usize {
            (1..=9).filter(|n| s.contains(&format!("{mark}{n}"))).count()
        }
        let (s, p) = (&sqlite::DIALECT, &postgres::DIALECT);
        let pairs = [
            (s.fence, p.fence),
            (s.fence_token, p.fence_token),
            (s.applied_ids, p.applied_ids),
            (s.records, p.records),
            (s.record, p.record),
            (s.upsert_records, p.upsert_records),
            (s.insert_writes, p.insert_writes),
            (s.changes, p.changes),
            (s.prune_writes, p.prune_writes),
            (s.write_status, p.write_status),
        ];
        for (a, b) in pairs {
            assert_eq!(count(a, '?'), count(b, '$'), "{a}\n---\n{b}");
            assert!(count(a, '?') > 0);
        }
    }

    #[test]
    fn database_setting_picks_the_engine() {
        assert_eq!(dialect_for("sqlite").map(|d| d.name), Some("sqlite"));
        assert_eq!(dialect_for("postgres://u@db:5432/app").map(|d| d.name), Some("postgres"));
        assert_eq!(dialect_for("postgresql://db/app").map(|d| d.name), Some("postgres"));
        assert!(dialect_for("mysql://db/app").is_none());
        assert!(dialect_for("").is_none());
    }
}
