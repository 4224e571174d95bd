//! `spin:postgres/postgres@4.2.0` over `tokio-postgres`, as Spin provides it:
//! every `open` checks the address against the component's
//! `allowed_outbound_hosts` (scheme `postgres`, each host and port of the
//! connection string) and takes a client from a pool kept per address (64
//! clients, cleaned when returned); a statement is prepared and bound with the
//! types PostgreSQL infers for its parameters, so a value of another type is a
//! query error, as in Spin; columns are named and typed from the first row (a
//! query with no rows has none); values convert type by type as Spin's do, those
//! Spillway never reads as `unsupported` bytes.
//!
//! Not provided (Spin has them): TLS (the pool connects without it, so
//! `sslmode=require` fails to connect), a custom CA root, and the date, time,
//! decimal, range, array and interval conversions.

#![allow(clippy::result_large_err, reason = "the interface's own error type, returned as the WIT declares it")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use wasmtime::component::{Accessor, FutureReader, Resource, StreamReader};

use super::spin::postgres::postgres::{
    Column, DbDataType, DbError, DbValue, Error, Host, HostConnection, HostConnectionBuilder,
    HostConnectionBuilderWithStore, HostConnectionWithStore, ParameterValue, QueryError, RowSet,
};
use super::{Spin, SpinView};

/// Clients per address, as Spin's pool.
const POOL_SIZE: usize = 64;

/// The app's connection pools, one per address (shared by its components).
#[derive(Default)]
pub(crate) struct PgPools(Mutex<HashMap<String, deadpool_postgres::Pool>>);

impl PgPools {
    fn pool(&self, address: &str) -> Result<deadpool_postgres::Pool, Error> {
        let mut pools = self.0.lock().map_err(|_| Error::Other("pool lock poisoned".into()))?;
        if let Some(p) = pools.get(address) {
            return Ok(p.clone());
        }
        let config: tokio_postgres::Config = address.parse().map_err(|e| Error::ConnectionFailed(format!("{e:?}")))?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Clean },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| Error::ConnectionFailed(format!("{e:?}")))?;
        pools.insert(address.to_owned(), pool.clone());
        Ok(pool)
    }
}

/// An open connection: a pooled client, returned to the pool when dropped.
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Connection(Arc<deadpool_postgres::Object>);

/// A connection builder (an address; a CA root is refused: no TLS here).
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Builder(String);

/// Whether the component may reach every host of `address` (Spin checks each
/// `host:port` of the connection string under the scheme `postgres`).
fn allowed(view: &SpinView<'_>, address: &str) -> Result<(), Error> {
    let config: tokio_postgres::Config = address.parse().map_err(|e: tokio_postgres::Error| Error::ConnectionFailed(e.to_string()))?;
    let ports = config.get_ports();
    for (i, host) in config.get_hosts().iter().enumerate() {
        #[cfg(unix)]
        if let tokio_postgres::config::Host::Unix(_) = host {
            return Err(Error::ConnectionFailed("Unix sockets are not supported".into()));
        }
        if let tokio_postgres::config::Host::Tcp(h) = host {
            let port = ports.get(i).or(if ports.len() == 1 { ports.first() } else { None });
            let url = format!("{h}{}", port.map(|p| format!(":{p}")).unwrap_or_default());
            if !view.caps.allowed_hosts.check_url(&url, "postgres").map_err(Error::Other)? {
                eprintln!(
                    "Warning: A component ({}) tried to make an outbound network connection to disallowed destination 'postgres://{url}'.",
                    view.caps.id
                );
                return Err(Error::ConnectionFailed(format!("address postgres://{url} is not permitted")));
            }
        }
    }
    Ok(())
}

