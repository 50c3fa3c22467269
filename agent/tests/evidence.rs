//! The evidence store against real files: OpenSSL interoperability, tampering, pruning, recovery, concurrency.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{self, Check, Filter, Outcome, VerifyReport};

fn verify(dir: &Path, seed: u8) -> VerifyReport {
    let key = SigningKey::from_seed(&[seed; 32]).verifying_key();
    evidence::verify(&dir.join("evidence"), &key).expect("verification runs")
}

/// Asserts that verification fails and that some problem names `needle`.
fn assert_problem(report: &VerifyReport, needle: &str, what: &str) {
    assert!(!report.ok(), "{what}: verification must fail");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().contains(needle)),
        "{what}: expected a problem naming {needle}, got {:#?}",
        report.problems
    );
}

#[test]
fn openssl_verifies_a_bundle() -> TestResult {
    let openssl = require_tool("openssl");
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 1);
    let stored = fill(&store, 3);
    let pubkey = tmp.path().join("signing.pub.pem");
    fs::write(
        &pubkey,
        SigningKey::from_seed(&[1; 32])
            .verifying_key()
            .to_spki_pem()?,
    )?;
    for b in &stored {
        let out = Command::new(&openssl)
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(&pubkey)
            .arg("-rawin")
            .arg("-in")
            .arg(b.dir.join("bundle.json"))
            .arg("-sigfile")
            .arg(b.dir.join("bundle.sig"))
            .output()?;
        assert!(
            out.status.success(),
            "openssl rejects {}: {}",
            b.bundle_id,
            text(&out.stdout) + &text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("Signature Verified Successfully"),
            "openssl says {}",
            text(&out.stdout)
        );
    }
    // The fingerprint in each bundle is the SHA-256 of the key's DER, as openssl computes it.
    let der = Command::new(&openssl)
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&pubkey)
        .output()?;
    let expected = format!(
        "SHA256:{}",
        compliance_agent::crypto::sha256_hex(&der.stdout)
    );
    let (bundle, _) = evidence::find(&tmp.path().join("evidence"), &stored[0].bundle_id)?;
    assert_eq!(
        bundle.signing_key_fingerprint, expected,
        "fingerprint reproducible with openssl"
    );
    Ok(())
}

#[test]
fn chain_links_and_layout() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 2);
    let stored = fill(&store, 5);
    for (i, b) in stored.iter().enumerate() {
        assert_eq!(b.seq, i as u64 + 1, "seq increases by one");
        let (bundle, dir) = evidence::find(&tmp.path().join("evidence"), &b.bundle_id)?;
        assert_eq!(dir, b.dir);
        let rel = dir.strip_prefix(tmp.path().join("evidence"))?;
        assert_eq!(
            rel.components().count(),
            4,
            "YYYY/MM/DD/<id>, got {}",
            rel.display()
        );
        let expected_prev = (i > 0).then(|| stored[i - 1].hash.clone());
        assert_eq!(
            bundle.prev_hash, expected_prev,
            "prev_hash is the previous bundle.json's SHA-256"
        );
        assert_eq!(bundle.site_id, "clinic-1");
        assert_eq!(bundle.reseller_id.as_deref(), Some("acme-msp"));
        assert!(!bundle.hipaa_controls.is_empty());
        let sig = fs::read(dir.join("bundle.sig"))?;
        assert_eq!(sig.len(), 64, "raw 64-byte signature");
    }
    let report = verify(tmp.path(), 2);
    assert!(report.ok(), "fresh chain verifies: {:?}", report.problems);
    assert_eq!((report.bundles, report.signatures_valid), (5, 5));
    Ok(())
}

#[test]
fn flipped_byte_is_named() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 3), 6);
    let victim = &stored[2];
    let path = victim.dir.join("bundle.json");
    let mut bytes = fs::read(&path)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&path, bytes)?;
    let report = verify(tmp.path(), 3);
    assert_problem(&report, &victim.bundle_id, "flipped byte");
    assert_problem(&report, "changed after signing", "flipped byte");
    Ok(())
}

