//! `spin:key-value/key-value@3.0.0` and `wasi:keyvalue` (`store`, `batch`) over
//! Spin's two backends: its SQLite file (same table and queries as Spin, so a
//! `.spin/sqlite_key_value.db` is interchangeable; a single `set` commits on its own,
//! `set-many` is one transaction) and Redis (keys stored as given).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use redis::AsyncCommands as _;
use wasmtime::component::{Accessor, FutureReader, Resource, StreamReader};

use super::spin::key_value::key_value::{Error, Host, HostStore, HostStoreWithStore};
use super::{Spin, SpinView};
use crate::runtime_config::KeyValueConfig;

/// Keys and their values, as `get-many` answers.
type Pairs = Vec<(String, Option<Vec<u8>>)>;

/// An open store: the resource behind `store`.
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Store {
    label: String,
    backend: Arc<KvBackend>,
    /// The instance that opened it (the request, on the hosted platform).
    who: u64,
}

/// Where a label's data lives.
pub(crate) enum KvBackend {
    /// Spin's SQLite store (`None` path: in memory), opened on first use.
    Sqlite {
        path: Option<PathBuf>,
        conn: Mutex<Option<rusqlite::Connection>>,
    },
    /// A Redis server.
    Redis {
        client: redis::Client,
        conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    },
    /// The emulated hosted platform's store (see [`super::hosted_kv`]).
    Hosted(super::hosted_kv::HostedKv),
}

/// Backend errors reach the guest as `other` with the error's debug text, as in Spin.
fn other(e: impl std::fmt::Debug) -> Error {
    Error::Other(format!("{e:?}"))
}

impl KvBackend {
    /// The backend for one configured store.
    pub(crate) fn new(cfg: &KeyValueConfig) -> anyhow::Result<Self> {
        Ok(match cfg {
            KeyValueConfig::Spin(path) => Self::Sqlite {
                path: path.clone(),
                conn: Mutex::new(None),
            },
            KeyValueConfig::Redis(url) => Self::Redis {
                client: redis::Client::open(url.as_str())
                    .with_context(|| format!("invalid Redis url {:?} for a key-value store", crate::outbound::destination(url, "redis")))?,
                conn: tokio::sync::Mutex::new(None),
            },
        })
    }

