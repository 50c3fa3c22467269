//! The box as a witness of the MSP's transparency log (docs/tlog.md).
//!
//! At every order poll the box fetches the log's newest checkpoint, checks its
//! signature with the log key it received at enrollment, asks for a consistency
//! proof from the newest checkpoint it verified before, and asks for inclusion
//! proofs of the bundles the server acknowledged to it. A checkpoint that does not
//! verify, a log that shrank or forked, or an acknowledged bundle the log cannot
//! prove is stored as a signed `log_witness` alert bundle (once per problem), and
//! the box keeps its old view. Verified proofs are kept under `log-proofs/` so
//! `compliance-agent evidence verify --log-proofs` can check them offline.
//!
//! State: `log-witness.json` beside the queue (state_dir), written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::crypto::sha256_hex;
use crate::evidence::{Check, Draft, EvidenceStore, Outcome};
use crate::mcp::{LogAnswer, LogInclusion, LogLeafView, McpClient};
use crate::queue::{NewUpload, Queue};
use crate::tlog::{BundleLeaf, Checkpoint, ConsistencyProof, InclusionProof, LogVerifier};
use crate::{Error, Result};

/// The witness's state file, in state_dir beside the queue.
pub const STATE_FILE: &str = "log-witness.json";
/// Verified proofs, in state_dir.
pub const PROOFS_DIR: &str = "log-proofs";
/// Inclusion proofs asked for in one poll; the rest wait for the next.
pub const MAX_PROOFS_PER_POLL: usize = 64;
/// Alert fingerprints remembered, so a persisting problem is reported once.
const MAX_ALERTS_REMEMBERED: usize = 64;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct State {
    /// The newest checkpoint this box verified (a signed note).
    checkpoint: Option<String>,
    /// Every delivered bundle up to (delivered_at, seq) has its inclusion proof
    /// (or was pruned on the box before it could get one).
    proven_through: (i64, u64),
    /// Fingerprints of the alerts written.
    alerted: Vec<String>,
}

/// One stored inclusion proof (log-proofs/inclusion/<bundle_id>.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredInclusion {
    pub leaf: LogLeafView,
    pub proof: InclusionProof,
    pub checkpoint: String,
}

/// One stored consistency proof (log-proofs/consistency/<old>-<new>.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredConsistency {
    pub proof: ConsistencyProof,
    pub old_checkpoint: String,
    pub new_checkpoint: String,
}

/// What one witness step did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WitnessReport {
    /// Why the step did nothing (no log key, the log is empty, ...).
    pub skipped: Option<String>,
    /// The tree size of the checkpoint the box holds after the step.
    pub tree_size: Option<u64>,
    pub consistency_verified: bool,
    pub inclusion_verified: u64,
    /// Acknowledged bundles the log has not sequenced yet.
    pub inclusion_pending: u64,
    /// Bundle ids of the alert bundles written.
    pub alerts: Vec<String>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The log key of a box: `log.vkey` beside its order key, when enrollment wrote one.
pub fn log_key_file(config: &Config) -> Option<PathBuf> {
    config
        .mcp_order_pubkey_file
        .as_deref()
        .map(crate::enroll::log_key_path)
}

/// Reads a verifier key file (`<name>+<key ID>+<key>`).
pub fn load_verifier(path: &Path) -> Result<LogVerifier> {
    let text = std::fs::read_to_string(path)
        .map_err(io(format!("cannot read the log key {}", path.display())))?;
    LogVerifier::from_vkey(text.trim())
        .map_err(|e| Error::Usage(format!("the log key {}: {e}", path.display())))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("witness")
    ));
    let mut f =
        std::fs::File::create(&tmp).map_err(io(format!("cannot write {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot replace {}", path.display())))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn load_state(path: &Path) -> Result<State> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            // Never start over silently: a reset view would accept any history.
            Error::Usage(format!(
                "{} is not the log witness's state ({e}); restore it, or remove it to trust the next checkpoint anew",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
    }
}

