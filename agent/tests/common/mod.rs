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

/// A box with an evidence key, enrolled by token (`compliance-agent enroll`) with the
/// central server (`mcp-server`), which runs in this process on loopback.
pub struct Channel {
    pub dir: tempfile::TempDir,
    /// The server's state directory (database, archive, CA, order key).
    pub server_state: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    /// Where enrollment wrote the box's CA, client certificate and key, and order key.
    pub files: compliance_agent::enroll::EnrollFiles,
    server: Option<mcp_server::Running>,
}

/// The local admin the tests act as on the server (`cli:test` in its audit log).
pub fn admin() -> mcp_server::auth::Caller {
    mcp_server::auth::Caller::local("test")
}

impl Channel {
    /// Makes the box's key, starts the server, enrolls the box with a one-time token
    /// through the agent's own `enroll` command, and stops the server again.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let keygen = agent(
            None,
            &[
                "keygen",
                "--out",
                &dir.path().join("keys").display().to_string(),
            ],
        );
        assert!(keygen.status.success(), "keygen: {}", text(&keygen.stderr));
        let mut channel = Self {
            config: dir.path().join("agent.toml"),
            server_state: dir.path().join("mcp"),
            dir,
            port: free_port(),
            files: compliance_agent::enroll::EnrollFiles {
                ca_cert: PathBuf::new(),
                client_cert: PathBuf::new(),
                client_key: PathBuf::new(),
                order_pubkey: PathBuf::new(),
            },
            server: None,
        };
        channel.start_server();
        let token = mcp_server::enroll::create_token(
            &channel.server(),
            &admin(),
            &mcp_server::enroll::TokenRequest {
                site_id: SITE.into(),
                reseller_id: Some("acme-msp".into()),
                uses: 1,
                expires_in: jiff::SignedDuration::from_hours(1),
            },
        )
        .expect("create an enrollment token")
        .token;
        // Enrollment reads only the identity and key from the config and writes the
        // mTLS files to their defaults under state_dir; the channel keys come after.
        channel.write_keys(&channel.identity_keys(), "");
        channel.files = compliance_agent::enroll::EnrollFiles::from_config(&channel.config());
        let out = channel.agent(&[
            "enroll",
            "--server",
            &format!("https://127.0.0.1:{}", channel.port),
            "--token",
            &token,
        ]);
        assert!(
            out.status.success(),
            "compliance-agent enroll: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        channel.stop_server();
        assert!(
            channel.files.client_cert.exists(),
            "enroll wrote the client certificate to {}",
            channel.files.client_cert.display()
        );
        channel.write_config("");
        channel
    }

    fn identity_keys(&self) -> Vec<(String, String)> {
        let d = self.dir.path();
        vec![
            ("site_id".into(), format!("{SITE:?}")),
            ("host_id".into(), format!("{HOST:?}")),
            (
                "signing_key_file".into(),
                format!("{:?}", d.join("keys/signing.key")),
            ),
            ("evidence_dir".into(), format!("{:?}", d.join("evidence"))),
            ("state_dir".into(), format!("{:?}", d.join("state"))),
        ]
    }

    fn write_keys(&self, base: &[(String, String)], extra: &str) {
        let mut keys = base.to_vec();
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').expect("key = value");
            let k = k.trim().to_owned();
            keys.retain(|(key, _)| *key != k);
            keys.push((k, v.trim().to_owned()));
        }
        let body: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        std::fs::write(&self.config, body).expect("write agent config");
    }

    /// Writes the agent's config; `extra` lines replace or add keys.
    pub fn write_config(&mut self, extra: &str) {
        let mut keys = self.identity_keys();
        keys.extend([
            ("ca_cert_file".into(), format!("{:?}", self.files.ca_cert)),
            (
                "client_cert_file".into(),
                format!("{:?}", self.files.client_cert),
            ),
            (
                "client_key_file".into(),
                format!("{:?}", self.files.client_key),
            ),
            (
                "mcp_order_pubkey_file".into(),
                format!("{:?}", self.files.order_pubkey),
            ),
        ]);
        keys.push((
            "mcp_url".into(),
            format!("\"https://127.0.0.1:{}\"", self.port),
        ));
        keys.push(("upload_backoff_base_sec".into(), "1".into()));
        keys.push(("upload_backoff_cap_sec".into(), "5".into()));
        self.write_keys(&keys, extra);
    }

    pub fn config(&self) -> compliance_agent::config::Config {
        compliance_agent::config::Config::load(Some(&self.config)).expect("load agent config")
    }

    /// The server's configuration: state in `server_state`, the agent listener on
    /// `port`, the operator listener on a free port, everything else the embedded default.
    pub fn server_config(&self) -> mcp_server::config::Config {
        mcp_server::config::Config {
            state_dir: self.server_state.clone(),
            agent_listen: ([127, 0, 0, 1], self.port).into(),
            operator_listen: ([127, 0, 0, 1], 0).into(),
            ..mcp_server::config::Config::default()
        }
    }

    /// Starts the server with its default configuration.
    pub fn start_server(&mut self) {
        self.start_server_with(|_| {}, None);
    }

    /// Starts the server with its configuration changed by `edit`, and with
    /// `intercept` (when given) answering instead of the real routes it matches.
    pub fn start_server_with(
        &mut self,
        edit: impl FnOnce(&mut mcp_server::config::Config),
        intercept: Option<mcp_server::api::agent::Intercept>,
    ) {
        self.stop_server();
        let mut config = self.server_config();
        edit(&mut config);
        config.validate().expect("valid server config");
        let (svc, _) = mcp_server::Services::open(config).expect("open the server's state");
        let options = mcp_server::StartOptions {
            intercept,
            ..Default::default()
        };
        self.server =
            Some(mcp_server::Running::start(svc, options).expect("start the central server"));
    }

    /// Starts a server whose routes matched by `intercept` answer with its canned
    /// answer (protocol faults); the others are the real ones.
    pub fn start_faulty_server(&mut self, intercept: mcp_server::api::agent::Intercept) {
        self.start_server_with(|_| {}, Some(intercept));
    }

    pub fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    /// Intake counters of the running server (since it started).
    pub fn server_stats(&self) -> mcp_server::services::StatsSnapshot {
        self.server
            .as_ref()
            .map(|s| s.services.stats.snapshot())
            .unwrap_or_default()
    }

    /// The running server's services, or the state opened beside it when it is stopped.
    pub fn server(&self) -> mcp_server::Services {
        match &self.server {
            Some(s) => s.services.clone(),
            None => {
                mcp_server::Services::open(self.server_config())
                    .expect("open the server's state")
                    .0
            }
        }
    }

    /// Bundle ids the server recorded for this box (in seq order).
    pub fn server_bundles(&self) -> Vec<String> {
        self.server()
            .store
            .bundle_ids(&admin(), SITE, HOST)
            .expect("server bundles")
    }

    /// The orders of this box as the server holds them (with their results).
    pub fn server_orders(&self) -> Vec<mcp_server::store::OrderRecord> {
        self.server()
            .store
            .orders(&admin(), Some((SITE, HOST)))
            .expect("server orders")
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
