//! Seeing and running it: stats, Prometheus metrics, dead-letter purge, and the
//! processor's JSON log lines, after a workload whose counts are known.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::spillway::{ADMIN, FAILING_RECORDS, Spillway};

/// A metric's value summed over its samples (every shard).
fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// After a known workload (28 accepted: 21 applied, 5 rejected, 3 dead after 3
/// failed deliveries, of which 1 replayed and 1 purged) the stats and the metrics
/// carry exactly those numbers; the metrics text is read by a Prometheus parser;
/// the processor logged one JSON line per batch and per failure.
#[tokio::test(flavor = "multi_thread")]
async fn stats_and_metrics_carry_the_workload() {
    let s = Spillway::builder().vars(&[("max_attempts", "1")]).start().await;
    let auth = format!("Bearer {ADMIN}");
    let admin = [("authorization", auth.as_str())];
    // Three writes that cannot be applied (the database refuses every record):
    // one failed delivery each, then dead letters.
    s.db().execute_batch(FAILING_RECORDS).unwrap();
    let mut doomed = Vec::new();
    for i in 0..3 {
        let (_, v) = s.write(json!({"key": format!("doomed{i}"), "op": "put", "value": i})).await;
        doomed.push(v["id"].as_str().unwrap().to_owned());
    }
    s.call("POST", "/v1/drain", None, &admin).await;
    s.call("POST", "/v1/drain", None, &admin).await;
    s.db().execute_batch("DROP TABLE spillway_records").unwrap();
    // 20 increments and 5 decrements past their minimum.
    for i in 0..20 {
        s.write(json!({"key": format!("k{}", i % 4), "op": "incr", "field": "n"})).await;
    }
    for _ in 0..5 {
        s.write(json!({"key": "k0", "op": "incr", "field": "n", "by": -100, "min": 0})).await;
    }
    let (_, _, out) = s.call("POST", "/v1/drain", None, &admin).await;
    assert_eq!((out["applied"].as_u64(), out["rejected"].as_u64()), (Some(20), Some(5)), "{out}");
    // One dead letter replayed (and applied), one purged.
    let (code, _, out) = s.call("POST", "/v1/dead/replay", Some(json!({"ids": [doomed[0]]})), &admin).await;
    assert_eq!(code, 200, "{out}");
    s.call("POST", "/v1/drain", None, &admin).await;
    let (code, _, out) = s.call("POST", "/v1/dead/purge", Some(json!({"ids": [doomed[1]]})), &admin).await;
    assert_eq!((code, out.clone()), (200, json!({"purged": [doomed[1]]})));
    let (_, _, st) = s.call("GET", &format!("/v1/writes/{}", doomed[1]), None, &[]).await;
    assert_eq!(st["status"], "purged", "{st}");

    let (code, _, stats) = s.call("GET", "/v1/stats", None, &admin).await;
    assert_eq!(code, 200, "{stats}");
    let t = &stats["totals"];
    let got: Vec<u64> = ["accepted", "applied", "rejected", "dead", "retried", "replayed", "purged", "depth", "dead_letters"]
        .iter()
        .map(|k| t[*k].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(got, vec![28, 21, 5, 3, 3, 1, 1, 0, 1], "{t}");
    let shards = stats["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 16);
    assert_eq!(shards.iter().map(|sh| sh["applied"].as_u64().unwrap()).sum::<u64>(), 21, "the shards add up");
    // Every acknowledged write (20 applied, 5 rejected, 1 replayed) in the
    // apply-delay histogram; the dead letters are not acknowledged.
    let delay = &stats["apply_delay_ms"];
    let in_buckets: u64 = delay["buckets"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!((delay["count"].as_u64(), in_buckets), (Some(26), 26), "{delay}");
    assert!(delay["p50_le"].as_u64().is_some_and(|p| p <= delay["p99_le"].as_u64().unwrap_or(u64::MAX)), "{delay}");
    let tp = &stats["throughput"];
    let secs = tp["window_secs"].as_f64().unwrap();
    assert!((50.0..=60.0).contains(&secs), "{tp}");
    let per_window = |k: &str| (tp[k].as_f64().unwrap() * secs * 1000.0).round() / 1000.0;
    assert_eq!((per_window("accepted_per_sec"), per_window("applied_per_sec")), (28.0, 21.0), "{tp}");

    let res = s.app.handle(
        http::Request::get("http://127.0.0.1:3000/metrics").header("authorization", &auth).body(bytes::Bytes::new()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let text = String::from_utf8(res.body().to_vec()).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let sums: HashMap<&str, f64> = [
        "spillway_writes_accepted_total",
        "spillway_writes_applied_total",
        "spillway_writes_rejected_total",
        "spillway_writes_dead_total",
        "spillway_writes_retried_total",
        "spillway_writes_replayed_total",
        "spillway_writes_purged_total",
        "spillway_queue_depth",
        "spillway_dead_letters",
    ]
    .into_iter()
    .map(|m| (m, metric_sum(&scrape, m)))
    .collect();
    assert_eq!(
        sums,
        HashMap::from([
            ("spillway_writes_accepted_total", 28.0),
            ("spillway_writes_applied_total", 21.0),
            ("spillway_writes_rejected_total", 5.0),
            ("spillway_writes_dead_total", 3.0),
            ("spillway_writes_retried_total", 3.0),
            ("spillway_writes_replayed_total", 1.0),
            ("spillway_writes_purged_total", 1.0),
            ("spillway_queue_depth", 0.0),
            ("spillway_dead_letters", 1.0),
        ]),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "spillway_write_apply_delay_seconds_count 26"), "{text}");
    assert!(text.lines().any(|l| l == "spillway_write_apply_delay_seconds_bucket{le=\"+Inf\"} 26"), "{text}");
    assert_eq!(scrape.samples.iter().filter(|x| x.metric == "spillway_queue_depth").count(), 16, "one per shard");
    assert!(scrape.samples.iter().any(|x| x.labels.get("shard") == Some("15")), "a shard label");

    // One JSON line per applied batch and per failure.
    let lines: Vec<Value> = s.app.guest_output().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("event").is_some()).collect();
    let applied: u64 = lines.iter().filter(|l| l["event"] == "batch").map(|l| l["applied"].as_u64().unwrap()).sum();
    assert_eq!(applied, 21, "{lines:?}");
    let batch = lines.iter().find(|l| l["event"] == "batch").unwrap();
    for field in ["shard", "fence", "writes", "first", "last"] {
        assert!(!batch[field].is_null(), "{field} in {batch}");
    }
    assert!(["read", "apply", "cache", "ack"].iter().all(|k| batch["ms"][*k].is_u64()), "{batch}");
    let failed: Vec<&Value> = lines.iter().filter(|l| l["event"] == "batch_failed").collect();
    assert!(failed.iter().any(|l| l["step"] == "apply" && l["error"].as_str().unwrap().contains("CHECK")), "{failed:?}");
}

/// Stats and metrics need the admin token unless `stats_public` is true; cache
/// hits and misses are counted.
#[tokio::test(flavor = "multi_thread")]
async fn stats_access_and_cache_counts() {
    let s = Spillway::builder().start().await;
    for path in ["/v1/stats", "/metrics"] {
        let (code, _, p) = s.call("GET", path, None, &[]).await;
        assert_eq!(code, 401, "{path}: {p}");
    }
    let open = Spillway::builder().vars(&[("stats_public", "true")]).start().await;
    let (_, v) = open.write(json!({"key": "c", "op": "put", "value": 1})).await;
    open.drain().await;
    assert_eq!(open.settled(v["id"].as_str().unwrap()).await["status"], "applied");
    // A miss, then hits: an instance's first read is counted at once, the rest
    // within a second (while the instance lives).
    open.call("GET", "/v1/records/nope", None, &[]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        open.call("GET", "/v1/records/c", None, &[]).await;
        let (code, _, stats) = open.call("GET", "/v1/stats", None, &[]).await;
        assert_eq!(code, 200, "public: {stats}");
        if stats["cache"]["hits"].as_u64().unwrap() >= 1 {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "hits never counted: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(stats["cache"]["misses"].as_u64().unwrap() >= 1, "{stats}");
    for (method, path) in [("POST", "/v1/dead/purge"), ("POST", "/v1/dead/replay"), ("POST", "/v1/drain"), ("GET", "/v1/dead")] {
        let (code, _, p) = open.call(method, path, None, &[]).await;
        assert_eq!(code, 401, "{method} {path} still needs the token: {p}");
    }
    let (code, _, p) = s.admin("POST", "/v1/dead/purge", Some(json!({"shard": 99}))).await;
    assert_eq!((code, p["field"].as_str()), (422, Some("/shard")), "{p}");
}

/// The dashboard in a real browser (headless Chromium, `tests/browser/dashboard.sh`)
/// during a load run: its charts are drawn from `/v1/stats` on a five-minute
/// time axis with labelled ticks and a y scale in their units, the accepted
/// and the applied rates both non-zero, a legend entry per shard; at a
/// phone's width nothing overflows the page. The screenshots are left in
/// `target/dashboard.png` and `target/dashboard-phone.png`. The page loads
/// nothing from elsewhere (its CSP forbids it).
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_live_charts() {
    let s = std::sync::Arc::new(Spillway::builder().with_trigger().start().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(s.app.clone().serve(listener));
    let (code, headers, _) = s.call("GET", "/dashboard", None, &[]).await;
    assert_eq!(code, 200);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");

    // Load while the browser watches: batches of increments, without pause.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.write(crate::spillway::batch_of_incr(i, 100, 50)).await;
                i += 100;
            }
        })
    };
    let script = crate::support::workspace().join("tests/browser/dashboard.sh");
    let url = format!("http://{addr}/dashboard#token={ADMIN}");
    let mut doms = Vec::new();
    for (name, size) in [("dashboard.png", "1640,900"), ("dashboard-phone.png", "390,844")] {
        let shot = crate::support::workspace().join("target").join(name);
        let out = tokio::process::Command::new("bash").arg(&script).arg(&url).arg(&shot).arg(size).output().await.unwrap();
        assert!(out.status.success(), "the browser script failed: {}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&shot).expect("the screenshot is left behind");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
        doms.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    server.abort();
    let (dom, phone) = (&doms[0], &doms[1]);
    // Each chart's <svg> carries how many points it drew, their largest
    // value (per series too) and how many ticks each axis has.
    let attr = |id: &str, name: &str| -> f64 {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no chart {id} in:\n{dom}"));
        let tag = &dom[start..start + dom[start..].find('>').unwrap()];
        let at = tag.find(&format!("{name}=\"")).unwrap_or_else(|| panic!("no {name} in {tag}")) + name.len() + 2;
        tag[at..at + tag[at..].find('"').unwrap()].parse().unwrap()
    };
    let status = dom.split("id=\"status\"").nth(1).and_then(|r| r.split("</p>").next()).unwrap_or("").to_owned();
    for chart in ["depth", "throughput", "lag"] {
        assert!(attr(chart, "data-points") >= 2.0, "{chart} drew {} points; status: {status}", attr(chart, "data-points"));
        assert!(attr(chart, "data-xticks") >= 5.0, "{chart}: a tick a minute over five minutes");
        assert!(attr(chart, "data-yticks") >= 2.0, "{chart}: a y scale");
    }
    assert!(attr("throughput", "data-max-accepted") > 0.0, "the accepted rate shows the load; status: {status}");
    assert!(attr("throughput", "data-max-applied") > 0.0, "the applied rate shows the processor at work; status: {status}");
    // Units on the y axes, times on the x axes, a legend entry per shard.
    let chart = |id: &str| -> &str {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap();
        &dom[start..start + dom[start..].find("</svg>").unwrap()]
    };
    assert!(chart("throughput").contains("/s</text>"), "{}", chart("throughput"));
    assert!(chart("lag").contains(" ms</text>") || chart("lag").contains(" s</text>"), "{}", chart("lag"));
    assert!(chart("depth").contains("now "), "the time of the newest reading");
    let legend = dom.split("id=\"lag-legend\"").nth(1).and_then(|r| r.split("</div>").next()).unwrap_or("");
    assert_eq!((0..16).filter(|n| legend.contains(&format!("shard {n} "))).count(), 16, "{legend}");
    assert!(dom.contains("<polyline"), "lines are drawn");
    assert!(!dom.contains("class=\"error\""), "the page reports no error:\n{dom}");
    assert!(phone.contains("data-overflow=\"false\""), "nothing is wider than a phone's screen");
}

/// Dead letters: a replay puts a key's writes back in the order they were first
/// accepted, whatever order the ids are given in; purge takes one, a shard's, or all.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_replay_in_order_and_purge() {
    let s = Spillway::builder().vars(&[("max_attempts", "1")]).start().await;
    let auth = format!("Bearer {ADMIN}");
    let admin = [("authorization", auth.as_str())];
    s.db().execute_batch(FAILING_RECORDS).unwrap();
    let mut ids = Vec::new();
    for item in ["a", "b", "c"] {
        let (_, v) = s.write(json!({"key": "list", "op": "append", "field": "l", "value": item})).await;
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Two more dead letters elsewhere, for the purges.
    let mut others = Vec::new();
    for k in ["x", "y"] {
        let (_, v) = s.write(json!({"key": k, "op": "put", "value": 1})).await;
        others.push(v["id"].as_str().unwrap().to_owned());
    }
    s.call("POST", "/v1/drain", None, &admin).await;
    s.call("POST", "/v1/drain", None, &admin).await;
    let (_, _, dead) = s.call("GET", "/v1/dead", None, &admin).await;
    assert_eq!(dead["dead"].as_array().unwrap().len(), 5, "{dead}");
    s.db().execute_batch("DROP TABLE spillway_records").unwrap();

    let reversed: Vec<&String> = ids.iter().rev().collect();
    let (code, _, out) = s.call("POST", "/v1/dead/replay", Some(json!({"ids": reversed})), &admin).await;
    assert_eq!(code, 200, "{out}");
    s.call("POST", "/v1/drain", None, &admin).await;
    let (_, _, v) = s.call("GET", "/v1/records/list", None, &[]).await;
    assert_eq!(v["value"]["l"], json!(["a", "b", "c"]), "replayed in the order first accepted: {v}");

    let shard: u32 = others[0].split('-').next().unwrap().parse().unwrap();
    let (_, _, out) = s.call("POST", "/v1/dead/purge", Some(json!({"shard": shard})), &admin).await;
    assert!(out["purged"].as_array().unwrap().contains(&json!(others[0])), "{out}");
    let (code, _, p) = s.call("POST", "/v1/dead/purge", None, &admin).await;
    assert_eq!(code, 422, "a purge says what it purges: {p}");
    let (_, _, out) = s.call("POST", "/v1/dead/purge", Some(json!({"all": true})), &admin).await;
    let (_, _, dead) = s.call("GET", "/v1/dead", None, &admin).await;
    assert_eq!(dead["dead"], json!([]), "purged all: {out}");
    for id in &others {
        let (_, _, st) = s.call("GET", &format!("/v1/writes/{id}"), None, &[]).await;
        assert_eq!(st["status"], "purged", "{st}");
    }
}

/// Scripts travel by their SHA1 (`EVALSHA`) from an instance's first call:
/// never `SCRIPT LOAD`, and the text itself (`EVAL`) only while Redis does
/// not have it yet (the first calls, those in flight at once included), never
/// again, however many instances run later.
#[tokio::test(flavor = "multi_thread")]
async fn scripts_are_sent_by_their_sha() {
    let s = Spillway::builder().start().await;
    let calls = |cmd: &str| -> (u64, String) {
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut s.redis.conn()).unwrap();
        let n = info
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:"))?.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok())
            .unwrap_or(0);
        (n, info)
    };
    let mut after_first = 0;
    for round in 0..5 {
        for i in 0..4 {
            let (code, v) = s.write(json!({"key": format!("k{i}"), "op": "incr", "field": "n", "by": round})).await;
            assert_eq!(code, 202, "{v}");
        }
        s.drain().await;
        if round == 0 {
            after_first = calls("eval").0;
        }
    }
    let (evals, info) = calls("eval");
    assert_eq!(calls("script").0, 0, "{info}");
    assert!(calls("evalsha").0 >= 20, "{info}");
    assert!(after_first >= 1, "the first calls found no script loaded: {info}");
    assert_eq!(evals, after_first, "no script's text sent again once Redis had it: {info}");
}
