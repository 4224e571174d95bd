//! The tools operators already run: a real Prometheus (Debian's `prometheus`
//! 2.42, started here on loopback) scrapes Spillway and evaluates the shipped
//! alert rules; `promtool` lints the metrics and unit-tests the rules; the
//! Grafana dashboard's queries run on that Prometheus.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::spillway::{ADMIN, FAILING_RECORDS, Spillway};
use crate::support::{eventually, free_port, workspace};

/// A Prometheus server scraping one target every second with the admin
/// token, with the shipped alert rules loaded (evaluated every second).
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = workspace().join("deploy/prometheus/spillway-alerts.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             \x20 - job_name: spillway\n\
             \x20   metrics_path: /metrics\n\
             \x20   authorization: {{credentials: {ADMIN:?}}}\n\
             \x20   static_configs: [{{targets: [\"{target}\"]}}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian: apt-get install prometheus)");
        let p = Prometheus { child, port, _dir: dir };
        eventually("Prometheus is ready", Duration::from_secs(30), async || p.get("/-/ready").await.is_some_and(|(code, _)| code == 200)).await;
        p
    }

    /// A GET on its HTTP API: the status and body (`None`: not listening).
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.ok()?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let code = head.split(' ').nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    }

    /// An API call's `data`, asserting it succeeded.
    async fn api(&self, path: &str) -> Value {
        let (code, body) = self.get(path).await.expect("Prometheus answers");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!((code, &v["status"]), (200, &json!("success")), "{path}: {body}");
        v["data"].clone()
    }

    /// An instant PromQL query's result vector.
    async fn query(&self, promql: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", encode(promql))).await["result"].as_array().cloned().unwrap_or_default()
    }

    /// A query's single value (`None`: no result).
    async fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        assert!(result.len() <= 1, "{promql}: {result:?}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `promql` gives `want`.
    async fn until(&self, promql: &str, want: f64) {
        eventually(&format!("{promql} == {want}"), Duration::from_secs(20), async || self.value(promql).await == Some(want)).await;
    }

    /// The alerts pending or firing: (name, shard label, state).
    async fn alerts(&self) -> BTreeSet<(String, String, String)> {
        let data = self.api("/api/v1/alerts").await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_owned();
                (label("alertname"), label("shard"), a["state"].as_str().unwrap().to_owned())
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// The `spillway_*` metric names `text` mentions (recording rules'
/// `spillway:` names left out), a histogram's series by its family's name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("spillway_") {
        let before = rest[..at].chars().last();
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).filter(|f| f.ends_with("_seconds"));
        out.insert(family.unwrap_or(&name).to_owned());
    }
    out
}

/// The metric families `/metrics` declares (`# TYPE name kind`).
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_owned)).collect()
}

/// Runs `promtool` with `args` (and `stdin`), asserting it succeeds; its output.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .current_dir(workspace())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian: apt-get install prometheus)");
    let mut input = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The shipped alert rules are valid and pass their unit tests (each alert
/// fires on synthetic series where it should and stays quiet where it
/// should not).
#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "deploy/prometheus/spillway-alerts.yml"], None);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "deploy/prometheus/spillway-alerts.test.yml"], None);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a test that expects it to fire, and a runbook in the README.
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(workspace().join("deploy/prometheus/spillway-alerts.yml")).unwrap()).unwrap();
    let tests = std::fs::read_to_string(workspace().join("deploy/prometheus/spillway-alerts.test.yml")).unwrap();
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let alerts: Vec<&str> = rules["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap()).filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    for alert in alerts {
        assert!(tests.contains(&format!("alertname: {alert}\n        exp_alerts:")), "{alert} is tested firing");
        assert!(readme.contains(&format!("#### {alert}\n")), "{alert} has a runbook in the README");
    }
}

