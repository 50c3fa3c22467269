//! The server's TOML configuration: unknown keys are errors, every key has a default
//! (the embedded default needs no file), and validation says what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("./mcp-state")
}
fn default_agent_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_operator_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_retention_days() -> u32 {
    2190
}
fn default_scan_interval() -> u64 {
    300
}
fn default_client_cert_days() -> u32 {
    397
}

/// Bounds that keep one slow or greedy client from starving the others.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The whole TLS handshake, from accept.
    #[serde(default = "Limits::d_handshake")]
    pub handshake_timeout_sec: f64,
    /// Reading a request's head, and waiting for the next request on a kept-alive connection.
    #[serde(default = "Limits::d_header")]
    pub header_timeout_sec: f64,
    /// A whole request: head, body and the answer.
    #[serde(default = "Limits::d_request")]
    pub request_timeout_sec: f64,
    /// Open connections per peer address; more are closed at once.
    #[serde(default = "Limits::d_per_peer")]
    pub max_connections_per_peer: usize,
    /// Open connections in all.
    #[serde(default = "Limits::d_total")]
    pub max_connections: usize,
    /// Request bodies (the protocol's limit: 1 MiB).
    #[serde(default = "Limits::d_body")]
    pub max_body_bytes: usize,
    /// An SBOM document a box delivers beside its sbom bundle (PUT .../sbom).
    #[serde(default = "Limits::d_sbom")]
    pub max_sbom_bytes: usize,
}

impl Limits {
    fn d_handshake() -> f64 {
        10.0
    }
    fn d_header() -> f64 {
        30.0
    }
    fn d_request() -> f64 {
        30.0
    }
    fn d_per_peer() -> usize {
        64
    }
    fn d_total() -> usize {
        4096
    }
    fn d_body() -> usize {
        1024 * 1024
    }
    fn d_sbom() -> usize {
        32 * 1024 * 1024
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_sec: Self::d_handshake(),
            header_timeout_sec: Self::d_header(),
            request_timeout_sec: Self::d_request(),
            max_connections_per_peer: Self::d_per_peer(),
            max_connections: Self::d_total(),
            max_body_bytes: Self::d_body(),
            max_sbom_bytes: Self::d_sbom(),
        }
    }
}

/// The S3 archive with Object Lock (`[archive_s3]`); without it, the local directory.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// A bucket created with Object Lock (which enables versioning).
    pub bucket: String,
    /// For MinIO and other S3-compatible stores, e.g. `https://minio.internal:9000`;
    /// default: AWS S3 of `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "S3Settings::d_region")]
    pub region: String,
    /// Bucket in the path rather than the host name (MinIO wants this).
    #[serde(default)]
    pub force_path_style: bool,
    /// Key prefix before `RESELLER/SITE/HOST/...`; default none.
    #[serde(default)]
    pub prefix: String,
    /// Default: `$AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// A file holding the secret key (LoadCredential on NixOS); default: `$AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

impl S3Settings {
    fn d_region() -> String {
        "us-east-1".into()
    }

    /// What is wrong with these settings, each with the fix.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let b = &self.bucket;
        let valid = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && b.starts_with(|c: char| c.is_ascii_alphanumeric())
            && b.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            p.push(format!(
                "archive_s3.bucket = {b:?}: a bucket name is 3-63 of a-z, 0-9, '.', '-', starting and ending with a letter or digit"
            ));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            p.push(format!("archive_s3.endpoint = {e:?} must start with https:// (or http:// on a private network)"));
        }
        if self.region.is_empty() {
            p.push("archive_s3.region must not be empty (MinIO accepts us-east-1)".into());
        }
        p
    }
}

/// Central guardrails applied before the server signs an order.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrderPolicy {
    /// Seconds between two orders of one runbook for one host (the prototype's rate key).
    #[serde(default = "OrderPolicy::d_cooldown")]
    pub cooldown_sec: u64,
    #[serde(default = "OrderPolicy::d_ttl_min")]
    pub ttl_min_sec: u64,
    #[serde(default = "OrderPolicy::d_ttl_max")]
    pub ttl_max_sec: u64,
    #[serde(default = "OrderPolicy::d_ttl")]
    pub default_ttl_sec: u64,
    /// Runbooks that need a second operator's approval before they are signed.
    #[serde(default = "OrderPolicy::d_disruptive")]
    pub disruptive_runbooks: Vec<String>,
    /// The allowlist a new site starts with.
    #[serde(default = "OrderPolicy::d_allowlist")]
    pub default_site_allowlist: Vec<String>,
}

