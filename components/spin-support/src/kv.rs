//! The key-value store `default` through `wasi:keyvalue` (`store` and `batch`), the
//! one place that owns that API. Spin implements it over the same stores as
//! `spin:key-value`; spin-sdk 7 ships its WIT but no Rust API, so the bindings are
//! generated here with `wit-bindgen` from the WIT vendored in `wit/deps/`.
//!
//! Why batch calls: Spin's default store is a SQLite file in autocommit mode, where
//! every single `set` is its own transaction and disk sync; `set-many` and
//! `delete-many` are one transaction each. (`atomics` is left out: Fermyon Wasm
//! Functions does not provide it.)
//!
//! Those batch calls are synchronous (WASIp2): no deadline can cut one short,
//! so only the processor's refresh uses them (it checks afterwards whether it
//! outlived its locks). Readers go through [`CacheStore`] (`spin:key-value`,
//! asynchronous, each call within `call_timeout_ms`), opened once per instance.

use spillway_core::problem::{Dependency, Problem};

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

/// The `default` store through `spin:key-value` (asynchronous), for the cache's
/// single reads and writes: opened once per instance (a reused instance serves
/// many reads) and opened again after a failure.
pub struct CacheStore(spin_sdk::key_value::Store);

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

impl CacheStore {
    /// The instance's store.
    pub async fn kept() -> Result<std::rc::Rc<Self>, Problem> {
        if let Some(s) = KEPT.with_borrow(Clone::clone) {
            return Ok(s);
        }
        let s = std::rc::Rc::new(Self(timed(async { spin_sdk::key_value::Store::open_default().await.map_err(cache_err) }).await?));
        KEPT.with_borrow_mut(|c| *c = Some(s.clone()));
        Ok(s)
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Problem> {
        timed(async { self.0.get(key).await.map_err(cache_err) }).await
    }

    /// The values at `keys`, in their order (`None`: absent), read
    /// concurrently within one call's time: the batch interface
    /// (`wasi:keyvalue/batch`) is synchronous, and a synchronous host call
    /// cannot be abandoned when the store stalls.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Problem> {
        timed(async { futures::future::try_join_all(keys.iter().map(|k| async move { self.0.get(k).await.map_err(cache_err) })).await }).await
    }

    /// Sets `key`.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), Problem> {
        timed(async { self.0.set(key, value).await.map_err(cache_err) }).await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), Problem> {
        timed(async { self.0.delete(key).await.map_err(cache_err) }).await
    }
}
