//! Helpers shared by the integration tests: temporary stores, the agent binary, external tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use compliance_agent::config::DeploymentMode;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{
    Check, Draft, EvidenceStore, HostIdentity, Outcome, StoredBundle,
};
use compliance_agent::nixos::RunningSystem;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The agent binary built for these tests.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_compliance-agent"))
}

/// Fails (never skips) when a tool the suite relies on is missing; `tests/run` installs them.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed; run tests/run, which installs the test dependencies");
}

pub fn host() -> HostIdentity {
    HostIdentity {
        site_id: "clinic-1".into(),
        host_id: "frontdesk-01".into(),
        deployment_mode: DeploymentMode::Reseller,
        reseller_id: Some("acme-msp".into()),
        policy_version: "2026.11".into(),
    }
}

/// A fresh store under `dir/evidence` signed by a deterministic key.
pub fn open_store(dir: &Path, seed: u8) -> EvidenceStore {
    EvidenceStore::open(
        &dir.join("evidence"),
        SigningKey::from_seed(&[seed; 32]),
        host(),
        RunningSystem::default(),
    )
    .expect("open evidence store")
}

pub fn draft(check: Check, outcome: Outcome, i: usize) -> Draft {
    let mut d = Draft::new(check, outcome);
    d.pre_state =
        serde_json::json!({ "iteration": i, "unit": "sshd.service", "active_state": "failed" });
    d.post_state = serde_json::json!({ "active_state": "active" });
    d
}

/// Stores `n` bundles, cycling through the checks.
pub fn fill(store: &EvidenceStore, n: usize) -> Vec<StoredBundle> {
    let checks = [
        Check::Patching,
        Check::Backup,
        Check::Firewall,
        Check::TimeSync,
    ];
    (0..n)
        .map(|i| {
            store
                .store(draft(checks[i % checks.len()], Outcome::Success, i))
                .expect("store bundle")
        })
        .collect()
}

/// Runs the agent with `args`; the config file, when given, is passed with --config.
pub fn agent(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(agent_bin());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args)
        .env_remove("COMPLIANCE_AGENT_CONFIG")
        .output()
        .expect("run compliance-agent")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A config file for `dir` with a key made by `keygen`; returns its path.
pub fn configured_box(dir: &Path) -> PathBuf {
    let out = agent(
        None,
        &["keygen", "--out", &dir.join("keys").display().to_string()],
    );
    assert!(out.status.success(), "keygen failed: {}", text(&out.stderr));
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "site_id = \"clinic-1\"\nhost_id = \"frontdesk-01\"\nsigning_key_file = \"{}\"\nevidence_dir = \"{}\"\nstate_dir = \"{}\"\n",
            dir.join("keys/signing.key").display(),
            dir.join("evidence").display(),
            dir.display()
        ),
    )
    .expect("write config");
    config
}
