//! The evidence writer: seals drafts into signed, chained bundles and stores them atomically and durably.
//!
//! A write holds `<store>/.lock` (one writer at a time across processes, so the
//! chain cannot fork) and goes:
//! 1. the head record notes the bundles about to be written (`pending`);
//! 2. each bundle's bundle.json and bundle.sig are written into `.tmp/<id>/`;
//! 3. syncfs(2) makes all of that durable in one journal commit;
//! 4. each `.tmp/<id>/` is renamed into `YYYY/MM/DD/<id>/` (a bundle appears whole or not at all);
//! 5. the day directories are fsynced; only now is a bundle reported as stored;
//! 6. the head record is rewritten without `pending`.
//!
//! After a crash at any instant, the next writer cleans `.tmp/`, and a pending
//! bundle counts as committed exactly when its directory exists.

use std::fs;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::layout::{
    BUNDLE_FILE, HEAD_FILE, HeadRecord, LOCK_FILE, PendingBundle, SIGNATURE_FILE, TMP_DIR,
    all_bundles, day_path, fsync_dir, replace_file,
};
use super::verify::ChainView;
use super::{
    BUNDLE_VERSION, Bundle, Check, Draft, EvidenceError, Outcome, Result, io_err, valid_control,
};
use crate::config::DeploymentMode;
use crate::crypto::{SigningKey, sha256_hex};
use crate::nixos::RunningSystem;

/// Who is writing: the fields every bundle of this host carries.
#[derive(Clone, Debug)]
pub struct HostIdentity {
    pub site_id: String,
    pub host_id: String,
    pub deployment_mode: DeploymentMode,
    pub reseller_id: Option<String>,
    pub policy_version: String,
}

/// A bundle that is durably on disk.
#[derive(Clone, Debug, Serialize)]
pub struct StoredBundle {
    pub bundle_id: String,
    pub seq: u64,
    /// SHA-256 of bundle.json.
    pub hash: String,
    pub dir: PathBuf,
}

/// The post_state of a prune checkpoint bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The newest seq that was pruned; the chain continues at this seq + 1.
    pub pruned_through_seq: u64,
    /// SHA-256 of that bundle's bundle.json (the next bundle's prev_hash).
    pub pruned_through_hash: String,
    pub pruned_count: u64,
    pub keep: u64,
    pub retention_days: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub pruned: u64,
    pub kept: u64,
    /// The checkpoint bundle written, when anything was pruned.
    pub checkpoint: Option<StoredBundle>,
}

pub struct EvidenceStore {
    root: PathBuf,
    key: SigningKey,
    fingerprint: String,
    host: HostIdentity,
    system: RunningSystem,
}

/// A sealed bundle ready to be written.
struct Sealed {
    pending: PendingBundle,
    json: Vec<u8>,
    sig: [u8; 64],
}

impl EvidenceStore {
    /// Opens (creating it if needed) the store at `root`.
    pub fn open(
        root: &Path,
        key: SigningKey,
        host: HostIdentity,
        system: RunningSystem,
    ) -> Result<Self> {
        fs::create_dir_all(root.join(TMP_DIR)).map_err(io_err(root))?;
        let fingerprint = key.verifying_key().fingerprint();
        Ok(Self {
            root: root.to_owned(),
            key,
            fingerprint,
            host,
            system,
        })
    }

    /// Seals and durably stores one bundle.
    pub fn store(&self, draft: Draft) -> Result<StoredBundle> {
        let mut stored = self.store_many(vec![draft])?;
        stored
            .pop()
            .ok_or_else(|| EvidenceError::Invalid("store_many returned nothing".into()))
    }

    /// Seals and stores several bundles with one durability barrier (a scan's
    /// seven checks, say). Either call returns only once all are durable.
    pub fn store_many(&self, drafts: Vec<Draft>) -> Result<Vec<StoredBundle>> {
        if drafts.is_empty() {
            return Ok(Vec::new());
        }
        self.locked(|head| self.write_locked(head, drafts))
    }

    /// The committed head: (seq, hash of its bundle.json).
    pub fn head(&self) -> Result<(u64, Option<String>)> {
        self.locked(|head| Ok((head.seq, head.hash.clone())))
    }

