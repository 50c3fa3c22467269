//! Evidence bundles: the signed, hash-chained record of every check, fix and order.

pub mod chain;
mod fsafe;
mod layout;
mod query;
mod store;
mod verify;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use layout::{BUNDLE_FILE, SIGNATURE_FILE};
pub use query::{
    BundleRef, Filter, Listing, Stats, Summary, Unreadable, bundle_refs, find, list, list_checked,
    read, stats,
};
pub use store::{Checkpoint, EvidenceStore, HostIdentity, PruneReport, StoredBundle};
pub use verify::{Problem, VerifyReport, store_containing, verify};

/// Reads a bundle directory's bundle.json and bundle.sig for sending: never
/// through a link, never blocking on a special file, never past the limits.
pub fn read_bundle_files(dir: &std::path::Path) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    let json = fsafe::read_capped(&dir.join(BUNDLE_FILE), MAX_BUNDLE_BYTES)
        .map_err(|e| format!("{BUNDLE_FILE}: {e}"))?;
    let sig = fsafe::read_capped(&dir.join(SIGNATURE_FILE), MAX_SIGNATURE_READ)
        .map_err(|e| format!("{SIGNATURE_FILE}: {e}"))?;
    Ok((json, sig))
}

use crate::config::DeploymentMode;
use crate::nixos::SystemIdentity;

/// Format version of bundle.json.
pub const BUNDLE_VERSION: &str = "1.0";

