//! On-disk layout of an evidence store: `YYYY/MM/DD/<bundle_id>/bundle.{json,sig}`, the head record, the lock.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::fsafe::{self, ReadFailure};
use super::{Result, io_err};
use crate::crypto::{SigningKey, VerifyingKey};

pub const BUNDLE_FILE: &str = "bundle.json";
pub const SIGNATURE_FILE: &str = "bundle.sig";
pub(super) const LOCK_FILE: &str = ".lock";
pub(super) const HEAD_FILE: &str = ".chain-head.json";
/// The head record is written here and renamed over HEAD_FILE.
pub(super) const HEAD_TMP: &str = ".chain-head.tmp";
/// Largest head record read (a write of many bundles lists each as pending).
pub(super) const MAX_HEAD_BYTES: u64 = 8 << 20;
/// How many of the newest committed bundles the head record remembers, so
/// that an alert can name the seqs and hashes of bundles deleted from the end.
pub(super) const RECENT_LINKS: usize = 32;
/// Bundles are assembled here and renamed into the date tree whole.
pub(super) const TMP_DIR: &str = ".tmp";

/// `YYYY/MM/DD` of a date.
pub(super) fn day_path(date: Date) -> PathBuf {
    PathBuf::from(format!(
        "{:04}/{:02}/{:02}",
        date.year(),
        date.month(),
        date.day()
    ))
}

/// Something in the date tree that is not what the writer puts there.
#[derive(Clone, Debug)]
pub(super) struct Stray {
    pub path: PathBuf,
    pub what: String,
}

fn entry_kind(entry: &fs::DirEntry) -> std::io::Result<fs::FileType> {
    // DirEntry::file_type does not follow a symbolic link.
    entry.file_type()
}

fn type_name(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "a file of unknown type"
    }
}

