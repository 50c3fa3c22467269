//! On-disk layout of an evidence store: `YYYY/MM/DD/<bundle_id>/bundle.{json,sig}`, the head record, the lock.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use super::{Result, io_err};

pub const BUNDLE_FILE: &str = "bundle.json";
pub const SIGNATURE_FILE: &str = "bundle.sig";
pub(super) const LOCK_FILE: &str = ".lock";
pub(super) const HEAD_FILE: &str = ".chain-head.json";
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

/// A bundle directory in the date tree.
#[derive(Clone, Debug)]
pub(super) struct BundleDir {
    pub date: Date,
    pub name: String,
    pub path: PathBuf,
}

fn numeric_entries(dir: &Path, width: usize) -> Result<Vec<(i16, PathBuf)>> {
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
            out.push((n, entry.path()));
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
    let mut days = Vec::new();
    for (y, ypath) in numeric_entries(root, 4)? {
        if from.is_some_and(|f| y < f.year()) || to.is_some_and(|t| y > t.year()) {
            continue;
        }
        for (m, mpath) in numeric_entries(&ypath, 2)? {
            for (d, dpath) in numeric_entries(&mpath, 2)? {
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

/// The bundle directories of one day, by name; hidden entries are skipped.
pub(super) fn bundles_in_day(date: Date, day: &Path) -> Result<Vec<BundleDir>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(day).map_err(io_err(day))? {
        let entry = entry.map_err(io_err(day))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        out.push(BundleDir {
            date,
            name,
            path: entry.path(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Every bundle directory in the store, oldest day first.
pub(super) fn all_bundles(root: &Path) -> Result<Vec<BundleDir>> {
    let mut out = Vec::new();
    for (date, day) in day_dirs(root, None, None)? {
        out.extend(bundles_in_day(date, &day)?);
    }
    Ok(out)
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

/// Writes `data` to `path` through a temp file and a rename. `durable` adds
/// fsync of the file before the rename.
pub(super) fn replace_file(path: &Path, data: &[u8], durable: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    if durable {
        file.sync_all().map_err(io_err(&tmp))?;
    }
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(super) fn fsync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path))
}
