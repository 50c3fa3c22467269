//! The agent's configuration: a TOML file, environment overrides, an embedded local default, validation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::schedule::MaintenanceWindow;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "COMPLIANCE_AGENT_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("{}", render_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn render_issues(issues: &[ConfigIssue]) -> String {
    let mut out = format!("the configuration has {} problem(s):", issues.len());
    for issue in issues {
        out.push_str(&format!("\n  - {issue}"));
    }
    out
}

/// One validation problem: which key, what is wrong and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentMode {
    /// The box is managed by a reseller MSP on behalf of the clinic.
    Reseller,
    /// The box is managed directly.
    Direct,
}

impl DeploymentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reseller => "reseller",
            Self::Direct => "direct",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Some(Self::Debug),
            "INFO" => Some(Self::Info),
            "WARNING" | "WARN" => Some(Self::Warning),
            "ERROR" => Some(Self::Error),
            "CRITICAL" => Some(Self::Critical),
            _ => None,
        }
    }

    /// The matching `tracing` filter directive.
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warning => "warn",
            Self::Error | Self::Critical => "error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreTestSchedule {
    Daily,
    Weekly,
    Monthly,
}

impl RestoreTestSchedule {
    /// How old the last restore test may be before it is overdue.
    pub fn max_age_days(self) -> u32 {
        match self {
            Self::Daily => 1,
            Self::Weekly => 7,
            Self::Monthly => 31,
        }
    }
}

/// The file as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site_id: Option<String>,
    host_id: Option<String>,
    deployment_mode: Option<DeploymentMode>,
    reseller_id: Option<String>,
    mcp_url: Option<String>,
    mcp_api_key_file: Option<PathBuf>,
    mcp_poll_interval_sec: Option<u64>,
    mcp_order_pubkey_file: Option<PathBuf>,
    ca_cert_file: Option<PathBuf>,
    evidence_dir: Option<PathBuf>,
    evidence_retention_days: Option<u32>,
    maintenance_window: Option<String>,
    timezone: Option<String>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    signing_key_file: Option<PathBuf>,
    baseline_path: Option<PathBuf>,
    policy_version: Option<String>,
    auto_apply_updates: Option<bool>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    ntp_max_skew_ms: Option<u64>,
    backup_path: Option<PathBuf>,
    restore_test_schedule: Option<RestoreTestSchedule>,
    av_health_check: Option<bool>,
    firewall_enforce: Option<bool>,
    encryption_verify: Option<bool>,
    service_health_checks: Option<Vec<String>>,
    custom_checks_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    metrics_dir: Option<PathBuf>,
    upload_backoff_base_sec: Option<u64>,
    upload_backoff_cap_sec: Option<u64>,
    upload_max_attempts: Option<u32>,
    order_max_clock_skew_sec: Option<u64>,
    health_check_timeout_sec: Option<u64>,
    restart_cooldown_sec: Option<u64>,
    order_runbook_allowlist: Option<Vec<String>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Integer,
    Bool,
    List,
}

/// Every key, its type for environment overrides. The environment name is
/// the key in upper case (SITE_ID, MCP_URL, ...), as in the platform spec.
const KEYS: &[(&str, Kind)] = &[
    ("site_id", Kind::Text),
    ("host_id", Kind::Text),
    ("deployment_mode", Kind::Text),
    ("reseller_id", Kind::Text),
    ("mcp_url", Kind::Text),
    ("mcp_api_key_file", Kind::Text),
    ("mcp_poll_interval_sec", Kind::Integer),
    ("mcp_order_pubkey_file", Kind::Text),
    ("ca_cert_file", Kind::Text),
    ("evidence_dir", Kind::Text),
    ("evidence_retention_days", Kind::Integer),
    ("maintenance_window", Kind::Text),
    ("timezone", Kind::Text),
    ("client_cert_file", Kind::Text),
    ("client_key_file", Kind::Text),
    ("signing_key_file", Kind::Text),
    ("baseline_path", Kind::Text),
    ("policy_version", Kind::Text),
    ("auto_apply_updates", Kind::Bool),
    ("log_level", Kind::Text),
    ("log_file", Kind::Text),
    ("ntp_max_skew_ms", Kind::Integer),
    ("backup_path", Kind::Text),
    ("restore_test_schedule", Kind::Text),
    ("av_health_check", Kind::Bool),
    ("firewall_enforce", Kind::Bool),
    ("encryption_verify", Kind::Bool),
    ("service_health_checks", Kind::List),
    ("custom_checks_dir", Kind::Text),
    ("state_dir", Kind::Text),
    ("metrics_dir", Kind::Text),
    ("upload_backoff_base_sec", Kind::Integer),
    ("upload_backoff_cap_sec", Kind::Integer),
    ("upload_max_attempts", Kind::Integer),
    ("order_max_clock_skew_sec", Kind::Integer),
    ("health_check_timeout_sec", Kind::Integer),
    ("restart_cooldown_sec", Kind::Integer),
    ("order_runbook_allowlist", Kind::List),
];