/// Numeric directories of `width` digits in `dir`. A numeric name that is
/// not a real directory (a link, say) is never followed and goes to `strays`.
fn numeric_entries(
    dir: &Path,
    width: usize,
    strays: &mut Vec<Stray>,
) -> Result<Vec<(i16, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.len() == width
            && name.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = name.parse()
        {
            let kind = entry_kind(&entry).map_err(io_err(&entry.path()))?;
            if kind.is_dir() {
                out.push((n, entry.path()));
            } else {
                strays.push(Stray {
                    path: entry.path(),
                    what: format!(
                        "is {} in the date tree, not a directory (never followed)",
                        type_name(kind)
                    ),
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every day directory, oldest first, optionally limited to `[from, to]`.
pub(super) fn day_dirs(
    root: &Path,
    from: Option<Date>,
    to: Option<Date>,
) -> Result<Vec<(Date, PathBuf)>> {
    day_dirs_noting(root, from, to, &mut Vec::new())
}

fn day_dirs_noting(
    root: &Path,
    from: Option<Date>,
    to: Option<Date>,
    strays: &mut Vec<Stray>,
) -> Result<Vec<(Date, PathBuf)>> {
    let mut days = Vec::new();
    for (y, ypath) in numeric_entries(root, 4, strays)? {
        if from.is_some_and(|f| y < f.year()) || to.is_some_and(|t| y > t.year()) {
            continue;
        }
        for (m, mpath) in numeric_entries(&ypath, 2, strays)? {
            for (d, dpath) in numeric_entries(&mpath, 2, strays)? {
                let Ok(date) = Date::new(y, m as i8, d as i8) else {
                    continue;
                };
                if from.is_some_and(|f| date < f) || to.is_some_and(|t| date > t) {
                    continue;
                }
                days.push((date, dpath));
            }
        }
    }
    Ok(days)
}

/// A bundle directory in the date tree.
#[derive(Clone, Debug)]
pub(super) struct BundleDir {
    pub date: Date,
    pub name: String,
    pub path: PathBuf,
    /// None for a real directory; otherwise what the entry is instead (never followed).
    pub not_a_dir: Option<&'static str>,
}

/// The bundle entries of one day, by name. Hidden entries are never the
/// writer's: they go to `strays` (a bundle renamed to hide it).
fn bundles_in_day_noting(
    date: Date,
    day: &Path,
    strays: &mut Vec<Stray>,
) -> Result<Vec<BundleDir>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(day).map_err(io_err(day))? {
        let entry = entry.map_err(io_err(day))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry_kind(&entry).map_err(io_err(&entry.path()))?;
        if name.starts_with('.') {
            strays.push(Stray {
                path: entry.path(),
                what: format!(
                    "is a hidden entry ({}) in a day directory; the writer never makes one (a bundle renamed to hide it?)",
                    type_name(kind)
                ),
            });
            continue;
        }
        out.push(BundleDir {
            date,
            name,
            path: entry.path(),
            not_a_dir: (!kind.is_dir()).then(|| type_name(kind)),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The bundle directories of one day (real directories only), by name.
pub(super) fn bundles_in_day(date: Date, day: &Path) -> Result<Vec<BundleDir>> {
    Ok(bundles_in_day_noting(date, day, &mut Vec::new())?
        .into_iter()
        .filter(|b| b.not_a_dir.is_none())
        .collect())
}

/// Every bundle directory in the store (real directories only), oldest day first.
pub(super) fn all_bundles(root: &Path) -> Result<Vec<BundleDir>> {
    let mut out = Vec::new();
    for (date, day) in day_dirs(root, None, None)? {
        out.extend(bundles_in_day(date, &day)?);
    }
    Ok(out)
}

/// Every entry of the date tree, with whatever in it is not the writer's.
pub(super) fn walk(root: &Path) -> Result<(Vec<BundleDir>, Vec<Stray>)> {
    let mut strays = Vec::new();
    let mut out = Vec::new();
    for (date, day) in day_dirs_noting(root, None, None, &mut strays)? {
        out.extend(bundles_in_day_noting(date, &day, &mut strays)?);
    }
    Ok((out, strays))
}

/// The record of the newest committed bundle, and of bundles being written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct HeadRecord {
    pub seq: u64,
    pub hash: Option<String>,
    pub bundle_id: Option<String>,
    /// Day directory of the head bundle (new bundles never go to an earlier day).
    pub date: Option<Date>,
    /// Bundles of a write in progress, in seq order; each counts as committed
    /// once its directory exists.
    #[serde(default)]
    pub pending: Vec<PendingBundle>,
    /// The newest committed bundles, oldest first (at most RECENT_LINKS).
    #[serde(default)]
    pub recent: Vec<RecentLink>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct RecentLink {
    pub seq: u64,
    pub hash: String,
    pub bundle_id: String,
}

impl HeadRecord {
    /// Makes `p` the committed head.
    pub fn commit(&mut self, p: &PendingBundle) {
        self.seq = p.seq;
        self.hash = Some(p.hash.clone());
        self.bundle_id = Some(p.bundle_id.clone());
        self.date = Some(p.date);
        self.recent.retain(|r| r.seq < p.seq);
        self.recent.push(RecentLink {
            seq: p.seq,
            hash: p.hash.clone(),
            bundle_id: p.bundle_id.clone(),
        });
        let excess = self.recent.len().saturating_sub(RECENT_LINKS);
        self.recent.drain(..excess);
    }

    /// Path of the head bundle's bundle.json below the store root.
    pub fn head_bundle_file(&self) -> Option<PathBuf> {
        match (&self.bundle_id, self.date) {
            (Some(id), Some(date)) => Some(day_path(date).join(id).join(BUNDLE_FILE)),
            _ => None,
        }
    }
}

/// `.chain-head.json` on disk: the record's exact JSON text and the store
/// key's Ed25519 signature over it, so that a head record cannot be forged or
/// edited without the signing key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedHead {
    head: Box<RawValue>,
    /// Hex of the 64-byte signature over the bytes of `head`.
    signature: String,
}

/// The head record as found on disk.
#[derive(Debug)]
pub(super) enum HeadState {
    Missing,
    /// Present but not a valid signed head record; the reason.
    Unreadable(String),
    Valid(HeadRecord),
}

/// Reads and checks `.chain-head.json` in the store opened as `root`.
pub(super) fn read_head(root: impl AsFd, key: &VerifyingKey) -> HeadState {
    let bytes = match fsafe::read_capped_at(root, HEAD_FILE, MAX_HEAD_BYTES) {
        Ok(b) => b,
        Err(ReadFailure::NotFound) => return HeadState::Missing,
        Err(e) => return HeadState::Unreadable(format!("{HEAD_FILE} cannot be read: {e}")),
    };
    let signed: SignedHead = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return HeadState::Unreadable(format!("{HEAD_FILE} is not a signed head record ({e})"));
        }
    };
    let mut sig = [0u8; 64];
    if hex::decode_to_slice(&signed.signature, &mut sig).is_err()
        || key.verify(signed.head.get().as_bytes(), &sig).is_err()
    {
        return HeadState::Unreadable(format!(
            "{HEAD_FILE} is not signed by this store's key {} (edited, forged or from another store)",
            key.fingerprint()
        ));
    }
    match serde_json::from_str::<HeadRecord>(signed.head.get()) {
        Ok(r) => HeadState::Valid(r),
        Err(e) => HeadState::Unreadable(format!("{HEAD_FILE} holds no valid head record ({e})")),
    }
}

/// The signed form of `head`, as written to `.chain-head.json`.
pub(super) fn encode_head(head: &HeadRecord, key: &SigningKey) -> serde_json::Result<Vec<u8>> {
    let text = serde_json::to_string(head)?;
    let signature = hex::encode(key.sign(text.as_bytes()));
    let head = RawValue::from_string(text)?;
    serde_json::to_vec(&SignedHead { head, signature })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct PendingBundle {
    pub seq: u64,
    pub hash: String,
    pub bundle_id: String,
    pub date: Date,
}

impl PendingBundle {
    pub fn rel_path(&self) -> PathBuf {
        day_path(self.date).join(&self.bundle_id)
    }
}
