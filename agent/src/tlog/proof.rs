//! Inclusion and consistency proofs and their verification (RFC 9162 2.1.3.2 and 2.1.4.2).
//!
//! A proof travels as JSON: sizes as numbers, hashes as standard base64 (the
//! encoding of a checkpoint's root hash), e.g.
//! `{"leaf_index":3,"tree_size":7,"hashes":["…","…","…"]}`.

use serde::{Deserialize, Serialize};

use super::Hash;
use super::checkpoint::Checkpoint;
use super::node_hash;

/// Proof that leaf `leaf_index` is in the tree of `tree_size` leaves, leaf to root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    #[serde(with = "b64_hashes")]
    pub hashes: Vec<Hash>,
}

/// Proof that the tree of `old_size` leaves is a prefix of the tree of `new_size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    pub old_size: u64,
    pub new_size: u64,
    #[serde(with = "b64_hashes")]
    pub hashes: Vec<Hash>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexBeyondSize { index: u64, size: u64 },
    #[error("a consistency proof cannot go from size {old} to the smaller size {new}")]
    OldSizeLarger { old: u64, new: u64 },
    #[error("the proof has more hashes than a proof for these sizes")]
    TooLong,
    #[error("the proof has fewer hashes than a proof for these sizes")]
    TooShort,
    #[error("the proof does not lead to the root hash of size {size}")]
    RootMismatch { size: u64 },
    #[error("the proof does not lead to the old root hash of size {size}")]
    OldRootMismatch { size: u64 },
    #[error("the proof is for {what} {proof}, the checkpoint has {checkpoint}")]
    SizeMismatch {
        what: &'static str,
        proof: u64,
        checkpoint: u64,
    },
    #[error("the checkpoints are of different logs ({old:?} and {new:?})")]
    OriginMismatch { old: String, new: String },
}

/// Checks that `leaf` (a leaf hash) is at `index` in the tree of `size` leaves with root `root`.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexBeyondSize { index, size });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::TooLong);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::TooShort);
    }
    if r != *root {
        return Err(ProofError::RootMismatch { size });
    }
    Ok(())
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of
/// the tree of `new_size` leaves with root `new_root`. Sizes 0 and equal sizes
/// take an empty proof (and, when equal, equal roots).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OldSizeLarger {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::TooLong);
        }
        if old_size == 0 && *old_root != super::empty_root() {
            return Err(ProofError::OldRootMismatch { size: 0 });
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch { size: new_size });
        }
        return Ok(());
    }
    let Some((first, rest)) = proof.split_first() else {
        return Err(ProofError::TooShort);
    };
    // A power-of-two old tree is a complete subtree of the new one: its root
    // starts the path instead of being sent.
    let (start, path): (&Hash, &[Hash]) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first, rest)
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in path {
        if snode == 0 {
            return Err(ProofError::TooLong);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fnode & 1 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::TooShort);
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch { size: old_size });
    }
    if sr != *new_root {
        return Err(ProofError::RootMismatch { size: new_size });
    }
    Ok(())
}

impl InclusionProof {
    /// Checks the proof of `leaf` (a leaf hash) against a verified checkpoint.
    pub fn verify(&self, leaf: &Hash, checkpoint: &Checkpoint) -> Result<(), ProofError> {
        if self.tree_size != checkpoint.size {
            return Err(ProofError::SizeMismatch {
                what: "tree size",
                proof: self.tree_size,
                checkpoint: checkpoint.size,
            });
        }
        verify_inclusion(
            leaf,
            self.leaf_index,
            self.tree_size,
            &self.hashes,
            &checkpoint.root,
        )
    }
}

impl ConsistencyProof {
    /// Checks that verified checkpoint `new` extends verified checkpoint `old` (the box's witness step).
    pub fn verify(&self, old: &Checkpoint, new: &Checkpoint) -> Result<(), ProofError> {
        if old.origin != new.origin {
            return Err(ProofError::OriginMismatch {
                old: old.origin.clone(),
                new: new.origin.clone(),
            });
        }
        if self.old_size != old.size {
            return Err(ProofError::SizeMismatch {
                what: "old size",
                proof: self.old_size,
                checkpoint: old.size,
            });
        }
        if self.new_size != new.size {
            return Err(ProofError::SizeMismatch {
                what: "new size",
                proof: self.new_size,
                checkpoint: new.size,
            });
        }
        verify_consistency(old.size, new.size, &old.root, &new.root, &self.hashes)
    }
}

/// Hashes as standard base64 strings in JSON; anything but 32 bytes is refused.
mod b64_hashes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Hash;

    /// A proof of a 2^64-leaf tree has 64 hashes; more is never a proof.
    const MAX_HASHES: usize = 64;

    pub fn serialize<S: Serializer>(hashes: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(hashes.iter().map(|h| STANDARD.encode(h)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        let strings = Vec::<String>::deserialize(d)?;
        if strings.len() > MAX_HASHES {
            return Err(D::Error::custom(format!(
                "{} hashes; no proof has more than {MAX_HASHES}",
                strings.len()
            )));
        }
        strings
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let bytes = STANDARD
                    .decode(s)
                    .map_err(|e| D::Error::custom(format!("hash {i} is not base64: {e}")))?;
                <Hash>::try_from(bytes.as_slice()).map_err(|_| {
                    D::Error::custom(format!("hash {i} is {} bytes, not 32", bytes.len()))
                })
            })
            .collect()
    }
}
