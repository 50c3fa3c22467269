//! The whole platform in one command (`tests/harness/demo.sh`), run end to end in its
//! shortened mode: the central server, three appliance containers with the agent as a
//! service enrolled by token, one drift healed through its incident, plan and signed
//! order; and on success as on failure, nothing it started is left behind.

mod common;
#[path = "common/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{TestResult, text};

/// The directory holding the agent and the central server built for these tests.
fn bin_dir() -> PathBuf {
    let agent = Path::new(env!("CARGO_BIN_EXE_compliance-agent"));
    let dir = agent.parent().expect("the agent binary's directory");
    assert!(
        dir.join("mcp-server").exists(),
        "{} is missing: build the central server first with `cargo build -p mcp-server` (tests/run builds the workspace)",
        dir.join("mcp-server").display()
    );
    dir.to_path_buf()
}

fn demo(args: &[&str], env: &[(&str, &str)]) -> Output {
    harness::require();
    let mut cmd = Command::new("bash");
    cmd.arg(harness::repo_root().join("tests/harness/demo.sh"))
        .args(args)
        .env("DEMO_BIN_DIR", bin_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tests/harness/demo.sh")
}

/// The word after `marker` on the first line holding it.
fn word_after<'a>(out: &'a str, marker: &str) -> Option<&'a str> {
    let at = out.find(marker)? + marker.len();
    out[at..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .find(|w| !w.is_empty())
}

/// Every container, the server, the bridge and the state directory the run named are gone.
fn nothing_left(out: &str) -> TestResult {
    let state = word_after(out, ", state ").ok_or("the run names its state directory")?;
    assert!(
        state.starts_with("/tmp/compliance-demo."),
        "state directory {state}"
    );
    assert!(
        !Path::new(state).exists(),
        "the state directory {state} is removed"
    );
    let pid = word_after(out, "central server: pid ").ok_or("the run names the server's pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !text(&cmdline).contains("mcp-server"),
        "the server (pid {pid}) is gone: {}",
        text(&cmdline)
    );
    // Any process still naming the state directory (the server, socat on either side).
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = text(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(state),
            "process {} still runs: {cmdline}",
            entry.file_name().to_string_lossy()
        );
    }
    for line in out
        .lines()
        .filter(|l| l.contains("booted appliance container "))
    {
        let name = word_after(line, "booted appliance container ").ok_or("container name")?;
        assert!(
            !Path::new("/run/appliance-harness").join(name).exists(),
            "container {name} is stopped and forgotten"
        );
    }
    Ok(())
}

#[test]
fn the_demo_heals_a_drift_through_incident_plan_and_order_and_removes_everything() -> TestResult {
    // Invariant: one command brings up the server with its console and three enrolled
    // boxes delivering evidence; a drift the box leaves to the MSP (a service stopped
    // again within the box's own restart cooldown) opens an incident that is planned,
    // becomes a signed order, is healed on the box and closes, in that order; and the
    // command exits 0 leaving no container, process or directory behind.
    let out = demo(&["--once"], &[("DEMO_TIMEOUT", "300")]);
    let stdout = text(&out.stdout);
    let all = format!("{stdout}\n--- stderr ---\n{}", text(&out.stderr));
    assert!(out.status.success(), "demo.sh --once exits 0: {all}");
    for key in [
        "console: https://127.0.0.1:",
        "sign-in token: mcpo1_",
        "booted appliance container ",
        "enrolled clinic-north/frontdesk-01",
        "enrolled clinic-south/exam-02",
        "enrolled harbor-dental/office-01",
        "evidence from harbor-dental/office-01",
        "healed on the box",
        "cleaned up: 3 container(s)",
    ] {
        assert!(stdout.contains(key), "the output says {key:?}: {all}");
    }
    // The remediation's steps, in the order they happen.
    let mut at = 0;
    for step in [
        "drift injected   clinic-north/frontdesk-01: systemctl stop clinic-app.service",
        "incident opened ",
        "plan             ",
        "order signed     ",
        "result           ",
        "incident closed  ",
        "demo complete",
    ] {
        let found = stdout[at..]
            .find(step)
            .ok_or_else(|| format!("{step:?} after byte {at}: {all}"))?;
        at += found + step.len();
    }
    let result_line = stdout
        .lines()
        .find(|l| l.contains("result           "))
        .unwrap_or_default();
    assert!(
        result_line.ends_with(": success"),
        "the box ran the order successfully: {result_line}"
    );
    assert!(
        stdout.contains("check:services on clinic-north/frontdesk-01"),
        "the incident names its cause and host: {all}"
    );
    nothing_left(&stdout)
}

#[test]
fn a_demo_that_runs_out_of_time_says_why_exits_nonzero_and_removes_everything() -> TestResult {
    // Invariant: a run that cannot finish within its time limit fails with the reason and
    // still removes everything it started (the error path of the same cleanup).
    let out = demo(&["--once"], &[("DEMO_TIMEOUT", "1")]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status 1: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("demo failed: ") && stderr.contains("1s"),
        "the reason names the limit: {stderr}"
    );
    assert!(stdout.contains("cleaned up: "), "the cleanup ran: {stdout}");
    nothing_left(&stdout)
}

#[test]
fn an_unknown_argument_is_refused_before_anything_starts() {
    // Invariant: a mistyped option changes nothing and names itself.
    let out = demo(&["--onec"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unknown argument '--onec'"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stdout).contains("central server"),
        "nothing started"
    );
}
