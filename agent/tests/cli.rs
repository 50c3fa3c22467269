//! The binary as a user and an auditor run it: keygen, config check, evidence commands, and SIGKILL at random moments.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;

#[test]
fn keygen_writes_openssl_readable_keys_and_never_overwrites() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("keys");
    let out = agent(None, &["keygen", "--out", &out_dir.display().to_string()]);
    assert!(out.status.success(), "keygen: {}", text(&out.stderr));
    let mode = fs::metadata(out_dir.join("signing.key"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "private key mode");
    let openssl = require_tool("openssl");
    let check = Command::new(&openssl)
        .args(["pkey", "-noout", "-in"])
        .arg(out_dir.join("signing.key"))
        .output()?;
    assert!(
        check.status.success(),
        "openssl reads the private key: {}",
        text(&check.stderr)
    );
    let check = Command::new(&openssl)
        .args(["pkey", "-pubin", "-noout", "-in"])
        .arg(out_dir.join("signing.pub.pem"))
        .output()?;
    assert!(
        check.status.success(),
        "openssl reads the public key: {}",
        text(&check.stderr)
    );
    let before = fs::read(out_dir.join("signing.key"))?;
    let again = agent(None, &["keygen", "--out", &out_dir.display().to_string()]);
    assert!(!again.status.success(), "second keygen must refuse");
    assert!(
        text(&again.stderr).contains("refusing to overwrite"),
        "says why: {}",
        text(&again.stderr)
    );
    assert_eq!(
        fs::read(out_dir.join("signing.key"))?,
        before,
        "key untouched"
    );

    // A key made by stock OpenSSL signs evidence too.
    let ossl_key = tmp.path().join("openssl.key");
    let made = Command::new(&openssl)
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&ossl_key)
        .output()?;
    assert!(
        made.status.success(),
        "openssl genpkey: {}",
        text(&made.stderr)
    );
    let key = compliance_agent::crypto::SigningKey::load(&ossl_key)?;
    let pem = Command::new(&openssl)
        .args(["pkey", "-pubout", "-in"])
        .arg(&ossl_key)
        .output()?;
    let public = compliance_agent::crypto::VerifyingKey::from_spki_pem(&text(&pem.stdout))?;
    assert_eq!(
        key.verifying_key(),
        public,
        "same public key as openssl derives"
    );
    Ok(())
}

#[test]
fn config_check_reports_every_problem_with_exit_1() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("bad.toml");
    fs::write(
        &config,
        "site_id = \"clinic-1\"\ndeployment_mode = \"reseller\"\nmaintenance_window = \"25:00-26:00\"\nlog_level = \"chatty\"\nsigning_key_file = \"/nonexistent/key\"\n",
    )?;
    let out = agent(Some(&config), &["config", "check"]);
    assert_eq!(out.status.code(), Some(1), "invalid config exits 1");
    let err = text(&out.stderr);
    for needle in [
        "reseller_id",
        "maintenance_window",
        "log_level",
        "signing_key_file",
        "keygen",
    ] {
        assert!(err.contains(needle), "message names {needle}: {err}");
    }
    let out = agent(Some(&config), &["config", "check", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["valid"], false);
    assert_eq!(json["problems"].as_array().map(Vec::len), Some(4), "{json}");

    let good = configured_box(tmp.path());
    fs::write(tmp.path().join("api-key"), "s3cret-api-key-value")?;
    let mut text_cfg = fs::read_to_string(&good)?;
    text_cfg.push_str(&format!(
        "mcp_api_key_file = \"{}\"\n",
        tmp.path().join("api-key").display()
    ));
    fs::write(&good, text_cfg)?;
    let out = agent(Some(&good), &["config", "check"]);
    assert!(out.status.success(), "valid config: {}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("site_id = \"clinic-1\""), "{shown}");
    assert!(
        shown.contains("api-key"),
        "secret shown as its path: {shown}"
    );
    assert!(
        !shown.contains("s3cret-api-key-value"),
        "secret contents never printed"
    );
    Ok(())
}

