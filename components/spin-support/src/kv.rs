//! The record cache's stores (`cache_store`): Spin's key-value store `default`,
//! or Redis. This module owns both APIs for the cache.
//!
//! The key-value store through `wasi:keyvalue` (`store` and `batch`) for the
//! processor's writes: Spin implements it over the same stores as
//! `spin:key-value`; spin-sdk 7 ships its WIT but no Rust API, so the bindings
//! are generated here with `wit-bindgen` from the WIT vendored in `wit/deps/`.
//! Why batch calls: Spin's default store is a SQLite file in autocommit mode,
//! where every single `set` is its own transaction and disk sync; `set-many`
//! and `delete-many` are one transaction each. (`atomics` is left out: Fermyon
//! Wasm Functions does not provide it.) Those batch calls are synchronous
//! (WASIp2): no deadline can cut one short, so only the processor's refresh
//! uses them (it checks afterwards whether it outlived its locks). Readers go
//! through [`CacheStore`] (`spin:key-value`, asynchronous, each call within
//! `call_timeout_ms`), opened once per instance.
//!
//! In Redis (`cache_store=redis`), a record's entry is a key in its shard's
//! slot, on its server, beside its fill lock (`Layout::cached`): what a hosted
//! platform's key-value store cannot give (writes limited to a few per
//! second, reads from another request that lag behind), Redis does.

use spillway_core::problem::{Dependency, Problem};
use spillway_core::settings::{self, Settings};
use spin_sdk::redis::{RedisParameter, RedisResult};

use crate::redis::{Redis, bin};

mod bindings {
    wit_bindgen::generate!({
        inline: "
            package spillway:kv;
            world kv {
                import wasi:keyvalue/store@0.2.0-draft2;
                import wasi:keyvalue/batch@0.2.0-draft2;
            }
        ",
        path: ["../../wit/deps/wasi-keyvalue-2024-10-17"],
        world: "kv",
        generate_all,
    });
}

use bindings::wasi::keyvalue::{batch, store};

/// The `default` store.
pub struct Kv(store::Bucket);

fn kv_err(e: store::Error) -> Problem {
    let detail = match e {
        store::Error::NoSuchStore => "no such store".to_owned(),
        store::Error::AccessDenied => "access denied".to_owned(),
        store::Error::Other(m) => m,
    };
    crate::backend_failed("The key-value store (default)", &detail)
}

impl Kv {
    /// Opens the store labelled `default`.
    pub fn open_default() -> Result<Self, Problem> {
        store::open("default").map(Self).map_err(kv_err)
    }

    /// Sets many values in one call (one transaction on Spin's SQLite store).
    pub fn set_many(&self, pairs: Vec<(String, Vec<u8>)>) -> Result<(), Problem> {
        if pairs.is_empty() {
            return Ok(());
        }
        batch::set_many(&self.0, &pairs).map_err(kv_err)
    }

    /// Deletes many values in one call.
    pub fn delete_many(&self, keys: Vec<String>) -> Result<(), Problem> {
        if keys.is_empty() {
            return Ok(());
        }
        batch::delete_many(&self.0, &keys).map_err(kv_err)
    }
}

/// The record cache (`cache_store`): Spin's key-value store `default`
/// through `spin:key-value` (asynchronous; opened once per instance, a reused
/// instance serving many reads, and again after a failure), or Redis through
/// outbound Redis, each record in its shard's slot and on its server. For the
/// cache's reads and fills, each call within `call_timeout_ms`; the calls
/// take record keys and name the entries themselves.
pub enum CacheStore {
    /// `cache_store=kv`.
    Kv(spin_sdk::key_value::Store),
    /// `cache_store=redis`.
    Redis,
}

thread_local! {
    static KEPT: std::cell::RefCell<Option<std::rc::Rc<CacheStore>>> = const { std::cell::RefCell::new(None) };
}

/// How answers name the store.
const WHAT: &str = "The key-value store (default)";

fn cache_err(e: spin_sdk::key_value::Error) -> Problem {
    forget();
    crate::backend_failed(WHAT, &format!("{e:?}"))
}

