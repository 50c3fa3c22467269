//! The CycloneDX 1.6 SBOM of the running system's closure, read from the Nix store database, and its signed evidence bundle.
//!
//! The closure is read in one read transaction (one consistent snapshot)
//! from `/nix/var/nix/db/db.sqlite` opened read-only with a busy timeout: its
//! `ValidPaths` (path, NAR hash, size, deriver) and `Refs` (references). It is
//! never opened `immutable=1`: nix-daemon writes the database while we read,
//! and an immutable reader would skip the locks that keep a half-written
//! transaction out of view. A missing, locked or corrupt database, or a
//! closure that is incomplete (a reference to a path the database does not
//! hold, a NAR hash that is not one), is an error naming why; there is no
//! partial SBOM. docs/sbom.md describes the document and compares it with sbomnix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use serde_json::{Value, json};

use crate::crypto::sha256_hex;
use crate::evidence::{
    Attachment, Check, Draft, EvidenceError, EvidenceStore, Outcome, StoredBundle,
};

/// The Nix store database of a standard installation.
pub const NIX_DB: &str = "/nix/var/nix/db/db.sqlite";
/// The store directory every path must be in.
pub const STORE_DIR: &str = "/nix/store";
/// The SBOM's file name beside bundle.json.
pub const SBOM_FILE: &str = "sbom.cdx.json";
/// How long to wait for a writer holding the database (nix-daemon registering a build).
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("the Nix store database {0} does not exist (is the Nix store mounted here?)")]
    DatabaseMissing(PathBuf),
    #[error(
        "cannot open the Nix store database {path} read-only: {reason} (a database in WAL mode needs db.sqlite-shm to exist, which it does while nix-daemon runs, or a writable directory)"
    )]
    DatabaseOpen { path: PathBuf, reason: String },
    #[error(
        "the Nix store database {path} is locked by another process and stayed locked for {} ms: {reason}",
        .timeout.as_millis()
    )]
    DatabaseLocked {
        path: PathBuf,
        timeout: Duration,
        reason: String,
    },
    #[error("the Nix store database {path} is corrupt or not a Nix store database: {reason}")]
    DatabaseCorrupt { path: PathBuf, reason: String },
    #[error("cannot read the Nix store database {path}: {reason}")]
    DatabaseRead { path: PathBuf, reason: String },
    #[error("cannot resolve the system {path}: {reason}")]
    Resolve { path: PathBuf, reason: String },
    #[error("{0} is not a store path (a name directly under {STORE_DIR})")]
    NotAStorePath(String),
    #[error(
        "{0} is not a valid path in the Nix store database (not built or registered here, or garbage-collected)"
    )]
    NotValid(String),
    #[error("the closure of {root} is incomplete: {reason}")]
    IncompleteClosure { root: String, reason: String },
    #[error("cannot encode the SBOM: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where the closure is read from.
#[derive(Clone, Debug)]
pub struct Source {
    pub db: PathBuf,
    pub busy_timeout: Duration,
}

impl Default for Source {
    fn default() -> Self {
        Self {
            db: PathBuf::from(NIX_DB),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
        }
    }
}

/// One store path of the closure, as the database records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePath {
    pub path: String,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash: [u8; 32],
    pub nar_size: Option<u64>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    /// Store paths this one references, sorted, itself excluded.
    pub references: Vec<String>,
    /// Whether the path references itself (recorded, not a dependency).
    pub self_reference: bool,
}

/// A complete closure: the root and every path it requires, by path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closure {
    pub root: String,
    pub paths: BTreeMap<String, StorePath>,
}

impl Closure {
    pub fn edges(&self) -> usize {
        self.paths.values().map(|p| p.references.len()).sum()
    }
}

/// Nix's `parseDrvName`: the version starts after the first dash that is
/// followed by something other than a letter (`hello-2.12.1` is
/// `hello` 2.12.1, `nixos-system-box-25.11` is `nixos-system-box` 25.11,
/// `source` has no version).
pub fn parse_drv_name(name: &str) -> (&str, Option<&str>) {
    let bytes = name.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'-' && i + 1 < bytes.len() && !bytes[i + 1].is_ascii_alphabetic() {
            return (&name[..i], Some(&name[i + 1..]));
        }
    }
    (name, None)
}

