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
//! Single reads and writes of the cache go through [`CacheStore`]
//! (`spin:key-value`, asynchronous), opened once per instance.

use spillway_core::problem::Problem;

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

    /// Gets many values in one call, in the order of `keys` (`None`: absent).
    /// Spin's Redis-backed store fails `get-many` (it lists keys with `KEYS`); the
    /// values are then read one by one.
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Problem> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        match batch::get_many(&self.0, keys) {
            Ok(pairs) => {
                let mut found: std::collections::HashMap<String, Option<Vec<u8>>> = pairs.into_iter().collect();
                Ok(keys.iter().map(|k| found.remove(k).flatten()).collect())
            }
            Err(_) => keys.iter().map(|k| self.0.get(k).map_err(kv_err)).collect(),
        }
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

fn cache_err(e: spin_sdk::key_value::Error) -> Problem {
    KEPT.with_borrow_mut(|c| *c = None);
    crate::backend_failed("The key-value store (default)", &format!("{e:?}"))
}

impl CacheStore {
    /// The instance's store.
    pub async fn kept() -> Result<std::rc::Rc<Self>, Problem> {
        if let Some(s) = KEPT.with_borrow(Clone::clone) {
            return Ok(s);
        }
        let s = std::rc::Rc::new(Self(spin_sdk::key_value::Store::open_default().await.map_err(cache_err)?));
        KEPT.with_borrow_mut(|c| *c = Some(s.clone()));
        Ok(s)
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Problem> {
        self.0.get(key).await.map_err(cache_err)
    }

    /// Sets `key`.
    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), Problem> {
        self.0.set(key, value).await.map_err(cache_err)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), Problem> {
        self.0.delete(key).await.map_err(cache_err)
    }
}
