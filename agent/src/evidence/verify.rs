//! Verification of a whole evidence store: every signature, the hash chain, gaps, forks, moved or swapped files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::layout::{BUNDLE_FILE, BundleDir, HEAD_FILE, HeadRecord, SIGNATURE_FILE, all_bundles};
use super::store::Checkpoint;
use super::{Check, Result};
use crate::crypto::{SIGNATURE_LEN, VerifyingKey};

/// The fields of bundle.json that the chain needs; the rest is skipped unparsed.
#[derive(Debug, Deserialize)]
pub(super) struct ChainView {
    pub bundle_id: String,
    pub seq: u64,
    pub prev_hash: Option<String>,
    pub timestamp_end: jiff::Timestamp,
    pub check: Check,
    pub signing_key_fingerprint: String,
    pub post_state: Box<RawValue>,
}

/// One thing wrong with the store, naming the bundle it concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub bundle_id: Option<String>,
    pub seq: Option<u64>,
    pub path: Option<PathBuf>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.bundle_id, self.seq) {
            (Some(id), Some(seq)) => write!(f, "bundle {id} (seq {seq}): {}", self.message),
            (Some(id), None) => write!(f, "bundle {id}: {}", self.message),
            (None, Some(seq)) => write!(f, "seq {seq}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub key_fingerprint: String,
    pub bundles: u64,
    pub signatures_valid: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The newest seq pruned away, as the newest checkpoint states.
    pub pruned_through_seq: Option<u64>,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What verification keeps of one bundle: about 100 bytes with no heap
/// allocation of its own (small allocations interleaved with the file buffers
/// fragment the heap), so that a large store verifies in little memory.
struct Link {
    bundle_id: uuid::Uuid,
    seq: u64,
    hash: [u8; 32],
    /// `Some([0; 32])` stands for a prev_hash that is not a SHA-256 at all (reported when read).
    prev_hash: Option<[u8; 32]>,
    checkpoint: Option<Box<Checkpoint>>,
}

fn parse_hash(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

struct Loaded {
    dir: BundleDir,
    json: Vec<u8>,
    sig: Vec<u8>,
    view: ChainView,
}

/// How many signatures are checked in one batch.
const BATCH: usize = 64;

/// Verifies every bundle under `root` against `key`.
pub fn verify(root: &Path, key: &VerifyingKey) -> Result<VerifyReport> {
    let dirs = all_bundles(root)?;
    let fingerprint = key.fingerprint();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let chunk = dirs.len().div_ceil(workers).max(1);

    let results: Vec<(Vec<Link>, Vec<Problem>, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .chunks(chunk)
            .map(|part| scope.spawn(|| verify_part(part, key, &fingerprint)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        Vec::new(),
                        vec![Problem {
                            bundle_id: None,
                            seq: None,
                            path: None,
                            message: "a verification worker failed".into(),
                        }],
                        0,
                    )
                })
            })
            .collect()
    });

    let mut problems = Vec::new();
    let mut links = Vec::with_capacity(dirs.len());
    let mut signatures_valid = 0;
    for (l, p, v) in results {
        links.extend(l);
        problems.extend(p);
        signatures_valid += v;
    }
    let bundles = dirs.len() as u64;
    drop(dirs);
    let (first_seq, last_seq, pruned_through_seq) = check_chain(root, &mut links, &mut problems);
    Ok(VerifyReport {
        key_fingerprint: fingerprint,
        bundles,
        signatures_valid,
        first_seq,
        last_seq,
        pruned_through_seq,
        problems,
    })
}

fn problem(dir: &BundleDir, seq: Option<u64>, message: String) -> Problem {
    Problem {
        bundle_id: Some(dir.name.clone()),
        seq,
        path: Some(dir.path.clone()),
        message,
    }
}

/// Reads, parses and checks the signatures of a slice of bundle directories.
fn verify_part(
    part: &[BundleDir],
    key: &VerifyingKey,
    fingerprint: &str,
) -> (Vec<Link>, Vec<Problem>, u64) {
    let mut links = Vec::with_capacity(part.len());
    let mut problems = Vec::new();
    let mut valid = 0u64;
    let mut batch: Vec<Loaded> = Vec::with_capacity(BATCH);
    for dir in part {
        if let Some(loaded) = load(dir, &mut problems) {
            batch.push(loaded);
        }
        if batch.len() == BATCH {
            valid += check_batch(&mut batch, key, fingerprint, &mut links, &mut problems);
        }
    }
    valid += check_batch(&mut batch, key, fingerprint, &mut links, &mut problems);
    (links, problems, valid)
}

