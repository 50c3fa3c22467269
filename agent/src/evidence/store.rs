//! The evidence writer: seals drafts into signed, chained bundles and stores them atomically and durably.
//!
//! A write holds `<store>/.lock` (one writer at a time across processes, so the
//! chain cannot fork) and goes:
//! 1. the signed head record notes the bundles about to be written (`pending`);
//! 2. each bundle's bundle.json and bundle.sig are written into `.tmp/<id>/`;
//! 3. syncfs(2) makes all of that durable in one journal commit;
//! 4. each `.tmp/<id>/` is renamed into `YYYY/MM/DD/<id>/` (a bundle appears whole or not at all);
//! 5. the day directories are fsynced; only now is a bundle reported as stored;
//! 6. the head record is rewritten without `pending` (if that fails, `pending` still resolves it).
//!
//! After a crash at any instant, the next writer cleans `.tmp/`, and a pending
//! bundle counts as committed exactly when its directory exists.
//!
//! The head record is signed and names the newest bundle. A writer that finds
//! it missing, unreadable, or naming a bundle that is gone or changed never
//! quietly starts over: it continues after the recorded head (so no recorded
//! seq is reused) and first writes a signed `evidence_integrity` alert naming
//! what is missing. Every name the writer creates, replaces or removes is
//! resolved relative to directories it opened without following links.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use rustix::fs::FileType;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::fsafe::{self, ReadFailure};
use super::layout::{
    BUNDLE_FILE, HEAD_FILE, HEAD_TMP, HeadRecord, HeadState, LOCK_FILE, PendingBundle,
    SIGNATURE_FILE, TMP_DIR, all_bundles, day_dirs, day_path, encode_head, read_head,
};
use super::verify::ChainView;
use super::{
    BUNDLE_VERSION, Bundle, Check, Draft, EvidenceError, MAX_BUNDLE_BYTES, Outcome, Result, io_err,
    valid_control,
};
use crate::config::DeploymentMode;
use crate::crypto::{SIGNATURE_LEN, SigningKey, VerifyingKey, sha256_hex};
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
    /// The oldest seq this prune removed.
    pub pruned_from_seq: u64,
    /// The newest seq that was pruned; the chain continues at this seq + 1.
    pub pruned_through_seq: u64,
    /// SHA-256 of that bundle's bundle.json (the next bundle's prev_hash).
    pub pruned_through_hash: String,
    /// How many bundles this prune removed: pruned_through_seq - pruned_from_seq + 1.
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
    verifying: VerifyingKey,
    fingerprint: String,
    host: HostIdentity,
    system: RunningSystem,
}

/// A sealed bundle ready to be written.
struct Sealed {
    pending: PendingBundle,
    json: Vec<u8>,
    sig: [u8; 64],
    attachments: Vec<super::Attachment>,
}

/// What a write holds while it runs: the lock, the store's directories opened
/// without following links, the recovered head and an alert still to write.
struct Held {
    _lock: fs::File,
    root: OwnedFd,
    tmp: OwnedFd,
    head: HeadRecord,
    alert: Option<Draft>,
}

/// The newest bundle found on disk by reading every one.
struct DiskHead {
    record: HeadRecord,
    bundles: u64,
}

