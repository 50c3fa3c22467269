//! The auditor's export (`mcp-server export`): a site of several hosts exported for a
//! period, checked by the commands of its own README (OpenSSL, sha256sum and
//! `compliance-agent export verify`), made invalid by each tampering an insider would
//! try (with the manifest re-signed by the export key too), its OSCAL validated by
//! compliance-trestle and the NIST schema, and an export outside the caller's scope
//! refused and audited.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestBox, TestResult, TestServer, upload};
use compliance_agent::audit_export::{self as format, TrustedKeys};
use compliance_agent::evidence::{Check, Draft, Outcome};
use jiff::{SignedDuration, Timestamp};
use mcp_server::auth::{Caller, Role, Tenants};
use mcp_server::export::{ExportRequest, export};
use serde_json::Value;

const SITE: &str = "clinic-a";

/// Bundles per host, one an hour from `base`; the period covers hours 3 to 7.
const BUNDLES: usize = 10;

fn admin() -> Caller {
    Caller::local("test")
}

struct World {
    server: TestServer,
    base: Timestamp,
    _boxes: Vec<TestBox>,
}

/// The check and outcome of bundle `i` of a host: backups that fail on `h2` at the end,
/// firewall and patching otherwise successful.
fn event(host: &str, i: usize) -> (Check, Outcome) {
    match i % 3 {
        0 => (Check::Patching, Outcome::Success),
        1 if host == "h2" && i > 5 => (Check::Backup, Outcome::Failed),
        1 => (Check::Backup, Outcome::Success),
        _ => (Check::Firewall, Outcome::Success),
    }
}

/// Three hosts of SITE (h3 only within the period and at its end: its newest bundle is
/// in the period) and one host of another site, every bundle delivered over mTLS.
fn world() -> World {
    let server = TestServer::start();
    let base = Timestamp::now() - SignedDuration::from_hours(48);
    let mut boxes = Vec::new();
    for (site, host, hours) in [
        (SITE, "h1", 0..BUNDLES),
        (SITE, "h2", 0..BUNDLES),
        (SITE, "h3", 4..7),
        ("clinic-b", "other", 0..BUNDLES),
    ] {
        let b = server.enroll(site, host);
        let store = b.store();
        let agent = b.client(&server);
        for i in hours {
            let (check, outcome) = event(host, i);
            let mut d = Draft::new(check, outcome);
            let at = base + SignedDuration::from_hours(i as i64);
            d.timestamp_start = at;
            d.timestamp_end = Some(at + SignedDuration::from_secs(30));
            d.pre_state = serde_json::json!({ "hour": i });
            if outcome == Outcome::Failed {
                d.error = Some("restic: repository is locked".into());
            }
            let stored = store.store(d).expect("store bundle");
            let (json, sig) = common::read_bundle(&stored.dir);
            let (status, body) = upload(
                &agent,
                &format!("{}/api/v1/evidence", server.url()),
                &json,
                &sig,
            );
            assert_eq!(status, 200, "{site}/{host} bundle {i}: {body}");
        }
        boxes.push(b);
    }
    World {
        server,
        base,
        _boxes: boxes,
    }
}

impl World {
    fn request(&self, out: &Path) -> ExportRequest {
        ExportRequest {
            site_id: SITE.into(),
            from: self.base + SignedDuration::from_mins(150),
            to: self.base + SignedDuration::from_mins(450),
            out: out.to_owned(),
        }
    }

    fn log_vkey(&self) -> PathBuf {
        common::state_dir(&self.server).join("log.vkey")
    }
}

/// The `sh` blocks of the export's README, in order.
fn readme_blocks(dir: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(dir.join(format::README_FILE))?;
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    Ok(blocks)
}

/// Runs every README block in `dir` as the auditor would, with the agent's binary on
/// PATH and LOG_KEY from a box; returns each block's (success, output).
fn run_readme(
    dir: &Path,
    log_key: &Path,
) -> Result<Vec<(bool, String)>, Box<dyn std::error::Error>> {
    let agent = common::agent_binary();
    let path = format!(
        "{}:{}",
        agent.parent().ok_or("agent dir")?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut out = Vec::new();
    for block in readme_blocks(dir)? {
        let o = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &block])
            .current_dir(dir)
            .env("PATH", &path)
            .env("LOG_KEY", log_key)
            .output()?;
        out.push((
            o.status.success(),
            format!(
                "{block}--- stdout\n{}--- stderr\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ));
    }
    Ok(out)
}

fn bundle_dirs(dir: &Path, host: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("hosts").join(host).join("bundles"))
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            let mut p = std::fs::metadata(&target)?.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            p.set_readonly(false);
            std::fs::set_permissions(&target, p)?;
        }
    }
    Ok(())
}

