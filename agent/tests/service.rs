//! `compliance-agent run` as a Type=notify service under the harness's systemd: readiness and
//! status, healing a watched unit as soon as it dies, metrics through the node exporter, the
//! watchdog restarting a hung loop, SIGHUP with a bad configuration, a clean stop.

#[path = "common/agent_box.rs"]
mod agent_box;
mod common;
#[path = "common/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use agent_box::{AgentBox, CONFIG, STATE, Setup, USER};
use common::{TestResult, text};
use serde_json::Value;

const UNIT: &str = agent_box::SERVICE;
const TEXTFILE: &str = "/var/lib/prometheus/node-exporter";

fn service_box(name: &str) -> AgentBox {
    let extra = format!("metrics_dir = \"{TEXTFILE}\"\nrestart_cooldown_sec = 0\n");
    let setup = Setup {
        extra_config: &extra,
        ..Setup::default()
    };
    let b = AgentBox::boot(name, &setup);
    b.sh(&format!("chown {0}:{0} {TEXTFILE}", agent_box::USER));
    b.start_service("--scan-interval 30");
    b
}

fn bundles(b: &AgentBox, check: &str) -> Vec<Value> {
    b.bundles(check)
}

#[test]
fn the_service_heals_a_dying_unit_at_once_and_exports_metrics() -> TestResult {
    let b = service_box("svc");
    assert_eq!(b.active(UNIT), "active", "READY=1 reached");
    let status_text = b.app.unit_property(UNIT, "StatusText");
    assert!(
        status_text.contains("score 100%"),
        "STATUS= summary: {status_text:?}"
    );

    let before = bundles(&b, "services").len();
    b.sh("systemctl stop clinic-app.service");
    let start = Instant::now();
    b.app.wait_for(
        "clinic-app.service healed and its bundle stored",
        Duration::from_secs(10),
        |a| {
            a.unit_property("clinic-app.service", "ActiveState") == "active"
                && bundles(&b, "services").len() > before
        },
    )?;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "reacted to the unit's death without waiting for a scan: {took:?}"
    );
    assert!(
        b.app.journal(UNIT).contains("watched unit changed"),
        "the unit signal, not a scan, triggered the fix"
    );
    let newest = &bundles(&b, "services")[0];
    assert_eq!(newest["outcome"], "success", "{newest}");

    // The node exporter serves the agent's metrics, and the score matches a scan.
    let (_, report) = b.scan();
    let score = report["score"].as_f64().ok_or("score")?;
    b.app
        .wait_for("the fix in the metrics", Duration::from_secs(10), |a| {
            a.sh("curl -fsS http://127.0.0.1:9100/metrics")
                .stdout
                .windows(14)
                .any(|w| w == b"msp_remediatio")
        })?;
    let metrics = b.sh("curl -fsS http://127.0.0.1:9100/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("msp_compliance_score "))
        .ok_or("msp_compliance_score exported")?;
    let exported: f64 = line
        .trim_start_matches("msp_compliance_score ")
        .trim()
        .parse()?;
    assert_eq!(exported, score, "metrics score equals scan's");
    // The node exporter re-orders labels alphabetically.
    let counted = metrics.lines().any(|l| {
        l.starts_with("msp_remediations_total{")
            && l.contains("runbook=\"restart_unit\"")
            && l.contains("outcome=\"success\"")
    });
    assert!(counted, "remediation counted: {metrics}");
    assert!(
        metrics.contains("msp_control_status{check=\"services\""),
        "per-control status"
    );

    let status: Value = serde_json::from_slice(&b.agent(&["status", "--json"]).stdout)?;
    assert_eq!(status["running"], true, "{status}");

    // No secret in the journal: the signing key's PEM body never appears.
    let key = text(&b.app.read_file(&format!("{STATE}/keys/signing.key"))?);
    let body = key
        .lines()
        .find(|l| !l.starts_with("-----"))
        .ok_or("key body")?;
    assert!(
        !b.app.journal(UNIT).contains(body),
        "the signing key leaked into the journal"
    );

    // SIGTERM in the middle of a burst of drift: the agent finishes the fix in
    // progress and exits 0; nothing is half-written, and after a restart every
    // drift is healed with its bundle.
    let before = bundles(&b, "services").len();
    b.sh(&format!(
        "systemctl stop clinic-app.service prometheus-node-exporter.service; systemctl stop {UNIT}"
    ));
    assert_eq!(
        b.app.unit_property(UNIT, "Result"),
        "success",
        "exit 0 on SIGTERM"
    );
    b.verify();
    let stop = Instant::now();
    b.sh(&format!("systemctl start {UNIT}"));
    b.app.wait_for(
        "the burst healed after the restart",
        Duration::from_secs(20),
        |a| {
            a.unit_property("clinic-app.service", "ActiveState") == "active"
                && a.unit_property("prometheus-node-exporter.service", "ActiveState") == "active"
        },
    )?;
    assert!(
        bundles(&b, "services").len() > before,
        "the fixes are recorded"
    );
    let stop_took = stop.elapsed();
    assert!(stop_took < Duration::from_secs(20), "{stop_took:?}");
    b.sh(&format!("systemctl stop {UNIT}"));
    assert_eq!(b.app.unit_property(UNIT, "Result"), "success");
    b.verify();
    Ok(())
}

