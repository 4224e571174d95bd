//! The dead letters: list (`GET /v1/dead`), replay (`POST /v1/dead/replay`) and
//! purge (`POST /v1/dead/purge`), which select them with one parser
//! ([`Selection`]).

use serde_json::json;
use spillway_core::call::Call;
use spillway_core::dead::{DeadEntry, Selection};
use spillway_core::layout::Layout;
use spillway_core::problem::Problem;
use spillway_core::reply;
use spillway_core::settings::Settings;
use spillway_spin::db::{Db, DbErrorKind, SqlValue};
use spillway_spin::{Redis, bin, json, text};
use spin_sdk::http::Request;

/// `GET /v1/dead`: every dead letter, oldest first per shard.
pub(crate) async fn list(s: &Settings) -> Result<http::Response<String>, Problem> {
    let mut out = Vec::new();
    for shard in 0..s.layout.shards {
        out.extend(entries(&Redis::for_shard(s, shard), &s.layout, shard).await?.iter().map(DeadEntry::to_json));
    }
    Ok(json(200, &json!({"dead": out}), &[]))
}

/// `POST /v1/dead/replay`: `{"ids": [...]}` (or an empty body: all) back onto the queue.
// A little over the usual length: one walk of the shards, each step
// (already applied? replay the rest) needing the walk's running lists.
pub(crate) async fn replay(s: &Settings, req: Request) -> Result<http::Response<String>, Problem> {
    let body = spillway_spin::read_body(req, s.limits.max_body_bytes).await?;
    let selection = match Selection::parse(&body, s.layout.shards)? {
        None => Selection::All,
        Some(ids @ Selection::Ids(_)) => ids,
        Some(_) => return Err(Problem::invalid("expected {\"ids\": [write id, ...]}, or no body to replay all", "")),
    };
    let l = &s.layout;
    let db = Db::open().await?;
    let mut replayed = Vec::new();
    let mut already = Vec::new();
    let mut rang = Vec::new();
    let walked: Result<(), Problem> = async {
        for shard in 0..l.shards {
            let redis = Redis::for_shard(s, shard);
            if !selection.touches(shard) {
                continue;
            }
            // A dead letter whose write the database has applied (it committed, then
            // its acknowledgement kept failing) must not be applied again: it is taken
            // off the dead-letter stream instead, and reported.
            let dead: Vec<(String, String)> = entries(&redis, l, shard)
                .await?
                .into_iter()
                .filter(|e| selection.takes(shard, &e.id))
                .map(|e| (e.entry, e.id))
                .collect();
            if dead.is_empty() {
                continue;
            }
            let ids_json = serde_json::to_string(&dead.iter().map(|(_, id)| id).collect::<Vec<_>>()).unwrap_or_default();
            let applied: std::collections::HashSet<String> = match db.query(db.sql().applied_ids, vec![SqlValue::Text(ids_json)]).await {
                Ok(rows) => rows.iter().filter_map(|r| r.first().and_then(spillway_spin::db::text)).collect(),
                Err(e) if e.kind == DbErrorKind::MissingTable => Default::default(),
                Err(e) => return Err(e.into()),
            };
            let (done, todo): (Vec<_>, Vec<_>) = dead.into_iter().partition(|(_, id)| applied.contains(id));
            if !done.is_empty() {
                let mut args = vec![bin(&l.dead(shard))];
                args.extend(done.iter().map(|(entry, _)| bin(entry)));
                redis.execute("XDEL", args).await?;
                already.extend(done.into_iter().map(|(_, id)| id));
            }
            if todo.is_empty() {
                continue;
            }
            let retention_ms = s.status_retention_secs.saturating_mul(1000);
            let flat = redis.call(&Call::replay(l, shard, s.idempotency_shard(shard), s.lease_ttl_ms, retention_ms, spillway_spin::random_u32(), todo.into_iter().map(|(_, id)| id))).await?;
            // Rung (the script set the flags) even when its reply cannot be read.
            if !flat.is_empty() {
                rang.push(shard);
            }
            let pairs = reply::replayed(&spillway_spin::redis::values(&flat)).map_err(spillway_spin::redis::malformed)?;
            replayed.extend(pairs.into_iter().map(|(old, new)| json!({"id": old, "replayed_as": new})));
        }
        Ok(())
    }
    .await;
    // The replayed shards' doorbells (their flags were set by the script), also
    // when a later shard failed.
    spillway_spin::ring(s, &rang).await;
    walked?;
    Ok(json(200, &json!({"replayed": replayed, "already_applied": already}), &[]))
}

/// A shard's dead letters, oldest first.
async fn entries(redis: &Redis, l: &Layout, shard: u32) -> Result<Vec<DeadEntry>, Problem> {
    let flat = redis.execute("XRANGE", vec![bin(&l.dead(shard)), bin("-"), bin("+")]).await?;
    let flat: Vec<Option<String>> = flat.iter().map(text).collect();
    DeadEntry::parse_all(&flat).map_err(|e| spillway_spin::backend_failed(&format!("Redis ({})", "the dead-letter stream"), &e))
}

/// `POST /v1/dead/purge`: `{"ids": [...]}`, `{"shard": n}` or `{"all": true}`
/// (said explicitly: a purge cannot be undone): the dead letters are dropped and
/// their writes' status says `purged`.
pub(crate) async fn purge(s: &Settings, body: &[u8]) -> Result<http::Response<String>, Problem> {
    let l = &s.layout;
    // Said explicitly: no body purges nothing.
    let Some(selection) = Selection::parse(body, l.shards)? else {
        return Err(Problem::invalid("say what to purge: {\"ids\": [...]}, {\"shard\": n} or {\"all\": true}", ""));
    };
    let retention_ms = s.status_retention_secs.saturating_mul(1000);
    let mut purged = Vec::new();
    for shard in 0..l.shards {
        if !selection.touches(shard) {
            continue;
        }
        // The ids on this shard; none: all of its dead letters.
        let mine: Vec<String> = match &selection {
            Selection::Ids(ids) => ids.iter().filter(|w| w.shard == shard).map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        let out = Redis::for_shard(s, shard).call(&Call::purge(l, shard, retention_ms, mine)).await?;
        purged.extend(reply::purged(&spillway_spin::redis::values(&out)).map_err(spillway_spin::redis::malformed)?);
    }
    Ok(json(200, &json!({"purged": purged}), &[]))
}