/// Largest bundle.json: the writer refuses to seal a larger one, readers
/// refuse to read one, and the MCP channel (whose server has the same limit)
/// never needs to refuse one.
pub const MAX_BUNDLE_BYTES: u64 = 512 * 1024;
/// Largest bundle.sig read (a valid one is 64 bytes).
pub const MAX_SIGNATURE_READ: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("evidence store {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode bundle: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("bundle {0} not found")]
    NotFound(String),
    #[error("bundle {path} is not a valid bundle: {message}")]
    Corrupt {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EvidenceError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EvidenceError + '_ {
    move |source| EvidenceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a bundle speaks of: the seven baseline checks, the store's own retention, MCP orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Patching,
    AvHealth,
    Backup,
    Logging,
    Firewall,
    Encryption,
    TimeSync,
    /// Units the baseline declares active or inactive beyond the seven checks
    /// (sshd, the node exporter, the clinic's own services_health_checks).
    Services,
    /// A prune checkpoint: which bundles left the local store.
    EvidenceRetention,
    /// An order from the MCP: what it asked for, whether it was accepted, what ran.
    McpOrder,
    /// The evidence store's own integrity: an alert the writer records when
    /// the chain head record is missing, unreadable or names a bundle that is gone.
    EvidenceIntegrity,
    /// The software bill of materials of the running system's closure; the
    /// document is stored beside bundle.json (sbom.cdx.json).
    Sbom,
    /// The box as a witness of the MSP's transparency log: a checkpoint that does
    /// not verify, or a log whose history does not extend what the box saw before.
    LogWitness,
}

impl Check {
    pub const ALL: [Check; 13] = [
        Check::Patching,
        Check::AvHealth,
        Check::Backup,
        Check::Logging,
        Check::Firewall,
        Check::Encryption,
        Check::TimeSync,
        Check::Services,
        Check::EvidenceRetention,
        Check::McpOrder,
        Check::EvidenceIntegrity,
        Check::Sbom,
        Check::LogWitness,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Patching => "patching",
            Check::AvHealth => "av_health",
            Check::Backup => "backup",
            Check::Logging => "logging",
            Check::Firewall => "firewall",
            Check::Encryption => "encryption",
            Check::TimeSync => "time_sync",
            Check::Services => "services",
            Check::EvidenceRetention => "evidence_retention",
            Check::McpOrder => "mcp_order",
            Check::EvidenceIntegrity => "evidence_integrity",
            Check::Sbom => "sbom",
            Check::LogWitness => "log_witness",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Bundles of this check are written by the agent itself (prune, orders,
    /// the store's integrity alerts), never recorded by hand.
    pub fn agent_only(self) -> Option<&'static str> {
        match self {
            Check::EvidenceRetention => Some("`evidence prune`"),
            Check::McpOrder => Some("`orders poll`"),
            Check::EvidenceIntegrity => Some("the evidence writer itself"),
            Check::Sbom => Some("`compliance-agent sbom`"),
            Check::LogWitness => Some("the log witness at each order poll"),
            _ => None,
        }
    }

    /// The HIPAA Security Rule (45 CFR 164) controls this check evidences.
    pub fn hipaa_controls(self) -> &'static [&'static str] {
        match self {
            Check::Patching => &["164.308(a)(1)(ii)(B)", "164.308(a)(5)(ii)(B)"],
            Check::AvHealth => &["164.308(a)(5)(ii)(B)"],
            Check::Backup => &[
                "164.308(a)(7)(ii)(A)",
                "164.308(a)(7)(ii)(B)",
                "164.308(a)(7)(ii)(D)",
            ],
            Check::Logging => &["164.312(b)", "164.308(a)(1)(ii)(D)"],
            Check::Firewall => &["164.312(e)(1)", "164.312(a)(1)"],
            Check::Encryption => &["164.312(a)(2)(iv)", "164.312(e)(2)(ii)"],
            Check::TimeSync => &["164.312(b)"],
            // Contingency plan: the services the site depends on keep running.
            Check::Services => &["164.308(a)(7)(ii)(C)", "164.312(a)(1)"],
            Check::EvidenceRetention => &["164.312(c)(1)", "164.316(b)(2)(i)"],
            // Audit controls and activity review (a remote instruction and what
            // came of it), entity authentication (the order's signature).
            Check::McpOrder => &["164.312(b)", "164.308(a)(1)(ii)(D)", "164.312(d)"],
            // Integrity of the audit record itself, and audit controls.
            Check::EvidenceIntegrity => &["164.312(c)(1)", "164.312(b)"],
            // Evaluation: what software the box ran, for technical reviews.
            Check::Sbom => &["164.308(a)(8)"],
            // Integrity of the evidence the MSP holds, and audit controls.
            Check::LogWitness => &["164.312(c)(1)", "164.312(b)"],
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failed,
    Reverted,
    Deferred,
    Alert,
    Rejected,
    Expired,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Success,
        Outcome::Failed,
        Outcome::Reverted,
        Outcome::Deferred,
        Outcome::Alert,
        Outcome::Rejected,
        Outcome::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failed => "failed",
            Outcome::Reverted => "reverted",
            Outcome::Deferred => "deferred",
            Outcome::Alert => "alert",
            Outcome::Rejected => "rejected",
            Outcome::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a remediation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionTaken {
    pub step: u32,
    pub action: String,
    pub command: Option<String>,
    pub exit_code: Option<i32>,
    pub duration_sec: Option<f64>,
    pub result: Option<String>,
}

/// bundle.json: the platform spec's EvidenceBundle plus the chain, the system
/// identity, the agent version and the signing key's fingerprint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub version: String,
    pub bundle_id: String,
    /// 1, 2, 3 ... per evidence store (per host).
    pub seq: u64,
    /// SHA-256 (hex) of the previous bundle.json's bytes; null only for seq 1.
    pub prev_hash: Option<String>,
    pub site_id: String,
    pub host_id: String,
    pub deployment_mode: DeploymentMode,
    pub reseller_id: Option<String>,
    pub timestamp_start: jiff::Timestamp,
    pub timestamp_end: jiff::Timestamp,
    pub policy_version: String,
    pub ruleset_hash: Option<String>,
    pub nixos_revision: Option<String>,
    pub derivation_digest: Option<String>,
    pub ntp_offset_ms: Option<i64>,
    pub check: Check,
    pub hipaa_controls: Vec<String>,
    pub pre_state: Value,
    pub post_state: Value,
    pub action_taken: Vec<ActionTaken>,
    pub rollback_available: bool,
    pub rollback_generation: Option<u64>,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub order_id: Option<String>,
    pub runbook_id: Option<String>,
    pub system: SystemIdentity,
    pub agent_version: String,
    pub signing_key_fingerprint: String,
}

/// What a caller knows about an event; the store adds identity, chain and signature.
#[derive(Clone, Debug)]
pub struct Draft {
    pub check: Check,
    pub outcome: Outcome,
    pub timestamp_start: jiff::Timestamp,
    pub timestamp_end: Option<jiff::Timestamp>,
    /// Overrides the check's default controls when set.
    pub hipaa_controls: Option<Vec<String>>,
    pub pre_state: Value,
    pub post_state: Value,
    pub action_taken: Vec<ActionTaken>,
    pub rollback_available: bool,
    pub rollback_generation: Option<u64>,
    pub error: Option<String>,
    pub order_id: Option<String>,
    pub runbook_id: Option<String>,
    pub ruleset_hash: Option<String>,
    pub derivation_digest: Option<String>,
    pub ntp_offset_ms: Option<i64>,
    /// Files stored beside bundle.json in the bundle's directory.
    pub attachments: Vec<Attachment>,
}

/// A file stored beside bundle.json (an SBOM, say), written and published
/// with the bundle in the same atomic step. The signature covers it only
/// through what the draft records of it, such as its SHA-256 in post_state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// A plain file name other than bundle.json and bundle.sig.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Attachment {
    /// Largest attachment the writer accepts.
    pub const MAX_BYTES: usize = 64 * 1024 * 1024;

    /// Whether `name` may be an attachment's file name: a plain, visible
    /// file name in the bundle directory that is not one of the bundle's own.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name != BUNDLE_FILE
            && name != SIGNATURE_FILE
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }
}

impl Draft {
    pub fn new(check: Check, outcome: Outcome) -> Self {
        Self {
            check,
            outcome,
            timestamp_start: jiff::Timestamp::now(),
            timestamp_end: None,
            hipaa_controls: None,
            pre_state: Value::Object(Default::default()),
            post_state: Value::Object(Default::default()),
            action_taken: Vec::new(),
            rollback_available: false,
            rollback_generation: None,
            error: None,
            order_id: None,
            runbook_id: None,
            ruleset_hash: None,
            derivation_digest: None,
            ntp_offset_ms: None,
            attachments: Vec::new(),
        }
    }
}

/// A HIPAA control citation such as `164.312(b)` or `164.308(a)(7)(ii)(A)`.
pub fn valid_control(control: &str) -> bool {
    let Some(rest) = control.strip_prefix("164.") else {
        return false;
    };
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    if digits != 3 {
        return false;
    }
    let mut parts = &rest[digits..];
    if parts.is_empty() {
        return true;
    }
    while !parts.is_empty() {
        let Some(inner) = parts.strip_prefix('(') else {
            return false;
        };
        let Some(end) = inner.find(')') else {
            return false;
        };
        let label = &inner[..end];
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric()) {
            return false;
        }
        parts = &inner[end + 1..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_citations() {
        for good in Check::ALL.iter().flat_map(|c| c.hipaa_controls()) {
            assert!(valid_control(good), "{good} is a valid citation");
        }
        for bad in [
            "164",
            "164.31",
            "164.312(",
            "164.312()",
            "165.312(b)",
            "164.312(b)x",
            "164.312(b c)",
        ] {
            assert!(!valid_control(bad), "{bad} must be rejected");
        }
    }

    #[test]
    fn names_round_trip() {
        for c in Check::ALL {
            assert_eq!(Check::parse(c.as_str()), Some(c));
            assert_eq!(
                serde_json::to_value(c).expect("json"),
                Value::String(c.as_str().into())
            );
        }
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
    }
}
