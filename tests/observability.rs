//! Observability: Prometheus's own `promtool` accepts the configuration and the alert rules (and
//! their unit tests), the Grafana dashboard is well-formed, and after a short booking flow every
//! daemon's `/metrics` lints clean and serves every metric the dashboard and the alerts name, so
//! no panel is empty and no alert inert because a name drifted.
//!
//! `promtool` comes from the Debian package `prometheus` (installed by `scripts/test.sh`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestApi, TestEnv, User, ADMIN};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// This checkout, found at run time (a compiled-in path can be another clone's).
fn repo() -> PathBuf {
    common::services::repo_dir()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (Debian package `prometheus`, installed by scripts/test.sh)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn promtool_accepts_the_prometheus_config_the_alert_rules_and_their_unit_tests() {
    // The config names its rule file relatively (`alerts.yml`): promtool resolves it next to the
    // config, as Prometheus does in docker-compose.
    for args in [
        &["check", "config", "prometheus/prometheus.yml"][..],
        &["check", "rules", "prometheus/alerts.yml"][..],
        &["test", "rules", "prometheus/alerts_test.yml"][..],
    ] {
        let (code, out) = promtool(args, None);
        println!("promtool {}:\n{out}", args.join(" "));
        assert_eq!(code, 0, "promtool {} failed:\n{out}", args.join(" "));
    }
    let (_, out) = promtool(&["check", "config", "prometheus/prometheus.yml"], None);
    assert!(out.contains("1 rule files found"), "prometheus.yml loads alerts.yml:\n{out}");
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("grafana/dashboards/booking.json")).unwrap();
    serde_json::from_str(&text).expect("grafana/dashboards/booking.json is valid JSON")
}

/// The PromQL of every query panel of the dashboard.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    out
}

/// The `expr:` of every rule in alerts.yml (one line each, which this reader insists on).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("prometheus/alerts.yml")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, e)) = line.trim_start().split_once("expr:").filter(|(head, _)| head.is_empty()) else { continue };
        let e = e.trim();
        assert!(!e.starts_with('|') && !e.starts_with('>'), "keep each alert expr on one line: {line}");
        let e = e.strip_prefix('"').and_then(|e| e.strip_suffix('"')).or_else(|| e.strip_prefix('\'').and_then(|e| e.strip_suffix('\''))).unwrap_or(e);
        out.push(e.to_string());
    }
    out
}

/// Every alert carries a `runbook` annotation pointing at its own heading under the README's
/// "Operating a sale" (the anchor GitHub derives from `### AlertName`).
#[test]
fn every_alert_has_a_runbook_in_the_readmes_operating_a_sale_section() {
    let rules = std::fs::read_to_string(repo().join("prometheus/alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme.split("\n## Operating a sale\n").nth(1).expect("README has an Operating a sale section");
    let section = section.split("\n## ").next().unwrap();
    let anchors: Vec<String> = section.lines().filter_map(|l| l.strip_prefix("### ")).map(|h| h.trim().to_lowercase()).collect();
    let mut alerts = 0;
    for block in rules.split("- alert: ").skip(1) {
        let name = block.split_whitespace().next().unwrap();
        let want = format!("runbook: \"README.md#{}\"", name.to_lowercase());
        assert!(block.contains(&want), "alert {name} needs the annotation {want}");
        assert!(anchors.contains(&name.to_lowercase()), "README's Operating a sale needs a heading ### {name}");
        alerts += 1;
    }
    assert!(alerts >= 8, "read {alerts} alerts");
}

/// The README's Metrics table: each metric name with the daemons its "served by" column names.
fn readme_catalogue() -> BTreeMap<String, BTreeSet<&'static str>> {
    const DAEMONS: [&str; 4] = ["api", "delay-scheduler", "expirer", "worker"];
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = text.split("\n## Metrics\n").nth(1).expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let served_by = cells[4];
        let daemons: BTreeSet<&str> = if served_by.contains("every daemon") {
            DAEMONS.into_iter().collect()
        } else {
            served_by.split(',').map(|d| d.trim()).map(|d| *DAEMONS.iter().find(|k| **k == d).unwrap_or_else(|| panic!("unknown daemon {d:?} in README row {row}"))).collect()
        };
        for name in cells[1].split(',') {
            out.insert(name.trim().trim_matches('`').to_string(), daemons.clone());
        }
    }
    assert!(out.len() >= 40, "README Metrics table: {out:?}");
    out
}

