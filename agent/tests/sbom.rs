//! The SBOM of a real Nix store closure built here: checked against nix-store's own answers,
//! validated against the CycloneDX 1.6 schema, and refused (as a failed bundle) for a
//! missing, locked or corrupt database or an incomplete closure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{TestResult, agent, configured_box, nix_command, open_store, text};
use compliance_agent::crypto::{SigningKey, sha256_hex};
use compliance_agent::evidence::{self, Attachment, Check, Draft, Outcome};
use compliance_agent::sbom::{self, SBOM_FILE, SbomError, Source};
use serde_json::Value;

const NIX_DB: &str = "/nix/var/nix/db/db.sqlite";

/// The test closure, built once: a system with a diamond of libraries, a
/// self-reference, a multi-output style name and a path without a version.
struct Built {
    root: String,
    link: PathBuf,
    _dir: tempfile::TempDir,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| build_closure().expect("nix-build the test closure"))
}

fn build_closure() -> Result<Built, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let expr = dir.path().join("closure.nix");
    fs::write(
        &expr,
        r#"
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    marker = "compliance-agent sbom test closure";
  };
  base = mk "libbase-1.0" "/bin/mkdir $out && echo base > $out/base";
  foo = mk "libfoo-1.2.3" "/bin/mkdir $out && echo ${base} > $out/needs";
  bar = mk "libbar-2.0-dev" "/bin/mkdir $out && echo ${base} > $out/needs && echo $out > $out/self";
  app = mk "clinic-app-0.9.1" "/bin/mkdir $out && echo ${foo} ${bar} > $out/needs";
  data = mk "timezone-data" "/bin/mkdir $out && echo data > $out/data";
in mk "nixos-system-testbox-25.11.20251201.abc1234"
  "/bin/mkdir $out && echo ${app} ${foo} ${data} > $out/needs && echo $out > $out/self"
"#,
    )?;
    let link = dir.path().join("current-system");
    let out = nix_command("nix-build")
        .arg(&expr)
        .arg("--out-link")
        .arg(&link)
        .output()?;
    if !out.status.success() {
        return Err(format!("nix-build failed: {}", text(&out.stderr)).into());
    }
    let root = text(&out.stdout).trim().to_owned();
    Ok(Built {
        root,
        link,
        _dir: dir,
    })
}

fn nix_store(args: &[&str]) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let out = nix_command("nix-store").args(args).output()?;
    if !out.status.success() {
        return Err(format!("nix-store {args:?}: {}", text(&out.stderr)).into());
    }
    Ok(text(&out.stdout).lines().map(str::to_owned).collect())
}

fn source(db: &Path) -> Source {
    Source {
        db: db.to_owned(),
        busy_timeout: Duration::from_millis(300),
    }
}

fn generate_doc(db: &Path, root: &str) -> Result<(sbom::Sbom, Value), Box<dyn std::error::Error>> {
    let sbom = sbom::generate(&source(db), root)?;
    let doc: Value = serde_json::from_slice(&sbom.bytes)?;
    Ok((sbom, doc))
}

