//! Several Spillway nodes: three host processes (`up`, each with its own port,
//! state and `node_name`) sharing a three-master Redis Cluster, one
//! PostgreSQL and a cache on Redis, as SpinKube replicas do. The shards'
//! leases spread over the nodes, and a node SIGKILLed is taken over by the
//! others; `/v1/stats` shows both.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::CLUSTER_VARS;
use crate::processes::{Conn, cache_on_redis, manifests, spawn_with};
use crate::spillway::{ADMIN, Engine, Store};
use crate::support::{Redis, fixtures};

const NAMES: [&str; 3] = ["node-a", "node-b", "node-c"];
const KEYS: usize = 200;
const LEASE_TTL: Duration = Duration::from_millis(2000);

/// `/v1/stats` through `port`.
async fn stats(port: u16) -> Value {
    let mut c = Conn::open(port).await;
    let (status, body) = c.request("GET", "/v1/stats", &format!("authorization: Bearer {ADMIN}\r\n"), "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Each shard's lease holder's node (`None`: unheld) and queue depth.
fn holders(stats: &Value) -> Vec<(Option<String>, u64)> {
    stats["shards"].as_array().unwrap().iter().map(|sh| (sh["lease"]["node"].as_str().map(str::to_owned), sh["depth"].as_u64().unwrap())).collect()
}

/// Leases held, by node.
fn spread(stats: &Value) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (node, _) in holders(stats) {
        if let Some(node) = node {
            *out.entry(node).or_default() += 1;
        }
    }
    out
}

/// Three nodes drain one queue while clients write through two of them:
/// every node holds some shards' leases at once (`/v1/stats`, which also
/// lists the three nodes), the third node is SIGKILLed while it holds leases
/// of shards with work, and every such shard is held by another node (or
/// emptied) within the lease TTL + 2 s. Every accepted increment is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_spread_the_leases_and_take_over_a_killed_one() {
    fixtures();
    let cluster = Redis::start_cluster(3, 0);
    let seed = &cluster[0];
    let cache = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, full) = manifests(dir.path());
    let (store, db_vars) = Store::new(Engine::Postgres, dir.path());
    let rc = cache_on_redis(dir.path(), &cache.url());
    let rc = rc.to_str().unwrap();
    let ttl = LEASE_TTL.as_millis().to_string();
    let mut vars: Vec<(&str, &str)> = vec![("lease_ttl_ms", &ttl), ("batch_size", "50")];
    vars.extend(CLUSTER_VARS);
    vars.extend(db_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut nodes: Vec<_> = NAMES
        .iter()
        .map(|name| {
            let state = dir.path().join(name);
            std::fs::create_dir_all(&state).unwrap();
            let mut vars = vars.clone();
            vars.push(("node_name", name));
            spawn_with(None, &full, &state, &seed.url(), &vars, &["--runtime-config-file", rc])
        })
        .collect();
    let (a, b) = (nodes[0].port, nodes[1].port);

    // Clients write through nodes a and b until told to stop: the queue has
    // work throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let stop = stop.clone();
        let port = if c % 2 == 0 { a } else { b };
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(port).await;
            let mut accepted: HashMap<usize, u64> = HashMap::new();
            let mut i = c * 7919;
            while !stop.load(Ordering::SeqCst) {
                let keys: Vec<usize> = (0..50).map(|j| (i + j * 13) % KEYS).collect();
                i += 50;
                let writes: Vec<Value> = keys.iter().map(|k| serde_json::json!({"key": format!("n{k}"), "op": "incr", "field": "n"})).collect();
                let (status, reply) = conn.request("POST", "/v1/writes", "", &serde_json::json!({ "writes": writes }).to_string()).await;
                match status {
                    202 => keys.iter().for_each(|k| *accepted.entry(*k).or_default() += 1),
                    // Backpressure: nothing enqueued; the client slows down.
                    429 => tokio::time::sleep(Duration::from_millis(50)).await,
                    _ => panic!("{status} {reply}"),
                }
            }
            accepted
        }));
    }

    // The leases spread: every node holds some at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let s = stats(a).await;
        let by_node = spread(&s);
        if NAMES.iter().all(|n| by_node.get(*n).is_some_and(|held| *held > 0)) {
            break s;
        }
        assert!(Instant::now() < deadline, "the leases never spread over the three nodes: {by_node:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let listed: Vec<&str> = before["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    eprintln!("leases by node: {:?}; nodes listed: {}", spread(&before), before["nodes"]);
    for name in NAMES {
        assert!(listed.contains(&name), "{name} listed among {listed:?}");
    }

    // Kill node c while it holds shards with work.
    let deadline = Instant::now() + Duration::from_secs(30);
    let orphaned: Vec<usize> = loop {
        let held: Vec<usize> = holders(&stats(a).await).iter().enumerate().filter(|(_, (node, depth))| node.as_deref() == Some(NAMES[2]) && *depth > 0).map(|(shard, _)| shard).collect();
        if !held.is_empty() {
            nodes[2].kill();
            break held;
        }
        assert!(Instant::now() < deadline, "node c never held a shard with work");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let killed = Instant::now();
    // Taken over: each shard it held is held by another node, or emptied.
    let mut left = orphaned.clone();
    let mut after = Value::Null;
    while !left.is_empty() {
        assert!(killed.elapsed() < Duration::from_secs(30), "shards {left:?} of the killed node never taken over");
        after = stats(a).await;
        let now = holders(&after);
        left.retain(|shard| match &now[*shard] {
            (Some(node), _) => node == NAMES[2],
            (None, depth) => *depth > 0,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = killed.elapsed();
    eprintln!("node c SIGKILLed holding shards {orphaned:?} with work; all taken over after {took:?} (lease TTL {LEASE_TTL:?}); leases by node then: {:?}", spread(&after));
    assert!(took <= LEASE_TTL + Duration::from_secs(2), "taken over after {took:?}");
    assert!(spread(&after).keys().all(|n| n != NAMES[2]), "the killed node holds nothing: {:?}", spread(&after));

    // Everything exact.
    stop.store(true, Ordering::SeqCst);
    let mut expected: HashMap<usize, u64> = HashMap::new();
    for c in clients {
        for (k, n) in c.await.unwrap() {
            *expected.entry(k).or_default() += n;
        }
    }
    let total: u64 = expected.values().sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let applied = store.int("SELECT count(*) FROM spillway_writes WHERE status = 'applied'").await.unwrap_or(0) as u64;
        assert!(applied <= total, "{applied} applied for {total} accepted");
        if applied == total {
            break;
        }
        assert!(Instant::now() < deadline, "{applied} of {total} applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (key, n) in expected {
        let value = store.text(&format!("SELECT value FROM spillway_records WHERE key = 'n{key}'")).await.unwrap();
        let v: Value = serde_json::from_str(&value).unwrap();
        assert_eq!(v["n"].as_u64(), Some(n), "n{key}");
    }
    eprintln!("{total} writes accepted through two nodes, each applied once");
}
