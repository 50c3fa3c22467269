//! The tree, its proofs and their verification checked against an independent reference: RFC 9162's recursive definitions (MTH, PATH, SUBPROOF) over all leaves, written here from the RFC text.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::{
    Hash, HashStore, Log, MemoryStore, ProofError, leaf_hash, verify_consistency, verify_inclusion,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Largest tree the exhaustive sweep covers: past 4096, so every size up to
/// and across the 2^12 boundary is seen.
const SWEEP: usize = 4_100;
/// Up to this size every index and every older size is checked.
const EXHAUSTIVE: usize = 200;

/// RFC 9162 2.1, taken literally: the tree over the leaf data, no shared code.
struct Reference {
    data: Vec<Vec<u8>>,
    // Memoised MTH by range, so the sweep stays fast; the recursion is the RFC's.
    memo: RefCell<HashMap<(usize, usize), Hash>>,
}

impl Reference {
    fn new(n: usize) -> Self {
        Self {
            data: (0..n)
                .map(|i| format!("leaf number {i}").into_bytes())
                .collect(),
            memo: RefCell::new(HashMap::new()),
        }
    }

    fn sha(parts: &[&[u8]]) -> Hash {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    /// "k is the largest power of two smaller than n".
    fn k(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    /// MTH(D[lo:hi]).
    fn mth(&self, lo: usize, hi: usize) -> Hash {
        if let Some(h) = self.memo.borrow().get(&(lo, hi)) {
            return *h;
        }
        let n = hi - lo;
        let h = match n {
            0 => Self::sha(&[]),
            1 => Self::sha(&[&[0x00], &self.data[lo]]),
            _ => {
                let k = Self::k(n);
                Self::sha(&[&[0x01], &self.mth(lo, lo + k), &self.mth(lo + k, hi)])
            }
        };
        self.memo.borrow_mut().insert((lo, hi), h);
        h
    }

    /// PATH(m, D[lo:hi]), m relative to lo.
    fn path(&self, m: usize, lo: usize, hi: usize) -> Vec<Hash> {
        let n = hi - lo;
        if n == 1 {
            return Vec::new();
        }
        let k = Self::k(n);
        if m < k {
            let mut p = self.path(m, lo, lo + k);
            p.push(self.mth(lo + k, hi));
            p
        } else {
            let mut p = self.path(m - k, lo + k, hi);
            p.push(self.mth(lo, lo + k));
            p
        }
    }

    /// SUBPROOF(m, D[lo:hi], b).
    fn subproof(&self, m: usize, lo: usize, hi: usize, b: bool) -> Vec<Hash> {
        let n = hi - lo;
        if m == n {
            return if b {
                Vec::new()
            } else {
                vec![self.mth(lo, hi)]
            };
        }
        let k = Self::k(n);
        if m <= k {
            let mut p = self.subproof(m, lo, lo + k, b);
            p.push(self.mth(lo + k, hi));
            p
        } else {
            let mut p = self.subproof(m - k, lo + k, hi, false);
            p.push(self.mth(lo, lo + k));
            p
        }
    }

    /// PROOF(m, D[n]) = SUBPROOF(m, D[n], true).
    fn consistency(&self, m: usize, n: usize) -> Vec<Hash> {
        self.subproof(m, 0, n, true)
    }
}

/// The reference and our log over the same leaves, built once.
fn fixture() -> &'static (Vec<Vec<u8>>, Log<MemoryStore>) {
    static FIXTURE: OnceLock<(Vec<Vec<u8>>, Log<MemoryStore>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let reference = Reference::new(SWEEP);
        let mut log = Log::new(MemoryStore::new());
        let hashes: Vec<Hash> = reference.data.iter().map(|d| leaf_hash(d)).collect();
        for chunk in hashes.chunks(97) {
            if log.append_many(chunk).is_err() {
                break;
            }
        }
        (reference.data, log)
    })
}

/// A few pseudo-random picks below `n` (a fixed LCG: reproducible, no extra crate).
fn samples(n: usize, seed: usize) -> impl Iterator<Item = usize> {
    let mut x = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..4).map(move |_| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) as usize % n
    })
}

fn picks(n: usize) -> Vec<usize> {
    if n <= EXHAUSTIVE {
        return (0..n).collect();
    }
    let k = Reference::k(n);
    let mut p = vec![0, 1, k - 1, k, n / 2, n - 2, n - 1];
    p.extend(samples(n, n));
    p.retain(|&i| i < n);
    p.sort_unstable();
    p.dedup();
    p
}

