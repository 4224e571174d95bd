//! Redis through Spin's outbound Redis: one connection kept per server and
//! instance, the fixed Lua scripts called by SHA1, and flat replies read.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

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

    async fn conn(&self) -> Result<Rc<Connection>, Problem> {
        if let Some(c) = REDIS.with_borrow(|r| r.get(&self.address).cloned()) {
            return Ok(c);
        }
        let c = Rc::new(Connection::open(&self.address).await.map_err(|e| redis_failed(&self.address, &e))?);
        REDIS.with_borrow_mut(|r| r.insert(self.address.clone(), c.clone()));
        Ok(c)
    }

    /// Runs one command; a failure drops the kept connection and is a 503.
    pub async fn execute(&self, command: &str, args: Vec<RedisParameter>) -> Result<Vec<RedisResult>, Problem> {
        self.execute_or_noscript(command, args, None).await.map(|(r, _)| r).map_err(|e| e.unwrap_or_else(|| Problem::unavailable("NOSCRIPT")))
    }

    /// Like [`Redis::execute`], except that a `NOSCRIPT` refusal (Redis has
    /// forgotten a script) is `Err(None)` and keeps the connection: it is an answer,
    /// not a failure of the connection. Within `call_timeout_ms` (the connection's
    /// opening included; plus the `WAIT`'s own timeout, if any): a call that runs
    /// out of time drops the kept connection, which may yet carry its reply.
    async fn execute_or_noscript(&self, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Option<Problem>> {
        let extra = wait.map_or(0, |w| w.timeout_ms);
        match crate::deadline::guarded_for(Dependency::Redis, &redis_what(&self.address), extra, self.execute_now(command, args, wait)).await {
            Ok(r) => r,
            Err(p) => {
                self.reset();
                Err(Some(p))
            }
        }
    }

    /// The command, then (with `wait`) `WAIT` on the same connection: how many
    /// replicas hold everything it wrote, the command's writes included (0
    /// without `wait`).
    async fn execute_now(&self, command: &str, args: Vec<RedisParameter>, wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Option<Problem>> {
        let conn = self.conn().await?;
        let failed = |e: spin_sdk::redis::Error| {
            self.reset();
            Some(redis_failed(&self.address, &e))
        };
        let reply = match conn.execute(command, args).await {
            Ok(r) => r,
            // redis-rs words it `NoScript` (1.x) or `NoScriptError` (0.32, Spin's).
            Err(spin_sdk::redis::Error::Other(m)) if m.to_ascii_lowercase().contains("noscript") => return Err(None),
            Err(e) => return Err(failed(e)),
        };
        let Some(w) = wait else { return Ok((reply, 0)) };
        let args = vec![RedisParameter::Int64(i64::from(w.count)), RedisParameter::Int64(i64::try_from(w.timeout_ms).unwrap_or(i64::MAX))];
        // The command's writes are in: a WAIT that fails confirms no replica
        // (never "nothing was written").
        match conn.execute("WAIT", args).await {
            Ok(acked) => Ok((reply, acked.first().and_then(int).unwrap_or(0))),
            Err(e) => {
                let _ = failed(e);
                Ok((reply, 0))
            }
        }
    }

    /// Drops the kept connection after a failure. The next connection may reach
    /// a restarted Redis, which has forgotten settings made at run time: they
    /// are checked again (see [`crate::hazards`]).
    fn reset(&self) {
        REDIS.with_borrow_mut(|r| r.remove(&self.address));
        RESETS.with_borrow_mut(|r| *r.entry(self.address.clone()).or_default() += 1);
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
    /// (`EVALSHA`): the script text travels once per instance (`SCRIPT LOAD`), and
    /// again only if Redis has forgotten it (restart, `SCRIPT FLUSH`).
    pub async fn eval(&self, script: &'static str, keys: &[String], args: &[String]) -> Result<Vec<RedisResult>, Problem> {
        self.eval_then(script, keys, args, None).await.map(|(r, _)| r)
    }

    async fn eval_then(&self, script: &'static str, keys: &[String], args: &[String], wait: Option<Replicas>) -> Result<(Vec<RedisResult>, i64), Problem> {
        let slot = script.as_ptr() as usize;
        let mut reloaded = false;
        loop {
            let sha = match SHAS.with_borrow(|m| m.get(&slot).cloned()) {
                Some(sha) => sha,
                None => {
                    let reply = self.execute("SCRIPT", vec![bin("LOAD"), bin(script)]).await?;
                    let sha = reply.first().and_then(text).ok_or_else(|| Problem::unavailable("SCRIPT LOAD gave no SHA1"))?;
                    SHAS.with_borrow_mut(|m| m.insert(slot, sha.clone()));
                    sha
                }
            };
            let mut params = Vec::with_capacity(2 + keys.len() + args.len());
            params.push(bin(&sha));
            params.push(RedisParameter::Int64(keys.len() as i64));
            params.extend(keys.iter().map(|k| bin(k)));
            params.extend(args.iter().map(|a| bin(a)));
            match self.execute_or_noscript("EVALSHA", params, wait).await {
                Ok(r) => return Ok(r),
                Err(None) if !reloaded => {
                    SHAS.with_borrow_mut(|m| m.remove(&slot));
                    reloaded = true;
                }
                Err(None) => return Err(Problem::unavailable("Redis keeps forgetting Spillway's scripts (NOSCRIPT)")),
                Err(Some(p)) => return Err(p),
            }
        }
    }
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
