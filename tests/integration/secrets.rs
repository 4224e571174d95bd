//! Credentials: Spillway works against a Redis with a password (`requirepass`, and
//! an ACL user) and a PostgreSQL role with a password, and no password, nor the
//! admin token, shows in any answer (body or header) or log line, also when the
//! passwords are wrong; a wrong password is a clear 503 naming the variable to
//! fix, and a hazard in `/v1/stats`.

use serde_json::{Value, json};

use crate::spillway::{ADMIN, Engine, Spillway};
use crate::support::{Redis, fresh_secret};

const BEARER: &str = "Bearer test-admin-token";

/// Everything a client and an operator saw: each answer's status line, headers
/// and body, and the components' log.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    /// Sends a request and keeps all of its answer; returns it.
    async fn call(&mut self, s: &Spillway, method: &str, path: &str, body: Option<Value>, admin: bool) -> (u16, Value) {
        let headers: &[(&str, &str)] = if admin { &[("authorization", BEARER)] } else { &[] };
        let (status, h, v) = s.call(method, path, body, headers).await;
        let headers: Vec<String> = h.iter().map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()))).collect();
        self.0.push(format!("{method} {path} -> {status}\n{}\n{v}", headers.join("\n")));
        (status, v)
    }

    /// Asserts that no secret appears in anything seen nor in the log, in any
    /// spelling: each is looked for by its leading letters, digits and dashes
    /// (the fresh part of a test's secret, the same encoded or not).
    fn assert_clean(&self, s: &Spillway, secrets: &[&str]) {
        let log = s.app.guest_output();
        for secret in secrets {
            let secret = secret.split(|c: char| !c.is_ascii_alphanumeric() && c != '-').next().unwrap_or_default();
            assert!(secret.len() >= 8, "{secret:?} is too short to look for");
            for answer in &self.0 {
                assert!(!answer.contains(secret), "a secret is in an answer:\n{answer}");
            }
            assert!(!log.contains(secret), "a secret is in the log:\n{log}");
        }
    }
}

/// The whole API on a password-protected Redis and PostgreSQL: every endpoint
/// works, a write whose apply fails is dead-lettered with the database's error,
/// and neither password nor the admin token shows anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn the_whole_api_works_with_passwords_and_shows_none() {
    let s = Spillway::builder().engine(Engine::Postgres).vars(&[("max_attempts", "1")]).with_trigger().start().await;
    let redis_pw = s.redis.password().expect("Redis requires a password").to_owned();
    let pg_pw = pg_password(&s).expect("PostgreSQL requires a password");
    let mut seen = Seen::default();
    let (st, v) = seen.call(&s, "POST", "/v1/writes", Some(json!({"key": "a", "op": "put", "value": {"n": 1}})), false).await;
    assert_eq!(st, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(s.settled(&id).await["status"], "applied");
    let (st, v) = seen.call(&s, "POST", "/v1/writes", Some(json!({"writes": [{"key": "b", "op": "incr", "field": "n"}, {"key": "a", "op": "merge", "patch": {"m": 2}}]})), false).await;
    assert_eq!(st, 202, "{v}");
    for (method, path, body, admin, expect) in [
        ("GET", format!("/v1/writes/{id}"), None, false, 200),
        ("GET", "/v1/records/a".to_owned(), None, false, 200),
        ("GET", "/v1/records/missing".to_owned(), None, false, 404),
        ("POST", "/v1/records:get".to_owned(), Some(json!({"keys": ["a", "b", "missing"]})), false, 200),
        ("PUT", "/v1/cache/a".to_owned(), None, true, 200),
        ("DELETE", "/v1/cache/a".to_owned(), None, true, 204),
        ("POST", "/v1/drain".to_owned(), None, true, 200),
        ("GET", "/v1/stats".to_owned(), None, true, 200),
        ("GET", "/metrics".to_owned(), None, true, 200),
        ("GET", "/dashboard".to_owned(), None, false, 200),
        ("GET", "/v1/openapi.json".to_owned(), None, false, 200),
        ("POST", "/v1/writes".to_owned(), Some(json!({"key": "a", "op": "nope"})), false, 422),
        ("GET", "/v1/nowhere".to_owned(), None, false, 404),
        ("POST", "/v1/drain".to_owned(), None, false, 401),
    ] {
        let (st, v) = seen.call(&s, method, &path, body, admin).await;
        assert_eq!(st, expect, "{method} {path}: {v}");
    }

    // A write the database refuses: dead-lettered with the database's own
    // error (credentials masked), listed, replayed, purged.
    s.store.exec("ALTER TABLE spillway_records ADD CONSTRAINT refuse_c CHECK (key <> 'c')").await;
    let (_, v) = seen.call(&s, "POST", "/v1/writes", Some(json!({"key": "c", "op": "put", "value": {}})), false).await;
    let dead_id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(s.settled(&dead_id).await["status"], "dead");
    let (st, v) = seen.call(&s, "GET", &format!("/v1/writes/{dead_id}"), None, false).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("dead")), "{v}");
    let (st, v) = seen.call(&s, "GET", "/v1/dead", None, true).await;
    assert_eq!(st, 200, "{v}");
    // The dead letter says which backend failed, in Spillway's words; the
    // database's own (it names the constraint) is in the log only.
    assert!(v["dead"][0]["error"].as_str().is_some_and(|e| e.starts_with("The database (database)")), "{v}");
    assert!(!v.to_string().contains("refuse_c") && s.app.guest_output().contains("refuse_c"), "{v}");
    let (st, v) = seen.call(&s, "POST", "/v1/dead/purge", Some(json!({"all": true})), true).await;
    assert_eq!(st, 200, "{v}");
    seen.assert_clean(&s, &[&redis_pw, &pg_pw, ADMIN]);
}