async fn open<T>(accessor: &Accessor<T, Spin>, address: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
    let pool = accessor.with(|mut access| {
        let view = access.get();
        allowed(&view, &address).and_then(|()| view.caps.postgres.pool(&address))
    });
    let pool = match pool {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    match pool.get().await {
        Ok(client) => accessor.with(|mut access| Ok(Ok(access.get().table.push(Connection(Arc::new(client)))?))),
        Err(e) => Ok(Err(Error::ConnectionFailed(format!("{e:?}")))),
    }
}

fn client_of<T>(accessor: &Accessor<T, Spin>, c: &Resource<Connection>) -> wasmtime::Result<Arc<deadpool_postgres::Object>> {
    accessor.with(|mut access| Ok(access.get().table.get(c)?.0.clone()))
}

fn query_failed(e: &tokio_postgres::Error) -> Error {
    let as_text = format!("{e:?}");
    Error::QueryFailed(match e.as_db_error() {
        None => QueryError::Text(as_text),
        Some(d) => QueryError::DbError(DbError {
            as_text,
            severity: d.severity().to_owned(),
            code: d.code().code().to_owned(),
            message: d.message().to_owned(),
            detail: d.detail().map(str::to_owned),
            extras: Vec::new(),
        }),
    })
}

/// SQL `NULL` for a parameter of any type.
#[derive(Debug)]
struct Null;

impl ToSql for Null {
    fn to_sql(&self, _: &Type, _: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(IsNull::Yes)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn parameter(v: ParameterValue) -> Result<Box<dyn ToSql + Send + Sync>, Error> {
    Ok(match v {
        ParameterValue::Boolean(b) => Box::new(b),
        ParameterValue::Int8(i) => Box::new(i),
        ParameterValue::Int16(i) => Box::new(i),
        ParameterValue::Int32(i) => Box::new(i),
        ParameterValue::Int64(i) => Box::new(i),
        ParameterValue::Floating32(f) => Box::new(f),
        ParameterValue::Floating64(f) => Box::new(f),
        ParameterValue::Str(s) => Box::new(s),
        ParameterValue::Binary(b) => Box::new(b),
        ParameterValue::DbNull => Box::new(Null),
        _ => return Err(Error::ValueConversionFailed("this parameter type is not supported by the test host".into())),
    })
}

/// A column's raw bytes, whatever its type.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn data_type(t: &Type) -> DbDataType {
    match *t {
        Type::BOOL => DbDataType::Boolean,
        Type::BYTEA => DbDataType::Binary,
        Type::FLOAT4 => DbDataType::Floating32,
        Type::FLOAT8 => DbDataType::Floating64,
        Type::INT2 => DbDataType::Int16,
        Type::INT4 => DbDataType::Int32,
        Type::INT8 => DbDataType::Int64,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR => DbDataType::Str,
        Type::JSONB => DbDataType::Jsonb,
        _ => DbDataType::Other(t.name().to_owned()),
    }
}

fn value(row: &tokio_postgres::Row, i: usize) -> Result<DbValue, tokio_postgres::Error> {
    fn get<'a, T: FromSql<'a>>(row: &'a tokio_postgres::Row, i: usize, f: impl Fn(T) -> DbValue) -> Result<DbValue, tokio_postgres::Error> {
        Ok(row.try_get::<_, Option<T>>(i)?.map_or(DbValue::DbNull, f))
    }
    match *row.columns()[i].type_() {
        Type::BOOL => get(row, i, DbValue::Boolean),
        Type::BYTEA => get(row, i, DbValue::Binary),
        Type::FLOAT4 => get(row, i, DbValue::Floating32),
        Type::FLOAT8 => get(row, i, DbValue::Floating64),
        Type::INT2 => get(row, i, DbValue::Int16),
        Type::INT4 => get(row, i, DbValue::Int32),
        Type::INT8 => get(row, i, DbValue::Int64),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR => get(row, i, DbValue::Str),
        Type::JSONB => get(row, i, |r: Raw| DbValue::Jsonb(r.0.get(1..).unwrap_or_default().to_vec())),
        _ => get(row, i, |r: Raw| DbValue::Unsupported(r.0)),
    }
}

/// Runs a statement to its end: the columns (of the first row), the rows before
/// any error, and that error. A statement PostgreSQL refuses fails the call.
async fn run(client: &deadpool_postgres::Object, statement: &str, params: Vec<ParameterValue>) -> Result<(Vec<Column>, Vec<Vec<DbValue>>, Result<(), Error>), Error> {
    use futures::TryStreamExt as _;
    let params = params.into_iter().map(parameter).collect::<Result<Vec<_>, _>>()?;
    let stream = client.query_raw(statement, params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync))).await.map_err(|e| query_failed(&e))?;
    let mut stream = std::pin::pin!(stream);
    let (mut columns, mut rows) = (Vec::new(), Vec::new());
    loop {
        match stream.try_next().await {
            Ok(Some(row)) => {
                if columns.is_empty() {
                    columns = row.columns().iter().map(|c| Column { name: c.name().to_owned(), data_type: data_type(c.type_()) }).collect();
                }
                match (0..row.len()).map(|i| value(&row, i)).collect::<Result<Vec<_>, _>>() {
                    Ok(values) => rows.push(values),
                    Err(e) => return Ok((columns, rows, Err(query_failed(&e)))),
                }
            }
            Ok(None) => return Ok((columns, rows, Ok(()))),
            Err(e) => return Ok((columns, rows, Err(query_failed(&e)))),
        }
    }
}