#[test]
fn deleted_bundle_is_a_gap() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 4), 6);
    fs::remove_dir_all(&stored[3].dir)?;
    let report = verify(tmp.path(), 4);
    assert_problem(&report, "seq 4 is missing", "deleted bundle");
    assert_problem(
        &report,
        &stored[4].bundle_id,
        "deleted bundle names its successor",
    );
    // Deleting the newest bundle leaves no gap; the head record still catches it.
    fs::remove_dir_all(&stored[5].dir)?;
    let report = verify(tmp.path(), 4);
    assert_problem(&report, "newest bundles deleted", "deleted tail");
    Ok(())
}

#[test]
fn swapped_bundles_are_named() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 5), 4);
    let (a, b) = (&stored[1], &stored[2]);
    let parked = tmp.path().join("parked");
    fs::rename(&a.dir, &parked)?;
    fs::rename(&b.dir, &a.dir)?;
    fs::rename(&parked, &b.dir)?;
    let report = verify(tmp.path(), 5);
    assert_problem(
        &report,
        &format!("bundle {} (seq", a.bundle_id),
        "swap names the first",
    );
    assert_problem(
        &report,
        &format!("bundle {} (seq", b.bundle_id),
        "swap names the second",
    );
    assert_problem(&report, "moved or swapped", "swap");
    Ok(())
}

#[test]
fn missing_signature_is_named() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 6), 3);
    fs::remove_file(stored[1].dir.join("bundle.sig"))?;
    let report = verify(tmp.path(), 6);
    assert_problem(&report, &stored[1].bundle_id, "missing sig");
    assert_problem(&report, "unsigned", "missing sig");
    fs::write(stored[1].dir.join("bundle.sig"), [0u8; 10])?;
    assert_problem(&verify(tmp.path(), 6), "10 bytes", "short sig");
    Ok(())
}

#[test]
fn bundle_resigned_with_another_key_is_named() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 7), 3);
    let intruder = SigningKey::from_seed(&[99; 32]);
    let json = fs::read(stored[1].dir.join("bundle.json"))?;
    fs::write(stored[1].dir.join("bundle.sig"), intruder.sign(&json))?;
    let report = verify(tmp.path(), 7);
    assert_problem(&report, &stored[1].bundle_id, "re-signed");
    // A whole store checked against the wrong key fails on every bundle.
    let report = verify(tmp.path(), 8);
    assert_eq!(
        report.signatures_valid, 0,
        "no bundle verifies with another key"
    );
    assert_problem(&report, "signed by another key", "wrong key");
    Ok(())
}

#[test]
fn edited_and_resigned_bundle_breaks_the_chain() -> TestResult {
    // An attacker with the key can re-sign an edited bundle, but the next bundle's prev_hash exposes it.
    let tmp = tempfile::tempdir()?;
    let stored = fill(&open_store(tmp.path(), 9), 4);
    let key = SigningKey::from_seed(&[9; 32]);
    let path = stored[1].dir.join("bundle.json");
    let edited = text(&fs::read(&path)?).replace("\"success\"", "\"failed\"");
    fs::write(&path, &edited)?;
    fs::write(
        stored[1].dir.join("bundle.sig"),
        key.sign(edited.as_bytes()),
    )?;
    let report = verify(tmp.path(), 9);
    assert_problem(&report, &stored[2].bundle_id, "edited and re-signed");
    assert_problem(&report, "chain is broken", "edited and re-signed");
    Ok(())
}

