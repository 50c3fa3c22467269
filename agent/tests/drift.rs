//! Drift checks against real components on this machine: LUKS images made by cryptsetup under a
//! captured sysfs layout, nftables in a network namespace, Nix profiles made by nix-env, restic
//! repositories, and the `scan` command's exit codes.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use compliance_agent::baseline::{self, Baseline, Checks};
use compliance_agent::drift::{self, CheckResult, Context, Status};
use compliance_agent::evidence::Check;

fn run(cmd: &str, args: &[&str]) -> String {
    let mut command = if cmd.starts_with("nix-") {
        nix_command(cmd)
    } else {
        Command::new(require_tool(cmd))
    };
    let out = command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn empty_baseline() -> Baseline {
    Baseline {
        version: 1,
        policy_version: "test".into(),
        units: Vec::new(),
        checks: Checks::default(),
    }
}

/// Runs one check with no system bus (these components need none) under `root`.
fn check(baseline: &Baseline, root: &Path, which: Check) -> CheckResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ctx = Context {
        baseline,
        systemd: None,
        systemd_error: Some("no system bus in this test".into()),
        root: root.to_owned(),
        now: jiff::Timestamp::now(),
        credentials_dir: None,
    };
    rt.block_on(drift::run_check(which, &ctx))
}

fn assert_status(r: &CheckResult, status: Status, needle: &str) {
    assert_eq!(
        r.status, status,
        "{}: expected {status:?}, got {:?}: {} / {}",
        r.check, r.status, r.reason, r.facts
    );
    assert!(
        r.reason.contains(needle),
        "{}: reason should mention {needle:?}: {}",
        r.check,
        r.reason
    );
}

// ---------------------------------------------------------------- encryption

/// A LUKS image made by cryptsetup (no device-mapper needed to format a file).
fn luks_image(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, String) {
    let img = dir.join(name);
    fs::write(&img, vec![0u8; 32 * 1024 * 1024]).expect("image");
    let key = dir.join("key");
    fs::write(&key, "test-only passphrase").expect("key");
    let mut all = vec![
        "luksFormat",
        "--batch-mode",
        "--key-file",
        key.to_str().expect("utf8"),
    ];
    all.extend_from_slice(args);
    all.push(img.to_str().expect("utf8"));
    run("cryptsetup", &all);
    let uuid = run("cryptsetup", &["luksUUID", img.to_str().expect("utf8")])
        .trim()
        .to_owned();
    (img, uuid)
}

/// Lays out, as on a real machine, /proc/self/mountinfo, /proc/swaps and the
/// sysfs chain dm-N -> slaves/<partition>, with /dev/<partition> being the image.
struct Tree {
    root: PathBuf,
    mountinfo: String,
    swaps: String,
}

impl Tree {
    fn new(root: &Path) -> Self {
        fs::create_dir_all(root.join("proc/self")).expect("proc");
        fs::create_dir_all(root.join("sys/dev/block")).expect("sys");
        fs::create_dir_all(root.join("sys/class/block")).expect("class");
        fs::create_dir_all(root.join("dev")).expect("dev");
        Tree {
            root: root.to_owned(),
            mountinfo: String::new(),
            swaps: "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n".into(),
        }
    }

    /// A partition of the virtio disk vda.
    fn partition(&self, name: &str, minor: u32, image: Option<&Path>) -> PathBuf {
        let dev = self.root.join(format!(
            "sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda/{name}"
        ));
        fs::create_dir_all(&dev).expect("partition dir");
        let _ = symlink(
            format!("../../devices/pci0000:00/0000:00:04.0/virtio2/block/vda/{name}"),
            self.root.join(format!("sys/dev/block/253:{minor}")),
        );
        let _ = symlink(
            format!("../../devices/pci0000:00/0000:00:04.0/virtio2/block/vda/{name}"),
            self.root.join(format!("sys/class/block/{name}")),
        );
        if let Some(img) = image {
            fs::copy(img, self.root.join(format!("dev/{name}"))).expect("device image");
        }
        dev
    }

