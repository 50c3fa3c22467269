//! `mcp-server export`: what an auditor takes away for one site and period. Every bundle
//! and signature of the site's hosts in the period (and one on each side of it, so the
//! chain shows where the period starts and ends), each host's enrolled key and a report
//! of its chain, the log checkpoint and an inclusion proof per bundle, the OSCAL
//! assessment results, a README, and a manifest of every file's SHA-256 signed with the
//! server's export key. The layout and its verifier are the agent crate's
//! [`compliance_agent::audit_export`]: `compliance-agent export verify DIR`.
//!
//! The export is assembled in a hidden directory beside `--out` and renamed into place
//! whole: a failed export leaves no directory that looks complete.

pub mod oscal;
mod readme;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use compliance_agent::audit_export::{
    self as format, ExportInfo, HostReport, PrunedRange, bundle_dir_name,
};
use compliance_agent::crypto::{SigningKey, sha256};
use compliance_agent::evidence::{BUNDLE_FILE, Bundle, Check, SIGNATURE_FILE};
use jiff::Timestamp;
use serde::Serialize;

use crate::archive::ArchiveKey;
use crate::auth::Caller;
use crate::services::Services;
use crate::store::evidence_query::{EvidenceFilter, MAX_EVIDENCE_PAGE};
use crate::store::tlog::LeafLookup;
use crate::store::{BundleRecord, Host, Site};
use crate::{Error, Result};

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportRequest {
    pub site_id: String,
    /// Bundles whose timestamp_end is in [from, to).
    pub from: Timestamp,
    pub to: Timestamp,
    /// Must not exist yet; created whole.
    pub out: PathBuf,
}

/// What an export holds (printed by the CLI).
#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub site_id: String,
    pub hosts: usize,
    pub bundles: u64,
    pub in_period: u64,
    pub files: usize,
    pub tree_size: u64,
    pub export_key_fingerprint: String,
    /// Things the server found wrong while exporting (also in each host's report).
    pub problems: Vec<String>,
}

/// One exported bundle, as the OSCAL document and the reports need it.
pub struct ExportedBundle {
    pub host_id: String,
    /// Relative path of its bundle.json in the export.
    pub href: String,
    pub sha256: String,
    pub bundle: Bundle,
    pub in_period: bool,
}

/// A date (midnight UTC) or an RFC 3339 time.
pub fn parse_when(flag: &str, text: &str) -> Result<Timestamp> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{flag} {text:?} is neither a date (2026-11-01) nor an RFC 3339 time (2026-11-01T00:00:00Z)"
            ))
        })
}

/// The export directory `dir` as a tar archive whose entries sit under `top/`.
pub fn tar(dir: &Path, top: &str) -> Result<Vec<u8>> {
    let mut b = ::tar::Builder::new(Vec::new());
    b.mode(::tar::HeaderMode::Deterministic);
    b.append_dir_all(top, dir).map_err(Error::io(dir))?;
    b.into_inner().map_err(Error::io(dir))
}

/// Loads the export key, making it (and its public key) on first use.
pub fn export_key(svc: &Services) -> Result<SigningKey> {
    let (key_path, pub_path) = (&svc.paths.export_key, &svc.paths.export_pubkey);
    let key = if key_path.exists() {
        SigningKey::load(key_path)?
    } else {
        let key = SigningKey::generate();
        crate::write_durable(key_path, key.to_pkcs8_pem()?.as_bytes(), 0o600)?;
        key
    };
    let pem = key.verifying_key().to_spki_pem()?;
    if std::fs::read_to_string(pub_path).ok().as_deref() != Some(pem.as_str()) {
        crate::write_durable(pub_path, pem.as_bytes(), 0o644)?;
    }
    Ok(key)
}

/// Files of the export being assembled, with their hashes for the manifest.
struct Assembly {
    root: PathBuf,
    files: BTreeMap<String, [u8; 32]>,
}

impl Assembly {
    fn put(&mut self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        crate::write_new_synced(&path, bytes, 0o444)?;
        self.files.insert(rel.to_owned(), sha256(bytes));
        Ok(())
    }

    fn put_json(&mut self, rel: &str, v: &impl Serialize) -> Result<()> {
        let mut bytes =
            serde_json::to_vec_pretty(v).map_err(|e| Error::Invalid(format!("{rel}: {e}")))?;
        bytes.push(b'\n');
        self.put(rel, &bytes)
    }

