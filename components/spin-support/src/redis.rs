//! Redis through Spin's outbound Redis: one connection kept per server and
//! instance, the fixed Lua scripts called by SHA1, and flat replies read.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use spillway_core::cluster::{Redirect, SlotMap, key_slot, node_url};
use spillway_core::problem::{Dependency, Problem};
use spillway_core::settings::Settings;
use spin_sdk::redis::{Connection, RedisParameter, RedisResult};


thread_local! {
    /// How often each server's kept connection failed and was dropped (the
    /// next one may reach a restarted Redis, which has forgotten settings made
    /// at run time: see [`crate::hazards`]).
    static RESETS: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
    /// One connection per Redis server (by address), kept for the instance.
    static REDIS: RefCell<HashMap<String, Rc<Connection>>> = RefCell::new(HashMap::new());
    /// SHA1 of each script loaded into Redis, keyed by the script constant's address.
    static SHAS: RefCell<HashMap<usize, String>> = RefCell::new(HashMap::new());
    /// With `redis_cluster`: each cluster's slot map, by the seed address it
    /// was read through; read once per instance, and again after a `MOVED`.
    static MAPS: RefCell<HashMap<String, SlotMap>> = RefCell::new(HashMap::new());
    /// With `redis_cluster`: each seed's own node (as its map names it) and a
    /// hash tag whose slot it owns, by seed address (see [`crate::mirror`]);
    /// `None` for a seed that owns no slot.
    static SEEDS: RefCell<HashMap<String, Option<(String, String)>>> = RefCell::new(HashMap::new());
}

/// `MOVED` redirects a call follows before it fails (each has the slot map
/// read again: more would mean the cluster keeps changing under it).
const MAX_REDIRECTS: u32 = 5;

/// How long a call waits before it is sent again after `TRYAGAIN` (its keys'
/// slot is being migrated, some of them moved and some not yet: a script that
/// touches keys that do not exist yet is refused until the slot's migration
/// is done) ...
const TRY_AGAIN_MS: u64 = 20;

/// ... for up to this long (and within the call's deadline).
const TRY_AGAIN_FOR_MS: u64 = 5_000;

/// Why a command did not answer.
enum Failure {
    /// Redis has forgotten the script (`NOSCRIPT`): an answer, not a failure
    /// of the connection.
    NoScript,
    /// A cluster's redirect (an answer too), with the server that gave it and
    /// its words: a failure only if the call cannot follow it.
    Redirect(Redirect, String, String),
    /// No connection could be opened: the command was not sent.
    Unreachable(Problem),
    /// The server failed, or refused the command (which may have run, if the
    /// connection failed after it was sent).
    Failed(Problem),
}

impl Failure {
    fn into_option(self) -> Option<Problem> {
        match self {
            Self::NoScript => None,
            Self::Redirect(_, address, error) => Some(crate::backend::backend_failed(&redis_what(&address), &error)),
            Self::Unreachable(p) | Self::Failed(p) => Some(p),
        }
    }
}

/// A failure of a call that is no script call (`None`: `NOSCRIPT`, which
/// only a script call expects) as its problem.
fn noscript_as_problem(failure: Option<Problem>) -> Problem {
    failure.unwrap_or_else(|| Problem::unavailable("NOSCRIPT"))
}

/// Whether the loaded settings say `redis_cluster`.
fn cluster_mode() -> bool {
    crate::settings::with_loaded(|s| s.is_some_and(|s| s.redis_cluster))
}

/// With `redis_cluster`: every server the settings name (`redis_address`,
/// `shard_redis_addresses`), each a seed of the one cluster, but `except`.
fn other_seeds(except: &str) -> Vec<String> {
    crate::settings::with_loaded(|s| s.map(|s| s.redis_servers().into_iter().filter(|a| *a != except).map(str::to_owned).collect()).unwrap_or_default())
}

/// With `redis_cluster`, the hash slot a command's keys are in (its first key:
/// every call of Spillway's stays in one slot); `None` for a command without
/// keys, which any node answers.
fn slot_of(command: &str, args: &[RedisParameter]) -> Option<u16> {
    if !cluster_mode() {
        return None;
    }
    let key = match command.to_ascii_uppercase().as_str() {
        "PUBLISH" | "CONFIG" | "SCRIPT" | "INFO" | "WAIT" | "CLUSTER" | "PING" | "TIME" | "ASKING" | "DBSIZE" => return None,
        "EVALSHA" | "EVAL" => match args.get(1) {
            Some(RedisParameter::Int64(n)) if *n > 0 => args.get(2),
            _ => return None,
        },
        _ => args.first(),
    };
    match key? {
        RedisParameter::Binary(k) => Some(key_slot(k)),
        RedisParameter::Int64(i) => Some(key_slot(i.to_string().as_bytes())),
    }
}

