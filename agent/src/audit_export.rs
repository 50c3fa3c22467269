//! The auditor's package (`mcp-server export`) and its offline check
//! (`compliance-agent export verify`): the layout both sides share, and a verifier
//! that trusts only the keys it is given.
//!
//! ```text
//! README.md                 what to run, for the auditor
//! SHA256SUMS, SHA256SUMS.sig every other file's SHA-256, signed by the server's export key
//! export.json               site, period, log size, hosts (ExportInfo)
//! checkpoint.note           the log checkpoint every inclusion proof is against
//! assessment-results.json   OSCAL assessment results of the period
//! keys/export.pub.pem       the key SHA256SUMS.sig verifies with
//! keys/log.vkey             the transparency log's key (compare with log.vkey on a box)
//! hosts/HOST/signing.pub.pem the host's enrolled evidence key
//! hosts/HOST/report.json    what the server found of the host's chain (HostReport)
//! hosts/HOST/bundles/SEQ-ID/{bundle.json,bundle.sig,inclusion.json}
//! ```
//!
//! What the verifier proves, beyond each file's hash and the manifest's signature:
//! every bundle is signed by its host's key and proven in the log; each host's bundles
//! form one unbroken chain that starts before the period (or at seq 1) and ends after it
//! (or at the newest bundle the report names); every bundle in the period has its OSCAL
//! observation, with the bundle's hash. So an insider who holds the export key and
//! re-signs the manifest still cannot remove a bundle, change a byte or drop a proof.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crypto::{VerifyingKey, sha256, sha256_hex};
use crate::evidence::{BUNDLE_FILE, Bundle, MAX_BUNDLE_BYTES, SIGNATURE_FILE};
use crate::tlog::{BundleLeaf, Checkpoint, InclusionProof, LogVerifier};

pub const FORMAT: &str = "compliance-export/1";
pub const MANIFEST_FILE: &str = "SHA256SUMS";
pub const MANIFEST_SIG_FILE: &str = "SHA256SUMS.sig";
pub const INFO_FILE: &str = "export.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.note";
pub const OSCAL_FILE: &str = "assessment-results.json";
pub const README_FILE: &str = "README.md";
pub const EXPORT_KEY_FILE: &str = "keys/export.pub.pem";
pub const LOG_KEY_FILE: &str = "keys/log.vkey";
pub const HOSTS_DIR: &str = "hosts";
pub const HOST_KEY_FILE: &str = "signing.pub.pem";
pub const HOST_REPORT_FILE: &str = "report.json";
pub const BUNDLES_DIR: &str = "bundles";
pub const INCLUSION_FILE: &str = "inclusion.json";
/// The OSCAL property namespace of the bundle references.
pub const OSCAL_NS: &str = "https://compliance-agent.invalid/ns/oscal";
/// Largest file the verifier reads whole (the OSCAL document of a long period).
const MAX_FILE: u64 = 1 << 30;

/// `export.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportInfo {
    pub format: String,
    pub site_id: String,
    pub reseller_id: Option<String>,
    /// The period: bundles whose timestamp_end is in [from, to).
    pub from: Timestamp,
    pub to: Timestamp,
    pub created_at: Timestamp,
    pub created_by: String,
    pub log_origin: String,
    pub tree_size: u64,
    pub oscal_version: String,
    pub hosts: Vec<String>,
}

/// `hosts/HOST/report.json`: the server's view of one host's chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostReport {
    pub site_id: String,
    pub host_id: String,
    pub key_fingerprint: String,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// Bundles in the period.
    pub in_period: u64,
    /// Bundles exported (the period's, and one on each side of it where there is one).
    pub exported: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The host's newest seq on the server when the export was made.
    pub newest_seq: Option<u64>,
    /// The server's whole chain: contiguous from seq 1 through this seq.
    pub contiguous_through: Option<u64>,
    /// Missing seq ranges anywhere in the server's chain of this host.
    pub gaps: Vec<(u64, u64)>,
    /// Retention checkpoints in the export: seqs the box pruned from its own store
    /// (the server's archive keeps them).
    pub pruned_on_box: Vec<PrunedRange>,
    /// Bundles in the period per check and outcome.
    pub outcomes: BTreeMap<String, BTreeMap<String, u64>>,
    /// What the server could not export (an archive object missing or changed).
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrunedRange {
    pub checkpoint_seq: u64,
    pub from_seq: u64,
    pub through_seq: u64,
}

