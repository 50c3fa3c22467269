//! The database behind one trait: tenants, hosts, enrollment tokens, the bundle index
//! and chain, latest results, orders, operators and the audit log. Every query takes
//! the `Caller` and is scoped by its tenants here, not only in handlers.

pub mod console;
pub mod evidence_query;
pub mod incidents;
pub mod postgres;
pub mod sbom;
pub mod sqlite;
pub mod tlog;

use compliance_agent::evidence::chain::{ChainProblem, StoredLink};
use jiff::Timestamp;
use serde::Serialize;

use crate::auth::{Caller, Role, Tenants};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Chain(#[from] ChainProblem),
    #[error("bundle {0} is already stored with other contents")]
    BundleConflict(String),
    #[error("enrollment token {0}")]
    Token(&'static str),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database: {0}")]
    Backend(String),
    #[error("database schema: {0}")]
    Schema(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Opens the store a `database_url` names: `sqlite:PATH` (or None: the embedded
/// default at `sqlite_default`) or `postgres://...` / `postgresql://...`.
pub fn open(
    database_url: Option<&str>,
    sqlite_default: &std::path::Path,
) -> Result<Box<dyn Store>> {
    match database_url {
        Some(url) if is_postgres_url(url) => Ok(Box::new(postgres::PostgresStore::open(url)?)),
        Some(url) => match sqlite_path(url) {
            Some(path) => Ok(Box::new(sqlite::SqliteStore::open(&path)?)),
            None => Err(StoreError::Unavailable(format!(
                "database_url {url:?} names no known database: use sqlite:PATH or postgres://..."
            ))),
        },
        None => Ok(Box::new(sqlite::SqliteStore::open(sqlite_default)?)),
    }
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The file of a `sqlite:PATH` (or `sqlite://PATH`) URL.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    url.strip_prefix("sqlite:")
        .map(|p| std::path::PathBuf::from(p.trim_start_matches("//")))
        .filter(|p| !p.as_os_str().is_empty())
}

/// A reseller's or the MSP's client site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Site {
    pub site_id: String,
    /// None: a direct-mode site of the MSP itself.
    pub reseller_id: Option<String>,
    /// Runbooks the server may sign orders for at this site.
    pub runbook_allowlist: Vec<String>,
    pub created_at: Timestamp,
}

/// An enrolled (or pre-provisioned) box.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Host {
    pub site_id: String,
    pub host_id: String,
    pub reseller_id: Option<String>,
    /// The box's Ed25519 evidence key (SPKI PEM).
    pub evidence_pubkey_pem: String,
    /// Serial (hex) of the client certificate issued at enrollment; None for a
    /// host provisioned by hand, whose certificate any CA-signed one naming it may be.
    pub cert_serial: Option<String>,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub scan_interval_sec: u64,
    pub last_seen: Option<Timestamp>,
}

/// An enrollment token as stored: only the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnrollmentToken {
    #[serde(skip)]
    pub secret_hash: [u8; 32],
    pub token_id: String,
    pub site_id: String,
    pub uses_left: u32,
    pub expires_at: Timestamp,
    pub created_by: String,
    pub created_at: Timestamp,
}

/// One accepted bundle as the index holds it (the bytes are in the archive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BundleRecord {
    pub bundle_id: String,
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    pub hash: String,
    pub prev_hash: Option<String>,
    pub check: String,
    pub outcome: String,
    pub timestamp_end: Timestamp,
    pub received_at: Timestamp,
    pub archive_key: String,
    pub order_id: Option<String>,
}

impl BundleRecord {
    pub fn link(&self) -> StoredLink {
        StoredLink {
            bundle_id: self.bundle_id.clone(),
            seq: self.seq,
            hash: self.hash.clone(),
            prev_hash: self.prev_hash.clone(),
        }
    }
}

/// The stored bundles around a seq.
#[derive(Clone, Debug, Default)]
pub struct Neighbours {
    pub previous: Option<StoredLink>,
    pub same_seq: Option<StoredLink>,
    pub next: Option<StoredLink>,
}

/// What recording a bundle did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Stored,
    /// The same bytes were stored before.
    Duplicate,
}

/// The latest bundle of one check on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub check: String,
    pub outcome: String,
    pub bundle_id: String,
    pub timestamp_end: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    /// Waiting for a second operator; not signed yet.
    AwaitingApproval,
    /// Signed and listed to the host.
    Pending,
    /// The host reported its result.
    Answered,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::AwaitingApproval => "awaiting_approval",
            OrderState::Pending => "pending",
            OrderState::Answered => "answered",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::AwaitingApproval, Self::Pending, Self::Answered]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// An order and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrderRecord {
    pub order_id: String,
    pub site_id: String,
    pub host_id: String,
    pub runbook_id: String,
    pub params: serde_json::Value,
    pub ttl: u64,
    pub state: OrderState,
    /// The DSSE envelope (JSON) once signed.
    pub envelope: Option<String>,
    pub created_by: String,
    pub created_at: Timestamp,
    pub approved_by: Option<String>,
    pub result_bundle_id: Option<String>,
    pub result_outcome: Option<String>,
    pub result_error: Option<String>,
    pub answered_at: Option<Timestamp>,
}