#[test]
fn the_dashboard_is_grafana_json_with_a_prometheus_query_in_every_panel() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_i64().unwrap() >= 36, "a current dashboard schema");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 20, "the sale needs more than {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(p["id"].as_i64().expect("panel id")), "panel ids are unique ({title})");
        let g = &p["gridPos"];
        assert!(g["w"].as_i64().is_some_and(|w| (1..=24).contains(&w)) && g["h"].as_i64().is_some() && g["x"].as_i64().is_some() && g["y"].as_i64().is_some(), "gridPos of {title}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "panel {title} uses the provisioned data source");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has targets"));
        assert!(!targets.is_empty(), "panel {title} has targets");
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "a query in {title}");
            assert_eq!(t["datasource"]["uid"], "prometheus", "query of {title}");
            assert!(t["refId"].as_str().is_some(), "refId in {title}");
            queries += 1;
        }
    }
    assert!(queries >= 40, "{queries} queries");
    // The provisioning points Grafana at the folder the dashboard lives in, and at the data
    // source uid the panels use.
    let prov = std::fs::read_to_string(repo().join("grafana/provisioning/dashboards/booking.yml")).unwrap();
    assert!(prov.contains("path: /var/lib/grafana/dashboards"));
    let ds = std::fs::read_to_string(repo().join("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(ds.contains("uid: prometheus"));
}

/// A metric named in a query, with the equality matchers written next to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Reference {
    metric: String,
    matchers: Vec<(String, String)>,
}

/// Reads the metric names out of a PromQL expression: identifiers that are not followed by `(`
/// (functions, aggregations) and are not keywords; the label lists of `by (…)` / `on (…)` and
/// the contents of `[…]` and strings are skipped. Histogram series suffixes are stripped.
fn metrics_in(expr: &str) -> Vec<Reference> {
    // Aggregations may be followed by `by (…)` instead of their `(`.
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "inf", "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar",
        "count", "count_values", "bottomk", "topk", "quantile",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let c: Vec<char> = expr.chars().collect();
    let mut out: Vec<Reference> = Vec::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < c.len() && c[*i] != close {
            *i += 1;
        }
        *i += 1;
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '[' {
            skip_to(&mut i, ']');
        } else if ch == '{' {
            let start = i + 1;
            let mut j = start;
            let mut in_str = false;
            while j < c.len() && (in_str || c[j] != '}') {
                if c[j] == '"' {
                    in_str = !in_str;
                }
                j += 1;
            }
            let body: String = c[start..j.min(c.len())].iter().collect();
            if let Some(last) = out.last_mut() {
                last.matchers = equality_matchers(&body);
            }
            i = j + 1;
        } else if ch.is_ascii_digit() || (ch == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                i += 1;
            }
        } else if ch == '$' {
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut k = i;
            while k < c.len() && c[k].is_whitespace() {
                k += 1;
            }
            let call = k < c.len() && c[k] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = k;
                    skip_to(&mut i, ')');
                }
            } else if !call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                out.push(Reference { metric: base_name(&word).to_string(), matchers: Vec::new() });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// `a="x", b=~"y"` → `[(a, x)]`: only `=` matchers name one value that must exist.
fn equality_matchers(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim().trim_start_matches(',').trim().trim_end_matches('!').to_string();
        let negated = rest[..eq].trim_end().ends_with('!');
        let after = &rest[eq + 1..];
        let regex = after.starts_with('~');
        let after = after.trim_start_matches('~').trim_start();
        let Some(q) = after.chars().next() else { break };
        let value_end = after[1..].find(q).map(|e| e + 1).unwrap_or(after.len());
        let value = after[1..value_end].to_string();
        if !negated && !regex {
            out.push((name, value));
        }
        rest = &after[(value_end + 1).min(after.len())..];
    }
    out
}

fn base_name(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(b) = series.strip_suffix(suffix) {
            return b;
        }
    }
    series
}

