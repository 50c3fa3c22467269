//! `/metrics` on the operator listener: who may read it, that the figures are the
//! fleet's as the database holds them and scoped by the reader's tenants, that the text
//! is well-formed, and a real Prometheus scraping it over TLS with a bearer token and
//! answering a PromQL query with the fleet score the server computed.

mod common;
mod console_fleet;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestResult;
use compliance_agent::evidence::Check;
use console_fleet::{Fleet, browserless, deliver, result};
use mcp_server::auth::Caller;
use mcp_server::config::MetricsAccess;

fn metrics(fleet: &Fleet, token: Option<&str>) -> console_fleet::Answer {
    let agent = browserless(&fleet.server.ca_pem());
    let mut req = agent.get(&format!("{}/metrics", fleet.ops_url()));
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(mut r) => console_fleet::Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        },
        Err(e) => panic!("GET /metrics: {e}"),
    }
}

/// Samples by their full series text (`name{labels}`), checking on the way that the text
/// is well-formed: every sample follows the TYPE line of its family, and each family
/// appears once, its samples together.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut family: Option<(String, String)> = None;
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            assert!(seen.insert(name.to_owned()), "family {name} appears twice");
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line {line:?}"));
        let name = series.split('{').next().unwrap_or("");
        let (fam, kind) = family
            .clone()
            .unwrap_or_else(|| panic!("{name} before any TYPE line"));
        let base = if kind == "histogram" {
            name.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
        } else {
            name
        };
        assert_eq!(base, fam, "sample {name} outside its family");
        out.insert(
            series.to_owned(),
            value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{line}: {e}")),
        );
    }
    out
}

