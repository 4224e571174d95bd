//! The Redis settings Spillway depends on (see `spillway_core::hazards`): read once
//! per instance and server, expiry events turned on where Redis allows, the rest
//! reported.

use std::cell::RefCell;
use std::collections::HashMap;

use spillway_core::hazards;

use crate::{Redis, bin};

thread_local! {
    /// Per server: the warnings found, and how often its connection had failed
    /// then (a failure since means Redis may have restarted: check again).
    static CHECKED: RefCell<HashMap<String, (u64, Vec<String>)>> = RefCell::new(HashMap::new());
}

/// The warnings of the last check of `address`, if it still holds.
fn current(address: &str) -> Option<Vec<String>> {
    let resets = crate::redis::resets(address);
    CHECKED.with_borrow(|c| c.get(address).filter(|(at, _)| *at == resets).map(|(_, w)| w.clone()))
}

/// The hazards found (empty when Redis is set up as Spillway needs), checked on the
/// first call in this instance, and again after the connection failed (Redis
/// may have restarted); turns expiry events on when they are off.
pub async fn check(redis: &Redis) -> Vec<String> {
    if let Some(w) = current(redis.address()) {
        return w;
    }
    let warnings = inspect(redis).await;
    let resets = crate::redis::resets(redis.address());
    CHECKED.with_borrow_mut(|c| c.insert(redis.address().to_owned(), (resets, warnings.clone())));
    warnings
}

/// Runs [`check`] when it is due, for a caller that only needs its effect
/// (expiry events turned on): otherwise it costs nothing, not even a copy of
/// the warnings (intake's hot path).
pub async fn ensure(redis: &Redis) {
    let resets = crate::redis::resets(redis.address());
    if CHECKED.with_borrow(|c| c.get(redis.address()).is_none_or(|(at, _)| *at != resets)) {
        check(redis).await;
    }
}

/// [`check_and_log`] on every server the shards are on (with
/// `redis_cluster`, every master of the cluster); the warnings of all, each
/// once, a cluster node's naming it.
pub async fn check_all(s: &spillway_core::settings::Settings) -> Vec<String> {
    on_servers(s, true).await
}

/// [`check`] on the same servers as [`check_all`], without logging.
pub async fn check_servers(s: &spillway_core::settings::Settings) -> Vec<String> {
    on_servers(s, false).await
}

async fn on_servers(s: &spillway_core::settings::Settings, log: bool) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for (address, node) in servers(s).await {
        let redis = Redis::new(&address);
        let found = if log { check_and_log(s, &redis).await } else { check(&redis).await };
        for w in found {
            let w = labelled(node.as_deref(), w);
            if !all.contains(&w) {
                all.push(w);
            }
        }
    }
    all
}

/// The servers whose settings matter: those the settings name, and with
/// `redis_cluster` every other master of the cluster (with its `host:port`:
/// the warnings name it). A node's settings hold only for its own keys: one
/// master without AOF loses its shards' writes in a crash.
async fn servers(s: &spillway_core::settings::Settings) -> Vec<(String, Option<String>)> {
    let named: Vec<String> = s.redis_servers().into_iter().map(str::to_owned).collect();
    let mut out: Vec<(String, Option<String>)> = named.iter().map(|a| (a.clone(), None)).collect();
    if s.redis_cluster {
        for (url, node) in Redis::new(&s.redis_address).cluster_nodes().await {
            if !named.contains(&url) {
                out.push((url, Some(node)));
            }
        }
    }
    out
}

fn labelled(node: Option<&str>, warning: String) -> String {
    match node {
        Some(node) => format!("on cluster node {node}: {warning}"),
        None => warning,
    }
}

/// Like [`check`], and logs each hazard on stderr (where Spin collects component
/// logs) at most once an hour across all instances.
pub async fn check_and_log(s: &spillway_core::settings::Settings, redis: &Redis) -> Vec<String> {
    let warnings = check(redis).await;
    // In the slot of a shard of this server (a cluster node owns it).
    let tag = s.first_shard_on(redis.address());
    for w in &warnings {
        let key = format!("{}{{s{tag}}}:hazard:{}", s.layout.prefix, spillway_core::layout::md5_hex(w.as_bytes()));
        let fresh = redis
            .execute("SET", vec![bin(&key), bin("1"), bin("NX"), bin("EX"), bin("3600")])
            .await
            .is_ok_and(|r| !matches!(r.first(), None | Some(spin_sdk::redis::RedisResult::Nil)));
        if fresh {
            eprintln!("spillway: warning: {w}");
        }
    }
    warnings
}

async fn inspect(redis: &Redis) -> Vec<String> {
    let names = ["notify-keyspace-events", "maxmemory-policy", "appendonly"];
    let mut args = vec![bin("GET")];
    args.extend(names.iter().map(|n| bin(n)));
    let reply = match redis.execute("CONFIG", args).await {
        Ok(r) => r,
        Err(p) => return vec![hazards::config_unreadable(&p.detail)],
    };
    let values = match spillway_core::reply::config(&crate::redis::values(&reply)) {
        Ok(v) => v,
        Err(e) => return vec![hazards::config_unreadable(&crate::redis::malformed(e).detail)],
    };
    let get = |name: &str| values.get(name).cloned().unwrap_or_default();
    let mut warnings = Vec::new();
    if let Some(flags) = hazards::with_expiry_events(&get(names[0]))
        && let Err(p) = redis.execute("CONFIG", vec![bin("SET"), bin(names[0]), bin(&flags)]).await
    {
        warnings.push(hazards::expiry_events_refused(&p.detail));
    }
    warnings.extend(hazards::assess(&get(names[1]), &get(names[2])));
    warnings
}