/// An insider with the server's export key: rewrites the manifest over the files as they
/// now are and signs it again.
fn resign(dir: &Path, server: &TestServer) -> TestResult {
    let key = mcp_server::export::export_key(server.svc())?;
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                let name = r.to_string_lossy().into_owned();
                if name != format::MANIFEST_FILE && name != format::MANIFEST_SIG_FILE {
                    files.insert(
                        name,
                        compliance_agent::crypto::sha256(&std::fs::read(e.path())?),
                    );
                }
            }
        }
    }
    let text = format::manifest_text(&files);
    std::fs::write(dir.join(format::MANIFEST_FILE), &text)?;
    std::fs::write(
        dir.join(format::MANIFEST_SIG_FILE),
        key.sign(text.as_bytes()),
    )?;
    Ok(())
}

fn verify_with_box_key(
    dir: &Path,
    w: &World,
) -> Result<format::ExportVerifyReport, Box<dyn std::error::Error>> {
    let vkey = std::fs::read_to_string(w.log_vkey())?;
    let trusted = TrustedKeys {
        log_key: Some(compliance_agent::tlog::LogVerifier::from_vkey(vkey.trim())?),
        export_key: None,
    };
    Ok(format::verify(dir, &trusted)?)
}

/// Invariant: an honest export of a site of several hosts passes every command of its own
/// README, holds exactly the site's bundles of the period plus one on each side, and its
/// reports and OSCAL findings say what the bundles say.
#[test]
fn a_site_export_verifies_by_its_readme_commands() -> TestResult {
    let w = world();
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("export");
    let summary = export(w.server.svc(), &admin(), &w.request(&out))?;
    assert!(summary.problems.is_empty(), "{:?}", summary.problems);
    assert_eq!(summary.hosts, 3, "only the site's hosts");
    // h1, h2: hours 3..=7 in the period (seq 4..8) plus seq 3 and 9; h3: hours 4..=6, seq 1..3.
    assert_eq!((summary.bundles, summary.in_period), (7 + 7 + 3, 5 + 5 + 3));
    assert!(!out.join("hosts/other").exists(), "no host of another site");
    let names: Vec<String> = bundle_dirs(&out, "h1")
        .iter()
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy()[..20].to_owned())
        .collect();
    assert_eq!(
        names,
        (3..=9).map(|s| format!("{s:020}")).collect::<Vec<_>>(),
        "h1's bundles are seq 3 to 9"
    );

    for (ok, output) in run_readme(&out, &w.log_vkey())? {
        assert!(ok, "a README command failed:\n{output}");
    }
    let report = verify_with_box_key(&out, &w)?;
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.log_key_source, "given");
    assert_eq!(report.observations_checked, 13);

    let h2: format::HostReport =
        serde_json::from_slice(&std::fs::read(out.join("hosts/h2/report.json"))?)?;
    assert_eq!(
        (h2.first_seq, h2.last_seq, h2.newest_seq),
        (Some(3), Some(9), Some(10))
    );
    assert_eq!(h2.outcomes["backup"]["failed"], 1, "{:?}", h2.outcomes);
    let h3: format::HostReport =
        serde_json::from_slice(&std::fs::read(out.join("hosts/h3/report.json"))?)?;
    assert_eq!(
        (h3.first_seq, h3.newest_seq, h3.gaps.len()),
        (Some(1), Some(3), 0)
    );

    let doc: Value = serde_json::from_slice(&std::fs::read(out.join(format::OSCAL_FILE))?)?;
    let ar = &doc["assessment-results"];
    assert_eq!(ar["metadata"]["oscal-version"], "1.1.3");
    let findings = ar["results"][0]["findings"].as_array().ok_or("findings")?;
    let state = |citation: &str| -> Option<String> {
        findings
            .iter()
            .find(|f| f["title"] == format!("HIPAA {citation}"))
            .and_then(|f| f["target"]["status"]["state"].as_str().map(str::to_owned))
    };
    // h2's last backup of the period failed: the backup controls are not satisfied.
    assert_eq!(
        state("164.308(a)(7)(ii)(A)").as_deref(),
        Some("not-satisfied")
    );
    // The firewall was a success on every host at the end of the period.
    assert_eq!(state("164.312(e)(1)").as_deref(), Some("satisfied"));
    // Nothing of the period evidences the SBOM control.
    assert_eq!(state("164.308(a)(8)").as_deref(), Some("not-satisfied"));
    Ok(())
}