/// Which configured files must already exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileChecks {
    /// Every configured file exists (what `run`, `scan` and the rest need).
    All,
    /// Before `enroll`: the CA, client certificate, client key and order key
    /// it is about to write may be missing (a box's configuration names them
    /// before its first enrollment); anything else in their place is still an error.
    BeforeEnrollment,
}

/// The files `compliance-agent enroll` writes.
pub const ENROLLMENT_FILES: &[&str] = &[
    "ca_cert_file",
    "client_cert_file",
    "client_key_file",
    "mcp_order_pubkey_file",
];

/// Where the configuration came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum ConfigSource {
    File(PathBuf),
    /// No file: the local default for trying the agent on any machine.
    Embedded,
}

/// The effective, validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub source: ConfigSource,
    pub site_id: String,
    pub host_id: String,
    pub deployment_mode: DeploymentMode,
    pub reseller_id: Option<String>,
    /// Absent: the agent works offline and keeps evidence locally.
    pub mcp_url: Option<String>,
    pub mcp_api_key_file: Option<PathBuf>,
    pub mcp_poll_interval_sec: u64,
    pub mcp_order_pubkey_file: Option<PathBuf>,
    pub ca_cert_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub evidence_dir: PathBuf,
    pub evidence_retention_days: u32,
    #[serde(serialize_with = "serialize_display")]
    pub maintenance_window: MaintenanceWindow,
    pub timezone: String,
    pub signing_key_file: PathBuf,
    pub baseline_path: Option<PathBuf>,
    pub policy_version: String,
    pub auto_apply_updates: bool,
    pub log_level: LogLevel,
    pub log_file: Option<PathBuf>,
    pub ntp_max_skew_ms: u64,
    pub backup_path: Option<PathBuf>,
    pub restore_test_schedule: RestoreTestSchedule,
    pub av_health_check: bool,
    pub firewall_enforce: bool,
    pub encryption_verify: bool,
    pub service_health_checks: Vec<String>,
    pub custom_checks_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub metrics_dir: Option<PathBuf>,
    /// First retry delay of an upload; doubles per failed attempt.
    pub upload_backoff_base_sec: u64,
    /// Longest retry delay of an upload.
    pub upload_backoff_cap_sec: u64,
    /// Refusals by the MCP after which an upload is parked as failed (an
    /// unreachable MCP never parks anything).
    pub upload_max_attempts: u32,
    /// How far in the future an order's issued_at may lie (clock skew between MCP and box).
    pub order_max_clock_skew_sec: u64,
    /// How long the services in service_health_checks (and the MCP) may take
    /// to be healthy after a generation switch before it is rolled back.
    pub health_check_timeout_sec: u64,
    /// Least time between two restarts (or stops) of the same unit by the agent.
    pub restart_cooldown_sec: u64,
    /// Runbooks that MCP orders may run.
    pub order_runbook_allowlist: Vec<String>,
}

fn serialize_display<S: serde::Serializer, T: fmt::Display>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The process environment, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// Whether `name` is set to something that is not UTF-8 (refused, never ignored).
    fn not_unicode(&self, _name: &str) -> bool {
        false
    }
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn not_unicode(&self, name: &str) -> bool {
        matches!(std::env::var(name), Err(std::env::VarError::NotUnicode(_)))
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// The bounds of evidence_retention_days, for the config and for `evidence prune --retention-days`.
pub fn check_retention_days(days: u32) -> Result<(), String> {
    if days == 0 {
        return Err(
            "must be at least 1 (evidence older than this may be pruned once delivered)".into(),
        );
    }
    Ok(())
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/compliance-agent";
const LOCAL_STATE_DIR: &str = "compliance-state";

impl Config {
    /// Loads the file named by `path`, else by `$COMPLIANCE_AGENT_CONFIG`, else
    /// the embedded local default; environment overrides apply in every case.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(path, &ProcessEnv)
    }

    pub fn load_with(path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::load_checked(path, env, FileChecks::All)
    }

    /// Loads as [`Config::load`] does, for `enroll`: the files enrollment
    /// writes need not exist yet ([`FileChecks::BeforeEnrollment`]).
    pub fn load_for_enrollment(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_checked(path, &ProcessEnv, FileChecks::BeforeEnrollment)
    }

    fn load_checked(
        path: Option<&Path>,
        env: &dyn Env,
        checks: FileChecks,
    ) -> Result<Self, ConfigError> {
        let from_env = env
            .var(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match path.map(Path::to_owned).or(from_env) {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml_checked(&text, ConfigSource::File(path), env, checks)
            }
            None => Self::from_toml_checked("", ConfigSource::Embedded, env, checks),
        }
    }

    /// Parses TOML text, applies the environment and validates.
    pub fn from_toml(text: &str, source: ConfigSource, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::from_toml_checked(text, source, env, FileChecks::All)
    }

    /// [`Config::from_toml`] with the given file checks.
    pub fn from_toml_checked(
        text: &str,
        source: ConfigSource,
        env: &dyn Env,
        checks: FileChecks,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: match &source {
                ConfigSource::File(p) => p.clone(),
                ConfigSource::Embedded => PathBuf::from("(embedded default)"),
            },
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        apply_env(&mut table, env)?;
        let raw = RawConfig::deserialize(table).map_err(|e| parse_err(e.to_string()))?;
        resolve(raw, source, env, checks)
    }

    /// Whether a missing signing key may be created on first use (only for the local default).
    pub fn creates_signing_key(&self) -> bool {
        self.source == ConfigSource::Embedded
    }

    /// The public key file written beside the signing key by `keygen`.
    pub fn signing_pubkey_file(&self) -> PathBuf {
        public_key_path(&self.signing_key_file)
    }
}

/// `signing.key` -> `signing.pub.pem` in the same directory.
pub fn public_key_path(private: &Path) -> PathBuf {
    let stem = private
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "signing".into());
    private.with_file_name(format!("{stem}.pub.pem"))
}

