//! `spin:key-value/key-value@3.0.0` over Spin's two backends: its SQLite file (same
//! table and queries as Spin, so a `.spin/sqlite_key_value.db` is interchangeable)
//! and Redis (keys stored as given).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use redis::AsyncCommands as _;
use wasmtime::component::{Accessor, FutureReader, Resource, StreamReader};

use super::spin::key_value::key_value::{Error, Host, HostStore, HostStoreWithStore};
use super::{Spin, SpinView};
use crate::runtime_config::KeyValueConfig;

/// An open store: the resource behind `store`.
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Store {
    label: String,
    backend: Arc<KvBackend>,
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
                    .with_context(|| format!("invalid Redis url {url:?} for a key-value store"))?,
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

    /// Forget a failed Redis connection so the next call reconnects.
    async fn reset(&self) {
        if let Self::Redis { conn, .. } = self {
            *conn.lock().await = None;
        }
    }

    async fn get(self: Arc<Self>, store: String, key: String) -> Result<Option<Vec<u8>>, Error> {
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
            Self::Redis { .. } => {
                let r: Result<Option<Vec<u8>>, _> = self.redis().await?.get(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn set(self: Arc<Self>, store: String, key: String, value: Vec<u8>) -> Result<(), Error> {
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
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.set(&key, value).await;
                self.redis_result(r).await
            }
        }
    }

    async fn delete(self: Arc<Self>, store: String, key: String) -> Result<(), Error> {
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
            Self::Redis { .. } => {
                let r: Result<(), _> = self.redis().await?.del(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn exists(self: Arc<Self>, store: String, key: String) -> Result<bool, Error> {
        match &*self {
            Self::Sqlite { .. } => Ok(self.get(store, key).await?.is_some()),
            Self::Redis { .. } => {
                let r: Result<bool, _> = self.redis().await?.exists(&key).await;
                self.redis_result(r).await
            }
        }
    }

    async fn keys(self: Arc<Self>, store: String) -> Result<Vec<String>, Error> {
        match &*self {
            Self::Sqlite { .. } => blocking(self.clone(), move |b| {
                let Self::Sqlite { path, conn } = b else { unreachable!() };
                Self::with_sqlite(path, conn, |c| {
                    let mut s = c.prepare_cached("SELECT key FROM spin_key_value WHERE store=$1")?;
                    s.query_map([&store], |r| r.get::<_, String>(0))?.collect()
                })
            })
            .await,
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

/// Runs blocking SQLite work off the async threads.
async fn blocking<R: Send + 'static>(
    backend: Arc<KvBackend>,
    f: impl FnOnce(&KvBackend) -> Result<R, Error> + Send + 'static,
) -> Result<R, Error> {
    tokio::task::spawn_blocking(move || f(&backend))
        .await
        .map_err(other)?
}

fn store_of<T>(accessor: &Accessor<T, Spin>, store: &Resource<Store>) -> wasmtime::Result<(String, Arc<KvBackend>)> {
    accessor.with(|mut access| {
        let s = access.get().table.get(store)?;
        Ok((s.label.clone(), s.backend.clone()))
    })
}

impl<T> HostStoreWithStore<T> for Spin {
    async fn open(accessor: &Accessor<T, Self>, label: String) -> wasmtime::Result<Result<Resource<Store>, Error>> {
        accessor.with(|mut access| {
            let view = access.get();
            let Some(backend) = view.caps.key_value.get(&label).cloned() else {
                return Ok(Err(Error::AccessDenied));
            };
            Ok(Ok(view.table.push(Store { label, backend })?))
        })
    }

    async fn get(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let (label, backend) = store_of(accessor, &store)?;
        Ok(backend.get(label, key).await)
    }

    async fn set(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), Error>> {
        let (label, backend) = store_of(accessor, &store)?;
        Ok(backend.set(label, key, value).await)
    }

    async fn delete(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<(), Error>> {
        let (label, backend) = store_of(accessor, &store)?;
        Ok(backend.delete(label, key).await)
    }

    async fn exists(accessor: &Accessor<T, Self>, store: Resource<Store>, key: String) -> wasmtime::Result<Result<bool, Error>> {
        let (label, backend) = store_of(accessor, &store)?;
        Ok(backend.exists(label, key).await)
    }

    async fn get_keys(
        accessor: &Accessor<T, Self>,
        store: Resource<Store>,
    ) -> wasmtime::Result<(StreamReader<String>, FutureReader<Result<(), Error>>)> {
        let (label, backend) = store_of(accessor, &store)?;
        let (keys, result) = match backend.keys(label).await {
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