    /// A device-mapper device dm-N with `uuid`, stacked on `slave` (a partition name).
    fn dm(&self, n: u32, uuid: &str, slave: &str) {
        let dm = self.root.join(format!("sys/devices/virtual/block/dm-{n}"));
        fs::create_dir_all(dm.join("dm")).expect("dm dir");
        fs::create_dir_all(dm.join("slaves")).expect("slaves");
        fs::write(dm.join("dm/uuid"), format!("{uuid}\n")).expect("uuid");
        symlink(
            format!("../../../../pci0000:00/0000:00:04.0/virtio2/block/vda/{slave}"),
            dm.join(format!("slaves/{slave}")),
        )
        .expect("slave link");
        symlink(
            format!("../../devices/virtual/block/dm-{n}"),
            self.root.join(format!("sys/dev/block/254:{n}")),
        )
        .expect("dev link");
        symlink(
            format!("../../devices/virtual/block/dm-{n}"),
            self.root.join(format!("sys/class/block/dm-{n}")),
        )
        .expect("class link");
    }

    fn mount(&mut self, id: u32, majmin: &str, point: &str, fs_type: &str, source: &str) {
        self.mountinfo.push_str(&format!(
            "{id} 1 {majmin} / {point} rw,relatime shared:{id} - {fs_type} {source} rw\n"
        ));
    }

    fn write(&self) {
        fs::write(self.root.join("proc/self/mountinfo"), &self.mountinfo).expect("mountinfo");
        fs::write(self.root.join("proc/swaps"), &self.swaps).expect("swaps");
    }
}

fn encryption_spec(filesystems: &[&str], swap: bool) -> Baseline {
    let mut b = empty_baseline();
    b.checks.encryption = Some(baseline::Encryption {
        filesystems: filesystems.iter().map(PathBuf::from).collect(),
        swap,
        allowed_ciphers: vec!["aes-xts-plain64".into()],
        min_key_bits: 512,
        luks_header_export_dir: None,
    });
    b
}

