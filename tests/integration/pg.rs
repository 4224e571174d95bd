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

/// The one-statement schema check reads as an integer on PostgreSQL too (a
/// boolean would read as nothing through Spin's PostgreSQL interface, and
/// every open would then run the steps' checks): 0 on a fresh database, 1
/// once the schema is made.
#[tokio::test(flavor = "multi_thread")]
async fn the_schema_check_is_an_integer_on_postgres() {
    let db = PgDb::create();
    let c = client(&db).await;
    let check = spillway_core::sql::schema_current(spillway_core::sql::postgres::DIALECT.schema);
    let current = async || c.query_one(&check, &[]).await.unwrap().get::<_, i32>(0);
    assert_eq!(current().await, 0, "a fresh database");
    for stmt in spillway_core::sql::postgres::SCHEMA {
        c.batch_execute(stmt).await.unwrap();
    }
    assert_eq!(current().await, 1, "the schema made");
}