impl OrderPolicy {
    fn d_cooldown() -> u64 {
        300
    }
    fn d_ttl_min() -> u64 {
        60
    }
    fn d_ttl_max() -> u64 {
        86_400
    }
    fn d_ttl() -> u64 {
        900
    }
    fn d_disruptive() -> Vec<String> {
        [
            "switch_generation",
            "rollback_generation",
            "stop_unit",
            "restart_unit",
        ]
        .map(String::from)
        .to_vec()
    }
    fn d_allowlist() -> Vec<String> {
        vec![compliance_agent::orders::COLLECT_EVIDENCE.into()]
    }
}

impl Default for OrderPolicy {
    fn default() -> Self {
        Self {
            cooldown_sec: Self::d_cooldown(),
            ttl_min_sec: Self::d_ttl_min(),
            ttl_max_sec: Self::d_ttl_max(),
            default_ttl_sec: Self::d_ttl(),
            disruptive_runbooks: Self::d_disruptive(),
            default_site_allowlist: Self::d_allowlist(),
        }
    }
}

/// The web console on the operator listener (`[console]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    /// Serve the console under /console.
    #[serde(default = "ConsoleSettings::d_enable")]
    pub enable: bool,
    /// How long a sign-in lasts, seconds (the session then ends whatever the browser does).
    #[serde(default = "ConsoleSettings::d_ttl")]
    pub session_ttl_sec: u64,
}

impl ConsoleSettings {
    fn d_enable() -> bool {
        true
    }
    fn d_ttl() -> u64 {
        8 * 3600
    }
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            enable: Self::d_enable(),
            session_ttl_sec: Self::d_ttl(),
        }
    }
}

/// Who may read `/metrics` on the operator listener.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAccess {
    /// Not served.
    Off,
    /// `Authorization: Bearer <operator token>`; the figures cover that operator's tenants.
    Token,
    /// Peers on a loopback address, without a token; the figures cover the whole fleet.
    Loopback,
}

/// Fleet metrics for Prometheus (`[metrics]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    #[serde(default = "MetricsSettings::d_access")]
    pub access: MetricsAccess,
}

impl MetricsSettings {
    fn d_access() -> MetricsAccess {
        MetricsAccess::Token
    }
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            access: Self::d_access(),
        }
    }
}

/// What the executor does with a site's plans.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorMode {
    /// Non-disruptive plans become orders at once; disruptive ones wait for an operator.
    Auto,
    /// Every plan waits for an operator.
    Approve,
    /// No plan becomes an order, automatically or by an operator through the executor.
    Off,
}

impl ExecutorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorMode::Auto => "auto",
            ExecutorMode::Approve => "approve",
            ExecutorMode::Off => "off",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Auto, Self::Approve, Self::Off]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// The optional LLM planner: an OpenAI-compatible chat-completions endpoint.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// The chat-completions URL, e.g. `https://llm.internal/v1/chat/completions`.
    pub url: String,
    pub model: String,
    /// A file holding the API key (LoadCredential on NixOS); none for an endpoint without one.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// CA certificates (PEM) the endpoint's certificate must chain to; default: the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The whole call, connect to last byte; past it the rule-based plan is used.
    #[serde(default = "LlmSettings::d_timeout")]
    pub timeout_sec: f64,
}

impl LlmSettings {
    fn d_timeout() -> f64 {
        10.0
    }
}

/// Incidents, the planner and the executor (`[remediation]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Remediation {
    /// The executor mode of a site that has none set (`mcp-server sites mode`).
    #[serde(default = "Remediation::d_mode")]
    pub default_site_mode: ExecutorMode,
    /// How often the executor looks for incidents to plan when nothing woke it.
    #[serde(default = "Remediation::d_worker")]
    pub worker_interval_ms: u64,
    /// How often the sweep looks for overdue hosts and orders past their TTL.
    #[serde(default = "Remediation::d_sweep")]
    pub sweep_interval_sec: u64,
    /// Incidents one executor pass takes.
    #[serde(default = "Remediation::d_batch")]
    pub batch: u32,
    /// The LLM planner; without it the rule-based planner alone.
    #[serde(default)]
    pub llm: Option<LlmSettings>,
}