fn load(dir: &BundleDir, problems: &mut Vec<Problem>) -> Option<Loaded> {
    if !dir.path.is_dir() {
        problems.push(problem(
            dir,
            None,
            "is a stray file in the date tree, not a bundle directory".into(),
        ));
        return None;
    }
    let json = match fs::read(dir.path.join(BUNDLE_FILE)) {
        Ok(j) => j,
        Err(e) => {
            problems.push(problem(
                dir,
                None,
                format!("{BUNDLE_FILE} cannot be read ({e})"),
            ));
            return None;
        }
    };
    let sig = match fs::read(dir.path.join(SIGNATURE_FILE)) {
        Ok(s) => s,
        Err(e) => {
            problems.push(problem(
                dir,
                None,
                format!("{SIGNATURE_FILE} cannot be read ({e}); the bundle is unsigned"),
            ));
            Vec::new()
        }
    };
    let view: ChainView = match serde_json::from_slice(&json) {
        Ok(v) => v,
        Err(e) => {
            problems.push(problem(
                dir,
                None,
                format!("{BUNDLE_FILE} is not a valid bundle ({e})"),
            ));
            return None;
        }
    };
    Some(Loaded {
        dir: dir.clone(),
        json,
        sig,
        view,
    })
}

/// Checks a batch's signatures (batched when all are well formed) and turns
/// each bundle into a chain link.
fn check_batch(
    batch: &mut Vec<Loaded>,
    key: &VerifyingKey,
    fingerprint: &str,
    links: &mut Vec<Link>,
    problems: &mut Vec<Problem>,
) -> u64 {
    let mut valid = 0;
    let well_formed: Option<Vec<(&[u8], [u8; SIGNATURE_LEN])>> = batch
        .iter()
        .map(|l| {
            l.sig
                .as_slice()
                .try_into()
                .ok()
                .map(|s| (l.json.as_slice(), s))
        })
        .collect();
    let all_good = well_formed.is_some_and(|items| key.verify_batch(&items).is_ok());
    for l in batch.drain(..) {
        let seq = Some(l.view.seq);
        let sig_ok = all_good || key.verify(&l.json, &l.sig).is_ok();
        if sig_ok {
            valid += 1;
        } else if !l.sig.is_empty() {
            let message = if l.sig.len() != SIGNATURE_LEN {
                format!(
                    "{SIGNATURE_FILE} is {} bytes, not a {SIGNATURE_LEN}-byte Ed25519 signature",
                    l.sig.len()
                )
            } else if l.view.signing_key_fingerprint != fingerprint {
                format!(
                    "signed by another key: it names {} but this store's key is {fingerprint}",
                    l.view.signing_key_fingerprint
                )
            } else {
                format!(
                    "signature does not match the contents: {BUNDLE_FILE} or {SIGNATURE_FILE} was changed after signing"
                )
            };
            problems.push(problem(&l.dir, seq, message));
        }
        if sig_ok && l.view.signing_key_fingerprint != fingerprint {
            problems.push(problem(
                &l.dir,
                seq,
                format!(
                    "names signing key {} but verifies with {fingerprint}",
                    l.view.signing_key_fingerprint
                ),
            ));
        }
        if l.view.bundle_id != l.dir.name {
            problems.push(problem(
                &l.dir,
                seq,
                format!(
                    "the directory holds bundle {} (files moved or swapped between bundles)",
                    l.view.bundle_id
                ),
            ));
        }
        let written = l
            .view
            .timestamp_end
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date();
        if written > l.dir.date {
            problems.push(problem(
                &l.dir,
                seq,
                format!(
                    "written at {} but filed under {} (moved between days)",
                    l.view.timestamp_end, l.dir.date
                ),
            ));
        }
        let checkpoint = if l.view.check == Check::EvidenceRetention {
            match serde_json::from_str::<Checkpoint>(l.view.post_state.get()) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(problem(
                        &l.dir,
                        seq,
                        format!(
                            "is a retention checkpoint without a valid checkpoint record ({e})"
                        ),
                    ));
                    None
                }
            }
        } else {
            None
        };
        let Ok(bundle_id) = uuid::Uuid::parse_str(&l.view.bundle_id) else {
            problems.push(problem(
                &l.dir,
                seq,
                format!("bundle_id {:?} is not a UUID", l.view.bundle_id),
            ));
            continue;
        };
        let prev_hash = l.view.prev_hash.as_deref().map(|text| {
            parse_hash(text).unwrap_or_else(|| {
                problems.push(problem(
                    &l.dir,
                    seq,
                    format!("prev_hash {text:?} is not a hex SHA-256"),
                ));
                [0; 32]
            })
        });
        links.push(Link {
            bundle_id,
            seq: l.view.seq,
            hash: crate::crypto::sha256(&l.json),
            prev_hash,
            checkpoint: checkpoint.map(Box::new),
        });
    }
    valid
}