#[test]
fn the_promql_reader_finds_metric_names_and_nothing_else() {
    let refs = metrics_in(r#"histogram_quantile(0.99, sum by (le, path) (rate(expiry_lateness_seconds_bucket{path="pipeline",le=~".*"}[$__rate_interval]))) > 1e3"#);
    assert_eq!(refs, vec![Reference { metric: "expiry_lateness_seconds".into(), matchers: vec![("path".into(), "pipeline".into())] }]);
    let refs = metrics_in(r#"sum(rate(http_requests_total{status=~"5.."}[5m])) / sum(rate(http_requests_total[5m])) > 0.05 and on (job) up == 1"#);
    let names: Vec<_> = refs.iter().map(|r| r.metric.as_str()).collect();
    assert_eq!(names, ["http_requests_total", "http_requests_total", "up"]);
    assert!(refs[0].matchers.is_empty());
    assert_eq!(metrics_in("max by (group, topic, partition) (kafka_consumer_lag) > 1000")[0].metric, "kafka_consumer_lag");
    assert_eq!(metrics_in(r#"min by (job, dependency) (dependency_up{dependency!="redis"})"#)[0].matchers, vec![]);
}

/// One scrape: metric families (from `# TYPE`) and the label sets of their series.
#[derive(Default, Debug, Clone)]
struct Scrape {
    types: BTreeMap<String, String>,
    series: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut it = t.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    s.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = base_name(&line[..name_end]).to_string();
            let mut labels = BTreeMap::new();
            if line[name_end..].starts_with('{') {
                let c: Vec<char> = line[name_end + 1..].chars().collect();
                let mut i = 0;
                while i < c.len() && c[i] != '}' {
                    let start = i;
                    while c[i] != '=' {
                        i += 1;
                    }
                    let key: String = c[start..i].iter().collect();
                    i += 2; // ="
                    let mut value = String::new();
                    while c[i] != '"' {
                        if c[i] == '\\' {
                            i += 1;
                        }
                        value.push(c[i]);
                        i += 1;
                    }
                    i += 1;
                    if i < c.len() && c[i] == ',' {
                        i += 1;
                    }
                    labels.insert(key.trim().to_string(), value);
                }
            }
            s.series.entry(name).or_default().push(labels);
        }
        s
    }

    /// Sum of a metric's series whose labels include `with` (for `_count` of a histogram, pass
    /// the series name with its suffix).
    fn value(text: &str, series: &str, with: &[(&str, &str)]) -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(series) && matches!(l.as_bytes().get(series.len()), Some(b'{') | Some(b' ')))
            .filter(|l| with.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The four daemons of one test environment; killed on drop if the test fails midway.
struct Daemons {
    children: Vec<(&'static str, Child, u16, PathBuf)>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, child, _, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Daemons {
    fn port(&self, name: &str) -> u16 {
        self.children.iter().find(|(n, ..)| *n == name).unwrap().2
    }

    async fn scrape(&self, name: &str) -> String {
        let r = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port(name))).await.unwrap();
        assert_eq!(r.status(), 200, "{name} /metrics");
        r.text().await.unwrap()
    }

    async fn scrape_all(&self) -> BTreeMap<&'static str, String> {
        let mut out = BTreeMap::new();
        for (name, ..) in &self.children {
            out.insert(*name, self.scrape(name).await);
        }
        out
    }

    fn logs(&self) -> String {
        self.children.iter().map(|(_, _, _, log)| log.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_booking_flow_every_daemon_lints_clean_and_serves_every_metric_of_the_dashboard_and_alerts() {
    let env = TestEnv::new().await;
    let api_port = free_port();
    let bins: [(&'static str, &str, Vec<String>); 4] = [
        ("api", env!("CARGO_BIN_EXE_api"), vec![
            "--listen".into(), format!("127.0.0.1:{api_port}"),
            "--queue-secret".into(), "s".into(),
            "--admin-token".into(), ADMIN.into(),
            "--queue-tick".into(), "100ms".into(),
            "--outbox-poll-interval".into(), "200ms".into(),
            // Short enough that one hold of the flow expires through the pipeline.
            "--hold-ttl".into(), "3s".into(),
        ]),
        ("delay-scheduler", env!("CARGO_BIN_EXE_delay-scheduler"), vec!["--group".into(), format!("{}delay-scheduler", env.prefix)]),
        ("expirer", env!("CARGO_BIN_EXE_expirer"), vec!["--group".into(), format!("{}expirer", env.prefix), "--outbox-poll-interval".into(), "200ms".into()]),
        ("worker", env!("CARGO_BIN_EXE_worker"), vec![
            "--group-prefix".into(), format!("{}w-", env.prefix),
            "--export-sink".into(), format!("file:{}/export-{}.jsonl", std::env::temp_dir().display(), env.prefix),
            "--delivery-poll-interval".into(), "200ms".into(),
        ]),
    ];
    let mut daemons = Daemons { children: Vec::new() };
    for (name, path, extra) in bins {
        let port = free_port();
        let mut args = env.common_args();
        args.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{port}")]);
        args.extend(extra);
        let log = std::env::temp_dir().join(format!("observability-{}{name}.log", env.prefix));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(path).args(&args).stdout(out.try_clone().unwrap()).stderr(out).spawn().expect("binary starts");
        daemons.children.push((name, child, port, log));
    }
    println!("daemon logs: {}", daemons.logs());
    let http = reqwest::Client::new();
    for (name, _, port, _) in &daemons.children {
        let url = format!("http://127.0.0.1:{port}/health");
        common::eventually(Duration::from_secs(30), || {
            let (http, url) = (http.clone(), url.clone());
            async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
        println!("{name} healthy");
    }

    // What each daemon serves before any traffic: the zero-registered counters. Their label sets
    // must be the ones the code really uses, or the flow below creates new series next to them.
    let at_start: BTreeMap<_, _> = daemons.scrape_all().await.into_iter().map(|(n, t)| (n, Scrape::parse(&t))).collect();

    // The short booking flow: a user charges points, a concert with two seats is created, the user
    // queues until active, holds both seats, tries to hold a held seat again, and pays one (the
    // other expires through the scheduler and the expirer).
    let api = TestApi { base: format!("http://127.0.0.1:{api_port}"), metrics_url: None, http: reqwest::Client::new(), shutdown: CancellationToken::new(), handle: None };
    let alice: User = api.user("alice").await;
    api.charge(&alice, 10_000).await;
    let (schedule, seats) = api.concert(2, 1_000).await;
    let token = api.active_token(&alice, &schedule).await;
    let r = api.hold(&alice, &token, &seats[0]).await;
    assert_eq!(r.status(), 201);
    let held: Value = r.json().await.unwrap();
    assert_eq!(api.hold(&alice, &token, &seats[1]).await.status(), 201);
    assert_eq!(api.hold(&alice, &token, &seats[0]).await.status(), 409);
    // Paying frees the user's queue place, so it comes last.
    let r = api.pay(&alice, &Uuid::new_v4().to_string(), held["reservationId"].as_str().unwrap()).await;
    assert_eq!(r.status(), 201);

    // Until the flow's effects reached every daemon: the expiry went through the pipeline, the
    // payment was exported and the notifications were delivered.
    let d = &daemons;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.scrape("delay-scheduler").await;
        let e = d.scrape("expirer").await;
        let w = d.scrape("worker").await;
        let progress = [
            ("scheduler_publish_lateness_seconds_count", Scrape::value(&s, "scheduler_publish_lateness_seconds_count", &[]), 1.0),
            ("expiry_lateness_seconds_count{path=pipeline}", Scrape::value(&e, "expiry_lateness_seconds_count", &[("path", "pipeline")]), 1.0),
            ("expiry_message_lateness_seconds_count", Scrape::value(&e, "expiry_message_lateness_seconds_count", &[]), 1.0),
            ("exports_total", Scrape::value(&w, "exports_total", &[]), 1.0),
            ("notifications_delivered_total", Scrape::value(&w, "notifications_delivered_total", &[]), 3.0),
        ];
        if progress.iter().all(|(_, v, want)| v >= want) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the flow did not reach every daemon within 60 s: {progress:?}\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Consumer lag comes from rdkafka statistics every few seconds, once a member has its
    // partitions: wait until every daemon that consumes has reported it.
    let lag_seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let all = daemons.scrape_all().await;
            if ["delay-scheduler", "expirer", "worker"].iter().all(|n| all.get(n).is_some_and(|t| t.contains("kafka_consumer_lag{"))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .is_ok();

    assert!(lag_seen, "every consuming daemon reports kafka_consumer_lag from librdkafka statistics");

    let scrapes = daemons.scrape_all().await;
    let mut served: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    let mut lint_failures = Vec::new();
    for (name, text) in &scrapes {
        // promtool: exit 1 is a parse error, exit 3 a lint problem (naming conventions, missing
        // HELP…). Both fail the test; this output is clean, keep it so.
        let (code, out) = promtool(&["check", "metrics"], Some(text));
        if !out.trim().is_empty() {
            println!("promtool check metrics ({name}):\n{out}");
        }
        if code != 0 {
            lint_failures.push(format!("{name}: exit {code}: {out}"));
        }
        let parsed = Scrape::parse(text);
        for (metric, sets) in parsed.series {
            served.entry(metric).or_default().extend(sets);
        }
        // Zero-registered series keep their identity: nothing the flow produced for these
        // counters is a label set that describe_metrics did not announce.
        for metric in ["holds_total", "payments_total", "expiry_transitions_total", "notifications_stored_total", "kafka_messages_processed_total", "kafka_dead_letters_total", "kafka_handler_retries_total"] {
            let before = at_start[name].series.get(metric).cloned().unwrap_or_default();
            for labels in Scrape::parse(text).series.get(metric).into_iter().flatten() {
                assert!(before.contains(labels), "{name} serves {metric}{labels:?}, which describe_metrics did not register at start ({before:?})");
            }
        }
    }
    assert!(lint_failures.is_empty(), "promtool check metrics:\n{}", lint_failures.join("\n"));

    // Every metric named by the dashboard and the alerts is served by some daemon, with the label
    // values the queries select.
    let mut references: BTreeMap<Reference, BTreeSet<String>> = BTreeMap::new();
    for (origin, exprs) in [("grafana/dashboards/booking.json", dashboard_exprs(&dashboard())), ("prometheus/alerts.yml", alert_exprs())] {
        assert!(!exprs.is_empty(), "{origin} has queries");
        for e in exprs {
            for r in metrics_in(&e) {
                references.entry(r).or_default().insert(format!("{origin}: {e}"));
            }
        }
    }
    let mut missing = Vec::new();
    let mut checked = BTreeSet::new();
    for (r, uses) in &references {
        // `up` is written by Prometheus itself for each scrape, not served by a daemon.
        if r.metric == "up" {
            continue;
        }
        checked.insert(r.metric.clone());
        match served.get(&r.metric) {
            None => missing.push(format!("{} is not served (used by {uses:?})", r.metric)),
            Some(sets) => {
                for (k, v) in &r.matchers {
                    if !sets.iter().any(|l| l.get(k) == Some(v)) {
                        missing.push(format!("{}{{{k}=\"{v}\"}} is not served (used by {uses:?})", r.metric));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "the dashboard or the alerts name what no daemon serves:\n{}", missing.join("\n"));

    // The README catalogue is the truth about what each daemon serves: same names, same daemons.
    let mut by_daemon: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for (name, text) in &scrapes {
        for metric in Scrape::parse(text).types.keys() {
            by_daemon.entry(metric.clone()).or_default().insert(name);
        }
    }
    let catalogue = readme_catalogue();
    for (metric, daemons) in &catalogue {
        assert_eq!(by_daemon.get(metric), Some(daemons), "README says {metric} is served by {daemons:?}");
    }
    for metric in by_daemon.keys() {
        assert!(catalogue.contains_key(metric), "{metric} is served but missing from the README's Metrics table");
    }
    assert!(checked.len() >= 40, "checked only {} metrics: {checked:?}", checked.len());
    println!("checked {} metrics named by the dashboard and the alerts: {checked:?}", checked.len());

    // Shut down as deployed: SIGTERM, then a clean exit.
    for (name, child, ..) in &mut daemons.children {
        assert!(Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{name} exit status {status}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{name} did not exit within 15 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (_, _, _, log) in &daemons.children {
        let _ = std::fs::remove_file(log);
    }
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("export-{}.jsonl", env.prefix)));
}