fn pg_password(s: &Spillway) -> Option<String> {
    match &s.store {
        crate::spillway::Store::Postgres(db) => db.password.clone(),
        crate::spillway::Store::Sqlite(_) => None,
    }
}

/// Wrong passwords: Redis's gives `503 credentials-refused` naming
/// `redis_address`, with `Retry-After`, and `/v1/stats` answers with the
/// failure as a hazard and every shard unavailable; the database's gives the
/// same naming `database`. Neither the wrong nor the right password shows.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_passwords_are_clear_503s_that_show_no_password() {
    let redis = Redis::start_secured();
    let right = redis.password().unwrap().to_owned();
    let wrong = fresh_secret("wrong-redis");
    let address = format!("redis://:{wrong}@127.0.0.1:{}", redis.port);
    let s = Spillway::builder().redis(redis).vars(&[("redis_address", &address)]).start().await;
    let mut seen = Seen::default();
    let (st, p) = seen.call(&s, "POST", "/v1/writes", Some(json!({"key": "a", "op": "delete"})), false).await;
    assert_eq!((st, p["type"].as_str()), (503, Some("https://spillway.dev/problems/credentials-refused")), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("redis_address"), "{p}");
    let (st, stats) = seen.call(&s, "GET", "/v1/stats", None, true).await;
    assert_eq!(st, 200, "{stats}");
    assert_eq!(stats["unavailable_shards"].as_array().map(Vec::len), Some(16), "{stats}");
    assert!(stats["hazards"].as_array().unwrap().iter().any(|h| h.as_str().is_some_and(|h| h.contains("redis_address") && h.contains("credentials"))), "{stats}");
    let (st, _) = seen.call(&s, "GET", "/v1/writes/0-1-0", None, false).await;
    assert_eq!(st, 503);
    seen.assert_clean(&s, &[&right, &wrong, ADMIN]);

    // The database's password wrong (Redis's right).
    let good = Spillway::builder().engine(Engine::Postgres).start().await;
    let pg_right = pg_password(&good).unwrap();
    let pg_wrong = fresh_secret("wrong-pg");
    let crate::spillway::Store::Postgres(db) = &good.store else { unreachable!() };
    let bad_url = db.url.replace(&pg_right, &pg_wrong);
    drop(good);
    let s = Spillway::builder().engine(Engine::Postgres).vars(&[("database", &bad_url)]).start().await;
    let mut seen = Seen::default();
    let (st, p) = seen.call(&s, "GET", "/v1/records/a", None, false).await;
    assert_eq!((st, p["type"].as_str()), (503, Some("https://spillway.dev/problems/credentials-refused")), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("(database)"), "{p}");
    let (st, v) = seen.call(&s, "POST", "/v1/drain", None, true).await;
    assert!(st == 503 || st == 200, "{st} {v}");
    seen.assert_clean(&s, &[&pg_right, &pg_wrong, s.redis.password().unwrap(), ADMIN]);
}