/// A bundle directory's name: the seq in 20 digits, a dash, the bundle id.
pub fn bundle_dir_name(seq: u64, bundle_id: &str) -> String {
    format!("{seq:020}-{bundle_id}")
}

/// The manifest's text: `HEX  PATH` lines (the `sha256sum` format), sorted by path.
pub fn manifest_text(files: &BTreeMap<String, [u8; 32]>) -> String {
    files
        .iter()
        .map(|(path, hash)| format!("{}  {path}\n", hex::encode(hash)))
        .collect()
}

fn parse_manifest(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let (hash, path) = line
            .split_once("  ")
            .ok_or_else(|| format!("{MANIFEST_FILE} line {}: not `HEX  PATH`", n + 1))?;
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "{MANIFEST_FILE} line {}: {hash:?} is not a SHA-256 in lowercase hex",
                n + 1
            ));
        }
        if !safe_relative(path) {
            return Err(format!(
                "{MANIFEST_FILE} line {}: {path:?} is not a plain relative path",
                n + 1
            ));
        }
        if out.insert(path.to_owned(), hash.to_owned()).is_some() {
            return Err(format!(
                "{MANIFEST_FILE} line {}: {path} is listed twice",
                n + 1
            ));
        }
    }
    Ok(out)
}

fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'))
}

/// What `export verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportVerifyReport {
    pub site_id: Option<String>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    pub export_key_fingerprint: Option<String>,
    /// Where the log key came from: the auditor's file, or the export itself.
    pub log_key_source: String,
    pub tree_size: Option<u64>,
    pub files: u64,
    pub hosts: Vec<HostVerified>,
    pub observations_checked: u64,
    pub problems: Vec<String>,
    /// Things to know that are not failures (a log key taken from the export itself).
    pub notes: Vec<String>,
}

impl ExportVerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HostVerified {
    pub host_id: String,
    pub key_fingerprint: String,
    pub bundles: u64,
    pub in_period: u64,
    pub signatures_valid: u64,
    pub proofs_valid: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(cap + 1).read_to_end(&mut data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() as u64 > cap {
        return Err(format!("{} is larger than {cap} bytes", path.display()));
    }
    Ok(data)
}

/// Every regular file under `root`, as relative paths; anything else is a problem.
fn walk(root: &Path, problems: &mut Vec<String>) -> Result<BTreeSet<String>, String> {
    let mut files = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                problems.push(format!(
                    "{} has a file name that is not UTF-8",
                    dir.display()
                ));
                continue;
            };
            let path = rel.join(name);
            let t = entry
                .file_type()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if t.is_dir() {
                stack.push(path);
            } else if t.is_file() {
                files.insert(path.to_string_lossy().into_owned());
            } else {
                problems.push(format!(
                    "{} is neither a file nor a directory (never followed)",
                    path.display()
                ));
            }
        }
    }
    Ok(files)
}

/// What the caller trusts: the log key (from a box) and optionally the export key.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    pub log_key: Option<LogVerifier>,
    pub export_key: Option<VerifyingKey>,
}

