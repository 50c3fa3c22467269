//! The Merkle tree over a hash store: O(log n) appends, and roots and proofs at any size from O(log n) stored hashes.
//!
//! The store holds the hash of every complete, aligned subtree: node
//! (level l, index i) covers leaves [i·2^l, (i+1)·2^l). An append stores the
//! leaf and each parent it completes (at most log2 n + 1 hashes, reading as
//! many left siblings). Any tree head or proof element is the fold of at most
//! log2 n such nodes, so nothing ever needs all leaves in memory, and the
//! server can keep the nodes in its database (one row per node).

use std::collections::HashMap;

use super::proof::{ConsistencyProof, InclusionProof};
use super::{Hash, empty_root, node_hash, split_point};

/// One complete subtree: 2^level leaves starting at leaf `index << level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub level: u32,
    pub index: u64,
}

/// A hash store's own failure (its database, say), carried through the tree.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub Box<dyn std::error::Error + Send + Sync>);

impl StoreError {
    pub fn msg(message: impl Into<String>) -> Self {
        Self(message.into().into())
    }
}

/// Where the tree's hashes live. Implementations: [`MemoryStore`] here; the
/// central server's database.
pub trait HashStore {
    /// How many leaves the store holds.
    fn size(&self) -> Result<u64, StoreError>;

    /// The hash of a complete subtree, or None when the store does not hold it.
    fn node(&self, id: NodeId) -> Result<Option<Hash>, StoreError>;

    /// Several nodes at once (one database query, say); same order as `ids`.
    fn nodes(&self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>, StoreError> {
        ids.iter().map(|id| self.node(*id)).collect()
    }

    /// Adds the nodes an append completes and makes `new_size` the size, all
    /// or nothing. `nodes` lists, in order, each new leaf (level 0) followed by
    /// the parents it completes.
    fn extend(&mut self, new_size: u64, nodes: &[(NodeId, Hash)]) -> Result<(), StoreError>;
}

/// The whole tree in memory: one vector of hashes per level (2n hashes for n leaves).
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    levels: Vec<Vec<Hash>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl HashStore for MemoryStore {
    fn size(&self) -> Result<u64, StoreError> {
        Ok(self.levels.first().map_or(0, |l| l.len() as u64))
    }

    fn node(&self, id: NodeId) -> Result<Option<Hash>, StoreError> {
        let Ok(index) = usize::try_from(id.index) else {
            return Ok(None);
        };
        Ok(self
            .levels
            .get(id.level as usize)
            .and_then(|l| l.get(index))
            .copied())
    }

    fn extend(&mut self, new_size: u64, nodes: &[(NodeId, Hash)]) -> Result<(), StoreError> {
        // Check first, so a bad batch changes nothing.
        let mut next: Vec<u64> = self.levels.iter().map(|l| l.len() as u64).collect();
        for (id, _) in nodes {
            let level = id.level as usize;
            if next.len() <= level {
                next.resize(level + 1, 0);
            }
            if next[level] != id.index {
                return Err(StoreError::msg(format!(
                    "node (level {}, index {}) is out of order: level {} holds {} nodes",
                    id.level, id.index, id.level, next[level]
                )));
            }
            next[level] += 1;
        }
        if next.first().copied().unwrap_or(0) != new_size {
            return Err(StoreError::msg(format!(
                "the batch leaves {} leaves, not the announced size {new_size}",
                next.first().copied().unwrap_or(0)
            )));
        }
        for (id, hash) in nodes {
            let level = id.level as usize;
            if self.levels.len() <= level {
                self.levels.resize_with(level + 1, Vec::new);
            }
            self.levels[level].push(*hash);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree size {size} is beyond the log, which has {log_size} leaves")]
    SizeBeyondLog { size: u64, log_size: u64 },
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexBeyondSize { index: u64, size: u64 },
    #[error("no consistency proof from size {old} to the smaller size {new}")]
    OldSizeLarger { old: u64, new: u64 },
    #[error(
        "the hash store lacks node (level {}, index {}) although it holds {size} leaves: the store is damaged",
        .id.level, .id.index
    )]
    MissingNode { id: NodeId, size: u64 },
    #[error("hash store: {0}")]
    Store(#[from] StoreError),
}

/// A Merkle tree log over a [`HashStore`].
#[derive(Clone, Debug, Default)]
pub struct Log<S> {
    store: S,
}

/// [`NodeId`]s whose right fold is the RFC 6962 MTH of leaves [start, end).
/// Holds for every range the RFC's recursions visit: each starts at a
/// multiple of the largest power of two not above its length.
fn subtrees(start: u64, end: u64) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut s = start;
    while s < end {
        let mut level = if s == 0 { 63 } else { s.trailing_zeros() };
        while level > 0 && (1u64 << level) > end - s {
            level -= 1;
        }
        out.push(NodeId {
            level,
            index: s >> level,
        });
        s += 1u64 << level;
    }
    out
}

/// The ranges of an inclusion proof (RFC 9162 2.1.3.1 PATH), leaf to root.
fn inclusion_ranges(index: u64, size: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let (mut start, mut end) = (0, size);
    while end - start > 1 {
        let k = split_point(end - start);
        if index < start + k {
            ranges.push((start + k, end));
            end = start + k;
        } else {
            ranges.push((start, start + k));
            start += k;
        }
    }
    ranges.reverse();
    ranges
}

/// The ranges of a consistency proof (RFC 9162 2.1.4.1 SUBPROOF), 0 < old < new.
fn consistency_ranges(old: u64, new: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let (mut start, mut end, mut m, mut complete) = (0, new, old, true);
    loop {
        if m == end - start {
            if !complete {
                ranges.push((start, end));
            }
            break;
        }
        let k = split_point(end - start);
        if m <= k {
            ranges.push((start + k, end));
            end = start + k;
        } else {
            ranges.push((start, start + k));
            start += k;
            m -= k;
            complete = false;
        }
    }
    ranges.reverse();
    ranges
}

impl<S: HashStore> Log<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    /// How many leaves the log holds.
    pub fn size(&self) -> Result<u64, TreeError> {
        Ok(self.store.size()?)
    }