/// Invariant: removing a bundle, changing a bundle's bytes or dropping one proof makes the export
/// fail its README's checks, and still fails `compliance-agent export verify` when an
/// insider re-signs the manifest with the server's export key.
#[test]
fn a_removed_bundle_a_changed_byte_or_a_missing_proof_is_caught() -> TestResult {
    let w = world();
    let tmp = tempfile::tempdir()?;
    let honest = tmp.path().join("export");
    export(w.server.svc(), &admin(), &w.request(&honest))?;
    type Tamper = fn(&Path) -> TestResult;
    let cases: [(&str, Tamper, &str); 4] = [
        (
            "a bundle of the period removed",
            |d| Ok(std::fs::remove_dir_all(&bundle_dirs(d, "h2")[3])?),
            "are missing between",
        ),
        (
            "the failed backup rewritten as a success",
            |d| {
                let target = bundle_dirs(d, "h2")
                    .into_iter()
                    .map(|p| p.join("bundle.json"))
                    .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\"failed\"")))
                    .ok_or("the failed bundle")?;
                let text = std::fs::read_to_string(&target)?;
                std::fs::write(&target, text.replacen("\"failed\"", "\"success\"", 1))?;
                Ok(())
            },
            "bundle.sig does not verify",
        ),
        (
            "an inclusion proof removed",
            |d| {
                Ok(std::fs::remove_file(
                    bundle_dirs(d, "h1")[2].join("inclusion.json"),
                )?)
            },
            "no inclusion proof",
        ),
        (
            "the newest bundle of the period cut from a host, with its successor",
            |d| {
                let dirs = bundle_dirs(d, "h1");
                std::fs::remove_dir_all(&dirs[dirs.len() - 1])?;
                std::fs::remove_dir_all(&dirs[dirs.len() - 2])?;
                Ok(())
            },
            "neither a later bundle nor the report",
        ),
    ];
    for (what, tamper, named) in cases {
        let dir = tmp.path().join(what.replace(' ', "-"));
        copy_tree(&honest, &dir)?;
        tamper(&dir)?;
        let results = run_readme(&dir, &w.log_vkey())?;
        assert!(
            results.iter().any(|(ok, _)| !ok),
            "{what}: every README command still passes"
        );
        let last = results.last().ok_or("a compliance-agent block")?;
        assert!(
            !last.0,
            "{what}: compliance-agent export verify passed:\n{}",
            last.1
        );

        resign(&dir, &w.server)?;
        let report = verify_with_box_key(&dir, &w)?;
        assert!(
            report.problems.iter().any(|p| p.contains(named)),
            "{what}, manifest re-signed: no problem names {named:?}: {:?}",
            report.problems
        );
        assert!(
            !report.problems.iter().any(|p| p.contains("manifest")),
            "{what}: the re-signed manifest itself is consistent: {:?}",
            report.problems
        );
    }
    Ok(())
}

