//! The agent on the appliance harness (a Debian root booted by systemd-nspawn: real systemd and
//! system bus, clamd, chrony, nftables, restic, polkit, Nix profiles): drift on real components,
//! and healing as the unprivileged agent user through the polkit rule the NixOS module generates.

#[path = "common/agent_box.rs"]
mod agent_box;
mod common;
#[path = "common/harness.rs"]
mod harness;

use std::time::Duration;

use agent_box::{AgentBox, CONFIG, STATE, Setup, USER};
use common::{TestResult, text};
use harness::Appliance;
use serde_json::{Value, json};

fn result<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["results"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["check"] == check))
        .unwrap_or_else(|| panic!("no {check} in {report}"))
}

fn expect(report: &Value, check: &str, status: &str, needle: &str) {
    let r = result(report, check);
    assert_eq!(r["status"], status, "{check}: {}", r);
    assert!(
        r["reason"].as_str().is_some_and(|x| x.contains(needle)),
        "{check}: reason should mention {needle:?}: {}",
        r["reason"]
    );
}

fn plan_line<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["plan"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["check"] == check))
        .unwrap_or_else(|| panic!("no {check} in the heal plan: {report}"))
}

#[test]
fn drift_on_real_components() -> TestResult {
    let b = AgentBox::boot("drift", &Setup::default());
    let (code, report) = b.scan();
    for check in [
        "patching",
        "av_health",
        "logging",
        "firewall",
        "time_sync",
        "services",
    ] {
        expect(&report, check, "compliant", "as declared");
    }
    assert_eq!(
        result(&report, "av_health")["facts"]["eicar_test"]["detected"],
        true,
        "live EICAR test through clamd"
    );
    assert_eq!(code, Some(0), "all compliant: {report}");

    // A stopped unit.
    b.sh("systemctl stop prometheus-node-exporter.service");
    let (code, report) = b.scan();
    expect(
        &report,
        "services",
        "drifted",
        "prometheus-node-exporter.service is inactive",
    );
    assert_eq!(code, Some(1));
    b.sh("systemctl start prometheus-node-exporter.service");

    // A flushed ruleset.
    b.sh("nft flush ruleset");
    let (_, report) = b.scan();
    expect(&report, "firewall", "drifted", "egress is not restricted");
    b.sh("nft -f /etc/nftables.conf");

    // Volatile journal.
    b.sh("mkdir -p /etc/systemd/journald.conf.d && printf '[Journal]\\nStorage=volatile\\n' > /etc/systemd/journald.conf.d/50-volatile.conf");
    let (_, report) = b.scan();
    expect(&report, "logging", "drifted", "not persistent");
    b.sh("rm /etc/systemd/journald.conf.d/50-volatile.conf");

    // The clock 30 s off: chronyd (which may not correct the clock here) measures it against a manual reference.
    b.sh("echo manual >> /etc/chrony/chrony.conf && systemctl restart chrony && chronyc manual on >/dev/null && for i in 1 2 3; do chronyc settime \"$(date -u -d '+30 seconds' '+%b %d, %Y %H:%M:%S')\" >/dev/null; sleep 0.3; done");
    let (_, report) = b.scan();
    expect(&report, "time_sync", "drifted", "ms off (limit 5000 ms)");

    // Stale signatures, then a database that does not know EICAR, then none at all.
    let ten_days_ago = jiff::Timestamp::now().as_second() - 10 * 86_400;
    b.app.set_clamav_database(27_001, ten_days_ago)?;
    let (_, report) = b.scan();
    expect(&report, "av_health", "drifted", "h old (limit 48 h)");
    b.sh("rm -f /var/lib/clamav/daily.* && echo '0123456789abcdef0123456789abcdef:12:Harness.Other' > /var/lib/clamav/other.hdb");
    assert_eq!(b.app.clamd_command("RELOAD")?.trim(), "RELOADING");
    b.app
        .wait_for("clamd to drop EICAR", Duration::from_secs(30), |a| {
            a.clamd_instream(harness::EICAR)
                .is_ok_and(|r| r.contains("OK"))
        })?;
    let (_, report) = b.scan();
    expect(
        &report,
        "av_health",
        "drifted",
        "did not detect the EICAR test file",
    );
    b.sh("rm -f /var/lib/clamav/*");
    let (_, report) = b.scan();
    expect(&report, "av_health", "drifted", "no signature database");

    // A generation in the profile that is not running, and a target the box does not run.
    let next = b.app.make_system("next", "rev-next")?;
    b.app.set_system_profile(&next)?;
    let (_, report) = b.scan();
    expect(&report, "patching", "drifted", "the running system is");

    b.verify();
    Ok(())
}