/// A consistent copy of the live Nix database (VACUUM INTO, read-only) to break on purpose.
fn copy_db(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let copy = dir.join("db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(NIX_DB, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.execute("VACUUM INTO ?1", [copy.to_str().ok_or("utf8")?])?;
    Ok(copy)
}

/// Every component of the document by bom-ref, the system's included.
fn components(doc: &Value) -> BTreeMap<String, Value> {
    let mut all: Vec<Value> = doc["components"].as_array().cloned().unwrap_or_default();
    all.push(doc["metadata"]["component"].clone());
    all.into_iter()
        .filter_map(|c| c["bom-ref"].as_str().map(|r| (r.to_owned(), c.clone())))
        .collect()
}

/// Invariant: the SBOM lists exactly the closure `nix-store --query --requisites`
/// gives, each with the dependencies `--references` gives (itself excluded),
/// the NAR hash and size `--hash`/`--size` give, and the version Nix's own
/// parseDrvName gives.
#[test]
fn sbom_matches_nix_store_queries() -> TestResult {
    let b = built();
    let (sbom, doc) = generate_doc(Path::new(NIX_DB), &b.root)?;
    let requisites: BTreeSet<String> = nix_store(&["--query", "--requisites", &b.root])?
        .into_iter()
        .collect();
    assert_eq!(
        requisites.len(),
        6,
        "the test closure has six paths: {requisites:?}"
    );
    let comps = components(&doc);
    let refs: BTreeSet<String> = comps.keys().cloned().collect();
    assert_eq!(refs, requisites, "components are the requisites");
    assert_eq!(sbom.components, 6, "the summary counts every path");
    assert_eq!(
        doc["metadata"]["component"]["bom-ref"],
        b.root.as_str(),
        "the system is the subject"
    );
    assert_eq!(
        doc["metadata"]["component"]["type"], "operating-system",
        "the system is an operating-system component"
    );

    let deps: BTreeMap<String, BTreeSet<String>> = doc["dependencies"]
        .as_array()
        .ok_or("no dependencies")?
        .iter()
        .map(|d| {
            let on = d["dependsOn"].as_array().cloned().unwrap_or_default();
            (
                d["ref"].as_str().unwrap_or_default().to_owned(),
                on.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        deps.len(),
        requisites.len(),
        "one dependency entry per path"
    );
    let mut edges = 0;
    for path in &requisites {
        let mut expected: BTreeSet<String> = nix_store(&["--query", "--references", path])?
            .into_iter()
            .collect();
        expected.remove(path);
        edges += expected.len();
        assert_eq!(deps.get(path), Some(&expected), "dependencies of {path}");

        let comp = &comps[path];
        let nix_hash = nix_store(&["--query", "--hash", path])?.join("");
        let prop = |name: &str| {
            comp["properties"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .and_then(|p| p["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(
            prop("nix:nar_hash").as_deref(),
            Some(nix_hash.as_str()),
            "NAR hash of {path}"
        );
        let hex = comp["hashes"][0]["content"].as_str().ok_or("no hash")?;
        let bytes = hex::decode(hex)?;
        assert_eq!(
            format!("sha256:{}", compliance_agent::nar::nixbase32(&bytes)),
            nix_hash,
            "the CycloneDX SHA-256 of {path} is its NAR hash in hex"
        );
        assert_eq!(
            comp["hashes"][0]["alg"], "SHA-256",
            "hash algorithm of {path}"
        );
        let size = nix_store(&["--query", "--size", path])?.join("");
        assert_eq!(prop("nix:nar_size"), Some(size), "NAR size of {path}");

        let name = path.split_once('-').map(|x| x.1).ok_or("no name")?;
        let parsed = nix_command("nix-instantiate")
            .args([
                "--eval",
                "--json",
                "--expr",
                &format!("builtins.parseDrvName \"{name}\""),
            ])
            .output()?;
        let parsed: Value = serde_json::from_slice(&parsed.stdout)?;
        assert_eq!(
            comp["name"], parsed["name"],
            "name of {path} as parseDrvName gives it"
        );
        let version = parsed["version"].as_str().filter(|v| !v.is_empty());
        assert_eq!(
            comp["version"].as_str(),
            version,
            "version of {path} as parseDrvName gives it"
        );
        assert!(
            comp["purl"]
                .as_str()
                .is_some_and(|p| p.starts_with("pkg:nix/")),
            "{path} has a pkg:nix purl"
        );
    }
    assert_eq!(
        sbom.dependency_edges, edges,
        "the summary counts every reference"
    );
    assert_eq!(
        doc["metadata"]["tools"]["components"][0]["name"], "compliance-agent",
        "the tool is named"
    );
    assert_eq!(
        doc["metadata"]["tools"]["components"][0]["version"],
        env!("CARGO_PKG_VERSION"),
        "the tool's version"
    );
    Ok(())
}

/// The virtualenv with cyclonedx-python-lib's validator: tests/run's
/// ($COMPLIANCE_TEST_VENV, from tests/python-requirements.txt), else one
/// created under target/ when missing.
fn validator() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let venv = std::env::var_os("COMPLIANCE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv"));
    let python = venv.join("bin/python");
    let check = |py: &Path| {
        Command::new(py)
            .args(["-c", "import cyclonedx.validation.json, jsonschema"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !check(&python) {
        let made = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?;
        if !made.success() {
            return Err("python3 -m venv failed (Debian: apt-get install python3-venv)".into());
        }
        let pip = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "cyclonedx-python-lib[json-validation]",
            ])
            .status()?;
        if !pip.success() || !check(&python) {
            return Err("pip install cyclonedx-python-lib[json-validation] failed".into());
        }
    }
    Ok(python)
}

const VALIDATE: &str = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
if error is not None:
    print(error)
    sys.exit(1)
"#;

/// Invariant: the document is valid CycloneDX 1.6 by the reference validator,
/// and the validator does refuse a document that is not (it is not vacuous).
#[test]
fn sbom_is_valid_cyclonedx_1_6() -> TestResult {
    let b = built();
    let python = validator()?;
    let (sbom, mut doc) = generate_doc(Path::new(NIX_DB), &b.root)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(SBOM_FILE);
    fs::write(&file, &sbom.bytes)?;
    let out = Command::new(&python)
        .arg("-c")
        .arg(VALIDATE)
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "cyclonedx-python-lib refuses the SBOM: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    doc["components"][0]["hashes"][0]["alg"] = "sha256".into();
    fs::write(&file, serde_json::to_vec(&doc)?)?;
    let out = Command::new(&python)
        .arg("-c")
        .arg(VALIDATE)
        .arg(&file)
        .output()?;
    assert!(
        !out.status.success(),
        "an invalid hash algorithm name must be refused by the validator"
    );
    Ok(())
}

/// Invariant: every way the database can fail is an error that names it, never a partial SBOM.
#[test]
fn broken_databases_are_refused_by_name() -> TestResult {
    let b = built();
    let dir = tempfile::tempdir()?;

    let missing = sbom::generate(&source(&dir.path().join("nope.sqlite")), &b.root);
    assert!(
        matches!(missing, Err(SbomError::DatabaseMissing(_))),
        "missing: {missing:?}"
    );

    let garbage = copy_db(dir.path())?;
    let mut bytes = fs::read(&garbage)?;
    bytes[..64].fill(0x42);
    fs::write(&garbage, &bytes)?;
    let corrupt = sbom::generate(&source(&garbage), &b.root);
    assert!(
        matches!(corrupt, Err(SbomError::DatabaseCorrupt { .. })),
        "overwritten header: {corrupt:?}"
    );

    let other = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&other)?.execute_batch("CREATE TABLE t (x)")?;
    let schema = sbom::generate(&source(&other), &b.root);
    assert!(
        matches!(&schema, Err(SbomError::DatabaseCorrupt { reason, .. }) if reason.contains("ValidPaths")),
        "a database without Nix's tables: {schema:?}"
    );

    let unknown = "/nix/store/00000000000000000000000000000000-not-here-1.0";
    let not_valid = sbom::generate(&source(Path::new(NIX_DB)), unknown);
    assert!(
        matches!(not_valid, Err(SbomError::NotValid(_))),
        "a path the store does not hold: {not_valid:?}"
    );
    Ok(())
}

/// Invariant: a database another process holds locked past the busy timeout
/// is refused as locked; one released within the timeout is waited for.
#[test]
fn locked_database_is_refused_after_the_busy_timeout() -> TestResult {
    let b = built();
    let dir = tempfile::tempdir()?;
    let db = copy_db(dir.path())?;
    let hold = |millis: u64| -> Result<std::thread::JoinHandle<()>, Box<dyn std::error::Error>> {
        let writer = rusqlite::Connection::open(&db)?;
        writer.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; UPDATE ValidPaths SET registrationTime = registrationTime;")?;
        Ok(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(millis));
            let _ = writer.execute_batch("COMMIT");
            drop(writer);
        }))
    };
    let writer = hold(3_000)?;
    let locked = sbom::generate(&source(&db), &b.root);
    assert!(
        matches!(&locked, Err(SbomError::DatabaseLocked { .. })),
        "locked past the timeout: {locked:?}"
    );
    let _ = writer.join();
    let writer = hold(100)?;
    let waited = sbom::generate(
        &Source {
            db: db.clone(),
            busy_timeout: Duration::from_secs(10),
        },
        &b.root,
    );
    let _ = writer.join();
    assert!(
        waited.is_ok(),
        "a lock released within the busy timeout is waited for: {waited:?}"
    );
    Ok(())
}

/// Invariant: a closure with a reference to a path the database does not hold,
/// or a NAR hash that is not one, is refused as incomplete, naming the path.
#[test]
fn incomplete_closures_are_refused() -> TestResult {
    let b = built();
    let dir = tempfile::tempdir()?;
    let requisites = nix_store(&["--query", "--requisites", &b.root])?;
    let libbase = requisites
        .iter()
        .find(|p| p.ends_with("-libbase-1.0"))
        .ok_or("no libbase")?;
    let libfoo = requisites
        .iter()
        .find(|p| p.ends_with("-libfoo-1.2.3"))
        .ok_or("no libfoo")?;

    let db = copy_db(dir.path())?;
    // Nix's schema forbids this (a foreign key); a damaged database need not obey it.
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    conn.execute("DELETE FROM ValidPaths WHERE path = ?1", [libbase])?;
    drop(conn);
    let dangling = sbom::generate(&source(&db), &b.root);
    assert!(
        matches!(&dangling, Err(SbomError::IncompleteClosure { reason, .. }) if reason.contains(libfoo.as_str())),
        "a dangling reference names its referrer: {dangling:?}"
    );

    fs::remove_file(&db)?;
    let db = copy_db(dir.path())?;
    rusqlite::Connection::open(&db)?.execute(
        "UPDATE ValidPaths SET hash = 'sha256:zzz' WHERE path = ?1",
        [libfoo],
    )?;
    let bad_hash = sbom::generate(&source(&db), &b.root);
    assert!(
        matches!(&bad_hash, Err(SbomError::IncompleteClosure { reason, .. }) if reason.contains(libfoo.as_str())),
        "a bad NAR hash names its path: {bad_hash:?}"
    );
    Ok(())
}

/// Invariant: the SBOM is stored as a signed sbom bundle (164.308(a)(8)) with
/// the document beside bundle.json, whose SHA-256 the signed bundle names; a
/// changed document no longer matches; a failure is a failed bundle naming why.
#[test]
fn sbom_is_stored_as_signed_evidence() -> TestResult {
    let b = built();
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path(), 7);
    let (recorded, sbom) = sbom::record(&store, &source(Path::new(NIX_DB)), &b.link)?;
    let sbom = sbom.ok_or("no sbom")?;
    assert_eq!(
        recorded.outcome,
        Outcome::Success,
        "generation succeeded: {:?}",
        recorded.error
    );
    let doc_path = recorded.bundle.dir.join(SBOM_FILE);
    let bytes = fs::read(&doc_path)?;
    assert_eq!(
        bytes, sbom.bytes,
        "the stored document is the generated one"
    );
    let bundle = evidence::read(&recorded.bundle.dir)?;
    assert_eq!(bundle.check, Check::Sbom, "an sbom bundle");
    assert_eq!(
        bundle.hipaa_controls,
        ["164.308(a)(8)"],
        "evaluation control"
    );
    assert_eq!(
        bundle.post_state["sha256"],
        sha256_hex(&bytes).as_str(),
        "post_state names the document's hash"
    );
    assert_eq!(
        bundle.post_state["system"],
        b.root.as_str(),
        "the resolved system"
    );
    assert_eq!(
        sbom::verify_document(&recorded.bundle.dir, &bundle)?,
        Some(sha256_hex(&bytes)),
        "the document matches its bundle"
    );
    let report = evidence::verify(
        &dir.path().join("evidence"),
        &SigningKey::from_seed(&[7; 32]).verifying_key(),
    )?;
    assert!(
        report.problems.is_empty(),
        "the store verifies: {:?}",
        report.problems
    );

    let mut changed = bytes.clone();
    changed[10] ^= 1;
    fs::write(&doc_path, &changed)?;
    assert!(
        sbom::verify_document(&recorded.bundle.dir, &bundle).is_err(),
        "a changed document no longer matches the signed hash"
    );

    let (failed, none) =
        sbom::record(&store, &source(&dir.path().join("missing.sqlite")), &b.link)?;
    assert!(none.is_none(), "no SBOM from a missing database");
    assert_eq!(failed.outcome, Outcome::Failed, "a failed bundle");
    let bundle = evidence::read(&failed.bundle.dir)?;
    assert!(
        bundle
            .error
            .as_deref()
            .is_some_and(|e| e.contains("does not exist")),
        "the failed bundle says why: {:?}",
        bundle.error
    );
    assert!(
        !failed.bundle.dir.join(SBOM_FILE).exists(),
        "no document beside a failed bundle"
    );
    Ok(())
}