/// Drops the kept store after a failure or a timeout (the next use opens it again).
fn forget() {
    KEPT.with_borrow_mut(|c| *c = None);
}

/// One call to the store, within `call_timeout_ms`.
async fn timed<T>(fut: impl std::future::Future<Output = Result<T, Problem>>) -> Result<T, Problem> {
    crate::deadline::call(Dependency::KeyValue, WHAT, forget, fut).await
}

/// A Redis reply's value as bytes (`None`: nil).
fn bytes(v: &RedisResult) -> Option<Vec<u8>> {
    match v {
        RedisResult::Binary(b) => Some(b.clone()),
        RedisResult::Status(s) => Some(s.clone().into_bytes()),
        RedisResult::Int64(i) => Some(i.to_string().into_bytes()),
        RedisResult::Nil => None,
    }
}

/// `keys` (record keys) grouped as calls can take them: per server, or per
/// shard with `redis_cluster` (one hash slot); each with the keys' positions.
fn by_slot_group<'a>(s: &'a Settings, keys: &[&'a str]) -> Vec<(&'a str, Vec<usize>)> {
    let shards: Vec<u32> = keys.iter().map(|k| s.layout.shard_of(k)).collect();
    let mut distinct = shards.clone();
    distinct.sort_unstable();
    distinct.dedup();
    s.slot_groups(&distinct).into_iter().map(|(address, group)| (address, (0..keys.len()).filter(|i| group.contains(&shards[*i])).collect())).collect()
}

impl CacheStore {
    /// The instance's store.
    pub async fn kept(s: &Settings) -> Result<std::rc::Rc<Self>, Problem> {
        if s.cache_store == settings::CacheStore::Redis {
            return Ok(std::rc::Rc::new(Self::Redis));
        }
        if let Some(s) = KEPT.with_borrow(Clone::clone) {
            return Ok(s);
        }
        let s = std::rc::Rc::new(Self::Kv(timed(async { spin_sdk::key_value::Store::open_default().await.map_err(cache_err) }).await?));
        KEPT.with_borrow_mut(|c| *c = Some(s.clone()));
        Ok(s)
    }

    /// The entry of record `key`, if any.
    pub async fn get(&self, s: &Settings, key: &str) -> Result<Option<Vec<u8>>, Problem> {
        match self {
            Self::Kv(store) => timed(async { store.get(&s.layout.cache_key(key)).await.map_err(cache_err) }).await,
            Self::Redis => {
                let reply = Redis::for_shard(s, s.layout.shard_of(key)).execute("GET", vec![bin(&s.layout.cached(key))]).await?;
                Ok(reply.first().and_then(bytes))
            }
        }
    }

