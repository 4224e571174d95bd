//! Reading many records at once, negative caching, and change feeds (SSE).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::spillway::Spillway;

async fn drain(s: &Spillway) {
    let (code, _, v) = s.admin("POST", "/v1/drain", None).await;
    assert_eq!(code, 200, "{v}");
}

async fn many_records(s: Spillway) {
    for (k, n) in [("a", 1), ("b", 2)] {
        s.write(json!({"key": k, "op": "put", "value": {"n": n}})).await;
    }
    drain(&s).await;
    let (_, _, a) = s.call("GET", "/v1/records/a", None, &[]).await; // cached now
    let before = s.app.sqlite_statements("default");
    let (code, _, v) = s.call("POST", "/v1/records:get", Some(json!({"keys": ["a", "b", "zz", "a", "yy"]})), &[]).await;
    let reads = s.app.sqlite_statements("default") - before;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["records"][0], a, "a hit is the record as GET answers it");
    assert_eq!((v["records"][1]["key"].as_str(), v["records"][1]["value"]["n"].as_i64()), (Some("b"), Some(2)), "{v}");
    assert_eq!(v["records"].as_array().unwrap().len(), 2, "a key asked twice is answered once: {v}");
    assert_eq!(v["absent"], json!(["zz", "yy"]));
    assert_eq!(reads, 1, "the three misses are one database query");
    let (_, _, v) = s.call("POST", "/v1/records:get?consistent=true", Some(json!({"keys": ["zz", "a"]})), &[]).await;
    assert_eq!((v["records"][0]["key"].as_str(), v["absent"].clone()), (Some("a"), json!(["zz"])), "{v}");

    let too_many: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
    for (body, field) in [
        (json!({"keys": []}), "/keys"),
        (json!({"keys": too_many}), "/keys"),
        (json!({"keys": ["a", 1]}), "/keys/1"),
        (json!({"keys": ["a", ""]}), "/keys/1"),
        (json!({"keys": ["a b"]}), "/keys/0"),
        (json!({"key": ["a"]}), "/key"),
        (json!(["a"]), ""),
    ] {
        let (code, _, p) = s.call("POST", "/v1/records:get", Some(body.clone()), &[]).await;
        assert_eq!((code, p["field"].as_str().unwrap_or("")), (422, field), "{body}: {p}");
    }
    let (code, _, p) = s.call("POST", "/v1/records:get", None, &[("content-type", "text/plain")]).await;
    assert_eq!(code, 415, "{p}");
    let (code, headers, _) = s.call("GET", "/v1/records:get", None, &[]).await;
    assert_eq!((code, headers["allow"].to_str().unwrap()), (405, "POST"));
}

/// Many records in one request: hits from the cache, every miss in one database
/// query, absent keys listed; bad bodies are refused with their field.
#[tokio::test(flavor = "multi_thread")]
async fn many_records_in_one_request() {
    many_records(Spillway::builder().start().await).await;
}

/// The same with the key-value store on Redis (runtime config), whose
/// `get-many` Spin cannot do (one by one).
#[tokio::test(flavor = "multi_thread")]
async fn many_records_in_one_request_redis_cache() {
    many_records(Spillway::builder().kv_on_redis().start().await).await;
}

/// The same with `cache_store=redis` (one `MGET` per server).
#[tokio::test(flavor = "multi_thread")]
async fn many_records_in_one_request_cache_store_redis() {
    many_records(Spillway::builder().vars(&[("cache_store", "redis")]).start().await).await;
}

/// A flood of reads of an absent key reaches the database a bounded number of
/// times (counted by the host), and the key's creation is visible as soon as its
/// write is applied.
#[tokio::test(flavor = "multi_thread")]
async fn absent_keys_are_negatively_cached() {
    negatively_cached(Spillway::builder().start().await).await;
}

/// The same with `cache_store=redis`.
#[tokio::test(flavor = "multi_thread")]
async fn absent_keys_are_negatively_cached_cache_store_redis() {
    negatively_cached(Spillway::builder().vars(&[("cache_store", "redis")]).start().await).await;
}