/// An operator account with its API token's hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Operator {
    pub name: String,
    pub role: Role,
    pub tenants: Tenants,
    #[serde(skip)]
    pub token_hash: [u8; 32],
    pub created_at: Timestamp,
    pub disabled: bool,
}

/// One line of the append-only audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Assigned by the store.
    pub id: i64,
    pub at: Timestamp,
    pub actor: String,
    pub peer: Option<String>,
    pub action: String,
    pub target: String,
    /// `ok` or `refused`.
    pub outcome: String,
    pub detail: String,
}

/// The database. Implementations: [`sqlite::SqliteStore`] and [`postgres::PostgresStore`];
/// the conformance suite in tests/store.rs runs against each. Calls block: async callers use `spawn_blocking`.
pub trait Store:
    console::ConsoleStore
    + evidence_query::EvidenceQuery
    + incidents::IncidentStore
    + sbom::SbomStore
    + tlog::LogStore
    + Send
    + Sync
{
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// The newest migration applied.
    fn schema_version(&self) -> Result<u32>;

    fn put_site(&self, caller: &Caller, site: &Site) -> Result<()>;
    fn site(&self, caller: &Caller, site_id: &str) -> Result<Option<Site>>;
    fn sites(&self, caller: &Caller) -> Result<Vec<Site>>;

    fn create_enrollment_token(&self, caller: &Caller, token: &EnrollmentToken) -> Result<()>;
    /// The token with this secret hash, if any (the token itself authorizes the lookup).
    fn enrollment_token(&self, secret_hash: &[u8; 32]) -> Result<Option<EnrollmentToken>>;
    /// Redeems one use of the token with this secret hash and enrolls `host` at
    /// the token's site, in one transaction. The token authorizes the call.
    fn enroll_host(&self, secret_hash: &[u8; 32], now: Timestamp, host: &Host) -> Result<Host>;
    /// Adds a host without a token (pre-provisioning by an operator).
    fn add_host(&self, caller: &Caller, host: &Host) -> Result<()>;
    fn host(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<Host>>;
    fn hosts(&self, caller: &Caller) -> Result<Vec<Host>>;
    /// Returns false when the host was already revoked.
    fn revoke_host(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        at: Timestamp,
    ) -> Result<bool>;

    fn bundle(&self, caller: &Caller, bundle_id: &str) -> Result<Option<BundleRecord>>;
    fn neighbours(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        seq: u64,
    ) -> Result<Neighbours>;
    /// In one transaction: checks the chain again, stores the record, updates the
    /// latest result and last-seen, and answers `result_for` (an order id).
    fn record_bundle(
        &self,
        caller: &Caller,
        record: &BundleRecord,
        result_for: Option<&str>,
        error: Option<&str>,
    ) -> Result<Recorded>;
    /// Bundle ids of a host in seq order.
    fn bundle_ids(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<String>>;
    fn seqs(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Vec<u64>>;
    fn latest_results(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<CheckResult>>;

    fn insert_order(&self, caller: &Caller, order: &OrderRecord) -> Result<()>;
    /// Signs off an order awaiting approval: stores its envelope and makes it pending.
    fn approve_order(
        &self,
        caller: &Caller,
        order_id: &str,
        envelope: &str,
        approved_by: &str,
    ) -> Result<()>;
    fn order(&self, caller: &Caller, order_id: &str) -> Result<Option<OrderRecord>>;
    /// Orders of the caller's tenants, newest first, optionally of one host.
    fn orders(&self, caller: &Caller, host: Option<(&str, &str)>) -> Result<Vec<OrderRecord>>;
    /// The pending (signed, unanswered) orders of a host, oldest first.
    fn pending_orders(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<OrderRecord>>;
    /// When the newest order for this host and runbook was created.
    fn last_order_at(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        runbook_id: &str,
    ) -> Result<Option<Timestamp>>;

    fn create_operator(&self, caller: &Caller, operator: &Operator) -> Result<()>;
    /// Authentication: the operator whose token has this hash (compared in constant time).
    fn operator_by_token(&self, token_hash: &[u8; 32]) -> Result<Option<Operator>>;
    fn operators(&self, caller: &Caller) -> Result<Vec<Operator>>;

    /// Appends one entry; the log has no update or delete.
    fn append_audit(&self, entry: &AuditEntry) -> Result<i64>;
    /// The newest `limit` entries the caller may read, newest first.
    fn audit(&self, caller: &Caller, limit: u32) -> Result<Vec<AuditEntry>>;
}

/// Refuses a caller outside the site's tenants, as "not found" (it learns nothing).
pub fn require_sees(caller: &Caller, site: &Site, what: &str) -> Result<()> {
    if caller.sees(site.reseller_id.as_deref(), &site.site_id, None) {
        Ok(())
    } else {
        Err(StoreError::NotFound(what.into()))
    }
}

/// Who may read the audit log: admins all of it, others the entries about their tenants.
pub fn audit_visible(caller: &Caller, entry: &AuditEntry, site_reseller: Option<&str>) -> bool {
    match &caller.tenants {
        Tenants::All => true,
        Tenants::Host { .. } => false,
        _ => {
            let site = entry
                .target
                .split_once('/')
                .map_or(entry.target.as_str(), |(s, _)| s);
            caller.sees(site_reseller, site, None)
        }
    }
}