impl<T> HostConnectionWithStore<T> for Spin {
    async fn open_async(accessor: &Accessor<T, Self>, address: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        open(accessor, address).await
    }

    async fn query_async(
        accessor: &Accessor<T, Self>,
        c: Resource<Connection>,
        statement: String,
        params: Vec<ParameterValue>,
    ) -> wasmtime::Result<Result<(Vec<Column>, StreamReader<Vec<DbValue>>, FutureReader<Result<(), Error>>), Error>> {
        let client = client_of(accessor, &c)?;
        let (columns, rows, result) = match run(&client, &statement, params).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        accessor.with(|mut access| {
            let rows = StreamReader::new(&mut access, rows)?;
            let result = FutureReader::new(&mut access, async move { wasmtime::error::Ok(result) })?;
            Ok(Ok((columns, rows, result)))
        })
    }

    async fn execute_async(accessor: &Accessor<T, Self>, c: Resource<Connection>, statement: String, params: Vec<ParameterValue>) -> wasmtime::Result<Result<u64, Error>> {
        let client = client_of(accessor, &c)?;
        let params = match params.into_iter().map(parameter).collect::<Result<Vec<_>, _>>() {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        Ok(client.execute(statement.as_str(), &refs).await.map_err(|e| query_failed(&e)))
    }
}

impl<T> HostConnectionBuilderWithStore<T> for Spin {
    async fn build_async(accessor: &Accessor<T, Self>, b: Resource<Builder>) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        let address = accessor.with(|mut access| Ok::<_, wasmtime::Error>(access.get().table.get(&b)?.0.clone()))?;
        open(accessor, address).await
    }
}

/// The synchronous functions (Spin's WASIp2-era API): Spillway uses the
/// asynchronous ones; these answer that they are not provided here.
fn sync_unsupported() -> Error {
    Error::Other("the test host provides only the asynchronous postgres functions".into())
}

impl HostConnection for SpinView<'_> {
    fn open(&mut self, _address: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        Ok(Err(sync_unsupported()))
    }

    fn query(&mut self, _c: Resource<Connection>, _statement: String, _params: Vec<ParameterValue>) -> wasmtime::Result<Result<RowSet, Error>> {
        Ok(Err(sync_unsupported()))
    }

    fn execute(&mut self, _c: Resource<Connection>, _statement: String, _params: Vec<ParameterValue>) -> wasmtime::Result<Result<u64, Error>> {
        Ok(Err(sync_unsupported()))
    }

    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

impl HostConnectionBuilder for SpinView<'_> {
    fn new(&mut self, address: String) -> wasmtime::Result<Resource<Builder>> {
        Ok(self.table.push(Builder(address))?)
    }

    fn set_ca_root(&mut self, _b: Resource<Builder>, _certificate: String) -> wasmtime::Result<Result<(), Error>> {
        Ok(Err(Error::Other("the test host connects without TLS".into())))
    }

    fn build(&mut self, _b: Resource<Builder>) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        Ok(Err(sync_unsupported()))
    }

    fn drop(&mut self, b: Resource<Builder>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl Host for SpinView<'_> {}