/// How often the kept connection to `address` has failed in this instance.
pub fn resets(address: &str) -> u64 {
    RESETS.with_borrow(|r| r.get(address).copied().unwrap_or(0))
}

/// A value of a flat reply as text (status or binary).
pub fn text(v: &RedisResult) -> Option<String> {
    match v {
        RedisResult::Status(s) => Some(s.clone()),
        RedisResult::Binary(b) => String::from_utf8(b.clone()).ok(),
        RedisResult::Int64(i) => Some(i.to_string()),
        RedisResult::Nil => None,
    }
}

/// A value of a flat reply as an integer.
pub fn int(v: &RedisResult) -> Option<i64> {
    match v {
        RedisResult::Int64(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// Redis, through Spin's outbound Redis, with the connection kept for the life of
/// the instance (WASIp3 instances serve many requests) and reopened after an error.
pub struct Redis {
    address: String,
}

impl Redis {
    /// Redis at `address`.
    pub fn new(address: &str) -> Self {
        Self { address: address.to_owned() }
    }

    /// The server that holds `shard`'s keys (see `Settings::redis_for`).
    pub fn for_shard(s: &Settings, shard: u32) -> Self {
        Self::new(s.redis_for(shard))
    }

    /// Its address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Runs one command; a failure drops the kept connection and is a 503.
    /// With `redis_cluster`, it goes to the node that owns its keys' slot.
    pub async fn execute(&self, command: &str, args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, Problem> {
        let slot = slot_of(command, &args);
        self.execute_or_noscript(slot, command, args, None).await.map(|(r, _)| r).map_err(noscript_as_problem)
    }

    /// Where a call on `key` goes: the node that owns its slot with
    /// `redis_cluster` (the slot map read first if this instance has none),
    /// else this server.
    pub async fn address_for(&self, key: &str) -> String {
        if !cluster_mode() {
            return self.address.clone();
        }
        self.route(key_slot(key.as_bytes())).await
    }

    /// Runs one command at this server itself, whatever its keys: in a
    /// cluster, a `MOVED` is the caller's failure to handle.
    pub async fn execute_here(&self, command: &str, args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, Problem> {
        self.execute_or_noscript(None, command, args, None).await.map(|(r, _)| r).map_err(noscript_as_problem)
    }

    /// With `redis_cluster`: a hash tag whose keys this server (a seed) holds,
    /// if `key` is on another node; `None` if `key` is on this server, or this
    /// server owns no slot (a replica: its keys never expire of themselves).
    /// The seed's map is read once per instance, and again after [`Redis::forget_seed`].
    pub async fn tag_here_if_elsewhere(&self, key: &str) -> Result<Option<String>, Problem> {
        if !SEEDS.with_borrow(|s| s.contains_key(&self.address)) {
            self.read_map(&self.address).await?;
            let seed = MAPS.with_borrow(|m| {
                let map = m.get(&self.address)?;
                let myself = map.myself()?;
                Some((myself.to_owned(), map.tag_owned_by(myself)?))
            });
            SEEDS.with_borrow_mut(|s| s.insert(self.address.clone(), seed));
        }
        let Some((myself, tag)) = SEEDS.with_borrow(|s| s.get(&self.address).cloned().flatten()) else { return Ok(None) };
        let owner = self.route(key_slot(key.as_bytes())).await;
        Ok((owner != node_url(&self.address, &myself)).then_some(tag))
    }

    /// With `redis_cluster`: every master of the cluster this server is a
    /// seed of, as its URL (reached as this server is) and `host:port`, as
    /// far as this instance knows (the map is read first if it has none).
    pub async fn cluster_nodes(&self) -> Vec<(String, String)> {
        self.route(0).await;
        MAPS.with_borrow(|m| m.get(&self.address).map(|map| map.nodes().into_iter().map(|n| (node_url(&self.address, n), n.to_owned())).collect()).unwrap_or_default())
    }

    /// Has [`Redis::tag_here_if_elsewhere`] read the seed's map again (its
    /// tag's slot has moved away).
    pub fn forget_seed(&self) {
        SEEDS.with_borrow_mut(|s| s.remove(&self.address));
    }

    /// Like [`Redis::execute`], except that a `NOSCRIPT` refusal (Redis has
    /// forgotten a script) is `Err(None)` and keeps the connection: it is an answer,
    /// not a failure of the connection. Within `call_timeout_ms` (the connection's
    /// opening included; plus the `WAIT`'s own timeout, if any): a call that runs
    /// out of time drops the kept connection, which may yet carry its reply.
    async fn execute_or_noscript(&self, slot: Option<u16>, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Option<Problem>> {
        let extra = wait.map_or(0, |w| w.timeout_ms);
        match crate::deadline::guarded_for(Dependency::Redis, &redis_what(&self.address), extra, self.routed(slot, command, args, wait)).await {
            Ok(r) => r.map_err(Failure::into_option),
            Err(p) => {
                reset(&self.address);
                if let Some(slot) = slot {
                    reset(&self.cached_route(slot));
                    // A node that stalls (cut off, its host gone) answers
                    // nothing, not even a reset: the map is read again on
                    // the next call, in case the cluster has moved on.
                    MAPS.with_borrow_mut(|m| m.remove(&self.address));
                }
                Err(Some(p))
            }
        }
    }

    /// The command at this server, or (in a slot) at the node that owns the
    /// slot, following `MOVED` (the map is read again), `ASK` (once, on a
    /// connection of its own) and `TRYAGAIN` (sent again a little later).
    async fn routed(&self, slot: Option<u16>, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Failure> {
        let Some(slot) = slot else { return execute_at(&self.address, command, args, wait).await };
        let mut address = self.route(slot).await;
        let mut redirects = 0;
        let started = crate::monotonic_ms();
        loop {
            let failure = match execute_at(&address, command, args.clone(), wait).await {
                // Mid-migration: once, after `ASKING`, at the importing node.
                Err(Failure::Redirect(Redirect::Ask { node, .. }, ..)) => match asking(&node_url(&self.address, &node), command, args.clone(), wait).await {
                    Err(f) => f,
                    ok => return ok,
                },
                Err(f) => f,
                ok => return ok,
            };
            match failure {
                Failure::Redirect(Redirect::Moved { slot: moved, node }, ..) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    // A resharding moves many slots: the whole map, read again
                    // through the node that said so.
                    let through = node_url(&self.address, &node);
                    if let Err(p) = self.read_map(&through).await {
                        crate::log_ignored("reading the cluster's slot map after a MOVED", Err::<(), _>(p));
                    }
                    MAPS.with_borrow_mut(|m| m.entry(self.address.clone()).or_default().set_owner(moved, &node));
                    address = through;
                }
                Failure::Redirect(Redirect::TryAgain, ..) if crate::monotonic_ms().saturating_sub(started) < TRY_AGAIN_FOR_MS => {
                    crate::wait_ms(TRY_AGAIN_MS).await;
                    address = self.route(slot).await;
                }
                // The owner cannot be reached: after a failover no MOVED
                // comes (the old master is gone), so the map is read again
                // through any node that answers, and the call goes to the new
                // owner, if any. Only a call that was not sent: one whose
                // connection failed after it was sent may have run, and is
                // the caller's to settle (an idempotency key), never sent twice.
                Failure::Unreachable(p) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    match self.reread_map(&address, slot).await {
                        Some(owner) if owner != address => address = owner,
                        _ => return Err(Failure::Unreachable(p)),
                    }
                }
                other => return Err(other),
            }
        }
    }

    /// The node that owns `slot`, as far as this instance knows, else this
    /// server (the seed).
    fn cached_route(&self, slot: u16) -> String {
        MAPS.with_borrow(|m| m.get(&self.address).and_then(|map| map.owner(slot)).map(|node| node_url(&self.address, node))).unwrap_or_else(|| self.address.clone())
    }

    /// The node that owns `slot`; the slot map is read through this server
    /// first if this instance has none, else through the other seeds the
    /// settings name (one seed down does not stop a fresh instance). A map
    /// that could not be read is kept empty: calls go to this server, whose
    /// `MOVED` (or failure) has the map read again.
    async fn route(&self, slot: u16) -> String {
        if !MAPS.with_borrow(|m| m.contains_key(&self.address)) {
            let mut read = self.read_map(&self.address).await;
            for seed in other_seeds(&self.address) {
                if read.is_ok() {
                    break;
                }
                read = self.read_map(&seed).await;
            }
            if let Err(p) = read {
                MAPS.with_borrow_mut(|m| {
                    m.entry(self.address.clone()).or_default();
                });
                crate::log_ignored("reading the cluster's slot map", Err::<(), _>(p));
            }
        }
        self.cached_route(slot)
    }

    /// Reads the slot map again through the first node that answers (this
    /// server, the other seeds, then the nodes the map knows, but not
    /// `failed`): `slot`'s owner then.
    async fn reread_map(&self, failed: &str, slot: u16) -> Option<String> {
        let known: Vec<String> = MAPS.with_borrow(|m| m.get(&self.address).map(|map| map.nodes().into_iter().map(|n| node_url(&self.address, n)).collect()).unwrap_or_default());
        for through in std::iter::once(self.address.clone()).chain(other_seeds(&self.address)).chain(known).filter(|a| a != failed) {
            if self.read_map(&through).await.is_ok() {
                return Some(self.cached_route(slot));
            }
        }
        None
    }

    /// Reads the slot map (`CLUSTER NODES`) through the node at `through`.
    async fn read_map(&self, through: &str) -> Result<(), Problem> {
        let reply = execute_at(through, "CLUSTER", vec![bin("NODES")], None).await.map_err(|f| noscript_as_problem(f.into_option()))?.0;
        let text = reply.first().and_then(text).ok_or_else(|| crate::backend::backend_failed(&redis_what(through), "CLUSTER NODES gave no text"))?;
        let map = SlotMap::parse_nodes(&text).map_err(|e| crate::backend::backend_failed(&redis_what(through), &e))?;
        MAPS.with_borrow_mut(|m| m.insert(self.address.clone(), map));
        Ok(())
    }

    /// Runs a typed script call ([`spillway_core::call::Call`]).
    pub async fn call(&self, call: &spillway_core::call::Call) -> Result<Vec<RedisResult>, Problem> {
        self.eval_then(call.script, &call.keys, &call.args, None).await.map(|(r, _)| r)
    }

    /// Runs a typed script call, then waits for `replicas` (Redis `WAIT` on the
    /// same connection): the reply, and how many replicas hold the call's writes.
    pub async fn call_replicated(&self, call: &spillway_core::call::Call, replicas: Replicas) -> Result<(Vec<RedisResult>, i64), Problem> {
        self.eval_then(call.script, &call.keys, &call.args, Some(replicas)).await
    }

    /// Runs one of the fixed Lua scripts with `keys` and `args`, by its SHA1
    /// (`EVALSHA`, the SHA1 computed here): the script text travels only when
    /// Redis does not have it (`NOSCRIPT`: its first use on a server, a restart,
    /// `SCRIPT FLUSH`), as an `EVAL`, after which Redis keeps it.
    pub async fn eval(&self, script: &'static str, keys: &[String], args: &[String]) -> Result<Vec<RedisResult>, Problem> {
        self.eval_then(script, keys, args, None).await.map(|(r, _)| r)
    }

    async fn eval_then(&self, script: &'static str, keys: &[String], args: &[String], wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Problem> {
        let id = script.as_ptr() as usize;
        let slot = match keys.first() {
            Some(k) if cluster_mode() => Some(key_slot(k.as_bytes())),
            _ => None,
        };
        let sha = match SHAS.with_borrow(|m| m.get(&id).cloned()) {
            Some(sha) => sha,
            None => {
                let sha = spillway_core::scripts::sha1_hex(script);
                SHAS.with_borrow_mut(|m| m.insert(id, sha.clone()));
                sha
            }
        };
        let params = |first: &str| {
            let mut params = Vec::with_capacity(2 + keys.len() + args.len());
            params.push(bin(first));
            params.push(RedisParameter::Int64(keys.len() as i64));
            params.extend(keys.iter().map(|k| bin(k)));
            params.extend(args.iter().map(|a| bin(a)));
            params
        };
        match self.execute_or_noscript(slot, "EVALSHA", params(&sha), wait).await {
            Ok(r) => Ok(r),
            // Forgotten (a restart, `SCRIPT FLUSH`, a node new to a cluster):
            // the text itself, which that server also keeps from then on.
            Err(None) => self.execute_or_noscript(slot, "EVAL", params(script), wait).await.map_err(|e| e.unwrap_or_else(|| Problem::unavailable("NOSCRIPT after EVAL"))),
            Err(Some(p)) => Err(p),
        }
    }
}

/// The kept connection to `address`, opened if there is none.
async fn conn_to(address: &str) -> Result<Rc<Connection>, Problem> {
    if let Some(c) = REDIS.with_borrow(|r| r.get(address).cloned()) {
        return Ok(c);
    }
    let c = Rc::new(Connection::open(address).await.map_err(|e| redis_failed(address, &e))?);
    REDIS.with_borrow_mut(|r| r.insert(address.to_owned(), c.clone()));
    Ok(c)
}

/// The command on the kept connection to `address` (dropped after a failure).
async fn execute_at(address: &str, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Failure> {
    let conn = conn_to(address).await.map_err(|p| {
        reset(address);
        Failure::Unreachable(p)
    })?;
    let r = run_on(&conn, address, command, args, wait).await;
    if let Err(Failure::Failed(_)) = r {
        reset(address);
    }
    r
}

/// The command after `ASKING`, on a connection of its own to `address` (the
/// two must be consecutive on one connection, which the kept one, shared by
/// the instance's concurrent calls, cannot promise).
async fn asking(address: &str, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Failure> {
    let conn = Connection::open(address).await.map_err(|e| Failure::Unreachable(redis_failed(address, &e)))?;
    conn.execute("ASKING", vec![]).await.map_err(|e| Failure::Failed(redis_failed(address, &e)))?;
    run_on(&conn, address, command, args, wait).await
}

/// The command, then (with `wait`) `WAIT` on the same connection: how many
/// replicas hold everything it wrote, the command's writes included (0
/// without `wait`).
async fn run_on(conn: &Connection, address: &str, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Failure> {
    let reply = match conn.execute(command, args).await {
        Ok(r) => r,
        // redis-rs words it `NoScript` (1.x) or `NoScriptError` (0.32, Spin's).
        Err(spin_sdk::redis::Error::Other(m)) if m.to_ascii_lowercase().contains("noscript") => return Err(Failure::NoScript),
        Err(e) => {
            let redirect = match &e {
                spin_sdk::redis::Error::Other(m) => Redirect::parse(m),
                _ => None,
            };
            return Err(match redirect {
                Some(r) => Failure::Redirect(r, address.to_owned(), format!("{e:?}")),
                None => Failure::Failed(redis_failed(address, &e)),
            });
        }
    };
    let Some(w) = wait else { return Ok((reply, 0)) };
    let args = vec![RedisParameter::Int64(i64::from(w.count)), RedisParameter::Int64(i64::try_from(w.timeout_ms).unwrap_or(i64::MAX))];
    // The command's writes are in: a WAIT that fails confirms no replica
    // (never "nothing was written").
    match conn.execute("WAIT", args).await {
        Ok(acked) => Ok((reply, acked.first().and_then(int).unwrap_or(0))),
        Err(e) => {
            reset(address);
            let _ = redis_failed(address, &e);
            Ok((reply, 0))
        }
    }
}

/// Drops the kept connection to `address` after a failure. The next
/// connection may reach a restarted Redis, which has forgotten settings made
/// at run time: they are checked again (see [`crate::hazards`]).
fn reset(address: &str) {
    REDIS.with_borrow_mut(|r| r.remove(address));
    RESETS.with_borrow_mut(|r| *r.entry(address.to_owned()).or_default() += 1);
}

/// Replicas to wait for after a write (Redis `WAIT numreplicas timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Replicas {
    /// How many.
    pub count: u32,
    /// For how long at most, in milliseconds (not 0: `WAIT` would wait for ever).
    pub timeout_ms: u64,
}

/// A flat reply as [`spillway_core::reply::Value`]s, for the scripts' typed
/// replies.
pub fn values(reply: &[RedisResult]) -> Vec<spillway_core::reply::Value> {
    use spillway_core::reply::Value;
    reply
        .iter()
        .map(|v| match v {
            RedisResult::Nil => Value::Nil,
            RedisResult::Int64(i) => Value::Int(*i),
            RedisResult::Status(s) => Value::Text(s.clone()),
            RedisResult::Binary(b) => Value::Text(String::from_utf8_lossy(b).into_owned()),
        })
        .collect()
}

/// A script's reply of another shape than its own: a failure of the call (the
/// server, or a script not Spillway's), logged; never read as an answer.
pub fn malformed(e: spillway_core::reply::ReplyError) -> Problem {
    crate::backend::backend_failed("Redis (a script's reply)", &e.to_string())
}

/// A binary Redis argument.
pub fn bin(s: &str) -> RedisParameter {
    RedisParameter::Binary(s.as_bytes().to_vec())
}

/// A failure of the Redis server at `address` as an answer (see
/// [`backend_failed`]), naming the server by its variable.
pub(crate) fn redis_failed(address: &str, e: &spin_sdk::redis::Error) -> Problem {
    crate::backend::backend_failed(&redis_what(address), &format!("{e:?}"))
}

/// How answers name the Redis server at `address`: `Redis (<its variable>)`.
pub(crate) fn redis_what(address: &str) -> String {
    let name = crate::settings::with_loaded(|s| match s {
        Some(s) => s.redis_name(address),
        None => spillway_core::redact::server_of(address).unwrap_or_else(|| "a Redis server".to_owned()),
    });
    format!("Redis ({name})")
}
