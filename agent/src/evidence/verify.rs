//! Verification of a whole evidence store: every signature, the hash chain, gaps, forks, moved or swapped files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::fsafe;
use super::layout::{
    BUNDLE_FILE, BundleDir, HEAD_FILE, HeadRecord, HeadState, LOCK_FILE, SIGNATURE_FILE, read_head,
    walk,
};
use super::store::Checkpoint;
use super::{Check, MAX_BUNDLE_BYTES, MAX_SIGNATURE_READ, Result, io_err};
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
    #[serde(default)]
    pub error: Option<String>,
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
    /// The signature's bytes, or why they could not be read.
    sig: std::result::Result<Vec<u8>, String>,
    view: ChainView,
}

/// How many signatures are checked in one batch.
const BATCH: usize = 64;

/// The evidence store that `dir` lies inside (not `dir` itself), if any:
/// verifying a part of a store would miss what the rest says.
pub fn store_containing(dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.ancestors()
        .skip(1)
        .take(4)
        .find(|a| {
            [HEAD_FILE, LOCK_FILE, super::layout::TMP_DIR]
                .iter()
                .any(|marker| fsafe::kind_of(&a.join(marker)).ok().flatten().is_some())
        })
        .map(Path::to_path_buf)
}

/// Verifies every bundle under `root` against `key`.
///
/// The report is ok only when every bundle has a valid signature by `key`;
/// each bundle without one is named with the reason. While it runs it holds
/// the writer's lock shared, so a live store is seen between writes, never
/// in the middle of one.
pub fn verify(root: &Path, key: &VerifyingKey) -> Result<VerifyReport> {
    let root_fd = fsafe::open_root(root).map_err(io_err(root))?;
    let lock_path = root.join(LOCK_FILE);
    let mut problems = Vec::new();
    let lock = match fsafe::open_lock_shared_at(&root_fd, LOCK_FILE) {
        Ok(lock) => lock,
        Err(e) => {
            problems.push(Problem {
                bundle_id: None,
                seq: None,
                path: Some(lock_path.clone()),
                message: format!(
                    "the writer's lock {LOCK_FILE} is not usable ({e}); a writer may be running"
                ),
            });
            None
        }
    };
    if let Some(lock) = &lock {
        lock.lock_shared().map_err(io_err(&lock_path))?;
    }
    let (dirs, strays) = walk(root)?;
    for stray in strays {
        problems.push(Problem {
            bundle_id: None,
            seq: None,
            message: format!("{} {}", stray.path.display(), stray.what),
            path: Some(stray.path),
        });
    }
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

    let mut links = Vec::with_capacity(dirs.len());
    let mut signatures_valid = 0;
    for (l, p, v) in results {
        links.extend(l);
        problems.extend(p);
        signatures_valid += v;
    }
    let bundles = dirs.len() as u64;
    drop(dirs);
    if bundles == 0 {
        problems.push(Problem {
            bundle_id: None,
            seq: None,
            path: Some(root.to_owned()),
            message: format!(
                "{} holds no evidence bundles at all (an empty store, or not an evidence directory)",
                root.display()
            ),
        });
    }
    let head = read_head(&root_fd, key);
    let (first_seq, last_seq, pruned_through_seq) =
        check_chain(root, &head, &mut links, &mut problems);
    // The invariant, whatever the checks above found: every bundle without a
    // valid signature is a problem.
    if signatures_valid < bundles && problems.is_empty() {
        problems.push(Problem {
            bundle_id: None,
            seq: None,
            path: None,
            message: format!(
                "only {signatures_valid} of {bundles} bundles have a valid signature by {fingerprint}"
            ),
        });
    }
    drop(lock);
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
    if let Some(what) = dir.not_a_dir {
        problems.push(problem(
            dir,
            None,
            format!("is {what} in the date tree, not a bundle directory (never followed)"),
        ));
        return None;
    }
    let json = match fsafe::read_capped(&dir.path.join(BUNDLE_FILE), MAX_BUNDLE_BYTES) {
        Ok(j) => j,
        Err(e) => {
            problems.push(problem(
                dir,
                None,
                format!("{BUNDLE_FILE} cannot be read: {e}"),
            ));
            return None;
        }
    };
    let sig = match fsafe::read_capped(&dir.path.join(SIGNATURE_FILE), MAX_SIGNATURE_READ) {
        Ok(s) => Ok(s),
        Err(e) => Err(format!(
            "{SIGNATURE_FILE} cannot be read: {e}; the bundle is unsigned"
        )),
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
                .as_ref()
                .ok()
                .and_then(|s| s.as_slice().try_into().ok())
                .map(|s| (l.json.as_slice(), s))
        })
        .collect();
    let all_good = well_formed.is_some_and(|items| key.verify_batch(&items).is_ok());
    for l in batch.drain(..) {
        let seq = Some(l.view.seq);
        let sig_ok = match &l.sig {
            Ok(sig) => all_good || key.verify(&l.json, sig).is_ok(),
            Err(_) => false,
        };
        if sig_ok {
            valid += 1;
        } else {
            let message = match &l.sig {
                Err(reason) => reason.clone(),
                Ok(sig) if sig.len() != SIGNATURE_LEN => format!(
                    "{SIGNATURE_FILE} is {} bytes, not a {SIGNATURE_LEN}-byte Ed25519 signature; the bundle is unsigned",
                    sig.len()
                ),
                Ok(_) if l.view.signing_key_fingerprint != fingerprint => format!(
                    "signed by another key: it names {} but this store's key is {fingerprint}",
                    l.view.signing_key_fingerprint
                ),
                Ok(_) => format!(
                    "signature does not match the contents: {BUNDLE_FILE} or {SIGNATURE_FILE} was changed after signing"
                ),
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
        if l.view.check == Check::EvidenceIntegrity {
            // The writer found evidence missing or altered and said so; that stays a finding.
            problems.push(problem(
                &l.dir,
                seq,
                format!(
                    "is the writer's signed integrity alert: {}",
                    l.view.error.as_deref().unwrap_or("evidence missing")
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
    head: &HeadState,
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
    // A checkpoint's numbers must agree with each other and with where it stands.
    for l in links.iter() {
        let Some(c) = &l.checkpoint else { continue };
        let span = c
            .pruned_through_seq
            .checked_sub(c.pruned_from_seq)
            .map(|d| d + 1);
        if c.pruned_from_seq == 0 || span != Some(c.pruned_count) {
            problems.push(chain_problem(
                l,
                format!(
                    "is a retention checkpoint whose pruned_count {} does not match the range it claims (seq {}..{})",
                    c.pruned_count, c.pruned_from_seq, c.pruned_through_seq
                ),
            ));
        }
        if c.pruned_through_seq >= l.seq {
            problems.push(chain_problem(
                l,
                format!(
                    "is a retention checkpoint at seq {} claiming to have pruned through seq {} (not before itself)",
                    l.seq, c.pruned_through_seq
                ),
            ));
        }
    }
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

    check_head(root, head, links, &by_seq, last, problems);
    (first, last, pruned_through)
}

/// Bundles deleted from the newest end leave no gap in the chain: the signed
/// head record, which names the newest bundle, is what catches them. So a
/// missing, unreadable or inconsistent head record is a problem too.
fn check_head(
    root: &Path,
    head: &HeadState,
    links: &[Link],
    by_seq: &BTreeMap<u64, usize>,
    last: Option<u64>,
    problems: &mut Vec<Problem>,
) {
    let head_problem = |seq: Option<u64>, bundle_id: Option<String>, message: String| Problem {
        bundle_id,
        seq,
        path: Some(root.join(HEAD_FILE)),
        message,
    };
    let mut record: HeadRecord = match head {
        HeadState::Valid(r) => r.clone(),
        HeadState::Missing => {
            if !links.is_empty() {
                problems.push(head_problem(
                    None,
                    None,
                    format!("the chain head record {HEAD_FILE} is missing, so bundles deleted from the newest end cannot be ruled out"),
                ));
            }
            return;
        }
        HeadState::Unreadable(reason) => {
            problems.push(head_problem(None, None, reason.clone()));
            return;
        }
    };
    // A write in progress (or cut short): its bundles count once their directories exist.
    let hash_of = |seq: u64| by_seq.get(&seq).map(|&i| hex::encode(links[i].hash));
    for p in std::mem::take(&mut record.pending) {
        if hash_of(p.seq).as_deref() == Some(p.hash.as_str()) {
            record.commit(&p);
        }
    }
    let newest = last.unwrap_or(0);
    if record.seq > newest {
        problems.push(head_problem(
            Some(record.seq),
            record.bundle_id.clone(),
            format!(
                "the chain head record names seq {} but the newest bundle found is seq {newest} (newest bundles deleted?)",
                record.seq
            ),
        ));
    } else if record.seq < newest {
        problems.push(head_problem(
            Some(record.seq),
            record.bundle_id.clone(),
            format!(
                "the chain head record names seq {} but bundles up to seq {newest} exist (bundles added outside the writer, or an old head record put back)",
                record.seq
            ),
        ));
    } else if record.seq > 0 && hash_of(record.seq) != record.hash {
        problems.push(head_problem(
            Some(record.seq),
            record.bundle_id.clone(),
            format!(
                "the chain head record names hash {} for seq {} but that bundle hashes to {} (replaced?)",
                record.hash.as_deref().unwrap_or("none"),
                record.seq,
                hash_of(record.seq).unwrap_or_default()
            ),
        ));
    }
}