#[test]
fn a_stopped_service_is_restarted_by_the_agent_user() -> TestResult {
    let b = AgentBox::boot("heal-restart", &Setup::default());
    b.sh("systemctl stop clinic-app.service");
    let (code, report) = b.heal();
    let line = plan_line(&report, "services");
    assert_eq!(line["runbook"], "restart_unit", "{report}");
    assert_eq!(line["outcome"], "success", "{report}");
    assert_eq!(code, Some(0));
    assert_eq!(
        b.active("clinic-app.service"),
        "active",
        "restarted through polkit"
    );
    let id = line["bundle_id"].as_str().ok_or("bundle id")?;
    let shown: Value =
        serde_json::from_slice(&b.agent(&["evidence", "show", id, "--json"]).stdout)?;
    let bundle = &shown["bundle"];
    assert_eq!(bundle["outcome"], "success");
    assert_eq!(bundle["runbook_id"], "restart_unit");
    assert_eq!(
        bundle["action_taken"][0]["action"], "RestartUnit",
        "{bundle}"
    );
    assert_eq!(
        bundle["post_state"]["status"], "compliant",
        "re-checked after the fix"
    );

    // The agent's user is refused by polkit for a unit not on the rule's list,
    // even when a (tampered) baseline asks for it: it stays stopped.
    b.sh("systemctl stop not-allowlisted.service");
    let (code, report) = b.heal();
    let line = plan_line(&report, "services");
    assert_eq!(line["outcome"], "failed", "{report}");
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("AccessDenied")),
        "polkit refusal named: {report}"
    );
    assert_eq!(code, Some(1));
    assert_ne!(b.active("not-allowlisted.service"), "active");
    b.verify();
    Ok(())
}

#[test]
fn a_flushed_firewall_is_restored() -> TestResult {
    let b = AgentBox::boot("heal-firewall", &Setup::default());
    b.sh("nft flush ruleset");
    let (_, report) = b.heal();
    let line = plan_line(&report, "firewall");
    assert_eq!(line["runbook"], "reapply_firewall");
    assert_eq!(line["outcome"], "success", "{report}");
    let live = b.sh("nft list ruleset");
    assert!(live.contains("policy drop"), "ruleset back: {live}");
    // nftables.service loads /etc/nftables.conf with one `nft -f`: a single transaction that starts with `flush ruleset`.
    let unit = b.sh("systemctl cat nftables.service");
    assert!(
        unit.contains("nft -f") || unit.contains("/usr/sbin/nft -f"),
        "{unit}"
    );
    b.verify();
    Ok(())
}

/// A system whose activation starts or stops the clinic's service, signed by the test-only key.
fn system(b: &AgentBox, name: &str, on_switch: &str) -> String {
    let expr = format!(
        "derivation {{ name = \"nixos-system-{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" ''
          PATH=/usr/bin:/bin; mkdir -p $out/bin; echo 25.11.{name} > $out/nixos-version; printf {name} > $out/configuration-revision
          printf '#!/bin/sh\\nset -e\\nln -sfn %s /run/current-system\\n{on_switch}\\n' $out > $out/bin/switch-to-configuration
          chmod 0555 $out/bin/switch-to-configuration'' ]; }}"
    );
    b.write(&format!("/root/{name}.nix"), &expr);
    let path = b
        .sh(&format!("nix-build --no-out-link --quiet /root/{name}.nix"))
        .trim()
        .to_owned();
    b.sh(&format!("nix --extra-experimental-features nix-command store sign --key-file /etc/nix/test-only-signing.sk {path} 2>/dev/null"));
    path
}