    /// Fsyncs every directory, deepest first, so the renamed export is durable whole.
    fn sync_dirs(&self) -> Result<()> {
        let mut dirs: Vec<PathBuf> = self
            .files
            .keys()
            .filter_map(|rel| Path::new(rel).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            crate::sync_dir(&self.root.join(d))?;
        }
        crate::sync_dir(&self.root)
    }
}

fn parse_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid(e.to_string())
}

/// The records of one host whose seqs are in `lo..=hi`, in seq order.
fn records_between(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    lo: u64,
    hi: u64,
) -> Result<Vec<BundleRecord>> {
    let mut out = Vec::new();
    let mut before = hi.checked_add(1);
    loop {
        let page = svc.store.evidence(
            caller,
            &EvidenceFilter {
                site_id: host.site_id.clone(),
                host_id: host.host_id.clone(),
                check: None,
                outcome: None,
                since: None,
                until: None,
                before_seq: before,
                limit: MAX_EVIDENCE_PAGE,
            },
        )?;
        let full = page.len() == MAX_EVIDENCE_PAGE as usize;
        let mut reached = false;
        for r in page {
            before = Some(r.seq);
            if r.seq < lo {
                reached = true;
                break;
            }
            out.push(r);
        }
        if reached || !full || before == Some(lo) {
            break;
        }
    }
    out.reverse();
    Ok(out)
}

/// The lowest and highest seq of the host's bundles in the period.
fn period_span(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    req: &ExportRequest,
) -> Result<Option<(u64, u64)>> {
    let mut span: Option<(u64, u64)> = None;
    let mut before = None;
    loop {
        let page = svc.store.evidence(
            caller,
            &EvidenceFilter {
                site_id: host.site_id.clone(),
                host_id: host.host_id.clone(),
                check: None,
                outcome: None,
                since: Some(req.from),
                until: Some(req.to),
                before_seq: before,
                limit: MAX_EVIDENCE_PAGE,
            },
        )?;
        for r in &page {
            span = Some(match span {
                None => (r.seq, r.seq),
                Some((lo, hi)) => (lo.min(r.seq), hi.max(r.seq)),
            });
        }
        if page.len() < MAX_EVIDENCE_PAGE as usize {
            return Ok(span);
        }
        before = page.last().map(|r| r.seq);
    }
}