fn save_state(path: &Path, state: &State) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Usage(format!("cannot encode the witness state: {e}")))?;
    write_atomic(path, &bytes)
}

/// The leaf of a bundle stored on this box, from its own bytes.
pub fn own_leaf(dir: &Path) -> Result<BundleLeaf> {
    let (json, _) = crate::evidence::read_bundle_files(dir)
        .map_err(|reason| Error::Usage(format!("bundle {}: {reason}", dir.display())))?;
    let bundle: crate::evidence::Bundle = serde_json::from_slice(&json)
        .map_err(|e| Error::Usage(format!("bundle {}: not a bundle ({e})", dir.display())))?;
    Ok(BundleLeaf {
        site_id: bundle.site_id,
        host_id: bundle.host_id,
        seq: bundle.seq,
        bundle_id: bundle.bundle_id,
        bundle_sha256: crate::crypto::sha256(&json),
    })
}

/// Whether the server's account of a leaf is the box's own.
fn same_leaf(view: &LogLeafView, own: &BundleLeaf) -> bool {
    view.site_id == own.site_id
        && view.host_id == own.host_id
        && view.seq == own.seq
        && view.bundle_id == own.bundle_id
        && view.bundle_sha256 == hex::encode(own.bundle_sha256)
}

struct Witness<'a> {
    config: &'a Config,
    queue: &'a mut Queue,
    store: &'a EvidenceStore,
    state: State,
    report: WitnessReport,
}

impl Witness<'_> {
    /// Stores a signed alert bundle and queues it, once per kind of problem, subject
    /// and checkpoint held (a server that stays broken is reported once, not at every poll).
    fn alert(&mut self, kind: &str, subject: &str, reason: String, details: Value) -> Result<()> {
        let fingerprint = sha256_hex(
            format!(
                "{kind}\n{subject}\n{}",
                self.state.checkpoint.as_deref().unwrap_or_default()
            )
            .as_bytes(),
        );
        if self.state.alerted.contains(&fingerprint) {
            return Ok(());
        }
        tracing::error!(reason = %reason, "the MSP's transparency log failed the witness check");
        let mut draft = Draft::new(Check::LogWitness, Outcome::Alert);
        draft.error = Some(reason);
        draft.pre_state = json!({ "problem": kind, "details": details });
        draft.post_state = json!({ "kept_checkpoint": self.state.checkpoint });
        let stored = self.store.store(draft)?;
        self.queue.enqueue(
            &[NewUpload {
                bundle_id: stored.bundle_id.clone(),
                seq: stored.seq,
                dir: stored.dir.clone(),
                order_id: None,
            }],
            crate::queue::unix_now(),
        )?;
        self.report.alerts.push(stored.bundle_id);
        self.state.alerted.push(fingerprint);
        let excess = self
            .state
            .alerted
            .len()
            .saturating_sub(MAX_ALERTS_REMEMBERED);
        self.state.alerted.drain(..excess);
        Ok(())
    }

    fn proofs_dir(&self) -> PathBuf {
        self.config.state_dir.join(PROOFS_DIR)
    }
}