fn chain_problem(link: &Link, message: String) -> Problem {
    Problem {
        bundle_id: Some(link.bundle_id.to_string()),
        seq: Some(link.seq),
        path: None,
        message,
    }
}

/// Checks order, gaps, forks, prev_hash links, pruning checkpoints and the tail.
fn check_chain(
    root: &Path,
    links: &mut [Link],
    problems: &mut Vec<Problem>,
) -> (Option<u64>, Option<u64>, Option<u64>) {
    links.sort_by(|a, b| {
        a.seq
            .cmp(&b.seq)
            .then_with(|| a.bundle_id.cmp(&b.bundle_id))
    });
    let first = links.first().map(|l| l.seq);
    let last = links.last().map(|l| l.seq);

    // The checkpoint that prunes furthest explains the start of the chain.
    let checkpoint = links
        .iter()
        .filter_map(|l| l.checkpoint.as_ref().map(|c| (l, c)))
        .max_by_key(|(_, c)| c.pruned_through_seq);
    let pruned_through = checkpoint.map(|(_, c)| c.pruned_through_seq);
    let by_seq: BTreeMap<u64, usize> = links.iter().enumerate().map(|(i, l)| (l.seq, i)).collect();

    if let Some(first_link) = links.first() {
        if first_link.seq == 0 {
            problems.push(chain_problem(
                first_link,
                "seq 0 is not a valid sequence number".into(),
            ));
        }
        if first_link.seq == 1 && first_link.prev_hash.is_some() {
            problems.push(chain_problem(
                first_link,
                "is the first bundle but names a previous hash".into(),
            ));
        }
        if first_link.seq > 1 {
            match checkpoint {
                Some((_, c)) if c.pruned_through_seq + 1 >= first_link.seq => {
                    // The pruned boundary must match what survives.
                    let recorded = parse_hash(&c.pruned_through_hash);
                    if let Some(&i) = by_seq.get(&c.pruned_through_seq) {
                        if Some(links[i].hash) != recorded {
                            problems.push(chain_problem(
                                &links[i],
                                format!("a retention checkpoint names hash {} for this seq but the bundle hashes to {}", c.pruned_through_hash, hex::encode(links[i].hash)),
                            ));
                        }
                    } else if let Some(&i) = by_seq.get(&(c.pruned_through_seq + 1))
                        && (links[i].prev_hash != recorded || recorded.is_none()) {
                            problems.push(chain_problem(
                                &links[i],
                                "prev_hash does not match the hash the retention checkpoint records for the pruned bundle before it".into(),
                            ));
                        }
                }
                _ => problems.push(Problem {
                    bundle_id: None,
                    seq: Some(1),
                    path: None,
                    message: format!(
                        "bundles seq 1..{} are missing and no retention checkpoint accounts for them (the chain starts at {})",
                        first_link.seq - 1,
                        first_link.bundle_id
                    ),
                }),
            }
        }
    }

    for pair in links.windows(2) {
        let (prev, cur) = (&pair[0], &pair[1]);
        if cur.seq == prev.seq {
            problems.push(chain_problem(
                cur,
                format!(
                    "has the same seq as bundle {} (a forked chain)",
                    prev.bundle_id
                ),
            ));
        } else if cur.seq > prev.seq + 1 {
            let missing = if cur.seq == prev.seq + 2 {
                format!("seq {} is missing", prev.seq + 1)
            } else {
                format!("seq {}..{} are missing", prev.seq + 1, cur.seq - 1)
            };
            problems.push(chain_problem(
                cur,
                format!(
                    "{missing} between bundle {} and this one (deleted?)",
                    prev.bundle_id
                ),
            ));
        } else if cur.prev_hash != Some(prev.hash) {
            problems.push(chain_problem(
                cur,
                format!("prev_hash does not match bundle {} (seq {}): the chain is broken (edited, replaced or reordered)", prev.bundle_id, prev.seq),
            ));
        }
    }

    // Bundles deleted from the newest end leave no gap; the head record still names them.
    if let Ok(bytes) = fs::read(root.join(HEAD_FILE))
        && let Ok(head) = serde_json::from_slice::<HeadRecord>(&bytes)
        && head.seq > last.unwrap_or(0)
    {
        problems.push(Problem {
                    bundle_id: head.bundle_id.clone(),
                    seq: Some(head.seq),
                    path: None,
                    message: format!(
                        "the chain head record names seq {} but the newest bundle found is seq {} (newest bundles deleted?)",
                        head.seq,
                        last.unwrap_or(0)
                    ),
                });
    }
    (first, last, pruned_through)
}
