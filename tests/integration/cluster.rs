//! A real multi-node Redis Cluster (three masters, `redis-cli --cluster
//! create`), Spillway given one seed node and `redis_cluster=true`: it reads
//! the slot map itself and sends each shard's calls to the node that owns the
//! shard's slot (Spin's outbound Redis follows no redirects), follows `MOVED`
//! after a resharding and `ASK` during one.

use std::time::Duration;

use serde_json::json;
use spillway_core::cluster::key_slot;

use crate::faults::{check, finals, recovered, report_line, workload};
use crate::spillway::Spillway;
use crate::support::{Redis, layout};

/// What a cluster deployment sets: the cluster, and every node allowed (the
/// nodes are learnt from the seed).
pub(crate) const CLUSTER_VARS: [(&str, &str); 2] = [("redis_cluster", "true"), ("shard_redis_hosts", "redis://127.0.0.1:*")];

/// How many keys `node` holds in `shard`'s slot.
fn keys_in(node: &Redis, shard: u32) -> i64 {
    let slot = key_slot(layout().stream(shard).as_bytes());
    redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query(&mut node.conn()).unwrap()
}

/// Writes over keys of every shard, the app given one node of three: each
/// write is applied exactly once, read back from the cache, and the shards'
/// keys are on all three nodes (so the calls went to the right node, not only
/// to the seed).
#[tokio::test(flavor = "multi_thread")]
async fn a_three_master_cluster_from_one_seed_node_applies_every_write_once() {
    let mut nodes = Redis::start_cluster(3, 0);
    let seed = nodes.remove(0);
    let s = Spillway::builder().redis(seed).vars(&CLUSTER_VARS).with_trigger().start().await;
    let mut ids = Vec::new();
    for i in 0..160 {
        let (code, v) = s.write(json!({"key": format!("c{}", i % 40), "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        assert_eq!(s.settled(id).await["status"], "applied", "{id}");
    }
    for k in 0..40 {
        let (code, _, v) = s.call("GET", &format!("/v1/records/c{k}"), None, &[]).await;
        assert_eq!((code, &v["value"]["n"]), (200, &json!(4)), "c{k}: {v}");
    }
    // Each shard written to has its keys on the node that owns its slot, and
    // on no other; every node has some.
    let all = [&s.redis, &nodes[0], &nodes[1]];
    let owner = owners(&s.redis);
    let written: std::collections::BTreeSet<u32> = (0..40).map(|k| layout().shard_of(&format!("c{k}"))).collect();
    let mut per_node = [0; 3];
    for shard in &written {
        for (i, node) in all.iter().enumerate() {
            let here = keys_in(node, *shard);
            if owner[*shard as usize] == format!("127.0.0.1:{}", node.port) {
                assert!(here > 0, "shard {shard}'s keys are on its owner, port {}", node.port);
                per_node[i] += 1;
            } else {
                assert_eq!(here, 0, "shard {shard} has keys on port {}, which does not own it", node.port);
            }
        }
    }
    eprintln!("shards written to, by node: {per_node:?}");
    assert!(per_node.iter().all(|n| *n > 0), "every node holds shards: {per_node:?}");
}

/// Each shard's owner (`host:port`), as the cluster says.
pub(crate) fn owners(node: &Redis) -> Vec<String> {
    let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut node.conn()).unwrap();
    let map = spillway_core::cluster::SlotMap::parse_nodes(&text).unwrap();
    let l = layout();
    (0..l.shards).map(|shard| map.owner(key_slot(l.stream(shard).as_bytes())).unwrap_or("none").to_owned()).collect()
}

/// How many times the nodes ran `command` (from `INFO commandstats`, e.g.
/// `asking`, `cluster|nodes`).
fn calls(nodes: &[&Redis], command: &str) -> u64 {
    let stat = format!("cmdstat_{command}:calls=");
    nodes
        .iter()
        .map(|n| {
            let info: String = redis::cmd("INFO").arg("commandstats").query(&mut n.conn()).unwrap();
            info.lines().find_map(|l| l.strip_prefix(&stat)).and_then(|rest| rest.split(',').next()?.parse().ok()).unwrap_or(0)
        })
        .sum()
}

/// How many errors of `kind` (e.g. `MOVED`) `node` has answered (`INFO
/// errorstats`).
fn error_count(node: &Redis, kind: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("errorstats").query(&mut node.conn()).unwrap();
    let stat = format!("errorstat_{kind}:count=");
    info.lines().find_map(|l| l.strip_prefix(&stat)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// A live resharding while the load runs: 2,000 slots moved from the seed to a
/// second node and 2,000 from the third to the seed, then a fourth node added
/// and given 2,000 of the second's (`redis-cli --cluster reshard`: `ASK` while a
/// slot's keys move, `MOVED` once it has; the new node knows none of the
/// scripts). Nothing is lost, doubled or reordered, no read is stale, and
/// everything is applied within a bound once it is done.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_resharding_loses_and_doubles_nothing() {
    let mut nodes = Redis::start_cluster(3, 0);
    let seed = nodes.remove(0);
    let s = Spillway::builder().redis(seed).vars(&CLUSTER_VARS).with_trigger().start().await;
    let reshard = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = owners(&s.redis);
        let started = std::time::Instant::now();
        // Blocking (`redis-cli` runs to the end): on a thread of its own.
        let added = tokio::task::block_in_place(|| {
            s.redis.reshard(&s.redis, &nodes[0], 2000);
            s.redis.reshard(&nodes[1], &s.redis, 2000);
            let added = Redis::join_cluster_of(&s.redis);
            s.redis.reshard(&nodes[0], &added, 2000);
            added
        });
        (before, started.elapsed(), owners(&s.redis), added)
    };
    let (history, (before, took, after, added)) = futures::future::join(workload(&s, "reshard", 8, 40, Duration::from_secs(30), "", true), reshard).await;
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    let all = [&s.redis, &nodes[0], &nodes[1], &added];
    let (asked, maps) = (calls(&all, "asking"), calls(&all, "cluster|nodes"));
    let on_added: Vec<u32> = (0..layout().shards).filter(|n| after[*n as usize] == format!("127.0.0.1:{}", added.port)).collect();
    let moved: Vec<u32> = (0..layout().shards).filter(|n| before[*n as usize] != after[*n as usize]).collect();
    let written: std::collections::BTreeSet<u32> = history.ops.iter().map(|op| layout().shard_of(&op.key)).collect();
    eprintln!(
        "{} | shards moved {moved:?} ({on_added:?} to the added node; written to: {written:?}), resharding took {took:?}; ASKING {asked} times, the slot map read {maps} times (redis-cli's reads included)",
        report_line("a live resharding (3 x 2,000 slots, one node added) during the load", &report, recover)
    );
    assert!(!on_added.is_empty(), "the added node holds shards");
    // Writes to the added node's shards (scripts it never saw) are applied.
    for shard in &on_added {
        let key = (0..).map(|i| format!("added{i}")).find(|k| layout().shard_of(k) == *shard).unwrap();
        let (code, v) = s.write(json!({"key": key, "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied", "on the added node's shard {shard}");
        assert!(keys_in(&added, *shard) > 0, "shard {shard}'s keys are on the added node");
    }
    assert!(moved.iter().any(|n| written.contains(n)), "the resharding moved shards the load wrote to: {moved:?}, {written:?}");
    // Once per instance at first, and again after each MOVED; redis-cli's own
    // reads of the map count too, so the figure is only printed.
    assert!(maps > 0, "the slot map was read");
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
}

/// A slot caught mid-migration, step by step (what `redis-cli --cluster
/// reshard` does too quickly to be seen): its keys moved to the importing node
/// while the source still owns the slot. The source answers `ASK`, and the
/// app sends the call there after `ASKING`; once the slot is the new node's,
/// the source answers `MOVED`, and the app reads the map again. Writes made at
/// each step are applied exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_mid_migration_is_followed_with_asking_then_moved() {
    let mut nodes = Redis::start_cluster(3, 0);
    let seed = nodes.remove(0);
    let s = Spillway::builder().redis(seed).vars(&CLUSTER_VARS).with_trigger().start().await;
    let all = [&s.redis, &nodes[0], &nodes[1]];
    let owner = owners(&s.redis);
    // A key whose shard the seed owns, moved to the second node.
    let key = (0..).map(|i| format!("mig{i}")).find(|k| owner[layout().shard_of(k) as usize] == format!("127.0.0.1:{}", s.redis.port)).unwrap();
    let shard = layout().shard_of(&key);
    let slot = key_slot(layout().stream(shard).as_bytes());
    let (from, to) = (&s.redis, &nodes[0]);
    let write = async |n: i64| {
        let (code, v) = s.write(json!({"key": key, "op": "incr", "field": "n", "by": n})).await;
        assert_eq!(code, 202, "{v}");
        let status = s.settled(v["id"].as_str().unwrap()).await;
        assert_eq!(status["status"], "applied", "{status}");
    };
    write(1).await;
    // Mid-migration: importing on `to`, migrating on `from`, every key moved.
    let (from_id, to_id) = (from.node_id(), to.node_id());
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("IMPORTING").arg(&from_id).query(&mut to.conn()).unwrap();
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("MIGRATING").arg(&to_id).query(&mut from.conn()).unwrap();
    let keys: Vec<String> = redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(1000).query(&mut from.conn()).unwrap();
    assert!(!keys.is_empty(), "the shard has keys to move");
    let _: () = redis::cmd("MIGRATE").arg("127.0.0.1").arg(to.port).arg("").arg(0).arg(5000).arg("KEYS").arg(&keys).query(&mut from.conn()).unwrap();
    // The write is sent to `to` after ASKING; its script also touches keys
    // that do not exist yet (`TRYAGAIN` until the slot is done), as in any
    // migration: it is sent again until the slot is `to`'s (told to both, as
    // redis-cli does), a moment later.
    let asked = calls(&all, "asking");
    let finish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = calls(&all, "asking") - asked;
        let maps = calls(&all, "cluster|nodes");
        for node in [to, from] {
            let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("NODE").arg(&to_id).query(&mut node.conn()).unwrap();
        }
        (asked, maps)
    };
    let ((), (asked, maps)) = futures::future::join(write(10), finish).await;
    write(100).await;
    // From the end of the migration: the source's MOVED answers, and the map
    // read again after them.
    let moved = error_count(from, "MOVED");
    let maps = calls(&all, "cluster|nodes") - maps;
    let (_, _, v) = s.call("GET", &format!("/v1/records/{key}?consistent=true"), None, &[]).await;
    eprintln!("mid-migration: the app sent ASKING {asked} times; after the move the source answered MOVED {moved} times and the app read the slot map {maps} times");
    assert_eq!(v["value"]["n"], 111, "each write once: {v}");
    assert!(asked > 0, "the calls during the migration followed ASK");
    assert!(moved > 0 && maps > 0, "a MOVED had the map read again");
    assert!(keys_in(to, shard) > 0 && keys_in(from, shard) == 0, "the shard's keys are on the new owner only");
}

/// A master killed (SIGKILL) while the load runs, in a cluster with two
/// replicas per master (`cluster-replicas 2`, so that the promoted one still
/// has a replica to wait for; AOF on every node, a node timeout of 2 s):
/// the cluster promotes the replica itself, and no `MOVED` ever comes from the
/// dead master, so the app reads the map again through another node when the
/// owner cannot be reached. With
/// `min_replicas=1` (Redis `WAIT`) no acknowledged write is lost; everything is
/// applied once, in order, within the failover time and the lease TTL after
/// the kill.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_killed_is_failed_over_by_the_cluster_and_loses_no_acknowledged_write() {
    let nodes = Redis::start_cluster(3, 2);
    // The seed: a master that survives; the victim: the master of a shard the
    // load writes to.
    let owner = owners(&nodes[0]);
    let masters: Vec<usize> = (0..nodes.len()).filter(|i| owner.contains(&format!("127.0.0.1:{}", nodes[*i].port))).collect();
    let key_shard = layout().shard_of("failover-k0");
    let victim = masters.iter().copied().find(|i| owner[key_shard as usize] == format!("127.0.0.1:{}", nodes[*i].port)).unwrap();
    let seed_at = masters.iter().copied().find(|i| *i != victim).unwrap();
    let mut nodes: Vec<Option<Redis>> = nodes.into_iter().map(Some).collect();
    let seed = nodes[seed_at].take().unwrap();
    let victim = nodes[victim].take().unwrap();
    let vars = [CLUSTER_VARS[0], CLUSTER_VARS[1], ("min_replicas", "1"), ("replica_timeout_ms", "1000"), ("lease_ttl_ms", "3000")];
    let s = Spillway::builder().redis(seed).vars(&vars).with_trigger().start().await;
    // After the kill, a write to the victim's shard every 100 ms until one is
    // accepted: how long the shard was out.
    let probe_key = (0..).map(|i| format!("failover-probe{i}")).find(|k| layout().shard_of(k) == key_shard).unwrap();
    let killed = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        victim.kill();
        let at = std::time::Instant::now();
        loop {
            let (code, answer) = s.write(json!({"key": probe_key, "op": "incr", "field": "n", "by": 1})).await;
            if code == 202 {
                break (at, at.elapsed());
            }
            if at.elapsed() > Duration::from_secs(60) {
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut s.redis.conn()).unwrap_or_default();
                panic!("the shard never came back: {code} {answer}\n{nodes}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (history, (at, out)) = futures::future::join(workload(&s, "failover", 6, 40, Duration::from_secs(40), "", true), killed).await;
    let recover = recovered(&s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(&s, &history).await);
    let promoted = owners(&s.redis)[key_shard as usize].clone();
    eprintln!(
        "{} | the victim's shard {key_shard} now on {promoted} (was port {}), accepting writes again {out:?} after the kill; the load ended {:?} after it; refusals {:?}",
        report_line("a master SIGKILLed, its replica promoted by the cluster, min_replicas=1", &report, recover),
        victim.port,
        at.elapsed(),
        history.refused
    );
    assert_ne!(promoted, format!("127.0.0.1:{}", victim.port), "a replica took over");
    // The cluster's failover (node timeout 2 s, then an election), then the
    // map read again at the next failed call: within the lease TTL more, and
    // slack for a busy machine.
    // Before the app read the map again on a failed owner, it waited for its
    // instances to be recycled (about 30 s here).
    assert!(out < Duration::from_secs(12), "the shard accepted writes again {out:?} after the kill");
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
}

/// Several seeds (`shard_redis_addresses` naming nodes of the one cluster),
/// the first of them down: a fresh instance reads the slot map through
/// another seed, and every shard's writes are applied, also those of the
/// shards whose seed is the dead one.
#[tokio::test(flavor = "multi_thread")]
async fn a_seed_that_is_down_is_stepped_over() {
    let mut nodes = Redis::start_cluster(3, 0);
    let seed = nodes.remove(0);
    let dead = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let seeds = format!("{dead},{}", nodes[0].url());
    let mut vars = CLUSTER_VARS.to_vec();
    vars.push(("shard_redis_addresses", &seeds));
    let s = Spillway::builder().redis(seed).vars(&vars).with_trigger().start().await;
    let mut ids = Vec::new();
    for i in 0..64 {
        let (code, v) = s.write(json!({"key": format!("d{}", i % 32), "op": "incr", "field": "n"})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let shards: std::collections::BTreeSet<u32> = (0..32).map(|k| layout().shard_of(&format!("d{k}"))).collect();
    assert!(shards.iter().any(|s| s % 2 == 0), "some shards' seed is the dead one: {shards:?}");
    for id in &ids {
        assert_eq!(s.settled(id).await["status"], "applied", "{id}");
    }
    for k in 0..32 {
        let (code, _, v) = s.call("GET", &format!("/v1/records/d{k}"), None, &[]).await;
        assert_eq!((code, &v["value"]["n"]), (200, &json!(2)), "d{k}: {v}");
    }
}

/// A master of the cluster other than the seed runs without AOF: the drain's
/// and `/v1/stats`'s hazards name that node (its shards' writes are what a
/// crash would lose), and only it.
#[tokio::test(flavor = "multi_thread")]
async fn a_hazard_on_any_cluster_node_is_reported_with_its_name() {
    let mut nodes = Redis::start_cluster(3, 0);
    let seed = nodes.remove(0);
    let _: () = redis::cmd("CONFIG").arg("SET").arg("appendonly").arg("no").query(&mut nodes[1].conn()).unwrap();
    let s = Spillway::builder().redis(seed).vars(&CLUSTER_VARS).start().await;
    let (code, _, out) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(code, 200, "{out}");
    let warnings: Vec<String> = serde_json::from_value(out["warnings"].clone()).unwrap();
    assert_eq!(warnings, [format!("on cluster node 127.0.0.1:{}: Redis appendonly is off: writes accepted since the last snapshot are lost if Redis crashes; set appendonly yes", nodes[1].port)], "{warnings:?}");
    let (code, _, stats) = s.admin("GET", "/v1/stats", None).await;
    assert_eq!(code, 200, "{stats}");
    assert_eq!(stats["hazards"], json!(warnings), "{stats}");
}