/// The name part of a store path (`/nix/store/<hash>-<name>`), checked.
pub fn store_path_name(path: &str) -> Result<&str, SbomError> {
    let not = || SbomError::NotAStorePath(path.to_owned());
    let base = path
        .strip_prefix(STORE_DIR)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(not)?;
    let (hash, name) = base.split_at_checked(32).ok_or_else(not)?;
    let name = name.strip_prefix('-').ok_or_else(not)?;
    let hash_ok = hash
        .bytes()
        .all(|b| b"0123456789abcdfghijklmnpqrsvwxyz".contains(&b));
    let name_ok = !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
    if !hash_ok || !name_ok {
        return Err(not());
    }
    Ok(name)
}

/// Resolves a system link (`/run/current-system`) or path to its top-level store path.
pub fn resolve_system(link: &Path) -> Result<String, SbomError> {
    let err = |reason: String| SbomError::Resolve {
        path: link.to_owned(),
        reason,
    };
    let real = std::fs::canonicalize(link).map_err(|e| err(e.to_string()))?;
    let real = real
        .to_str()
        .ok_or_else(|| err("the path is not UTF-8".into()))?;
    let rest = real
        .strip_prefix(STORE_DIR)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| {
            err(format!(
                "it resolves to {real}, which is not in {STORE_DIR}"
            ))
        })?;
    let top = rest.split('/').next().unwrap_or_default();
    let path = format!("{STORE_DIR}/{top}");
    store_path_name(&path)?;
    Ok(path)
}

/// A NAR hash as Nix writes it in the database: `sha256:` and 64 hex digits
/// (what Nix 2 writes), 52 Nix base-32 digits (older Nix) or base64, or SRI `sha256-<base64>`.
pub fn parse_nar_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = if let Some(digits) = text.strip_prefix("sha256:") {
        match digits.len() {
            64 => hex::decode(digits).ok()?,
            52 => crate::nar::nixbase32_decode(digits)?,
            44 => STANDARD.decode(digits).ok()?,
            _ => return None,
        }
    } else if let Some(b64) = text.strip_prefix("sha256-") {
        STANDARD.decode(b64).ok()?
    } else {
        return None;
    };
    bytes.try_into().ok()
}

fn classify(db: &Path, timeout: Duration, e: rusqlite::Error) -> SbomError {
    let reason = e.to_string();
    let path = db.to_owned();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SbomError::DatabaseLocked {
            path,
            timeout,
            reason,
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            SbomError::DatabaseCorrupt { path, reason }
        }
        Some(ErrorCode::CannotOpen) => SbomError::DatabaseOpen { path, reason },
        _ if reason.contains("no such table") || reason.contains("no such column") => {
            SbomError::DatabaseCorrupt {
                path,
                reason: format!("{reason}: the schema is not a Nix store database's"),
            }
        }
        _ => SbomError::DatabaseRead { path, reason },
    }
}

const CLOSURE_CTE: &str = "WITH RECURSIVE closure(id) AS (
        SELECT id FROM ValidPaths WHERE path = ?1
        UNION
        SELECT r.reference FROM Refs r JOIN closure c ON r.referrer = c.id
    )";

/// Reads the closure of `root` from the Nix store database.
pub fn read_closure(source: &Source, root: &str) -> Result<Closure, SbomError> {
    store_path_name(root)?;
    let db = &source.db;
    match std::fs::symlink_metadata(db) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(SbomError::DatabaseOpen {
                path: db.clone(),
                reason: "not a regular file".into(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SbomError::DatabaseMissing(db.clone()));
        }
        Err(e) => {
            return Err(SbomError::DatabaseOpen {
                path: db.clone(),
                reason: e.to_string(),
            });
        }
    }
    let fail = |e| classify(db, source.busy_timeout, e);
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    conn.busy_timeout(source.busy_timeout).map_err(fail)?;
    // One snapshot for every query below.
    conn.execute_batch("BEGIN DEFERRED").map_err(fail)?;
    let closure = read_in_snapshot(&conn, db, root).map_err(|e| match e {
        ReadError::Sql(e) => fail(e),
        ReadError::Sbom(e) => e,
    });
    // A read transaction has nothing to commit; end it either way.
    let _ = conn.execute_batch("COMMIT");
    closure
}