fn apply_env(table: &mut toml::Table, env: &dyn Env) -> Result<(), ConfigError> {
    for (key, kind) in KEYS {
        let var = key.to_ascii_uppercase();
        if env.not_unicode(&var) {
            return Err(ConfigError::Env {
                value: String::new(),
                message: "is not valid UTF-8; set it to UTF-8 text or unset it".into(),
                var,
            });
        }
        let Some(value) = env.var(&var).filter(|v| !v.is_empty()) else {
            continue;
        };
        let bad = |message: &str| ConfigError::Env {
            var: var.clone(),
            value: value.clone(),
            message: message.to_owned(),
        };
        let parsed = match kind {
            Kind::Text => toml::Value::String(value.clone()),
            Kind::Integer => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| bad("expected a whole number"))?,
            ),
            Kind::Bool => match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
                "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
                _ => return Err(bad("expected true or false")),
            },
            Kind::List => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
        };
        table.insert((*key).to_owned(), parsed);
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Site, host and reseller ids end up in URL paths and file names.
fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && id.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

struct Issues(Vec<ConfigIssue>);

impl Issues {
    /// A number of seconds within `range`, `default` when unset; out of range is an issue.
    fn seconds(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let v = value.unwrap_or(default);
        if !range.contains(&v) {
            self.add(
                key,
                format!(
                    "{v} is out of range; use {} to {} seconds (default {default})",
                    range.start(),
                    range.end()
                ),
            );
        }
        v
    }

    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.to_owned(),
            message: message.into(),
        });
    }
}

/// `%d/NAME` names a systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
fn expand_credential(key: &str, path: PathBuf, env: &dyn Env, issues: &mut Issues) -> PathBuf {
    let Ok(rest) = path.strip_prefix("%d") else {
        return path;
    };
    match env.var("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty()) {
        Some(dir) => Path::new(&dir).join(rest),
        None => {
            issues.add(
                key,
                format!(
                    "{} names a systemd credential but CREDENTIALS_DIRECTORY is not set; pass the file with LoadCredential= or give a plain path",
                    path.display()
                ),
            );
            path
        }
    }
}

fn require_file(key: &str, path: &Path, what: &str, issues: &mut Issues) {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => issues.add(
            key,
            format!(
                "{} is not a regular file; point {key} at the {what}",
                path.display()
            ),
        ),
        Err(e) => issues.add(
            key,
            format!(
                "{} cannot be read ({e}); point {key} at the {what}",
                path.display()
            ),
        ),
    }
}

