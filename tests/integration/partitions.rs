//! Network partitions (the fault suite, continued): a processor process in a
//! network namespace of its own reaches Redis, the cache (on Redis) and
//! PostgreSQL across a veth pair, and nftables rules cut it off while it holds
//! leases, for longer than the lease TTL, while another processor (the tests'
//! in-process host, started at the cut, so that the leases held then are the
//! cut-off one's) runs: from Redis both ways and one way (its requests carried
//! out, their answers lost), and from the database mid-round with its
//! deadlines off, so that it tries to commit late. Each scenario records a
//! history and checks it as the fault suite does.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::faults::{all_applied, check, finals, recovered, report_line, workload};
use crate::netns::{Cut, Netns, Relay};
use crate::pg::PgDb;
use crate::processes::Host;
use crate::spillway::Spillway;
use crate::support::{eventually, layout};

/// The lease TTL of these scenarios.
const LEASE_TTL: Duration = Duration::from_secs(3);

/// The cut-off processor's cut lasts this long: longer than the lease TTL.
const CUT_FOR: Duration = Duration::from_secs(5);

/// A take-over is allowed the lease TTL and this much more (the bound).
const TAKEOVER_SLACK: Duration = Duration::from_secs(2);

/// Spillway's front (intake, reads, the cache on Redis) in process, with no
/// processor of its own until [`Spillway::start_trigger`]; processor `a` in
/// the namespace `ns`, whose Redis and database are relayed across the veth.
struct Split {
    s: Spillway,
    ns: Netns,
    a: Host,
    redis_relay: Relay,
    pg_relay: Relay,
    _state: tempfile::TempDir,
}

/// `url` with its loopback server `127.0.0.1:<port>` replaced by the relay's
/// address on the veth.
fn relayed(url: &str, port: u16, ns: &Netns, relay: &Relay) -> String {
    let from = format!("127.0.0.1:{port}");
    assert!(url.contains(&from), "{url} names {from}");
    url.replace(&from, &format!("{}:{}", ns.host_ip, relay.port))
}

async fn split(a_vars: &[(&str, &str)]) -> Split {
    let ttl = LEASE_TTL.as_millis().to_string();
    let db = PgDb::create_secured();
    let s = Spillway::builder().pg(db.clone()).kv_on_redis().vars(&[("lease_ttl_ms", &ttl)]).start().await;
    let ns = Netns::create();
    let redis_port = s.redis.port;
    let pg_port: u16 = db.host.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the database's port");
    let (redis_relay, pg_relay) = (Relay::to(&ns, redis_port).await, Relay::to(&ns, pg_port).await);
    let state = tempfile::tempdir().unwrap();
    let (_, full) = crate::processes::manifests(state.path());
    let redis_url = relayed(&s.redis.url(), redis_port, &ns, &redis_relay);
    // The cache on the same Redis as the front's, across the veth.
    let rc = crate::processes::cache_on_redis(state.path(), &redis_url);
    let (db_url, db_host) = (relayed(&db.url, pg_port, &ns, &pg_relay), relayed(&db.host, pg_port, &ns, &pg_relay));
    let mut vars = vec![("database", db_url.as_str()), ("database_host", db_host.as_str()), ("lease_ttl_ms", ttl.as_str())];
    vars.extend_from_slice(a_vars);
    let a = crate::processes::spawn_with(Some(&ns), &full, state.path(), &redis_url, &vars, &["--runtime-config-file", rc.to_str().unwrap()]);
    Split { s, ns, a, redis_relay, pg_relay, _state: state }
}

/// The shards whose lease is held right now.
fn held(s: &Spillway) -> Vec<u32> {
    let l = layout();
    let mut c = s.redis.conn();
    (0..l.shards).filter(|n| redis::cmd("EXISTS").arg(l.lease(*n)).query::<i64>(&mut c).unwrap() == 1).collect()
}

/// A key of `shard`.
fn key_of(shard: u32, tag: &str) -> String {
    (0..).map(|i| format!("{tag}-{i}")).find(|k| layout().shard_of(k) == shard).unwrap()
}

