//! Evidence throughput, side by side with signing each bundle through gpg and openssl:
//! durable bundles stored per second, bundles verified per second, and the
//! agent's peak RSS while verifying 10,000 bundles.
//!
//! Run: `cargo bench -p compliance-agent --bench evidence`

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compliance_agent::config::DeploymentMode;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{self, Check, Draft, EvidenceStore, HostIdentity, Outcome};
use compliance_agent::nixos::RunningSystem;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const OURS_SINGLE: usize = 1000;
const TOOL_RUNS: usize = 150;
const RSS_BUNDLES: usize = 10_000;

fn host() -> HostIdentity {
    HostIdentity {
        site_id: "clinic-1".into(),
        host_id: "frontdesk-01".into(),
        deployment_mode: DeploymentMode::Direct,
        reseller_id: None,
        policy_version: "2026.11".into(),
    }
}

/// A realistic bundle: a check's facts before and after, a few actions.
fn draft(i: usize) -> Draft {
    let mut d = Draft::new(Check::Backup, Outcome::Success);
    d.pre_state = serde_json::json!({
        "unit": "restic-backups-ehr.service", "active_state": "failed", "result": "exit-code",
        "last_snapshot": { "id": format!("{i:08x}"), "age_hours": 30.5, "paths": ["/srv/ehr", "/var/lib/postgresql"] },
        "restore_test": { "last_result": "success", "age_days": 3 },
    });
    d.post_state = serde_json::json!({ "active_state": "inactive", "result": "success", "snapshot_age_hours": 0.1 });
    d.action_taken = (1..=3)
        .map(|step| compliance_agent::evidence::ActionTaken {
            step,
            action: "StartUnit".into(),
            command: Some(
                "org.freedesktop.systemd1.Manager.StartUnit restic-backups-ehr.service replace"
                    .into(),
            ),
            exit_code: Some(0),
            duration_sec: Some(0.25),
            result: Some("done".into()),
        })
        .collect();
    d
}