/// Checks an export directory offline. Errors only when the directory cannot be read
/// at all; everything wrong with its contents is a problem in the report.
pub fn verify(dir: &Path, trusted: &TrustedKeys) -> Result<ExportVerifyReport, String> {
    if !dir.is_dir() {
        return Err(format!("{} is not an export directory", dir.display()));
    }
    let mut r = ExportVerifyReport::default();
    let files = walk(dir, &mut r.problems)?;
    r.files = files.len() as u64;

    // 1. The manifest: signed, and listing exactly the files present, with their hashes.
    let export_key = match &trusted.export_key {
        Some(k) => {
            if let Ok(pem) = read_capped(&dir.join(EXPORT_KEY_FILE), 4096)
                && VerifyingKey::from_spki_pem(&String::from_utf8_lossy(&pem))
                    .map(|own| own.fingerprint())
                    != Ok(k.fingerprint())
            {
                r.problems.push(format!(
                    "{EXPORT_KEY_FILE} is not the export key you gave ({})",
                    k.fingerprint()
                ));
            }
            Some(*k)
        }
        None => match read_capped(&dir.join(EXPORT_KEY_FILE), 4096).and_then(|pem| {
            VerifyingKey::from_spki_pem(&String::from_utf8_lossy(&pem))
                .map_err(|e| format!("{EXPORT_KEY_FILE}: {e}"))
        }) {
            Ok(k) => Some(k),
            Err(e) => {
                r.problems.push(e);
                None
            }
        },
    };
    r.export_key_fingerprint = export_key.as_ref().map(VerifyingKey::fingerprint);
    let manifest = match read_capped(&dir.join(MANIFEST_FILE), MAX_FILE) {
        Ok(m) => m,
        Err(e) => {
            r.problems.push(format!("the manifest: {e}"));
            Vec::new()
        }
    };
    match (read_capped(&dir.join(MANIFEST_SIG_FILE), 4096), &export_key) {
        (Ok(sig), Some(key)) => {
            if let Err(e) = key.verify(&manifest, &sig) {
                r.problems.push(format!(
                    "{MANIFEST_SIG_FILE} does not verify with {}: {e}",
                    key.fingerprint()
                ));
            }
        }
        (Err(e), _) => r.problems.push(format!("the manifest's signature: {e}")),
        (Ok(_), None) => {}
    }
    let listed = match std::str::from_utf8(&manifest)
        .map_err(|_| format!("{MANIFEST_FILE} is not UTF-8"))
        .and_then(parse_manifest)
    {
        Ok(l) => l,
        Err(e) => {
            r.problems.push(e);
            BTreeMap::new()
        }
    };
    for path in &files {
        if path == MANIFEST_FILE || path == MANIFEST_SIG_FILE {
            continue;
        }
        match listed.get(path) {
            None => r.problems.push(format!(
                "{path} is not in the manifest (added after signing)"
            )),
            Some(want) => match read_capped(&dir.join(path), MAX_FILE) {
                Ok(bytes) if sha256_hex(&bytes) == *want => {}
                Ok(_) => r.problems.push(format!(
                    "{path} does not have the SHA-256 the manifest lists (changed)"
                )),
                Err(e) => r.problems.push(e),
            },
        }
    }
    for path in listed.keys() {
        if !files.contains(path) {
            r.problems
                .push(format!("{path} is in the manifest but missing (removed)"));
        }
    }

    // 2. The log key and the checkpoint.
    let own_log_key = read_capped(&dir.join(LOG_KEY_FILE), 4096)
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let verifier = match &trusted.log_key {
        Some(v) => {
            r.log_key_source = "given".into();
            if let Ok(own) = &own_log_key
                && *own != v.to_vkey()
            {
                r.problems.push(format!(
                    "{LOG_KEY_FILE} is not the log key you gave ({})",
                    v.to_vkey()
                ));
            }
            Some(v.clone())
        }
        None => {
            r.log_key_source = LOG_KEY_FILE.into();
            r.notes.push(format!(
                "the log key was taken from the export itself ({LOG_KEY_FILE}): compare it with log.vkey on one of the site's boxes, or pass --log-key"
            ));
            match own_log_key.and_then(|k| LogVerifier::from_vkey(&k).map_err(|e| e.to_string())) {
                Ok(v) => Some(v),
                Err(e) => {
                    r.problems.push(format!("{LOG_KEY_FILE}: {e}"));
                    None
                }
            }
        }
    };
    let checkpoint: Option<Checkpoint> =
        match (&verifier, read_capped(&dir.join(CHECKPOINT_FILE), 1 << 16)) {
            (Some(v), Ok(note)) => match v.verify(&note) {
                Ok(c) => Some(c),
                Err(e) => {
                    r.problems.push(format!("{CHECKPOINT_FILE}: {e}"));
                    None
                }
            },
            (_, Err(e)) => {
                r.problems.push(format!("the checkpoint: {e}"));
                None
            }
            (None, Ok(_)) => None,
        };
    r.tree_size = checkpoint.as_ref().map(|c| c.size);

    // 3. What the export says it is.
    let info: Option<ExportInfo> = match read_capped(&dir.join(INFO_FILE), 1 << 24)
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{INFO_FILE}: {e}")))
    {
        Ok(i) => Some(i),
        Err(e) => {
            r.problems.push(e);
            None
        }
    };
    let Some(info) = info else {
        return Ok(r);
    };
    if info.format != FORMAT {
        r.problems.push(format!(
            "{INFO_FILE} is format {:?}, this verifier reads {FORMAT:?}",
            info.format
        ));
    }
    if let Some(c) = &checkpoint
        && c.size != info.tree_size
    {
        r.problems.push(format!(
            "{INFO_FILE} names tree size {} but {CHECKPOINT_FILE} is of size {}",
            info.tree_size, c.size
        ));
    }
    r.site_id = Some(info.site_id.clone());
    r.from = Some(info.from);
    r.to = Some(info.to);

    // 4. Each host: keys, signatures, proofs, the chain.
    let mut in_period_hashes: BTreeMap<String, String> = BTreeMap::new();
    let mut exported_hashes: BTreeMap<String, String> = BTreeMap::new();
    let mut host_dirs: BTreeSet<String> = BTreeSet::new();
    for path in &files {
        if let Some(rest) = path.strip_prefix("hosts/")
            && let Some((host, _)) = rest.split_once('/')
        {
            host_dirs.insert(host.to_owned());
        }
    }
    let declared: BTreeSet<String> = info.hosts.iter().cloned().collect();
    for extra in host_dirs.difference(&declared) {
        r.problems.push(format!(
            "hosts/{extra} is in the export but not among the hosts {INFO_FILE} lists"
        ));
    }
    for host in &info.hosts {
        let h = verify_host(
            dir,
            &info,
            host,
            &files,
            checkpoint.as_ref(),
            &mut r.problems,
            &mut in_period_hashes,
            &mut exported_hashes,
        );
        r.hosts.push(h);
    }

    // 5. The OSCAL document refers to every bundle of the period, by hash.
    r.observations_checked =
        verify_oscal(dir, &in_period_hashes, &exported_hashes, &mut r.problems);
    Ok(r)
}