impl EvidenceStore {
    /// Opens (creating it if needed) the store at `root`.
    pub fn open(
        root: &Path,
        key: SigningKey,
        host: HostIdentity,
        system: RunningSystem,
    ) -> Result<Self> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let verifying = key.verifying_key();
        let fingerprint = verifying.fingerprint();
        Ok(Self {
            root: root.to_owned(),
            key,
            verifying,
            fingerprint,
            host,
            system,
        })
    }

    fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Seals and durably stores one bundle; returns it (the last bundle written).
    pub fn store(&self, draft: Draft) -> Result<StoredBundle> {
        let mut stored = self.store_many(vec![draft])?;
        stored
            .pop()
            .ok_or_else(|| EvidenceError::Invalid("store_many returned nothing".into()))
    }

    /// Seals and stores several bundles with one durability barrier (a scan's
    /// seven checks, say). Either call returns only once all are durable.
    /// Returns every bundle written: an integrity alert the store had to
    /// write first comes before the drafts' bundles, which keep their order.
    pub fn store_many(&self, drafts: Vec<Draft>) -> Result<Vec<StoredBundle>> {
        if drafts.is_empty() {
            return Ok(Vec::new());
        }
        self.locked(|held| self.write_locked(held, drafts))
    }

    /// The committed head: (seq, hash of its bundle.json).
    pub fn head(&self) -> Result<(u64, Option<String>)> {
        self.locked(|held| Ok((held.head.seq, held.head.hash.clone())))
    }

    fn locked<T>(&self, f: impl FnOnce(&mut Held) -> Result<T>) -> Result<T> {
        let root = fsafe::open_root(&self.root).map_err(io_err(&self.root))?;
        let lock_path = self.path(LOCK_FILE);
        let lock = fsafe::open_lock_at(&root, LOCK_FILE).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let tmp = self.ensure_tmp(&root)?;
        self.clean_tmp(&tmp)?;
        let (head, alert) = self.recover_head(&root)?;
        let mut held = Held {
            _lock: lock,
            root,
            tmp,
            head,
            alert,
        };
        f(&mut held)
    }

    /// `.tmp/` as a real directory: anything else there (a link planted to
    /// make the writer delete elsewhere) is removed as itself and replaced.
    fn ensure_tmp(&self, root: &OwnedFd) -> Result<OwnedFd> {
        let path = self.path(TMP_DIR);
        match fsafe::kind_at(root, TMP_DIR).map_err(io_err(&path))? {
            Some(FileType::Directory) | None => {}
            Some(other) => {
                tracing::warn!(
                    path = %path.display(),
                    "evidence store's {TMP_DIR} is {}, not a directory; removing it (never following it)",
                    fsafe::kind_name(other)
                );
                fsafe::remove_at(root, TMP_DIR).map_err(io_err(&path))?;
            }
        }
        let (fd, _) = fsafe::ensure_dir_at(root, TMP_DIR).map_err(io_err(&path))?;
        Ok(fd)
    }

    /// Removes bundles a crashed writer left half-assembled (links as links).
    fn clean_tmp(&self, tmp: &OwnedFd) -> Result<()> {
        let path = self.path(TMP_DIR);
        for (name, _) in fsafe::list_entries(tmp).map_err(io_err(&path))? {
            fsafe::remove_at(tmp, &name).map_err(io_err(&path.join(&name)))?;
        }
        Ok(())
    }

    /// Reads the head record, resolving a write that was in progress. When the
    /// record is missing or unreadable, or names a bundle that is gone or
    /// changed, returns the head to continue from with an alert to write first.
    fn recover_head(&self, root: &OwnedFd) -> Result<(HeadRecord, Option<Draft>)> {
        match read_head(root, &self.verifying) {
            HeadState::Valid(mut head) => {
                for pending in std::mem::take(&mut head.pending) {
                    let file = self.path(pending.rel_path().join(BUNDLE_FILE));
                    if fsafe::kind_of(&file).map_err(io_err(&file))? == Some(FileType::RegularFile)
                    {
                        head.commit(&pending);
                    }
                }
                let Some(rel) = head.head_bundle_file() else {
                    return Ok((head, None));
                };
                let file = self.path(&rel);
                let problem = match fsafe::read_capped(&file, MAX_BUNDLE_BYTES) {
                    Ok(bytes) if Some(sha256_hex(&bytes)) == head.hash => return Ok((head, None)),
                    Ok(bytes) => format!(
                        "the head record names bundle {} (seq {}) with hash {}, but its {BUNDLE_FILE} now hashes to {} (replaced or edited)",
                        head.bundle_id.as_deref().unwrap_or("?"),
                        head.seq,
                        head.hash.as_deref().unwrap_or("?"),
                        sha256_hex(&bytes)
                    ),
                    Err(ReadFailure::NotFound) => format!(
                        "the head record names bundle {} (seq {}), which is gone (deleted, moved or hidden)",
                        head.bundle_id.as_deref().unwrap_or("?"),
                        head.seq
                    ),
                    Err(e) => format!(
                        "the head record names bundle {} (seq {}), whose {BUNDLE_FILE} cannot be read: {e}",
                        head.bundle_id.as_deref().unwrap_or("?"),
                        head.seq
                    ),
                };
                let disk = self.disk_head()?;
                let alert = integrity_alert("head_bundle_missing", problem, Some(&head), &disk);
                Ok((head, Some(alert)))
            }
            HeadState::Missing => {
                let disk = self.disk_head()?;
                if disk.bundles == 0 {
                    // A new store has no day directories; one that has them held
                    // bundles once, and all of them and the head record are gone.
                    let days = day_dirs(&self.root, None, None)?.len();
                    if days == 0 {
                        return Ok((HeadRecord::default(), None));
                    }
                    let problem = format!(
                        "the store holds {days} day director{} but no bundle and no chain head record {HEAD_FILE}: every bundle and the record were removed; the chain starts again at seq 1, so earlier seqs are reused",
                        if days == 1 { "y" } else { "ies" }
                    );
                    let alert = integrity_alert("store_emptied", problem, None, &disk);
                    return Ok((disk.record, Some(alert)));
                }
                let problem = format!(
                    "the chain head record {HEAD_FILE} is missing although the store holds {} bundle(s); bundles written after seq {} may have been deleted unseen",
                    disk.bundles, disk.record.seq
                );
                let alert = integrity_alert("head_record_missing", problem, None, &disk);
                Ok((disk.record, Some(alert)))
            }
            HeadState::Unreadable(reason) => {
                let disk = self.disk_head()?;
                let problem = format!(
                    "{reason}; continuing after the newest bundle on disk (seq {}); bundles written after it may have been deleted unseen",
                    disk.record.seq
                );
                let alert = integrity_alert("head_record_unreadable", problem, None, &disk);
                Ok((disk.record, Some(alert)))
            }
        }
    }

    /// The newest bundle on disk, by reading every bundle (only when the head record cannot be trusted).
    fn disk_head(&self) -> Result<DiskHead> {
        let mut head = HeadRecord::default();
        let mut bundles = 0;
        for dir in all_bundles(&self.root)? {
            bundles += 1;
            let Ok(bytes) = fsafe::read_capped(&dir.path.join(BUNDLE_FILE), MAX_BUNDLE_BYTES)
            else {
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
            head = HeadRecord {
                date: head.date,
                ..HeadRecord::default()
            };
        }
        Ok(DiskHead {
            record: head,
            bundles,
        })
    }

    fn seal(&self, head: &mut HeadRecord, draft: Draft) -> Result<Sealed> {
        let now = Timestamp::now();
        let timestamp_end = draft.timestamp_end.unwrap_or(now);
        for a in &draft.attachments {
            if !super::Attachment::valid_name(&a.name) {
                return Err(EvidenceError::Invalid(format!(
                    "attachment name {:?} must be a plain file name (letters, digits, '.', '_', '-') other than {BUNDLE_FILE} and {SIGNATURE_FILE}",
                    a.name
                )));
            }
            if a.bytes.len() > super::Attachment::MAX_BYTES {
                return Err(EvidenceError::Invalid(format!(
                    "attachment {} is {} bytes, more than {}",
                    a.name,
                    a.bytes.len(),
                    super::Attachment::MAX_BYTES
                )));
            }
        }
        if let Some(dup) = draft
            .attachments
            .iter()
            .enumerate()
            .find(|(i, a)| draft.attachments[..*i].iter().any(|b| b.name == a.name))
        {
            return Err(EvidenceError::Invalid(format!(
                "attachment {} is given twice",
                dup.1.name
            )));
        }
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
        // The channel never sends a larger bundle; refuse it here, not after it is in the chain.
        if json.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(EvidenceError::Invalid(format!(
                "the {} bundle would be {} bytes, more than the {MAX_BUNDLE_BYTES}-byte limit of a bundle (the MCP channel's); record less (fewer controls, a shorter note or state)",
                bundle.check,
                json.len()
            )));
        }
        let hash = sha256_hex(&json);
        let sig = self.key.sign(&json);
        let pending = PendingBundle {
            seq: bundle.seq,
            hash,
            bundle_id,
            date,
        };
        head.commit(&pending);
        Ok(Sealed {
            pending,
            json,
            sig,
            attachments: draft.attachments,
        })
    }

    fn write_head(&self, root: &OwnedFd, head: &HeadRecord) -> Result<()> {
        let bytes = encode_head(head, &self.key)?;
        fsafe::replace_at(root, HEAD_FILE, HEAD_TMP, &bytes, false)
            .map_err(io_err(&self.path(HEAD_FILE)))
    }

    fn write_locked(&self, held: &mut Held, drafts: Vec<Draft>) -> Result<Vec<StoredBundle>> {
        let mut drafts = drafts;
        if let Some(alert) = held.alert.clone() {
            drafts.insert(0, alert);
        }
        let committed = held.head.clone();
        let mut next = held.head.clone();
        let sealed = drafts
            .into_iter()
            .map(|d| self.seal(&mut next, d))
            .collect::<Result<Vec<_>>>()?;

        // 1. Announce the write.
        let mut announce = committed;
        announce.pending = sealed.iter().map(|s| s.pending.clone()).collect();
        self.write_head(&held.root, &announce)?;

        // 2. Assemble every bundle in .tmp/.
        for s in &sealed {
            let id = &s.pending.bundle_id;
            let path = self.path(TMP_DIR).join(id);
            let (dir, _) = fsafe::ensure_dir_at(&held.tmp, id).map_err(io_err(&path))?;
            for a in &s.attachments {
                fsafe::write_new_at(&dir, &a.name, &a.bytes, false)
                    .map_err(io_err(&path.join(&a.name)))?;
            }
            fsafe::write_new_at(&dir, BUNDLE_FILE, &s.json, false)
                .map_err(io_err(&path.join(BUNDLE_FILE)))?;
            fsafe::write_new_at(&dir, SIGNATURE_FILE, &s.sig, false)
                .map_err(io_err(&path.join(SIGNATURE_FILE)))?;
        }

        // 3. One barrier for the head record and all bundle files.
        rustix::fs::syncfs(&held.root).map_err(|e| io_err(&self.root)(e.into()))?;

        // 4. Publish each bundle whole.
        let mut days: Vec<(Date, OwnedFd)> = Vec::new();
        let mut to_sync: Vec<(PathBuf, OwnedFd)> = Vec::new();
        let mut stored = Vec::with_capacity(sealed.len());
        for s in &sealed {
            let date = s.pending.date;
            if !days.iter().any(|(d, _)| *d == date) {
                let day = self.open_day(&held.root, date, true, &mut to_sync)?;
                days.push((date, day));
            }
            let day = days
                .iter()
                .find(|(d, _)| *d == date)
                .map(|(_, fd)| fd)
                .ok_or_else(|| EvidenceError::Invalid("day directory not opened".into()))?;
            let dest = self.path(s.pending.rel_path());
            fsafe::rename_at(&held.tmp, &s.pending.bundle_id, day, &s.pending.bundle_id)
                .map_err(io_err(&dest))?;
            stored.push(StoredBundle {
                bundle_id: s.pending.bundle_id.clone(),
                seq: s.pending.seq,
                hash: s.pending.hash.clone(),
                dir: dest,
            });
        }

        // 5. Make the renames durable.
        for (date, fd) in &days {
            fsafe::fsync_fd(fd)
                .map_err(|e| not_durable(&stored, &self.path(day_path(*date)), e))?;
        }
        for (path, fd) in &to_sync {
            fsafe::fsync_fd(fd).map_err(|e| not_durable(&stored, path, e))?;
        }

        // 6. The new head. The bundles are durable and the announced
        // `pending` already resolves the head, so a failure here (a full
        // disk, say) must not report them as not stored: a caller would
        // write the same event again.
        next.pending.clear();
        if let Err(e) = self.write_head(&held.root, &next) {
            tracing::warn!(
                error = %e,
                "bundles stored; the head record could not be updated and is resolved from the pending entries at the next write"
            );
        }
        held.head = next;
        held.alert = None;
        Ok(stored)
    }

    /// Opens `YYYY/MM/DD` for `date` below `root`, never through a link;
    /// with `create`, missing levels are made and their parents noted for fsync.
    fn open_day(
        &self,
        root: &OwnedFd,
        date: Date,
        create: bool,
        to_sync: &mut Vec<(PathBuf, OwnedFd)>,
    ) -> Result<OwnedFd> {
        let names = [
            format!("{:04}", date.year()),
            format!("{:02}", date.month()),
            format!("{:02}", date.day()),
        ];
        let mut rel = PathBuf::new();
        let mut parent = rustix::io::dup(root).map_err(|e| io_err(&self.root)(e.into()))?;
        let mut parent_rel = PathBuf::new();
        for name in &names {
            rel.push(name);
            let path = self.path(&rel);
            let opened = if create {
                fsafe::ensure_dir_at(&parent, name)
            } else {
                fsafe::open_dir_at(&parent, name).map(|fd| (fd, false))
            };
            let (fd, created) = opened.map_err(|e| {
                io_err(&path)(std::io::Error::new(
                    e.kind(),
                    format!("{e} (a day directory must be a real directory, never a link)"),
                ))
            })?;
            if created {
                to_sync.push((self.path(&parent_rel), parent));
            }
            parent = fd;
            parent_rel = rel.clone();
        }
        Ok(parent)
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
    ///
    /// Before anything is removed, the bundles to be covered by the checkpoint
    /// (and the first one kept) are verified: every signature by this store's
    /// key, every link, no gap, and a start at seq 1 or at an earlier
    /// checkpoint. A broken prefix is refused with the reason: a checkpoint
    /// must never vouch for evidence that was already missing or altered.
    pub fn prune_where(
        &self,
        keep: u64,
        retention_days: u32,
        now: Timestamp,
        may_remove: impl Fn(&str, u64) -> bool,
    ) -> Result<PruneReport> {
        self.locked(|held| {
            // The alert is evidence in its own right: write it whatever the prune decides.
            if held.alert.is_some() {
                self.write_locked(held, Vec::new())?;
            }
            let mut chain: Vec<PruneItem> = Vec::new();
            for dir in all_bundles(&self.root)? {
                let path = dir.path.join(BUNDLE_FILE);
                let refuse = |message: String| {
                    EvidenceError::Invalid(format!(
                        "refusing to prune: {} {message}; run `compliance-agent evidence verify`",
                        path.display()
                    ))
                };
                let json = fsafe::read_capped(&path, MAX_BUNDLE_BYTES)
                    .map_err(|e| refuse(format!("cannot be read: {e}")))?;
                let view: ChainView = serde_json::from_slice(&json)
                    .map_err(|e| refuse(format!("is not a valid bundle: {e}")))?;
                let sig_ok = fsafe::read_capped(&dir.path.join(SIGNATURE_FILE), 4096)
                    .ok()
                    .filter(|s| s.len() == SIGNATURE_LEN)
                    .is_some_and(|s| self.verifying.verify(&json, &s).is_ok());
                chain.push(PruneItem {
                    hash: sha256_hex(&json),
                    view,
                    dir,
                    sig_ok,
                });
            }
            chain.sort_by_key(|c| c.view.seq);
            let total = chain.len() as u64;
            let cutoff = now
                .checked_sub(jiff::SignedDuration::from_hours(
                    24 * i64::from(retention_days),
                ))
                .unwrap_or(Timestamp::MIN);
            let removable = chain
                .iter()
                .enumerate()
                .take_while(|(i, c)| {
                    (*i as u64) + keep < total
                        && c.view.timestamp_end < cutoff
                        && may_remove(&c.view.bundle_id, c.view.seq)
                })
                .count();
            if removable == 0 {
                return Ok(PruneReport {
                    pruned: 0,
                    kept: total,
                    checkpoint: None,
                });
            }
            check_prefix(&chain, removable, &self.fingerprint, &held.head).map_err(|reason| {
                EvidenceError::Invalid(format!(
                    "refusing to prune: {reason}; run `compliance-agent evidence verify`"
                ))
            })?;
            let first = &chain[0];
            let last = &chain[removable - 1];
            let checkpoint = Checkpoint {
                pruned_from_seq: first.view.seq,
                pruned_through_seq: last.view.seq,
                pruned_through_hash: last.hash.clone(),
                pruned_count: removable as u64,
                keep,
                retention_days,
            };
            let mut draft = Draft::new(Check::EvidenceRetention, Outcome::Success);
            draft.pre_state = json!({
                "bundles": total,
                "first_seq": first.view.seq,
                "oldest_pruned_timestamp": first.view.timestamp_end,
                "newest_pruned_timestamp": last.view.timestamp_end,
            });
            draft.post_state = serde_json::to_value(&checkpoint)?;
            // The checkpoint goes first: a crash mid-prune leaves extra old bundles, never an unexplained gap.
            let checkpoint_bundle = self.write_locked(held, vec![draft])?.pop();
            let mut days: Vec<(Date, OwnedFd)> = Vec::new();
            let mut unused = Vec::new();
            for item in &chain[..removable] {
                let date = item.dir.date;
                if !days.iter().any(|(d, _)| *d == date) {
                    let day = self.open_day(&held.root, date, false, &mut unused)?;
                    days.push((date, day));
                }
                let Some((_, day)) = days.iter().find(|(d, _)| *d == date) else {
                    continue;
                };
                let graveyard = format!("pruned-{}", item.view.bundle_id);
                fsafe::rename_at(day, &item.dir.name, &held.tmp, &graveyard)
                    .map_err(io_err(&item.dir.path))?;
            }
            for (date, day) in &days {
                fsafe::fsync_fd(day).map_err(io_err(&self.path(day_path(*date))))?;
            }
            drop(days);
            for (date, _) in chain[..removable]
                .iter()
                .map(|c| (c.dir.date, ()))
                .collect::<std::collections::BTreeMap<_, _>>()
            {
                self.remove_empty_day(&held.root, date)?;
            }
            self.clean_tmp(&held.tmp)?;
            Ok(PruneReport {
                pruned: removable as u64,
                kept: total - removable as u64 + 1,
                checkpoint: checkpoint_bundle,
            })
        })
    }

    /// Removes the day, month and year directories of `date` while they are empty.
    fn remove_empty_day(&self, root: &OwnedFd, date: Date) -> Result<()> {
        let (y, m, d) = (
            format!("{:04}", date.year()),
            format!("{:02}", date.month()),
            format!("{:02}", date.day()),
        );
        let Ok(year) = fsafe::open_dir_at(root, &y) else {
            return Ok(());
        };
        let Ok(month) = fsafe::open_dir_at(&year, &m) else {
            return Ok(());
        };
        let removed = |dir: &OwnedFd, name: &str| {
            rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::REMOVEDIR).is_ok()
        };
        if !removed(&month, &d) {
            return Ok(());
        }
        fsafe::fsync_fd(&month).map_err(io_err(&self.path(format!("{y}/{m}"))))?;
        if !removed(&year, &m) {
            return Ok(());
        }
        fsafe::fsync_fd(&year).map_err(io_err(&self.path(&y)))?;
        if removed(root, &y) {
            fsafe::fsync_fd(root).map_err(io_err(&self.root))?;
        }
        Ok(())
    }
}