#[test]
fn encryption_on_luks_images_and_a_captured_sysfs() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    let (good, good_uuid) = luks_image(
        tmp.path(),
        "good.img",
        &[
            &[
                "--type",
                "luks2",
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "512",
            ][..],
            &fast[..],
        ]
        .concat(),
    );
    let (weak, weak_uuid) = luks_image(
        tmp.path(),
        "weak.img",
        &[
            &[
                "--type",
                "luks2",
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "256",
            ][..],
            &fast[..],
        ]
        .concat(),
    );
    let (old, old_uuid) = luks_image(
        tmp.path(),
        "old.img",
        &[
            &[
                "--type",
                "luks1",
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "512",
            ][..],
            &fast[..],
        ]
        .concat(),
    );

    let root = tmp.path().join("root");
    let mut tree = Tree::new(&root);
    tree.partition("vda1", 1, None);
    tree.partition("vda2", 2, Some(&good));
    tree.partition("vda3", 3, Some(&weak));
    tree.partition("vda4", 4, Some(&old));
    tree.partition("vda5", 5, None);
    tree.partition("vda6", 6, Some(&good));
    tree.dm(
        0,
        &format!("CRYPT-LUKS2-{}-root", good_uuid.replace('-', "")),
        "vda2",
    );
    tree.dm(
        1,
        &format!("CRYPT-LUKS2-{}-var", weak_uuid.replace('-', "")),
        "vda3",
    );
    tree.dm(
        2,
        &format!("CRYPT-LUKS1-{}-srv", old_uuid.replace('-', "")),
        "vda4",
    );
    tree.dm(3, "CRYPT-PLAIN-swap", "vda5");
    // A LUKS2 header whose JSON metadata was damaged after formatting.
    let mut garbage = fs::read(&good)?;
    for b in &mut garbage[4096..4200] {
        *b = b'#';
    }
    fs::write(root.join("dev/vda6"), garbage)?;
    tree.dm(
        4,
        &format!("CRYPT-LUKS2-{}-data", good_uuid.replace('-', "")),
        "vda6",
    );
    tree.mount(22, "254:0", "/", "ext4", "/dev/mapper/root");
    tree.mount(23, "253:1", "/boot", "vfat", "/dev/vda1");
    tree.mount(24, "254:1", "/var", "ext4", "/dev/mapper/var");
    tree.mount(25, "254:2", "/srv", "xfs", "/dev/mapper/srv");
    tree.mount(26, "254:4", "/data", "ext4", "/dev/mapper/data");
    tree.mount(27, "0:31", "/tmp", "tmpfs", "tmpfs");
    tree.swaps
        .push_str("/dev/dm-3                               partition\t8388604\t\t0\t\t-2\n");
    tree.write();

    let r = check(&encryption_spec(&["/"], true), &root, Check::Encryption);
    assert_status(&r, Status::Compliant, "as declared");
    let header = &r.facts["stacks"][0]["layers"][0]["luks"];
    assert_eq!(header["cipher"], "aes-xts-plain64", "{}", r.facts);
    assert_eq!(header["key_bits"], 512);

    let r = check(&encryption_spec(&["/var"], false), &root, Check::Encryption);
    assert_status(&r, Status::Drifted, "aes-cbc-essiv:sha256");
    assert!(r.reason.contains("256-bit key"), "{}", r.reason);
    let r = check(&encryption_spec(&["/srv"], false), &root, Check::Encryption);
    assert_status(&r, Status::Drifted, "LUKS1");
    let r = check(
        &encryption_spec(&["/boot"], false),
        &root,
        Check::Encryption,
    );
    assert_status(&r, Status::Drifted, "/boot is not encrypted");
    let r = check(&encryption_spec(&["/tmp"], false), &root, Check::Encryption);
    assert_status(&r, Status::Drifted, "not a block device");
    let r = check(
        &encryption_spec(&["/nowhere"], false),
        &root,
        Check::Encryption,
    );
    assert_status(&r, Status::Drifted, "not mounted");
    let r = check(
        &encryption_spec(&["/data"], false),
        &root,
        Check::Encryption,
    );
    assert_status(&r, Status::Error, "checksum does not match");

    // Swap on a plain partition is drift; the dm-crypt random-key swap above passed.
    tree.swaps
        .push_str("/dev/vda1                               partition\t1024\t\t0\t\t-3\n");
    tree.write();
    let r = check(&encryption_spec(&["/"], true), &root, Check::Encryption);
    assert_status(&r, Status::Drifted, "swap /dev/vda1 is not encrypted");
    Ok(())
}

// ---------------------------------------------------------------- firewall

const RULESET: &str = "table inet appliance {
  chain input {
    type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    tcp dport 22 accept
  }
  chain output {
    type filter hook output priority filter; policy drop;
    oifname \"lo\" accept
    ct state established,related accept
    ip daddr 192.0.2.10 tcp dport 8443 counter accept
    udp dport 123 accept
    counter log prefix \"egress-drop \" drop
  }
}
";