impl Remediation {
    fn d_mode() -> ExecutorMode {
        ExecutorMode::Approve
    }
    fn d_worker() -> u64 {
        1000
    }
    fn d_sweep() -> u64 {
        60
    }
    fn d_batch() -> u32 {
        64
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(10..=60_000).contains(&self.worker_interval_ms) {
            p.push("remediation.worker_interval_ms must be between 10 and 60000".into());
        }
        if !(1..=3600).contains(&self.sweep_interval_sec) {
            p.push("remediation.sweep_interval_sec must be between 1 and 3600".into());
        }
        if !(1..=10_000).contains(&self.batch) {
            p.push("remediation.batch must be between 1 and 10000".into());
        }
        if let Some(llm) = &self.llm {
            if !(llm.url.starts_with("https://") || llm.url.starts_with("http://")) {
                p.push(format!(
                    "remediation.llm.url = {:?} must start with https:// (or http:// on a private network)",
                    llm.url
                ));
            }
            if llm.model.trim().is_empty() {
                p.push("remediation.llm.model must name the model, e.g. \"llama3.1:8b\"".into());
            }
            if !(llm.timeout_sec.is_finite() && (0.1..=120.0).contains(&llm.timeout_sec)) {
                p.push(format!(
                    "remediation.llm.timeout_sec = {}: must be between 0.1 and 120 seconds",
                    llm.timeout_sec
                ));
            }
            for (name, path) in [
                ("api_key_file", &llm.api_key_file),
                ("ca_file", &llm.ca_file),
            ] {
                if let Some(path) = path
                    && !path.is_absolute()
                {
                    p.push(format!(
                        "remediation.llm.{name} = {:?} must be an absolute path",
                        path.display()
                    ));
                }
            }
        }
        p
    }
}

impl Default for Remediation {
    fn default() -> Self {
        Self {
            default_site_mode: Self::d_mode(),
            worker_interval_ms: Self::d_worker(),
            sweep_interval_sec: Self::d_sweep(),
            batch: Self::d_batch(),
            llm: None,
        }
    }
}

/// The server's configuration. Paths left out are derived from `state_dir`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `sqlite:PATH` or `postgres://user:password@host:port/db` (a Unix socket
    /// directory as a percent-encoded host: `postgres://mcp@%2Frun%2Fpostgresql/mcp`);
    /// default `sqlite:<state_dir>/mcp.db`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The local archive directory; default `<state_dir>/archive`. Not with `[archive_s3]`.
    #[serde(default)]
    pub archive_dir: Option<PathBuf>,
    /// The S3 archive with Object Lock instead of the local directory.
    #[serde(default)]
    pub archive_s3: Option<S3Settings>,
    #[serde(default = "default_retention_days")]
    pub archive_retention_days: u32,
    #[serde(default = "default_agent_listen")]
    pub agent_listen: SocketAddr,
    #[serde(default = "default_operator_listen")]
    pub operator_listen: SocketAddr,
    /// DNS names and IP addresses in the server certificate made on first start.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// The agent listener's URL as boxes reach it (returned at enrollment); default from agent_listen.
    #[serde(default)]
    pub public_url: Option<String>,
    /// TLS certificate chain and key of both listeners; default: made by the CA on first start.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates client certificates must chain to; default: the enrollment CA.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Directory of the enrollment CA (ca.pem, ca.key); default `<state_dir>/ca`.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// The Ed25519 order key (PKCS#8 PEM); default `<state_dir>/order-signing.key`.
    #[serde(default)]
    pub order_key_file: Option<PathBuf>,
    /// The transparency log's Ed25519 key (PKCS#8 PEM), separate from the order key;
    /// default `<state_dir>/log-signing.key` (made on first start). Its verifier key is
    /// written to `<state_dir>/log.vkey`.
    #[serde(default)]
    pub log_key_file: Option<PathBuf>,
    /// The Ed25519 key that signs auditor exports' manifests (PKCS#8 PEM), separate from
    /// the order and log keys; default `<state_dir>/export-signing.key` (made on first
    /// export). Its public key is written to `<state_dir>/export-signing.pub.pem`.
    #[serde(default)]
    pub export_key_file: Option<PathBuf>,
    /// The log's name on its checkpoints (and its key's name); default
    /// `<first of server_names>/compliance-log`.
    #[serde(default)]
    pub log_origin: Option<String>,
    /// Where the first admin token is written on first start; default `<state_dir>/admin.token`.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// When set, agents must also send `Authorization: Bearer <contents>`.
    #[serde(default)]
    pub agent_api_key_file: Option<PathBuf>,
    /// Scan interval assumed for a host (overdue after twice this).
    #[serde(default = "default_scan_interval")]
    pub default_scan_interval_sec: u64,
    #[serde(default = "default_client_cert_days")]
    pub client_cert_days: u32,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub orders: OrderPolicy,
    /// The Model Context Protocol server (`[mcp]`).
    #[serde(default)]
    pub mcp: crate::tools::McpSettings,
    #[serde(default)]
    pub console: ConsoleSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub remediation: Remediation,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded default is the empty file.
        toml::from_str("").unwrap_or_else(|_| unreachable_default())
    }
}