/// One bundle as prune sees it.
struct PruneItem {
    view: ChainView,
    hash: String,
    dir: super::layout::BundleDir,
    sig_ok: bool,
}

/// Checks what a prune of `chain[..removable]` would cover, with the first
/// bundle kept: signatures, names, contiguous seqs, links, and the start.
fn check_prefix(
    chain: &[PruneItem],
    removable: usize,
    fingerprint: &str,
    head: &HeadRecord,
) -> std::result::Result<(), String> {
    let covered = &chain[..(removable + 1).min(chain.len())];
    for c in covered {
        let name = format!("bundle {} (seq {})", c.dir.name, c.view.seq);
        if !c.sig_ok {
            return Err(format!(
                "{name} has no valid signature by this store's key {fingerprint}"
            ));
        }
        if c.view.bundle_id != c.dir.name {
            return Err(format!(
                "{name}: the directory holds bundle {} (moved or swapped)",
                c.view.bundle_id
            ));
        }
    }
    for pair in covered.windows(2) {
        let (prev, cur) = (&pair[0], &pair[1]);
        if cur.view.seq != prev.view.seq + 1 {
            return Err(if cur.view.seq == prev.view.seq {
                format!(
                    "seq {} appears twice (bundles {} and {}: a forked chain)",
                    cur.view.seq, prev.dir.name, cur.dir.name
                )
            } else {
                format!(
                    "seq {}..{} are missing between bundles {} and {}",
                    prev.view.seq + 1,
                    cur.view.seq - 1,
                    prev.dir.name,
                    cur.dir.name
                )
            });
        }
        if cur.view.prev_hash.as_deref() != Some(prev.hash.as_str()) {
            return Err(format!(
                "bundle {} (seq {}) does not link to bundle {} (seq {}): the chain is broken",
                cur.dir.name, cur.view.seq, prev.dir.name, prev.view.seq
            ));
        }
    }
    let first = &chain[0];
    let explained = if first.view.seq == 1 {
        first.view.prev_hash.is_none()
    } else {
        chain.iter().any(|c| {
            c.view.check == Check::EvidenceRetention
                && serde_json::from_str::<Checkpoint>(c.view.post_state.get()).is_ok_and(|cp| {
                    cp.pruned_through_seq + 1 == first.view.seq
                        && first.view.prev_hash.as_deref() == Some(cp.pruned_through_hash.as_str())
                })
        })
    };
    if !explained {
        return Err(format!(
            "the oldest bundle {} is seq {} and no retention checkpoint accounts for what came before it",
            first.dir.name, first.view.seq
        ));
    }
    // Everything goes: the last removed must be the recorded head.
    if removable == chain.len() && head.hash.as_deref() != Some(chain[removable - 1].hash.as_str())
    {
        return Err("the newest bundle is not the one the head record names".into());
    }
    Ok(())
}

