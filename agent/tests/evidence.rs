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
fn pending_writes_resolve_without_an_alert() -> TestResult {
    // A head record left with `pending` (a crash between publishing and
    // rewriting it) is the writer's own state: resolved, no alert, no gap.
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("evidence");
    let store = open_store(tmp.path(), 12);
    fill(&store, 3);
    let announced = fs::read(root.join(".chain-head.json"))?;
    store.store(draft(Check::Logging, Outcome::Alert, 1))?;
    // Put back the record as it was before bundle 4 was announced: a valid,
    // signed record naming seq 3, while seq 4 exists. The writer must not
    // reuse seq 4; verify must name the inconsistency.
    fs::write(root.join(".chain-head.json"), &announced)?;
    assert_problem(
        &verify(tmp.path(), 12),
        "bundles up to seq 4 exist",
        "old head record put back",
    );
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

// ---------------------------------------------------------------------------
// The store against an insider and a hostile file system. Each test states the
// invariant it protects and checks it over generated cases.

use compliance_agent::evidence::{MAX_BUNDLE_BYTES, StoredBundle};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError};

fn prop_config(cases: u32) -> PropConfig {
    PropConfig {
        cases,
        failure_persistence: None,
        ..PropConfig::default()
    }
}

fn check(cond: bool, what: String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what))
    }
}

fn names(report: &VerifyReport, needle: &str) -> bool {
    report
        .problems
        .iter()
        .any(|p| p.bundle_id.as_deref() == Some(needle) || p.to_string().contains(needle))
}

/// Every bundle on disk, by seq.
fn bundles_by_seq(root: &Path) -> Vec<compliance_agent::evidence::Bundle> {
    let mut all: Vec<_> = evidence::bundle_refs(root)
        .expect("list")
        .into_iter()
        .filter_map(|r| evidence::read(&r.dir).ok())
        .collect();
    all.sort_by_key(|b| b.seq);
    all
}

/// How the head record is treated when the newest bundles are removed.
#[derive(Clone, Copy, Debug)]
enum HeadTamper {
    Keep,
    Delete,
    Garbage,
    Truncate,
    /// The newest bundles are hidden by renaming them to dot-names instead of deleting.
    HideBundles,
}

proptest! {
    #![proptest_config(prop_config(24))]

    /// Invariant (item 1): removing the newest bundles is never laundered by
    /// the next write. Before the write, verify names the problem; the write
    /// first records a signed evidence_integrity alert; a seq the head record
    /// recorded is never reused; and verify keeps reporting the gap afterwards.
    #[test]
    fn tail_deletion_is_never_laundered(
        n in 2usize..8,
        cut in 1usize..4,
        tamper in prop_oneof![
            Just(HeadTamper::Keep), Just(HeadTamper::Delete), Just(HeadTamper::Garbage),
            Just(HeadTamper::Truncate), Just(HeadTamper::HideBundles)
        ],
    ) {
        let cut = cut.min(n);
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("evidence");
        let store = open_store(tmp.path(), 40);
        let stored = fill(&store, n);
        let removed: Vec<&StoredBundle> = stored[n - cut..].iter().collect();
        for b in &removed {
            match tamper {
                HeadTamper::HideBundles => {
                    let hidden = b.dir.with_file_name(format!(".{}", b.bundle_id));
                    fs::rename(&b.dir, hidden).expect("hide");
                }
                _ => fs::remove_dir_all(&b.dir).expect("remove"),
            }
        }
        let head = root.join(".chain-head.json");
        match tamper {
            HeadTamper::Delete => fs::remove_file(&head).expect("rm head"),
            HeadTamper::Garbage => fs::write(&head, b"{\"seq\": 1}").expect("garbage"),
            HeadTamper::Truncate => fs::write(&head, b"").expect("truncate"),
            HeadTamper::Keep | HeadTamper::HideBundles => {}
        }
        let before = verify(tmp.path(), 40);
        check(!before.ok(), format!("{tamper:?}: verify must fail before the write"))?;

        let written = store
            .store_many(vec![draft(Check::Backup, Outcome::Success, 99)])
            .expect("the writer keeps working");
        check(written.len() == 2, format!("{tamper:?}: an alert comes first, got {written:?}"))?;
        let alert = evidence::read(&written[0].dir).expect("read alert");
        check(
            alert.check == Check::EvidenceIntegrity && alert.outcome == Outcome::Alert,
            format!("{tamper:?}: the first bundle is an integrity alert: {alert:?}"),
        )?;
        let head_survived = matches!(tamper, HeadTamper::Keep | HeadTamper::HideBundles);
        if head_survived {
            check(
                written[0].seq == n as u64 + 1,
                format!("{tamper:?}: no recorded seq is reused: alert at {} after head {n}", written[0].seq),
            )?;
            let missing = alert.pre_state["missing"].as_array().cloned().unwrap_or_default();
            for b in &removed {
                check(
                    missing.iter().any(|m| m["seq"] == b.seq && m["hash"] == b.hash.as_str()),
                    format!("{tamper:?}: the alert names seq {} and its hash: {missing:?}", b.seq),
                )?;
            }
        }
        let after = verify(tmp.path(), 40);
        check(!after.ok(), format!("{tamper:?}: the gap stays visible after the write"))?;
        check(
            names(&after, &written[0].bundle_id),
            format!("{tamper:?}: verify names the integrity alert: {:#?}", after.problems),
        )?;
        check(
            after.signatures_valid == after.bundles,
            format!("{tamper:?}: every bundle the writer made is signed"),
        )?;
    }
}

