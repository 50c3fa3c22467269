//! `compliance-agent run` as a Type=notify service under the harness's systemd: readiness and
//! status, healing a watched unit as soon as it dies, metrics through the node exporter, the
//! watchdog restarting a hung loop, SIGHUP with a bad configuration, a clean stop.

mod common;
#[path = "common/agent_box.rs"]
mod agent_box;
#[path = "common/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use agent_box::{AgentBox, CONFIG, STATE, Setup};
use common::{TestResult, text};
use serde_json::Value;

const UNIT: &str = agent_box::SERVICE;
const TEXTFILE: &str = "/var/lib/prometheus/node-exporter";

fn service_box(name: &str) -> AgentBox {
    let extra = format!("metrics_dir = \"{TEXTFILE}\"\n");
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

    // SIGTERM: finish and exit 0 within the stop timeout; the evidence verifies.
    let stop = Instant::now();
    b.sh(&format!("systemctl stop {UNIT}"));
    assert!(
        stop.elapsed() < Duration::from_secs(10),
        "stopped within 10 s"
    );
    assert_eq!(
        b.app.unit_property(UNIT, "Result"),
        "success",
        "exit 0 on SIGTERM"
    );
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
