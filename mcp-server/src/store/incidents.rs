//! Incident storage: one open incident per host and cause, its timeline of events, the
//! planner/executor state on it, and each site's executor mode. Scoped by the `Caller`
//! like the rest of the store; both backends implement it (sqlite/incidents.rs,
//! postgres/incidents.rs) and tests/store.rs runs the same cases against each.

use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use super::Result;
use crate::auth::Caller;

/// Where an incident stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentState {
    Open,
    /// Later evidence showed the cause gone (the check compliant, the host back).
    Resolved,
    /// An operator closed it, with a reason.
    Closed,
}

impl IncidentState {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentState::Open => "open",
            IncidentState::Resolved => "resolved",
            IncidentState::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Open, Self::Resolved, Self::Closed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// What the planner and executor have done with an incident.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// The background executor should plan it.
    Wanted,
    /// A worker is planning it now (taken again if the worker died).
    Claimed,
    /// A plan waits for an operator (site mode `approve`, a disruptive runbook, or no runbook).
    AwaitingOperator,
    /// An order was made from the plan; its result is awaited.
    Ordered,
    /// The central guardrails refused the plan's order (reason in the timeline).
    Refused,
    /// The order's result was not a success, or never came within its TTL.
    Failed,
    /// The site's executor mode is `off`.
    Off,
    /// Nothing to plan (the incident is not open).
    None,
}

impl PlanState {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanState::Wanted => "wanted",
            PlanState::Claimed => "claimed",
            PlanState::AwaitingOperator => "awaiting_operator",
            PlanState::Ordered => "ordered",
            PlanState::Refused => "refused",
            PlanState::Failed => "failed",
            PlanState::Off => "off",
            PlanState::None => "none",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Wanted,
            Self::Claimed,
            Self::AwaitingOperator,
            Self::Ordered,
            Self::Refused,
            Self::Failed,
            Self::Off,
            Self::None,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// Severity ranks; an incident keeps the highest it has seen.
pub const SEVERITIES: &[&str] = &["low", "medium", "high", "critical"];

/// The rank of a severity (unknown names rank lowest).
pub fn severity_rank(s: &str) -> usize {
    SEVERITIES.iter().position(|x| *x == s).unwrap_or(0)
}

/// One incident as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IncidentRecord {
    pub incident_id: String,
    pub site_id: String,
    pub host_id: String,
    /// `check:<name>`, `chain_gap`, `chain_break`, `bad_signature` or `overdue`.
    pub cause: String,
    pub check: Option<String>,
    pub state: IncidentState,
    pub severity: String,
    pub hipaa_controls: Vec<String>,
    /// The latest evidence's one-line reason.
    pub summary: String,
    /// The box's recommended fix: `{"runbook": ..., "params": ...}`.
    pub recommended: Option<Value>,
    pub opened_at: Timestamp,
    pub updated_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
    /// Remediation duration: opened to resolved or closed, in seconds.
    pub remediation_sec: Option<u64>,
    pub event_count: u64,
    pub plan_state: PlanState,
    /// The last plan proposed for it.
    pub plan: Option<Value>,
    pub claimed_at: Option<Timestamp>,
    /// The order made from the last plan.
    pub order_id: Option<String>,
}

/// One line of an incident's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IncidentEvent {
    /// Assigned by the store.
    pub id: i64,
    pub incident_id: String,
    pub at: Timestamp,
    /// `opened`, `evidence`, `refused_upload`, `overdue`, `plan`, `order`, `order_refused`,
    /// `order_result`, `order_expired`, `resolved`, `closed`, `executor`.
    pub kind: String,
    pub bundle_id: Option<String>,
    pub order_id: Option<String>,
    pub actor: String,
    pub detail: String,
}

/// Something observed about a host that opens (or updates) the incident of its cause.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub site_id: String,
    pub host_id: String,
    pub cause: String,
    pub check: Option<String>,
    pub severity: String,
    pub hipaa_controls: Vec<String>,
    pub summary: String,
    pub recommended: Option<Value>,
    /// The bundle that shows it; an observation of a bundle already on a timeline of
    /// the same host and cause is not applied twice.
    pub bundle_id: Option<String>,
    pub at: Timestamp,
    /// The timeline event's kind and detail.
    pub kind: String,
    pub detail: String,
}

/// What applying an observation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Opened(String),
    Updated(String),
    /// Its bundle is on a timeline already.
    AlreadyApplied,
}

/// The incidents a listing returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncidentFilter {
    pub state: Option<IncidentState>,
    pub site_id: Option<String>,
    pub host_id: Option<String>,
    pub plan_state: Option<PlanState>,
    /// At most this many, newest first (default 1000).
    pub limit: Option<u32>,
}

/// How an incident ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub at: Timestamp,
    pub by: String,
    pub reason: String,
    pub bundle_id: Option<String>,
}

pub trait IncidentStore {
    /// In one transaction: opens the incident of (host, cause) or updates the open one
    /// (highest severity kept, summary and recommendation from the latest evidence),
    /// and appends the observation to its timeline. The host must be the caller's.
    fn observe(&self, caller: &Caller, obs: &Observation, new_id: &str) -> Result<Observed>;
    /// Resolves the open incident of (host, cause), if any, recording the remediation
    /// duration; returns its id.
    fn resolve_incident(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
        cause: &str,
        how: &Resolution,
    ) -> Result<Option<String>>;
    /// An operator closes an open incident with a reason (needs a writing role).
    fn close_incident(
        &self,
        caller: &Caller,
        incident_id: &str,
        how: &Resolution,
    ) -> Result<IncidentRecord>;
    fn incident(&self, caller: &Caller, incident_id: &str) -> Result<Option<IncidentRecord>>;
    /// The caller's incidents matching `filter`, newest first.
    fn incidents(&self, caller: &Caller, filter: &IncidentFilter) -> Result<Vec<IncidentRecord>>;
    /// The timeline, oldest first.
    fn incident_events(&self, caller: &Caller, incident_id: &str) -> Result<Vec<IncidentEvent>>;
    /// Appends one event (id and incident_id from the arguments).
    fn add_incident_event(
        &self,
        caller: &Caller,
        incident_id: &str,
        event: &IncidentEvent,
    ) -> Result<()>;
    /// Records the planner/executor state, the plan and the order of an open incident.
    fn set_incident_plan(
        &self,
        caller: &Caller,
        incident_id: &str,
        plan_state: PlanState,
        plan: Option<&Value>,
        order_id: Option<&str>,
    ) -> Result<()>;
    /// Takes up to `limit` open incidents whose plan is wanted (or whose claim is older
    /// than `stale_before`) for planning; each is handed to one caller only, in any process.
    fn claim_incidents(
        &self,
        caller: &Caller,
        limit: u32,
        now: Timestamp,
        stale_before: Timestamp,
    ) -> Result<Vec<IncidentRecord>>;
    /// The incident an order was made for.
    fn incident_for_order(&self, caller: &Caller, order_id: &str)
    -> Result<Option<IncidentRecord>>;
    /// The site's executor mode (`auto`, `approve`, `off`); None: the configured default.
    fn site_executor_mode(&self, caller: &Caller, site_id: &str) -> Result<Option<String>>;
    fn set_site_executor_mode(
        &self,
        caller: &Caller,
        site_id: &str,
        mode: Option<&str>,
    ) -> Result<()>;
    /// The lowest seq stored for a host.
    fn min_seq(&self, caller: &Caller, site_id: &str, host_id: &str) -> Result<Option<u64>>;
}