/// Invariant: a store whose bundles and head record were all removed is not
/// mistaken for a new one while its day directories remain: the next write
/// is a signed integrity alert first. A store that never held a bundle gets
/// no alert.
#[test]
fn an_emptied_store_is_not_taken_for_a_new_one() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 41);
    let stored = fill(&store, 3);
    for b in &stored {
        fs::remove_dir_all(&b.dir)?;
    }
    fs::remove_file(tmp.path().join("evidence/.chain-head.json"))?;
    let written = store.store_many(vec![draft(Check::Backup, Outcome::Success, 1)])?;
    assert_eq!(written.len(), 2, "an alert before the bundle: {written:?}");
    let alert = evidence::read(&written[0].dir)?;
    assert_eq!(
        (alert.check, alert.outcome),
        (Check::EvidenceIntegrity, Outcome::Alert),
        "the first bundle is the integrity alert"
    );
    assert!(
        alert
            .error
            .as_deref()
            .is_some_and(|e| e.contains("every bundle and the record were removed")),
        "the alert says what happened: {alert:?}"
    );
    let report = verify(tmp.path(), 41);
    assert!(!report.ok(), "verify keeps the emptied store a finding");
    assert!(
        names(&report, &written[0].bundle_id),
        "verify names the alert: {:#?}",
        report.problems
    );

    let fresh = tempfile::tempdir()?;
    let new_store = open_store(fresh.path(), 42);
    let first = new_store.store_many(vec![draft(Check::Backup, Outcome::Success, 1)])?;
    assert_eq!(first.len(), 1, "a new store writes no alert: {first:?}");
    assert_eq!(first[0].seq, 1, "a new store starts at seq 1");
    Ok(())
}

