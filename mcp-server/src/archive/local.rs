//! The local-directory archive (the embedded default): files written durably and read-only,
//! with the retain-until date beside them. It cannot stop root deleting files; WORM
//! enforcement is what the S3 archive with Object Lock adds.

use std::path::{Path, PathBuf};

use jiff::Timestamp;

use super::{Archive, ArchiveError, ArchiveKey, Archived, Result};
use compliance_agent::evidence::{BUNDLE_FILE, SIGNATURE_FILE};

const RETAIN_FILE: &str = "retain-until";

pub struct LocalArchive {
    root: PathBuf,
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Unavailable(format!("{}: {e}", path.display()))
}

impl LocalArchive {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    fn dir(&self, key: &ArchiveKey) -> PathBuf {
        self.root.join(key.prefix())
    }
}

/// Creates `dir` and any missing ancestors, fsyncing the parent of each one created,
/// so a host's first object does not hang from a directory a crash can lose.
fn create_dirs_durable(dir: &Path) -> Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(unavailable(dir, e)),
    }
    match dir.parent() {
        Some(parent) => {
            crate::sync_dir(parent).map_err(|e| ArchiveError::Unavailable(e.to_string()))
        }
        None => Ok(()),
    }
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(path, e)),
    }
}

impl Archive for LocalArchive {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn check(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root).map_err(|e| unavailable(&self.root, e))?;
        let probe = self
            .root
            .join(format!(".probe-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&probe, b"probe").map_err(|e| {
            ArchiveError::Unusable(format!("{} is not writable: {e}", self.root.display()))
        })?;
        std::fs::remove_file(&probe).map_err(|e| unavailable(&probe, e))
    }

    fn put(
        &self,
        key: &ArchiveKey,
        json: &[u8],
        sig: &[u8],
        retain_until: Timestamp,
    ) -> Result<()> {
        let dir = self.dir(key);
        if let Some(existing) = self.get(key)? {
            if existing.json == json && existing.sig == sig {
                return Ok(());
            }
            return Err(ArchiveError::Conflict { key: key.prefix() });
        }
        // Assemble beside the target, then rename: an object appears whole or not at all.
        let parent = dir
            .parent()
            .ok_or_else(|| ArchiveError::Unusable(format!("{} has no parent", dir.display())))?;
        create_dirs_durable(parent)?;
        let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        // Five fsyncs per object: its three files, the new directory's entries, and
        // the rename into the parent.
        let write = || -> crate::Result<()> {
            std::fs::create_dir_all(&tmp).map_err(crate::Error::io(&tmp))?;
            crate::write_new_synced(&tmp.join(BUNDLE_FILE), json, 0o444)?;
            crate::write_new_synced(&tmp.join(SIGNATURE_FILE), sig, 0o444)?;
            crate::write_new_synced(
                &tmp.join(RETAIN_FILE),
                retain_until.to_string().as_bytes(),
                0o444,
            )?;
            crate::sync_dir(&tmp)?;
            std::fs::rename(&tmp, &dir).map_err(crate::Error::io(&dir))?;
            crate::sync_dir(parent)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            ArchiveError::Unavailable(e.to_string())
        })?;
        Ok(())
    }

    fn get(&self, key: &ArchiveKey) -> Result<Option<Archived>> {
        let dir = self.dir(key);
        let Some(json) = read_opt(&dir.join(BUNDLE_FILE))? else {
            return Ok(None);
        };
        let sig = read_opt(&dir.join(SIGNATURE_FILE))?.unwrap_or_default();
        let retain_until = read_opt(&dir.join(RETAIN_FILE))?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(Timestamp::UNIX_EPOCH);
        Ok(Some(Archived {
            json,
            sig,
            retain_until,
        }))
    }
}