/// Writes one increment into each of `shards` and waits until all are applied:
/// how long after `since` that was, or `None` past `bound` (from `since`).
async fn applied_in(s: &Spillway, shards: &[u32], tag: &str, since: Instant, bound: Duration) -> Option<Duration> {
    let mut ids = Vec::new();
    for shard in shards {
        let (code, v) = s.write(json!({"key": key_of(*shard, tag), "op": "incr", "field": "n", "by": 1})).await;
        assert_eq!(code, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    all_applied(s, ids.iter().map(String::as_str), since, bound).await
}

fn log_lines(a: &Host, event: &str) -> usize {
    let needle = format!("\"event\":\"{event}\"");
    a.stderr.lock().unwrap().iter().filter(|l| l.contains(&needle)).count()
}

/// What the processor is cut off from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Redis (the queue, the leases, and the cache on it).
    Redis,
    /// PostgreSQL.
    Database,
}

/// Processor `a` cut off from `from`, `how`, while it holds leases (the load
/// keeps it in its rounds), for [`CUT_FOR`]: the other processor, started at
/// the cut, takes its shards over within the lease TTL + 2 s (a write to each
/// is applied), and the history of the whole run is clean. Returns `a`'s log
/// and the split, for what a scenario checks besides.
async fn cut_off(from: Server, how: Cut, a_vars: &[(&str, &str)]) -> Split {
    let p = split(a_vars).await;
    let s = &p.s;
    let port = match from {
        Server::Redis => p.redis_relay.port,
        Server::Database => p.pg_relay.port,
    };
    let faults = async {
        // Only `a` processes until the cut: a lease held then is its. Cut
        // while it holds one (it may let go between the look and the cut:
        // then heal and look again).
        let (shards, cut) = loop {
            eventually("processor a holds a lease", Duration::from_secs(20), async || !held(s).is_empty()).await;
            p.ns.cut(port, how);
            let cut = Instant::now();
            let shards = held(s);
            if !shards.is_empty() {
                break (shards, cut);
            }
            p.ns.heal();
        };
        s.start_trigger().await;
        let takeover = applied_in(s, &shards, "takeover", cut, LEASE_TTL + TAKEOVER_SLACK).await;
        tokio::time::sleep(CUT_FOR.saturating_sub(cut.elapsed())).await;
        p.ns.heal();
        (shards, takeover)
    };
    // Half the clients wait for each write's outcome and read it back, half
    // only send (they keep the processor in its rounds).
    let (waiting, sending) = (format!("cut-{from:?}-{how:?}-w"), format!("cut-{from:?}-{how:?}-s"));
    let clients = futures::future::join(workload(s, &waiting, 3, 40, Duration::from_secs(30), "", true), workload(s, &sending, 3, 120, Duration::from_secs(30), "", false));
    let ((mut history, sent), (shards, takeover)) = futures::future::join(clients, faults).await;
    history.merge(sent);
    let recover = recovered(s, &history, Duration::from_secs(30)).await;
    let report = check(&history, &finals(s, &history).await);
    eprintln!(
        "{} | shards held at the cut {shards:?}, a write to each applied {takeover:?} after the cut | processor a: batches fenced off {}, failed {}",
        report_line(&format!("processor cut off from {from:?} ({how:?}) for {CUT_FOR:?}, lease TTL {LEASE_TTL:?}"), &report, recover),
        log_lines(&p.a, "batch_fenced"),
        log_lines(&p.a, "batch_failed"),
    );
    assert!(takeover.is_some(), "the other processor took {shards:?} over within the lease TTL + {TAKEOVER_SLACK:?}: {report:?}");
    assert!(report.clean() && recover.is_some(), "{report:?}, recovered: {recover:?}");
    p
}

/// Once healed, writes to every shard are applied with the in-process
/// processor's trigger stopped; with `by_a`, processor `a` applies some of
/// them itself.
async fn works_again(p: &Split, by_a: bool) {
    p.s.stop_trigger();
    let before = log_lines(&p.a, "batch");
    let again = applied_in(&p.s, &(0..layout().shards).collect::<Vec<_>>(), "healed", Instant::now(), Duration::from_secs(30)).await;
    assert!(again.is_some(), "writes are applied again after the cut heals: {}", p.a.stderr.lock().unwrap().join("\n"));
    assert!(!by_a || log_lines(&p.a, "batch") > before, "processor a applied batches once healed");
}

/// Cut off from Redis both ways: nothing crosses.
#[tokio::test(flavor = "multi_thread")]
async fn a_processor_cut_off_from_redis_both_ways_is_taken_over_within_the_lease_ttl() {
    // Whether `a` itself resumes is not asserted: after a cut from Redis its
    // trigger's subscription may be gone (a host whose trigger loses Redis
    // exits, for its supervisor to restart it).
    works_again(&cut_off(Server::Redis, Cut::BothWays, &[]).await, false).await;
}

/// Cut off from Redis one way: its commands reach Redis and are carried out
/// (renewals, acknowledgements, releases), their answers never reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_processor_whose_redis_answers_are_lost_is_taken_over_within_the_lease_ttl() {
    works_again(&cut_off(Server::Redis, Cut::RepliesLost, &[]).await, false).await;
}

/// Cut off from the database mid-round, its deadlines off
/// (`call_timeout_ms=0`): it waits on the database for as long as the cut
/// lasts, past its leases, and then tries to finish its rounds. The other
/// processor takes its shards over within the lease TTL + 2 s (before the fix,
/// it waited for the whole cut on the fence row the cut-off processor's open
/// transaction held: the server ends such a transaction after a lease TTL now);
/// the late rounds are refused (fenced off, or their transaction gone), and
/// nothing is lost, doubled or reordered.
#[tokio::test(flavor = "multi_thread")]
async fn a_processor_cut_off_from_the_database_mid_round_is_taken_over_and_its_late_commit_refused() {
    let p = cut_off(Server::Database, Cut::BothWays, &[("call_timeout_ms", "0"), ("request_timeout_ms", "0")]).await;
    eventually("processor a's late round is refused", Duration::from_secs(30), async || log_lines(&p.a, "batch_fenced") + log_lines(&p.a, "batch_failed") > 0).await;
    eprintln!("processor a's late rounds, once healed: fenced off {}, failed {}", log_lines(&p.a, "batch_fenced"), log_lines(&p.a, "batch_failed"));
    works_again(&p, true).await;
}