/// Whether an error answer says something about the log (an alert) rather than
/// about the way to it (retry later).
fn refusal(e: &crate::mcp::McpError) -> Option<String> {
    match e {
        crate::mcp::McpError::Status {
            status, message, ..
        } if (400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429) => {
            Some(format!("HTTP {status}: {message}"))
        }
        crate::mcp::McpError::Protocol { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

/// One witness step (after an order poll and delivery). Errors are about the way to
/// the server or the box's own files; problems with the log are alerts.
pub fn observe(
    config: &Config,
    client: &McpClient,
    queue: &mut Queue,
    store: &EvidenceStore,
) -> Result<WitnessReport> {
    let Some(key_file) = log_key_file(config).filter(|p| p.exists()) else {
        return Ok(WitnessReport {
            skipped: Some(
                "no log key beside the order key (enroll with a server that keeps a log)".into(),
            ),
            ..WitnessReport::default()
        });
    };
    let verifier = load_verifier(&key_file)?;
    let state_path = config.state_dir.join(STATE_FILE);
    let state = load_state(&state_path)?;
    let mut w = Witness {
        config,
        queue,
        store,
        state,
        report: WitnessReport::default(),
    };
    let result = step(&mut w, client, &verifier);
    // Whatever happened, keep what was learnt (alerts written, proofs stored).
    save_state(&state_path, &w.state)?;
    result?;
    Ok(w.report)
}

fn step(w: &mut Witness<'_>, client: &McpClient, verifier: &LogVerifier) -> Result<()> {
    let answer = match client.log_checkpoint() {
        Ok(LogAnswer::Ready(a)) => a,
        Ok(LogAnswer::Pending(why)) => {
            w.report.skipped = Some(why);
            return Ok(());
        }
        Err(e) => match refusal(&e) {
            Some(reason) if w.state.checkpoint.is_some() => {
                return w.alert(
                    "checkpoint_refused",
                    "",
                    format!("the MSP no longer serves its log's checkpoint: {reason}"),
                    json!({ "held_checkpoint": w.state.checkpoint }),
                );
            }
            _ => return Err(e.into()),
        },
    };
    let new = match verifier.verify(answer.checkpoint.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            return w.alert(
                "bad_checkpoint",
                "",
                format!(
                    "the MSP's checkpoint does not verify with the log key from enrollment: {e}"
                ),
                json!({
                    "checkpoint": answer.checkpoint.chars().take(4096).collect::<String>(),
                    "log_key_expected": verifier.to_vkey(),
                    "log_key_offered": answer.log_key,
                }),
            );
        }
    };
    let held = match &w.state.checkpoint {
        Some(note) => Some(verifier.verify(note.as_bytes()).map_err(|e| {
            Error::Usage(format!(
                "the checkpoint in {} does not verify with the log key: {e}",
                STATE_FILE
            ))
        })?),
        None => None,
    };
    if let Some(old) = &held
        && !extends(w, client, old, &new, &answer.checkpoint)?
    {
        return Ok(());
    }
    w.state.checkpoint = Some(answer.checkpoint.clone());
    w.report.tree_size = Some(new.size);
    prove_delivered(w, client, &new, &answer.checkpoint)
}

/// Checks that `new` extends `old`; false (after an alert) when it does not.
fn extends(
    w: &mut Witness<'_>,
    client: &McpClient,
    old: &Checkpoint,
    new: &Checkpoint,
    new_note: &str,
) -> Result<bool> {
    let old_note = w.state.checkpoint.clone().unwrap_or_default();
    let details = json!({ "held_checkpoint": old_note, "offered_checkpoint": new_note });
    if new.size < old.size {
        w.alert(
            "log_shrank",
            "",
            format!(
                "the MSP's log shrank: it signed size {} before and offers size {} now",
                old.size, new.size
            ),
            details,
        )?;
        return Ok(false);
    }
    if new.size == old.size {
        if new.root != old.root {
            w.alert(
                "log_forked",
                "",
                format!(
                    "the MSP signed two different trees of size {}: its log forked",
                    new.size
                ),
                details,
            )?;
            return Ok(false);
        }
        w.report.consistency_verified = true;
        return Ok(true);
    }
    let proof = match client.log_consistency(old.size, new.size) {
        Ok(LogAnswer::Ready(a)) => a.proof,
        Ok(LogAnswer::Pending(why)) => {
            // The server's newest checkpoint is not provable yet: hold the old view.
            w.report.skipped = Some(why);
            return Ok(false);
        }
        Err(e) => match refusal(&e) {
            Some(reason) => {
                w.alert(
                    "consistency_refused",
                    "",
                    format!(
                        "the MSP refuses a consistency proof from size {} to {}: {reason}",
                        old.size, new.size
                    ),
                    details,
                )?;
                return Ok(false);
            }
            None => return Err(e.into()),
        },
    };
    if let Err(e) = proof.verify(old, new) {
        let mut details = details;
        details["proof"] = serde_json::to_value(&proof).unwrap_or(Value::Null);
        w.alert(
            "inconsistent",
            "",
            format!(
                "the MSP's log does not extend the checkpoint this box verified (size {} to {}): {e}; a bundle it accepted before was dropped or rewritten",
                old.size, new.size
            ),
            details,
        )?;
        return Ok(false);
    }
    let stored = StoredConsistency {
        proof,
        old_checkpoint: old_note,
        new_checkpoint: new_note.to_owned(),
    };
    let path = w
        .proofs_dir()
        .join("consistency")
        .join(format!("{}-{}.json", old.size, new.size));
    write_atomic(&path, &to_json(&stored)?)?;
    w.report.consistency_verified = true;
    Ok(true)
}

fn to_json(v: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Usage(format!("cannot encode a proof: {e}")))
}

/// Inclusion proofs of acknowledged bundles, oldest acknowledgement first.
fn prove_delivered(
    w: &mut Witness<'_>,
    client: &McpClient,
    checkpoint: &Checkpoint,
    note: &str,
) -> Result<()> {
    let (at, seq) = w.state.proven_through;
    let rows = w.queue.delivered_after(at, seq, MAX_PROOFS_PER_POLL)?;
    let dir = w.proofs_dir().join("inclusion");
    for (row, delivered_at) in rows {
        let path = dir.join(format!("{}.json", row.bundle_id));
        if path.exists() {
            w.state.proven_through = (delivered_at, row.seq);
            continue;
        }
        let own = match own_leaf(&row.dir) {
            Ok(l) => l,
            Err(e) => {
                // Pruned on the box before a proof came: nothing of its own to compare.
                tracing::warn!(bundle = %row.bundle_id, error = %e, "no local copy to prove");
                w.state.proven_through = (delivered_at, row.seq);
                continue;
            }
        };
        let answer: LogInclusion = match client.log_inclusion(&row.bundle_id, checkpoint.size) {
            Ok(LogAnswer::Ready(a)) => a,
            Ok(LogAnswer::Pending(_)) => {
                // Not sequenced yet: next poll.
                w.report.inclusion_pending += 1;
                return Ok(());
            }
            // Sequenced after the checkpoint this box holds: next poll, with a newer one.
            Err(crate::mcp::McpError::Status { status: 416, .. }) => {
                w.report.inclusion_pending += 1;
                return Ok(());
            }
            Err(e) => match refusal(&e) {
                Some(reason) => {
                    w.alert(
                        "inclusion_refused",
                        &row.bundle_id,
                        format!(
                            "the MSP acknowledged bundle {} (seq {}) but its log cannot prove it in the tree of size {}: {reason}",
                            row.bundle_id, row.seq, checkpoint.size
                        ),
                        json!({ "bundle_id": row.bundle_id, "seq": row.seq, "checkpoint": note }),
                    )?;
                    w.state.proven_through = (delivered_at, row.seq);
                    continue;
                }
                None => return Err(e.into()),
            },
        };
        let leaf_hash = own.hash().map_err(|e| {
            Error::Usage(format!(
                "bundle {} cannot be a log leaf: {e}",
                row.bundle_id
            ))
        })?;
        let problem = if !same_leaf(&answer.leaf, &own) {
            Some("the log's leaf is not this box's bundle (other bytes or identity)".to_owned())
        } else {
            answer
                .proof
                .verify(&leaf_hash, checkpoint)
                .err()
                .map(|e| format!("the inclusion proof does not verify: {e}"))
        };
        if let Some(problem) = problem {
            w.alert(
                "not_included",
                &row.bundle_id,
                format!(
                    "the MSP's log does not hold bundle {} (seq {}) as this box sent it: {problem}",
                    row.bundle_id, row.seq
                ),
                json!({
                    "bundle_id": row.bundle_id,
                    "own_leaf": { "site_id": own.site_id, "host_id": own.host_id, "seq": own.seq, "bundle_sha256": hex::encode(own.bundle_sha256) },
                    "offered_leaf": answer.leaf,
                    "proof": answer.proof,
                    "checkpoint": note,
                }),
            )?;
        } else {
            let stored = StoredInclusion {
                leaf: answer.leaf,
                proof: answer.proof,
                checkpoint: note.to_owned(),
            };
            write_atomic(&path, &to_json(&stored)?)?;
            w.report.inclusion_verified += 1;
        }
        w.state.proven_through = (delivered_at, row.seq);
    }
    Ok(())
}

/// What `evidence verify --log-proofs` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OfflineReport {
    pub inclusion_verified: u64,
    pub consistency_verified: u64,
    /// Proofs whose bundle is no longer in the local store (checked against the proof's own leaf).
    pub without_local_bundle: u64,
    pub problems: Vec<String>,
}

