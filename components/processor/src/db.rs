//! Applying one batch in ONE database transaction: fence check, ordered apply,
//! write ids recorded with the data (the exactly-once effect).

use std::collections::{BTreeMap, HashSet};

use spillway_core::apply::{Outcome, Record, plan_batch};
use spillway_core::problem::Problem;
use spillway_core::sql;
use spillway_core::write::Write;
use spin_sdk::sqlite::{Connection, Value};

/// What a committed batch did.
pub(crate) struct Applied {
    /// Final state of every key the batch names (for the cache).
    pub(crate) state: BTreeMap<String, Option<Record>>,
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
}

fn db_err(e: spin_sdk::sqlite::Error) -> Problem {
    Problem::unavailable(&format!("database: {e:?}"))
}

async fn exec(conn: &Connection, stmt: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>, Problem> {
    let r = conn.execute(stmt, params).await.map_err(db_err)?;
    let rows = r.collect().await.map_err(db_err)?;
    Ok(rows.into_iter().map(|r| r.values).collect())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(t) => Some(t.clone()),
        _ => None,
    }
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        _ => None,
    }
}

/// Applies `entries` (stream id, payload) of `shard` holding fencing token `fence`.
pub(crate) async fn apply_batch(shard: u32, fence: i64, entries: &[(String, String)]) -> Result<Applied, Problem> {
    let conn = Connection::open_default().await.map_err(db_err)?;
    // Every batch (three cheap statements): a reused instance must not trust an
    // earlier check, the database may have been replaced since.
    for stmt in sql::schema_statements() {
        exec(&conn, stmt, vec![]).await?;
    }
    exec(&conn, sql::BEGIN, vec![]).await?;
    match apply_in_tx(&conn, shard, fence, entries).await {
        Ok(a) => {
            exec(&conn, sql::COMMIT, vec![]).await?;
            Ok(a)
        }
        Err(p) => {
            let _ = exec(&conn, sql::ROLLBACK, vec![]).await;
            Err(p)
        }
    }
}

async fn apply_in_tx(conn: &Connection, shard: u32, fence: i64, entries: &[(String, String)]) -> Result<Applied, Problem> {
    exec(conn, sql::FENCE_ADVANCE, vec![Value::Integer(i64::from(shard)), Value::Integer(fence)]).await?;
    let current = exec(conn, sql::FENCE_CHECK, vec![Value::Integer(i64::from(shard))]).await?;
    let current = current.first().and_then(|r| r.first()).and_then(integer);
    if current != Some(fence) {
        return Err(Problem::new(409, "fenced", "Lease lost", &format!(
            "fencing token {fence} is stale (shard {shard} is at {current:?}); nothing was committed"
        )));
    }
    let mut writes = Vec::with_capacity(entries.len());
    let mut unreadable = Vec::new();
    for (entry, payload) in entries {
        let id = format!("{shard}-{entry}");
        match serde_json::from_str::<Write>(payload) {
            Ok(w) => writes.push((id, w)),
            Err(e) => unreadable.push((id, e.to_string())),
        }
    }
    let ids: Vec<Value> = writes.iter().map(|(id, _)| Value::Text(id.clone())).chain(unreadable.iter().map(|(id, _)| Value::Text(id.clone()))).collect();
    let already: HashSet<String> = exec(conn, &sql::applied_ids(ids.len()), ids).await?.iter().filter_map(|r| r.first().and_then(text)).collect();
    let keys: Vec<String> = writes.iter().map(|(_, w)| w.key.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut existing = BTreeMap::new();
    if !keys.is_empty() {
        let rows = exec(conn, &sql::records(keys.len()), keys.iter().map(|k| Value::Text(k.clone())).collect()).await?;
        for r in rows {
            let (Some(key), Some(value), Some(version), Some(etag), Some(updated_at)) =
                (r.first().and_then(text), r.get(1).and_then(text), r.get(2).and_then(integer), r.get(3).and_then(text), r.get(4).and_then(integer))
            else {
                continue;
            };
            let value = serde_json::from_str(&value).map_err(|e| Problem::unavailable(&format!("stored record {key:?} is not JSON: {e}")))?;
            existing.insert(key, Record { value, version: version as u64, etag, updated_at });
        }
    }
    let now = spillway_spin::now_ms();
    let plan = plan_batch(existing.clone(), &writes, &already, now);
    for (key, rec) in &plan.records {
        match rec {
            Some(r) => {
                let value = String::from_utf8(spillway_core::apply::canonical(&r.value)).unwrap_or_default();
                exec(conn, sql::UPSERT_RECORD, vec![
                    Value::Text(key.clone()), Value::Text(value), Value::Integer(r.version as i64),
                    Value::Text(r.etag.clone()), Value::Integer(r.updated_at),
                ]).await?;
            }
            None => {
                exec(conn, sql::DELETE_RECORD, vec![Value::Text(key.clone())]).await?;
            }
        }
    }
    let (mut applied, mut rejected) = (0, 0);
    for (id, key, outcome) in &plan.outcomes {
        let (status, version, reason) = match outcome {
            Outcome::Applied { version } => {
                applied += 1;
                ("applied", Value::Integer(*version as i64), Value::Null)
            }
            Outcome::Rejected { reason } => {
                rejected += 1;
                ("rejected", Value::Null, Value::Text(reason.clone()))
            }
        };
        exec(conn, sql::INSERT_WRITE, vec![
            Value::Text(id.clone()), Value::Text(key.clone()), Value::Text(status.into()), version, reason, Value::Integer(now),
        ]).await?;
    }
    for (id, err) in unreadable.iter().filter(|(id, _)| !already.contains(id)) {
        rejected += 1;
        exec(conn, sql::INSERT_WRITE, vec![
            Value::Text(id.clone()), Value::Text(String::new()), Value::Text("rejected".into()), Value::Null,
            Value::Text(format!("unreadable write: {err}")), Value::Integer(now),
        ]).await?;
    }
    let mut state: BTreeMap<String, Option<Record>> = keys.iter().map(|k| (k.clone(), existing.get(k).cloned())).collect();
    state.extend(plan.records);
    Ok(Applied { state, applied, rejected })
}