/// A network namespace that is removed when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("cmpfw-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        Command::new(require_tool("ip"))
            .args(&all)
            .output()
            .expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn firewall_in_a_network_namespace() -> TestResult {
    require_tool("nft");
    require_tool("unshare");
    let tmp = tempfile::tempdir()?;
    let rules = tmp.path().join("ruleset.nft");
    fs::write(&rules, RULESET)?;
    let mut b = empty_baseline();
    b.checks.firewall = Some(baseline::Firewall {
        unit: None,
        ruleset_file: Some(rules.clone()),
        egress_policy: baseline::Policy::Drop,
        ruleset_export_unit: None,
        ruleset_export_file: None,
        expected_export_file: None,
    });
    let baseline_file = tmp.path().join("baseline.json");
    fs::write(&baseline_file, serde_json::to_vec(&b)?)?;
    let ns = Netns::new("a");
    let scan = |ns: &Netns| -> (Option<i32>, serde_json::Value) {
        let out = ns.exec(&[
            agent_bin().to_str().expect("utf8"),
            "scan",
            "--no-evidence",
            "--json",
            "--baseline",
            baseline_file.to_str().expect("utf8"),
        ]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scan --json: {e}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        });
        let fw = report["results"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["check"] == "firewall").cloned())
            .expect("firewall result");
        (out.status.code(), fw)
    };

    let load = ns.exec(&["nft", "-f", rules.to_str().expect("utf8")]);
    assert!(
        load.status.success(),
        "load ruleset: {}",
        text(&load.stderr)
    );
    let (code, fw) = scan(&ns);
    assert_eq!(fw["status"], "compliant", "loaded baseline ruleset: {fw}");
    assert_eq!(code, Some(0), "all applicable checks compliant: exit 0");

    // Counters move and handles differ in another load: still compliant.
    ns.exec(&["nft", "flush", "ruleset"]);
    ns.exec(&["nft", "-f", rules.to_str().expect("utf8")]);
    let (_, fw) = scan(&ns);
    assert_eq!(fw["status"], "compliant", "reloaded ruleset: {fw}");

    // An extra rule in the output chain.
    let add = ns.exec(&[
        "nft",
        "insert",
        "rule",
        "inet",
        "appliance",
        "output",
        "ip",
        "daddr",
        "198.51.100.7",
        "accept",
    ]);
    assert!(add.status.success(), "{}", text(&add.stderr));
    let (code, fw) = scan(&ns);
    assert_eq!(fw["status"], "drifted", "{fw}");
    assert_eq!(code, Some(1), "drift: exit 1");
    assert_eq!(
        fw["facts"]["diff"]["extra_rules"]["inet appliance output"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{fw}"
    );
    assert_eq!(fw["recommended"][0]["runbook"], "reapply_firewall");

    // Egress opened.
    ns.exec(&["nft", "-f", rules.to_str().expect("utf8")]);
    ns.exec(&["nft", "flush", "ruleset"]);
    let relaxed = tmp.path().join("relaxed.nft");
    fs::write(
        &relaxed,
        RULESET.replace(
            "hook output priority filter; policy drop;",
            "hook output priority filter; policy accept;",
        ),
    )?;
    ns.exec(&["nft", "-f", relaxed.to_str().expect("utf8")]);
    let (_, fw) = scan(&ns);
    assert_eq!(fw["severity"], "critical", "{fw}");
    assert!(
        fw["reason"]
            .as_str()
            .is_some_and(|r| r.contains("policy accept")),
        "{fw}"
    );

    // Flushed: every table and chain of the baseline is missing.
    ns.exec(&["nft", "flush", "ruleset"]);
    let (_, fw) = scan(&ns);
    assert_eq!(fw["status"], "drifted");
    assert_eq!(
        fw["facts"]["diff"]["missing_tables"][0], "inet appliance",
        "{fw}"
    );
    assert!(
        fw["reason"]
            .as_str()
            .is_some_and(|r| r.contains("egress is not restricted")),
        "{fw}"
    );
    Ok(())
}

// ---------------------------------------------------------------- patching