/// One way to damage a stored bundle.
#[derive(Clone, Debug)]
enum Damage {
    Flip {
        file: &'static str,
        at: usize,
    },
    Truncate {
        file: &'static str,
        keep: usize,
    },
    Remove {
        file: &'static str,
    },
    Empty {
        file: &'static str,
    },
    Append {
        file: &'static str,
        bytes: Vec<u8>,
    },
    Random {
        file: &'static str,
        bytes: Vec<u8>,
    },
    /// The file of another bundle (by index).
    FromOther {
        file: &'static str,
        other: usize,
    },
    /// Both files of another bundle.
    SwapIn {
        other: usize,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    let file = prop_oneof![Just("bundle.json"), Just("bundle.sig")];
    prop_oneof![
        (file.clone(), any::<usize>()).prop_map(|(file, at)| Damage::Flip { file, at }),
        (file.clone(), any::<usize>()).prop_map(|(file, keep)| Damage::Truncate { file, keep }),
        file.clone().prop_map(|file| Damage::Remove { file }),
        file.clone().prop_map(|file| Damage::Empty { file }),
        (file.clone(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(file, bytes)| Damage::Append { file, bytes }),
        (file.clone(), proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(file, bytes)| Damage::Random { file, bytes }),
        (file, any::<usize>()).prop_map(|(file, other)| Damage::FromOther { file, other }),
        any::<usize>().prop_map(|other| Damage::SwapIn { other }),
    ]
}

/// Applies `d` to bundle `victim`; returns whether any byte on disk changed.
fn apply(d: &Damage, stored: &[StoredBundle], victim: usize) -> bool {
    let dir = &stored[victim].dir;
    let snapshot = |dir: &Path| {
        (
            fs::read(dir.join("bundle.json")).ok(),
            fs::read(dir.join("bundle.sig")).ok(),
        )
    };
    let before = snapshot(dir);
    let other = |o: usize| {
        let mut i = o % stored.len();
        if i == victim {
            i = (i + 1) % stored.len();
        }
        &stored[i].dir
    };
    match d {
        Damage::Flip { file, at } => {
            let mut b = fs::read(dir.join(file)).unwrap_or_default();
            if !b.is_empty() {
                let at = at % b.len();
                b[at] ^= 0x20;
                fs::write(dir.join(file), b).expect("write");
            }
        }
        Damage::Truncate { file, keep } => {
            let b = fs::read(dir.join(file)).unwrap_or_default();
            if !b.is_empty() {
                fs::write(dir.join(file), &b[..keep % b.len()]).expect("write");
            }
        }
        Damage::Remove { file } => {
            let _ = fs::remove_file(dir.join(file));
        }
        Damage::Empty { file } => fs::write(dir.join(file), b"").expect("write"),
        Damage::Append { file, bytes } => {
            let mut b = fs::read(dir.join(file)).unwrap_or_default();
            b.extend_from_slice(bytes);
            fs::write(dir.join(file), b).expect("write");
        }
        Damage::Random { file, bytes } => fs::write(dir.join(file), bytes).expect("write"),
        Damage::FromOther { file, other: o } => {
            let _ = fs::copy(other(*o).join(file), dir.join(file));
        }
        Damage::SwapIn { other: o } => {
            for file in ["bundle.json", "bundle.sig"] {
                let _ = fs::copy(other(*o).join(file), dir.join(file));
            }
        }
    }
    snapshot(dir) != before
}

proptest! {
    #![proptest_config(prop_config(96))]

    /// Invariant (item 3): verify is ok only when every bundle has a valid
    /// signature by the store's key, and every changed bundle is named, over
    /// any change, truncation, removal or replacement of bundle.json and bundle.sig.
    #[test]
    fn every_corruption_is_named(
        n in 3usize..7,
        hits in proptest::collection::vec((any::<usize>(), damage()), 1..4),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let stored = fill(&open_store(tmp.path(), 41), n);
        let mut changed = Vec::new();
        for (v, d) in &hits {
            let victim = v % n;
            if apply(d, &stored, victim) {
                changed.push((victim, d.clone()));
            }
        }
        let report = verify(tmp.path(), 41);
        if report.ok() {
            check(report.signatures_valid == report.bundles, "ok implies every signature valid".into())?;
        }
        check(
            changed.is_empty() == report.ok(),
            format!("changed {changed:?}: ok is {}; problems {:#?}", report.ok(), report.problems),
        )?;
        for (victim, d) in &changed {
            let id = &stored[*victim].bundle_id;
            check(
                names(&report, id),
                format!("{d:?} on {id} must be named: {:#?}", report.problems),
            )?;
        }
    }
}

/// A special or oversized file planted in place of a store file.
#[derive(Clone, Copy, Debug)]
enum Special {
    Fifo,
    LinkToDevZero,
    LinkToFifo,
    Directory,
    Oversized,
}

fn plant(path: &Path, kind: Special, scratch: &Path) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_dir_all(path);
    let fifo = |p: &Path| {
        let status = Command::new("mkfifo").arg(p).status().expect("mkfifo");
        assert!(status.success(), "mkfifo {}", p.display());
    };
    match kind {
        Special::Fifo => fifo(path),
        Special::LinkToDevZero => std::os::unix::fs::symlink("/dev/zero", path).expect("symlink"),
        Special::LinkToFifo => {
            let target = scratch.join(format!("fifo-{}", uuid::Uuid::new_v4()));
            fifo(&target);
            std::os::unix::fs::symlink(&target, path).expect("symlink");
        }
        Special::Directory => fs::create_dir(path).expect("mkdir"),
        Special::Oversized => {
            fs::write(path, vec![b' '; MAX_BUNDLE_BYTES as usize + 4096]).expect("write")
        }
    }
}

/// Runs `f` on a thread; fails if it does not finish within 20 s (a hang).
fn within<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TestCaseError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .map_err(|_| TestCaseError::fail(format!("{what} hung")))
}