/// A bundle of the chain: seq, bundle id, hash, prev_hash, timestamp_end.
type Link = (u64, String, [u8; 32], Option<String>, Timestamp);

#[allow(clippy::too_many_arguments)]
fn verify_host(
    dir: &Path,
    info: &ExportInfo,
    host: &str,
    files: &BTreeSet<String>,
    checkpoint: Option<&Checkpoint>,
    problems: &mut Vec<String>,
    in_period_hashes: &mut BTreeMap<String, String>,
    exported_hashes: &mut BTreeMap<String, String>,
) -> HostVerified {
    let mut v = HostVerified {
        host_id: host.to_owned(),
        ..HostVerified::default()
    };
    let base = format!("{HOSTS_DIR}/{host}");
    let key = match read_capped(&dir.join(&base).join(HOST_KEY_FILE), 4096).and_then(|pem| {
        VerifyingKey::from_spki_pem(&String::from_utf8_lossy(&pem))
            .map_err(|e| format!("{base}/{HOST_KEY_FILE}: {e}"))
    }) {
        Ok(k) => Some(k),
        Err(e) => {
            problems.push(e);
            None
        }
    };
    v.key_fingerprint = key
        .as_ref()
        .map(VerifyingKey::fingerprint)
        .unwrap_or_default();
    let report: Option<HostReport> =
        match read_capped(&dir.join(&base).join(HOST_REPORT_FILE), 1 << 24).and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("{base}/{HOST_REPORT_FILE}: {e}"))
        }) {
            Ok(rep) => Some(rep),
            Err(e) => {
                problems.push(e);
                None
            }
        };

    // The bundle directories, from the files present (a directory emptied of its
    // files is as gone as a removed one).
    let prefix = format!("{base}/{BUNDLES_DIR}/");
    let mut names: BTreeSet<String> = BTreeSet::new();
    for f in files.range(prefix.clone()..) {
        let Some(rest) = f.strip_prefix(&prefix) else {
            break;
        };
        if let Some((name, _)) = rest.split_once('/') {
            names.insert(name.to_owned());
        }
    }
    let mut chain: Vec<Link> = Vec::new();
    for name in &names {
        let at = format!("{prefix}{name}");
        let what = |m: String| format!("{at}: {m}");
        let Some((seq_text, id)) = name.split_once('-') else {
            problems.push(what("is not named SEQ-BUNDLE_ID".into()));
            continue;
        };
        let Ok(dir_seq) = seq_text.parse::<u64>() else {
            problems.push(what("is not named SEQ-BUNDLE_ID".into()));
            continue;
        };
        let json = match read_capped(&dir.join(&at).join(BUNDLE_FILE), MAX_BUNDLE_BYTES) {
            Ok(j) => j,
            Err(e) => {
                problems.push(what(format!("{BUNDLE_FILE}: {e}")));
                continue;
            }
        };
        v.bundles += 1;
        let hash = sha256(&json);
        match (&key, read_capped(&dir.join(&at).join(SIGNATURE_FILE), 4096)) {
            (Some(k), Ok(sig)) => match k.verify(&json, &sig) {
                Ok(()) => v.signatures_valid += 1,
                Err(e) => problems.push(what(format!(
                    "{SIGNATURE_FILE} does not verify with the host's key {}: {e}",
                    k.fingerprint()
                ))),
            },
            (_, Err(e)) => problems.push(what(format!("{SIGNATURE_FILE}: {e}"))),
            (None, Ok(_)) => {}
        }
        let bundle: Bundle = match serde_json::from_slice(&json) {
            Ok(b) => b,
            Err(e) => {
                problems.push(what(format!("{BUNDLE_FILE} is not a bundle: {e}")));
                continue;
            }
        };
        if bundle.seq != dir_seq || bundle.bundle_id != id {
            problems.push(what(format!(
                "holds bundle {} seq {}, not the one its name says",
                bundle.bundle_id, bundle.seq
            )));
        }
        if bundle.site_id != info.site_id || bundle.host_id != host {
            problems.push(what(format!(
                "is a bundle of {}/{}, not of {}/{host}",
                bundle.site_id, bundle.host_id, info.site_id
            )));
        }
        if let Some(k) = &key
            && bundle.signing_key_fingerprint != k.fingerprint()
        {
            problems.push(what(format!(
                "names signing key {} but the host's enrolled key is {}",
                bundle.signing_key_fingerprint,
                k.fingerprint()
            )));
        }
        // The log proof of exactly these bytes.
        match read_capped(&dir.join(&at).join(INCLUSION_FILE), 1 << 16).and_then(|b| {
            serde_json::from_slice::<InclusionProof>(&b)
                .map_err(|e| format!("{INCLUSION_FILE} is not an inclusion proof: {e}"))
        }) {
            Ok(proof) => {
                let leaf = BundleLeaf {
                    site_id: bundle.site_id.clone(),
                    host_id: bundle.host_id.clone(),
                    seq: bundle.seq,
                    bundle_id: bundle.bundle_id.clone(),
                    bundle_sha256: hash,
                };
                match (leaf.hash(), checkpoint) {
                    (Ok(lh), Some(c)) => match proof.verify(&lh, c) {
                        Ok(()) => v.proofs_valid += 1,
                        Err(e) => problems.push(what(format!(
                            "the inclusion proof does not prove this bundle in the checkpoint: {e}"
                        ))),
                    },
                    (Err(e), _) => problems.push(what(format!("no log leaf: {e}"))),
                    (Ok(_), None) => {}
                }
            }
            Err(e) => problems.push(what(format!("no inclusion proof: {e}"))),
        }
        let in_period = bundle.timestamp_end >= info.from && bundle.timestamp_end < info.to;
        let rel = format!("{at}/{BUNDLE_FILE}");
        if in_period {
            v.in_period += 1;
            in_period_hashes.insert(rel.clone(), hex::encode(hash));
        }
        exported_hashes.insert(rel, hex::encode(hash));
        chain.push((
            bundle.seq,
            bundle.bundle_id,
            hash,
            bundle.prev_hash,
            bundle.timestamp_end,
        ));
    }
    chain.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    v.first_seq = chain.first().map(|c| c.0);
    v.last_seq = chain.last().map(|c| c.0);
    for pair in chain.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.0 == a.0 {
            problems.push(format!(
                "{base}: two bundles with seq {} ({} and {}): a forked chain",
                a.0, a.1, b.1
            ));
        } else if b.0 != a.0 + 1 {
            problems.push(format!(
                "{base}: seq {}..{} are missing between bundles {} and {} (removed, or never received: see {HOST_REPORT_FILE})",
                a.0 + 1,
                b.0 - 1,
                a.1,
                b.1
            ));
        } else if b.3.as_deref() != Some(hex::encode(a.2).as_str()) {
            problems.push(format!(
                "{base}: bundle {} (seq {}) does not name bundle {} (seq {}) as its predecessor: the chain is broken",
                b.1, b.0, a.1, a.0
            ));
        }
    }
    // The ends: nothing of the period can hide before the first or after the last.
    if let Some(first) = chain.first()
        && first.0 != 1
        && first.4 >= info.from
    {
        problems.push(format!(
            "{base}: the first exported bundle (seq {}) is in the period but is not seq 1, and no earlier bundle shows where the period starts",
            first.0
        ));
    }
    if let Some(last) = chain.last()
        && last.4 < info.to
    {
        match report.as_ref().and_then(|r| r.newest_seq) {
            Some(newest) if newest == last.0 => {}
            other => problems.push(format!(
                "{base}: the last exported bundle (seq {}) is in the period but neither a later bundle nor the report ({}) shows it is the newest",
                last.0,
                other.map_or("no newest seq".into(), |n| format!("newest seq {n}"))
            )),
        }
    }
    if let Some(rep) = &report {
        if rep.host_id != host || rep.site_id != info.site_id {
            problems.push(format!(
                "{base}/{HOST_REPORT_FILE} is the report of {}/{}",
                rep.site_id, rep.host_id
            ));
        }
        if rep.exported != v.bundles || rep.in_period != v.in_period {
            problems.push(format!(
                "{base}/{HOST_REPORT_FILE} counts {} bundles ({} in the period) but the export holds {} ({} in the period)",
                rep.exported, rep.in_period, v.bundles, v.in_period
            ));
        }
        if !v.key_fingerprint.is_empty() && rep.key_fingerprint != v.key_fingerprint {
            problems.push(format!(
                "{base}/{HOST_REPORT_FILE} names key {} but {HOST_KEY_FILE} is {}",
                rep.key_fingerprint, v.key_fingerprint
            ));
        }
    }
    v
}