/// A small "system" store path built by nix-build with builder /bin/sh.
fn nix_system(dir: &Path, name: &str, revision: &str) -> String {
    let expr = dir.join(format!("{name}.nix"));
    fs::write(
        &expr,
        format!(
            "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
             args = [ \"-c\" \"/bin/mkdir $out && echo 25.11.test > $out/nixos-version && echo {revision} > $out/configuration-revision && /bin/ln -s /nix/store/00000000000000000000000000000000-linux $out/kernel\" ]; }}\n"
        ),
    )
    .expect("expr");
    run(
        "nix-build",
        &["--no-out-link", expr.to_str().expect("utf8")],
    )
    .trim()
    .to_owned()
}

#[test]
fn patching_with_real_nix_profiles() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let a = nix_system(tmp.path(), "nixos-system-a", "rev-a");
    let b = nix_system(tmp.path(), "nixos-system-b", "rev-b");
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("nix/var/nix/profiles"))?;
    fs::create_dir_all(root.join("run"))?;
    let profile = root.join("nix/var/nix/profiles/system");
    let profile_s = profile.to_str().expect("utf8");
    run("nix-env", &["-p", profile_s, "--set", &a]);
    run("nix-env", &["-p", profile_s, "--set", &b]);
    symlink(&b, root.join("run/current-system"))?;
    symlink(&b, root.join("run/booted-system"))?;
    let spec = |target: Option<&str>, revision: Option<&str>, days: u64| {
        let mut bl = empty_baseline();
        bl.checks.patching = Some(baseline::Patching {
            system_profile: "/nix/var/nix/profiles/system".into(),
            target_system: target.map(str::to_owned),
            target_revision: revision.map(str::to_owned),
            max_generation_age_days: days,
        });
        bl
    };
    let r = check(&spec(Some(&b), Some("rev-b"), 30), &root, Check::Patching);
    assert_status(&r, Status::Compliant, "as declared");
    assert_eq!(r.facts["current_generation"], 2);
    assert_eq!(r.facts["previous_generation"], 1);
    assert_eq!(r.facts["flake_revision"], "rev-b");

    let r = check(&spec(Some(&a), None, 30), &root, Check::Patching);
    assert_status(&r, Status::Drifted, "baseline's target");
    assert_eq!(r.recommended[0].runbook, "switch_generation");
    let r = check(&spec(None, Some("rev-c"), 30), &root, Check::Patching);
    assert_status(&r, Status::Drifted, "flake revision rev-b");

    // The profile rolled back (generation 1) but the box still runs b: a switch is pending.
    run("nix-env", &["-p", profile_s, "--rollback"]);
    let r = check(&spec(None, None, 30), &root, Check::Patching);
    assert_status(&r, Status::Drifted, "the running system is");
    run("nix-env", &["-p", profile_s, "--switch-generation", "2"]);

    // Generation 2 made 40 days ago.
    run(
        "touch",
        &[
            "-h",
            "-d",
            "40 days ago",
            root.join("nix/var/nix/profiles/system-2-link")
                .to_str()
                .expect("utf8"),
        ],
    );
    let r = check(&spec(None, None, 30), &root, Check::Patching);
    assert_status(&r, Status::Drifted, "40 days old");

    // Not NixOS at all.
    let r = check(&spec(None, None, 30), tmp.path(), Check::Patching);
    assert_status(&r, Status::Error, "no system profile");
    Ok(())
}

// ---------------------------------------------------------------- backup

