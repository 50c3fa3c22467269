//! The server's transparency log: the sequencer that appends accepted bundles and signs
//! checkpoints with the log key, and the proofs the agent and operator APIs serve.
//!
//! Intake does not wait for the log: the sequencer runs as a background task (woken
//! after each stored bundle and once a second) and in `mcp-server log sequence`. A proof
//! is computed only from what the store holds for a signed checkpoint, so a request the
//! log cannot answer yet is "pending", never a wrong proof.

use std::sync::Arc;
use std::time::Duration;

use compliance_agent::crypto::SigningKey;
use compliance_agent::tlog::{
    Checkpoint, ConsistencyProof, Hash, HashStore, InclusionProof, Log, LogSigner, LogVerifier,
    NodeId, TreeError,
};
use jiff::Timestamp;
use serde::Serialize;

use crate::auth::Caller;
use crate::services::Services;
use crate::store::tlog::{LeafLookup, LogLeaf, SignedCheckpoint};
use crate::store::{Store, StoreError};

/// Bundles appended in one transaction; a longer queue takes several.
pub const SEQUENCE_BATCH: usize = 4096;
/// How often the sequencer looks for queued bundles when nothing woke it.
pub const SEQUENCE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a box is told to wait before asking again for a pending proof.
pub const RETRY_AFTER_SEC: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("no bundle {0} among this caller's hosts")]
    UnknownBundle(String),
    #[error("no leaf with hash {0} among this caller's hosts")]
    UnknownLeaf(String),
    #[error(
        "bundle {0} is accepted but not yet in the log (the sequencer appends it within seconds); ask again later"
    )]
    Pending(String),
    #[error("the log has no checkpoint yet (no bundle was sequenced); ask again later")]
    Empty,
    #[error("tree size {size} is beyond the log, whose newest checkpoint has size {log_size}")]
    SizeBeyondLog { size: u64, log_size: u64 },
    #[error(
        "bundle {bundle_id} is leaf {index}, which is not in the tree of size {size}; ask for a tree size above {index}"
    )]
    NotInTree {
        bundle_id: String,
        index: u64,
        size: u64,
    },
    #[error("no consistency proof from size {old} to the smaller size {new}")]
    OldSizeLarger { old: u64, new: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("the log's storage: {0}")]
    Store(#[from] StoreError),
    #[error("the log's storage is damaged: {0}")]
    Tree(String),
}

impl LogError {
    pub fn status(&self) -> u16 {
        match self {
            LogError::UnknownBundle(_) | LogError::UnknownLeaf(_) => 404,
            LogError::Pending(_) | LogError::Empty => 202,
            LogError::SizeBeyondLog { .. } | LogError::NotInTree { .. } => 416,
            LogError::OldSizeLarger { .. } | LogError::BadRequest(_) => 400,
            LogError::Store(StoreError::Unavailable(_)) => 503,
            LogError::Store(_) | LogError::Tree(_) => 500,
        }
    }

    /// Pending answers carry this machine-readable status beside the message.
    pub fn is_pending(&self) -> bool {
        matches!(self, LogError::Pending(_) | LogError::Empty)
    }
}

fn tree(e: TreeError) -> LogError {
    LogError::Tree(e.to_string())
}

/// The log key and the wake-up of the sequencer.
pub struct LogService {
    signer: LogSigner,
    verifier: LogVerifier,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for LogService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogService")
            .field("origin", &self.verifier.origin())
            .finish_non_exhaustive()
    }
}