fn verify_oscal(
    dir: &Path,
    in_period: &BTreeMap<String, String>,
    exported: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> u64 {
    let doc: serde_json::Value = match read_capped(&dir.join(OSCAL_FILE), MAX_FILE)
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{OSCAL_FILE}: {e}")))
    {
        Ok(d) => d,
        Err(e) => {
            problems.push(e);
            return 0;
        }
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut checked = 0;
    let results = doc["assessment-results"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if results.is_empty() {
        problems.push(format!("{OSCAL_FILE} has no results"));
    }
    for result in &results {
        for obs in result["observations"].as_array().into_iter().flatten() {
            checked += 1;
            for ev in obs["relevant-evidence"].as_array().into_iter().flatten() {
                let Some(href) = ev["href"].as_str() else {
                    continue;
                };
                let claimed = ev["props"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == "bundle-sha256" && p["ns"] == OSCAL_NS)
                    .and_then(|p| p["value"].as_str());
                match (exported.get(href), claimed) {
                    (Some(actual), Some(c)) if c == actual => {
                        seen.insert(href.to_owned());
                    }
                    (Some(_), Some(c)) => problems.push(format!(
                        "{OSCAL_FILE}: observation {} names hash {c} for {href}, which is not that bundle's",
                        obs["uuid"]
                    )),
                    (Some(_), None) => problems.push(format!(
                        "{OSCAL_FILE}: observation {} refers to {href} without its bundle-sha256",
                        obs["uuid"]
                    )),
                    (None, _) => problems.push(format!(
                        "{OSCAL_FILE}: observation {} refers to {href}, which is not a bundle of the export",
                        obs["uuid"]
                    )),
                }
            }
        }
    }
    for path in in_period.keys() {
        if !seen.contains(path) {
            problems.push(format!(
                "{OSCAL_FILE} has no observation of {path}, a bundle of the period"
            ));
        }
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lines_round_trip_and_bad_lines_are_named() {
        let mut files = BTreeMap::new();
        files.insert("a/b.json".to_owned(), [1u8; 32]);
        files.insert("README.md".to_owned(), [2u8; 32]);
        let text = manifest_text(&files);
        let parsed = parse_manifest(&text).expect("parses");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed["a/b.json"], hex::encode([1u8; 32]));
        for (bad, why) in [
            ("abc  x\n", "not a SHA-256"),
            (
                &format!("{}  ../x\n", "0".repeat(64)) as &str,
                "plain relative",
            ),
            (
                &format!("{}  /etc/passwd\n", "0".repeat(64)),
                "plain relative",
            ),
            (&format!("{} x\n", "0".repeat(64)), "HEX  PATH"),
            (
                &format!("{h}  x\n{h}  x\n", h = "0".repeat(64)),
                "listed twice",
            ),
        ] {
            let e = parse_manifest(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