proptest! {
    #![proptest_config(prop_config(40))]

    /// Invariant (item 4): no special or oversized file in the store hangs or
    /// exhausts a reader or the writer. Readers finish and verify names the
    /// file; the writer finishes, either storing or failing with the file named.
    #[test]
    fn special_files_never_hang(
        target in 0usize..4,
        kind in prop_oneof![
            Just(Special::Fifo), Just(Special::LinkToDevZero), Just(Special::LinkToFifo),
            Just(Special::Directory), Just(Special::Oversized)
        ],
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let scratch = tmp.path().join("scratch");
        fs::create_dir(&scratch).expect("mkdir");
        let root = tmp.path().join("evidence");
        let stored = fill(&open_store(tmp.path(), 42), 3);
        let path = match target {
            0 => stored[1].dir.join("bundle.json"),
            1 => stored[2].dir.join("bundle.sig"),
            2 => root.join(".chain-head.json"),
            _ => root.join(".lock"),
        };
        plant(&path, kind, &scratch);
        let what = format!("{kind:?} at {}", path.display());

        let r = root.clone();
        let report = within(format!("verify with {what}"), move || {
            let key = SigningKey::from_seed(&[42; 32]).verifying_key();
            evidence::verify(&r, &key)
        })?;
        // A large regular .lock is harmless: nothing reads it.
        let harmless = target == 3 && matches!(kind, Special::Oversized);
        match report {
            Ok(_) if harmless => {}
            Ok(report) => {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                check(!report.ok(), format!("{what}: verify must fail"))?;
                check(
                    report.problems.iter().any(|p| p.to_string().contains(&name)
                        || p.path.as_ref().is_some_and(|pp| pp.ends_with(&name))
                        || p.bundle_id.as_ref().is_some_and(|id| path.to_string_lossy().contains(id.as_str()))),
                    format!("{what}: verify names it: {:#?}", report.problems),
                )?;
            }
            Err(e) => check(
                e.to_string().contains(".lock"),
                format!("{what}: verify may only refuse for the lock, got {e}"),
            )?,
        }
        let r = root.clone();
        within(format!("list and stats with {what}"), move || {
            let _ = evidence::list_checked(&r, &Filter::default(), None);
            let _ = evidence::stats(&r);
            for b in evidence::bundle_refs(&r).unwrap_or_default() {
                let _ = evidence::read_bundle_files(&b.dir);
                let _ = evidence::read(&b.dir);
            }
        })?;
        let dir = tmp.path().to_owned();
        let written = within(format!("add with {what}"), move || {
            open_store(&dir, 42)
                .store(draft(Check::Firewall, Outcome::Failed, 7))
                .map_err(|e| e.to_string())
        })?;
        if let Err(e) = written {
            check(
                e.contains(".lock") || e.contains(".chain-head"),
                format!("{what}: a refused write names the file: {e}"),
            )?;
        }
    }
}

/// Where a link is planted to make the writer delete or overwrite elsewhere.
#[derive(Clone, Copy, Debug)]
enum Plant {
    TmpDir,
    TmpEntry,
    HeadTmp,
    Head,
    Lock,
    YearDir,
    BundleDir,
}

fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read victim") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            out.push((path.clone(), fs::read(&path).expect("read")));
        }
    }
    out.sort();
    out
}

use std::path::PathBuf;