async fn negatively_cached(s: Spillway) {
    let s = Arc::new(s);
    s.write(json!({"key": "other", "op": "put", "value": 1})).await;
    drain(&s).await; // the tables exist
    let before = s.app.sqlite_statements("default");
    let mut readers = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        readers.push(tokio::spawn(async move {
            for _ in 0..50 {
                let (code, _, _) = s.call("GET", "/v1/records/ghost", None, &[]).await;
                assert_eq!(code, 404);
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    let reads = s.app.sqlite_statements("default") - before;
    assert!(reads <= 16, "800 reads of an absent key made {reads} database reads");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(spillway_core::layout::Layout { prefix: "spillway:".into(), shards: 16 }.fill_lock("ghost"))
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(ttl > 0 && ttl <= spillway_core::layout::ABSENT_TTL_MS as i64, "the negative entry expires ({ttl} ms)");

    let (_, v) = s.write(json!({"key": "ghost", "op": "put", "value": "boo"})).await;
    drain(&s).await;
    assert_eq!(s.settled(v["id"].as_str().unwrap()).await["status"], "applied");
    let (code, _, v) = s.call("GET", "/v1/records/ghost", None, &[]).await;
    assert_eq!((code, v["value"].as_str()), (200, Some("boo")), "the creation is visible at once: {v}");
}

/// A Server-Sent Events client over a real socket (HTTP/1.0, so the body is the
/// raw stream, closed at its end).
struct Feed {
    stream: tokio::net::TcpStream,
    buf: String,
}

impl Feed {
    async fn open(addr: std::net::SocketAddr, key: &str, last_event_id: Option<i64>) -> Self {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resume = last_event_id.map(|v| format!("Last-Event-ID: {v}\r\n")).unwrap_or_default();
        let req = format!("GET /v1/records/{key}/changes HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut feed = Self { stream, buf: String::new() };
        let head = feed.block().await.expect("response head");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
        feed
    }

    /// The next block up to a blank line; `None` at the end of the stream.
    async fn block(&mut self) -> Option<String> {
        loop {
            let sep = self.buf.find("\r\n\r\n").map(|i| (i, 4)).or_else(|| self.buf.find("\n\n").map(|i| (i, 2)));
            if let Some((i, n)) = sep {
                let block = self.buf[..i].to_owned();
                self.buf.drain(..i + n);
                return Some(block);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk)).await.expect("the feed went quiet").unwrap();
            if n == 0 {
                return None;
            }
            self.buf.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        }
    }

    /// The next event `(id, data)`, skipping `retry:` and comments; `None` at the end.
    async fn event(&mut self) -> Option<(i64, Value)> {
        loop {
            let block = self.block().await?;
            let id = block.lines().find_map(|l| l.strip_prefix("id: "));
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if block.lines().any(|l| l.starts_with("event: error")) {
                panic!("the feed reported an error: {block}");
            }
            if let (Some(id), Some(data)) = (id, data) {
                return Some((id.parse().unwrap(), serde_json::from_str(data).unwrap()));
            }
        }
    }
}

/// A key's change feed: every version in order (the current one first), each
/// readable once received, a deletion included; a reconnect with
/// `Last-Event-ID` carries on with nothing missed; a response ends after
/// `change_feed_secs`.
#[tokio::test(flavor = "multi_thread")]
async fn change_feed_streams_every_version() {
    change_feed(Spillway::builder().vars(&[("change_feed_secs", "6")]).with_trigger().start().await).await;
}

/// The same with `cache_store=redis`.
#[tokio::test(flavor = "multi_thread")]
async fn change_feed_streams_every_version_cache_store_redis() {
    change_feed(Spillway::builder().vars(&[("change_feed_secs", "6"), ("cache_store", "redis")]).with_trigger().start().await).await;
}

async fn change_feed(s: Spillway) {
    let s = Arc::new(s);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(s.app.clone().serve(listener));
    let (_, v) = s.write(json!({"key": "f", "op": "put", "value": {"n": 0}})).await;
    s.settled(v["id"].as_str().unwrap()).await;

    let mut feed = Feed::open(addr, "f", None).await;
    let (id, first) = feed.event().await.unwrap();
    assert_eq!((id, first["value"]["n"].as_i64()), (1, Some(0)), "the current record first: {first}");
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                let (code, _) = s.write(json!({"key": "f", "op": "incr", "field": "n"})).await;
                assert_eq!(code, 202);
            }
        })
    };
    for version in 2..=31 {
        let (id, data) = feed.event().await.expect("an event per version");
        assert_eq!((id, data["version"].as_i64(), data["value"]["n"].as_i64()), (version, Some(version), Some(version - 1)), "{data}");
        if version % 10 == 0 {
            let (_, _, r) = s.call("GET", "/v1/records/f", None, &[]).await;
            assert!(r["version"].as_i64().unwrap() >= version, "read after event {version}: {r}");
        }
    }
    writer.await.unwrap();
    drop(feed);

    // Away for a while: 10 increments and a delete.
    for _ in 0..10 {
        s.write(json!({"key": "f", "op": "incr", "field": "n"})).await;
    }
    let (_, v) = s.write(json!({"key": "f", "op": "delete"})).await;
    s.settled(v["id"].as_str().unwrap()).await;
    let started = Instant::now();
    let mut feed = Feed::open(addr, "f", Some(31)).await;
    for version in 32..=41 {
        let (id, data) = feed.event().await.unwrap();
        assert_eq!((id, data["value"]["n"].as_i64()), (version, Some(version - 1)), "{data}");
    }
    let (id, data) = feed.event().await.unwrap();
    assert_eq!((id, data["deleted"].as_bool()), (42, Some(true)), "{data}");
    assert!(feed.event().await.is_none(), "the response ends after change_feed_secs");
    assert!(started.elapsed() >= Duration::from_secs(5), "it streamed for change_feed_secs");

    // Away longer than the log is kept (outcomes pruned up to version 40): the
    // current state stands in for what is gone.
    s.db().execute("DELETE FROM spillway_writes WHERE key = 'f' AND version <= 40", []).unwrap();
    let mut feed = Feed::open(addr, "f", Some(5)).await;
    let (id, data) = feed.event().await.unwrap();
    assert_eq!((id, data["deleted"].as_bool()), (42, Some(true)), "{data}");
    drop(feed);

    let (code, _, p) = s.call("GET", "/v1/records/f/changes", None, &[("last-event-id", "x")]).await;
    assert_eq!((code, p["field"].as_str()), (422, Some("/headers/last-event-id")), "{p}");
    server.abort();
}