#[test]
fn the_watchdog_restarts_a_hung_loop_and_a_bad_reload_is_refused() -> TestResult {
    let b = service_box("watchdog");
    let pid = b.app.unit_property(UNIT, "MainPID");

    // SIGHUP with a broken configuration: refused, the service keeps running.
    let good = b.app.read_file(CONFIG)?;
    b.write(
        CONFIG,
        "site_id = \"clinic-h\"\nmaintenance_window = \"whenever\"\n",
    );
    b.sh(&format!("systemctl kill -s HUP {UNIT}"));
    b.app
        .wait_for("the refusal in the journal", Duration::from_secs(10), |a| {
            a.journal(UNIT).contains("refusing the new configuration")
        })?;
    assert_eq!(b.active(UNIT), "active");
    assert_eq!(b.app.unit_property(UNIT, "MainPID"), pid, "same process");
    b.app.write_file(CONFIG, &good)?;

    // A hung loop stops the watchdog pings; systemd kills and restarts the agent.
    b.sh(&format!("systemctl kill -s USR2 {UNIT}"));
    b.app.wait_for(
        "the watchdog to restart the agent",
        Duration::from_secs(20),
        |a| {
            a.unit_property(UNIT, "NRestarts") != "0"
                && a.unit_property(UNIT, "ActiveState") == "active"
        },
    )?;
    assert_ne!(b.app.unit_property(UNIT, "MainPID"), pid, "a new process");
    assert!(
        b.app.journal(UNIT).contains("atchdog"),
        "systemd names the watchdog: {}",
        b.app.journal(UNIT)
    );
    b.verify();
    Ok(())
}

/// The central server's binary, built beside the agent by `cargo build -p mcp-server`
/// (tests/run builds the whole workspace), seen in the container under /opt/agent-bin.
fn mcp_server_bin() -> &'static str {
    let built =
        std::path::Path::new(env!("CARGO_BIN_EXE_compliance-agent")).with_file_name("mcp-server");
    assert!(
        built.exists(),
        "{} is missing: build the central server first with `cargo build -p mcp-server` (tests/run builds the workspace)",
        built.display()
    );
    "/opt/agent-bin/mcp-server"
}