    fn with_sqlite<R>(
        path: &Option<PathBuf>,
        conn: &Mutex<Option<rusqlite::Connection>>,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>,
    ) -> Result<R, Error> {
        let mut guard = conn.lock().map_err(|_| other("poisoned"))?;
        if guard.is_none() {
            let c = match path {
                Some(p) => {
                    if let Some(dir) = p.parent() {
                        std::fs::create_dir_all(dir).map_err(other)?;
                    }
                    rusqlite::Connection::open(p)
                }
                None => rusqlite::Connection::open_in_memory(),
            }
            .map_err(other)?;
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS spin_key_value (
                    store TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                    PRIMARY KEY (store, key))",
            )
            .map_err(other)?;
            *guard = Some(c);
        }
        f(guard.as_ref().expect("opened above")).map_err(other)
    }

    async fn redis(&self) -> Result<redis::aio::MultiplexedConnection, Error> {
        let Self::Redis { client, conn } = self else {
            unreachable!("only called on Redis stores")
        };
        let mut guard = conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = client
            .get_multiplexed_async_connection_with_config(&super::redis::connection_config())
            .await
            .map_err(other)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// What Spin does when a store is opened: its Redis store connects then (and
    /// keeps the connection), so an unreachable Redis fails the `open`, not a later
    /// call. The SQLite store opens its file on first use.
    async fn after_open(&self) -> Result<(), Error> {
        match self {
            Self::Sqlite { .. } | Self::Hosted(_) => Ok(()),
            Self::Redis { .. } => self.redis().await.map(drop),
        }
    }

    /// Forget a failed Redis connection so the next call reconnects.
    async fn reset(&self) {
        if let Self::Redis { conn, .. } = self {
            *conn.lock().await = None;
        }
    }

    async fn get(self: Arc<Self>, who: u64, store: String, key: String) -> Result<Option<Vec<u8>>, Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let mut s = c.prepare_cached("SELECT value FROM spin_key_value WHERE store=$1 AND key=$2")?;
                    let mut rows = s.query_map([&store, &key], |r| r.get::<_, Vec<u8>>(0))?;
                    rows.next().transpose()
                })
            })
            .await,
            Self::Hosted(kv) => kv.read(who, &key),
            Self::Redis { .. } => {
                let r: Result<Option<Vec<u8>>, _> = self.redis().await?.get(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn set(self: Arc<Self>, who: u64, store: String, key: String, value: Vec<u8>) -> Result<(), Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    c.prepare_cached(
                        "INSERT INTO spin_key_value (store, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT(store, key) DO UPDATE SET value=$3",
                    )?
                    .execute(rusqlite::params![store, key, value])
                    .map(drop)
                })
            })
            .await,
            Self::Hosted(kv) => kv.write(who, vec![(key, Some(value))]),
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.set(&key, value).await;
                self.redis_result(r).await
            }
        }
    }

    async fn delete(self: Arc<Self>, who: u64, store: String, key: String) -> Result<(), Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    c.prepare_cached("DELETE FROM spin_key_value WHERE store=$1 AND key=$2")?
                        .execute([&store, &key])
                        .map(drop)
                })
            })
            .await,
            Self::Hosted(kv) => kv.write(who, vec![(key, None)]),
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.del(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn exists(self: Arc<Self>, who: u64, store: String, key: String) -> Result<bool, Error> {
        match &*self {
            Self::Sqlite { .. } => Ok(self.get(who, store, key).await?.is_some()),
            Self::Hosted(kv) => kv.read(who, &key).map(|v| v.is_some()),
            Self::Redis { .. } => {
                let r: Result<bool, _> = self.redis().await?.exists(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn keys(self: Arc<Self>, who: u64, store: String) -> Result<Vec<String>, Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let mut s = c.prepare_cached("SELECT key FROM spin_key_value WHERE store=$1")?;
                    s.query_map([&store], |r| r.get::<_, String>(0))?.collect()
                })
            })
            .await,
            Self::Hosted(kv) => kv.keys(who),
            Self::Redis { .. } => {
                let mut conn = self.redis().await?;
                let r: Result<Vec<String>, redis::RedisError> = async {
                    let mut keys = Vec::new();
                    let mut iter = conn.scan::<String>().await?;
                    while let Some(k) = futures::StreamExt::next(&mut iter).await {
                        keys.push(k?);
                    }
                    Ok(keys)
                }
                .await;
                self.redis_result(r).await
            }
        }
    }

    /// `get-many`: the pairs found, absent keys left out, in no particular order (as
    /// Spin's SQLite store answers). On Redis, Spin sends the keys to `KEYS` rather
    /// than `MGET`, which fails for more than one key; this host does the same, so a
    /// component meets that here rather than in production.
    async fn get_many(self: Arc<Self>, who: u64, store: String, keys: Vec<String>) -> Result<Pairs, Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let marks = (2..keys.len() + 2).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                    let mut s = c.prepare(&format!("SELECT key, value FROM spin_key_value WHERE store=$1 AND key IN ({marks})"))?;
                    let params = std::iter::once(&store).chain(keys.iter());
                    s.query_map(rusqlite::params_from_iter(params), |r| Ok((r.get::<_, String>(0)?, Some(r.get::<_, Vec<u8>>(1)?))))?
                        .collect()
                })
            })
            .await,
            Self::Hosted(kv) => keys.into_iter().filter_map(|k| kv.read(who, &k).map(|v| v.map(|v| (k, Some(v)))).transpose()).collect(),
            Self::Redis { .. } => {
                let mut conn = self.redis().await?;
                let r: Result<Pairs, _> = redis::cmd("KEYS").arg(keys).query_async(&mut conn).await;
                self.redis_result(r).await
            }
        }
    }

    /// `set-many`: one transaction on SQLite (Spin's store), `MSET` on Redis.
    async fn set_many(self: Arc<Self>, who: u64, store: String, pairs: Vec<(String, Vec<u8>)>) -> Result<(), Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let tx = c.unchecked_transaction()?;
                    for (key, value) in &pairs {
                        tx.prepare_cached(
                            "INSERT INTO spin_key_value (store, key, value) VALUES ($1, $2, $3)
                             ON CONFLICT(store, key) DO UPDATE SET value=$3",
                        )?
                        .execute(rusqlite::params![store, key, value])?;
                    }
                    tx.commit()
                })
            })
            .await,
            Self::Hosted(kv) => kv.write(who, pairs.into_iter().map(|(k, v)| (k, Some(v))).collect()),
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.mset(&pairs).await;
                self.redis_result(r).await
            }
        }
    }

    /// `delete-many`: one statement on SQLite, one `DEL` on Redis.
    async fn delete_many(self: Arc<Self>, who: u64, store: String, keys: Vec<String>) -> Result<(), Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let marks = (2..keys.len() + 2).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
                    let params = std::iter::once(&store).chain(keys.iter());
                    c.execute(&format!("DELETE FROM spin_key_value WHERE store=$1 AND key IN ({marks})"), rusqlite::params_from_iter(params))
                        .map(drop)
                })
            })
            .await,
            Self::Hosted(kv) => kv.write(who, keys.into_iter().map(|k| (k, None)).collect()),
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.del(keys).await;
                self.redis_result(r).await
            }
        }
    }

    async fn redis_result<R>(&self, r: Result<R, redis::RedisError>) -> Result<R, Error> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() {
                    self.reset().await;
                }
                Err(other(e))
            }
        }
    }
}