/// Invariant: an attachment cannot replace the bundle's own files or escape its directory.
#[test]
fn attachments_cannot_take_the_bundles_names() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open_store(dir.path(), 8);
    for name in ["bundle.json", "bundle.sig", "../x", ".hidden", "a/b", ""] {
        let mut draft = Draft::new(Check::Sbom, Outcome::Success);
        draft.attachments.push(Attachment {
            name: name.into(),
            bytes: b"x".to_vec(),
        });
        assert!(
            store.store(draft).is_err(),
            "attachment name {name:?} must be refused"
        );
    }
    assert_eq!(store.head()?.0, 0, "nothing was stored");
    Ok(())
}

/// Invariant: the command writes the bundle and the --out copy and exits 0,
/// and turns a broken database into a failed bundle and exit 1.
#[test]
fn sbom_command_success_and_failure() -> TestResult {
    let b = built();
    let dir = tempfile::tempdir()?;
    let config = configured_box(dir.path());
    let out_file = dir.path().join("copy.cdx.json");
    let link = b.link.to_str().ok_or("utf8")?;
    let out = agent(
        Some(&config),
        &[
            "sbom",
            "--system",
            link,
            "--out",
            out_file.to_str().ok_or("utf8")?,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "sbom command failed: {}",
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["outcome"], "success", "reported outcome: {report}");
    let copy = fs::read(&out_file)?;
    assert_eq!(
        Some(sha256_hex(&copy).as_str()),
        report["sha256"].as_str(),
        "--out holds the same document"
    );

    let broken = dir.path().join("broken.sqlite");
    fs::write(
        &broken,
        b"this is not a database at all, it is a test of the refusal path....",
    )?;
    let out = agent(
        Some(&config),
        &[
            "sbom",
            "--system",
            link,
            "--nix-db",
            broken.to_str().ok_or("utf8")?,
            "--json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed generation exits 1: {}",
        text(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["outcome"], "failed", "reported outcome: {report}");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt")),
        "the failure says why: {report}"
    );
    Ok(())
}
