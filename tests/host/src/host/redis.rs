//! `spin:redis/redis@3.0.0`: outbound Redis as Spin provides it. Every `open` checks
//! the address against the component's `allowed_outbound_hosts` (a refusal is a bare
//! `invalid-address`) and makes a new connection; `execute` flattens nested replies
//! into one list, as Spin does.

use redis::{AsyncCommands as _, Value as RValue};
use wasmtime::component::{Accessor, Resource};

use super::spin::redis::redis::{
    Error, Host, HostConnection, HostConnectionWithStore, RedisParameter, RedisResult,
};
use super::{Spin, SpinView};

/// An open connection: the resource behind `connection`.
#[allow(unreachable_pub, reason = "bindgen re-exports resource types publicly")]
pub struct Connection(redis::aio::MultiplexedConnection);

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

/// Connection settings as Spin's (redis-rs 0.32 there): no response timeout, which
/// redis-rs 1.x would otherwise set to 500 ms and fail busy-but-healthy commands.
pub(crate) fn connection_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(std::time::Duration::from_secs(10)))
}

fn conn_of<T>(accessor: &Accessor<T, Spin>, c: &Resource<Connection>) -> wasmtime::Result<redis::aio::MultiplexedConnection> {
    accessor.with(|mut access| Ok(access.get().table.get(c)?.0.clone()))
}

/// Flattens a reply the way Spin's `execute` does.
pub(crate) fn flatten(value: RValue, out: &mut Vec<RedisResult>) -> Result<(), Error> {
    match value {
        RValue::Nil => out.push(RedisResult::Nil),
        RValue::Int(i) => out.push(RedisResult::Int64(i)),
        RValue::BulkString(b) => out.push(RedisResult::Binary(b)),
        RValue::SimpleString(s) => out.push(RedisResult::Status(s)),
        RValue::Okay => out.push(RedisResult::Status("OK".into())),
        RValue::Array(items) | RValue::Set(items) => {
            for item in items {
                flatten(item, out)?;
            }
        }
        RValue::Double(d) => out.push(RedisResult::Binary(d.to_string().into_bytes())),
        RValue::Boolean(b) => out.push(RedisResult::Int64(i64::from(b))),
        RValue::BigNumber(n) => out.push(RedisResult::Binary(format!("{n:?}").into_bytes())),
        RValue::ServerError(e) => return Err(other(redis::RedisError::from(e))),
        other_kind => {
            return Err(Error::Other(format!(
                "Response was of incompatible type: Redis {other_kind:?} type is not supported"
            )));
        }
    }
    Ok(())
}

impl<T> HostConnectionWithStore<T> for Spin {
    async fn open(accessor: &Accessor<T, Self>, address: String) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        let (allowed, id) = accessor.with(|mut access| {
            let view = access.get();
            (view.caps.allowed_hosts.check_url(&address, "redis"), view.caps.id.clone())
        });
        match allowed {
            Ok(true) => {}
            // The component's entries did not resolve: Spin fails the call
            // with the parse error.
            Err(e) => return Ok(Err(Error::Other(e))),
            Ok(false) => {
                // Named as Spin names it: scheme, host and port, never the
                // user information.
                let destination = crate::outbound::destination(&address, "redis");
                eprintln!(
                    "Warning: A component ({id}) tried to make an outbound network connection to disallowed destination '{destination}'.\n\
                     To allow this request, add 'allowed_outbound_hosts = [\"{destination}\"]' to the manifest component section."
                );
                return Ok(Err(Error::InvalidAddress));
            }
        }
        let client = match redis::Client::open(address.as_str()) {
            Ok(c) => c,
            Err(_) => return Ok(Err(Error::InvalidAddress)),
        };
        let conn = match client.get_multiplexed_async_connection_with_config(&connection_config()).await {
            Ok(c) => c,
            Err(e) => return Ok(Err(other(e))),
        };
        accessor.with(|mut access| Ok(Ok(access.get().table.push(Connection(conn))?)))
    }

    async fn publish(accessor: &Accessor<T, Self>, c: Resource<Connection>, channel: String, payload: Vec<u8>) -> wasmtime::Result<Result<(), Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.publish::<_, _, ()>(channel, payload).await.map_err(other))
    }

    async fn get(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.get(key).await.map_err(other))
    }

    async fn set(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.set(key, value).await.map_err(other))
    }

    async fn incr(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String) -> wasmtime::Result<Result<i64, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.incr(key, 1).await.map_err(type_or_other))
    }

    async fn del(accessor: &Accessor<T, Self>, c: Resource<Connection>, keys: Vec<String>) -> wasmtime::Result<Result<u32, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.del(keys).await.map_err(other))
    }

    async fn sadd(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String, values: Vec<String>) -> wasmtime::Result<Result<u32, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.sadd(key, values).await.map_err(type_or_other))
    }

    async fn smembers(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String) -> wasmtime::Result<Result<Vec<String>, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.smembers(key).await.map_err(type_or_other))
    }

    async fn srem(accessor: &Accessor<T, Self>, c: Resource<Connection>, key: String, values: Vec<String>) -> wasmtime::Result<Result<u32, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        Ok(conn.srem(key, values).await.map_err(type_or_other))
    }

    async fn execute(
        accessor: &Accessor<T, Self>,
        c: Resource<Connection>,
        command: String,
        arguments: Vec<RedisParameter>,
    ) -> wasmtime::Result<Result<Vec<RedisResult>, Error>> {
        let mut conn = conn_of(accessor, &c)?;
        let mut cmd = redis::cmd(&command);
        for a in arguments {
            match a {
                RedisParameter::Int64(i) => cmd.arg(i),
                RedisParameter::Binary(b) => cmd.arg(b),
            };
        }
        let value: RValue = match cmd.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => return Ok(Err(other(e))),
        };
        let mut out = Vec::new();
        Ok(flatten(value, &mut out).map(|()| out))
    }
}

fn type_or_other(e: redis::RedisError) -> Error {
    if e.kind() == redis::ErrorKind::UnexpectedReturnType {
        Error::TypeError
    } else {
        other(e)
    }
}

impl HostConnection for SpinView<'_> {
    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

impl Host for SpinView<'_> {}