/// Runs blocking SQLite work as Spin's SQLite store does: in place on the calling
/// runtime thread, which hands its other tasks to another thread meanwhile
/// (`block_in_place`; a multi-threaded runtime is needed, as Spin's).
async fn blocking<R: Send + 'static>(
    backend: Arc<KvBackend>,
    f: impl FnOnce(&KvBackend) -> Result<R, Error> + Send + 'static,
) -> Result<R, Error> {
    tokio::task::block_in_place(move || f(&backend))
}

fn store_of<T>(accessor: &Accessor<T, Spin>, store: &Resource<Store>) -> wasmtime::Result<(u64, String, Arc<KvBackend>)> {
    accessor.with(|mut access| {
        let s = access.get().table.get(store)?;
        Ok((s.who, s.label.clone(), s.backend.clone()))
    })
}

impl<T> HostStoreWithStore<T> for Spin {
    async fn open(accessor: &Accessor<T, Self>, label: String) -> wasmtime::Result<Result<Resource<Store>, Error>> {
        let Some(backend) = accessor.with(|mut access| access.get().caps.key_value.get(&label).cloned()) else {
            return Ok(Err(Error::AccessDenied));
        };
        if let Err(e) = backend.after_open().await {
            return Ok(Err(e));
        }
        accessor.with(|mut access| {
            let view = access.get();
            let who = view.instance;
            Ok(Ok(view.table.push(Store { label, backend, who })?))
        })
    }

    async fn get(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let (who, label, backend) = store_of(accessor, &store)?;
        Ok(backend.get(who, label, key).await)
    }

    async fn set(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), Error>> {
        let (who, label, backend) = store_of(accessor, &store)?;
        Ok(backend.set(who, label, key, value).await)
    }

    async fn delete(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<(), Error>> {
        let (who, label, backend) = store_of(accessor, &store)?;
        Ok(backend.delete(who, label, key).await)
    }

    async fn exists(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<bool, Error>> {
        let (who, label, backend) = store_of(accessor, &store)?;
        Ok(backend.exists(who, label, key).await)
    }

    async fn get_keys(
        accessor: &Accessor<T, Self>,
        store: Resource<Store>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), Error>>)> {
        let (who, label, backend) = store_of(accessor, &store)?;
        let (keys, result) = match backend.keys(who, label).await {
            Ok(keys) => (keys, Ok(())),
            Err(e) => (Vec::new(), Err(e)),
        };
        accessor.with(|mut access| {
            let stream = StreamReader::new(&mut access, keys)?;
            let future = FutureReader::new(&mut access, async move { wasmtime::error::Ok(result) })?;
            Ok((stream, future))
        })
    }
}

impl HostStore for SpinView<'_> {
    fn drop(&mut self, store: Resource<Store>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        Ok(())
    }
}

impl Host for SpinView<'_> {}

mod wasi {
    //! `wasi:keyvalue/store` and `batch` over the same stores, with Spin's error
    //! mapping (`store-table-full` becomes `other`).

