//! The operators' files of `ops/`: Prometheus's scrape configuration, the alert rules and their
//! unit tests (`promtool check config`, `check rules`, `test rules`), the Grafana dashboard and
//! its provisioning, and docker-compose's `observe` profile. Every metric a panel or an alert
//! names is one the running workers serve: the workers run against a test NATS and database,
//! each serving `/metrics`, and their scrapes are compared with the queries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::helpers::{next_matching, TestApp, WorkerProcess};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const SETUP: &str = r#"{"tenants":[{"id": "t1", "dispatch_cycle_seconds": 5,
   "channels": [{"id": "mail", "kind": "email", "bot_enabled": false}]}]}"#;

/// The workers as `ops/prometheus/prometheus.yml` labels their targets.
const WORKERS: [&str; 6] = [
    "all-in-one",
    "ingest",
    "bot-router",
    "dispatcher",
    "notifier",
    "api",
];

/// Series Prometheus makes itself, not the workers.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("ops/grafana/dashboards/firstline.json"))
        .expect("the Grafana dashboard is JSON")
}

/// `promtool` (`FL_PROMTOOL`, or on the PATH), or `None` outside CI when it is missing.
fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FL_PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing: scripts/test installs it (apt-get install prometheus)"
        );
        eprintln!(
            "SKIPPED: promtool is not on the PATH and CI is unset \
             (`apt-get install prometheus` brings it; scripts/test does)"
        );
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every PromQL query of the dashboard: (where, query), the template variables' included.
fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target's expr");
            out.push((
                format!(
                    "panel {:?}, query {}",
                    p["title"].as_str().unwrap_or_default(),
                    t["refId"].as_str().unwrap_or_default()
                ),
                expr.to_owned(),
            ));
        }
    }
    out
}

/// The metrics the template variables read (`label_values(<metric>, <label>)`).
fn variable_metrics(d: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
        let (metric, _label) = inner.split_once(',').expect("label_values(metric, label)");
        out.extend(metric_names(metric.trim()));
    }
    out
}

