//! The tests' PostgreSQL: a database per test on the host crate's shared server
//! (`spillway-pg-server`), and a client for assertions.

pub(crate) use spillway_pg_server::{PgDb, PgServer};

/// A client for assertions (its connection driven by a task of the test's
/// runtime).
pub(crate) async fn client(db: &PgDb) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.expect("connect to the test database");
    tokio::spawn(conn);
    client
}
