//! Helpers for the server's integration tests: a server on loopback in this process,
//! boxes enrolled through the real exchange, HTTPS clients with their certificates.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use compliance_agent::config::DeploymentMode;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{Check, Draft, EvidenceStore, HostIdentity, Outcome};
use compliance_agent::nixos::RunningSystem;
use jiff::SignedDuration;
use mcp_server::auth::Caller;
use mcp_server::config::Config;
use mcp_server::enroll::{EnrollRequest, TokenRequest};
use mcp_server::{Running, Services, StartOptions};
use ureq::tls::{ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig, TlsProvider};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A server with its state in a temporary directory, listening on free loopback ports.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub running: Running,
}

pub fn test_config(dir: &Path) -> Config {
    Config {
        state_dir: dir.join("state"),
        agent_listen: ([127, 0, 0, 1], 0).into(),
        operator_listen: ([127, 0, 0, 1], 0).into(),
        ..Config::default()
    }
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts with the test config changed by `edit`.
    pub fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        edit(&mut config);
        let (svc, _) = Services::open(config).expect("open server state");
        let running = Running::start(svc, StartOptions::default()).expect("start server");
        Self { dir, running }
    }

    pub fn svc(&self) -> &Services {
        &self.running.services
    }

    pub fn url(&self) -> String {
        self.running.url()
    }

    pub fn ca_pem(&self) -> String {
        self.svc().ca.cert_pem.clone()
    }

    /// A token for `site` with `uses` uses, valid for a day.
    pub fn token(&self, site: &str, uses: u32) -> String {
        mcp_server::enroll::create_token(
            self.svc(),
            &Caller::local("test"),
            &TokenRequest {
                site_id: site.into(),
                reseller_id: Some("acme".into()),
                uses,
                expires_in: SignedDuration::from_hours(24),
            },
        )
        .expect("create token")
        .token
    }

    /// Enrolls `site/host` over HTTPS with a fresh token; returns the box.
    pub fn enroll(&self, site: &str, host: &str) -> TestBox {
        let token = self.token(site, 1);
        let b = TestBox::new(site, host);
        let answer = b.enroll(self, &token);
        assert_eq!(answer.0, 200, "enrollment of {site}/{host}: {}", answer.1);
        b.with_cert(&answer.1)
    }
}

/// A box: its evidence store and key, and (once enrolled) its TLS identity.
pub struct TestBox {
    pub dir: tempfile::TempDir,
    pub site: String,
    pub host: String,
    pub key: SigningKey,
    seed: [u8; 32],
    pub csr_pem: String,
    pub tls_key_pem: String,
    pub cert_pem: Option<String>,
}

impl TestBox {
    pub fn new(site: &str, host: &str) -> Self {
        let seed: [u8; 32] = rand::random();
        let (csr_pem, tls_key_pem) =
            mcp_server::pki::make_csr(&format!("{site}/{host}")).expect("csr");
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            site: site.into(),
            host: host.into(),
            key: SigningKey::from_seed(&seed),
            seed,
            csr_pem,
            tls_key_pem,
            cert_pem: None,
        }
    }

    pub fn request(&self, token: &str) -> EnrollRequest {
        EnrollRequest {
            token: token.into(),
            host_id: self.host.clone(),
            csr_pem: self.csr_pem.clone(),
            evidence_pubkey_pem: self.key.verifying_key().to_spki_pem().expect("pem"),
            scan_interval_sec: None,
        }
    }

    /// POSTs the enrollment request without a client certificate: (status, body).
    pub fn enroll(&self, server: &TestServer, token: &str) -> (u16, serde_json::Value) {
        let agent = client(&server.ca_pem(), None);
        post_json(
            &agent,
            &format!("{}/api/v1/enroll", server.url()),
            &serde_json::to_value(self.request(token)).expect("json"),
        )
    }

    pub fn with_cert(mut self, answer: &serde_json::Value) -> Self {
        self.cert_pem = answer["client_cert_pem"].as_str().map(str::to_owned);
        self
    }

    pub fn client(&self, server: &TestServer) -> ureq::Agent {
        let cert = self.cert_pem.as_ref().expect("enrolled box");
        client(&server.ca_pem(), Some((cert, &self.tls_key_pem)))
    }

    pub fn store(&self) -> EvidenceStore {
        EvidenceStore::open(
            &self.dir.path().join("evidence"),
            SigningKey::from_seed(&self.seed),
            HostIdentity {
                site_id: self.site.clone(),
                host_id: self.host.clone(),
                deployment_mode: DeploymentMode::Reseller,
                reseller_id: Some("acme".into()),
                policy_version: "2026.12".into(),
            },
            RunningSystem::default(),
        )
        .expect("evidence store")
    }

    /// Stores `n` signed bundles and returns their (bundle.json, bundle.sig) bytes.
    pub fn bundles(&self, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let store = self.store();
        (0..n)
            .map(|i| {
                let mut d = Draft::new(Check::Backup, Outcome::Success);
                d.pre_state = serde_json::json!({ "i": i });
                let stored = store.store(d).expect("store bundle");
                read_bundle(&stored.dir)
            })
            .collect()
    }
}

pub fn read_bundle(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("bundle.json")).expect("bundle.json"),
        std::fs::read(dir.join("bundle.sig")).expect("bundle.sig"),
    )
}

/// An HTTPS client trusting only `ca_pem`, with an optional client certificate and key.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> ureq::Agent {
    let roots: Vec<_> = ureq::tls::parse_pem(ca_pem.as_bytes())
        .filter_map(|i| match i {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let client_cert = identity.map(|(cert, key)| {
        let chain: Vec<_> = ureq::tls::parse_pem(cert.as_bytes())
            .filter_map(|i| match i {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        ClientCert::new_with_certs(&chain, PrivateKey::from_pem(key.as_bytes()).expect("key"))
    });
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .client_cert(client_cert)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent()
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, serde_json::Value) {
    match r {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            )
        }
        Err(e) => (0, serde_json::Value::String(e.to_string())),
    }
}

pub fn post_json(
    agent: &ureq::Agent,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    answer(
        agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes()),
    )
}

pub fn get(agent: &ureq::Agent, url: &str) -> (u16, serde_json::Value) {
    answer(agent.get(url).call())
}

/// POSTs a bundle as protocol v1's multipart body.
pub fn upload(agent: &ureq::Agent, url: &str, json: &[u8], sig: &[u8]) -> (u16, serde_json::Value) {
    let (ct, body) = compliance_agent::mcp::multipart(&[
        ("bundle.json", "application/json", json),
        ("bundle.sig", "application/octet-stream", sig),
    ]);
    answer(agent.post(url).header("Content-Type", ct).send(&body[..]))
}

pub fn state_dir(server: &TestServer) -> PathBuf {
    server.dir.path().join("state")
}

/// The agent's binary, built from this workspace.
pub fn agent_binary() -> PathBuf {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|d| d.join("compliance-agent")))
        .expect("the test's target directory");
    if !bin.exists() {
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "-p",
                    "compliance-agent",
                    "--bin",
                    "compliance-agent",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build");
        assert!(status.success(), "cargo build -p compliance-agent failed");
    }
    assert!(bin.exists(), "{} after building it", bin.display());
    bin
}