#[test]
fn prune_keeps_the_chain_verifiable() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 10);
    let stored = fill(&store, 20);
    // Everything is "old" when judged from a year ahead.
    let later = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(24 * 365))?;
    let report = store.prune(5, 90, later)?;
    assert_eq!(report.pruned, 15, "all but the 5 newest are pruned");
    let checkpoint = report.checkpoint.ok_or("a checkpoint is written")?;
    assert_eq!(checkpoint.seq, 21, "the checkpoint continues the chain");
    for b in &stored[..15] {
        assert!(!b.dir.exists(), "{} was pruned", b.bundle_id);
    }
    let verified = verify(tmp.path(), 10);
    assert!(
        verified.ok(),
        "pruned chain verifies: {:?}",
        verified.problems
    );
    assert_eq!(verified.pruned_through_seq, Some(15));
    assert_eq!(verified.bundles, 6);

    // Nothing is young enough to keep by age and only 5 are kept by count; a second prune removes the old checkpoint's predecessors.
    let again = store.prune(5, 90, later)?;
    assert_eq!(again.pruned, 1, "one more beyond the newest 5");
    let verified = verify(tmp.path(), 10);
    assert!(
        verified.ok(),
        "twice-pruned chain verifies: {:?}",
        verified.problems
    );

    // Deleting the oldest survivor now is detected: the checkpoint does not cover it.
    let oldest = evidence::list(&tmp.path().join("evidence"), &Filter::default())?
        .into_iter()
        .min_by_key(|s| s.seq)
        .ok_or("bundles remain")?;
    fs::remove_dir_all(&oldest.dir)?;
    assert_problem(
        &verify(tmp.path(), 10),
        "no retention checkpoint accounts",
        "deleted beyond the checkpoint",
    );
    Ok(())
}

#[test]
fn prune_respects_retention_age() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 11);
    fill(&store, 10);
    let report = store.prune(0, 90, jiff::Timestamp::now())?;
    assert_eq!(report.pruned, 0, "nothing is older than 90 days");
    assert!(report.checkpoint.is_none());
    Ok(())
}

#[test]
fn head_record_is_rebuilt_and_pending_writes_resolve() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("evidence");
    {
        let store = open_store(tmp.path(), 12);
        fill(&store, 3);
    }
    fs::remove_file(root.join(".chain-head.json"))?;
    let store = open_store(tmp.path(), 12);
    let next = store.store(draft(Check::Logging, Outcome::Alert, 0))?;
    assert_eq!(next.seq, 4, "head rebuilt from the bundles on disk");

    // A stale head record (as after a crash between publishing and updating it) is resolved through pending.
    let head_before = fs::read(root.join(".chain-head.json"))?;
    let b5 = store.store(draft(Check::Logging, Outcome::Alert, 1))?;
    let mut stale: serde_json::Value = serde_json::from_slice(&head_before)?;
    stale["pending"] = serde_json::json!([{
        "seq": 5, "hash": b5.hash, "bundle_id": b5.bundle_id,
        "date": b5.dir.parent().and_then(|p| p.strip_prefix(&root).ok()).map(|p| p.display().to_string().replace('/', "-")),
    }]);
    fs::write(root.join(".chain-head.json"), serde_json::to_vec(&stale)?)?;
    let b6 = store.store(draft(Check::Logging, Outcome::Alert, 2))?;
    assert_eq!(b6.seq, 6, "pending bundle 5 counted as committed");
    // A garbage head record is rebuilt too.
    fs::write(root.join(".chain-head.json"), b"{not json")?;
    assert_eq!(
        store.store(draft(Check::Logging, Outcome::Alert, 3))?.seq,
        7
    );
    let report = verify(tmp.path(), 12);
    assert!(report.ok(), "{:?}", report.problems);
    Ok(())
}

#[test]
fn concurrent_writers_never_fork_the_chain() -> TestResult {
    let tmp = tempfile::tempdir()?;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let store = open_store(tmp.path(), 13);
                fill(&store, 25);
            });
        }
    });
    let report = verify(tmp.path(), 13);
    assert!(
        report.ok(),
        "four writers, one chain: {:?}",
        report.problems
    );
    assert_eq!(
        (report.first_seq, report.last_seq, report.bundles),
        (Some(1), Some(100), 100)
    );
    Ok(())
}