enum ReadError {
    Sql(rusqlite::Error),
    Sbom(SbomError),
}

impl From<rusqlite::Error> for ReadError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

fn read_in_snapshot(conn: &Connection, db: &Path, root: &str) -> Result<Closure, ReadError> {
    let incomplete = |reason: String| {
        ReadError::Sbom(SbomError::IncompleteClosure {
            root: root.to_owned(),
            reason,
        })
    };
    let mut rows = conn.prepare(&format!(
        "{CLOSURE_CTE} SELECT c.id, v.path, v.hash, v.narSize, v.deriver, v.ca
         FROM closure c LEFT JOIN ValidPaths v ON v.id = c.id"
    ))?;
    let mut by_id: BTreeMap<i64, StorePath> = BTreeMap::new();
    let mut missing: Vec<i64> = Vec::new();
    let mut query = rows.query([root])?;
    while let Some(row) = query.next()? {
        let id: i64 = row.get(0)?;
        let Some(path) = row.get::<_, Option<String>>(1)? else {
            missing.push(id);
            continue;
        };
        store_path_name(&path).map_err(|_| {
            ReadError::Sbom(SbomError::DatabaseCorrupt {
                path: db.to_owned(),
                reason: format!("ValidPaths holds {path:?}, which is not a store path"),
            })
        })?;
        let hash: String = row.get(2)?;
        let nar_hash = parse_nar_hash(&hash).ok_or_else(|| {
            incomplete(format!(
                "{path} has NAR hash {hash:?}, which is not a SHA-256 in a form Nix writes"
            ))
        })?;
        let nar_size = row
            .get::<_, Option<i64>>(3)?
            .map(|n| u64::try_from(n).map_err(|_| incomplete(format!("{path} has NAR size {n}"))))
            .transpose()?;
        by_id.insert(
            id,
            StorePath {
                path,
                nar_hash,
                nar_size,
                deriver: row.get(4)?,
                ca: row.get(5)?,
                references: Vec::new(),
                self_reference: false,
            },
        );
    }
    drop(query);
    if by_id.is_empty() && missing.is_empty() {
        return Err(ReadError::Sbom(SbomError::NotValid(root.to_owned())));
    }
    let mut edges = conn.prepare(&format!(
        "{CLOSURE_CTE} SELECT r.referrer, r.reference FROM Refs r JOIN closure c ON r.referrer = c.id"
    ))?;
    let mut refs: Vec<(i64, i64)> = Vec::new();
    let mut query = edges.query([root])?;
    while let Some(row) = query.next()? {
        refs.push((row.get(0)?, row.get(1)?));
    }
    drop(query);
    if let Some(&id) = missing.first() {
        let referrers: Vec<&str> = refs
            .iter()
            .filter(|(_, to)| *to == id)
            .filter_map(|(from, _)| by_id.get(from).map(|p| p.path.as_str()))
            .collect();
        return Err(incomplete(format!(
            "{} references path id {id}, which the database does not hold ({} missing path(s) in all)",
            if referrers.is_empty() {
                "the closure".to_owned()
            } else {
                referrers.join(", ")
            },
            missing.len()
        )));
    }
    for (from, to) in refs {
        if from == to {
            if let Some(p) = by_id.get_mut(&from) {
                p.self_reference = true;
            }
            continue;
        }
        let target = by_id.get(&to).map(|p| p.path.clone()).ok_or_else(|| {
            incomplete(format!("path id {to} is referenced but not in the closure"))
        })?;
        if let Some(p) = by_id.get_mut(&from) {
            p.references.push(target);
        }
    }
    let mut paths = BTreeMap::new();
    for (_, mut p) in by_id {
        p.references.sort();
        p.references.dedup();
        paths.insert(p.path.clone(), p);
    }
    if !paths.contains_key(root) {
        return Err(ReadError::Sbom(SbomError::NotValid(root.to_owned())));
    }
    Ok(Closure {
        root: root.to_owned(),
        paths,
    })
}