/// Reading the metrics needs an operator token (refusals audited); what they say is the
/// database's fleet state, within the reader's tenants.
#[test]
fn metrics_need_a_token_and_cover_the_readers_tenants() -> TestResult {
    let fleet = Fleet::start();
    let a = metrics(&fleet, None);
    assert_eq!(a.status, 401, "{}", a.body);
    let a = metrics(&fleet, Some("mcpo1_not-a-token"));
    assert_eq!(a.status, 401, "{}", a.body);
    let refused = fleet
        .server
        .svc()
        .store
        .audit(&Caller::local("t"), 100)?
        .iter()
        .filter(|e| e.action == "metrics.read" && e.outcome == "refused")
        .count();
    assert_eq!(refused, 2, "both refusals are audited");

    let a = metrics(&fleet, Some(&fleet.alice.token));
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.header("content-type")
            .starts_with("text/plain; version=0.0.4"),
        "{}",
        a.header("content-type")
    );
    let all = samples(&a.body);
    let want = [
        (
            r#"msp_compliance_score{reseller="acme",site="clinic-1",host="ws-1"}"#,
            75.0,
        ),
        (
            r#"msp_compliance_score{reseller="acme",site="clinic-1",host="ws-2"}"#,
            100.0,
        ),
        (
            r#"msp_compliance_score{reseller="other",site="dental-9",host="ws-1"}"#,
            0.0,
        ),
        ("msp_fleet_compliance_score", 175.0 / 3.0),
        (
            r#"msp_control_status{reseller="acme",site="clinic-1",host="ws-1",check="firewall",control="164.312(e)(1)"}"#,
            2.0,
        ),
        (
            r#"msp_control_status{reseller="acme",site="clinic-1",host="ws-1",check="backup",control="164.308(a)(7)(ii)(A)"}"#,
            0.0,
        ),
        (
            r#"msp_incidents_total{type="firewall",severity="unrated"}"#,
            1.0,
        ),
        (
            r#"msp_incidents_total{type="backup",severity="unrated"}"#,
            1.0,
        ),
        (r#"msp_remediations_total{status="awaiting_approval"}"#, 2.0),
        ("msp_remediation_duration_seconds_count", 0.0),
        (r#"msp_evidence_bundles_total{signed="true"}"#, 6.0),
        (r#"msp_evidence_bundles_total{signed="false"}"#, 0.0),
        (
            r#"msp_host_evidence_bundles_total{reseller="acme",site="clinic-1",host="ws-1"}"#,
            4.0,
        ),
        (
            r#"msp_chain_gaps{reseller="acme",site="clinic-1",host="ws-1"}"#,
            0.0,
        ),
        (
            r#"msp_host_overdue{reseller="other",site="dental-9",host="ws-1"}"#,
            0.0,
        ),
        ("msp_hosts_overdue", 0.0),
        (r#"msp_hosts{state="active"}"#, 3.0),
        (r#"msp_intake_bundles_total{result="stored"}"#, 6.0),
        ("msp_archive_errors_total", 0.0),
    ];
    for (series, value) in want {
        let got = all.get(series).copied();
        assert!(
            got.is_some_and(|g| (g - value).abs() < 1e-9),
            "{series} = {value}, got {got:?} in\n{}",
            a.body
        );
    }

    // A reseller operator's Prometheus sees that reseller's fleet only.
    let rita = metrics(&fleet, Some(&fleet.rita.token));
    assert_eq!(rita.status, 200);
    assert!(
        !rita.body.contains("dental-9") && !rita.body.contains("\"other\""),
        "nothing of other's:\n{}",
        rita.body
    );
    let mine = samples(&rita.body);
    assert_eq!(
        mine.get(r#"msp_evidence_bundles_total{signed="true"}"#)
            .copied(),
        Some(5.0)
    );
    assert_eq!(mine.get("msp_fleet_compliance_score").copied(), Some(87.5));
    assert!(
        !mine.contains_key(r#"msp_incidents_total{type="backup",severity="unrated"}"#),
        "other's incident is not acme's"
    );
    Ok(())
}

/// `access = "loopback"` serves a loopback peer without a token; `off` serves nothing;
/// loopback access on a listener other machines reach is a configuration error.
#[test]
fn metrics_access_is_configurable() -> TestResult {
    let fleet = Fleet::start_with(|c| c.metrics.access = MetricsAccess::Loopback);
    let a = metrics(&fleet, None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body.contains("msp_fleet_compliance_score "),
        "the whole fleet"
    );
    let off = Fleet::start_with(|c| c.metrics.access = MetricsAccess::Off);
    assert_eq!(metrics(&off, Some(&off.alice.token)).status, 404);

    let mut config = mcp_server::config::Config::default();
    config.metrics.access = MetricsAccess::Loopback;
    config.operator_listen = ([0, 0, 0, 0], 9443).into();
    let err = config
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("metrics.access") && err.contains("operator_listen"),
        "{err}"
    );
    let parsed: Result<mcp_server::config::Config, _> =
        toml::from_str("[metrics]\naccess = \"public\"\n");
    let err = parsed.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("unknown variant `public`") && err.contains("token"),
        "{err}"
    );
    Ok(())
}

struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_prometheus(dir: &Path, target: &str, ca_pem: &str, token: &str) -> Prometheus {
    let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("prometheus is missing: apt-get install prometheus (tests/run installs it)")
        });
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("ca");
    std::fs::write(dir.join("token"), token).expect("token");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mcp-fleet\n    scheme: https\n    metrics_path: /metrics\n    authorization:\n      type: Bearer\n      credentials_file: {dir}/token\n    tls_config:\n      ca_file: {dir}/ca.pem\n    static_configs:\n      - targets: ['{target}']\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// The value of an instant query with one series, once Prometheus has it.
fn query_until(prom: &Prometheus, query: &str, done: impl Fn(f64) -> bool, log: &Path) -> f64 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(mut r) = agent
            .get(&format!("{}/api/v1/query", prom.url))
            .query("query", query)
            .call()
        {
            last = r.body_mut().read_to_string().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            if let Some(value) = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                && done(value)
            {
                return value;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "prometheus never answered {query}: last answer {last}\nits log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A real Prometheus scrapes `/metrics` over TLS (trusting the server's CA) with an
/// operator token; PromQL through its HTTP API returns the fleet score the server
/// computed from the database, and follows it when the fleet changes.
#[test]
fn prometheus_scrapes_the_fleet_score() -> TestResult {
    let fleet = Fleet::start();
    let dir = tempfile::tempdir()?;
    let target = fleet.server.running.operator_addr().to_string();
    let prom = start_prometheus(
        dir.path(),
        &target,
        &fleet.server.ca_pem(),
        &fleet.alice.token,
    );
    let log = dir.path().join("prometheus.log");
    let computed = |fleet: &Fleet| {
        let hosts = mcp_server::fleet::fleet(
            &*fleet.server.svc().store,
            &Caller::local("t"),
            jiff::Timestamp::now(),
        )
        .expect("fleet");
        mcp_server::metrics::fleet_score(&hosts).expect("a score")
    };
    let expected = computed(&fleet);
    assert!(
        (expected - 175.0 / 3.0).abs() < 1e-9,
        "the fixture's score: {expected}"
    );
    let up = query_until(&prom, "up{job=\"mcp-fleet\"}", |v| v == 1.0, &log);
    assert_eq!(up, 1.0, "the scrape succeeds");
    let got = query_until(&prom, "msp_fleet_compliance_score", |_| true, &log);
    assert!(
        (got - expected).abs() < 1e-9,
        "PromQL answers {got}, the server computed {expected}"
    );
    let host = query_until(
        &prom,
        "msp_compliance_score{site=\"clinic-1\",host=\"ws-1\"}",
        |_| true,
        &log,
    );
    assert_eq!(host, 75.0);
    let acme = query_until(
        &prom,
        "avg by (reseller) (msp_compliance_score{reseller=\"acme\"})",
        |_| true,
        &log,
    );
    assert_eq!(acme, 87.5, "per-reseller aggregation works on the labels");

    // The firewall is fixed on ws-1: the next scrapes show the new fleet score.
    deliver(
        &fleet.server,
        &fleet.acme_a,
        vec![result(
            Check::Firewall,
            true,
            "high",
            "the ruleset matches the baseline",
        )],
    );
    let expected = computed(&fleet);
    assert!((expected - 200.0 / 3.0).abs() < 1e-9, "{expected}");
    let got = query_until(
        &prom,
        "msp_fleet_compliance_score",
        |v| (v - expected).abs() < 1e-9,
        &log,
    );
    assert!(
        (got - expected).abs() < 1e-9,
        "PromQL answers {got}, the server computed {expected}"
    );
    Ok(())
}
