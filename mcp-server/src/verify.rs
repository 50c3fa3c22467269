//! `mcp-server verify`: checks a checkpoint and proofs offline, trusting nothing but the
//! log key: each checkpoint's signature, each inclusion proof against a leaf rebuilt
//! from its fields (and from the bundle's own bytes when given), each consistency proof.

use std::path::{Path, PathBuf};

use compliance_agent::mcp::{LogConsistency, LogInclusion};
use compliance_agent::tlog::{BundleLeaf, Checkpoint, LogVerifier};
use serde::Serialize;

use crate::{Error, Result};

/// What to check; every file is what the log routes answer (or a signed note).
#[derive(Clone, Debug, Default)]
pub struct VerifyRequest {
    /// The log key: a `<name>+<id>+<key>` string or a file holding one.
    pub log_key: String,
    pub checkpoints: Vec<PathBuf>,
    pub inclusions: Vec<PathBuf>,
    /// bundle.json of the bundle each inclusion proof is for (same order), optional.
    pub bundles: Vec<PathBuf>,
    pub consistencies: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub log_key: String,
    pub checked: Vec<String>,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io(path))
}

/// The verifier of a key string or of a file holding one.
pub fn verifier(key: &str) -> Result<LogVerifier> {
    let text = if Path::new(key).is_file() {
        String::from_utf8(read(Path::new(key))?)
            .map_err(|_| Error::Invalid(format!("{key} is not text")))?
    } else {
        key.to_owned()
    };
    LogVerifier::from_vkey(text.trim())
        .map_err(|e| Error::Invalid(format!("the log key {key:?}: {e}")))
}

fn leaf_of(view: &compliance_agent::mcp::LogLeafView) -> std::result::Result<BundleLeaf, String> {
    let mut sha = [0u8; 32];
    hex::decode_to_slice(&view.bundle_sha256, &mut sha)
        .map_err(|e| format!("the leaf's bundle_sha256 is not SHA-256 hex: {e}"))?;
    Ok(BundleLeaf {
        site_id: view.site_id.clone(),
        host_id: view.host_id.clone(),
        seq: view.seq,
        bundle_id: view.bundle_id.clone(),
        bundle_sha256: sha,
    })
}

fn check_bundle(leaf: &BundleLeaf, bundle_json: &Path) -> std::result::Result<(), String> {
    let bytes =
        std::fs::read(bundle_json).map_err(|e| format!("{}: {e}", bundle_json.display()))?;
    let bundle: compliance_agent::evidence::Bundle = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a bundle: {e}", bundle_json.display()))?;
    let own = BundleLeaf {
        site_id: bundle.site_id,
        host_id: bundle.host_id,
        seq: bundle.seq,
        bundle_id: bundle.bundle_id,
        bundle_sha256: compliance_agent::crypto::sha256(&bytes),
    };
    if own != *leaf {
        return Err(format!(
            "{} is not the bundle of this leaf (identity or bytes differ)",
            bundle_json.display()
        ));
    }
    Ok(())
}

fn note(v: &LogVerifier, text: &str, what: &str) -> std::result::Result<Checkpoint, String> {
    v.verify(text.as_bytes())
        .map_err(|e| format!("{what}: {e}"))
}

pub fn verify(req: &VerifyRequest) -> Result<VerifyReport> {
    let v = verifier(&req.log_key)?;
    let mut report = VerifyReport {
        log_key: v.to_vkey(),
        ..VerifyReport::default()
    };
    let mut known: Vec<Checkpoint> = Vec::new();
    for path in &req.checkpoints {
        let text = String::from_utf8_lossy(&read(path)?).into_owned();
        match note(&v, &text, &path.display().to_string()) {
            Ok(c) => {
                report
                    .checked
                    .push(format!("checkpoint {}: size {}", path.display(), c.size));
                known.push(c);
            }
            Err(e) => report.problems.push(e),
        }
    }
    if !req.bundles.is_empty() && req.bundles.len() != req.inclusions.len() {
        return Err(Error::Invalid(format!(
            "{} --bundle for {} --inclusion: give one bundle.json per inclusion proof, in order",
            req.bundles.len(),
            req.inclusions.len()
        )));
    }
    for (i, path) in req.inclusions.iter().enumerate() {
        let name = path.display().to_string();
        let result = (|| -> std::result::Result<String, String> {
            let answer: LogInclusion =
                serde_json::from_slice(&read(path).map_err(|e| e.to_string())?)
                    .map_err(|e| format!("not an inclusion proof: {e}"))?;
            let checkpoint = match &answer.checkpoint {
                Some(text) => note(&v, text, "its checkpoint")?,
                None => known
                    .iter()
                    .find(|c| c.size == answer.proof.tree_size)
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "no checkpoint of size {} to check it against (give --checkpoint)",
                            answer.proof.tree_size
                        )
                    })?,
            };
            let leaf = leaf_of(&answer.leaf)?;
            if let Some(bundle) = req.bundles.get(i) {
                check_bundle(&leaf, bundle)?;
            }
            let hash = leaf.hash().map_err(|e| e.to_string())?;
            answer
                .proof
                .verify(&hash, &checkpoint)
                .map_err(|e| format!("bundle {}: {e}", leaf.bundle_id))?;
            Ok(format!(
                "inclusion {name}: bundle {} is leaf {} of the tree of size {}",
                leaf.bundle_id, answer.proof.leaf_index, checkpoint.size
            ))
        })();
        match result {
            Ok(line) => report.checked.push(line),
            Err(e) => report.problems.push(format!("{name}: {e}")),
        }
    }
    for path in &req.consistencies {
        let name = path.display().to_string();
        let result = (|| -> std::result::Result<String, String> {
            let answer: LogConsistency =
                serde_json::from_slice(&read(path).map_err(|e| e.to_string())?)
                    .map_err(|e| format!("not a consistency proof: {e}"))?;
            let find = |size: u64,
                        given: &Option<String>,
                        what: &str|
             -> std::result::Result<Checkpoint, String> {
                match given {
                    Some(text) => note(&v, text, what),
                    None => known
                        .iter()
                        .find(|c| c.size == size)
                        .cloned()
                        .ok_or_else(|| format!("no {what} of size {size} (give --checkpoint)")),
                }
            };
            let old = find(
                answer.proof.old_size,
                &answer.old_checkpoint,
                "old checkpoint",
            )?;
            let new = find(
                answer.proof.new_size,
                &answer.new_checkpoint,
                "new checkpoint",
            )?;
            answer.proof.verify(&old, &new).map_err(|e| e.to_string())?;
            Ok(format!(
                "consistency {name}: the tree of size {} extends the tree of size {}",
                new.size, old.size
            ))
        })();
        match result {
            Ok(line) => report.checked.push(line),
            Err(e) => report.problems.push(format!("{name}: {e}")),
        }
    }
    Ok(report)
}
