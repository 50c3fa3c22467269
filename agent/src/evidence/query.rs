//! Reading the store: find a bundle, list with filters, statistics.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::fsafe::{self, ReadFailure};
use super::layout::{BUNDLE_FILE, SIGNATURE_FILE, all_bundles, bundles_in_day, day_dirs};
use super::{Bundle, Check, EvidenceError, MAX_BUNDLE_BYTES, Outcome, Result, io_err};
use crate::crypto::VerifyingKey;

fn read_bundle(dir: &Path) -> Result<(Bundle, u64)> {
    let path = dir.join(BUNDLE_FILE);
    let bytes = fsafe::read_capped(&path, MAX_BUNDLE_BYTES).map_err(|e| match e {
        ReadFailure::NotFound | ReadFailure::Io(_) => io_err(&path)(e.into()),
        other => EvidenceError::Corrupt {
            path: path.clone(),
            message: other.to_string(),
        },
    })?;
    let bundle = serde_json::from_slice(&bytes).map_err(|e| EvidenceError::Corrupt {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let sig_len = fs::symlink_metadata(dir.join(SIGNATURE_FILE)).map_or(0, |m| m.len());
    Ok((bundle, bytes.len() as u64 + sig_len))
}

/// The bundle with this id, and its directory.
pub fn find(root: &Path, bundle_id: &str) -> Result<(Bundle, PathBuf)> {
    if bundle_id.is_empty() || bundle_id.contains('/') || bundle_id.starts_with('.') {
        return Err(EvidenceError::Invalid(format!(
            "{bundle_id:?} is not a bundle id"
        )));
    }
    // Newest first: recent bundles are the ones usually asked for.
    for (_, day) in day_dirs(root, None, None)?.into_iter().rev() {
        let dir = day.join(bundle_id);
        // A link in the date tree is never followed.
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            let (bundle, _) = read_bundle(&dir)?;
            return Ok((bundle, dir));
        }
    }
    Err(EvidenceError::NotFound(bundle_id.to_owned()))
}

/// A bundle directory found on disk, without reading it.
#[derive(Clone, Debug)]
pub struct BundleRef {
    pub bundle_id: String,
    pub dir: PathBuf,
}

/// Every bundle directory under `root`, oldest day first, without opening a
/// file: the upload queue reconciles against this at start-up.
pub fn bundle_refs(root: &Path) -> Result<Vec<BundleRef>> {
    Ok(all_bundles(root)?
        .into_iter()
        .map(|d| BundleRef {
            bundle_id: d.name,
            dir: d.path,
        })
        .collect())
}

/// Reads one bundle.json.
pub fn read(dir: &Path) -> Result<Bundle> {
    read_bundle(dir).map(|(b, _)| b)
}

#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub check: Option<Check>,
    pub outcome: Option<Outcome>,
    /// Bundles whose timestamp_end is at or after this instant.
    pub since: Option<Timestamp>,
    /// Bundles whose timestamp_end is before this instant.
    pub until: Option<Timestamp>,
    pub limit: Option<usize>,
}

/// One line of `evidence list`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub bundle_id: String,
    pub seq: u64,
    pub timestamp_end: Timestamp,
    pub check: Check,
    pub outcome: Outcome,
    pub hipaa_controls: Vec<String>,
    pub error: Option<String>,
    pub order_id: Option<String>,
    pub runbook_id: Option<String>,
    pub rollback_generation: Option<u64>,
    pub dir: PathBuf,
    /// Whether bundle.sig verifies over bundle.json: "valid", or why not;
    /// None when no key was given to check with.
    pub signature: Option<String>,
}

/// A bundle directory whose bundle.json cannot be read or parsed.
#[derive(Clone, Debug, Serialize)]
pub struct Unreadable {
    pub dir: PathBuf,
    pub reason: String,
}

/// What `evidence list` shows: the matching bundles, and every bundle that
/// could not be read (which the filter cannot be applied to, so it is never dropped).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Listing {
    pub items: Vec<Summary>,
    pub unreadable: Vec<Unreadable>,
}