/// Percent-encodes a purl name or version segment.
fn purl_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn component(p: &StorePath, kind: &str) -> Value {
    let full = store_path_name(&p.path).unwrap_or(&p.path);
    let (name, version) = parse_drv_name(full);
    let purl = match version {
        Some(v) => format!("pkg:nix/{}@{}", purl_segment(name), purl_segment(v)),
        None => format!("pkg:nix/{}", purl_segment(name)),
    };
    let mut properties = vec![
        json!({ "name": "nix:store_path", "value": p.path }),
        json!({ "name": "nix:nar_hash", "value": format!("sha256:{}", crate::nar::nixbase32(&p.nar_hash)) }),
    ];
    if let Some(size) = p.nar_size {
        properties.push(json!({ "name": "nix:nar_size", "value": size.to_string() }));
    }
    if let Some(d) = &p.deriver {
        properties.push(json!({ "name": "nix:deriver", "value": d }));
    }
    if let Some(ca) = &p.ca {
        properties.push(json!({ "name": "nix:ca", "value": ca }));
    }
    let mut c = json!({
        "type": kind,
        "bom-ref": p.path,
        "name": name,
        "purl": purl,
        "hashes": [{ "alg": "SHA-256", "content": hex::encode(p.nar_hash) }],
        "properties": properties,
    });
    if let (Some(v), Some(obj)) = (version, c.as_object_mut()) {
        obj.insert("version".into(), Value::String(v.to_owned()));
    }
    c
}

/// The CycloneDX 1.6 document of a closure: the root as metadata.component,
/// every other path as a component, one dependency entry per path.
pub fn cyclonedx(closure: &Closure, timestamp: jiff::Timestamp, serial: uuid::Uuid) -> Value {
    let mut components = Vec::with_capacity(closure.paths.len());
    let mut dependencies = Vec::with_capacity(closure.paths.len());
    let mut root_component = Value::Null;
    for p in closure.paths.values() {
        if p.path == closure.root {
            root_component = component(p, "operating-system");
        } else {
            components.push(component(p, "library"));
        }
        dependencies.push(json!({ "ref": p.path, "dependsOn": p.references }));
    }
    json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": format!("urn:uuid:{serial}"),
        "version": 1,
        "metadata": {
            "timestamp": timestamp.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "lifecycles": [{ "phase": "operations" }],
            "tools": { "components": [{
                "type": "application",
                "name": "compliance-agent",
                "version": env!("CARGO_PKG_VERSION"),
            }] },
            "component": root_component,
            "properties": [
                { "name": "nix:closure", "value": "runtime" },
                { "name": "nix:closure_paths", "value": closure.paths.len().to_string() },
                { "name": "nix:source", "value": "nix store database (ValidPaths, Refs)" },
            ],
        },
        "components": components,
        "dependencies": dependencies,
    })
}

/// A generated SBOM: the document's bytes and what the bundle records of it.
#[derive(Clone, Debug)]
pub struct Sbom {
    pub system: String,
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub serial_number: String,
    pub components: usize,
    pub dependency_edges: usize,
}

/// Reads the closure of `system` (a store path) and renders its SBOM.
pub fn generate(source: &Source, system: &str) -> Result<Sbom, SbomError> {
    let closure = read_closure(source, system)?;
    let serial = uuid::Uuid::new_v4();
    let doc = cyclonedx(&closure, jiff::Timestamp::now(), serial);
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    Ok(Sbom {
        system: system.to_owned(),
        sha256: sha256_hex(&bytes),
        serial_number: format!("urn:uuid:{serial}"),
        components: closure.paths.len(),
        dependency_edges: closure.edges(),
        bytes,
    })
}