    /// Appends one leaf hash; returns its index.
    pub fn append(&mut self, leaf: Hash) -> Result<u64, TreeError> {
        let first = self.append_many(&[leaf])?;
        Ok(first)
    }

    /// Appends leaf hashes in one store write; returns the first one's index.
    /// Reads at most log2 n stored left siblings, whatever the batch size.
    pub fn append_many(&mut self, leaves: &[Hash]) -> Result<u64, TreeError> {
        let size = self.store.size()?;
        let mut batch: HashMap<NodeId, Hash> = HashMap::new();
        let mut nodes = Vec::with_capacity(leaves.len() * 2);
        for (offset, leaf) in leaves.iter().enumerate() {
            let mut id = NodeId {
                level: 0,
                index: size + offset as u64,
            };
            let mut hash = *leaf;
            nodes.push((id, hash));
            batch.insert(id, hash);
            while id.index & 1 == 1 {
                let sibling = NodeId {
                    level: id.level,
                    index: id.index - 1,
                };
                let left = match batch.get(&sibling) {
                    Some(h) => *h,
                    None => self.node(sibling, size)?,
                };
                hash = node_hash(&left, &hash);
                id = NodeId {
                    level: id.level + 1,
                    index: id.index >> 1,
                };
                nodes.push((id, hash));
                batch.insert(id, hash);
            }
        }
        let new_size = size + leaves.len() as u64;
        self.store.extend(new_size, &nodes)?;
        Ok(size)
    }

    fn node(&self, id: NodeId, size: u64) -> Result<Hash, TreeError> {
        self.store
            .node(id)?
            .ok_or(TreeError::MissingNode { id, size })
    }

    fn check_size(&self, size: u64) -> Result<u64, TreeError> {
        let log_size = self.store.size()?;
        if size > log_size {
            return Err(TreeError::SizeBeyondLog { size, log_size });
        }
        Ok(log_size)
    }

    /// The MTH of each range, reading every node they need in one store call.
    fn range_hashes(&self, ranges: &[(u64, u64)], log_size: u64) -> Result<Vec<Hash>, TreeError> {
        let plans: Vec<Vec<NodeId>> = ranges.iter().map(|(s, e)| subtrees(*s, *e)).collect();
        let mut ids: Vec<NodeId> = plans.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let fetched = self.store.nodes(&ids)?;
        let mut known = HashMap::with_capacity(ids.len());
        for (id, hash) in ids.iter().zip(fetched) {
            let hash = hash.ok_or(TreeError::MissingNode {
                id: *id,
                size: log_size,
            })?;
            known.insert(*id, hash);
        }
        plans
            .iter()
            .map(|plan| {
                let mut nodes = plan.iter().rev();
                let last = nodes.next().ok_or(TreeError::MissingNode {
                    id: NodeId { level: 0, index: 0 },
                    size: log_size,
                })?;
                let mut acc = known[last];
                for id in nodes {
                    acc = node_hash(&known[id], &acc);
                }
                Ok(acc)
            })
            .collect()
    }

