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

/// The suite's own Nix settings (tests/nix-conf/nix.conf): no build users, no
/// substituters, no sandbox. Every Nix command the tests run on the host uses
/// them, so neither /etc/nix nor a `nixbld` group is needed or read.
pub fn nix_conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nix-conf")
}

/// A host Nix command (`nix-build`, `nix-env`, `nix-hash`, ...) with the suite's settings.
pub fn nix_command(name: &str) -> Command {
    let mut cmd = Command::new(require_tool(name));
    cmd.env("NIX_CONF_DIR", nix_conf_dir())
        .env_remove("NIX_CONFIG");
    cmd
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

/// The site and host every channel test box uses.
pub const SITE: &str = "clinic-1";
pub const HOST: &str = "frontdesk-01";

/// A free TCP port on loopback (bound and released; the server binds it again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// A box with an evidence key, its mTLS files, and a reference MCP server
/// (state, order key, this box enrolled) that runs in this process on loopback.
pub struct Channel {
    pub dir: tempfile::TempDir,
    pub pki: mcp_server::pki::PkiFiles,
    pub server_state: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    server: Option<mcp_server::Running>,
}

impl Channel {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = mcp_server::pki::make(
            &dir.path().join("pki"),
            &["localhost", "127.0.0.1"],
            "clinic-1/frontdesk-01",
        )
        .expect("make test PKI");
        let keygen = agent(
            None,
            &[
                "keygen",
                "--out",
                &dir.path().join("keys").display().to_string(),
            ],
        );
        assert!(keygen.status.success(), "keygen: {}", text(&keygen.stderr));
        let server_state = dir.path().join("mcp");
        let store = mcp_server::Store::open(&server_state).expect("server state");
        let pubkey = std::fs::read_to_string(dir.path().join("keys/signing.pub.pem"))
            .expect("read public key");
        store.enroll(SITE, HOST, &pubkey).expect("enroll the box");
        let mut channel = Self {
            config: dir.path().join("agent.toml"),
            dir,
            pki,
            server_state,
            port: free_port(),
            server: None,
        };
        channel.write_config("");
        channel
    }

    /// Writes the agent's config; `extra` lines replace or add keys.
    pub fn write_config(&mut self, extra: &str) {
        let d = self.dir.path();
        let mut keys: Vec<(String, String)> = vec![
            ("site_id".into(), format!("{SITE:?}")),
            ("host_id".into(), format!("{HOST:?}")),
            (
                "signing_key_file".into(),
                format!("{:?}", d.join("keys/signing.key")),
            ),
            ("evidence_dir".into(), format!("{:?}", d.join("evidence"))),
            ("state_dir".into(), format!("{:?}", d.join("state"))),
            (
                "mcp_url".into(),
                format!("\"https://127.0.0.1:{}\"", self.port),
            ),
            ("ca_cert_file".into(), format!("{:?}", self.pki.ca)),
            (
                "client_cert_file".into(),
                format!("{:?}", self.pki.client_cert),
            ),
            (
                "client_key_file".into(),
                format!("{:?}", self.pki.client_key),
            ),
            (
                "mcp_order_pubkey_file".into(),
                format!(
                    "{:?}",
                    self.server_state.join(mcp_server::store::ORDER_PUBKEY_FILE)
                ),
            ),
            ("upload_backoff_base_sec".into(), "1".into()),
            ("upload_backoff_cap_sec".into(), "5".into()),
        ];
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').expect("key = value");
            let k = k.trim().to_owned();
            keys.retain(|(key, _)| *key != k);
            keys.push((k, v.trim().to_owned()));
        }
        let body: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        std::fs::write(&self.config, body).expect("write agent config");
    }

    pub fn config(&self) -> compliance_agent::config::Config {
        compliance_agent::config::Config::load(Some(&self.config)).expect("load agent config")
    }

    /// Starts the server with the default certificates.
    pub fn start_server(&mut self) {
        let (cert, key, ca) = (
            self.pki.server_cert.clone(),
            self.pki.server_key.clone(),
            self.pki.ca.clone(),
        );
        self.start_server_with(&cert, &key, &ca, None);
    }

    pub fn start_server_with(
        &mut self,
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        api_key: Option<&str>,
    ) {
        self.stop_server();
        let config = mcp_server::ServerConfig {
            state_dir: self.server_state.clone(),
            listen: ([127, 0, 0, 1], self.port).into(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.to_owned(),
            api_key: api_key.map(str::to_owned),
        };
        self.server = Some(mcp_server::start(config).expect("start the reference MCP server"));
    }

    /// Starts a server whose every answer comes from `handler` (protocol faults).
    pub fn start_faulty_server(&mut self, handler: mcp_server::Handler) {
        self.stop_server();
        let config = mcp_server::ServerConfig {
            state_dir: self.server_state.clone(),
            listen: ([127, 0, 0, 1], self.port).into(),
            cert: self.pki.server_cert.clone(),
            key: self.pki.server_key.clone(),
            client_ca: self.pki.ca.clone(),
            api_key: None,
        };
        self.server = Some(mcp_server::start_with(config, handler).expect("start a faulty server"));
    }

    pub fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    /// Counters of the running server.
    pub fn server_stats(&self) -> mcp_server::ServerStats {
        self.server
            .as_ref()
            .map(|s| s.store().stats())
            .unwrap_or_default()
    }

    /// The server's state, opened beside the running server (reads the disk).
    pub fn server_store(&self) -> mcp_server::Store {
        mcp_server::Store::open(&self.server_state).expect("open server state")
    }

    /// Bundle ids the server stored for this box.
    pub fn server_bundles(&self) -> Vec<String> {
        self.server_store()
            .bundles(SITE, HOST)
            .expect("server bundles")
    }

    /// Bundle ids in the box's evidence directory.
    pub fn disk_bundles(&self) -> Vec<String> {
        let mut ids: Vec<String> =
            compliance_agent::evidence::bundle_refs(&self.dir.path().join("evidence"))
                .expect("list evidence")
                .into_iter()
                .map(|r| r.bundle_id)
                .collect();
        ids.sort();
        ids
    }

    /// The box's evidence store (the same key and directory the agent uses).
    pub fn evidence(&self) -> EvidenceStore {
        compliance_agent::resources::open_evidence_store(&self.config())
            .expect("open evidence store")
    }

    /// Stores `n` bundles through the library, in groups of seven.
    pub fn add_bundles(&self, n: usize) {
        let store = self.evidence();
        let mut left = n;
        let mut i = 0;
        while left > 0 {
            let take = left.min(7);
            let drafts = (0..take)
                .map(|k| draft(Check::Backup, Outcome::Success, i + k))
                .collect();
            store.store_many(drafts).expect("store bundles");
            i += take;
            left -= take;
        }
    }

    /// Runs the agent with this box's config.
    pub fn agent(&self, args: &[&str]) -> Output {
        agent(Some(&self.config), args)
    }

    /// `queue status --json`'s stats.
    pub fn queue_stats(&self) -> serde_json::Value {
        let out = self.agent(&["queue", "status", "--json"]);
        assert!(out.status.success(), "queue status: {}", text(&out.stderr));
        let value: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("queue status prints JSON");
        value["stats"].clone()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join(compliance_agent::queue::DB_FILE)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.stop_server();
    }
}
