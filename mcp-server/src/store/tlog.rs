//! The transparency log's storage: the queue of accepted bundles not yet in the log,
//! the leaves, the hash of every complete subtree, and the signed checkpoints.
//!
//! Intake never touches the log: a trigger queues each inserted bundle in the intake's
//! own transaction (migration 0003), and the sequencer (`crate::tlog`) appends queued
//! bundles in queue order under the log's write lock (PostgreSQL: a row lock on
//! `tlog_head`; SQLite: the database's write lock), so several server processes on one
//! database build one log. The tree arithmetic is the agent crate's
//! (`compliance_agent::tlog::Log`), run here over the backend's transaction.

use std::cell::RefCell;

use compliance_agent::tlog::{BundleLeaf, Hash, HashStore, Log, NodeId};
use jiff::Timestamp;
use serde::Serialize;

use super::{Result, StoreError};
use crate::auth::Caller;

/// One leaf of the log: the bundle it stands for and its RFC 6962 leaf hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogLeaf {
    pub leaf_index: u64,
    pub bundle_id: String,
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    /// SHA-256 of the bundle's bundle.json, hex.
    pub bundle_sha256: String,
    #[serde(serialize_with = "b64")]
    pub leaf_hash: Hash,
}

impl LogLeaf {
    /// The leaf's identity as docs/tlog.md encodes it.
    pub fn bundle_leaf(&self) -> Result<BundleLeaf> {
        bundle_leaf(
            &self.site_id,
            &self.host_id,
            self.seq,
            &self.bundle_id,
            &self.bundle_sha256,
        )
    }
}

/// A checkpoint the log signed: its size, root and the C2SP signed note.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignedCheckpoint {
    pub tree_size: u64,
    #[serde(serialize_with = "b64")]
    pub root: Hash,
    pub note: String,
    pub signed_at: Timestamp,
}

fn b64<S: serde::Serializer>(h: &Hash, s: S) -> std::result::Result<S::Ok, S::Error> {
    use base64::Engine as _;
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(h))
}

/// Where a bundle stands in the log, as the caller may know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafLookup {
    Sequenced(LogLeaf),
    /// Accepted and queued; the sequencer has not appended it yet.
    Pending,
    /// No such bundle among the caller's tenants.
    Unknown,
}

/// Signs the checkpoint of a new tree head: (size, root) -> the signed note.
pub type CheckpointSigner<'a> = dyn Fn(u64, &Hash) -> std::result::Result<String, String> + 'a;

/// The transparency log's storage; both backends implement it, and the conformance
/// suite (tests/store.rs) runs against each.
pub trait LogStore: Send + Sync {
    /// In one transaction under the log's write lock: appends up to `max` queued
    /// bundles (queue order), stores the nodes they complete, signs the new tree head
    /// with `sign` and stores that checkpoint. None when nothing was queued.
    fn log_sequence(
        &self,
        max: usize,
        now: Timestamp,
        sign: &CheckpointSigner<'_>,
    ) -> Result<Option<SignedCheckpoint>>;
    /// Leaves the stored nodes cover (the size of the newest checkpoint).
    fn log_size(&self) -> Result<u64>;
    /// Accepted bundles waiting for the sequencer.
    fn log_queued(&self) -> Result<u64>;
    /// Stored subtree hashes, in the order of `ids`; None for a node not held.
    fn log_nodes(&self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>>;
    /// The newest checkpoint, if the log has one.
    fn log_latest(&self) -> Result<Option<SignedCheckpoint>>;
    /// The checkpoint signed at exactly `tree_size`, if any.
    fn log_checkpoint(&self, tree_size: u64) -> Result<Option<SignedCheckpoint>>;
    /// Checkpoints with `from <= tree_size <= to`, oldest first.
    fn log_checkpoints(&self, from: u64, to: u64) -> Result<Vec<SignedCheckpoint>>;
    /// A bundle's leaf, scoped by the caller's tenants.
    fn log_leaf(&self, caller: &Caller, bundle_id: &str) -> Result<LeafLookup>;
    /// The leaf with this leaf hash, scoped by the caller's tenants.
    fn log_leaf_by_hash(&self, caller: &Caller, leaf_hash: &Hash) -> Result<LeafLookup>;
    /// The leaves of one host in seq order, scoped by the caller's tenants.
    fn log_host_leaves(
        &self,
        caller: &Caller,
        site_id: &str,
        host_id: &str,
    ) -> Result<Vec<LogLeaf>>;
}

/// A queued bundle as the sequencer reads it; `bundle` is None when the queue names a
/// bundle the index does not hold (never written by the server itself).
pub(crate) struct Queued {
    pub queue_id: i64,
    pub bundle_id: String,
    pub bundle: Option<QueuedBundle>,
}

pub(crate) struct QueuedBundle {
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    pub hash: String,
}

/// What a backend's sequencing transaction offers; [`sequence_in`] does the rest.
pub(crate) trait LogTx {
    fn head_size(&mut self) -> Result<u64>;
    fn queued(&mut self, max: usize) -> Result<Vec<Queued>>;
    fn nodes(&mut self, ids: &[NodeId]) -> Result<Vec<Option<Hash>>>;
    /// Inserts nodes and sets the head's size.
    fn put_nodes(&mut self, new_size: u64, nodes: &[(NodeId, Hash)]) -> Result<()>;
    fn put_leaves(&mut self, leaves: &[LogLeaf], now: Timestamp) -> Result<()>;
    fn put_checkpoint(&mut self, checkpoint: &SignedCheckpoint) -> Result<()>;
    fn dequeue(&mut self, queue_ids: &[i64]) -> Result<()>;
}

pub(crate) fn bundle_leaf(
    site_id: &str,
    host_id: &str,
    seq: u64,
    bundle_id: &str,
    bundle_sha256: &str,
) -> Result<BundleLeaf> {
    let mut sha = [0u8; 32];
    hex::decode_to_slice(bundle_sha256, &mut sha).map_err(|e| {
        StoreError::Backend(format!(
            "bundle {bundle_id}: stored hash {bundle_sha256:?} is not SHA-256 hex: {e}"
        ))
    })?;
    Ok(BundleLeaf {
        site_id: site_id.into(),
        host_id: host_id.into(),
        seq,
        bundle_id: bundle_id.into(),
        bundle_sha256: sha,
    })
}

/// The tree's hashes inside a sequencing transaction.
struct TxNodes<'a, T: LogTx> {
    tx: RefCell<&'a mut T>,
    size: u64,
}