// An empty TOML document always deserialises into the defaults above.
fn unreachable_default() -> Config {
    Config {
        state_dir: default_state_dir(),
        database_url: None,
        archive_dir: None,
        archive_s3: None,
        archive_retention_days: default_retention_days(),
        agent_listen: default_agent_listen(),
        operator_listen: default_operator_listen(),
        server_names: default_server_names(),
        public_url: None,
        tls_cert_file: None,
        tls_key_file: None,
        client_ca_file: None,
        ca_dir: None,
        order_key_file: None,
        log_key_file: None,
        export_key_file: None,
        log_origin: None,
        admin_token_file: None,
        agent_api_key_file: None,
        default_scan_interval_sec: default_scan_interval(),
        client_cert_days: default_client_cert_days(),
        limits: Limits::default(),
        orders: OrderPolicy::default(),
        mcp: crate::tools::McpSettings::default(),
        console: ConsoleSettings::default(),
        metrics: MetricsSettings::default(),
        remediation: Remediation::default(),
    }
}

/// Where the server keeps things, with every default applied.
#[derive(Clone, Debug)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub database: PathBuf,
    pub archive_dir: PathBuf,
    pub ca_dir: PathBuf,
    pub order_key: PathBuf,
    pub order_pubkey: PathBuf,
    pub log_key: PathBuf,
    pub log_vkey: PathBuf,
    pub export_key: PathBuf,
    pub export_pubkey: PathBuf,
    pub admin_token: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