/// Builds the export for `caller`, who must see the site. Audited either way.
pub fn export(svc: &Services, caller: &Caller, req: &ExportRequest) -> Result<ExportSummary> {
    let target = format!("{} {}..{}", req.site_id, req.from, req.to);
    let r = build(svc, caller, req);
    let refused = match &r {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    crate::audit::record(
        &*svc.store,
        caller,
        "site.export",
        &target,
        refused.as_deref(),
    );
    r
}

fn build(svc: &Services, caller: &Caller, req: &ExportRequest) -> Result<ExportSummary> {
    if req.from >= req.to {
        return Err(Error::Invalid(format!(
            "the period is empty: --from {} is not before --to {}",
            req.from, req.to
        )));
    }
    let site: Site = svc.store.site(caller, &req.site_id)?.ok_or_else(|| {
        Error::Invalid(format!(
            "no site {} among the sites you may see",
            req.site_id
        ))
    })?;
    if req.out.exists() {
        return Err(Error::Invalid(format!(
            "{} exists; an export is written to a new directory",
            req.out.display()
        )));
    }
    let parent = match req.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory to write the export in",
            parent.display()
        )));
    }
    let key = export_key(svc)?;
    // Everything accepted so far goes into the log first, so every bundle has a proof.
    crate::tlog::sequence(&*svc.store, &svc.log).map_err(parse_error)?;
    let (log, checkpoint) = crate::tlog::stored_log(&*svc.store).map_err(parse_error)?;

    let mut hosts: Vec<Host> = svc
        .store
        .hosts(caller)?
        .into_iter()
        .filter(|h| h.site_id == site.site_id)
        .collect();
    hosts.sort_by(|a, b| a.host_id.cmp(&b.host_id));

    let tmp = parent.join(format!(
        ".export-{}-{}",
        site.site_id,
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    let mut asm = Assembly {
        root: tmp.clone(),
        files: BTreeMap::new(),
    };
    let result = (|| -> Result<ExportSummary> {
        let mut exported: Vec<ExportedBundle> = Vec::new();
        let mut problems = Vec::new();
        for host in &hosts {
            let report = export_host(
                svc,
                caller,
                host,
                req,
                &log,
                checkpoint.tree_size,
                &mut asm,
                &mut exported,
            )?;
            problems.extend(
                report
                    .problems
                    .iter()
                    .map(|p| format!("{}/{}: {p}", host.site_id, host.host_id)),
            );
        }
        let info = ExportInfo {
            format: format::FORMAT.into(),
            site_id: site.site_id.clone(),
            reseller_id: site.reseller_id.clone(),
            from: req.from,
            to: req.to,
            created_at: Timestamp::now(),
            created_by: caller.actor.clone(),
            log_origin: svc.log.origin().to_owned(),
            tree_size: checkpoint.tree_size,
            oscal_version: oscal::OSCAL_VERSION.into(),
            hosts: hosts.iter().map(|h| h.host_id.clone()).collect(),
        };
        asm.put_json(format::INFO_FILE, &info)?;
        asm.put(format::CHECKPOINT_FILE, checkpoint.note.as_bytes())?;
        asm.put(
            format::LOG_KEY_FILE,
            format!("{}\n", svc.log.vkey()).as_bytes(),
        )?;
        let export_pem = key.verifying_key().to_spki_pem()?;
        asm.put(format::EXPORT_KEY_FILE, export_pem.as_bytes())?;
        let doc = oscal::assessment_results(&info, &exported);
        asm.put_json(format::OSCAL_FILE, &doc)?;
        asm.put(
            format::README_FILE,
            readme::text(&info, &key.verifying_key().fingerprint(), &svc.log.vkey()).as_bytes(),
        )?;
        let manifest = format::manifest_text(&asm.files);
        let files = asm.files.len() + 2;
        crate::write_new_synced(&tmp.join(format::MANIFEST_FILE), manifest.as_bytes(), 0o444)?;
        crate::write_new_synced(
            &tmp.join(format::MANIFEST_SIG_FILE),
            &key.sign(manifest.as_bytes()),
            0o444,
        )?;
        asm.sync_dirs()?;
        Ok(ExportSummary {
            out: req.out.clone(),
            site_id: site.site_id.clone(),
            hosts: hosts.len(),
            bundles: exported.len() as u64,
            in_period: exported.iter().filter(|b| b.in_period).count() as u64,
            files,
            tree_size: checkpoint.tree_size,
            export_key_fingerprint: key.verifying_key().fingerprint(),
            problems,
        })
    })();
    match result {
        Ok(summary) => {
            std::fs::rename(&tmp, &req.out).map_err(Error::io(&req.out))?;
            crate::sync_dir(&parent)?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn export_host(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    req: &ExportRequest,
    log: &compliance_agent::tlog::Log<crate::tlog::StoredTree<'_>>,
    tree_size: u64,
    asm: &mut Assembly,
    exported: &mut Vec<ExportedBundle>,
) -> Result<HostReport> {
    let base = format!("{}/{}", format::HOSTS_DIR, host.host_id);
    asm.put(
        &format!("{base}/{}", format::HOST_KEY_FILE),
        host.evidence_pubkey_pem.as_bytes(),
    )?;
    let key = compliance_agent::crypto::VerifyingKey::from_spki_pem(&host.evidence_pubkey_pem)
        .map_err(|e| Error::Invalid(format!("{base}: the enrolled key: {e}")))?;
    let seqs = svc.store.seqs(caller, &host.site_id, &host.host_id)?;
    let (contiguous_through, mut gaps) = crate::fleet::chain_shape(&seqs);
    if let Some(&first) = seqs.first()
        && first > 1
    {
        gaps.insert(0, (1, first - 1));
    }
    let contiguous_through = if seqs.first() == Some(&1) {
        contiguous_through
    } else {
        None
    };
    let mut report = HostReport {
        site_id: host.site_id.clone(),
        host_id: host.host_id.clone(),
        key_fingerprint: key.fingerprint(),
        enrolled_at: host.enrolled_at,
        revoked_at: host.revoked_at,
        in_period: 0,
        exported: 0,
        first_seq: None,
        last_seq: None,
        newest_seq: seqs.last().copied(),
        contiguous_through,
        gaps,
        pruned_on_box: Vec::new(),
        outcomes: BTreeMap::new(),
        problems: Vec::new(),
    };
    if let Some((lo, hi)) = period_span(svc, caller, host, req)? {
        // One stored bundle on each side of the period, where there is one.
        let below = seqs.partition_point(|&s| s < lo);
        let lo = if below > 0 { seqs[below - 1] } else { lo };
        let above = seqs.partition_point(|&s| s <= hi);
        let hi = seqs.get(above).copied().unwrap_or(hi);
        for record in records_between(svc, caller, host, lo, hi)? {
            export_bundle(
                svc,
                caller,
                host,
                &record,
                req,
                log,
                tree_size,
                &base,
                asm,
                exported,
                &mut report,
            )?;
        }
    }
    asm.put_json(&format!("{base}/{}", format::HOST_REPORT_FILE), &report)?;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn export_bundle(
    svc: &Services,
    caller: &Caller,
    host: &Host,
    record: &BundleRecord,
    req: &ExportRequest,
    log: &compliance_agent::tlog::Log<crate::tlog::StoredTree<'_>>,
    tree_size: u64,
    base: &str,
    asm: &mut Assembly,
    exported: &mut Vec<ExportedBundle>,
    report: &mut HostReport,
) -> Result<()> {
    let name = bundle_dir_name(record.seq, &record.bundle_id);
    let dir = format!("{base}/{}/{name}", format::BUNDLES_DIR);
    let Some(archived) = svc.archive.get(&ArchiveKey::of(host, record))? else {
        report.problems.push(format!(
            "bundle {} (seq {}) is indexed but missing from the archive",
            record.bundle_id, record.seq
        ));
        return Ok(());
    };
    let hash = sha256(&archived.json);
    if hex::encode(hash) != record.hash {
        report.problems.push(format!(
            "bundle {} (seq {}): the archived bundle.json hashes to {}, the index holds {} (exported as archived)",
            record.bundle_id,
            record.seq,
            hex::encode(hash),
            record.hash
        ));
    }
    let bundle: Bundle = serde_json::from_slice(&archived.json).map_err(|e| {
        Error::Invalid(format!(
            "bundle {} in the archive is not a bundle: {e}",
            record.bundle_id
        ))
    })?;
    asm.put(&format!("{dir}/{BUNDLE_FILE}"), &archived.json)?;
    asm.put(&format!("{dir}/{SIGNATURE_FILE}"), &archived.sig)?;
    match svc.store.log_leaf(caller, &record.bundle_id)? {
        LeafLookup::Sequenced(leaf) if leaf.leaf_index < tree_size => {
            let proof = log
                .inclusion_proof(leaf.leaf_index, tree_size)
                .map_err(|e| Error::Invalid(format!("the log: {e}")))?;
            asm.put_json(&format!("{dir}/{}", format::INCLUSION_FILE), &proof)?;
        }
        LeafLookup::Sequenced(_) | LeafLookup::Pending => report.problems.push(format!(
            "bundle {} (seq {}) is not yet in the log's checkpoint of size {tree_size}",
            record.bundle_id, record.seq
        )),
        LeafLookup::Unknown => report.problems.push(format!(
            "bundle {} (seq {}) has no leaf in the log",
            record.bundle_id, record.seq
        )),
    }
    let in_period = bundle.timestamp_end >= req.from && bundle.timestamp_end < req.to;
    report.exported += 1;
    report.first_seq = Some(report.first_seq.map_or(record.seq, |s| s.min(record.seq)));
    report.last_seq = Some(report.last_seq.map_or(record.seq, |s| s.max(record.seq)));
    if in_period {
        report.in_period += 1;
        *report
            .outcomes
            .entry(bundle.check.as_str().to_owned())
            .or_default()
            .entry(bundle.outcome.as_str().to_owned())
            .or_default() += 1;
    }
    if bundle.check == Check::EvidenceRetention
        && let (Some(from), Some(through)) = (
            bundle.post_state["pruned_from_seq"].as_u64(),
            bundle.post_state["pruned_through_seq"].as_u64(),
        )
    {
        report.pruned_on_box.push(PrunedRange {
            checkpoint_seq: bundle.seq,
            from_seq: from,
            through_seq: through,
        });
    }
    exported.push(ExportedBundle {
        host_id: host.host_id.clone(),
        href: format!("{dir}/{BUNDLE_FILE}"),
        sha256: hex::encode(hash),
        bundle,
        in_period,
    });
    Ok(())
}
