use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::Commands as _;

use crate::processes::{Conn, manifests, spawn_args};
use crate::spillway::{ADMIN, Engine, Store, on_both_engines};
use crate::support::{Redis, fixtures, workspace};

const KEYS: usize = 100;
const WRITES: usize = 20_000;
const CLIENTS: usize = 32;

/// 20,000 concurrent increments over 100 keys, with two processor processes running
/// at once and each SIGKILLed and restarted mid-run: every key ends at exactly the
/// number of increments accepted for it. Nothing lost, nothing doubled, also while
/// write outcomes are pruned after a 1 s retention (a redelivered batch still finds
/// its outcomes: only outcomes older than everything still in the stream go).
/// On both engines: SQLite applies one transaction at a time, PostgreSQL runs
/// the two processors' transactions at once.
async fn increments_survive_processor_crashes(engine: Engine) {
    crash_run(Setup::Trigger(engine)).await;
}

/// The same on the HTTP-only deployment (`deploy/http-only/spin.toml`, on
/// PostgreSQL): no Redis trigger anywhere. The front's intake wakes its own
/// processor over service chaining; the two other processes are woken by a
/// cron-like `GET /v1/wake` every 50 ms, drain beside it, and are SIGKILLed
/// mid-drain. Drains also hand on at a 1 s budget.
#[tokio::test(flavor = "multi_thread")]
async fn increments_survive_processor_crashes_http_only() {
    crash_run(Setup::HttpOnly).await;
}

/// The same on the emulated hosted platform (`up --emulate
/// akamai-functions`: a fresh instance per request, 30 s per request, 128 MiB
/// per instance), and with no drain call anywhere: after the kills, the cron's
/// wakes alone finish the queue. No request is cut off, no instance refused
/// memory.
#[tokio::test(flavor = "multi_thread")]
async fn increments_survive_processor_crashes_on_the_hosted_platform() {
    crash_run(Setup::Hosted).await;
}

/// The same with the shards spread over two Redis servers, each a Redis Cluster
/// node (which refuses any script or command whose keys span hash slots), with
/// `redis_cluster` on: per-key order, exactly-once and the crash recovery hold
/// when each shard lives on its own server, and no call touches two slots.
#[tokio::test(flavor = "multi_thread")]
async fn increments_survive_processor_crashes_on_two_redis_cluster_nodes() {
    crash_run(Setup::TwoServers).await;
}

/// The same on a real three-master Redis Cluster, the app given one seed node:
/// each shard's calls go to the node that owns its slot.
#[tokio::test(flavor = "multi_thread")]
async fn increments_survive_processor_crashes_on_a_three_master_cluster() {
    crash_run(Setup::Cluster).await;
}

/// What a crash run runs on.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// The repository's manifest (Redis trigger) on this engine, one Redis.
    Trigger(Engine),
    /// The HTTP-only manifest on PostgreSQL.
    HttpOnly,
    /// The HTTP-only manifest on PostgreSQL, on the emulated hosted platform.
    Hosted,
    /// The repository's manifest on SQLite, the shards on two Redis Cluster
    /// nodes.
    TwoServers,
    /// The repository's manifest on SQLite, a three-master Redis Cluster.
    Cluster,
}