    /// The root hash (tree head) at `size`, which may be any size up to the log's.
    pub fn root(&self, size: u64) -> Result<Hash, TreeError> {
        let log_size = self.check_size(size)?;
        if size == 0 {
            return Ok(empty_root());
        }
        Ok(self.range_hashes(&[(0, size)], log_size)?[0])
    }

    /// The inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 2.1.3.1).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<InclusionProof, TreeError> {
        let log_size = self.check_size(size)?;
        if index >= size {
            return Err(TreeError::IndexBeyondSize { index, size });
        }
        let hashes = self.range_hashes(&inclusion_ranges(index, size), log_size)?;
        Ok(InclusionProof {
            leaf_index: index,
            tree_size: size,
            hashes,
        })
    }

    /// The consistency proof from the tree of `old` leaves to that of `new` (RFC 9162 2.1.4.1).
    /// Empty when old is 0 or equal to new.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<ConsistencyProof, TreeError> {
        let log_size = self.check_size(new)?;
        if old > new {
            return Err(TreeError::OldSizeLarger { old, new });
        }
        let hashes = if old == 0 || old == new {
            Vec::new()
        } else {
            self.range_hashes(&consistency_ranges(old, new), log_size)?
        };
        Ok(ConsistencyProof {
            old_size: old,
            new_size: new,
            hashes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::leaf_hash;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// Invariant: the store holds exactly the complete subtrees, so it grows by about 2n hashes.
    #[test]
    fn store_holds_each_complete_subtree_once() -> TestResult {
        let mut log = Log::new(MemoryStore::new());
        log.append_many(&leaves(1000))?;
        let held: usize = log.store().levels.iter().map(Vec::len).sum();
        // Complete subtrees of 1000 leaves: sum over l of floor(1000 / 2^l).
        let expected: u64 = (0..=10).map(|l| 1000u64 >> l).sum();
        assert_eq!(held as u64, expected, "one hash per complete subtree");
        Ok(())
    }

    /// Invariant: appending one at a time and in batches builds the same tree.
    #[test]
    fn batch_and_single_appends_agree() -> TestResult {
        let all = leaves(777);
        let mut one = Log::new(MemoryStore::new());
        for l in &all {
            one.append(*l)?;
        }
        let mut batched = Log::new(MemoryStore::new());
        for chunk in all.chunks(100) {
            batched.append_many(chunk)?;
        }
        for size in [0, 1, 2, 3, 64, 100, 101, 776, 777] {
            assert_eq!(one.root(size)?, batched.root(size)?, "roots at size {size}");
        }
        Ok(())
    }

    /// Invariant: requests past the log and a damaged store are refused by name, never answered.
    #[test]
    fn refusals_name_the_problem() -> TestResult {
        let mut log = Log::new(MemoryStore::new());
        log.append_many(&leaves(10))?;
        assert!(
            matches!(
                log.root(11),
                Err(TreeError::SizeBeyondLog {
                    size: 11,
                    log_size: 10
                })
            ),
            "root beyond the log"
        );
        assert!(
            matches!(
                log.inclusion_proof(10, 10),
                Err(TreeError::IndexBeyondSize { .. })
            ),
            "index beyond the size"
        );
        assert!(
            matches!(
                log.inclusion_proof(0, 11),
                Err(TreeError::SizeBeyondLog { .. })
            ),
            "inclusion proof beyond the log"
        );
        assert!(
            matches!(
                log.consistency_proof(5, 11),
                Err(TreeError::SizeBeyondLog { .. })
            ),
            "consistency proof beyond the log"
        );
        assert!(
            matches!(
                log.consistency_proof(6, 5),
                Err(TreeError::OldSizeLarger { .. })
            ),
            "consistency proof backwards"
        );
        let mut damaged = log.store().clone();
        damaged.levels[1].truncate(2);
        let damaged = Log::new(damaged);
        assert!(
            matches!(damaged.root(10), Err(TreeError::MissingNode { .. })),
            "a store missing a node is reported as damaged"
        );
        let mut store = MemoryStore::new();
        let bad = store.extend(1, &[(NodeId { level: 0, index: 5 }, [0; 32])]);
        assert!(bad.is_err(), "an out-of-order node is refused");
        assert_eq!(store.size()?, 0, "a refused batch changes nothing");
        Ok(())
    }
}