proptest! {
    #![proptest_config(prop_config(28))]

    /// Invariant (item 5): nothing outside the store is deleted or
    /// overwritten through a link planted inside it, whatever the writer
    /// (add, prune) does; a write it cannot do safely fails naming the link.
    #[test]
    fn writer_never_follows_links(
        plant_at in prop_oneof![
            Just(Plant::TmpDir), Just(Plant::TmpEntry), Just(Plant::HeadTmp), Just(Plant::Head),
            Just(Plant::Lock), Just(Plant::YearDir), Just(Plant::BundleDir)
        ],
        files in proptest::collection::vec("[a-z]{1,8}", 1..4),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("victim");
        fs::create_dir_all(victim.join("sub")).expect("mkdir");
        for (i, f) in files.iter().enumerate() {
            fs::write(victim.join(f), format!("precious {i}")).expect("write");
            fs::write(victim.join("sub").join(f), b"precious too").expect("write");
        }
        let victim_file = victim.join(&files[0]);
        let before = tree(&victim);
        let root = tmp.path().join("evidence");
        let store = open_store(tmp.path(), 43);
        let stored = fill(&store, 3);
        let link = |at: &Path, to: &Path| {
            let _ = fs::remove_file(at);
            let _ = fs::remove_dir_all(at);
            std::os::unix::fs::symlink(to, at).expect("symlink");
        };
        match plant_at {
            Plant::TmpDir => link(&root.join(".tmp"), &victim),
            Plant::TmpEntry => link(&root.join(".tmp/leftover"), &victim),
            Plant::HeadTmp => link(&root.join(".chain-head.tmp"), &victim_file),
            Plant::Head => link(&root.join(".chain-head.json"), &victim_file),
            Plant::Lock => link(&root.join(".lock"), &victim_file),
            Plant::YearDir => {
                let year = stored[0].dir.ancestors().nth(3).expect("year dir").to_owned();
                let moved = tmp.path().join("moved-year");
                fs::rename(&year, &moved).expect("move year");
                link(&year, &victim);
            }
            Plant::BundleDir => link(&stored[0].dir, &victim),
        }
        let add = store.store(draft(Check::Backup, Outcome::Success, 5)).map_err(|e| e.to_string());
        let later = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(24 * 365))
            .expect("time");
        let pruned = store.prune(0, 1, later).map_err(|e| e.to_string());
        check(tree(&victim) == before, format!("{plant_at:?}: the link's target is untouched (add {add:?}, prune {pruned:?})"))?;
        if let Err(e) = &add {
            check(
                e.contains(".lock") || e.contains("link") || e.contains("directory"),
                format!("{plant_at:?}: a refused add says why: {e}"),
            )?;
        }
    }
}

/// Damage to one bundle before a prune.
#[derive(Clone, Copy, Debug)]
enum PruneDamage {
    Delete,
    FlipJson,
    BadSig,
}

proptest! {
    #![proptest_config(prop_config(32))]

    /// Invariant (item 2): a prune never signs a checkpoint over a broken
    /// prefix: when the damage lies in what it would cover, it refuses with
    /// the reason and removes nothing; when it prunes, every checkpoint's
    /// count matches its range and the damage, if any, is still reported.
    #[test]
    fn prune_never_vouches_for_a_broken_prefix(
        n in 4usize..10,
        at in any::<usize>(),
        keep in 0u64..6,
        damage in prop_oneof![
            Just(PruneDamage::Delete), Just(PruneDamage::FlipJson), Just(PruneDamage::BadSig)
        ],
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("evidence");
        let store = open_store(tmp.path(), 44);
        let stored = fill(&store, n);
        let victim = at % (n - 1);
        let dir = &stored[victim].dir;
        match damage {
            PruneDamage::Delete => fs::remove_dir_all(dir).expect("rm"),
            PruneDamage::FlipJson => {
                let p = dir.join("bundle.json");
                let mut b = fs::read(&p).expect("read");
                let i = b.len() / 3;
                b[i] ^= 0x01;
                fs::write(&p, b).expect("write");
            }
            PruneDamage::BadSig => fs::write(dir.join("bundle.sig"), [7u8; 64]).expect("write"),
        }
        let on_disk = evidence::bundle_refs(&root).expect("refs").len();
        let later = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_hours(24 * 365))
            .expect("time");
        // What a prune would cover: every bundle on disk but the `keep` newest,
        // and the first one kept (to check the link to it). The damage shows at
        // on-disk index `victim` (after a deletion: the bundle after the gap).
        let removable = (on_disk as u64).saturating_sub(keep);
        let covers_victim = removable > 0 && victim as u64 <= removable;
        match store.prune(keep, 1, later) {
            Err(e) => {
                check(e.to_string().contains("refusing to prune"), format!("says why: {e}"))?;
                check(
                    evidence::bundle_refs(&root).expect("refs").len() == on_disk,
                    "a refused prune removes nothing".into(),
                )?;
            }
            Ok(report) => {
                check(
                    !covers_victim || report.pruned == 0,
                    format!("{damage:?} at index {victim} (keep {keep}) was covered by a checkpoint: {report:?}"),
                )?;
                let report = verify(tmp.path(), 44);
                check(!report.ok(), format!("{damage:?}: the damage is still reported"))?;
            }
        }
    }
}