#[test]
fn store_many_is_one_chain_segment() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 14);
    let drafts = Check::ALL[..7]
        .iter()
        .enumerate()
        .map(|(i, c)| draft(*c, Outcome::Success, i))
        .collect();
    let stored = store.store_many(drafts)?;
    assert_eq!(
        stored.iter().map(|s| s.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert!(verify(tmp.path(), 14).ok());
    Ok(())
}

#[test]
fn queries_filter_and_count() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 15);
    fill(&store, 8);
    store.store(draft(Check::Encryption, Outcome::Alert, 0))?;
    let root = tmp.path().join("evidence");
    let all = evidence::list(&root, &Filter::default())?;
    assert_eq!(all.len(), 9);
    assert!(all.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
    let alerts = evidence::list(
        &root,
        &Filter {
            outcome: Some(Outcome::Alert),
            ..Filter::default()
        },
    )?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].check, Check::Encryption);
    let backups = evidence::list(
        &root,
        &Filter {
            check: Some(Check::Backup),
            limit: Some(1),
            ..Filter::default()
        },
    )?;
    assert_eq!(backups.len(), 1, "limit applies");
    let future = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(1))?;
    assert!(
        evidence::list(
            &root,
            &Filter {
                since: Some(future),
                ..Filter::default()
            }
        )?
        .is_empty()
    );
    assert_eq!(
        evidence::list(
            &root,
            &Filter {
                until: Some(future),
                ..Filter::default()
            }
        )?
        .len(),
        9
    );
    let stats = evidence::stats(&root)?;
    assert_eq!(stats.bundles, 9);
    assert_eq!(stats.by_check["encryption"]["alert"], 1);
    assert_eq!(stats.by_check["patching"]["success"], 2);
    assert_eq!((stats.first_seq, stats.last_seq), (Some(1), Some(9)));
    assert!(stats.bytes > 9 * 64);
    assert!(matches!(
        evidence::find(&root, "no-such-id"),
        Err(evidence::EvidenceError::NotFound(_))
    ));
    Ok(())
}

#[test]
fn bad_drafts_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 16);
    let mut d = draft(Check::Backup, Outcome::Success, 0);
    d.hipaa_controls = Some(vec!["not-a-control".into()]);
    assert!(store.store(d).is_err(), "invalid control citation refused");
    let mut d = draft(Check::Backup, Outcome::Success, 0);
    d.timestamp_end = Some(
        d.timestamp_start
            .checked_sub(jiff::SignedDuration::from_secs(5))?,
    );
    assert!(store.store(d).is_err(), "end before start refused");
    assert_eq!(
        evidence::stats(&tmp.path().join("evidence"))?.bundles,
        0,
        "nothing half-written"
    );
    Ok(())
}

#[test]
fn nar_hash_matches_nix() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("system");
    fs::create_dir_all(root.join("sw/bin"))?;
    fs::write(root.join("nixos-version"), "25.11.20251120.abcdef0\n")?;
    fs::write(root.join("sw/bin/activate"), "#!/bin/sh\necho hi\n")?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        root.join("sw/bin/activate"),
        fs::Permissions::from_mode(0o755),
    )?;
    std::os::unix::fs::symlink(
        "/nix/store/00000000000000000000000000000000-kernel",
        root.join("kernel"),
    )?;
    fs::write(root.join("empty"), "")?;
    fs::write(root.join("seven"), "1234567")?;
    let ours = compliance_agent::nar::nar_hash(&root)?;
    let out = nix_command("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(&root)
        .output()?;
    assert!(
        out.status.success(),
        "nix-hash failed: {}",
        text(&out.stderr)
    );
    assert_eq!(
        ours,
        format!("sha256:{}", text(&out.stdout).trim()),
        "our NAR hash equals nix-hash's"
    );
    let system = compliance_agent::nixos::RunningSystem::detect_at(&root);
    assert_eq!(system.identity.nar_hash.as_deref(), Some(ours.as_str()));
    assert_eq!(
        system.nixos_revision.as_deref(),
        Some("25.11.20251120.abcdef0")
    );
    Ok(())
}
