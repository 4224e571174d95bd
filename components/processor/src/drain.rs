//! Draining one shard: the lease (lock) protocol, batch reads through the consumer
//! group, apply, cache refresh, acknowledgement, and the no-lost-wake-up handshake
//! with the doorbell flag.

use std::collections::BTreeMap;

use spillway_core::apply::Record;
use spillway_core::layout::{CONSUMER, GROUP};
use spillway_core::problem::Problem;
use spillway_core::scripts;
use spillway_core::settings::Settings;
use spillway_spin::{Redis, int, text, token};
use spin_sdk::key_value::Store;

use crate::db;

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
pub(crate) async fn drain_shard(s: &Settings, shard: u32, stats: &mut Stats) -> Result<(), Problem> {
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
        let result = drain_held(s, &redis, shard, &me, fence, stats).await;
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

async fn drain_held(s: &Settings, redis: &Redis, shard: u32, me: &str, fence: i64, stats: &mut Stats) -> Result<(), Problem> {
    let l = &s.layout;
    let mut cleared = false;
    loop {
        let reply = redis
            .eval(
                scripts::READ_BATCH,
                &[l.lease(shard), l.stream(shard), l.attempts(shard), l.dead(shard), l.dead_index(shard)],
                &[me.to_owned(), GROUP.into(), CONSUMER.into(), s.batch_size.to_string(), s.max_attempts.to_string(), shard.to_string()],
            )
            .await?;
        if reply.first().and_then(text).as_deref() != Some("ok") {
            return Ok(()); // lease lost: whoever holds it now carries on
        }
        let entries: Vec<(String, String)> = reply[1..]
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
        let renewed = redis.eval(scripts::LEASE_RENEW, &[l.lease(shard)], &[me.to_owned(), s.lease_ttl_ms.to_string()]).await?;
        if renewed.first().and_then(int).unwrap_or(0) == 0 {
            return Ok(());
        }
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let applied = match db::apply_batch(shard, fence, &entries).await {
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
/// lock, so a concurrent cache fill cannot put an older value back afterwards.
async fn refresh_cache(s: &Settings, redis: &Redis, state: &BTreeMap<String, Option<Record>>) -> Result<(), Problem> {
    let l = &s.layout;
    let store = Store::open_default()
        .await
        .map_err(|e| Problem::unavailable(&format!("key-value store: {e:?}")))?;
    let me = token();
    let mut pending: Vec<&String> = state.keys().collect();
    for _ in 0..400 {
        if pending.is_empty() {
            return Ok(());
        }
        let locks: Vec<String> = pending.iter().map(|k| l.fill_lock(k)).collect();
        let got = redis.eval(scripts::LOCKS_ACQUIRE, &locks, &[me.clone(), "5000".into()]).await?;
        let mut held = Vec::new();
        let mut waiting = Vec::new();
        for (i, key) in pending.iter().enumerate() {
            if got.get(i).and_then(int) == Some(1) {
                held.push(locks[i].clone());
                write_entry(&store, l.cache_key(key), key, state[*key].as_ref()).await?;
            } else {
                waiting.push(*key);
            }
        }
        if !held.is_empty() {
            redis.eval(scripts::LOCKS_RELEASE, &held, &[me.clone()]).await?;
        }
        pending = waiting;
        if !pending.is_empty() {
            spillway_spin::wait_ms(5).await;
        }
    }
    Err(Problem::unavailable("cache fill locks stayed busy; the batch will be retried"))
}

async fn write_entry(store: &Store, cache_key: String, key: &str, record: Option<&Record>) -> Result<(), Problem> {
    let r = match record {
        Some(r) => {
            let entry = serde_json::json!({"key": key, "value": r.value, "version": r.version, "etag": r.etag, "updated_at": r.updated_at});
            store.set(&cache_key, entry.to_string().as_bytes()).await
        }
        None => store.delete(&cache_key).await,
    };
    r.map_err(|e| Problem::unavailable(&format!("key-value store: {e:?}")))
}