#[test]
fn a_generation_that_fails_its_health_check_is_rolled_back() -> TestResult {
    let b = AgentBox::boot("rollback", &Setup::default());
    let good = system(&b, "good", "systemctl start clinic-app.service || true");
    let bad = system(&b, "bad", "systemctl stop clinic-app.service || true");
    b.app.set_system_profile(&good)?;
    b.sh("/nix/var/nix/profiles/system/bin/switch-to-configuration switch");
    let good_generation: u64 = b
        .sh("readlink /nix/var/nix/profiles/system | sed 's/system-\\(.*\\)-link/\\1/'")
        .trim()
        .parse()?;
    b.configure(&Setup {
        health: &["clinic-app.service"],
        target_system: Some(&bad),
        ..Setup::default()
    });

    let (_, report) = b.heal();
    let line = plan_line(&report, "patching");
    assert_eq!(line["runbook"], "switch_generation", "{report}");
    assert_eq!(line["outcome"], "reverted", "{report}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("clinic-app.service")
            && error.contains(&format!("rolled back to generation {good_generation}")),
        "{error}"
    );
    assert_eq!(
        b.app.current_system()?,
        good,
        "the box runs the good generation again"
    );
    assert_eq!(b.active("clinic-app.service"), "active");
    let id = line["bundle_id"].as_str().ok_or("bundle id")?;
    let shown: Value =
        serde_json::from_slice(&b.agent(&["evidence", "show", id, "--json"]).stdout)?;
    let bundle = &shown["bundle"];
    assert_eq!(bundle["rollback_available"], true);
    assert_eq!(
        bundle["rollback_generation"], good_generation,
        "names the generation it returned to"
    );
    assert!(
        bundle["pre_state"].to_string().contains(&bad),
        "names the target it tried"
    );
    // A store path without a trusted signature is refused by the switch unit itself.
    b.write("/root/unsigned.nix", "derivation { name = \"nixos-system-unsigned\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"/bin/mkdir -p $out/bin\" ]; }");
    let unsigned = b
        .sh("nix-build --no-out-link --quiet /root/unsigned.nix")
        .trim()
        .to_owned();
    let name = unsigned.trim_start_matches("/nix/store/");
    let refused = b
        .app
        .systemctl(&["start", &format!("compliance-agent-switch@{name}.service")]);
    assert!(!refused.status.success(), "unsigned system must be refused");
    assert!(
        b.app
            .journal(&format!("compliance-agent-switch@{name}.service"))
            .contains("untrusted"),
        "the unit says why"
    );
    assert_eq!(b.app.current_system()?, good);
    b.verify();
    Ok(())
}