#[test]
fn evidence_reaches_the_mcp_across_an_outage_and_orders_run() -> TestResult {
    // Invariant: a box enrolled by token with the central server delivers every
    // bundle exactly once across an outage of the server, and an order created
    // with `mcp-server order create` runs and its result reaches the server.
    let server = mcp_server_bin();
    let mcp = format!(
        "mcp_url = \"https://127.0.0.1:8443\"\nca_cert_file = \"{STATE}/mcp/ca.pem\"\nclient_cert_file = \"{STATE}/mcp/client.pem\"\nclient_key_file = \"{STATE}/mcp/client.key\"\nmcp_order_pubkey_file = \"{STATE}/mcp/order-signing.pub.pem\"\nmcp_poll_interval_sec = 5\nupload_backoff_base_sec = 1\nupload_backoff_cap_sec = 4\nrestart_cooldown_sec = 0\n"
    );
    let b = AgentBox::boot(
        "mcp",
        &Setup {
            extra_config: &mcp,
            ..Setup::default()
        },
    );
    // The server with its embedded defaults (agent listener 127.0.0.1:8443, operator
    // listener 127.0.0.1:9443), state in /var/lib/mcp.
    b.write("/etc/mcp-server.toml", "state_dir = \"/var/lib/mcp\"\n");
    let cli = format!("{server} --config /etc/mcp-server.toml");
    let serve = format!("systemd-run --unit mcp-server --collect {cli} serve >/dev/null");
    b.sh(&serve);
    b.app.wait_for(
        "the server's first start (CA, order key, admin token)",
        Duration::from_secs(30),
        |a| {
            a.exec(&["test", "-s", "/var/lib/mcp/admin.token"])
                .status
                .success()
        },
    )?;
    // Enrollment by a one-time token, with a config that names only the identity
    // and key (the mTLS files it writes do not exist before).
    let token = b.sh(&format!("{cli} token create --site clinic-h 2>/dev/null"));
    b.write(
        "/etc/compliance-agent/enroll.toml",
        &format!("site_id = \"clinic-h\"\nhost_id = \"appliance\"\nsigning_key_file = \"{STATE}/keys/signing.key\"\nstate_dir = \"{STATE}\"\nevidence_dir = \"{STATE}/evidence\"\n"),
    );
    b.sh(&format!(
        "{} --config /etc/compliance-agent/enroll.toml enroll --server https://127.0.0.1:8443 --token {} >/dev/null && chown -R {USER}:{USER} {STATE}/mcp",
        harness::Appliance::AGENT_BIN,
        token.trim()
    ));
    let reused = b.app.exec(&[
        harness::Appliance::AGENT_BIN,
        "--config",
        "/etc/compliance-agent/enroll.toml",
        "enroll",
        "--server",
        "https://127.0.0.1:8443",
        "--token",
        token.trim(),
    ]);
    assert!(
        !reused.status.success() && String::from_utf8_lossy(&reused.stderr).contains("used up"),
        "the token was single-use: {}",
        String::from_utf8_lossy(&reused.stderr)
    );
    b.start_service("--scan-interval 30");
    let on_server = |a: &harness::Appliance, what: &str| -> Value {
        let out = a.exec(&[
            server,
            "--config",
            "/etc/mcp-server.toml",
            what,
            "list",
            "--host",
            "clinic-h/appliance",
            "--json",
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let local_ids = |b: &AgentBox| -> Vec<String> {
        let out = b.agent(&["evidence", "list", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut ids: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["bundle_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let server_ids = |a: &harness::Appliance| -> Vec<String> {
        let mut ids: Vec<String> = on_server(a, "evidence")["bundles"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| {
                x["bundle_id"]
                    .as_str()
                    .or_else(|| x.as_str())
                    .map(str::to_owned)
            })
            .collect();
        ids.sort();
        ids
    };
    b.app.wait_for(
        "the first scan's bundles on the MCP",
        Duration::from_secs(60),
        |a| {
            let local = local_ids(&b);
            !local.is_empty() && server_ids(a) == local
        },
    )?;

    // The MCP goes away; the box keeps healing and keeps the evidence.
    b.sh("systemctl stop mcp-server");
    for _ in 0..3 {
        let before = bundles(&b, "services").len();
        b.sh("systemctl stop clinic-app.service");
        b.app.wait_for(
            "healed while the MCP is down",
            Duration::from_secs(10),
            |a| {
                a.unit_property("clinic-app.service", "ActiveState") == "active"
                    && bundles(&b, "services").len() > before
            },
        )?;
    }
    let made_offline = local_ids(&b).len() - server_ids(&b.app).len();
    assert!(
        made_offline >= 3,
        "bundles made while the MCP was down: {made_offline}"
    );
    b.app
        .wait_for("the outage in the status", Duration::from_secs(30), |a| {
            a.exec(&[
                harness::Appliance::AGENT_BIN,
                "--config",
                CONFIG,
                "status",
                "--json",
            ])
            .stdout
            .windows(14)
            .any(|w| w == b"last_mcp_error")
        })?;
    b.sh(&serve);
    b.app.wait_for(
        "every bundle delivered after the outage",
        Duration::from_secs(90),
        |a| server_ids(a) == local_ids(&b),
    )?;
    let ids = server_ids(&b.app);
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "each bundle once on the MCP");

    // An order from the MCP runs and its result arrives.
    let order = b.sh(&format!(
        "{cli} order create --host clinic-h/appliance --runbook collect_evidence"
    ));
    let order_id = order
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !order_id.is_empty(),
        "order create prints the order id: {order}"
    );
    b.app.wait_for(
        "the order's result on the MCP",
        Duration::from_secs(60),
        |a| {
            on_server(a, "order")["orders"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| o["order_id"] == order_id.as_str() && o["result_outcome"] == "success")
        },
    )?;
    b.sh(&format!("systemctl stop {UNIT}"));
    assert_eq!(b.app.unit_property(UNIT, "Result"), "success");
    b.verify();
    Ok(())
}