fn not_durable(stored: &[StoredBundle], path: &Path, e: std::io::Error) -> EvidenceError {
    let ids: Vec<String> = stored
        .iter()
        .map(|s| format!("{} (seq {})", s.bundle_id, s.seq))
        .collect();
    EvidenceError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(
            e.kind(),
            format!(
                "{e}; bundle(s) {} are in place but could not be made durable",
                ids.join(", ")
            ),
        ),
    }
}

/// The signed alert written before anything else when the head record cannot
/// be trusted: what was expected, what was found, which seqs are missing.
fn integrity_alert(
    kind: &str,
    problem: String,
    recorded: Option<&HeadRecord>,
    disk: &DiskHead,
) -> Draft {
    /// At most this many missing seqs are listed one by one.
    const LISTED: u64 = 256;
    let mut missing = Vec::new();
    let mut missing_range = None;
    if let Some(r) = recorded
        && r.seq > disk.record.seq
    {
        let (from, through) = (disk.record.seq + 1, r.seq);
        missing_range = Some(json!({ "from_seq": from, "through_seq": through }));
        for seq in from..=through.min(from + LISTED - 1) {
            let known = r.recent.iter().find(|l| l.seq == seq);
            missing.push(json!({
                "seq": seq,
                "hash": known.map(|l| l.hash.clone()),
                "bundle_id": known.map(|l| l.bundle_id.clone()),
            }));
        }
    }
    tracing::error!(%problem, "evidence store integrity alert");
    let mut draft = Draft::new(Check::EvidenceIntegrity, Outcome::Alert);
    draft.error = Some(problem);
    draft.pre_state = json!({
        "kind": kind,
        "recorded_head": recorded.map(|r| json!({
            "seq": r.seq, "hash": r.hash, "bundle_id": r.bundle_id, "date": r.date,
        })),
        "newest_on_disk": json!({
            "seq": disk.record.seq, "hash": disk.record.hash, "bundle_id": disk.record.bundle_id,
        }),
        "bundles_on_disk": disk.bundles,
        "missing_range": missing_range,
        "missing": missing,
    });
    draft.post_state = json!({
        "continued_after_seq": recorded.map_or(disk.record.seq, |r| r.seq),
    });
    draft
}