/// Invariant: for every size from 1 to 4,100 the log's root is MTH(D[n]), and
/// its inclusion proofs (every index up to size 200, sampled above) are PATH(m, D[n])
/// and verify against that root.
#[test]
fn inclusion_proofs_match_the_rfc_at_every_size() -> TestResult {
    let (data, log) = fixture();
    let reference = Reference {
        data: data.clone(),
        memo: RefCell::new(HashMap::new()),
    };
    assert_eq!(log.size()? as usize, SWEEP, "the fixture holds every leaf");
    assert_eq!(log.root(0)?, Reference::sha(&[]), "the empty tree");
    let mut checked = 0usize;
    for n in 1..=SWEEP {
        let root = reference.mth(0, n);
        assert_eq!(log.root(n as u64)?, root, "root at size {n}");
        for m in picks(n) {
            let proof = log.inclusion_proof(m as u64, n as u64)?;
            assert_eq!(proof.hashes, reference.path(m, 0, n), "PATH({m}, D[{n}])");
            let leaf = Reference::sha(&[&[0x00], &data[m]]);
            verify_inclusion(&leaf, m as u64, n as u64, &proof.hashes, &root)
                .map_err(|e| format!("proof of {m} in {n} does not verify: {e}"))?;
            checked += 1;
        }
    }
    assert!(checked > 40_000, "the sweep checked {checked} proofs");
    Ok(())
}

/// Invariant: for every size from 1 to 4,100 the log's consistency proofs from
/// every older size (up to 200, sampled above) are SUBPROOF(m, D[n], true) and verify.
#[test]
fn consistency_proofs_match_the_rfc_at_every_size() -> TestResult {
    let (data, log) = fixture();
    let reference = Reference {
        data: data.clone(),
        memo: RefCell::new(HashMap::new()),
    };
    let mut checked = 0usize;
    for n in 1..=SWEEP {
        let new_root = reference.mth(0, n);
        let mut olds: Vec<usize> = picks(n).into_iter().map(|m| m + 1).collect();
        olds.push(0);
        for m in olds {
            let proof = log.consistency_proof(m as u64, n as u64)?;
            let expected = if m == 0 {
                Vec::new()
            } else {
                reference.consistency(m, n)
            };
            assert_eq!(proof.hashes, expected, "PROOF({m}, D[{n}])");
            verify_consistency(
                m as u64,
                n as u64,
                &reference.mth(0, m),
                &new_root,
                &proof.hashes,
            )
            .map_err(|e| format!("proof from {m} to {n} does not verify: {e}"))?;
            checked += 1;
        }
    }
    assert!(checked > 40_000, "the sweep checked {checked} proofs");
    Ok(())
}

/// Invariant: a log that rewrote or dropped any one old leaf cannot prove
/// consistency with a checkpoint taken before: the witness catches it.
#[test]
fn a_rewritten_or_dropped_leaf_breaks_consistency() -> TestResult {
    let honest: Vec<Hash> = (0..40u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    let mut log = Log::new(MemoryStore::new());
    log.append_many(&honest)?;
    for old in 1..=honest.len() {
        let old_root = log.root(old as u64)?;
        for victim in 0..old {
            let rewritten: Vec<Hash> = honest
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    if i == victim {
                        leaf_hash(b"rewritten")
                    } else {
                        *h
                    }
                })
                .collect();
            let mut dropped = honest.clone();
            dropped.remove(victim);
            dropped.push(leaf_hash(b"padding"));
            for (what, leaves) in [("rewritten", &rewritten), ("dropped", &dropped)] {
                let mut forged = Log::new(MemoryStore::new());
                forged.append_many(leaves)?;
                let size = leaves.len() as u64;
                let proof = forged.consistency_proof(old as u64, size)?;
                let result = verify_consistency(
                    old as u64,
                    size,
                    &old_root,
                    &forged.root(size)?,
                    &proof.hashes,
                );
                assert!(
                    result.is_err(),
                    "leaf {victim} {what}: the forged log must not prove consistency with size {old}"
                );
            }
        }
    }
    Ok(())
}

/// Invariant: proof requests beyond the log are refused (a server must not invent history).
#[test]
fn proofs_beyond_the_log_are_refused() -> TestResult {
    let (_, log) = fixture();
    let size = log.store().size()?;
    assert!(
        log.inclusion_proof(0, size + 1).is_err(),
        "inclusion beyond the log"
    );
    assert!(
        log.consistency_proof(1, size + 1).is_err(),
        "consistency beyond the log"
    );
    assert!(log.root(size + 1).is_err(), "root beyond the log");
    assert_eq!(
        verify_consistency(5, 4, &[0; 32], &[0; 32], &[]),
        Err(ProofError::OldSizeLarger { old: 5, new: 4 }),
        "backwards consistency is refused"
    );
    assert_eq!(
        verify_inclusion(&[0; 32], 4, 4, &[], &[0; 32]),
        Err(ProofError::IndexBeyondSize { index: 4, size: 4 }),
        "an index outside the tree is refused"
    );
    Ok(())
}

fn small_log() -> &'static Log<MemoryStore> {
    static LOG: OnceLock<Log<MemoryStore>> = OnceLock::new();
    LOG.get_or_init(|| {
        let mut log = Log::new(MemoryStore::new());
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let _ = log.append_many(&leaves);
        log
    })
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