/// A real Prometheus scrapes `/metrics` during a known workload: its queries
/// give the counts (accepted, applied, rejected, dead letters, refused), the
/// depth and lag of the one shard left waiting, and non-zero rates; the
/// metrics pass `promtool check metrics`; the shipped rules evaluate
/// without error on the real series (dead letters fire, the unheld lease is
/// pending); every query of the Grafana dashboard runs, and every metric the
/// rules and the dashboard name is one the app exports.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_workload_and_evaluates_the_rules() {
    let s = Arc::new(Spillway::builder().vars(&[("max_attempts", "1"), ("queue_depth_limit", "8")]).start().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(s.app.clone().serve(listener));
    let prom = Prometheus::start(addr).await;
    prom.until("up{job=\"spillway\"}", 1.0).await;
    // Every counter is scraped at 0 before the workload, so that its
    // increases are seen.
    prom.until("sum(spillway_writes_accepted_total)", 0.0).await;

    // Two writes the database refuses (dead letters after one failed delivery).
    s.db().execute_batch(FAILING_RECORDS).unwrap();
    for i in 0..2 {
        let (code, v) = s.write(json!({"key": format!("doomed{i}"), "op": "put", "value": i})).await;
        assert_eq!(code, 202, "{v}");
    }
    s.drain().await;
    s.drain().await;
    s.db().execute_batch("DROP TABLE spillway_records").unwrap();
    // 12 applied (three rounds of four keys), 2 rejected (past their minimum).
    for round in 0..3 {
        let writes: Vec<Value> = (0..4).map(|k| json!({"key": format!("k{k}"), "op": "incr", "field": "n", "by": round + 1})).collect();
        let (code, v) = s.write(json!({"writes": writes})).await;
        assert_eq!(code, 202, "{v}");
        s.drain().await;
    }
    for _ in 0..2 {
        s.write(json!({"key": "k0", "op": "incr", "field": "n", "by": -100, "min": 0})).await;
        s.drain().await;
    }
    // One shard left waiting: 8 writes, its limit, and a ninth refused.
    for i in 0..8 {
        let (code, v) = s.write(json!({"key": "waiting", "op": "put", "value": i})).await;
        assert_eq!(code, 202, "{v}");
    }
    let (code, v) = s.write(json!({"key": "waiting", "op": "put", "value": 8})).await;
    assert_eq!((code, v["type"].as_str()), (429, Some(format!("{}queue-full", spillway_core::problem::TYPE_BASE).as_str())), "{v}");
    let shard = crate::support::layout().shard_of("waiting").to_string();

    for (promql, want) in [
        ("sum(spillway_writes_accepted_total)", 24.0),
        ("sum(spillway_writes_applied_total)", 12.0),
        ("sum(spillway_writes_rejected_total)", 2.0),
        ("sum(spillway_writes_dead_total)", 2.0),
        ("sum(spillway_dead_letters)", 2.0),
        ("sum(spillway_queue_depth)", 8.0),
        (&format!("spillway_queue_depth{{shard=\"{shard}\"}}"), 8.0),
        ("spillway_intake_refused_total{reason=\"queue-full\"}", 1.0),
        ("spillway_write_apply_delay_seconds_count", 14.0),
        ("count(spillway_queue_depth)", 16.0),
    ] {
        prom.until(promql, want).await;
    }
    // The waiting shard's lag grows; the others have none.
    let lag = format!("spillway_oldest_unapplied_age_seconds{{shard=\"{shard}\"}}");
    let first = prom.value(&lag).await.unwrap();
    assert!(first > 0.0, "{lag} = {first}");
    eventually("the lag grows", Duration::from_secs(10), async || prom.value(&lag).await.unwrap() > first).await;
    assert_eq!(prom.value(&format!("max(spillway_oldest_unapplied_age_seconds{{shard!=\"{shard}\"}})")).await, Some(0.0));
    // Rates over the last minute: writes came in, and were applied.
    for rate in ["sum(rate(spillway_writes_accepted_total[1m]))", "sum(rate(spillway_writes_applied_total[1m]))"] {
        let r = prom.value(rate).await.unwrap();
        assert!(r > 0.0 && r < 24.0, "{rate} = {r}");
    }

    // The shipped rules on the real series: all evaluated without error;
    // dead letters fire at once; the shard with writes and no lease holder
    // is pending (its alert waits 2 minutes).
    eventually("the rules are evaluated", Duration::from_secs(20), async || {
        let groups = prom.api("/api/v1/rules").await;
        let rules: Vec<Value> = groups["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect();
        assert!(rules.iter().all(|r| r["health"] != "err"), "{rules:?}");
        rules.len() == 10 && rules.iter().all(|r| r["health"] == "ok")
    })
    .await;
    eventually("the dead letters and the unheld lease are alerted", Duration::from_secs(20), async || {
        let alerts = prom.alerts().await;
        alerts.iter().any(|(name, _, state)| name == "SpillwayDeadLetters" && state == "firing")
            && alerts.contains(&("SpillwayLeaseUnheld".into(), shard.clone(), "pending".into()))
    })
    .await;
    // And nothing else but what this workload should raise: the refused
    // write (pending for 5 minutes), and the test Redis's missing AOF if
    // the app reports it (pending for 5 minutes).
    let (_, _, stats) = s.admin("GET", "/v1/stats", None).await;
    let no_aof = stats["hazards"].as_array().unwrap().iter().any(|h| h.as_str().unwrap().contains("appendonly is off"));
    let mut expected = BTreeSet::from([
        ("SpillwayDeadLetters", "firing"),
        ("SpillwayLeaseUnheld", "pending"),
        ("SpillwayIntakeRefusing", "pending"),
    ]);
    if no_aof {
        expected.insert(("SpillwayRedisHazard", "pending"));
    }
    eventually("the alerts this workload raises, and no other", Duration::from_secs(20), async || {
        let alerts = prom.alerts().await;
        let got: BTreeSet<(&str, &str)> = alerts.iter().map(|(n, _, state)| (n.as_str(), state.as_str())).collect();
        assert!(got.is_subset(&expected), "{alerts:?}");
        got == expected
    })
    .await;

    // The text passes promtool's lint (help, types, units, `_total`).
    let (code, _, _) = s.call("GET", "/metrics", None, &[]).await;
    assert_eq!(code, 401, "the metrics need the token");
    let res = s
        .app
        .handle(http::Request::get("http://127.0.0.1:3000/metrics").header("authorization", format!("Bearer {ADMIN}")).body(bytes::Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let metrics = String::from_utf8(res.body().to_vec()).unwrap();
    let lint = promtool(&["check", "metrics"], Some(&metrics));
    assert_eq!(lint.trim(), "", "promtool check metrics has something to say");

    // The rules and the dashboard name only metrics the app exports.
    let exported = exported(&metrics);
    let rules = std::fs::read_to_string(workspace().join("deploy/prometheus/spillway-alerts.yml")).unwrap();
    let dashboard_text = std::fs::read_to_string(workspace().join("deploy/grafana/spillway.json")).unwrap();
    for (what, text) in [("the alert rules", &rules), ("the dashboard", &dashboard_text)] {
        let named = metric_names(text);
        assert!(named.len() >= 8, "{what}: {named:?}");
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(unknown.is_empty(), "{what} name metrics the app does not export: {unknown:?} (exported: {exported:?})");
    }
    // Each dashboard query runs on Prometheus (Grafana's variables given as
    // Grafana would); those of the throughput and the waiting shard's depth
    // have data.
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap();
    check_dashboard(&dashboard);
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$instance", ".*").replace("$__rate_interval", "1m");
            let result = prom.query(&expr).await;
            let title = panel["title"].as_str().unwrap();
            if ["Throughput", "Queue depth per shard", "Dead letters", "Intake refusals"].contains(&title) {
                assert!(!result.is_empty(), "{title}: {expr} has no data");
            }
        }
    }
    server.abort();
}

/// The dashboard is importable as Grafana has it: the data source a variable
/// every panel and query uses, panels with unique ids, a place on the grid,
/// a unit and at least one query.
fn check_dashboard(d: &Value) {
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"), "{vars:?}");
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert_eq!(p["datasource"], ds, "{title}");
        assert!(["x", "y", "w", "h"].iter().all(|k| p["gridPos"][k].is_u64()), "{title}");
        assert!(p["fieldConfig"]["defaults"]["unit"].is_string(), "{title} has a unit");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}");
        assert!(targets.iter().all(|t| t["datasource"] == ds && t["expr"].is_string()), "{title}");
    }
    for metric in ["spillway_writes_accepted_total", "spillway_queue_depth", "spillway_oldest_unapplied_age_seconds", "spillway_dead_letters", "spillway_cache_hits_total", "spillway_write_apply_delay_seconds_bucket"] {
        assert!(panels.iter().any(|p| p.to_string().contains(metric)), "a panel shows {metric}");
    }
}

/// The names of `metric_names` as a scraper sees them.
#[test]
fn metric_names_are_found_as_promql_has_them() {
    let text = "sum(rate(spillway_writes_applied_total[5m])) / spillway:cache_reads:rate10m + histogram_quantile(0.9, spillway_write_apply_delay_seconds_bucket) # xspillway_no";
    let names: Vec<String> = metric_names(text).into_iter().collect();
    assert_eq!(names, ["spillway_write_apply_delay_seconds", "spillway_writes_applied_total"]);
}