/// What [`record`] stored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recorded {
    pub bundle: StoredBundle,
    pub outcome: Outcome,
    /// The SBOM's path beside bundle.json, when one was written.
    pub document: Option<PathBuf>,
    pub sha256: Option<String>,
    pub components: Option<usize>,
    pub error: Option<String>,
}

/// Generates the SBOM of `system` (a link such as /run/current-system, or a
/// store path) and stores it as a signed `sbom` bundle: on success the
/// document is `sbom.cdx.json` beside bundle.json and post_state names its
/// SHA-256; on any failure the bundle is `failed` and its error says why.
pub fn record(
    store: &EvidenceStore,
    source: &Source,
    system: &Path,
) -> Result<(Recorded, Option<Sbom>), EvidenceError> {
    let started = jiff::Timestamp::now();
    let result = resolve_system(system).and_then(|root| generate(source, &root));
    let pre_state = json!({
        "system_link": system,
        "nix_db": source.db,
    });
    let mut draft;
    let sbom = match result {
        Ok(sbom) => {
            draft = Draft::new(Check::Sbom, Outcome::Success);
            draft.post_state = json!({
                "document": SBOM_FILE,
                "sha256": sbom.sha256,
                "bytes": sbom.bytes.len(),
                "format": "CycloneDX",
                "spec_version": "1.6",
                "serial_number": sbom.serial_number,
                "system": sbom.system,
                "components": sbom.components,
                "dependency_edges": sbom.dependency_edges,
            });
            draft.attachments.push(Attachment {
                name: SBOM_FILE.into(),
                bytes: sbom.bytes.clone(),
            });
            Some(sbom)
        }
        Err(e) => {
            draft = Draft::new(Check::Sbom, Outcome::Failed);
            draft.error = Some(e.to_string());
            draft.post_state = json!({ "document": null });
            None
        }
    };
    draft.timestamp_start = started;
    draft.pre_state = pre_state;
    let outcome = draft.outcome;
    let error = draft.error.clone();
    let bundle = store.store(draft)?;
    let recorded = Recorded {
        document: sbom.as_ref().map(|_| bundle.dir.join(SBOM_FILE)),
        sha256: sbom.as_ref().map(|s| s.sha256.clone()),
        components: sbom.as_ref().map(|s| s.components),
        bundle,
        outcome,
        error,
    };
    Ok((recorded, sbom))
}

/// Writes a copy of the document to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_document(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Checks that a bundle directory's sbom.cdx.json is the document its
/// (signature-checked) bundle.json names: Ok(None) for a bundle without one.
pub fn verify_document(
    bundle_dir: &Path,
    bundle: &crate::evidence::Bundle,
) -> Result<Option<String>, String> {
    if document_name(bundle)?.is_none() {
        return Ok(None);
    }
    let bytes = std::fs::read(bundle_dir.join(SBOM_FILE))
        .map_err(|e| format!("{SBOM_FILE} cannot be read: {e}"))?;
    check_document(bundle, &bytes).map(Some)
}

/// The document a (signature-checked) bundle names: `Some(SBOM_FILE)` for a
/// successful sbom bundle, None for any other bundle.
pub fn document_name(bundle: &crate::evidence::Bundle) -> Result<Option<&'static str>, String> {
    if bundle.check != Check::Sbom || bundle.outcome != Outcome::Success {
        return Ok(None);
    }
    let name = bundle
        .post_state
        .get("document")
        .and_then(Value::as_str)
        .ok_or("the sbom bundle's post_state names no document")?;
    if name != SBOM_FILE {
        return Err(format!(
            "the sbom bundle names document {name:?}, not {SBOM_FILE}"
        ));
    }
    Ok(Some(SBOM_FILE))
}