impl LogService {
    pub fn new(origin: &str, key: SigningKey) -> crate::Result<Self> {
        let signer = LogSigner::new(origin, key)
            .map_err(|e| crate::Error::Invalid(format!("log_origin {origin:?}: {e}")))?;
        let verifier = signer.verifier();
        Ok(Self {
            signer,
            verifier,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// `<origin>+<key ID>+<base64 key>`: what boxes and auditors verify checkpoints with.
    pub fn vkey(&self) -> String {
        self.verifier.to_vkey()
    }

    pub fn origin(&self) -> &str {
        self.verifier.origin()
    }

    pub fn verifier(&self) -> &LogVerifier {
        &self.verifier
    }

    /// Asks the background sequencer to run now (after intake stored a bundle).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn sign(&self, size: u64, root: &Hash) -> std::result::Result<String, String> {
        self.signer
            .sign(&Checkpoint {
                origin: self.verifier.origin().to_owned(),
                size,
                root: *root,
                extensions: vec![],
            })
            .map_err(|e| e.to_string())
    }
}

/// Appends every queued bundle (in batches) and returns the newest checkpoint signed.
pub fn sequence(store: &dyn Store, log: &LogService) -> Result<Option<SignedCheckpoint>, LogError> {
    let mut newest = None;
    while let Some(c) =
        store.log_sequence(SEQUENCE_BATCH, Timestamp::now(), &|n, r| log.sign(n, r))?
    {
        newest = Some(c);
    }
    Ok(newest)
}

/// The sequencer task: runs when woken and every SEQUENCE_INTERVAL until shutdown.
pub async fn run_sequencer(svc: Services, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let (store, log) = (svc.store.clone(), svc.log.clone());
        match tokio::task::spawn_blocking(move || sequence(&*store, &log)).await {
            Ok(Ok(Some(c))) => tracing::debug!(tree_size = c.tree_size, "log sequenced"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the log sequencer failed; retrying"),
            Err(e) => tracing::error!(error = %e, "the log sequencer panicked; retrying"),
        }
        tokio::select! {
            _ = svc.log.wake.notified() => {}
            _ = tokio::time::sleep(SEQUENCE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The tree as the store holds it, read only, at the size of a signed checkpoint.
pub struct StoredTree<'a> {
    store: &'a dyn Store,
    size: u64,
}

impl HashStore for StoredTree<'_> {
    fn size(&self) -> Result<u64, compliance_agent::tlog::StoreError> {
        Ok(self.size)
    }

    fn node(&self, id: NodeId) -> Result<Option<Hash>, compliance_agent::tlog::StoreError> {
        Ok(self.nodes(&[id])?.pop().flatten())
    }

    fn nodes(
        &self,
        ids: &[NodeId],
    ) -> Result<Vec<Option<Hash>>, compliance_agent::tlog::StoreError> {
        self.store
            .log_nodes(ids)
            .map_err(|e| compliance_agent::tlog::StoreError(Box::new(e)))
    }

    fn extend(
        &mut self,
        _new_size: u64,
        _nodes: &[(NodeId, Hash)],
    ) -> Result<(), compliance_agent::tlog::StoreError> {
        Err(compliance_agent::tlog::StoreError::msg(
            "proofs read the log; only the sequencer appends",
        ))
    }
}

/// The stored tree at the newest checkpoint's size, for proofs and roots at any size up to it.
pub fn stored_log(store: &dyn Store) -> Result<(Log<StoredTree<'_>>, SignedCheckpoint), LogError> {
    tree_at(store, None)
}

fn latest(store: &dyn Store) -> Result<SignedCheckpoint, LogError> {
    store.log_latest()?.ok_or(LogError::Empty)
}

/// A tree at `size` (default: the newest checkpoint's), refused beyond it.
fn tree_at(
    store: &dyn Store,
    size: Option<u64>,
) -> Result<(Log<StoredTree<'_>>, SignedCheckpoint), LogError> {
    let newest = latest(store)?;
    let size = size.unwrap_or(newest.tree_size);
    if size > newest.tree_size {
        return Err(LogError::SizeBeyondLog {
            size,
            log_size: newest.tree_size,
        });
    }
    Ok((
        Log::new(StoredTree {
            store,
            size: newest.tree_size,
        }),
        newest,
    ))
}

/// `GET .../log/checkpoint`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointAnswer {
    pub origin: String,
    pub tree_size: u64,
    /// The C2SP signed note.
    pub checkpoint: String,
    /// The key to verify it with.
    pub log_key: String,
}

pub fn checkpoint(svc: &Services) -> Result<CheckpointAnswer, LogError> {
    let c = latest(&*svc.store)?;
    Ok(CheckpointAnswer {
        origin: svc.log.origin().to_owned(),
        tree_size: c.tree_size,
        checkpoint: c.note,
        log_key: svc.log.vkey(),
    })
}

/// How a proof request names its leaf.
pub enum LeafKey<'a> {
    Bundle(&'a str),
    /// A leaf hash, standard base64 or hex.
    Hash(&'a str),
}

/// `GET .../log/inclusion`: the proof, the leaf it proves, and the checkpoint of its size.
#[derive(Clone, Debug, Serialize)]
pub struct InclusionAnswer {
    pub leaf: LogLeaf,
    pub proof: InclusionProof,
    /// The signed checkpoint at the proof's tree size, when the log signed one there.
    pub checkpoint: Option<String>,
}

fn parse_hash(text: &str) -> Result<Hash, LogError> {
    use base64::Engine as _;
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|e| LogError::BadRequest(format!("leaf_hash: {e}")))?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| {
                LogError::BadRequest(format!("leaf_hash is neither hex nor base64: {e}"))
            })?
    };
    Hash::try_from(bytes.as_slice())
        .map_err(|_| LogError::BadRequest(format!("leaf_hash is {} bytes, not 32", bytes.len())))
}

pub fn inclusion(
    svc: &Services,
    caller: &Caller,
    key: LeafKey<'_>,
    tree_size: Option<u64>,
) -> Result<InclusionAnswer, LogError> {
    let store = &*svc.store;
    let (lookup, name) = match key {
        LeafKey::Bundle(id) => (store.log_leaf(caller, id)?, id.to_owned()),
        LeafKey::Hash(h) => (
            store.log_leaf_by_hash(caller, &parse_hash(h)?)?,
            h.to_owned(),
        ),
    };
    let leaf = match lookup {
        LeafLookup::Sequenced(leaf) => leaf,
        LeafLookup::Pending => return Err(LogError::Pending(name)),
        LeafLookup::Unknown => {
            return Err(match key {
                LeafKey::Bundle(_) => LogError::UnknownBundle(name),
                LeafKey::Hash(_) => LogError::UnknownLeaf(name),
            });
        }
    };
    let (log, newest) = tree_at(store, tree_size)?;
    let size = tree_size.unwrap_or(newest.tree_size);
    if leaf.leaf_index >= size {
        return Err(LogError::NotInTree {
            bundle_id: leaf.bundle_id,
            index: leaf.leaf_index,
            size,
        });
    }
    let proof = log.inclusion_proof(leaf.leaf_index, size).map_err(tree)?;
    let checkpoint = if size == newest.tree_size {
        Some(newest.note)
    } else {
        store.log_checkpoint(size)?.map(|c| c.note)
    };
    Ok(InclusionAnswer {
        leaf,
        proof,
        checkpoint,
    })
}

/// `GET .../log/consistency`: the proof and the checkpoints at both sizes.
#[derive(Clone, Debug, Serialize)]
pub struct ConsistencyAnswer {
    pub proof: ConsistencyProof,
    pub old_checkpoint: Option<String>,
    pub new_checkpoint: Option<String>,
}

pub fn consistency(
    svc: &Services,
    old: u64,
    new: Option<u64>,
) -> Result<ConsistencyAnswer, LogError> {
    let store = &*svc.store;
    let (log, newest) = tree_at(store, new)?;
    let new = new.unwrap_or(newest.tree_size);
    if old > new {
        return Err(LogError::OldSizeLarger { old, new });
    }
    let proof = log.consistency_proof(old, new).map_err(tree)?;
    let note_at = |size: u64| -> Result<Option<String>, LogError> {
        if size == newest.tree_size {
            return Ok(Some(newest.note.clone()));
        }
        Ok(store.log_checkpoint(size)?.map(|c| c.note))
    };
    Ok(ConsistencyAnswer {
        proof,
        old_checkpoint: note_at(old)?,
        new_checkpoint: note_at(new)?,
    })
}

/// Loads the log key, making it (and its public `log.vkey`) on first start.
pub fn load_or_create(
    key_path: &std::path::Path,
    vkey_path: &std::path::Path,
    origin: &str,
) -> crate::Result<(Arc<LogService>, bool)> {
    let (key, created) = if key_path.exists() {
        (SigningKey::load(key_path)?, false)
    } else {
        let key = SigningKey::generate();
        crate::write_durable(key_path, key.to_pkcs8_pem()?.as_bytes(), 0o600)?;
        (key, true)
    };
    let log = LogService::new(origin, key)?;
    let vkey = format!("{}\n", log.vkey());
    if std::fs::read_to_string(vkey_path).ok().as_deref() != Some(vkey.as_str()) {
        crate::write_durable(vkey_path, vkey.as_bytes(), 0o644)?;
    }
    Ok((Arc::new(log), created))
}