#[test]
fn checkpoint_counts_are_checked_against_their_range() -> TestResult {
    // Invariant (item 2): verify checks every checkpoint's count against the
    // range it claims, even when the checkpoint is validly signed.
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 45);
    fill(&store, 6);
    let later = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_hours(24 * 365))?;
    let report = store.prune(2, 1, later)?;
    let cp = report.checkpoint.ok_or("checkpoint")?;
    let bundle = evidence::read(&cp.dir)?;
    assert_eq!(
        (
            bundle.post_state["pruned_from_seq"].as_u64(),
            bundle.post_state["pruned_through_seq"].as_u64(),
            bundle.post_state["pruned_count"].as_u64()
        ),
        (Some(1), Some(4), Some(4)),
        "the checkpoint states its range and count"
    );
    assert!(verify(tmp.path(), 45).ok(), "an honest prune verifies");
    // Re-sign the checkpoint with the store's own key but a count that does not fit.
    let path = cp.dir.join("bundle.json");
    let edited = text(&fs::read(&path)?).replace("\"pruned_count\": 4", "\"pruned_count\": 3");
    fs::write(&path, &edited)?;
    fs::write(
        cp.dir.join("bundle.sig"),
        SigningKey::from_seed(&[45; 32]).sign(edited.as_bytes()),
    )?;
    assert_problem(
        &verify(tmp.path(), 45),
        "does not match the range it claims",
        "forged checkpoint count",
    );
    Ok(())
}

proptest! {
    #![proptest_config(prop_config(16))]

    /// Invariant (item 9): the writer stores exactly the bundles the channel
    /// can send: a draft that would exceed the bundle limit is refused with
    /// the reason and leaves nothing behind; every stored one is readable for sending.
    #[test]
    fn writer_and_channel_share_one_size_limit(note_kib in 400usize..640) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("evidence");
        let store = open_store(tmp.path(), 46);
        let mut d = draft(Check::Backup, Outcome::Success, 0);
        d.post_state = serde_json::json!({ "note": "x".repeat(note_kib * 1024) });
        match store.store(d) {
            Ok(b) => {
                let (json, _) = evidence::read_bundle_files(&b.dir).expect("sendable");
                check(json.len() as u64 <= MAX_BUNDLE_BYTES, "stored within the limit".into())?;
            }
            Err(e) => {
                check(e.to_string().contains("limit"), format!("names the limit: {e}"))?;
                check(note_kib * 1024 > (MAX_BUNDLE_BYTES as usize) - 4096, format!("refused a bundle that fits: {note_kib} KiB"))?;
                check(evidence::bundle_refs(&root).expect("refs").is_empty(), "nothing written".into())?;
                let after = store.store(draft(Check::Backup, Outcome::Success, 1)).expect("store");
                check(after.seq == 1, "the refused bundle took no seq".into())?;
            }
        }
    }
}

#[test]
fn verify_on_a_live_store_sees_no_false_alarm() -> TestResult {
    // Invariant (item 10): verify of a store being written sees it between
    // writes (the writer's lock, shared), so it never reports a problem that is not there.
    let tmp = tempfile::tempdir()?;
    let store = open_store(tmp.path(), 47);
    fill(&store, 5);
    let done = std::sync::atomic::AtomicBool::new(false);
    let alarms = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..150 {
                store
                    .store(draft(Check::Backup, Outcome::Success, i))
                    .expect("store");
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut alarms = Vec::new();
        let mut runs = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || runs < 20 {
            let report = verify(tmp.path(), 47);
            if !report.ok() {
                alarms.push(report.problems);
            }
            runs += 1;
            // flock readers could otherwise starve the writer.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        (alarms, runs)
    });
    assert!(
        alarms.0.is_empty(),
        "{} of {} verifies during 150 adds raised false alarms: {:#?}",
        alarms.0.len(),
        alarms.1,
        alarms.0.first()
    );
    let chain = bundles_by_seq(&tmp.path().join("evidence"));
    assert_eq!(chain.len(), 155, "every bundle written is there");
    Ok(())
}

#[test]
fn an_empty_store_is_reported_as_such() -> TestResult {
    let tmp = tempfile::tempdir()?;
    fs::create_dir_all(tmp.path().join("evidence"))?;
    assert_problem(
        &verify(tmp.path(), 48),
        "no evidence bundles",
        "empty store",
    );
    Ok(())
}