/// The query with Grafana's variables replaced by what PromQL can parse.
fn as_promql(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        out.push_str(if name.starts_with("__") { "5m" } else { ".*" });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The metric names a PromQL expression selects: what is left once strings, label matchers,
/// ranges, grouping label lists, functions, keywords and numbers are taken away.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Operators, and aggregations (`sum by (x) (...)` is a call not followed by its parenthesis).
    const KEYWORDS: [&str; 24] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = as_promql(expr).chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // The grouping keyword just read: its parenthesised list holds labels, not metrics.
    let mut labels_next = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if labels_next => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                labels_next = false;
                i += 1;
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = chars.get(j) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    labels_next = true;
                } else if !call && !KEYWORDS.contains(&lower.as_str()) && lower != "nan" {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let found = metric_names(
        r#"sum by (tenant, le) (rate(fl_a_bucket{tenant=~"$tenant", le=~"30|30\\.0"}[$__rate_interval])) / on(tenant) group_left fl_b > 0.9 unless up{job="x"} == 0 or vector(1) and fl_c offset 5m"#,
    );
    assert_eq!(
        found,
        BTreeSet::from([
            "fl_a_bucket".into(),
            "fl_b".into(),
            "up".into(),
            "fl_c".into()
        ])
    );
    assert_eq!(
        as_promql(r#"x{t=~"$tenant"}[$__rate_interval]"#),
        r#"x{t=~".*"}[5m]"#
    );
}

/// The alerts of `alerts.yml`: (name, expression).
fn alerts() -> Vec<(String, String)> {
    let rules = yaml("ops/prometheus/alerts.yml");
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().expect("alert rules only").to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn promtool_accepts_the_configuration_the_alerts_their_tests_and_the_dashboards_queries() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = root().join("ops/prometheus");
    let config = run_promtool(&promtool, &["check", "config", "prometheus.yml"], &dir);
    assert!(config.contains("1 rule files found"), "{config}");
    let rules = run_promtool(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(
        rules.contains(&format!("{} rules found", alerts().len())),
        "{rules}"
    );
    run_promtool(&promtool, &["test", "rules", "alerts_test.yml"], &dir);

    // Each alert has a case that fires it and one that expects it silent.
    let tests = yaml("ops/prometheus/alerts_test.yml");
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for t in tests["tests"].as_array().unwrap() {
        for case in t["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            let fires = !case["exp_alerts"].as_array().unwrap().is_empty();
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    for (name, _) in alerts() {
        assert_eq!(
            cases.get(&name),
            Some(&(true, true)),
            "{name}: alerts_test.yml needs a case that fires it and one that does not"
        );
    }

    // The dashboard's queries parse as PromQL: promtool checks them as recording rules.
    let d = dashboard();
    let rules: Vec<Value> = dashboard_queries(&d)
        .iter()
        .enumerate()
        .map(|(i, (_, q))| json!({"record": format!("dashboard:query_{i}"), "expr": as_promql(q)}))
        .collect();
    let work = std::env::temp_dir().join(format!("fl-observe-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&work).unwrap();
    // JSON is YAML.
    std::fs::write(
        work.join("dashboard.yml"),
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let checked = run_promtool(&promtool, &["check", "rules", "dashboard.yml"], &work);
    assert!(
        checked.contains(&format!("{} rules found", rules.len())),
        "{checked}"
    );
    std::fs::remove_dir_all(&work).ok();
}

#[test]
fn compose_runs_prometheus_and_grafana_under_the_observe_profile_on_the_files_of_ops() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for (name, service) in services {
        let observe = service["profiles"]
            .as_array()
            .is_some_and(|p| p.contains(&json!("observe")));
        assert_eq!(
            observe,
            name == "prometheus" || name == "grafana",
            "{name}: only prometheus and grafana are in the observe profile"
        );
    }
    for name in ["prometheus", "grafana"] {
        let service = &services[name];
        assert!(
            service["image"].as_str().unwrap().contains(':'),
            "{name}: a pinned image"
        );
        for volume in service["volumes"].as_array().unwrap() {
            let (source, _) = volume.as_str().unwrap().split_once(':').unwrap();
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    root().join(path).exists(),
                    "{name} mounts {source}: missing"
                );
            } else {
                assert!(
                    compose["volumes"].get(source).is_some(),
                    "{name}: volume {source} is not declared"
                );
            }
        }
    }
    let prometheus = &services["prometheus"];
    assert!(prometheus["command"][0]
        .as_str()
        .unwrap()
        .ends_with("/etc/prometheus/prometheus.yml"));
    assert!(prometheus["extra_hosts"]
        .as_array()
        .unwrap()
        .contains(&json!("host.docker.internal:host-gateway")));

    // Prometheus scrapes one target per worker, labelled as the alerts and panels expect.
    let config = yaml("ops/prometheus/prometheus.yml");
    let job = config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_name"] == "firstline")
        .expect("the firstline job");
    let mut labelled = Vec::new();
    for group in job["static_configs"].as_array().unwrap() {
        let worker = group["labels"]["worker"].as_str().unwrap();
        for target in group["targets"].as_array().unwrap() {
            assert!(target
                .as_str()
                .unwrap()
                .starts_with("host.docker.internal:"));
        }
        labelled.push(worker);
        if worker != "all-in-one" {
            assert!(
                root()
                    .join("workers")
                    .join(worker)
                    .join("src/main.rs")
                    .exists(),
                "{worker}: no worker binary of that name"
            );
        }
    }
    assert_eq!(labelled, WORKERS);

    // Grafana reads the Prometheus service by its compose name, under the uid the panels use.
    let sources = yaml("ops/grafana/provisioning/datasources/prometheus.yml");
    let source = &sources["datasources"][0];
    assert_eq!(source["url"], "http://prometheus:9090");
    let d = dashboard();
    assert_eq!(d["uid"], "firstline");
    for p in d["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], source["uid"],
                "panel {}",
                p["title"]
            );
        }
    }
    let providers = yaml("ops/grafana/provisioning/dashboards/firstline.yml");
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana_volumes = services["grafana"]["volumes"].as_array().unwrap();
    assert!(
        grafana_volumes.contains(&json!(format!("./ops/grafana/dashboards:{path}:ro"))),
        "Grafana mounts the dashboards where the provider reads them"
    );
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The series names of a scrape, and the label names they carry.
fn served(body: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for line in body.lines().filter(|l| l.starts_with("fl_")) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        names.insert(line[..end].to_owned());
        if let Some(inner) = line[end..]
            .strip_prefix('{')
            .and_then(|l| l.split_once('}'))
        {
            for pair in inner.0.split(',') {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.to_owned());
                }
            }
        }
    }
    (names, labels)
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_name_is_served_by_the_running_workers() {
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let d = dashboard();
    for (place, query) in dashboard_queries(&d) {
        for m in metric_names(&query) {
            wanted.entry(m).or_default().push(place.clone());
        }
    }
    for m in variable_metrics(&d) {
        wanted
            .entry(m)
            .or_default()
            .push("the tenant variable".into());
    }
    for (alert, expr) in alerts() {
        for m in metric_names(&expr) {
            wanted.entry(m).or_default().push(format!("alert {alert}"));
        }
    }
    for own in PROMETHEUS_OWN {
        assert!(wanted.remove(own).is_some(), "{own} is used");
    }
    assert!(wanted.len() >= 10, "{wanted:?}");

    // The workers, each its own process serving /metrics; the API in this process.
    let mut app = TestApp::without_workers(SETUP).await;
    let mut endpoints = Vec::new();
    let mut processes = Vec::new();
    for name in [
        "firstline-ingest",
        "firstline-bot-router",
        "firstline-dispatcher",
        "firstline-notifier",
    ] {
        let addr = free_addr();
        let metrics = addr.to_string();
        processes.push(WorkerProcess::start_with(
            name,
            &app.config,
            &[("FL_METRICS_ADDR", metrics.as_str())],
        ));
        endpoints.push((name, addr));
    }
    let api_metrics = free_addr();
    firstline_shared::metrics::serve(api_metrics).unwrap();
    endpoints.push(("firstline-api", api_metrics));
    let api = app.start_api().await;

    // What moves every metric: a webhook delivered, an offer accepted, one left to expire,
    // a message dead-lettered.
    let receiver = axum::Router::new().route("/hook", post(|| async { StatusCode::OK }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let admin = app.token("t1", "admin", None).await;
    let (status, body) = api
        .post("/api/v1/webhooks", &admin, json!({"url": hook}))
        .await;
    assert_eq!(status, 201, "{body}");
    let mut amy = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    app.customer_says("t1", "mail", "M1", "help").await;
    let offer = next_matching(&mut amy, "the first offer", |v| v["type"] == "offer").await;
    let first: Uuid = offer["conversation_id"].as_str().unwrap().parse().unwrap();
    app.agent_does("t1", "amy", "accept", first, json!({}))
        .await;
    app.wait_for_state("t1", "mail", "M1", "processing").await;
    // M2's offer is not accepted: it expires after the 5-second dispatch cycle.
    app.customer_says("t1", "mail", "M2", "help too").await;
    app.publish_json("fl.t1.inbound.mail", None, "{not json")
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (names, labels) = loop {
        let mut names = BTreeSet::new();
        let mut labels = BTreeSet::new();
        for (_, addr) in &endpoints {
            if let Some(body) = scrape(*addr).await {
                let (n, l) = served(&body);
                names.extend(n);
                labels.extend(l);
            }
        }
        let missing: BTreeMap<_, _> = wanted.iter().filter(|(m, _)| !names.contains(*m)).collect();
        if missing.is_empty() {
            break (names, labels);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not served by any worker (metric: where it is used): {missing:#?}\nserved: {names:?}"
        );
        // The poll interval of this wait, which reports the metrics still missing.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(wanted.keys().all(|m| names.contains(m)));
    // The labels Prometheus adds itself are not the workers' (they would be renamed).
    for own in ["worker", "instance", "job"] {
        assert!(!labels.contains(own), "a worker serves a {own:?} label");
    }
    // The service level alert and panel read the 30-second bucket.
    let dispatcher = scrape(endpoints[2].1).await.unwrap();
    assert!(
        dispatcher
            .lines()
            .any(|l| l.starts_with("fl_enqueue_to_offer_seconds_bucket{")
                && l.contains(r#"le="30""#)),
        "{dispatcher}"
    );
    drop(processes);
}