async fn crash_run(setup: Setup) {
    fixtures();
    let (engine, http_only) = match setup {
        Setup::Trigger(engine) => (Some(engine), false),
        Setup::HttpOnly | Setup::Hosted => (None, true),
        Setup::TwoServers | Setup::Cluster => (Some(Engine::Sqlite), false),
    };
    // A password on the single server, as in production. The first server is
    // `redis_address`.
    let nodes = match setup {
        Setup::TwoServers => vec![Redis::start_cluster_node(), Redis::start_cluster_node()],
        Setup::Cluster => Redis::start_cluster(3, 0),
        _ => vec![Redis::start_secured()],
    };
    let redis = &nodes[0];
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (front_toml, processor_toml, triggers) = match engine.filter(|_| !http_only) {
        Some(_) => {
            let (front, processor) = manifests(dir.path());
            (front, processor, true)
        }
        None => {
            let http_only = workspace().join("deploy/http-only/spin.toml");
            (http_only.clone(), http_only, false)
        }
    };
    std::fs::create_dir_all(&state).unwrap();
    let (store, db_vars) = Store::new(engine.unwrap_or(Engine::Postgres), &state);
    let mut vars = vec![("lease_ttl_ms", "1000"), ("status_retention_secs", "1")];
    if http_only {
        vars.push(("drain_budget_secs", "1"));
    }
    let servers = format!("{},{}", redis.url(), nodes.last().unwrap().url());
    match setup {
        Setup::TwoServers => vars.extend([("shard_redis_addresses", servers.as_str()), ("shard_redis_hosts", "redis://127.0.0.1:*"), ("redis_cluster", "true")]),
        Setup::Cluster => vars.extend(crate::cluster::CLUSTER_VARS),
        _ => {}
    }
    vars.extend(db_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));

    // The front serves intake and reads (and, HTTP-only, the drains its own
    // intake wakes); the two others are the processors that get killed.
    let up_args: &[&str] = if setup == Setup::Hosted { &["--emulate", "akamai-functions"] } else { &[] };
    let start = |toml: &std::path::Path, triggers: bool| spawn_args(toml, &state, &redis.url(), &vars, triggers, up_args);
    let front = start(&front_toml, false);
    let mut processors = [start(&processor_toml, triggers), start(&processor_toml, triggers)];
    // What the killed processes said (for the hosted platform's refusals).
    let mut said: Vec<String> = Vec::new();
    // HTTP-only: the cron, on whichever processes are up.
    let ports = Arc::new(std::sync::Mutex::new(processors.iter().map(|p| p.port).collect::<Vec<_>>()));
    let cron = (!triggers).then(|| {
        let ports = ports.clone();
        tokio::spawn(async move {
            loop {
                let now: Vec<u16> = ports.lock().unwrap().clone();
                for port in now {
                    wake(port).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });

    let accepted_total = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let total = accepted_total.clone();
        let port = front.port;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(port).await;
            let mut accepted: HashMap<usize, u64> = HashMap::new();
            for i in 0..WRITES / CLIENTS {
                let key = (c * 7919 + i) % KEYS;
                let body = format!(r#"{{"key":"counter-{key}","op":"incr","field":"n"}}"#);
                let (status, reply) = conn.request("POST", "/v1/writes", "", &body).await;
                assert_eq!(status, 202, "{reply}");
                *accepted.entry(key).or_default() += 1;
                total.fetch_add(1, Ordering::SeqCst);
            }
            accepted
        }));
    }

    // Kill each processor once mid-run, and bring it back.
    let mut kills = 0;
    for (n, threshold) in [WRITES / 4, WRITES / 2].into_iter().enumerate() {
        while accepted_total.load(Ordering::SeqCst) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        processors[n].kill();
        said.append(&mut processors[n].stderr.lock().unwrap());
        let applied = store.int("SELECT count(*) FROM spillway_writes").await.unwrap_or(0);
        eprintln!("SIGKILL processor {n} at {} accepted, {applied} applied", accepted_total.load(Ordering::SeqCst));
        kills += 1;
        processors[n] = start(&processor_toml, triggers);
        ports.lock().unwrap()[n] = processors[n].port;
    }
    assert_eq!(kills, 2);

    let mut expected: HashMap<usize, u64> = HashMap::new();
    for c in clients {
        for (k, n) in c.await.unwrap() {
            *expected.entry(k).or_default() += n;
        }
    }
    assert_eq!(expected.values().sum::<u64>(), WRITES as u64);

    // The safety net (cron's drain) picks up whatever a killed holder left behind,
    // once its lease has expired. Shard n is on server n % 2 with two servers,
    // on the node that owns its slot in a cluster.
    let mut conns: Vec<redis::Connection> = nodes.iter().map(Redis::conn).collect();
    let node_of: Vec<usize> = match setup {
        Setup::Cluster => {
            let owners = crate::cluster::owners(redis);
            owners.iter().map(|o| nodes.iter().position(|n| *o == format!("127.0.0.1:{}", n.port)).expect("an owner among the nodes")).collect()
        }
        _ => (0..16).map(|s| s % nodes.len()).collect(),
    };
    let mut admin = Conn::open(front.port).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    loop {
        let queued: usize = (0..16).map(|s| conns[node_of[s]].xlen::<_, usize>(crate::support::layout().stream(s as u32)).unwrap()).sum();
        if queued == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{queued} writes still queued; the last drain said {last}");
        // On the hosted platform no one calls the drain: the cron's wakes do.
        if setup == Setup::Hosted {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let (status, body) = admin.request("POST", "/v1/drain", &format!("authorization: Bearer {ADMIN}\r\n"), "").await;
        // The database may not answer in time while the machine is loaded: an
        // operator's drain is then tried again, as any 503.
        assert!(status == 200 || body.contains("problems/database-timeout"), "{status} {body}");
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead: usize = (0..16).map(|s| conns[node_of[s]].xlen::<_, usize>(crate::support::layout().dead(s as u32)).unwrap()).sum();
    let first_dead: Vec<redis::Value> = (0..16)
        .flat_map(|s| redis::cmd("XRANGE").arg(crate::support::layout().dead(s as u32)).arg("-").arg("+").arg("COUNT").arg(1).query::<Vec<redis::Value>>(&mut conns[node_of[s]]).unwrap())
        .take(1)
        .collect();
    // Each server holds its own shards' streams, and only those.
    for (i, c) in conns.iter_mut().enumerate().filter(|_| nodes.len() > 1) {
        let keys: std::collections::BTreeSet<String> = redis::cmd("KEYS").arg("spillway:{s*}:stream").query::<Vec<String>>(c).unwrap().into_iter().collect();
        let own: std::collections::BTreeSet<String> = (0..16).filter(|s| node_of[*s] == i).map(|s| crate::support::layout().stream(s as u32)).collect();
        assert!(!own.is_empty(), "server {i} holds shards");
        assert_eq!(keys, own, "server {i}");
    }
    assert_eq!(dead, 0, "nothing dead-lettered: {first_dead:?}");

    let outcomes = store.int("SELECT count(*) FROM spillway_writes WHERE status = 'applied'").await.unwrap();
    assert!(outcomes < WRITES as i64, "outcomes past their retention were pruned ({outcomes} left)");
    for (key, n) in expected {
        let value = store.text(&format!("SELECT value FROM spillway_records WHERE key = 'counter-{key}'")).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(v["n"].as_u64(), Some(n), "counter-{key}");
    }
    if let Some(cron) = cron {
        cron.abort();
    }
    // Within the hosted platform's limits: no request cut off at 30 s, no
    // instance over 128 MiB.
    for p in processors.iter().chain([&front]) {
        said.extend(p.stderr.lock().unwrap().iter().cloned());
    }
    let refused: Vec<&String> = said.iter().filter(|l| l.starts_with("Request cut off") || l.contains("refused memory")).collect();
    assert!(refused.is_empty(), "{refused:?}");
}

/// `GET /v1/wake` on `port`, as a cron sends it; a process that is down is
/// skipped.
async fn wake(port: u16) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
    let request = format!("GET /v1/wake HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_ok() {
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply).await;
    }
}

on_both_engines!(increments_survive_processor_crashes);
