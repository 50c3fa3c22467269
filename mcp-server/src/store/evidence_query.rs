//! Filtered queries over the bundle index (the evidence of one host by check, outcome
//! and time, newest first, in pages), scoped by the caller like every other query.

use jiff::Timestamp;

use super::{BundleRecord, Result};
use crate::auth::Caller;

/// The most rows one query returns; a larger `limit` is refused, not truncated.
pub const MAX_EVIDENCE_PAGE: u32 = 500;

/// Which bundles of one host to list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvidenceFilter {
    pub site_id: String,
    pub host_id: String,
    /// Only this check (`backup`, `mcp_order`, ...).
    pub check: Option<String>,
    /// Only this outcome (`success`, `failed`, ...).
    pub outcome: Option<String>,
    /// Only bundles whose `timestamp_end` is at or after this.
    pub since: Option<Timestamp>,
    /// Only bundles whose `timestamp_end` is before this.
    pub until: Option<Timestamp>,
    /// Only bundles with a smaller seq (the next page after the last one seen).
    pub before_seq: Option<u64>,
    /// At most this many, 1 to [`MAX_EVIDENCE_PAGE`].
    pub limit: u32,
}

/// Implemented by both backends; the conformance suite in tests/store.rs covers it.
pub trait EvidenceQuery {
    /// The host's bundles matching `filter`, highest seq first. A host outside the
    /// caller's tenants is "not found"; a limit out of range is refused.
    fn evidence(&self, caller: &Caller, filter: &EvidenceFilter) -> Result<Vec<BundleRecord>>;
}

/// Refuses a page size the store will not serve.
pub fn check_limit(limit: u32) -> Result<()> {
    if (1..=MAX_EVIDENCE_PAGE).contains(&limit) {
        Ok(())
    } else {
        Err(super::StoreError::Forbidden(format!(
            "limit {limit} is out of range: 1 to {MAX_EVIDENCE_PAGE}"
        )))
    }
}
