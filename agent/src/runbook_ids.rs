//! The runbook identifiers: the one list that configuration checks, signed orders and the healing engine share.
//!
//! It sits below all three so that `config` validates `order_allowlist`
//! without depending on the modules that run orders.

/// The runbook an order may always name: write fresh evidence of every check.
pub const COLLECT_EVIDENCE: &str = "collect_evidence";

/// Every runbook the agent knows, in the order `heal::runbooks::Runbook` lists them.
pub const RUNBOOK_IDS: &[&str] = &[
    "restart_unit",
    "stop_unit",
    "reapply_firewall",
    "run_backup",
    "restore_test",
    "refresh_av_signatures",
    "resync_time",
    "switch_generation",
    "rollback_generation",
    COLLECT_EVIDENCE,
];
