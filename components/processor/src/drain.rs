//! Draining one shard: the lease (lock) protocol, batch reads through the consumer
//! group, apply, cache refresh, acknowledgement, and the no-lost-wake-up handshake
//! with the doorbell flag.
//!
//! Read-your-writes rests on the order of the last three steps: the cache is
//! refreshed (under each key's fill lock) before the batch's entries are
//! acknowledged, and a write's status reads `applied` only once its entry has left
//! the stream (see the cache component). So whoever has seen `applied` with version
//! v reads v or newer from the cache.

use std::collections::BTreeMap;

use spillway_core::apply::Record;
use spillway_core::layout::{CONSUMER, GROUP};
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::db::Db;
use spillway_spin::kv::Kv;
use spillway_spin::{Redis, int, text, token};

use crate::db::{self, Batch};

/// Fill-lock TTL: how long a reader's cache fill, or our refresh, may take at most.
const FILL_LOCK_TTL_MS: &str = "5000";

/// What a drain did.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) applied: u64,
    pub(crate) rejected: u64,
    pub(crate) batches: u64,
    pub(crate) busy: Vec<u32>,
}

/// Drains `shard` until its stream is empty, unless another processor holds its
/// lease (then that one is responsible, see below).
pub(crate) async fn drain_shard(s: &Settings, db: &Db, shard: u32, stats: &mut Stats) -> Result<(), Problem> {
    let redis = Redis::new(&s.redis_address);
    let l = &s.layout;
    loop {
        let me = token();
        let acquired = redis
            .eval(scripts::LEASE_ACQUIRE, &[l.lease(shard), l.fence(shard)], &[me.clone(), s.lease_ttl_ms.to_string()])
            .await?;
        let fence = acquired.first().and_then(int).unwrap_or(0);
        if fence <= 0 {
            stats.busy.push(shard);
            return Ok(());
        }
        let result = drain_held(s, db, &redis, shard, &me, fence, stats).await;
        redis.eval(scripts::LEASE_RELEASE, &[l.lease(shard)], &[me]).await?;
        result?;
        // A doorbell rung after we cleared the flag found the lease held and left the
        // flag set: it is ours to answer now that the lease is free.
        let rung = redis.execute("EXISTS", vec![spillway_spin::bin(&l.bell(shard))]).await?;
        if rung.first().and_then(int).unwrap_or(0) == 0 {
            return Ok(());
        }
    }
}

async fn drain_held(s: &Settings, db: &Db, redis: &Redis, shard: u32, me: &str, fence: i64, stats: &mut Stats) -> Result<(), Problem> {
    let l = &s.layout;
    let mut cleared = false;
    let retention_ms = s.status_retention_secs.saturating_mul(1000).to_string();
    loop {
        let reply = redis
            .eval(
                scripts::READ_BATCH,
                &[l.lease(shard), l.stream(shard), l.attempts(shard), l.dead(shard), l.dead_index(shard)],
                &[
                    me.to_owned(),
                    GROUP.into(),
                    CONSUMER.into(),
                    s.batch_size.to_string(),
                    s.max_attempts.to_string(),
                    shard.to_string(),
                    s.lease_ttl_ms.to_string(),
                    retention_ms.clone(),
                ],
            )
            .await?;
        if reply.first().and_then(text).as_deref() != Some("ok") {
            return Ok(()); // lease lost: whoever holds it now carries on
        }
        let prune_before_ms = reply.get(1).and_then(int).unwrap_or(0);
        let entries: Vec<(String, String)> = reply[2..]
            .chunks(2)
            .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
            .collect();
        if entries.is_empty() {
            if cleared {
                return Ok(());
            }
            // Clear the doorbell flag, then look once more: a write added before the
            // clear is seen now; one added after it rings the bell again.
            redis.execute("DEL", vec![spillway_spin::bin(&l.bell(shard))]).await?;
            cleared = true;
            continue;
        }
        cleared = false;
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let batch = Batch { shard, fence, entries: &entries, prune_before_ms };
        let applied = match db::apply_batch(db, &batch).await {
            Ok(a) => a,
            Err(p) => {
                let mut args = vec![p.detail.clone()];
                args.extend(ids.iter().cloned());
                redis.eval(scripts::RECORD_ERROR, &[l.attempts(shard)], &args).await?;
                return Err(p);
            }
        };
        refresh_cache(s, redis, &applied.state).await?;
        let mut args = vec![GROUP.to_owned()];
        args.extend(ids);
        redis.eval(scripts::ACK, &[l.stream(shard), l.attempts(shard)], &args).await?;
        stats.applied += applied.applied;
        stats.rejected += applied.rejected;
        stats.batches += 1;
    }
}

/// Writes the records' new state to the cache under each key's single-flight fill
/// lock, so a concurrent cache fill cannot put an older value back afterwards: all
/// the locks in one script call, the values in one `set-many` (one transaction on
/// Spin's SQLite store) and the deletions in one `delete-many`.
async fn refresh_cache(s: &Settings, redis: &Redis, state: &BTreeMap<String, Option<Record>>) -> Result<(), Problem> {
    let l = &s.layout;
    let kv = Kv::open_default()?;
    let me = token();
    let mut pending: Vec<&String> = state.keys().collect();
    for _ in 0..400 {
        if pending.is_empty() {
            return Ok(());
        }
        let locks: Vec<String> = pending.iter().map(|k| l.fill_lock(k)).collect();
        let got = redis.eval(scripts::LOCKS_ACQUIRE, &locks, &[me.clone(), FILL_LOCK_TTL_MS.into()]).await?;
        let mut held = Vec::new();
        let mut sets = Vec::new();
        let mut deletes = Vec::new();
        let mut waiting = Vec::new();
        for (i, key) in pending.iter().enumerate() {
            if got.get(i).and_then(int) != Some(1) {
                waiting.push(*key);
                continue;
            }
            held.push(locks[i].clone());
            match &state[*key] {
                Some(r) => sets.push((l.cache_key(key), cache_entry(key, r).into_bytes())),
                None => deletes.push(l.cache_key(key)),
            }
        }
        let written = async {
            kv.set_many(sets)?;
            kv.delete_many(deletes)
        }
        .await;
        if !held.is_empty() {
            redis.eval(scripts::LOCKS_RELEASE, &held, &[me.clone()]).await?;
        }
        written?;
        pending = waiting;
        if !pending.is_empty() {
            spillway_spin::wait_ms(5).await;
        }
    }
    Err(Problem::unavailable("cache fill locks stayed busy; the batch will be retried"))
}

/// The cache's JSON for a record (what `GET /v1/records/{key}` answers).
fn cache_entry(key: &str, r: &Record) -> String {
    serde_json::json!({"key": key, "value": r.value, "version": r.version, "etag": r.etag, "updated_at": r.updated_at}).to_string()
}