fn store_err(e: StoreError) -> compliance_agent::tlog::StoreError {
    compliance_agent::tlog::StoreError(Box::new(e))
}

impl<T: LogTx> HashStore for TxNodes<'_, T> {
    fn size(&self) -> std::result::Result<u64, compliance_agent::tlog::StoreError> {
        Ok(self.size)
    }

    fn node(
        &self,
        id: NodeId,
    ) -> std::result::Result<Option<Hash>, compliance_agent::tlog::StoreError> {
        Ok(self.nodes(&[id])?.pop().flatten())
    }

    fn nodes(
        &self,
        ids: &[NodeId],
    ) -> std::result::Result<Vec<Option<Hash>>, compliance_agent::tlog::StoreError> {
        self.tx.borrow_mut().nodes(ids).map_err(store_err)
    }

    fn extend(
        &mut self,
        new_size: u64,
        nodes: &[(NodeId, Hash)],
    ) -> std::result::Result<(), compliance_agent::tlog::StoreError> {
        self.tx
            .borrow_mut()
            .put_nodes(new_size, nodes)
            .map_err(store_err)?;
        self.size = new_size;
        Ok(())
    }
}

fn tree_err(e: compliance_agent::tlog::TreeError) -> StoreError {
    StoreError::Backend(format!("transparency log: {e}"))
}

/// One sequencing step inside a backend's locked transaction (the caller commits).
pub(crate) fn sequence_in<T: LogTx>(
    tx: &mut T,
    max: usize,
    now: Timestamp,
    sign: &CheckpointSigner<'_>,
) -> Result<Option<SignedCheckpoint>> {
    // Both backends keep microseconds: the checkpoint returned is the one stored.
    let now = Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now);
    let size = tx.head_size()?;
    let queued = tx.queued(max)?;
    if queued.is_empty() {
        return Ok(None);
    }
    let orphans: Vec<&str> = queued
        .iter()
        .filter(|q| q.bundle.is_none())
        .map(|q| q.bundle_id.as_str())
        .collect();
    if !orphans.is_empty() {
        // The queue is written only by the intake trigger, so this is a damaged database:
        // stop rather than skip (a skipped bundle would be missing from the log).
        return Err(StoreError::Backend(format!(
            "the log queue names bundle(s) the index does not hold: {}",
            orphans.join(", ")
        )));
    }
    let mut leaves = Vec::with_capacity(queued.len());
    for (offset, (q, b)) in queued
        .iter()
        .filter_map(|q| q.bundle.as_ref().map(|b| (q, b)))
        .enumerate()
    {
        let leaf = bundle_leaf(&b.site_id, &b.host_id, b.seq, &q.bundle_id, &b.hash)?;
        let leaf_hash = leaf.hash().map_err(|e| {
            StoreError::Backend(format!("bundle {} cannot be a log leaf: {e}", q.bundle_id))
        })?;
        leaves.push(LogLeaf {
            leaf_index: size + offset as u64,
            bundle_id: q.bundle_id.clone(),
            site_id: b.site_id.clone(),
            host_id: b.host_id.clone(),
            seq: b.seq,
            bundle_sha256: b.hash.clone(),
            leaf_hash,
        });
    }
    let hashes: Vec<Hash> = leaves.iter().map(|l| l.leaf_hash).collect();
    let (new_size, root) = {
        let mut log = Log::new(TxNodes {
            tx: RefCell::new(&mut *tx),
            size,
        });
        log.append_many(&hashes).map_err(tree_err)?;
        let new_size = log.size().map_err(tree_err)?;
        (new_size, log.root(new_size).map_err(tree_err)?)
    };
    let note = sign(new_size, &root)
        .map_err(|e| StoreError::Backend(format!("cannot sign the log's checkpoint: {e}")))?;
    tx.put_leaves(&leaves, now)?;
    let checkpoint = SignedCheckpoint {
        tree_size: new_size,
        root,
        note,
        signed_at: now,
    };
    tx.put_checkpoint(&checkpoint)?;
    tx.dequeue(&queued.iter().map(|q| q.queue_id).collect::<Vec<_>>())?;
    Ok(Some(checkpoint))
}

/// Converts a stored hash column.
pub(crate) fn hash_col(bytes: Vec<u8>, what: &str) -> Result<Hash> {
    Hash::try_from(bytes.as_slice()).map_err(|_| {
        StoreError::Backend(format!(
            "{what} is {} bytes in the database, not 32",
            bytes.len()
        ))
    })
}

/// Signed integer column for a tree index or size.
pub(crate) fn index_sql(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("log index {v} exceeds the range")))
}
