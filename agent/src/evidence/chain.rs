//! The hash-chain rules for one bundle against its stored neighbours, shared by the central server's intake.

/// What the chain rules need of a stored bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLink {
    pub bundle_id: String,
    pub seq: u64,
    /// SHA-256 (hex) of its bundle.json.
    pub hash: String,
    pub prev_hash: Option<String>,
}

/// Why a bundle cannot join a host's chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainProblem {
    #[error("seq {0} is out of range: sequence numbers run from 1 to {max}", max = u64::MAX - 1)]
    SeqOutOfRange(u64),
    #[error("seq 1 must have prev_hash null")]
    FirstWithPrevHash,
    #[error("seq {0} needs a prev_hash (only seq 1 has none)")]
    MissingPrevHash(u64),
    #[error("fork: seq {seq} is already bundle {existing}")]
    Fork { seq: u64, existing: String },
    #[error("chain break: prev_hash of seq {seq} does not match the stored seq {}", seq - 1)]
    PrevMismatch { seq: u64 },
    #[error("chain break: the stored seq {} does not name this bundle as its predecessor", seq + 1)]
    NextMismatch { seq: u64 },
}

/// Checks a new bundle (`seq`, `prev_hash`, `hash` of its bytes) against the
/// stored bundles at `seq - 1`, `seq` and `seq + 1`. Gaps are allowed: bundles
/// may arrive out of order, and each link is checked when both ends are known.
pub fn check_link(
    seq: u64,
    prev_hash: Option<&str>,
    hash: &str,
    previous: Option<&StoredLink>,
    same_seq: Option<&StoredLink>,
    next: Option<&StoredLink>,
) -> Result<(), ChainProblem> {
    // seq + 1 must exist for the successor's link to be checkable.
    if seq == 0 || seq == u64::MAX {
        return Err(ChainProblem::SeqOutOfRange(seq));
    }
    match (seq, prev_hash) {
        (1, Some(_)) => return Err(ChainProblem::FirstWithPrevHash),
        (s, None) if s > 1 => return Err(ChainProblem::MissingPrevHash(s)),
        _ => {}
    }
    if let Some(existing) = same_seq {
        return Err(ChainProblem::Fork {
            seq,
            existing: existing.bundle_id.clone(),
        });
    }
    if let Some(prev) = previous
        && (prev.seq != seq - 1 || prev_hash != Some(prev.hash.as_str()))
    {
        return Err(ChainProblem::PrevMismatch { seq });
    }
    if let Some(next) = next
        && (next.seq != seq + 1 || next.prev_hash.as_deref() != Some(hash))
    {
        return Err(ChainProblem::NextMismatch { seq });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(seq: u64, hash: &str, prev: Option<&str>) -> StoredLink {
        StoredLink {
            bundle_id: format!("b{seq}"),
            seq,
            hash: hash.into(),
            prev_hash: prev.map(str::to_owned),
        }
    }

    #[test]
    fn links_are_checked_both_ways_and_gaps_pass() {
        let one = link(1, "h1", None);
        let three = link(3, "h3", Some("h2"));
        assert_eq!(
            check_link(2, Some("h1"), "h2", Some(&one), None, Some(&three)),
            Ok(())
        );
        assert_eq!(
            check_link(2, Some("h1"), "h2", None, None, None),
            Ok(()),
            "a gap"
        );
        assert_eq!(
            check_link(2, Some("hX"), "h2", Some(&one), None, None),
            Err(ChainProblem::PrevMismatch { seq: 2 })
        );
        assert_eq!(
            check_link(2, Some("h1"), "hY", Some(&one), None, Some(&three)),
            Err(ChainProblem::NextMismatch { seq: 2 })
        );
        assert!(matches!(
            check_link(1, None, "h1b", None, Some(&one), None),
            Err(ChainProblem::Fork { seq: 1, .. })
        ));
    }

    #[test]
    fn seq_bounds_and_first_link() {
        assert_eq!(
            check_link(u64::MAX, Some("h"), "x", None, None, None),
            Err(ChainProblem::SeqOutOfRange(u64::MAX))
        );
        assert_eq!(
            check_link(0, None, "x", None, None, None),
            Err(ChainProblem::SeqOutOfRange(0))
        );
        assert_eq!(
            check_link(1, Some("h"), "x", None, None, None),
            Err(ChainProblem::FirstWithPrevHash)
        );
        assert_eq!(
            check_link(5, None, "x", None, None, None),
            Err(ChainProblem::MissingPrevHash(5))
        );
    }

    #[test]
    fn a_neighbour_at_the_wrong_seq_is_not_a_match() {
        // A caller that passes a stored bundle other than seq - 1 (the fixture's
        // bug) gets a mismatch, not a pass.
        let five = link(5, "h5", Some("h4"));
        assert_eq!(
            check_link(2, Some("h5"), "h2", Some(&five), None, None),
            Err(ChainProblem::PrevMismatch { seq: 2 })
        );
    }
}