fn restic(repo: &Path, password: &Path, args: &[&str]) -> String {
    let out = Command::new(require_tool("restic"))
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD_FILE", password)
        .env("RESTIC_CACHE_DIR", repo.with_extension("cache"))
        .output()
        .expect("restic");
    assert!(
        out.status.success(),
        "restic {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn backup_snapshots_read_from_a_restic_repository() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    let password = tmp.path().join("password");
    fs::write(&password, "test-only restic password")?;
    let data = tmp.path().join("ehr");
    fs::create_dir_all(&data)?;
    fs::write(data.join("canary.txt"), "restore me")?;
    restic(&repo, &password, &["init"]);
    let spec = |password_file: &Path, max_hours: u64, with_restic: bool| {
        let mut b = empty_baseline();
        b.checks.backup = Some(baseline::Backup {
            tool: "restic".into(),
            repository: repo.display().to_string(),
            password_file: password_file.display().to_string(),
            unit: None,
            max_snapshot_age_hours: max_hours,
            restore_test_unit: None,
            max_restore_test_age_days: None,
            restore_test_marker: None,
            verify_with_restic: with_restic,
        });
        b
    };
    for with_restic in [false, true] {
        let r = check(
            &spec(&password, 26, with_restic),
            Path::new("/"),
            Check::Backup,
        );
        assert_status(&r, Status::Drifted, "no snapshot");
    }

    // Read through restic, the snapshot's own time counts.
    restic(
        &repo,
        &password,
        &[
            "backup",
            "--time",
            "2020-01-01 00:00:00",
            data.to_str().expect("utf8"),
        ],
    );
    let r = check(&spec(&password, 26, true), Path::new("/"), Check::Backup);
    assert_status(&r, Status::Drifted, "the newest snapshot is");
    assert_eq!(r.recommended[0].runbook, "run_backup");
    assert_eq!(r.facts["snapshot_source"], "restic snapshots");

    // Read from the layout, the time the snapshot was written counts.
    let snapshot_file = fs::read_dir(repo.join("snapshots"))?
        .next()
        .ok_or("one snapshot file")??
        .path();
    run(
        "touch",
        &["-d", "40 hours ago", snapshot_file.to_str().expect("utf8")],
    );
    let r = check(&spec(&password, 26, false), Path::new("/"), Check::Backup);
    assert_status(&r, Status::Drifted, "40 h old");
    assert_eq!(r.facts["snapshot_source"], "repository layout (local)");

    restic(&repo, &password, &["backup", data.to_str().expect("utf8")]);
    for with_restic in [false, true] {
        let r = check(
            &spec(&password, 26, with_restic),
            Path::new("/"),
            Check::Backup,
        );
        assert_status(&r, Status::Compliant, "as declared");
        assert_eq!(r.facts["snapshot_age_hours"], 0);
    }

    let wrong = tmp.path().join("wrong");
    fs::write(&wrong, "not the password")?;
    let r = check(&spec(&wrong, 26, true), Path::new("/"), Check::Backup);
    assert_status(&r, Status::Error, "restic snapshots failed");
    fs::remove_file(repo.join("config"))?;
    let r = check(&spec(&password, 26, false), Path::new("/"), Check::Backup);
    assert_status(&r, Status::Error, "not a restic repository");
    Ok(())
}

// ---------------------------------------------------------------- logging, av, baseline, scan

#[test]
fn journald_volatile_and_retention_are_drift() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    fs::create_dir_all(root.join("etc/systemd"))?;
    fs::write(
        root.join("etc/systemd/journald.conf"),
        "[Journal]\nStorage=volatile\nMaxRetentionSec=1month\n",
    )?;
    let mut b = empty_baseline();
    b.checks.logging = Some(baseline::Logging {
        journald_persistent: true,
        journald_max_retention_sec: Some(31_557_600),
        auditd: false,
        audit_rules: Vec::new(),
        audit_rules_export_file: None,
        audit_rules_export_unit: None,
    });
    let r = check(&b, root, Check::Logging);
    assert_eq!(r.status, Status::Drifted, "{}", r.reason);
    assert!(r.reason.contains("not persistent"), "{}", r.reason);
    assert!(
        r.reason.contains("MaxRetentionSec is 2630016"),
        "{}",
        r.reason
    );
    assert!(
        r.reason.contains("system bus"),
        "the journald unit could not be checked without a bus: {}",
        r.reason
    );
    Ok(())
}

