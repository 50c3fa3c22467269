//! Transparency-log primitives shared by the MSP's server (which keeps the log) and each box (which witnesses it).
//!
//! - RFC 6962 / RFC 9162 Merkle tree hashing ([`leaf_hash`], [`node_hash`]);
//! - the leaf of an evidence bundle ([`BundleLeaf`], encoding in docs/tlog.md);
//! - a tree over a [`HashStore`] that appends in O(log n) and serves roots,
//!   inclusion proofs and consistency proofs at any size reading O(log n)
//!   stored hashes ([`Log`], [`MemoryStore`]);
//! - verification of both proofs ([`verify_inclusion`], [`verify_consistency`]);
//! - signed checkpoints in the C2SP tlog-checkpoint format ([`checkpoint`]).

pub mod checkpoint;
mod leaf;
mod proof;
#[cfg(test)]
mod tests_reference;
mod tree;

pub use checkpoint::{Checkpoint, CheckpointError, LogSigner, LogVerifier};
pub use leaf::{BundleLeaf, LEAF_MAGIC, LeafError};
pub use proof::{
    ConsistencyProof, InclusionProof, ProofError, verify_consistency, verify_inclusion,
};
pub use tree::{HashStore, Log, MemoryStore, NodeId, StoreError, TreeError};

use sha2::{Digest, Sha256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// RFC 6962 2.1: the hash of a leaf, SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// RFC 6962 2.1: the hash of an interior node, SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree, SHA-256 of the empty string (RFC 6962 2.1).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `n` (n >= 2): RFC 6962's split point k.
pub(crate) fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2, "split_point needs at least two leaves");
    1u64 << (63 - (n - 1).leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_point_is_the_largest_power_of_two_below() {
        for n in 2u64..5000 {
            let k = split_point(n);
            assert!(k.is_power_of_two(), "k={k} for n={n} is a power of two");
            assert!(
                k < n && 2 * k >= n,
                "k={k} is the largest power of two below n={n}"
            );
        }
        assert_eq!(split_point(u64::MAX), 1 << 63, "no overflow at the top");
    }

    #[test]
    fn hashing_is_domain_separated() {
        let a = [7u8; 32];
        let mut joined = vec![];
        joined.extend_from_slice(&a);
        joined.extend_from_slice(&a);
        assert_ne!(
            leaf_hash(&joined),
            node_hash(&a, &a),
            "a leaf holding two hashes is not the node over them"
        );
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "the empty tree's root is SHA-256 of nothing"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "RFC 6962 test vector: the hash of the empty leaf"
        );
    }
}
