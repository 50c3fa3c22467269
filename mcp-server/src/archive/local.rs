//! The local-directory archive (the embedded default): files written durably and read-only,
//! with the retain-until date beside them. It cannot stop root deleting files; WORM
//! enforcement is what the S3 archive with Object Lock adds.
//!
//! Durability is a group commit: each object is written and renamed into place without
//! an fsync of its own, then waits for a syncfs(2) of the archive's filesystem that began
//! after its rename. One syncfs (one journal commit) covers every object written while
//! the previous one ran, instead of five fsyncs per object. A put returns only when such
//! a syncfs has succeeded; when it fails, every put it covered fails.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use jiff::Timestamp;

use super::{Archive, ArchiveError, ArchiveKey, Archived, Result};
use compliance_agent::evidence::{BUNDLE_FILE, SIGNATURE_FILE};

const RETAIN_FILE: &str = "retain-until";

pub struct LocalArchive {
    root: PathBuf,
    sync: SyncGroup,
}

/// Tickets for syncfs: a put takes one after its rename; it is durable once a syncfs that
/// started after the ticket was issued has returned Ok.
#[derive(Default)]
struct SyncGroup {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    issued: u64,
    /// Every ticket up to this one is covered by a finished syncfs.
    synced: u64,
    running: bool,
    /// Ticket ranges whose syncfs failed, with the error (the newest few).
    failures: Vec<(u64, u64, String)>,
}

const KEPT_FAILURES: usize = 64;

impl SyncGroup {
    /// Blocks until a syncfs of `root`'s filesystem that began after this call has
    /// finished, and answers its result.
    fn sync(&self, root: &Path) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.synced >= ticket {
                return match st
                    .failures
                    .iter()
                    .find(|(from, to, _)| (*from..=*to).contains(&ticket))
                {
                    Some((_, _, e)) => Err(ArchiveError::Unavailable(e.clone())),
                    None => Ok(()),
                };
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead one syncfs for every ticket issued so far.
            st.running = true;
            let (from, target) = (st.synced + 1, st.issued);
            drop(st);
            let result = std::fs::File::open(root)
                .and_then(|dir| rustix::fs::syncfs(&dir).map_err(std::io::Error::from))
                .map_err(|e| format!("syncfs of {}: {e}", root.display()));
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.running = false;
            st.synced = target;
            if let Err(e) = result {
                if st.failures.len() == KEPT_FAILURES {
                    st.failures.remove(0);
                }
                st.failures.push((from, target, e));
            }
            self.done.notify_all();
        }
    }
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Unavailable(format!("{}: {e}", path.display()))
}

impl LocalArchive {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            sync: SyncGroup::default(),
        }
    }

    fn dir(&self, key: &ArchiveKey) -> PathBuf {
        self.root.join(key.prefix())
    }
}

/// Creates `path` read-only with `data`, not synced (the group syncfs does that).
fn write_new(path: &Path, data: &[u8]) -> crate::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(crate::Error::io(path))
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
                // The same object again (a retry): durable only once a syncfs says so,
                // since the first put may have failed at its syncfs.
                return self.sync.sync(&self.root);
            }
            return Err(ArchiveError::Conflict { key: key.prefix() });
        }
        // Assemble beside the target, then rename: an object appears whole or not at all.
        let parent = dir
            .parent()
            .ok_or_else(|| ArchiveError::Unusable(format!("{} has no parent", dir.display())))?;
        std::fs::create_dir_all(parent).map_err(|e| unavailable(parent, e))?;
        let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        // No fsync per file: the group syncfs below makes the files, their directory and
        // the rename durable together.
        let write = || -> crate::Result<()> {
            std::fs::create_dir_all(&tmp).map_err(crate::Error::io(&tmp))?;
            write_new(&tmp.join(BUNDLE_FILE), json)?;
            write_new(&tmp.join(SIGNATURE_FILE), sig)?;
            write_new(&tmp.join(RETAIN_FILE), retain_until.to_string().as_bytes())?;
            std::fs::rename(&tmp, &dir).map_err(crate::Error::io(&dir))
        };
        write().map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            ArchiveError::Unavailable(e.to_string())
        })?;
        self.sync.sync(&self.root)
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