    fn locked<T>(&self, f: impl FnOnce(&mut HeadRecord) -> Result<T>) -> Result<T> {
        let lock_path = self.root.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        self.clean_tmp()?;
        let mut head = self.recover_head()?;
        let result = f(&mut head);
        drop(lock);
        result
    }

    /// Removes bundles a crashed writer left half-assembled.
    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.root.join(TMP_DIR);
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Reads the head record, resolving a write that was in progress; rebuilds
    /// it from the bundles themselves when it is missing or does not match the disk.
    fn recover_head(&self) -> Result<HeadRecord> {
        let path = self.root.join(HEAD_FILE);
        let record = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<HeadRecord>(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let consistent = record
            .as_ref()
            .is_some_and(|r| match (&r.bundle_id, r.date) {
                (Some(id), Some(date)) => self
                    .root
                    .join(day_path(date))
                    .join(id)
                    .join(BUNDLE_FILE)
                    .exists(),
                (None, None) => r.seq == 0,
                _ => false,
            });
        let mut head = match record {
            Some(r) if consistent => r,
            _ => {
                let rebuilt = self.rebuild_head()?;
                if rebuilt.seq > 0 {
                    tracing::warn!(
                        seq = rebuilt.seq,
                        "evidence chain head record was missing or stale; rebuilt from the bundles on disk"
                    );
                }
                rebuilt
            }
        };
        for pending in std::mem::take(&mut head.pending) {
            if self
                .root
                .join(pending.rel_path())
                .join(BUNDLE_FILE)
                .exists()
            {
                head.seq = pending.seq;
                head.hash = Some(pending.hash);
                head.bundle_id = Some(pending.bundle_id);
                head.date = Some(pending.date);
            }
        }
        Ok(head)
    }

    fn rebuild_head(&self) -> Result<HeadRecord> {
        let mut head = HeadRecord::default();
        for dir in all_bundles(&self.root)? {
            let Ok(bytes) = fs::read(dir.path.join(BUNDLE_FILE)) else {
                continue;
            };
            let Ok(view) = serde_json::from_slice::<ChainView>(&bytes) else {
                continue;
            };
            if view.seq > head.seq {
                head.seq = view.seq;
                head.hash = Some(sha256_hex(&bytes));
                head.bundle_id = Some(dir.name.clone());
            }
            // New bundles must never land on an earlier day than any existing one.
            head.date = Some(head.date.map_or(dir.date, |d| d.max(dir.date)));
        }
        if head.seq == 0 {
            head = HeadRecord::default();
        }
        Ok(head)
    }

    fn seal(&self, head: &mut HeadRecord, draft: Draft) -> Result<Sealed> {
        let now = Timestamp::now();
        let timestamp_end = draft.timestamp_end.unwrap_or(now);
        if timestamp_end < draft.timestamp_start {
            return Err(EvidenceError::Invalid(format!(
                "timestamp_end {timestamp_end} is before timestamp_start {}",
                draft.timestamp_start
            )));
        }
        let hipaa_controls = match draft.hipaa_controls {
            Some(controls) => controls,
            None => draft
                .check
                .hipaa_controls()
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        };
        if let Some(bad) = hipaa_controls.iter().find(|c| !valid_control(c)) {
            return Err(EvidenceError::Invalid(format!(
                "{bad:?} is not a HIPAA Security Rule citation (for example 164.312(b))"
            )));
        }
        let bundle_id = uuid::Uuid::new_v4().to_string();
        let written_day = timestamp_end.to_zoned(TimeZone::UTC).date();
        // A clock that stepped back must not file a newer bundle under an older day.
        let date: Date = head.date.map_or(written_day, |d| d.max(written_day));
        let bundle = Bundle {
            version: BUNDLE_VERSION.into(),
            bundle_id: bundle_id.clone(),
            seq: head.seq + 1,
            prev_hash: head.hash.clone(),
            site_id: self.host.site_id.clone(),
            host_id: self.host.host_id.clone(),
            deployment_mode: self.host.deployment_mode,
            reseller_id: self.host.reseller_id.clone(),
            timestamp_start: draft.timestamp_start,
            timestamp_end,
            policy_version: self.host.policy_version.clone(),
            ruleset_hash: draft.ruleset_hash,
            nixos_revision: self.system.nixos_revision.clone(),
            derivation_digest: draft.derivation_digest,
            ntp_offset_ms: draft.ntp_offset_ms,
            check: draft.check,
            hipaa_controls,
            pre_state: draft.pre_state,
            post_state: draft.post_state,
            action_taken: draft.action_taken,
            rollback_available: draft.rollback_available,
            rollback_generation: draft.rollback_generation,
            outcome: draft.outcome,
            error: draft.error,
            order_id: draft.order_id,
            runbook_id: draft.runbook_id,
            system: self.system.identity.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            signing_key_fingerprint: self.fingerprint.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&bundle)?;
        json.push(b'\n');
        let hash = sha256_hex(&json);
        let sig = self.key.sign(&json);
        head.seq = bundle.seq;
        head.hash = Some(hash.clone());
        head.bundle_id = Some(bundle_id.clone());
        head.date = Some(date);
        Ok(Sealed {
            pending: PendingBundle {
                seq: bundle.seq,
                hash,
                bundle_id,
                date,
            },
            json,
            sig,
        })
    }

    fn write_locked(&self, head: &mut HeadRecord, drafts: Vec<Draft>) -> Result<Vec<StoredBundle>> {
        let committed = head.clone();
        let mut next = head.clone();
        let sealed = drafts
            .into_iter()
            .map(|d| self.seal(&mut next, d))
            .collect::<Result<Vec<_>>>()?;

        // 1. Announce the write.
        let mut announce = committed;
        announce.pending = sealed.iter().map(|s| s.pending.clone()).collect();
        replace_file(
            &self.root.join(HEAD_FILE),
            &serde_json::to_vec(&announce)?,
            false,
        )?;

        // 2. Assemble every bundle in .tmp/.
        let tmp_root = self.root.join(TMP_DIR);
        for s in &sealed {
            let tmp = tmp_root.join(&s.pending.bundle_id);
            fs::create_dir(&tmp).map_err(io_err(&tmp))?;
            write_new(&tmp.join(BUNDLE_FILE), &s.json)?;
            write_new(&tmp.join(SIGNATURE_FILE), &s.sig)?;
        }

        // 3. One barrier for the head record and all bundle files.
        let root_dir = fs::File::open(&self.root).map_err(io_err(&self.root))?;
        rustix::fs::syncfs(&root_dir).map_err(|e| io_err(&self.root)(e.into()))?;

        // 4. Publish each bundle whole.
        let mut to_sync: Vec<PathBuf> = Vec::new();
        let mut stored = Vec::with_capacity(sealed.len());
        for s in &sealed {
            let day = self.root.join(day_path(s.pending.date));
            if !day.is_dir() {
                create_dirs_noting_parents(&self.root, &day, &mut to_sync)?;
            }
            let dest = day.join(&s.pending.bundle_id);
            fs::rename(tmp_root.join(&s.pending.bundle_id), &dest).map_err(io_err(&dest))?;
            if !to_sync.contains(&day) {
                to_sync.push(day);
            }
            stored.push(StoredBundle {
                bundle_id: s.pending.bundle_id.clone(),
                seq: s.pending.seq,
                hash: s.pending.hash.clone(),
                dir: dest,
            });
        }

        // 5. Make the renames durable.
        for dir in &to_sync {
            fsync_dir(dir)?;
        }

        // 6. The new head; if this write is lost, `pending` above still resolves it.
        next.pending.clear();
        replace_file(
            &self.root.join(HEAD_FILE),
            &serde_json::to_vec(&next)?,
            false,
        )?;
        *head = next;
        Ok(stored)
    }

    /// Removes the oldest bundles that are older than `retention_days` and not
    /// among the `keep` newest, after writing a signed checkpoint that names
    /// the last removed seq and hash so that the chain still verifies.
    pub fn prune(&self, keep: u64, retention_days: u32, now: Timestamp) -> Result<PruneReport> {
        self.prune_where(keep, retention_days, now, |_, _| true)
    }

    /// [`prune`](Self::prune), removing a bundle only while `may_remove(bundle_id,
    /// seq)` holds (with an MCP configured: only what the MCP acknowledged). The
    /// oldest bundle that may not go stops the prune, so the kept chain has no holes.
    pub fn prune_where(
        &self,
        keep: u64,
        retention_days: u32,
        now: Timestamp,
        may_remove: impl Fn(&str, u64) -> bool,
    ) -> Result<PruneReport> {
        self.locked(|head| {
            let mut chain: Vec<(ChainView, String, PathBuf)> = Vec::new();
            for dir in all_bundles(&self.root)? {
                let path = dir.path.join(BUNDLE_FILE);
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                let view: ChainView =
                    serde_json::from_slice(&bytes).map_err(|e| EvidenceError::Corrupt {
                        path: path.clone(),
                        message: format!(
                            "{e}; run `compliance-agent evidence verify` before pruning"
                        ),
                    })?;
                chain.push((view, sha256_hex(&bytes), dir.path));
            }
            chain.sort_by_key(|(v, _, _)| v.seq);
            let total = chain.len() as u64;
            let cutoff = now
                .checked_sub(jiff::SignedDuration::from_hours(
                    24 * i64::from(retention_days),
                ))
                .unwrap_or(Timestamp::MIN);
            let removable = chain
                .iter()
                .enumerate()
                .take_while(|(i, (v, _, _))| {
                    (*i as u64) + keep < total
                        && v.timestamp_end < cutoff
                        && may_remove(&v.bundle_id, v.seq)
                })
                .count();
            if removable == 0 {
                return Ok(PruneReport {
                    pruned: 0,
                    kept: total,
                    checkpoint: None,
                });
            }
            let (last, last_hash, _) = &chain[removable - 1];
            let checkpoint = Checkpoint {
                pruned_through_seq: last.seq,
                pruned_through_hash: last_hash.clone(),
                pruned_count: removable as u64,
                keep,
                retention_days,
            };
            let mut draft = Draft::new(Check::EvidenceRetention, Outcome::Success);
            draft.pre_state = json!({
                "bundles": total,
                "first_seq": chain.first().map(|(v, _, _)| v.seq),
                "oldest_pruned_timestamp": chain[0].0.timestamp_end,
                "newest_pruned_timestamp": last.timestamp_end,
            });
            draft.post_state = serde_json::to_value(&checkpoint)?;
            // The checkpoint goes first: a crash mid-prune leaves extra old bundles, never an unexplained gap.
            let checkpoint_bundle = self.write_locked(head, vec![draft])?.pop();
            let tmp_root = self.root.join(TMP_DIR);
            let mut touched: Vec<PathBuf> = Vec::new();
            for (view, _, dir) in &chain[..removable] {
                let graveyard = tmp_root.join(format!("pruned-{}", view.bundle_id));
                fs::rename(dir, &graveyard).map_err(io_err(dir))?;
                if let Some(parent) = dir.parent()
                    && !touched.iter().any(|p| p == parent)
                {
                    touched.push(parent.to_owned());
                }
            }
            for day in &touched {
                fsync_dir(day)?;
                remove_empty_ancestors(&self.root, day)?;
            }
            self.clean_tmp()?;
            Ok(PruneReport {
                pruned: removable as u64,
                kept: total - removable as u64 + 1,
                checkpoint: checkpoint_bundle,
            })
        })
    }
}

fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

/// Creates `day` and its missing ancestors below `root`, noting each parent
/// whose entries changed so that it is fsynced.
fn create_dirs_noting_parents(root: &Path, day: &Path, to_sync: &mut Vec<PathBuf>) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = day.to_owned();
    while !cur.is_dir() && cur != root {
        missing.push(cur.clone());
        match cur.parent() {
            Some(p) => cur = p.to_owned(),
            None => break,
        }
    }
    for dir in missing.iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(dir)(e)),
        }
        if let Some(parent) = dir.parent()
            && !to_sync.iter().any(|p| p == parent)
        {
            to_sync.push(parent.to_owned());
        }
    }
    Ok(())
}

/// Removes `dir` and its parents up to `root` while they are empty.
fn remove_empty_ancestors(root: &Path, dir: &Path) -> Result<()> {
    let mut cur = dir.to_owned();
    while cur != root && cur.starts_with(root) {
        match fs::remove_dir(&cur) {
            Ok(()) => {}
            // Not empty (or already gone): stop climbing.
            Err(_) => break,
        }
        match cur.parent() {
            Some(p) => {
                let parent = p.to_owned();
                fsync_dir(&parent)?;
                cur = parent;
            }
            None => break,
        }
    }
    Ok(())
}
