//! Fleet state per host: chain contiguity and gaps, latest result per check, last seen,
//! overdue (silent for more than twice the scan interval), and a compliance score.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::auth::Caller;
use crate::store::{CheckResult, Host, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostStatus {
    pub site_id: String,
    pub host_id: String,
    pub reseller_id: Option<String>,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub last_seen: Option<Timestamp>,
    pub overdue: bool,
    pub bundles: u64,
    /// The chain is contiguous from its first stored seq through this one.
    pub contiguous_through: Option<u64>,
    /// Missing seq ranges (inclusive) after the first stored one.
    pub gaps: Vec<(u64, u64)>,
    pub latest: Vec<CheckResult>,
    /// Share of checks whose latest outcome is success, in percent.
    pub score: Option<f64>,
}

/// Gaps in a sorted list of seqs, and the end of the first contiguous run.
pub fn chain_shape(seqs: &[u64]) -> (Option<u64>, Vec<(u64, u64)>) {
    let mut gaps = Vec::new();
    let mut contiguous = seqs.first().copied();
    let mut broken = false;
    for pair in seqs.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b > a + 1 {
            gaps.push((a + 1, b - 1));
            broken = true;
        } else if !broken {
            contiguous = Some(b);
        }
    }
    (contiguous, gaps)
}

pub fn host_status(
    store: &dyn Store,
    caller: &Caller,
    host: &Host,
    now: Timestamp,
) -> Result<HostStatus, StoreError> {
    let seqs = store.seqs(caller, &host.site_id, &host.host_id)?;
    let latest = store.latest_results(caller, &host.site_id, &host.host_id)?;
    let (contiguous_through, gaps) = chain_shape(&seqs);
    let scored: Vec<&CheckResult> = latest.iter().filter(|r| r.check != "mcp_order").collect();
    let score = (!scored.is_empty()).then(|| {
        100.0 * scored.iter().filter(|r| r.outcome == "success").count() as f64
            / scored.len() as f64
    });
    let silent_limit = SignedDuration::from_secs(2 * host.scan_interval_sec as i64);
    let reference = host.last_seen.unwrap_or(host.enrolled_at);
    let overdue = host.revoked_at.is_none() && now.duration_since(reference) > silent_limit;
    Ok(HostStatus {
        site_id: host.site_id.clone(),
        host_id: host.host_id.clone(),
        reseller_id: host.reseller_id.clone(),
        enrolled_at: host.enrolled_at,
        revoked_at: host.revoked_at,
        last_seen: host.last_seen,
        overdue,
        bundles: seqs.len() as u64,
        contiguous_through,
        gaps,
        latest,
        score,
    })
}

/// Every host the caller may see.
pub fn fleet(
    store: &dyn Store,
    caller: &Caller,
    now: Timestamp,
) -> Result<Vec<HostStatus>, StoreError> {
    store
        .hosts(caller)?
        .iter()
        .map(|h| host_status(store, caller, h, now))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_contiguity() {
        assert_eq!(chain_shape(&[]), (None, vec![]));
        assert_eq!(chain_shape(&[1, 2, 3]), (Some(3), vec![]));
        assert_eq!(
            chain_shape(&[1, 2, 5, 6, 9]),
            (Some(2), vec![(3, 4), (7, 8)])
        );
    }
}