#[test]
fn a_disruptive_fix_waits_for_the_window_and_the_breaker_opens() -> TestResult {
    // A window that is closed now: from one to two hours from now.
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    let open = now.checked_add(jiff::SignedDuration::from_hours(1))?;
    let close = now.checked_add(jiff::SignedDuration::from_hours(2))?;
    let window = format!(
        "{:02}:{:02}-{:02}:{:02}",
        open.hour(),
        open.minute(),
        close.hour(),
        close.minute()
    );
    let closed = Setup {
        health: &["clinic-app.service"],
        window: Some(&window),
        ..Setup::default()
    };
    let b = AgentBox::boot("window", &closed);
    b.sh("systemctl stop clinic-app.service");
    let (_, report) = b.heal();
    let line = plan_line(&report, "services");
    assert_eq!(line["decision"]["decision"], "defer", "{report}");
    assert_eq!(line["outcome"], "deferred");
    assert_ne!(
        b.active("clinic-app.service"),
        "active",
        "nothing ran outside the window"
    );
    let state: Value =
        serde_json::from_slice(&b.app.read_file(&format!("{STATE}/heal-state.json"))?)?;
    assert_eq!(
        state["deferred"][0]["runbook"], "restart_unit",
        "the deferred fix is remembered: {state}"
    );

    // The window opens (the same fix, evaluated by the window logic at a time inside it).
    b.configure(&Setup {
        health: &["clinic-app.service"],
        window: None,
        ..Setup::default()
    });
    let (_, report) = b.heal();
    assert_eq!(
        plan_line(&report, "services")["outcome"],
        "success",
        "{report}"
    );
    assert_eq!(b.active("clinic-app.service"), "active");

    // A service that cannot start: after three failures in a row the check goes to alert.
    b.sh("mkdir -p /etc/systemd/system/clinic-app.service.d");
    b.write(
        "/etc/systemd/system/clinic-app.service.d/broken.conf",
        "[Service]\nExecStart=\nExecStart=/bin/false\n",
    );
    b.sh("systemctl daemon-reload && systemctl stop clinic-app.service");
    let mut outcomes = Vec::new();
    let clear_cooldowns = || -> TestResult {
        let mut v: Value =
            serde_json::from_slice(&b.app.read_file(&format!("{STATE}/heal-state.json"))?)?;
        v["last_run"] = json!({});
        b.write(&format!("{STATE}/heal-state.json"), &v.to_string());
        Ok(())
    };
    clear_cooldowns()?;
    for _ in 0..4 {
        let (_, report) = b.heal();
        outcomes.push(
            plan_line(&report, "services")["outcome"]
                .as_str()
                .unwrap_or("-")
                .to_owned(),
        );
        // Let the cooldown pass, as time would.
        clear_cooldowns()?;
    }
    assert_eq!(
        outcomes,
        ["failed", "failed", "failed", "alert"],
        "breaker opens after three failures"
    );
    b.verify();
    Ok(())
}

#[test]
fn kill_during_a_switch_leaves_one_generation_and_is_recorded() -> TestResult {
    let b = AgentBox::boot("kill-switch", &Setup::default());
    let old = system(&b, "old", "true");
    let slow = system(&b, "slow", "sleep 3");
    b.app.set_system_profile(&old)?;
    b.sh("/nix/var/nix/profiles/system/bin/switch-to-configuration switch");
    b.configure(&Setup {
        target_system: Some(&slow),
        ..Setup::default()
    });
    // Start heal in the background inside, kill -9 it while the switch unit runs.
    b.sh(&format!("(setpriv --reuid {USER} --regid {USER} --init-groups -- {} --config {CONFIG} heal >/tmp/heal.out 2>&1 & echo $! > /tmp/heal.pid)", Appliance::AGENT_BIN));
    let switching = |a: &Appliance| {
        a.exec(&["sh", "-c", "systemctl list-units --all --plain --no-legend 'compliance-agent-switch@*' | grep -q activating"])
            .status
            .success()
    };
    b.app
        .wait_for("the switch to start", Duration::from_secs(20), switching)?;
    b.sh("kill -9 $(cat /tmp/heal.pid)");
    b.app
        .wait_for("the switch unit to finish", Duration::from_secs(20), |a| {
            !switching(a)
        })?;
    let now = b.app.current_system()?;
    assert!(
        now == old || now == slow,
        "the box runs the old or the new generation, got {now}"
    );
    // The next run records what happened.
    let out = b.agent_as_user(&["heal", "--json"]);
    assert!(out.status.code().is_some(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(
        &b.agent(&["evidence", "list", "--check", "patching", "--json"])
            .stdout,
    )?;
    let interrupted = listed
        .as_array()
        .and_then(|l| {
            l.iter().find(|x| {
                x["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("the agent stopped during switch_generation"))
            })
        })
        .ok_or_else(|| format!("no bundle records the interrupted switch: {listed}"))?;
    assert!(
        interrupted["error"]
            .as_str()
            .is_some_and(|e| e.contains("now runs generation")),
        "{interrupted}"
    );
    b.verify();
    Ok(())
}