/// Checks that `bytes` are the document a successful sbom bundle names by SHA-256;
/// answers that SHA-256 (hex).
pub fn check_document(bundle: &crate::evidence::Bundle, bytes: &[u8]) -> Result<String, String> {
    if document_name(bundle)?.is_none() {
        return Err(format!(
            "bundle {} is a {} {} bundle, which names no SBOM document",
            bundle.bundle_id, bundle.outcome, bundle.check
        ));
    }
    let expected = bundle
        .post_state
        .get("sha256")
        .and_then(Value::as_str)
        .ok_or("the sbom bundle's post_state names no sha256")?;
    let got = sha256_hex(bytes);
    if got != expected {
        return Err(format!(
            "{SBOM_FILE} hashes to {got}, but the signed bundle names {expected}: the document was changed"
        ));
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invariant: names split where Nix's parseDrvName splits them.
    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn drv_names_split_like_nix() -> TestResult {
        for (full, name, version) in [
            ("hello-2.12.1", "hello", Some("2.12.1")),
            (
                "nixos-system-box-25.11.20250101.abcdef",
                "nixos-system-box",
                Some("25.11.20250101.abcdef"),
            ),
            ("openssl-3.0.13-bin", "openssl", Some("3.0.13-bin")),
            ("source", "source", None),
            ("unit-sshd.service", "unit-sshd.service", None),
            ("foo-_bar", "foo", Some("_bar")),
            ("trailing-", "trailing-", None),
        ] {
            assert_eq!(parse_drv_name(full), (name, version), "{full}");
        }
        Ok(())
    }

    /// Invariant: every form Nix writes a NAR hash in decodes to the same bytes; nothing else does.
    #[test]
    fn nar_hashes_in_every_nix_form() -> TestResult {
        let bytes = [0x5au8; 32];
        let forms = [
            format!("sha256:{}", hex::encode(bytes)),
            format!("sha256:{}", crate::nar::nixbase32(&bytes)),
            format!("sha256:{}", STANDARD.encode(bytes)),
            format!("sha256-{}", STANDARD.encode(bytes)),
        ];
        for f in &forms {
            assert_eq!(parse_nar_hash(f), Some(bytes), "{f}");
        }
        for bad in [
            "",
            "md5:abcd",
            "sha256:",
            "sha256:xyz",
            &format!("sha1:{}", hex::encode(bytes)),
        ] {
            assert_eq!(parse_nar_hash(bad), None, "{bad:?} is refused");
        }
        Ok(())
    }

    /// Invariant: only names directly under /nix/store with a valid hash part are store paths.
    #[test]
    fn store_paths_are_checked() -> TestResult {
        let good = "/nix/store/5m3zj4g1r5vnc606v2da1znm7vk51gbq-nixos-system-test-25.11";
        assert_eq!(
            store_path_name(good).ok(),
            Some("nixos-system-test-25.11"),
            "a store path"
        );
        for bad in [
            "/nix/store/5m3zj4g1r5vnc606v2da1znm7vk51gbq",
            "/nix/store/5m3zj4g1r5vnc606v2da1znm7vk51gbe-x",
            "/nix/store/5m3zj4g1r5vnc606v2da1znm7vk51gbq-a/b",
            "/usr/store/5m3zj4g1r5vnc606v2da1znm7vk51gbq-x",
            "/nix/store/5m3zj4g1r5vnc606v2da1znm7vk51gbq-.hidden",
        ] {
            assert!(store_path_name(bad).is_err(), "{bad} is not a store path");
        }
        Ok(())
    }

    /// Invariant: purl segments carry only unreserved characters.
    #[test]
    fn purl_segments_are_encoded() -> TestResult {
        assert_eq!(purl_segment("gtk+3"), "gtk%2B3", "plus is encoded");
        assert_eq!(
            purl_segment("a?b=c"),
            "a%3Fb%3Dc",
            "query characters are encoded"
        );
        assert_eq!(
            purl_segment("1.2.3-rc_1"),
            "1.2.3-rc_1",
            "unreserved characters stay"
        );
        Ok(())
    }
}