/// Invariant: the assessment results are valid OSCAL 1.1.3, for compliance-trestle's own
/// models (`trestle validate` in a trestle workspace) and for NIST's JSON schema of
/// assessment results (check-jsonschema); and both checks are real: a document without
/// its import-ap, or with a HIPAA citation as a control id, fails them.
#[test]
fn the_assessment_results_are_valid_oscal_for_trestle_and_the_nist_schema() -> TestResult {
    let venv = std::env::var_os("COMPLIANCE_TEST_VENV")
        .map(PathBuf::from)
        .expect("COMPLIANCE_TEST_VENV is not set: run the suite through tests/run, which makes the virtualenv with compliance-trestle and check-jsonschema");
    let schema = std::env::var_os("COMPLIANCE_OSCAL_AR_SCHEMA")
        .map(PathBuf::from)
        .expect(
            "COMPLIANCE_OSCAL_AR_SCHEMA is not set: tests/run fetches NIST's OSCAL 1.1.3 schema",
        );
    let (trestle, check) = (venv.join("bin/trestle"), venv.join("bin/check-jsonschema"));
    for tool in [&trestle, &check, &schema] {
        assert!(
            tool.exists(),
            "{} is missing (tests/run makes it)",
            tool.display()
        );
    }
    let w = world();
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("export");
    export(w.server.svc(), &admin(), &w.request(&out))?;
    let ws = tmp.path().join("trestle");
    std::fs::create_dir(&ws)?;
    let run = |tool: &Path, args: &[&str]| -> Result<(bool, String), Box<dyn std::error::Error>> {
        let o = Command::new(tool).args(args).current_dir(&ws).output()?;
        Ok((
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ))
    };
    let (ok, text) = run(&trestle, &["init"])?;
    assert!(ok, "trestle init: {text}");
    let model = ws.join("assessment-results/site-export");
    std::fs::create_dir_all(&model)?;
    let file = model.join("assessment-results.json");
    std::fs::copy(out.join(format::OSCAL_FILE), &file)?;
    let trestle_validate = ["validate", "-t", "assessment-results", "-n", "site-export"];
    let nist_validate = [
        "--schemafile",
        schema.to_str().ok_or("schema path")?,
        file.to_str().ok_or("file path")?,
    ];
    let (ok, text) = run(&trestle, &trestle_validate)?;
    assert!(ok && text.contains("VALID"), "trestle validate: {text}");
    let (ok, text) = run(&check, &nist_validate)?;
    assert!(ok, "the NIST schema: {text}");

    let original: Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let mut no_plan = original.clone();
    no_plan["assessment-results"]
        .as_object_mut()
        .ok_or("object")?
        .remove("import-ap");
    let mut citation = original;
    citation["assessment-results"]["results"][0]["reviewed-controls"]["control-selections"][0]["include-controls"]
        [0]["control-id"] = "164.308(a)(1)(ii)(B)".into();
    for (what, doc) in [
        ("without import-ap", no_plan),
        ("with a citation as control id", citation),
    ] {
        std::fs::write(&file, serde_json::to_vec(&doc)?)?;
        let (ok, text) = run(&check, &nist_validate)?;
        assert!(!ok, "the NIST schema accepted a document {what}: {text}");
        if what == "without import-ap" {
            let (ok, text) = run(&trestle, &trestle_validate)?;
            assert!(
                !ok || !text.contains(" VALID"),
                "trestle accepted a document {what}: {text}"
            );
        }
    }
    Ok(())
}

/// Invariant: an export outside the caller's scope, of an empty period or over an
/// existing directory is refused with the reason, writes nothing, and the refusal is in
/// the audit log.
#[test]
fn an_export_outside_scope_or_of_a_bad_period_is_refused_and_audited() -> TestResult {
    let w = world();
    let tmp = tempfile::tempdir()?;
    let auditor_b = Caller {
        actor: "operator:auditor-b".into(),
        role: Role::Auditor,
        tenants: Tenants::Sites {
            site_ids: vec!["clinic-b".into()],
        },
        peer: None,
    };
    let out = tmp.path().join("export");
    let e = export(w.server.svc(), &auditor_b, &w.request(&out))
        .err()
        .ok_or("another site's auditor exported clinic-a")?;
    assert!(e.to_string().contains(SITE), "{e}");
    assert!(!out.exists(), "nothing written");
    assert!(
        std::fs::read_dir(tmp.path())?.next().is_none(),
        "no partial export left behind"
    );
    let audit = w.server.svc().store.audit(&admin(), 20)?;
    assert!(
        audit.iter().any(|a| a.action == "site.export"
            && a.actor == "operator:auditor-b"
            && a.outcome != "ok"),
        "the refusal is audited: {audit:?}"
    );

    // The auditor of the site may export it.
    let auditor_a = Caller {
        actor: "operator:auditor-a".into(),
        tenants: Tenants::Sites {
            site_ids: vec![SITE.into()],
        },
        ..auditor_b.clone()
    };
    export(w.server.svc(), &auditor_a, &w.request(&out))?;
    assert!(verify_with_box_key(&out, &w)?.ok());

    let again = export(w.server.svc(), &auditor_a, &w.request(&out))
        .err()
        .ok_or("an export over an existing directory")?;
    assert!(again.to_string().contains("exists"), "{again}");
    let mut empty = w.request(&tmp.path().join("empty"));
    empty.to = empty.from;
    let e = export(w.server.svc(), &admin(), &empty)
        .err()
        .ok_or("an empty period")?;
    assert!(e.to_string().contains("period is empty"), "{e}");
    Ok(())
}