#[test]
fn signature_databases_by_header_and_age() -> TestResult {
    use compliance_agent::drift::av_health::{CVD_HEADER_LEN, read_databases};
    let tmp = tempfile::tempdir()?;
    let built = jiff::Timestamp::now().as_second() - 3 * 86_400;
    let mut header =
        format!("ClamAV-VDB:26 Nov 2026 10-00 +0000:27838:2078000:90:0123:dsig:builder:{built}")
            .into_bytes();
    header.resize(CVD_HEADER_LEN, b' ');
    header.extend_from_slice(b"\x1f\x8b rest of the tarball");
    fs::write(tmp.path().join("daily.cvd"), &header)?;
    fs::write(tmp.path().join("main.cvd"), b"ClamAV-VDB:truncated")?;
    let dbs = read_databases(tmp.path())?;
    let daily = dbs
        .iter()
        .find(|d| d.file == "daily.cvd")
        .ok_or("daily.cvd listed")?;
    assert_eq!(daily.built.map(|t| t.as_second()), Some(built));
    let main = dbs
        .iter()
        .find(|d| d.file == "main.cvd")
        .ok_or("main.cvd listed")?;
    assert!(
        main.error.as_deref().is_some_and(|e| e.contains("512")),
        "truncated header is an error: {main:?}"
    );

    let mut b = empty_baseline();
    b.checks.av_health = Some(baseline::AvHealth {
        units: Vec::new(),
        clamd_socket: tmp.path().join("no-clamd.sock"),
        database_dir: tmp.path().to_owned(),
        max_signature_age_hours: 48,
        eicar_test: true,
    });
    let r = check(&b, Path::new("/"), Check::AvHealth);
    assert_eq!(r.status, Status::Drifted);
    for needle in ["72 h old", "cannot connect to clamd", "EICAR", "main.cvd"] {
        assert!(
            r.reason.contains(needle),
            "reason mentions {needle}: {}",
            r.reason
        );
    }
    Ok(())
}

#[test]
fn malformed_baselines_are_refused_with_the_reason() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    for (name, body, needle) in [
        (
            "truncated.json",
            "{\"version\": 1, \"checks\": {",
            "not a valid baseline",
        ),
        (
            "v9.json",
            "{\"version\": 9, \"policy_version\": \"x\"}",
            "schema version 9",
        ),
        (
            "typo.json",
            "{\"version\": 1, \"policy_version\": \"x\", \"checks\": {\"firewal\": {}}}",
            "firewal",
        ),
    ] {
        let path = tmp.path().join(name);
        fs::write(&path, body)?;
        let out = agent(
            Some(&config),
            &[
                "scan",
                "--no-evidence",
                "--baseline",
                path.to_str().expect("utf8"),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{name}: exit 2");
        assert!(
            text(&out.stderr).contains(needle),
            "{name}: {}",
            text(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn scan_writes_one_verifiable_bundle_per_applicable_check() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("proc/self"))?;
    fs::write(
        root.join("proc/self/mountinfo"),
        "22 1 253:0 / / rw - ext4 /dev/vda1 rw\n",
    )?;
    let b = encryption_spec(&["/"], false);
    let path = tmp.path().join("baseline.json");
    fs::write(&path, serde_json::to_vec(&b)?)?;
    let out = agent(
        Some(&config),
        &[
            "scan",
            "--json",
            "--baseline",
            path.to_str().expect("utf8"),
            "--root",
            root.to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "unencrypted root is drift: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["score"], 0.0);
    assert_eq!(
        report["bundles"].as_array().map(Vec::len),
        Some(1),
        "one bundle for the one applicable check"
    );
    let listed = agent(Some(&config), &["evidence", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    assert_eq!(listed[0]["check"], "encryption");
    assert_eq!(listed[0]["outcome"], "alert");
    let verify = agent(Some(&config), &["evidence", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
    Ok(())
}

#[test]
fn a_missing_binary_is_an_error_with_the_reason() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let config = configured_box(tmp.path());
    let mut b = empty_baseline();
    b.checks.time_sync = Some(baseline::TimeSync {
        unit: None,
        servers: Vec::new(),
        max_offset_ms: 5000,
        max_stratum: 10,
    });
    let path = tmp.path().join("baseline.json");
    fs::write(&path, serde_json::to_vec(&b)?)?;
    let out = Command::new(agent_bin())
        .args([
            "--config",
            config.to_str().ok_or("utf8")?,
            "scan",
            "--no-evidence",
            "--json",
            "--baseline",
            path.to_str().ok_or("utf8")?,
        ])
        .env("PATH", tmp.path().join("empty-path"))
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a check that cannot run exits 2: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let r = report["results"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["check"] == "time_sync"))
        .ok_or("time_sync")?;
    assert_eq!(r["status"], "error", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|x| x.contains("cannot run chronyc")),
        "{r}"
    );
    Ok(())
}