    use wasmtime::component::Resource;

    use super::super::wasi_keyvalue::wasi::keyvalue::{batch, store};
    use super::{Error as SpinError, Store};
    use crate::host::SpinView;

    fn to_wasi(e: SpinError) -> store::Error {
        match e {
            SpinError::AccessDenied => store::Error::AccessDenied,
            SpinError::NoSuchStore => store::Error::NoSuchStore,
            SpinError::StoreTableFull => store::Error::Other("store table full".into()),
            SpinError::Other(m) => store::Error::Other(m),
        }
    }

    type Answer<T> = wasmtime::Result<Result<T, store::Error>>;

    fn bucket(view: &SpinView<'_>, b: &Resource<Store>) -> wasmtime::Result<(u64, String, std::sync::Arc<super::KvBackend>)> {
        let s = view.table.get(b)?;
        Ok((s.who, s.label.clone(), s.backend.clone()))
    }

    impl store::Host for SpinView<'_> {
        async fn open(&mut self, identifier: String) -> Answer<Resource<Store>> {
            let Some(backend) = self.caps.key_value.get(&identifier).cloned() else {
                return Ok(Err(store::Error::AccessDenied));
            };
            if let Err(e) = backend.after_open().await {
                return Ok(Err(to_wasi(e)));
            }
            Ok(Ok(self.table.push(Store { label: identifier, backend, who: self.instance })?))
        }
    }

    impl store::HostBucket for SpinView<'_> {
        async fn get(&mut self, b: Resource<Store>, key: String) -> Answer<Option<Vec<u8>>> {
            let (who, label, backend) = bucket(self, &b)?;
            Ok(backend.get(who, label, key).await.map_err(to_wasi))
        }

        async fn set(&mut self, b: Resource<Store>, key: String, value: Vec<u8>) -> Answer<()> {
            let (who, label, backend) = bucket(self, &b)?;
            Ok(backend.set(who, label, key, value).await.map_err(to_wasi))
        }

        async fn delete(&mut self, b: Resource<Store>, key: String) -> Answer<()> {
            let (who, label, backend) = bucket(self, &b)?;
            Ok(backend.delete(who, label, key).await.map_err(to_wasi))
        }

        async fn exists(&mut self, b: Resource<Store>, key: String) -> Answer<bool> {
            let (who, label, backend) = bucket(self, &b)?;
            Ok(backend.exists(who, label, key).await.map_err(to_wasi))
        }

        async fn list_keys(&mut self, b: Resource<Store>, cursor: Option<String>) -> Answer<store::KeyResponse> {
            if cursor.is_some() {
                return Ok(Err(store::Error::Other("list_keys: cursor not supported".into())));
            }
            let (who, label, backend) = bucket(self, &b)?;
            Ok(backend.keys(who, label).await.map(|keys| store::KeyResponse { keys, cursor: None }).map_err(to_wasi))
        }

        async fn drop(&mut self, b: Resource<Store>) -> wasmtime::Result<()> {
            self.table.delete(b)?;
            Ok(())
        }
    }

    impl batch::Host for SpinView<'_> {
        async fn get_many(&mut self, b: Resource<Store>, keys: Vec<String>) -> Answer<Vec<(String, Option<Vec<u8>>)>> {
            let (who, label, backend) = bucket(self, &b)?;
            if keys.is_empty() {
                return Ok(Ok(Vec::new()));
            }
            Ok(backend.get_many(who, label, keys).await.map_err(to_wasi))
        }

        async fn set_many(&mut self, b: Resource<Store>, pairs: Vec<(String, Vec<u8>)>) -> Answer<()> {
            let (who, label, backend) = bucket(self, &b)?;
            if pairs.is_empty() {
                return Ok(Ok(()));
            }
            Ok(backend.set_many(who, label, pairs).await.map_err(to_wasi))
        }

        async fn delete_many(&mut self, b: Resource<Store>, keys: Vec<String>) -> Answer<()> {
            let (who, label, backend) = bucket(self, &b)?;
            if keys.is_empty() {
                return Ok(Ok(()));
            }
            Ok(backend.delete_many(who, label, keys).await.map_err(to_wasi))
        }
    }
}