fn resolve(
    raw: RawConfig,
    source: ConfigSource,
    env: &dyn Env,
    checks: FileChecks,
) -> Result<Config, ConfigError> {
    let mut issues = Issues(Vec::new());
    let embedded = source == ConfigSource::Embedded;

    let state_dir = raw.state_dir.unwrap_or_else(|| {
        if embedded {
            match env.var("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
                Some(xdg) => Path::new(&xdg).join("compliance-agent"),
                None => PathBuf::from(LOCAL_STATE_DIR),
            }
        } else {
            PathBuf::from(DEFAULT_STATE_DIR)
        }
    });

    let raw_site_given = raw.site_id.is_some();
    let site_id = match raw.site_id {
        Some(id) => id,
        None if embedded => "local".into(),
        None => {
            issues.add(
                "site_id",
                "missing; set site_id = \"<the clinic's site id>\" (or SITE_ID)",
            );
            String::new()
        }
    };
    if (raw_site_given || embedded) && !valid_id(&site_id) {
        issues.add("site_id", format!("{site_id:?} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"));
    }
    let host_id = raw.host_id.unwrap_or_else(hostname);
    if !valid_id(&host_id) {
        issues.add("host_id", format!("{host_id:?} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"));
    }

    let deployment_mode = raw.deployment_mode.unwrap_or(DeploymentMode::Direct);
    let reseller_id = raw.reseller_id.filter(|r| !r.is_empty());
    match (deployment_mode, &reseller_id) {
        (DeploymentMode::Reseller, None) => issues.add(
            "reseller_id",
            "deployment_mode is \"reseller\" but reseller_id is not set; set reseller_id = \"<the reseller's id>\" or use deployment_mode = \"direct\"",
        ),
        (DeploymentMode::Direct, Some(r)) => issues.add(
            "reseller_id",
            format!("is {r:?} but deployment_mode is \"direct\"; remove reseller_id or set deployment_mode = \"reseller\""),
        ),
        (_, Some(r)) if !valid_id(r) => issues.add("reseller_id", format!("{r:?} must be 1-64 letters, digits, '.', '_' or '-'")),
        _ => {}
    }

    let path_key = |key: &str, value: Option<PathBuf>, issues: &mut Issues| {
        value.map(|p| expand_credential(key, p, env, issues))
    };
    let mcp_api_key_file = path_key("mcp_api_key_file", raw.mcp_api_key_file, &mut issues);
    let mcp_order_pubkey_file = path_key(
        "mcp_order_pubkey_file",
        raw.mcp_order_pubkey_file,
        &mut issues,
    );
    let ca_cert_file = path_key("ca_cert_file", raw.ca_cert_file, &mut issues);
    let client_cert_file = path_key("client_cert_file", raw.client_cert_file, &mut issues);
    let client_key_file = path_key("client_key_file", raw.client_key_file, &mut issues);
    let signing_key_file = match path_key("signing_key_file", raw.signing_key_file, &mut issues) {
        Some(p) => p,
        None if embedded => state_dir.join("signing.key"),
        None => {
            issues.add(
                "signing_key_file",
                "missing; create a key with `compliance-agent keygen --out DIR` and set signing_key_file = \"DIR/signing.key\"",
            );
            PathBuf::new()
        }
    };
    // The local default creates its key on first use; a configured box must already have one.
    if !embedded && !signing_key_file.as_os_str().is_empty() {
        require_file(
            "signing_key_file",
            &signing_key_file,
            "Ed25519 signing key (create it with `compliance-agent keygen --out DIR`)",
            &mut issues,
        );
    }

    let mcp_url = raw.mcp_url.filter(|u| !u.is_empty());
    if let Some(url) = &mcp_url {
        if !url.starts_with("https://") {
            issues.add(
                "mcp_url",
                format!("{url:?} must start with https:// (the channel is mutual TLS)"),
            );
        }
        for (key, value, what) in [
            (
                "ca_cert_file",
                &ca_cert_file,
                "PEM CA certificate that signed the MCP's server certificate",
            ),
            (
                "client_cert_file",
                &client_cert_file,
                "PEM client certificate this box presents",
            ),
            (
                "client_key_file",
                &client_key_file,
                "PEM private key of the client certificate",
            ),
            (
                "mcp_order_pubkey_file",
                &mcp_order_pubkey_file,
                "MCP's order-signing public key (SPKI PEM)",
            ),
        ] {
            if value.is_none() {
                issues.add(key, format!("missing while mcp_url is set; set {key} to the {what}, or remove mcp_url to run offline"));
            }
        }
    }
    for (key, value, what) in [
        (
            "mcp_api_key_file",
            &mcp_api_key_file,
            "file holding the MCP API key",
        ),
        ("ca_cert_file", &ca_cert_file, "PEM CA certificate"),
        (
            "client_cert_file",
            &client_cert_file,
            "PEM client certificate",
        ),
        ("client_key_file", &client_key_file, "PEM client key"),
        (
            "mcp_order_pubkey_file",
            &mcp_order_pubkey_file,
            "MCP's order-signing public key",
        ),
    ] {
        if let Some(path) = value {
            let to_be_written = checks == FileChecks::BeforeEnrollment
                && ENROLLMENT_FILES.contains(&key)
                && std::fs::symlink_metadata(path)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
            if !to_be_written {
                require_file(key, path, what, &mut issues);
            }
        }
    }

    let mcp_poll_interval_sec = issues.seconds(
        "mcp_poll_interval_sec",
        raw.mcp_poll_interval_sec,
        60,
        5..=86_400,
    );
    let upload_backoff_base_sec = issues.seconds(
        "upload_backoff_base_sec",
        raw.upload_backoff_base_sec,
        30,
        1..=86_400,
    );
    let upload_backoff_cap_sec = raw.upload_backoff_cap_sec.unwrap_or(3600);
    if upload_backoff_cap_sec < upload_backoff_base_sec || upload_backoff_cap_sec > 604_800 {
        issues.add(
            "upload_backoff_cap_sec",
            format!(
                "{upload_backoff_cap_sec} is out of range; use upload_backoff_base_sec ({upload_backoff_base_sec}) to 604800 seconds (default 3600)"
            ),
        );
    }
    let upload_max_attempts = raw.upload_max_attempts.unwrap_or(10);
    if upload_max_attempts == 0 {
        issues.add(
            "upload_max_attempts",
            "must be at least 1 (default 10 refusals by the MCP before a bundle is parked)",
        );
    }
    let health_check_timeout_sec = issues.seconds(
        "health_check_timeout_sec",
        raw.health_check_timeout_sec,
        60,
        1..=3600,
    );
    let restart_cooldown_sec = issues.seconds(
        "restart_cooldown_sec",
        raw.restart_cooldown_sec,
        30,
        0..=86_400,
    );
    let order_max_clock_skew_sec = issues.seconds(
        "order_max_clock_skew_sec",
        raw.order_max_clock_skew_sec,
        300,
        0..=3600,
    );
    let order_runbook_allowlist = raw
        .order_runbook_allowlist
        .unwrap_or_else(|| vec![crate::runbook_ids::COLLECT_EVIDENCE.to_owned()]);
    for runbook in &order_runbook_allowlist {
        if !crate::runbook_ids::RUNBOOK_IDS.contains(&runbook.as_str()) {
            issues.add(
                "order_runbook_allowlist",
                format!(
                    "{runbook:?} is not a runbook this agent has; use some of {}",
                    crate::runbook_ids::RUNBOOK_IDS.join(", ")
                ),
            );
        }
    }
    let evidence_retention_days = raw.evidence_retention_days.unwrap_or(90);
    if let Err(e) = check_retention_days(evidence_retention_days) {
        issues.add("evidence_retention_days", e);
    }

    let timezone = raw.timezone.unwrap_or_else(|| "UTC".into());
    let window_text = raw
        .maintenance_window
        .unwrap_or_else(|| "02:00-04:00".into());
    let window = MaintenanceWindow::parse(&window_text, &timezone);
    if let Err(e) = &window {
        let key = match e {
            crate::schedule::WindowError::TimeZone(_) => "timezone",
            _ => "maintenance_window",
        };
        issues.add(key, e.to_string());
    }

    let log_level = match raw.log_level {
        None => LogLevel::Info,
        Some(l) => LogLevel::parse(&l).unwrap_or_else(|| {
            issues.add(
                "log_level",
                format!("{l:?} is not a level; use DEBUG, INFO, WARNING, ERROR or CRITICAL"),
            );
            LogLevel::Info
        }),
    };
    if let Some(log_file) = &raw.log_file {
        let parent = log_file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            issues.add(
                "log_file",
                format!(
                    "the directory {} does not exist; create it or choose another log_file",
                    parent.display()
                ),
            );
        }
    }

    let baseline_path = raw.baseline_path;
    if let Some(path) = &baseline_path {
        require_file(
            "baseline_path",
            path,
            "baseline file generated by the NixOS module",
            &mut issues,
        );
    }
    if let Some(dir) = &raw.custom_checks_dir
        && !dir.is_dir()
    {
        issues.add(
            "custom_checks_dir",
            format!(
                "{} is not a directory; create it or remove custom_checks_dir",
                dir.display()
            ),
        );
    }

    let ntp_max_skew_ms = raw.ntp_max_skew_ms.unwrap_or(5000);
    if ntp_max_skew_ms == 0 {
        issues.add(
            "ntp_max_skew_ms",
            "must be greater than 0 (the platform default is 5000)",
        );
    }
    let service_health_checks = raw.service_health_checks.unwrap_or_default();
    for unit in &service_health_checks {
        if !crate::systemd::valid_unit_name(unit) {
            issues.add(
                "service_health_checks",
                format!("{unit:?} is not a systemd unit name (for example \"nginx.service\")"),
            );
        }
    }
    let policy_version = raw
        .policy_version
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| {
            if embedded {
                "local-default".into()
            } else {
                "unversioned".into()
            }
        });

    let maintenance_window = match window {
        Ok(w) if issues.0.is_empty() => w,
        _ => return Err(ConfigError::Invalid(issues.0)),
    };
    let evidence_dir = raw
        .evidence_dir
        .unwrap_or_else(|| state_dir.join("evidence"));
    Ok(Config {
        source,
        site_id,
        host_id,
        deployment_mode,
        reseller_id,
        mcp_url,
        mcp_api_key_file,
        mcp_poll_interval_sec,
        mcp_order_pubkey_file,
        ca_cert_file,
        client_cert_file,
        client_key_file,
        evidence_dir,
        evidence_retention_days,
        maintenance_window,
        timezone,
        signing_key_file,
        baseline_path,
        policy_version,
        auto_apply_updates: raw.auto_apply_updates.unwrap_or(false),
        log_level,
        log_file: raw.log_file,
        ntp_max_skew_ms,
        backup_path: raw.backup_path,
        restore_test_schedule: raw
            .restore_test_schedule
            .unwrap_or(RestoreTestSchedule::Weekly),
        av_health_check: raw.av_health_check.unwrap_or(true),
        firewall_enforce: raw.firewall_enforce.unwrap_or(true),
        encryption_verify: raw.encryption_verify.unwrap_or(true),
        service_health_checks,
        custom_checks_dir: raw.custom_checks_dir,
        state_dir,
        metrics_dir: raw.metrics_dir,
        upload_backoff_base_sec,
        upload_backoff_cap_sec,
        upload_max_attempts,
        order_max_clock_skew_sec,
        health_check_timeout_sec,
        restart_cooldown_sec,
        order_runbook_allowlist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("signing.key"), "key").expect("write key");
            Self { dir }
        }
        fn key(&self) -> String {
            self.dir.path().join("signing.key").display().to_string()
        }
        fn base(&self) -> String {
            format!(
                "site_id = \"clinic-1\"\nhost_id = \"fd-01\"\nsigning_key_file = \"{}\"\n",
                self.key()
            )
        }
        fn load(&self, extra: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
            let text = format!("{}{extra}", self.base());
            Config::from_toml(&text, ConfigSource::File("test.toml".into()), &env(vars))
        }
    }

    fn issues(result: Result<Config, ConfigError>) -> Vec<ConfigIssue> {
        match result {
            Err(ConfigError::Invalid(issues)) => issues,
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    /// Invariant: before enrollment the files enroll writes may be missing,
    /// and only those; something else in their place is an error either way.
    #[test]
    fn enrollment_may_precede_its_files() {
        let f = Fixture::new();
        let dir = f.dir.path().display().to_string();
        let mcp = format!(
            "mcp_url = \"https://mcp.example:8443\"\nca_cert_file = \"{dir}/ca.pem\"\n\
             client_cert_file = \"{dir}/client.pem\"\nclient_key_file = \"{dir}/client.key\"\n\
             mcp_order_pubkey_file = \"{dir}/order.pub.pem\"\n"
        );
        let text = format!("{}{mcp}", f.base());
        let source = || ConfigSource::File("test.toml".into());
        let missing: Vec<String> = issues(Config::from_toml(&text, source(), &env(&[])))
            .into_iter()
            .map(|i| i.key)
            .collect();
        for key in ENROLLMENT_FILES {
            assert!(
                missing.iter().any(|k| k == key),
                "{key} is required to exist for the service: {missing:?}"
            );
        }
        Config::from_toml_checked(&text, source(), &env(&[]), FileChecks::BeforeEnrollment)
            .expect("before enrollment the files it writes may be missing");

        std::fs::create_dir(f.dir.path().join("client.pem")).expect("mkdir");
        let wrong: Vec<String> = issues(Config::from_toml_checked(
            &text,
            source(),
            &env(&[]),
            FileChecks::BeforeEnrollment,
        ))
        .into_iter()
        .map(|i| i.key)
        .collect();
        assert_eq!(
            wrong,
            ["client_cert_file"],
            "a directory where the certificate goes is refused"
        );

        let no_key = text.replace(&f.key(), &format!("{dir}/absent.key"));
        let keyless: Vec<String> = issues(Config::from_toml_checked(
            &no_key,
            source(),
            &env(&[]),
            FileChecks::BeforeEnrollment,
        ))
        .into_iter()
        .map(|i| i.key)
        .collect();
        assert!(
            keyless.contains(&"signing_key_file".to_owned()),
            "the signing key must exist to enroll: {keyless:?}"
        );
    }

    #[test]
    fn minimal_file_uses_defaults() {
        let f = Fixture::new();
        let c = f.load("", &[]).expect("minimal config is valid");
        assert_eq!(c.site_id, "clinic-1");
        assert_eq!(c.deployment_mode, DeploymentMode::Direct);
        assert_eq!(c.mcp_poll_interval_sec, 60);
        assert_eq!(c.evidence_retention_days, 90);
        assert_eq!(c.maintenance_window.to_string(), "02:00-04:00");
        assert_eq!(
            c.evidence_dir,
            PathBuf::from("/var/lib/compliance-agent/evidence")
        );
        assert_eq!(c.log_level, LogLevel::Info);
        assert!(c.mcp_url.is_none(), "no mcp_url means offline");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let f = Fixture::new();
        let err = f.load("site = \"x\"\n", &[]).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `site`"), "{err}");
    }

    #[test]
    fn reseller_mode_needs_reseller_id() {
        let f = Fixture::new();
        let found = issues(f.load("deployment_mode = \"reseller\"\n", &[]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "reseller_id");
        assert!(
            found[0].message.contains("set reseller_id"),
            "{}",
            found[0].message
        );
        let ok = f
            .load(
                "deployment_mode = \"reseller\"\nreseller_id = \"acme-msp\"\n",
                &[],
            )
            .expect("valid reseller");
        assert_eq!(ok.reseller_id.as_deref(), Some("acme-msp"));
        let found = issues(f.load("reseller_id = \"acme\"\n", &[]));
        assert_eq!(
            found[0].key, "reseller_id",
            "direct mode with a reseller id is contradictory"
        );
    }

    #[test]
    fn bad_window_log_level_and_timezone() {
        let f = Fixture::new();
        let found = issues(f.load(
            "maintenance_window = \"2am-4am\"\nlog_level = \"LOUD\"\n",
            &[],
        ));
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["maintenance_window", "log_level"], "{found:?}");
        assert!(found[0].message.contains("HH:MM-HH:MM"));
        assert!(
            found[1]
                .message
                .contains("DEBUG, INFO, WARNING, ERROR or CRITICAL")
        );
        let found = issues(f.load("timezone = \"Nowhere/Town\"\n", &[]));
        assert_eq!(found[0].key, "timezone");
        let ok = f.load("maintenance_window = \"22:00-02:00\"\ntimezone = \"America/New_York\"\nlog_level = \"debug\"\n", &[]).expect("valid");
        assert!(ok.maintenance_window.crosses_midnight());
        assert_eq!(ok.log_level, LogLevel::Debug);
    }

    #[test]
    fn missing_secret_and_baseline_files() {
        let f = Fixture::new();
        let found = issues(f.load(
            "baseline_path = \"/nonexistent/baseline.json\"\nmcp_api_key_file = \"/nonexistent/api-key\"\n",
            &[],
        ));
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert!(
            keys.contains(&"baseline_path") && keys.contains(&"mcp_api_key_file"),
            "{found:?}"
        );
        assert!(
            found.iter().all(|i| i.message.contains("/nonexistent/")),
            "messages name the path: {found:?}"
        );

        let text = "site_id = \"s\"\nsigning_key_file = \"/nonexistent/signing.key\"\n";
        let found = issues(Config::from_toml(
            text,
            ConfigSource::File("t".into()),
            &env(&[]),
        ));
        assert_eq!(found[0].key, "signing_key_file");
        assert!(found[0].message.contains("keygen"), "{}", found[0].message);
    }

    #[test]
    fn mcp_url_needs_https_and_mtls_files() {
        let f = Fixture::new();
        let found = issues(f.load("mcp_url = \"http://mcp.example\"\n", &[]));
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mcp_url",
                "ca_cert_file",
                "client_cert_file",
                "client_key_file",
                "mcp_order_pubkey_file"
            ],
            "{found:?}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = Fixture::new();
        let c = f
            .load(
                "",
                &[
                    ("SITE_ID", "clinic-9"),
                    ("HOST_ID", "reception"),
                    ("DEPLOYMENT_MODE", "reseller"),
                    ("RESELLER_ID", "acme"),
                    ("MAINTENANCE_WINDOW", "23:30-01:00"),
                    ("LOG_LEVEL", "ERROR"),
                    ("NTP_MAX_SKEW_MS", "250"),
                    ("AV_HEALTH_CHECK", "false"),
                    ("SERVICE_HEALTH_CHECKS", "nginx.service, postgresql.service"),
                    ("EVIDENCE_DIR", "/srv/evidence"),
                    ("POLICY_VERSION", "2026.11"),
                ],
            )
            .expect("env overrides are valid");
        assert_eq!(
            (c.site_id.as_str(), c.host_id.as_str()),
            ("clinic-9", "reception")
        );
        assert_eq!(c.deployment_mode, DeploymentMode::Reseller);
        assert_eq!(c.maintenance_window.to_string(), "23:30-01:00");
        assert_eq!(c.log_level, LogLevel::Error);
        assert_eq!(c.ntp_max_skew_ms, 250);
        assert!(!c.av_health_check);
        assert_eq!(
            c.service_health_checks,
            ["nginx.service", "postgresql.service"]
        );
        assert_eq!(c.evidence_dir, PathBuf::from("/srv/evidence"));
        assert_eq!(c.policy_version, "2026.11");

        let err = f
            .load("", &[("NTP_MAX_SKEW_MS", "soon")])
            .expect_err("bad integer");
        assert!(
            err.to_string().contains("NTP_MAX_SKEW_MS") && err.to_string().contains("whole number"),
            "{err}"
        );
        let err = f
            .load("", &[("FIREWALL_ENFORCE", "maybe")])
            .expect_err("bad bool");
        assert!(err.to_string().contains("true or false"), "{err}");
    }

    #[test]
    fn credentials_directory_expansion() {
        let f = Fixture::new();
        let dir = f.dir.path().display().to_string();
        let text = "site_id = \"s\"\nsigning_key_file = \"%d/signing.key\"\n";
        let c = Config::from_toml(
            text,
            ConfigSource::File("t".into()),
            &env(&[("CREDENTIALS_DIRECTORY", &dir)]),
        )
        .expect("credential path resolves");
        assert_eq!(c.signing_key_file, f.dir.path().join("signing.key"));
        let found = issues(Config::from_toml(
            text,
            ConfigSource::File("t".into()),
            &env(&[]),
        ));
        assert!(
            found[0].message.contains("CREDENTIALS_DIRECTORY"),
            "{found:?}"
        );
    }

    #[test]
    fn embedded_default_needs_nothing() {
        let c = Config::from_toml(
            "",
            ConfigSource::Embedded,
            &env(&[("XDG_STATE_HOME", "/tmp/xdg")]),
        )
        .expect("embedded default is valid");
        assert_eq!(c.site_id, "local");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/xdg/compliance-agent"));
        assert_eq!(
            c.signing_key_file,
            PathBuf::from("/tmp/xdg/compliance-agent/signing.key")
        );
        assert!(c.creates_signing_key());
        let c = Config::from_toml("", ConfigSource::Embedded, &env(&[])).expect("valid");
        assert_eq!(c.evidence_dir, PathBuf::from("compliance-state/evidence"));
        assert!(!c.host_id.is_empty());
    }

    #[test]
    fn ids_and_units_are_checked() {
        let f = Fixture::new();
        let found = issues(f.load(
            "service_health_checks = [\"nginx\"]\n",
            &[("HOST_ID", "../etc")],
        ));
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["host_id", "service_health_checks"], "{found:?}");
    }

    #[test]
    fn channel_keys_have_defaults_ranges_and_env_names() {
        let f = Fixture::new();
        let c = f.load("", &[]).expect("defaults are valid");
        assert_eq!(
            (
                c.upload_backoff_base_sec,
                c.upload_backoff_cap_sec,
                c.upload_max_attempts,
                c.order_max_clock_skew_sec
            ),
            (30, 3600, 10, 300),
            "channel defaults"
        );
        assert_eq!(c.order_runbook_allowlist, ["collect_evidence"]);
        let found = issues(f.load(
            "upload_backoff_base_sec = 60\nupload_backoff_cap_sec = 10\nupload_max_attempts = 0\norder_max_clock_skew_sec = 7200\norder_runbook_allowlist = [\"rm_rf\"]\n",
            &[],
        ));
        let keys: Vec<&str> = found.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upload_backoff_cap_sec",
                "upload_max_attempts",
                "order_max_clock_skew_sec",
                "order_runbook_allowlist"
            ],
            "{found:?}"
        );
        assert!(
            found[3].message.contains("collect_evidence"),
            "names the known runbooks: {}",
            found[3].message
        );
        let c = f
            .load(
                "",
                &[
                    ("UPLOAD_BACKOFF_BASE_SEC", "5"),
                    ("UPLOAD_BACKOFF_CAP_SEC", "60"),
                    ("UPLOAD_MAX_ATTEMPTS", "3"),
                    ("ORDER_MAX_CLOCK_SKEW_SEC", "0"),
                    ("ORDER_RUNBOOK_ALLOWLIST", "collect_evidence"),
                ],
            )
            .expect("env overrides are valid");
        assert_eq!(
            (
                c.upload_backoff_base_sec,
                c.upload_backoff_cap_sec,
                c.upload_max_attempts,
                c.order_max_clock_skew_sec
            ),
            (5, 60, 3, 0),
            "env overrides"
        );
    }

    #[test]
    fn public_key_path_sits_beside_the_private_key() {
        assert_eq!(
            public_key_path(Path::new("/k/signing.key")),
            PathBuf::from("/k/signing.pub.pem")
        );
    }
}