#[test]
fn evidence_commands_end_to_end() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let cfg = Some(config.as_path());
    let out = agent(
        cfg,
        &[
            "evidence",
            "add",
            "--check",
            "backup",
            "--outcome",
            "success",
            "--note",
            "restored /srv/ehr/canary by hand",
        ],
    );
    assert!(out.status.success(), "add: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 36, "prints the bundle id, got {id:?}");
    let out = agent(
        cfg,
        &[
            "evidence",
            "add",
            "--check",
            "encryption",
            "--outcome",
            "alert",
            "--controls",
            "164.312(a)(2)(iv)",
        ],
    );
    assert!(out.status.success());
    let bad = agent(
        cfg,
        &[
            "evidence",
            "add",
            "--check",
            "vibes",
            "--outcome",
            "success",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("use one of patching"),
        "{}",
        text(&bad.stderr)
    );

    let out = agent(cfg, &["evidence", "show", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        shown["bundle"]["post_state"]["note"],
        "restored /srv/ehr/canary by hand"
    );
    assert!(
        shown["signature"]
            .as_str()
            .is_some_and(|s| s.starts_with("valid")),
        "{shown}"
    );

    let out = agent(
        cfg,
        &["evidence", "list", "--check", "encryption", "--json"],
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(listed[0]["hipaa_controls"][0], "164.312(a)(2)(iv)");
    let out = agent(
        cfg,
        &[
            "evidence",
            "list",
            "--since",
            "2000-01-01",
            "--until",
            "2999-12-31",
        ],
    );
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "header and two bundles: {}",
        text(&out.stdout)
    );
    let out = agent(cfg, &["evidence", "list", "--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(2), "bad date is an error");

    let out = agent(cfg, &["evidence", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(stats["bundles"], 2);

    let out = agent(cfg, &["evidence", "verify"]);
    assert!(out.status.success(), "verify: {}", text(&out.stdout));
    // The auditor's form: no config, just the directory and the public key.
    let out = agent(
        None,
        &[
            "evidence",
            "verify",
            "--dir",
            &tmp.path().join("evidence").display().to_string(),
            "--pubkey",
            &tmp.path()
                .join("keys/signing.pub.pem")
                .display()
                .to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "auditor verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let other = tmp.path().join("other");
    let out = agent(None, &["keygen", "--out", &other.display().to_string()]);
    assert!(out.status.success());
    let out = agent(
        cfg,
        &[
            "evidence",
            "verify",
            "--pubkey",
            &other.join("signing.pub.pem").display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "another key fails verification");
    assert!(
        text(&out.stdout).contains("signed by another key"),
        "{}",
        text(&out.stdout)
    );

    let out = agent(
        cfg,
        &["evidence", "prune", "--keep", "1", "--retention-days", "1"],
    );
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("nothing to prune"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

#[test]
fn embedded_default_creates_a_key_and_writes_evidence() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let out = Command::new(agent_bin())
        .args([
            "evidence",
            "add",
            "--check",
            "time_sync",
            "--outcome",
            "success",
        ])
        .current_dir(tmp.path())
        .env_remove("COMPLIANCE_AGENT_CONFIG")
        .env_remove("XDG_STATE_HOME")
        .output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("created a new evidence signing key"),
        "says where the key is: {}",
        text(&out.stderr)
    );
    assert!(tmp.path().join("compliance-state/signing.key").exists());
    let out = Command::new(agent_bin())
        .args(["evidence", "verify"])
        .current_dir(tmp.path())
        .env_remove("COMPLIANCE_AGENT_CONFIG")
        .env_remove("XDG_STATE_HOME")
        .output()?;
    assert!(out.status.success(), "{}", text(&out.stdout));
    Ok(())
}

/// `evidence add` killed with SIGKILL at random moments, 220 times: afterwards
/// the chain verifies, no half bundle or temp file is visible, and every id
/// the writer printed is there.
#[test]
fn sigkill_at_random_moments_loses_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let evidence_dir = tmp.path().join("evidence");
    let add = |config: &std::path::Path| {
        Command::new(agent_bin())
            .arg("--config")
            .arg(config)
            .args([
                "evidence",
                "add",
                "--check",
                "backup",
                "--outcome",
                "success",
                "--note",
                "crash test",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
    };
    // Calibrate: how long one add takes on this machine.
    let mut durations = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let out = add(&config)?.wait_with_output()?;
        assert!(out.status.success());
        durations.push(start.elapsed());
    }
    durations.sort();
    let typical = durations[2];
    let mut rng = rand::thread_rng();
    let mut printed: Vec<String> = Vec::new();
    let (mut killed_early, mut finished) = (0, 0);
    for _ in 0..220 {
        let mut child = add(&config)?;
        let delay = typical.mul_f64(rng.gen_range(0.0..1.3));
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output()?;
        let id = text(&out.stdout).trim().to_owned();
        if id.len() == 36 {
            printed.push(id);
            finished += 1;
        } else {
            killed_early += 1;
        }
    }
    assert!(
        killed_early > 20,
        "the kills must interrupt writers (only {killed_early} did)"
    );
    // One clean writer afterwards: it cleans what crashed writers left in .tmp.
    let out = add(&config)?.wait_with_output()?;
    assert!(out.status.success());
    let out = agent(Some(&config), &["evidence", "verify"]);
    assert!(
        out.status.success(),
        "chain verifies after {killed_early} kills: {}",
        text(&out.stdout)
    );
    for id in &printed {
        assert!(
            compliance_agent::evidence::find(&evidence_dir, id).is_ok(),
            "bundle {id} was reported stored but is missing"
        );
    }
    let leftovers: Vec<_> = fs::read_dir(evidence_dir.join(".tmp"))?.collect();
    assert!(
        leftovers.is_empty(),
        "no temp bundles remain: {leftovers:?}"
    );
    eprintln!(
        "crash test: {killed_early} writers killed before reporting, {finished} finished, typical add {typical:?}"
    );
    let _ = Duration::ZERO;
    Ok(())
}

/// Runs `script` with `sh` in a private mount namespace (so it may mount a tmpfs) and returns its stdout.
fn in_mount_namespace(script: &str) -> String {
    let out = Command::new(require_tool("unshare"))
        .args(["-rm", "sh", "-c", script])
        .env_remove("COMPLIANCE_AGENT_CONFIG")
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "namespace script failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Invariant (item 6): on a full disk an add reports exactly what happened:
/// exit 0 with the id only if the bundle is stored, otherwise an error and no
/// bundle; afterwards the chain verifies and continues without reuse or gap.
/// Checked for every number of free inodes from 0 to 7 around a write.
#[test]
fn a_full_disk_never_reports_failure_for_what_was_stored() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let evidence_dir = tmp.path().join("evidence");
    fs::create_dir_all(&evidence_dir)?;
    for free in 0..8 {
        let script = format!(
            r#"A="{agent} --config {config}"; EV="{ev}"
mount -t tmpfs -o size=16m,nr_inodes=300 tmpfs "$EV" || exit 1
for i in 1 2 3; do $A evidence add --check backup --outcome success >/dev/null || exit 1; done
mkdir "$EV/fill"; i=0
while (: > "$EV/fill/$i") 2>/dev/null; do i=$((i+1)); done
j=0; while [ $j -lt {free} ]; do rm "$EV/fill/$j"; j=$((j+1)); done
id=$($A evidence add --check firewall --outcome failed --note "BAD EVENT" 2>"$EV/../add.err"); echo "RC=$?"
echo "ID=$id"; echo "ERR=$(tr '\n' ' ' < "$EV/../add.err")"
rm -rf "$EV/fill"
echo "LIST=$($A evidence list --json | tr -d '\n')"
$A evidence verify >/dev/null; echo "VRC=$?"
echo "NEXT=$($A evidence add --check backup --outcome success --json | tr -d '\n')"
"#,
            agent = agent_bin().display(),
            config = config.display(),
            ev = evidence_dir.display(),
        );
        let out = in_mount_namespace(&script);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_owned()
        };
        let listed: serde_json::Value = serde_json::from_str(&field("LIST"))?;
        let ids: Vec<&str> = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["bundle_id"].as_str())
            .collect();
        let id = field("ID");
        eprintln!(
            "full disk: {free} free inodes: add exit {}, {}",
            field("RC"),
            field("ERR")
        );
        if field("RC") == "0" {
            assert!(
                ids.contains(&id.as_str()),
                "{free} free inodes: add reported {id} stored but it is not there: {out}"
            );
        } else {
            assert!(
                id.is_empty() && ids.len() == 3,
                "{free} free inodes: add failed, so nothing may be stored: {out}"
            );
            assert!(
                field("ERR").contains("No space left"),
                "{free} free inodes: the failure says why: {out}"
            );
        }
        assert_eq!(
            field("VRC"),
            "0",
            "{free} free inodes: the chain verifies: {out}"
        );
        let next: serde_json::Value = serde_json::from_str(&field("NEXT"))?;
        assert_eq!(
            next["seq"].as_u64(),
            Some(ids.len() as u64 + 1),
            "{free} free inodes: the chain continues without reuse or gap: {out}"
        );
    }
    Ok(())
}

/// Invariant (items 2, 3, 9, 11): the CLI's exit code says the truth.
#[test]
fn cli_exit_codes_never_claim_success_for_failure() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let cfg = Some(config.as_path());
    let add = |note: &str| {
        agent(
            cfg,
            &[
                "evidence",
                "add",
                "--check",
                "backup",
                "--outcome",
                "success",
                "--note",
                note,
            ],
        )
    };
    let ids: Vec<String> = (0..4)
        .map(|i| text(&add(&format!("n{i}")).stdout).trim().to_owned())
        .collect();
    let evidence_dir = tmp.path().join("evidence");
    // An empty bundle.sig: verify exits 1 naming the bundle.
    let (_, dir) = compliance_agent::evidence::find(&evidence_dir, &ids[1])?;
    fs::write(dir.join("bundle.sig"), b"")?;
    let out = agent(cfg, &["evidence", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&ids[1]), "{}", text(&out.stdout));
    // evidence list marks it and exits 1.
    let out = agent(cfg, &["evidence", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.contains(&ids[1]) && l.contains("INVALID")),
        "{}",
        text(&out.stdout)
    );
    // A truncated bundle.json is named, never dropped silently.
    let (_, dir2) = compliance_agent::evidence::find(&evidence_dir, &ids[2])?;
    fs::write(dir2.join("bundle.json"), b"{\"vers")?;
    let out = agent(cfg, &["evidence", "list"]);
    assert!(
        text(&out.stderr).contains(&ids[2]),
        "unreadable bundle named: {}",
        text(&out.stderr)
    );
    // Retention 0 is refused as the config refuses it.
    let out = agent(
        cfg,
        &["evidence", "prune", "--keep", "0", "--retention-days", "0"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("at least 1"),
        "{}",
        text(&out.stderr)
    );
    // A bundle the channel could never send is refused at the writer.
    let chunk = vec!["164.308(a)(7)(ii)(A)"; 1000].join(",");
    let mut args = vec![
        "evidence",
        "add",
        "--check",
        "backup",
        "--outcome",
        "success",
    ];
    for _ in 0..30 {
        args.extend(["--controls", chunk.as_str()]);
    }
    let out = agent(cfg, &args);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("limit"), "{}", text(&out.stderr));
    // --dir inside a store is refused; an empty directory is no intact store.
    let day = dir.parent().ok_or("day")?.display().to_string();
    let pubkey = tmp
        .path()
        .join("keys/signing.pub.pem")
        .display()
        .to_string();
    let out = agent(
        None,
        &["evidence", "verify", "--dir", &day, "--pubkey", &pubkey],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("inside the evidence store"),
        "{}",
        text(&out.stderr)
    );
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty)?;
    let out = agent(
        None,
        &[
            "evidence",
            "verify",
            "--dir",
            &empty.display().to_string(),
            "--pubkey",
            &pubkey,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("no evidence bundles"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

/// Invariant (item 11): bad identity or key input is refused or said, never used silently.
#[test]
fn bad_identity_and_key_input_is_named() -> TestResult {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let body = fs::read_to_string(&config)?.replace("site_id = \"clinic-1\"", "site_id = \"\"");
    let empty_site = tmp.path().join("empty-site.toml");
    fs::write(&empty_site, body)?;
    let out = agent(Some(&empty_site), &["config", "check"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "site_id \"\" refused: {}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("site_id") || text(&out.stderr).contains("site_id"));
    let out = Command::new(agent_bin())
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .env("SITE_ID", std::ffi::OsStr::from_bytes(b"clinic-\xff"))
        .output()?;
    assert_ne!(
        out.status.code(),
        Some(0),
        "a non-UTF-8 override is refused"
    );
    assert!(
        text(&out.stderr).contains("SITE_ID"),
        "{}",
        text(&out.stderr)
    );
    let key = tmp.path().join("keys/signing.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o666))?;
    let out = agent(
        Some(&config),
        &[
            "evidence",
            "add",
            "--check",
            "backup",
            "--outcome",
            "success",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "said: {}",
        text(&out.stderr)
    );
    fs::write(&key, "")?;
    let out = agent(
        Some(&config),
        &[
            "evidence",
            "add",
            "--check",
            "backup",
            "--outcome",
            "success",
        ],
    );
    assert!(
        text(&out.stderr).contains("the file is empty"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