    /// The entries of `keys`, in their order (`None`: absent). From the
    /// key-value store, read concurrently within one call's time (its batch
    /// interface is synchronous: a synchronous host call cannot be abandoned
    /// when the store stalls); from Redis, one `MGET` per server (per shard in
    /// a cluster), concurrently.
    pub async fn get_many(&self, s: &Settings, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Problem> {
        match self {
            Self::Kv(store) => timed(async { futures::future::try_join_all(keys.iter().map(|k| async move { store.get(&s.layout.cache_key(k)).await.map_err(cache_err) })).await }).await,
            Self::Redis => {
                let names: Vec<&str> = keys.iter().map(String::as_str).collect();
                let groups = by_slot_group(s, &names);
                let replies = futures::future::try_join_all(groups.iter().map(|(address, at)| {
                    let args = at.iter().map(|i| bin(&s.layout.cached(names[*i]))).collect();
                    async move { Redis::new(address).execute("MGET", args).await }
                }))
                .await?;
                let mut out = vec![None; keys.len()];
                for ((_, at), reply) in groups.iter().zip(replies) {
                    for (i, v) in at.iter().zip(reply) {
                        out[*i] = bytes(&v);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Sets record `key`'s entry.
    pub async fn set(&self, s: &Settings, key: &str, value: &[u8]) -> Result<(), Problem> {
        match self {
            Self::Kv(store) => timed(async { store.set(&s.layout.cache_key(key), value).await.map_err(cache_err) }).await,
            Self::Redis => {
                Redis::for_shard(s, s.layout.shard_of(key)).execute("SET", vec![bin(&s.layout.cached(key)), RedisParameter::Binary(value.to_vec())]).await?;
                Ok(())
            }
        }
    }

    /// Deletes record `key`'s entry.
    pub async fn delete(&self, s: &Settings, key: &str) -> Result<(), Problem> {
        match self {
            Self::Kv(store) => timed(async { store.delete(&s.layout.cache_key(key)).await.map_err(cache_err) }).await,
            Self::Redis => {
                Redis::for_shard(s, s.layout.shard_of(key)).execute("DEL", vec![bin(&s.layout.cached(key))]).await?;
                Ok(())
            }
        }
    }
}

/// The processor's cache writes (a round's refresh): in the key-value store,
/// one `set-many` and one `delete-many` (one transaction each on Spin's SQLite
/// store; synchronous: no deadline can cut them short), or in Redis, one
/// `MSET` and one `DEL` per server (per shard in a cluster), concurrently,
/// each within its deadline.
pub enum CacheWriter {
    /// `cache_store=kv`.
    Kv(Kv),
    /// `cache_store=redis`.
    Redis,
}

impl CacheWriter {
    /// The writer `s.cache_store` names.
    pub fn open(s: &Settings) -> Result<Self, Problem> {
        Ok(match s.cache_store {
            settings::CacheStore::Kv => Self::Kv(Kv::open_default()?),
            settings::CacheStore::Redis => Self::Redis,
        })
    }

    /// Sets the entries of `sets` and deletes those of `deletes` (record keys).
    pub async fn write(&self, s: &Settings, sets: Vec<(String, Vec<u8>)>, deletes: Vec<String>) -> Result<(), Problem> {
        match self {
            Self::Kv(kv) => {
                kv.set_many(sets.into_iter().map(|(k, v)| (s.layout.cache_key(&k), v)).collect())?;
                kv.delete_many(deletes.iter().map(|k| s.layout.cache_key(k)).collect())
            }
            Self::Redis => {
                let set_keys: Vec<&str> = sets.iter().map(|(k, _)| k.as_str()).collect();
                let del_keys: Vec<&str> = deletes.iter().map(String::as_str).collect();
                // A server at its memory limit (noeviction) refuses the
                // `MSET`: the entries are deleted instead (an invalidation is
                // always safe, and frees memory), or the round would fail and
                // be redelivered for as long as Redis stays full, and the queue
                // it holds would never shrink.
                let set_calls = by_slot_group(s, &set_keys).into_iter().map(|(address, at)| {
                    let keys: Vec<String> = at.iter().map(|i| s.layout.cached(&sets[*i].0)).collect();
                    let args = at.iter().zip(&keys).flat_map(|(i, k)| [bin(k), RedisParameter::Binary(sets[*i].1.clone())]).collect();
                    async move {
                        let redis = Redis::new(address);
                        match redis.execute("MSET", args).await {
                            Err(p) if p.is_redis_full() => {
                                crate::log_ignored("refreshing the cache (Redis is full: the entries are dropped instead)", Err::<(), _>(p));
                                redis.execute("DEL", keys.iter().map(|k| bin(k)).collect()).await
                            }
                            done => done,
                        }
                    }
                });
                let del_calls = by_slot_group(s, &del_keys).into_iter().map(|(address, at)| {
                    let args = at.iter().map(|i| bin(&s.layout.cached(del_keys[*i]))).collect();
                    async move { Redis::new(address).execute("DEL", args).await }
                });
                let (set, del) = futures::future::join(futures::future::try_join_all(set_calls), futures::future::try_join_all(del_calls)).await;
                set.and(del).map(|_| ())
            }
        }
    }

    /// Deletes the entries of `keys` (record keys): an invalidation.
    pub async fn invalidate(&self, s: &Settings, keys: Vec<String>) -> Result<(), Problem> {
        self.write(s, Vec::new(), keys).await
    }
}