fn open(root: &Path) -> BenchResult<EvidenceStore> {
    Ok(EvidenceStore::open(
        root,
        SigningKey::from_seed(&[42; 32]),
        host(),
        RunningSystem::default(),
    )?)
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// The same durable write the store does for one file: temp, fsync, rename, fsync of the directory.
fn durable_write(dir: &Path, name: &str, data: &[u8]) -> BenchResult<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Stores bundle.json durably and signs it with an external tool per bundle, as a
/// shell-script design would: `sign(json_path, sig_path)` runs the tool.
fn external_store(
    root: &Path,
    jsons: &[Vec<u8>],
    sign: &dyn Fn(&Path, &Path) -> BenchResult<()>,
) -> BenchResult<Duration> {
    let start = Instant::now();
    for (i, json) in jsons.iter().enumerate() {
        let dir = root.join(format!("b{i}"));
        fs::create_dir_all(&dir)?;
        durable_write(&dir, "bundle.json", json)?;
        let sig = dir.join("bundle.sig");
        sign(&dir.join("bundle.json"), &sig)?;
        fs::File::open(&sig)?.sync_all()?;
        fs::File::open(&dir)?.sync_all()?;
    }
    Ok(start.elapsed())
}

fn external_verify(
    root: &Path,
    n: usize,
    verify: &dyn Fn(&Path, &Path) -> BenchResult<()>,
) -> BenchResult<Duration> {
    let start = Instant::now();
    for i in 0..n {
        let dir = root.join(format!("b{i}"));
        verify(&dir.join("bundle.json"), &dir.join("bundle.sig"))?;
    }
    Ok(start.elapsed())
}

fn run_ok(cmd: &mut Command, what: &str) -> BenchResult<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        return Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn main() -> BenchResult<()> {
    // `cargo bench` passes --bench; there is nothing to filter here.
    let work = tempfile::Builder::new()
        .prefix("evidence-bench")
        .tempdir_in(env_dir())?;
    let key_seed = [42u8; 32];
    let key = SigningKey::from_seed(&key_seed);
    let pubkey_pem = work.path().join("signing.pub.pem");
    fs::write(&pubkey_pem, key.verifying_key().to_spki_pem()?)?;
    let privkey_pem = work.path().join("signing.key");
    fs::write(&privkey_pem, key.to_pkcs8_pem()?)?;

    println!(
        "evidence benchmark (same machine, same bundles; every store is durable: fsync before it is reported)"
    );
    println!();

    // Ours, one bundle per call.
    let single_root = work.path().join("single");
    let store = open(&single_root)?;
    let start = Instant::now();
    for i in 0..OURS_SINGLE {
        store.store(draft(i))?;
    }
    let ours_single = rate(OURS_SINGLE, start.elapsed());

    // Ours, a scan's seven bundles per call (one durability barrier each).
    let batch_root = work.path().join("batch7");
    let store = open(&batch_root)?;
    let start = Instant::now();
    for b in 0..(OURS_SINGLE / 7) {
        store.store_many((0..7).map(|i| draft(b * 7 + i)).collect())?;
    }
    let ours_batch7 = rate(OURS_SINGLE / 7 * 7, start.elapsed());

    // The very bundles stored above, for the external tools.
    let jsons: Vec<Vec<u8>> = evidence::list(
        &single_root,
        &evidence::Filter {
            limit: Some(TOOL_RUNS),
            ..Default::default()
        },
    )?
    .iter()
    .map(|s| fs::read(s.dir.join("bundle.json")))
    .collect::<Result<_, _>>()?;

    // gpg with an Ed25519 key, no passphrase.
    let gnupg = work.path().join("gnupg");
    fs::create_dir_all(&gnupg)?;
    fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    run_ok(
        Command::new("gpg").env("GNUPGHOME", &gnupg).args([
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            "bench <bench@example.invalid>",
            "ed25519",
            "sign",
            "never",
        ]),
        "gpg key generation",
    )?;
    let gpg_root = work.path().join("gpg");
    let gpg_sign = |json: &Path, sig: &Path| -> BenchResult<()> {
        run_ok(
            Command::new("gpg")
                .env("GNUPGHOME", &gnupg)
                .args(["--batch", "--yes", "--detach-sign", "-o"])
                .arg(sig)
                .arg(json),
            "gpg --detach-sign",
        )
    };
    let gpg_store = rate(TOOL_RUNS, external_store(&gpg_root, &jsons, &gpg_sign)?);
    let gpg_verify_fn = |json: &Path, sig: &Path| -> BenchResult<()> {
        run_ok(
            Command::new("gpg")
                .env("GNUPGHOME", &gnupg)
                .args(["--batch", "--verify"])
                .arg(sig)
                .arg(json),
            "gpg --verify",
        )
    };
    let gpg_verify = rate(
        TOOL_RUNS,
        external_verify(&gpg_root, TOOL_RUNS, &gpg_verify_fn)?,
    );
    let _ = Command::new("gpgconf")
        .env("GNUPGHOME", &gnupg)
        .args(["--kill", "gpg-agent"])
        .status();

    // openssl pkeyutl with the same Ed25519 key.
    let ossl_root = work.path().join("openssl");
    let ossl_sign = |json: &Path, sig: &Path| -> BenchResult<()> {
        run_ok(
            Command::new("openssl")
                .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
                .arg(&privkey_pem)
                .arg("-in")
                .arg(json)
                .arg("-out")
                .arg(sig),
            "openssl pkeyutl -sign",
        )
    };
    let ossl_store = rate(TOOL_RUNS, external_store(&ossl_root, &jsons, &ossl_sign)?);
    let ossl_verify_fn = |json: &Path, sig: &Path| -> BenchResult<()> {
        run_ok(
            Command::new("openssl")
                .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
                .arg(&pubkey_pem)
                .arg("-in")
                .arg(json)
                .arg("-sigfile")
                .arg(sig),
            "openssl pkeyutl -verify",
        )
    };
    let ossl_verify = rate(
        TOOL_RUNS,
        external_verify(&ossl_root, TOOL_RUNS, &ossl_verify_fn)?,
    );

    // Ours, verifying: signatures and the whole chain.
    let start = Instant::now();
    let report = evidence::verify(&single_root, &key.verifying_key())?;
    let ours_verify = rate(report.bundles as usize, start.elapsed());
    if !report.ok() {
        return Err(format!("benchmark chain does not verify: {:?}", report.problems).into());
    }

    // 10,000 bundles, verified by the release binary; its peak RSS.
    let big_root = work.path().join("big");
    let store = open(&big_root)?;
    for b in 0..(RSS_BUNDLES / 500) {
        store.store_many((0..500).map(|i| draft(b * 500 + i)).collect())?;
    }
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_compliance-agent"))
        .args(["evidence", "verify", "--dir"])
        .arg(&big_root)
        .arg("--pubkey")
        .arg(&pubkey_pem)
        .stdout(Stdio::null())
        .status()?;
    let big_elapsed = start.elapsed();
    if !status.success() {
        return Err("evidence verify over 10,000 bundles failed".into());
    }
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    // ru_maxrss is the largest of all waited-for children; the gpg and openssl
    // children are smaller than the agent, and it is the last one waited for.
    let peak_rss_kib = usage.max_rss();

    println!(
        "{:<46} {:>12} {:>12}",
        "storing (sign + atomic write + fsync)", "bundles/s", "vs gpg"
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "compliance-agent, one bundle per call",
        ours_single,
        ours_single / gpg_store
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "compliance-agent, 7 per call (one scan)",
        ours_batch7,
        ours_batch7 / gpg_store
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "openssl pkeyutl -sign per bundle",
        ossl_store,
        ossl_store / gpg_store
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "gpg --detach-sign per bundle", gpg_store, 1.0
    );
    println!();
    println!("{:<46} {:>12} {:>12}", "verifying", "bundles/s", "vs gpg");
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "compliance-agent evidence verify (sig + chain)",
        ours_verify,
        ours_verify / gpg_verify
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "openssl pkeyutl -verify per bundle",
        ossl_verify,
        ossl_verify / gpg_verify
    );
    println!(
        "{:<46} {:>12.0} {:>11.1}x",
        "gpg --verify per bundle", gpg_verify, 1.0
    );
    println!();
    println!(
        "compliance-agent evidence verify over {RSS_BUNDLES} bundles: {:.2} s ({:.0} bundles/s), peak RSS {:.1} MB",
        big_elapsed.as_secs_f64(),
        rate(RSS_BUNDLES, big_elapsed),
        peak_rss_kib as f64 / 1024.0
    );
    println!();
    println!(
        "targets: storing >= 20x gpg: {} (one per call {:.1}x, per scan {:.1}x); verifying >= 50x gpg: {} ({:.1}x); RSS < 20 MB: {}",
        verdict(ours_batch7 / gpg_store >= 20.0),
        ours_single / gpg_store,
        ours_batch7 / gpg_store,
        verdict(ours_verify / gpg_verify >= 50.0),
        ours_verify / gpg_verify,
        verdict((peak_rss_kib as f64) < 20.0 * 1024.0)
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Benchmarks write where the evidence would: a real disk, not tmpfs.
fn env_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}