/// An ACL user (`redis://user:password@host`) limited to Spillway's keys,
/// every channel and no dangerous command: writes are applied, and the
/// configuration Spillway could not read is a hazard, not a failure.
#[tokio::test(flavor = "multi_thread")]
async fn an_acl_user_limited_to_spillways_keys_works() {
    let redis = Redis::start_secured();
    let password = fresh_secret("acl");
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "spillway", "on", &format!(">{password}"), "~spillway:*", "&*", "+@all", "-@dangerous"][..])
        .query(&mut redis.conn())
        .unwrap();
    let address = format!("redis://spillway:{password}@127.0.0.1:{}", redis.port);
    let s = Spillway::builder().redis(redis).vars(&[("redis_address", &address)]).with_trigger().start().await;
    let mut seen = Seen::default();
    let (st, v) = seen.call(&s, "POST", "/v1/writes", Some(json!({"key": "k", "op": "incr", "field": "n", "by": 3})), false).await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
    let (_, r) = seen.call(&s, "GET", "/v1/records/k", None, false).await;
    assert_eq!(r["value"]["n"], 3, "{r}");
    let (_, stats) = seen.call(&s, "GET", "/v1/stats", None, true).await;
    assert_eq!(stats["totals"]["applied"], 1, "{stats}");
    assert!(stats["hazards"].to_string().contains("cannot read the Redis configuration"), "{stats}");
    seen.assert_clean(&s, &[&password, s.redis.password().unwrap(), ADMIN]);
}

/// The manifest a user had before `redis_host`: `{{ redis_address }}` in
/// `allowed_outbound_hosts`. With a password in it Spin starts (the default has
/// none) and then fails every Redis call with "Invalid allowed host"; the
/// embedded host does the same, and the answer still shows no password.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_allowed_hosts_fail_as_on_spin_and_stay_hidden() {
    let s = Spillway::builder().redis(Redis::start_secured()).apply(&crate::support::fixtures().join("apply_builtin.wasm")).edit(|m| {
        m.replace(r#"allowed_outbound_hosts = ["{{ redis_host }}""#, r#"allowed_outbound_hosts = ["{{ redis_address }}""#)
    }).with_trigger().start()
    .await;
    let mut seen = Seen::default();
    let (st, p) = seen.call(&s, "POST", "/v1/writes", Some(json!({"key": "a", "op": "delete"})), false).await;
    assert_eq!((st, p["type"].as_str()), (503, Some("https://spillway.dev/problems/unavailable")), "{p}");
    assert!(s.app.guest_output().contains("Invalid allowed host"), "the log says why:\n{}", s.app.guest_output());
    seen.assert_clean(&s, &[s.redis.password().unwrap(), ADMIN]);
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A TLS Redis (`rediss://`, which Spin's outbound Redis and its trigger open
/// through native-tls): a certificate from a CA the test makes, trusted by the
/// host process through `SSL_CERT_FILE`; a password too. A write is accepted,
/// rung through the TLS trigger and applied; the password shows in no output.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_redis_with_a_password_works() {
    crate::support::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Spillway test CA"]);
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(d, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    openssl(d, &["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext"]);
    let password = fresh_secret("tls");
    let port = crate::support::free_port();
    let mut server = std::process::Command::new("redis-server")
        .current_dir(d)
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .args(["--requirepass", &password])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let address = format!("rediss://:{password}@127.0.0.1:{port}");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (_, processor) = crate::processes::manifests(d);
    let ca = d.join("ca.pem");
    // The server may take a moment to listen: the host's trigger must connect.
    crate::support::eventually("the TLS Redis listens", std::time::Duration::from_secs(30), async || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    let host = crate::processes::spawn_with_env(&processor, &state, &address, &[], true, &[("SSL_CERT_FILE", &ca)]);
    let mut conn = crate::processes::Conn::open(host.port).await;
    let (st, body) = conn.request("POST", "/v1/writes", "", r#"{"key":"t","op":"incr","field":"n","by":5}"#).await;
    assert_eq!(st, 202, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    crate::support::eventually("the write is applied", std::time::Duration::from_secs(60), async || {
        let (st, body) = conn.request("GET", &format!("/v1/writes/{id}?wait=5"), "", "").await;
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["status"] == "applied"
    })
    .await;
    let (_, body) = conn.request("GET", "/v1/records/t", "", "").await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["value"]["n"], 5, "{body}");
    // The log lines are read by a thread of their own: wait for the batch's.
    crate::support::eventually("the components' log lines are read", std::time::Duration::from_secs(30), async || {
        host.stderr.lock().unwrap().iter().any(|l| l.contains("\"event\":\"batch\""))
    })
    .await;
    let printed = format!("{}\n{}", host.stdout.lock().unwrap().join("\n"), host.stderr.lock().unwrap().join("\n"));
    assert!(!printed.contains(&password), "{printed}");
    let _ = server.kill();
    let _ = server.wait();
}