impl Config {
    /// Reads and validates a file; with `None`, the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Every problem at once, each with the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Some(url) = &self.database_url {
            if crate::store::is_postgres_url(url) {
                if let Err(e) = url.parse::<postgres::Config>() {
                    problems.push(format!(
                        "database_url is not a valid PostgreSQL URL: {e} (write postgres://user:password@host:port/db)"
                    ));
                }
            } else if crate::store::sqlite_path(url).is_none() {
                problems.push(format!(
                    "database_url = {url:?}: use sqlite:PATH or postgres://user:password@host:port/db"
                ));
            }
        }
        if let Some(s3) = &self.archive_s3 {
            problems.extend(s3.problems());
            if self.archive_dir.is_some() {
                problems.push(
                    "archive_dir and [archive_s3] are two archives: set one (S3 with Object Lock for production)".into(),
                );
            }
        }
        if self.archive_retention_days == 0 {
            problems.push(
                "archive_retention_days must be at least 1 (HIPAA asks six years: 2190)".into(),
            );
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            problems.push("tls_cert_file and tls_key_file go together: set both or neither".into());
        }
        if self.server_names.is_empty() {
            problems.push("server_names must name at least one DNS name or IP address".into());
        }
        if let Some(url) = &self.public_url
            && !url.starts_with("https://")
        {
            problems.push(format!("public_url = {url:?} must start with https://"));
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.handshake_timeout_sec", l.handshake_timeout_sec),
            ("limits.header_timeout_sec", l.header_timeout_sec),
            ("limits.request_timeout_sec", l.request_timeout_sec),
        ] {
            if !(v.is_finite() && (0.05..=3600.0).contains(&v)) {
                problems.push(format!(
                    "{name} = {v}: must be between 0.05 and 3600 seconds"
                ));
            }
        }
        if l.max_connections_per_peer == 0 || l.max_connections < l.max_connections_per_peer {
            problems.push(
                "limits.max_connections_per_peer must be at least 1 and at most limits.max_connections".into(),
            );
        }
        if l.max_body_bytes < 4096 {
            problems.push("limits.max_body_bytes must be at least 4096".into());
        }
        if !(4096..=compliance_agent::evidence::Attachment::MAX_BYTES).contains(&l.max_sbom_bytes) {
            problems.push(format!(
                "limits.max_sbom_bytes must be from 4096 to {} (the largest attachment a box writes)",
                compliance_agent::evidence::Attachment::MAX_BYTES
            ));
        }
        let o = &self.orders;
        if o.ttl_min_sec < compliance_agent::orders::MIN_TTL_SEC
            || o.ttl_max_sec > compliance_agent::orders::MAX_TTL_SEC
            || o.ttl_min_sec > o.ttl_max_sec
            || !(o.ttl_min_sec..=o.ttl_max_sec).contains(&o.default_ttl_sec)
        {
            problems.push(format!(
                "orders: need {} <= ttl_min_sec <= default_ttl_sec <= ttl_max_sec <= {} (the agent's bounds)",
                compliance_agent::orders::MIN_TTL_SEC,
                compliance_agent::orders::MAX_TTL_SEC
            ));
        }
        for r in o
            .disruptive_runbooks
            .iter()
            .chain(&o.default_site_allowlist)
        {
            if !compliance_agent::runbook_ids::RUNBOOK_IDS.contains(&r.as_str()) {
                problems.push(format!(
                    "orders: runbook {r:?} is unknown; known: {}",
                    compliance_agent::runbook_ids::RUNBOOK_IDS.join(", ")
                ));
            }
        }
        problems.extend(self.remediation.problems());
        let origin = self.log_origin();
        if origin.is_empty()
            || origin
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '+')
        {
            problems.push(format!(
                "log_origin = {origin:?}: the log's name is one word without spaces or '+', e.g. msp.example/compliance-log"
            ));
        }
        if self.default_scan_interval_sec < 10 {
            problems.push("default_scan_interval_sec must be at least 10".into());
        }
        if !(1..=825).contains(&self.client_cert_days) {
            problems.push("client_cert_days must be between 1 and 825".into());
        }
        if !(300..=7 * 86_400).contains(&self.console.session_ttl_sec) {
            problems.push(format!(
                "console.session_ttl_sec = {}: must be between 300 (5 minutes) and 604800 (7 days)",
                self.console.session_ttl_sec
            ));
        }
        if self.metrics.access == MetricsAccess::Loopback
            && !self.operator_listen.ip().is_loopback()
        {
            problems.push(format!(
                "metrics.access = \"loopback\" serves the whole fleet without a token, but operator_listen = {} is reachable from other machines: use access = \"token\" (Prometheus sends an operator token) or listen on 127.0.0.1",
                self.operator_listen
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    pub fn paths(&self) -> Paths {
        let s = &self.state_dir;
        // The SQLite file (unused when database_url names PostgreSQL).
        let database = self
            .database_url
            .as_deref()
            .and_then(crate::store::sqlite_path)
            .unwrap_or_else(|| s.join("mcp.db"));
        let order_key = self
            .order_key_file
            .clone()
            .unwrap_or_else(|| s.join("order-signing.key"));
        let log_key = self
            .log_key_file
            .clone()
            .unwrap_or_else(|| s.join("log-signing.key"));
        Paths {
            state_dir: s.clone(),
            // In state_dir, not beside the key: the key may be a read-only credential.
            log_vkey: s.join("log.vkey"),
            log_key,
            export_key: self
                .export_key_file
                .clone()
                .unwrap_or_else(|| s.join("export-signing.key")),
            export_pubkey: s.join("export-signing.pub.pem"),
            database,
            archive_dir: self
                .archive_dir
                .clone()
                .unwrap_or_else(|| s.join("archive")),
            ca_dir: self.ca_dir.clone().unwrap_or_else(|| s.join("ca")),
            order_pubkey: order_key.with_file_name("order-signing.pub.pem"),
            order_key,
            admin_token: self
                .admin_token_file
                .clone()
                .unwrap_or_else(|| s.join("admin.token")),
            tls_cert: self
                .tls_cert_file
                .clone()
                .unwrap_or_else(|| s.join("tls/server.pem")),
            tls_key: self
                .tls_key_file
                .clone()
                .unwrap_or_else(|| s.join("tls/server.key")),
        }
    }

    /// The transparency log's origin line (and key name).
    pub fn log_origin(&self) -> String {
        self.log_origin.clone().unwrap_or_else(|| {
            format!(
                "{}/compliance-log",
                self.server_names
                    .first()
                    .map_or("mcp-server", String::as_str)
            )
        })
    }

    /// The URL boxes use for the agent listener.
    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.agent_listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let c = Config::default();
        assert_eq!(c.validate().ok(), Some(()), "default validates");
        assert_eq!(c.agent_listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.operator_listen.to_string(), "127.0.0.1:9443");
        assert_eq!(c.paths().database, PathBuf::from("./mcp-state/mcp.db"));
        assert_eq!(c.orders.cooldown_sec, 300, "the prototype's cooldown");
        assert_eq!(c.archive_retention_days, 2190, "six years");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "state_dri = \"/x\"\n")?;
        let err = Config::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown field `state_dri`"), "{err}");
        std::fs::write(
            &path,
            "database_url = \"mysql://x\"\narchive_retention_days = 0\ntls_cert_file = \"/c\"\n[limits]\nhandshake_timeout_sec = 0\n",
        )?;
        let err = Config::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for needle in [
            "database_url",
            "archive_retention_days",
            "tls_key_file",
            "handshake_timeout_sec",
        ] {
            assert!(err.contains(needle), "names {needle}: {err}");
        }
        Ok(())
    }

    /// The database and archive choices: each wrong value is named with the fix.
    #[test]
    fn database_and_archive_choices_are_checked() {
        let parse = |text: &str| -> String {
            toml::from_str::<Config>(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .err()
                .unwrap_or_default()
        };
        assert_eq!(
            parse("database_url = \"postgres://mcp@%2Frun%2Fpostgresql/mcp\""),
            ""
        );
        assert_eq!(parse("database_url = \"sqlite:/var/lib/mcp/mcp.db\""), "");
        let err = parse("database_url = \"postgres://mcp@host:notaport/mcp\"");
        assert!(err.contains("not a valid PostgreSQL URL"), "{err}");
        assert_eq!(
            parse(
                "[archive_s3]\nbucket = \"evidence\"\nendpoint = \"https://minio:9000\"\nforce_path_style = true\n"
            ),
            ""
        );
        let err = parse(
            "archive_dir = \"/a\"\n[archive_s3]\nbucket = \"Bad_Bucket\"\nendpoint = \"minio:9000\"\n",
        );
        for needle in ["archive_s3.bucket", "archive_s3.endpoint", "two archives"] {
            assert!(err.contains(needle), "names {needle}: {err}");
        }
        let err = parse("[archive_s3]\nbucket = \"evidence\"\nsecret = \"x\"\n");
        assert!(err.contains("unknown field `secret`"), "{err}");
    }

    /// Incidents and the planner: modes are named, the LLM settings are checked, and an
    /// unknown key (a misspelt secret, say) is refused like everywhere else.
    #[test]
    fn remediation_settings_are_checked() {
        let parse = |text: &str| -> String {
            toml::from_str::<Config>(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
                .err()
                .unwrap_or_default()
        };
        assert_eq!(
            Config::default().remediation.default_site_mode,
            ExecutorMode::Approve,
            "plans wait for an operator unless a site says otherwise"
        );
        assert_eq!(
            parse(
                "[remediation]\ndefault_site_mode = \"auto\"\n[remediation.llm]\nurl = \"http://127.0.0.1:8080/v1/chat/completions\"\nmodel = \"m\"\napi_key_file = \"/run/credentials/llm\"\n"
            ),
            ""
        );
        let err = parse("[remediation]\ndefault_site_mode = \"yolo\"\n");
        assert!(err.contains("unknown variant `yolo`"), "{err}");
        let err = parse("[remediation.llm]\nurl = \"x\"\nmodel = \"m\"\napi_key = \"sk-1\"\n");
        assert!(err.contains("unknown field `api_key`"), "{err}");
        let err = parse(
            "[remediation]\nworker_interval_ms = 0\n[remediation.llm]\nurl = \"ftp://x\"\nmodel = \" \"\napi_key_file = \"key\"\ntimeout_sec = 0\n",
        );
        for needle in [
            "worker_interval_ms",
            "remediation.llm.url",
            "remediation.llm.model",
            "remediation.llm.timeout_sec",
            "remediation.llm.api_key_file",
        ] {
            assert!(err.contains(needle), "names {needle}: {err}");
        }
    }
}