proptest! {
    /// Invariant: any changed byte of an inclusion proof, its leaf or its root
    /// fails verification, as does a dropped or an extra hash.
    #[test]
    fn tampered_inclusion_proofs_fail(n in 1u64..=300, m in any::<u64>(), which in any::<usize>(), byte in 0usize..32, xor in 1u8..=255) {
        let log = small_log();
        let m = m % n;
        let proof = log.inclusion_proof(m, n).map_err(fail)?;
        let root = log.root(n).map_err(fail)?;
        let leaf = leaf_hash(&(m as u32).to_le_bytes());
        prop_assert!(verify_inclusion(&leaf, m, n, &proof.hashes, &root).is_ok(), "the untouched proof verifies");
        let slots = proof.hashes.len() + 2;
        let mut hashes = proof.hashes.clone();
        let (mut leaf2, mut root2) = (leaf, root);
        match which % slots {
            0 => leaf2[byte] ^= xor,
            1 => root2[byte] ^= xor,
            i => hashes[i - 2][byte] ^= xor,
        }
        prop_assert!(verify_inclusion(&leaf2, m, n, &hashes, &root2).is_err(), "a changed byte fails");
        let mut longer = proof.hashes.clone();
        longer.push([0; 32]);
        prop_assert!(verify_inclusion(&leaf, m, n, &longer, &root).is_err(), "an extra hash fails");
        if !proof.hashes.is_empty() {
            let shorter = &proof.hashes[..proof.hashes.len() - 1];
            prop_assert!(verify_inclusion(&leaf, m, n, shorter, &root).is_err(), "a dropped hash fails");
        }
    }

    /// Invariant: any changed byte of a consistency proof or of either root
    /// fails verification, as does a dropped or an extra hash.
    #[test]
    fn tampered_consistency_proofs_fail(n in 2u64..=300, m in any::<u64>(), which in any::<usize>(), byte in 0usize..32, xor in 1u8..=255) {
        let log = small_log();
        let m = 1 + m % (n - 1);
        let proof = log.consistency_proof(m, n).map_err(fail)?;
        let (old_root, new_root) = (log.root(m).map_err(fail)?, log.root(n).map_err(fail)?);
        prop_assert!(verify_consistency(m, n, &old_root, &new_root, &proof.hashes).is_ok(), "the untouched proof verifies");
        let slots = proof.hashes.len() + 2;
        let mut hashes = proof.hashes.clone();
        let (mut old2, mut new2) = (old_root, new_root);
        match which % slots {
            0 => old2[byte] ^= xor,
            1 => new2[byte] ^= xor,
            i => hashes[i - 2][byte] ^= xor,
        }
        prop_assert!(verify_consistency(m, n, &old2, &new2, &hashes).is_err(), "a changed byte fails");
        let mut longer = proof.hashes.clone();
        longer.push([0; 32]);
        prop_assert!(verify_consistency(m, n, &old_root, &new_root, &longer).is_err(), "an extra hash fails");
        let shorter = &proof.hashes[..proof.hashes.len() - 1];
        prop_assert!(verify_consistency(m, n, &old_root, &new_root, shorter).is_err(), "a dropped hash fails");
    }

    /// Invariant: proofs survive their JSON form, and the parser refuses
    /// (never panics on) anything that is not a proof.
    #[test]
    fn proof_json_round_trips_and_refuses_garbage(n in 1u64..=300, m in any::<u64>(), garbage in ".{0,200}") {
        let log = small_log();
        let proof = log.inclusion_proof(m % n, n).map_err(fail)?;
        let json = serde_json::to_string(&proof).map_err(fail)?;
        prop_assert_eq!(serde_json::from_str::<super::InclusionProof>(&json).ok(), Some(proof), "round trip");
        let _ = serde_json::from_str::<super::InclusionProof>(&garbage);
        let _ = serde_json::from_str::<super::ConsistencyProof>(&garbage);
    }
}

/// Invariant: a proof whose JSON names a hash that is not 32 bytes of base64 is refused with the reason.
#[test]
fn proof_json_refuses_bad_hashes() -> TestResult {
    for (json, why) in [
        (
            r#"{"leaf_index":0,"tree_size":2,"hashes":["AAAA"]}"#,
            "3 bytes",
        ),
        (
            r#"{"leaf_index":0,"tree_size":2,"hashes":["%%%"]}"#,
            "not base64",
        ),
        (
            r#"{"leaf_index":0,"tree_size":2,"hashes":[],"extra":1}"#,
            "unknown field",
        ),
    ] {
        let err = serde_json::from_str::<super::InclusionProof>(json).err();
        assert!(
            err.as_ref().is_some_and(|e| e.to_string().contains(why)),
            "{json}: expected an error naming {why:?}, got {err:?}"
        );
    }
    Ok(())
}