/// Whether the bundle in `dir` carries a valid signature by `key`, in words.
fn signature_mark(dir: &Path, key: &VerifyingKey) -> String {
    match super::read_bundle_files(dir) {
        Ok((json, sig)) => match key.verify(&json, &sig) {
            Ok(()) => "valid".into(),
            Err(_) => format!("INVALID for key {}", key.fingerprint()),
        },
        Err(reason) => format!("INVALID: {reason}"),
    }
}

/// Bundles matching `filter`, newest first.
pub fn list(root: &Path, filter: &Filter) -> Result<Vec<Summary>> {
    Ok(list_checked(root, filter, None)?.items)
}

/// Bundles matching `filter`, newest first, each with its signature checked
/// against `key` when given, and every unreadable bundle named.
pub fn list_checked(root: &Path, filter: &Filter, key: Option<&VerifyingKey>) -> Result<Listing> {
    let mut unreadable = Vec::new();
    // A bundle is filed under its own UTC day or, after a clock step back, a later
    // one; never an earlier one. So `since` bounds the days read, `until` cannot.
    let from = filter.since.map(|t| t.to_zoned(TimeZone::UTC).date());
    let mut out = Vec::new();
    for (date, day) in day_dirs(root, from, None)?.into_iter().rev() {
        let mut day_items = Vec::new();
        for dir in bundles_in_day(date, &day)? {
            let b = match read_bundle(&dir.path) {
                Ok((b, _)) => b,
                Err(e) => {
                    unreadable.push(Unreadable {
                        dir: dir.path.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if filter.check.is_some_and(|c| c != b.check)
                || filter.outcome.is_some_and(|o| o != b.outcome)
                || filter.since.is_some_and(|s| b.timestamp_end < s)
                || filter.until.is_some_and(|u| b.timestamp_end >= u)
            {
                continue;
            }
            day_items.push(Summary {
                bundle_id: b.bundle_id,
                seq: b.seq,
                timestamp_end: b.timestamp_end,
                check: b.check,
                outcome: b.outcome,
                hipaa_controls: b.hipaa_controls,
                error: b.error,
                order_id: b.order_id,
                runbook_id: b.runbook_id,
                rollback_generation: b.rollback_generation,
                signature: key.map(|k| signature_mark(&dir.path, k)),
                dir: dir.path,
            });
        }
        day_items.sort_by_key(|s| std::cmp::Reverse(s.seq));
        out.extend(day_items);
        if filter.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.seq));
    if let Some(limit) = filter.limit {
        out.truncate(limit);
    }
    Ok(Listing {
        items: out,
        unreadable,
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub bundles: u64,
    pub bytes: u64,
    pub unreadable: u64,
    pub oldest: Option<Timestamp>,
    pub newest: Option<Timestamp>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// check -> outcome -> count
    pub by_check: BTreeMap<String, BTreeMap<String, u64>>,
}

pub fn stats(root: &Path) -> Result<Stats> {
    let mut s = Stats::default();
    for dir in all_bundles(root)? {
        let Ok((b, bytes)) = read_bundle(&dir.path) else {
            s.unreadable += 1;
            continue;
        };
        s.bundles += 1;
        s.bytes += bytes;
        s.oldest = Some(s.oldest.map_or(b.timestamp_end, |o| o.min(b.timestamp_end)));
        s.newest = Some(s.newest.map_or(b.timestamp_end, |n| n.max(b.timestamp_end)));
        s.first_seq = Some(s.first_seq.map_or(b.seq, |f| f.min(b.seq)));
        s.last_seq = Some(s.last_seq.map_or(b.seq, |l| l.max(b.seq)));
        *s.by_check
            .entry(b.check.as_str().to_owned())
            .or_default()
            .entry(b.outcome.as_str().to_owned())
            .or_default() += 1;
    }
    Ok(s)
}