impl OfflineReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(format!("cannot list {}", dir.display()))(e)),
    };
    for entry in entries {
        let path = entry
            .map_err(io(format!("cannot list {}", dir.display())))?
            .path();
        if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Checks every stored proof offline: each checkpoint's signature with the log key,
/// each inclusion proof against the bundle's own bytes in `evidence_dir` (when still
/// there), and each consistency proof.
pub fn verify_offline(
    proofs_dir: &Path,
    evidence_dir: &Path,
    verifier: &LogVerifier,
) -> Result<OfflineReport> {
    let mut report = OfflineReport::default();
    for path in json_files(&proofs_dir.join("inclusion"))? {
        let name = path.display().to_string();
        let stored: StoredInclusion = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                report
                    .problems
                    .push(format!("{name}: unreadable proof: {e}"));
                continue;
            }
        };
        let checkpoint = match verifier.verify(stored.checkpoint.as_bytes()) {
            Ok(c) => c,
            Err(e) => {
                report.problems.push(format!("{name}: checkpoint: {e}"));
                continue;
            }
        };
        let view = &stored.leaf;
        let from_proof = crate::tlog::BundleLeaf {
            site_id: view.site_id.clone(),
            host_id: view.host_id.clone(),
            seq: view.seq,
            bundle_id: view.bundle_id.clone(),
            bundle_sha256: {
                let mut h = [0u8; 32];
                if hex::decode_to_slice(&view.bundle_sha256, &mut h).is_err() {
                    report
                        .problems
                        .push(format!("{name}: the leaf's bundle_sha256 is not hex"));
                    continue;
                }
                h
            },
        };
        let leaf = match crate::evidence::find(evidence_dir, &view.bundle_id) {
            Ok((_, dir)) => match own_leaf(&dir) {
                Ok(own) if own == from_proof => own,
                Ok(_) => {
                    report.problems.push(format!(
                        "{name}: bundle {} in the store is not the bundle the proof is for",
                        view.bundle_id
                    ));
                    continue;
                }
                Err(e) => {
                    report.problems.push(format!("{name}: {e}"));
                    continue;
                }
            },
            Err(_) => {
                report.without_local_bundle += 1;
                from_proof
            }
        };
        let hash = match leaf.hash() {
            Ok(h) => h,
            Err(e) => {
                report.problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        match stored.proof.verify(&hash, &checkpoint) {
            Ok(()) => report.inclusion_verified += 1,
            Err(e) => report
                .problems
                .push(format!("{name}: bundle {}: {e}", view.bundle_id)),
        }
    }
    for path in json_files(&proofs_dir.join("consistency"))? {
        let name = path.display().to_string();
        let stored: StoredConsistency = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                report
                    .problems
                    .push(format!("{name}: unreadable proof: {e}"));
                continue;
            }
        };
        let verified = verifier
            .verify(stored.old_checkpoint.as_bytes())
            .map_err(|e| format!("old checkpoint: {e}"))
            .and_then(|old| {
                verifier
                    .verify(stored.new_checkpoint.as_bytes())
                    .map_err(|e| format!("new checkpoint: {e}"))
                    .map(|new| (old, new))
            })
            .and_then(|(old, new)| stored.proof.verify(&old, &new).map_err(|e| e.to_string()));
        match verified {
            Ok(()) => report.consistency_verified += 1,
            Err(e) => report.problems.push(format!("{name}: {e}")),
        }
    }
    Ok(report)
}
