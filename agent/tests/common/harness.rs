//! The appliance test harness (tier 3): a Debian bookworm root file system with the
//! appliance's services (systemd, dbus, polkit, nftables, restic, clamd, chrony,
//! audit tools, Nix, node-exporter), booted by `systemd-nspawn --boot --private-network`
//! so that the agent meets a real systemd as PID 1 and a real system bus.
//!
//! ```ignore
//! let app = Appliance::boot("clamd-drift").expect("boot the appliance");
//! app.exec_ok(&["systemctl", "stop", "clamav-daemon.service"]);
//! let out = app.exec(&[Appliance::AGENT_BIN, "scan", "--json"]);
//! ```
//!
//! The shell side lives in `tests/harness/` (build-rootfs.sh, lib.sh, boot.sh; see its
//! README.md). This module builds the root on first use (cached under
//! `target/appliance/`), boots one container per [`Appliance`], runs commands inside
//! with `nsenter` into the container's PID 1, and stops the container when the value
//! is dropped. Every container has its own name, cgroup and tmpfs overlay over the
//! cached root, so tests in one binary may boot in parallel. If the test process dies
//! without dropping it, a watcher started by `boot.sh` stops the container.
//!
//! Needs root. [`available`] says why a host cannot run it; tests call [`require`],
//! which fails (never skips) with that reason.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The repository root (the workspace above `agent/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `tests/harness/` in the repository.
pub fn harness_dir() -> PathBuf {
    repo_root().join("tests/harness")
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether this host can run the harness; the error names every missing piece.
///
/// Needs: root, Linux with overlayfs, a writable cgroup file system, `nsenter`, and
/// `systemd-nspawn` and `debootstrap` or `apt-get` to install them (build-rootfs.sh
/// installs them). Building the root the first time also needs the Debian mirror.
pub fn available() -> Result<(), String> {
    let mut missing = Vec::new();
    match effective_uid() {
        Some(0) => {}
        Some(uid) => missing.push(format!(
            "runs as uid {uid}, needs root (systemd-nspawn, nsenter, debootstrap)"
        )),
        None => missing.push("cannot read /proc/self/status (not Linux?)".to_string()),
    }
    let apt = find_program("apt-get").is_some();
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
    ] {
        if find_program(program).is_none() && !apt {
            missing.push(format!("{program} is missing (Debian package {package}) and apt-get is not there to install it"));
        }
    }
    if find_program("nsenter").is_none() {
        missing.push("nsenter is missing (Debian package util-linux)".to_string());
    }
    match std::fs::read_to_string("/proc/filesystems") {
        Ok(fs) if fs.lines().any(|l| l.trim_end().ends_with("overlay")) => {}
        _ => missing.push(
            "the kernel has no overlay file system (systemd-nspawn --volatile=overlay)".to_string(),
        ),
    }
    let cgroup_ok = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[1].starts_with("/sys/fs/cgroup")
                && (f[2] == "cgroup2" || f[2] == "cgroup")
                && f[3].split(',').any(|o| o == "rw")
        })
    });
    if !cgroup_ok {
        missing.push("no writable cgroup file system under /sys/fs/cgroup".to_string());
    }
    if !harness_dir().join("build-rootfs.sh").is_file() {
        missing.push(format!(
            "{} is missing",
            harness_dir().join("build-rootfs.sh").display()
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

/// Panics with the reason when the harness cannot run here: tier-3 tests fail, they do
/// not skip silently. (`tests/run` decides whether to run the tier at all.)
pub fn require() {
    if let Err(why) = available() {
        panic!("the appliance harness cannot run on this host: {why}");
    }
}

/// How long the first build of the root took in this process (None: it was cached).
static BUILD_TIME: OnceLock<Option<Duration>> = OnceLock::new();
static ROOTFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The cached root file system, built by `tests/harness/build-rootfs.sh` on first use
/// (serialised across processes by the script's lock). Its log goes to
/// `target/appliance/build.log`; a failure includes the log's tail.
pub fn rootfs() -> Result<PathBuf, String> {
    ROOTFS
        .get_or_init(|| {
            available()?;
            let script = harness_dir().join("build-rootfs.sh");
            let cache = std::env::var_os("APPLIANCE_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target/appliance"));
            std::fs::create_dir_all(&cache)
                .map_err(|e| format!("create {}: {e}", cache.display()))?;
            let log_path = cache.join("build.log");
            let log = std::fs::File::create(&log_path)
                .map_err(|e| format!("create {}: {e}", log_path.display()))?;
            let started = Instant::now();
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(log)
                .output()
                .map_err(|e| format!("run {}: {e}", script.display()))?;
            let elapsed = started.elapsed();
            let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}); end of {}:\n{}",
                    script.display(),
                    out.status,
                    log_path.display(),
                    tail(&log_text, 40)
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let path = stdout
                .lines()
                .last()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("{} printed no path", script.display()))?;
            let built = log_text.contains("configured in");
            let _ = BUILD_TIME.set(built.then_some(elapsed));
            if built {
                eprintln!(
                    "appliance harness: built the root in {:.1} s: {path}",
                    elapsed.as_secs_f64()
                );
            }
            Ok(PathBuf::from(path))
        })
        .clone()
}

/// The time the root's build took in this process, when this process built it.
pub fn rootfs_build_time() -> Option<Duration> {
    BUILD_TIME.get().copied().flatten()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Options for [`Appliance::boot_with`].
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Host directory bound read-only at `/opt/agent-bin` (default: the directory of
    /// the agent binary cargo built for these tests, so [`Appliance::AGENT_BIN`] is it).
    pub agent_bin_dir: Option<PathBuf>,
    /// Further read-only binds: (host path, path inside).
    pub bind_ro: Vec<(PathBuf, String)>,
    /// Further read-write binds: (host path, path inside).
    pub bind_rw: Vec<(PathBuf, String)>,
    /// How long boot may take until systemd reports running or degraded.
    pub boot_timeout: Duration,
    /// Fail when the system comes up degraded (some unit failed) instead of running.
    pub require_running: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            agent_bin_dir: Path::new(env!("CARGO_BIN_EXE_compliance-agent"))
                .parent()
                .map(Path::to_path_buf),
            bind_ro: Vec::new(),
            bind_rw: Vec::new(),
            boot_timeout: Duration::from_secs(120),
            require_running: true,
        }
    }
}

/// A booted appliance container. Dropping it powers the container off and removes
/// everything it wrote (the overlay's upper layer is a tmpfs).
#[derive(Debug)]
pub struct Appliance {
    name: String,
    pid1: u32,
    nspawn_pid: u32,
    caps: String,
    state: String,
    state_dir: PathBuf,
    console_log: PathBuf,
    rootfs: PathBuf,
    boot_time: Duration,
    stopped: bool,
}

/// Default limit for one command inside; see [`Appliance::exec_timeout`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// The EICAR test file: harmless, and detected by every anti-virus engine (here by
/// the signature database the harness makes; there is no network for freshclam).
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn container_name(hint: &str) -> String {
    let mut clean: String = hint
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(24);
    let clean = clean.trim_matches('-');
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!(
        "ca-{}-{}-{n}",
        if clean.is_empty() { "t" } else { clean },
        std::process::id()
    );
    name.chars().take(63).collect()
}

impl Appliance {
    /// The agent binary inside (bound read-only from the host's target directory).
    pub const AGENT_BIN: &'static str = "/opt/agent-bin/compliance-agent";
    /// clamd's socket inside (the Debian default).
    pub const CLAMD_SOCKET: &'static str = "/run/clamav/clamd.ctl";
    /// The NixOS system profile inside.
    pub const SYSTEM_PROFILE: &'static str = "/nix/var/nix/profiles/system";
    /// The node-exporter textfile collector directory inside.
    pub const TEXTFILE_DIR: &'static str = "/var/lib/prometheus/node-exporter";
    /// The agent's unprivileged user inside.
    pub const AGENT_USER: &'static str = "compliance-agent";

    /// Builds the root if needed, boots a container named after `name_hint` (made
    /// unique) and waits until systemd reports `running`.
    pub fn boot(name_hint: &str) -> Result<Appliance, String> {
        Self::boot_with(name_hint, &BootOptions::default())
    }

    /// [`Appliance::boot`] with options.
    pub fn boot_with(name_hint: &str, opts: &BootOptions) -> Result<Appliance, String> {
        let root = rootfs()?;
        let name = container_name(name_hint);
        let mut cmd = Command::new("bash");
        cmd.arg(harness_dir().join("boot.sh"))
            .arg("start")
            .arg(&name)
            .env("APPLIANCE_ROOTFS", &root)
            .env("APPLIANCE_OWNER_PID", std::process::id().to_string())
            .env(
                "APPLIANCE_BOOT_TIMEOUT",
                opts.boot_timeout.as_secs().max(1).to_string(),
            )
            .stdin(Stdio::null());
        if let Some(dir) = &opts.agent_bin_dir {
            cmd.arg(format!("--bind-ro={}:/opt/agent-bin", dir.display()));
        }
        for (host, inside) in &opts.bind_ro {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        for (host, inside) in &opts.bind_rw {
            cmd.arg(format!("--bind={}:{inside}", host.display()));
        }
        let started = Instant::now();
        let out = cmd
            .output()
            .map_err(|e| format!("run tests/harness/boot.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "booting {name} failed ({}):\n{stderr}{stdout}",
                out.status
            ));
        }
        let get = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_string)
                .ok_or_else(|| format!("boot.sh printed no {key}:\n{stdout}{stderr}"))
        };
        let parse = |key: &str| -> Result<u32, String> {
            get(key)?
                .parse()
                .map_err(|e| format!("boot.sh printed a bad {key}: {e}"))
        };
        let mut app = Appliance {
            name: name.clone(),
            pid1: parse("pid1")?,
            nspawn_pid: parse("nspawn_pid")?,
            caps: get("caps")?,
            state: get("state")?,
            state_dir: PathBuf::from(get("state_dir")?),
            console_log: PathBuf::from(get("console_log")?),
            rootfs: root,
            boot_time: started.elapsed(),
            stopped: false,
        };
        if opts.require_running && app.state != "running" {
            let failed = app.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
            let why = format!(
                "{name} booted {} instead of running; failed units:\n{}{}",
                app.state,
                text(&failed.stdout),
                stderr
            );
            let _ = app.stop_now();
            return Err(why);
        }
        Ok(app)
    }

    /// The container's (unique) machine name, also its hostname.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's PID 1 (systemd) as the host sees it.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The systemd-nspawn process that runs the container.
    pub fn nspawn_pid(&self) -> u32 {
        self.nspawn_pid
    }

    /// The state systemd reported after boot: `running` or `degraded`.
    pub fn boot_state(&self) -> &str {
        &self.state
    }

    /// Wall time from starting systemd-nspawn to `running` (as seen by this process).
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The cached root this container overlays (read-only lower layer).
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// The container's root as the host sees it, `/proc/<pid1>/root`: read files and
    /// connect to sockets inside through it. Absolute symlinks inside (`/var/run`)
    /// resolve against the host's root there, so use the real paths (`/run/...`), or
    /// [`Appliance::read_file`], which resolves inside.
    pub fn root_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1))
    }

    /// The host path of `inside` (see [`Appliance::root_path`] for symlinks).
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root_path().join(inside.trim_start_matches('/'))
    }

    /// The console output of the container so far (systemd's boot messages).
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    fn nsenter(&self, env: &[(&str, &str)], cmd: &[&str], limit: Duration) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", self.pid1))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--",
            ])
            // PID 1's capability bounding set: without it the command would keep the
            // host's (CAP_SYS_TIME: `date -s` inside would set the host's clock).
            .arg("/usr/bin/setpriv")
            .arg(format!("--bounding-set={}", self.caps))
            .arg("--")
            .args(["/usr/bin/env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .args([
                "LANG=C.UTF-8",
                "SYSTEMD_PAGER=cat",
                "SYSTEMD_COLORS=0",
                "TERM=dumb",
            ]);
        let has_home = env.iter().any(|(k, _)| *k == "HOME");
        if !has_home {
            c.arg("HOME=/root");
        }
        for (k, v) in env {
            c.arg(format!("{k}={v}"));
        }
        // The limit is enforced inside, by coreutils' timeout, so that the command (in
        // the container's PID namespace) dies with it; exit status 124 means timed out.
        c.args(["timeout", "--kill-after=5"])
            .arg(format!("{}", limit.as_secs().max(1)))
            .args(cmd)
            .stdin(Stdio::null());
        c
    }

    /// Runs `cmd` inside as root (all of PID 1's namespaces, its root, a clean
    /// environment) and returns its output. At most [`EXEC_TIMEOUT`].
    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.exec_timeout(cmd, EXEC_TIMEOUT)
    }

    /// [`Appliance::exec`] with a time limit (exit status 124 when it ran out).
    pub fn exec_timeout(&self, cmd: &[&str], limit: Duration) -> Output {
        self.run(self.nsenter(&[], cmd, limit), None, cmd)
    }

    /// [`Appliance::exec`] with extra environment variables.
    pub fn exec_env(&self, env: &[(&str, &str)], cmd: &[&str]) -> Output {
        self.run(self.nsenter(env, cmd, EXEC_TIMEOUT), None, cmd)
    }

    /// [`Appliance::exec`] with `input` on the command's standard input.
    pub fn exec_input(&self, cmd: &[&str], input: &[u8]) -> Output {
        self.run(self.nsenter(&[], cmd, EXEC_TIMEOUT), Some(input), cmd)
    }

    /// Runs `cmd` inside as `user` (uid, gid and groups; no PAM session). The process
    /// is in no systemd unit; to run the agent as a service would, use
    /// `systemd-run --wait --pipe --collect -p User=compliance-agent ...`.
    pub fn exec_as(&self, user: &str, cmd: &[&str]) -> Output {
        let mut full = vec![
            "setpriv",
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "--",
        ];
        full.extend_from_slice(cmd);
        let env = [("HOME", "/"), ("USER", user), ("LOGNAME", user)];
        self.run(self.nsenter(&env, &full, EXEC_TIMEOUT), None, cmd)
    }

    /// Runs a `/bin/sh -c` script inside as root.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["/bin/sh", "-c", script])
    }

    /// Runs `cmd` inside and returns its standard output; panics with the command,
    /// its status and both outputs when it fails.
    #[track_caller]
    pub fn exec_ok(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        check(&self.name, cmd, &out);
        text(&out.stdout)
    }

    /// [`Appliance::sh`], panicking on failure like [`Appliance::exec_ok`].
    #[track_caller]
    pub fn sh_ok(&self, script: &str) -> String {
        let cmd = ["/bin/sh", "-c", script];
        let out = self.exec(&cmd);
        check(&self.name, &cmd, &out);
        text(&out.stdout)
    }

    fn run(&self, mut c: Command, input: Option<&[u8]>, shown: &[&str]) -> Output {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = match c.spawn() {
            Ok(child) => child,
            Err(e) => return failed_output(&format!("spawn nsenter for {shown:?}: {e}")),
        };
        let writer = match (input, child.stdin.take()) {
            (Some(bytes), Some(mut stdin)) => {
                let bytes = bytes.to_vec();
                Some(std::thread::spawn(move || {
                    let _ = stdin.write_all(&bytes);
                }))
            }
            _ => None,
        };
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| failed_output(&format!("wait for {shown:?}: {e}")));
        if let Some(w) = writer {
            let _ = w.join();
        }
        out
    }

    /// Writes `bytes` to `path` inside (as root, mode 0644 unless the file exists),
    /// creating parent directories. The path resolves inside the container.
    pub fn write_file(&self, path: &str, bytes: &[u8]) -> Result<(), String> {
        let script = r#"mkdir -p -- "$(dirname -- "$1")" && cat > "$1""#;
        let out = self.exec_input(&["/bin/sh", "-c", script, "sh", path], bytes);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "write {path} in {}: {}",
                self.name,
                text(&out.stderr)
            ))
        }
    }

    /// [`Appliance::write_file`], then `chmod MODE` and, when given, `chown OWNER`.
    pub fn write_file_mode(
        &self,
        path: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<&str>,
    ) -> Result<(), String> {
        self.write_file(path, bytes)?;
        let mode = format!("{mode:o}");
        let out = self.exec(&["chmod", &mode, path]);
        if !out.status.success() {
            return Err(format!("chmod {mode} {path}: {}", text(&out.stderr)));
        }
        if let Some(owner) = owner {
            let out = self.exec(&["chown", owner, path]);
            if !out.status.success() {
                return Err(format!("chown {owner} {path}: {}", text(&out.stderr)));
            }
        }
        Ok(())
    }

    /// Reads `path` inside (resolved inside the container).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, String> {
        let out = self.exec(&["cat", "--", path]);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "read {path} in {}: {}",
                self.name,
                text(&out.stderr)
            ))
        }
    }

    /// `systemctl ARGS...` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["systemctl"];
        cmd.extend_from_slice(args);
        self.exec(&cmd)
    }

    /// A unit property (`systemctl show -P PROPERTY UNIT`), e.g. ActiveState.
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-P", property, unit]);
        text(&out.stdout).trim().to_string()
    }

    /// Polls `check` every 100 ms until it holds or `limit` passes.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Appliance) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if check(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: timed out after {limit:?} waiting for {what}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `unit`'s ActiveState is `state` (e.g. "active", "inactive").
    pub fn wait_unit_state(&self, unit: &str, state: &str, limit: Duration) -> Result<(), String> {
        self.wait_for(&format!("{unit} to be {state}"), limit, |a| {
            a.unit_property(unit, "ActiveState") == state
        })
    }

    /// The journal of `unit` inside (message text only).
    pub fn journal(&self, unit: &str) -> String {
        text(
            &self
                .exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
                .stdout,
        )
    }

    /// One clamd command (`PING`, `VERSION`, `RELOAD`, ...) on its socket, reached from
    /// the host through the container's root; returns the reply without its NUL.
    pub fn clamd_command(&self, command: &str) -> Result<String, String> {
        let mut s = self.clamd_connect()?;
        s.write_all(format!("z{command}\0").as_bytes())
            .map_err(|e| format!("send {command} to clamd: {e}"))?;
        read_clamd_reply(&mut s)
    }

    /// Scans `data` with clamd's INSTREAM command; returns the reply, e.g.
    /// `stream: Harness.Test.EICAR-Body.UNOFFICIAL FOUND` or `stream: OK`.
    pub fn clamd_instream(&self, data: &[u8]) -> Result<String, String> {
        let mut s = self.clamd_connect()?;
        let mut msg = b"zINSTREAM\0".to_vec();
        for chunk in data.chunks(8192) {
            let len = u32::try_from(chunk.len()).map_err(|e| e.to_string())?;
            msg.extend_from_slice(&len.to_be_bytes());
            msg.extend_from_slice(chunk);
        }
        msg.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&msg)
            .map_err(|e| format!("send INSTREAM to clamd: {e}"))?;
        read_clamd_reply(&mut s)
    }

    fn clamd_connect(&self) -> Result<UnixStream, String> {
        let path = self.host_path(Self::CLAMD_SOCKET);
        let s =
            UnixStream::connect(&path).map_err(|e| format!("connect {}: {e}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// Rewrites the harness's clamd database (`daily.cud`) with this version and build
    /// time (Unix seconds) and reloads clamd, so `VERSION` reports them: a test can
    /// make the signatures look stale.
    pub fn set_clamav_database(&self, version: u32, built_at_unix: i64) -> Result<(), String> {
        let v = version.to_string();
        let t = built_at_unix.to_string();
        let out = self.exec(&["harness-clamav-db", "--version", &v, "--time", &t]);
        if !out.status.success() {
            return Err(format!("harness-clamav-db: {}", text(&out.stderr)));
        }
        let reply = self.clamd_command("RELOAD")?;
        if reply.trim() != "RELOADING" {
            return Err(format!("clamd answered RELOAD with {reply:?}"));
        }
        self.wait_for(
            "clamd to report the new database",
            Duration::from_secs(30),
            |a| {
                a.clamd_command("VERSION")
                    .is_ok_and(|r| r.contains(&format!("/{v}/")))
            },
        )
    }

    /// nix-builds the stand-in system toplevel NAME (builder /bin/sh; files
    /// nixos-version, configuration-revision, bin/switch-to-configuration) inside and
    /// returns its store path.
    pub fn make_system(&self, name: &str, revision: &str) -> Result<String, String> {
        let out = self.exec(&["harness-make-system", name, revision]);
        let path = text(&out.stdout).trim().to_string();
        if out.status.success() && path.starts_with("/nix/store/") {
            Ok(path)
        } else {
            Err(format!(
                "harness-make-system {name}: {}{}",
                text(&out.stderr),
                path
            ))
        }
    }

    /// `nix-env -p /nix/var/nix/profiles/system --set PATH`: a new generation.
    pub fn set_system_profile(&self, store_path: &str) -> Result<(), String> {
        let out = self.exec(&["nix-env", "-p", Self::SYSTEM_PROFILE, "--set", store_path]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("nix-env --set {store_path}: {}", text(&out.stderr)))
        }
    }

    /// Points `/run/current-system` at `store_path`, as activating it does on NixOS.
    pub fn set_current_system(&self, store_path: &str) -> Result<(), String> {
        let out = self.exec(&["ln", "-sfn", store_path, "/run/current-system"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ln /run/current-system: {}", text(&out.stderr)))
        }
    }

    /// The store path `/run/current-system` points at.
    pub fn current_system(&self) -> Result<String, String> {
        let out = self.exec(&["readlink", "/run/current-system"]);
        if out.status.success() {
            Ok(text(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "readlink /run/current-system: {}",
                text(&out.stderr)
            ))
        }
    }

    /// Initialises the restic repository REPO inside if needed (making PASSWORD_FILE
    /// when missing), backs up `paths` and returns the new snapshot's id.
    pub fn restic_snapshot(
        &self,
        repo: &str,
        password_file: &str,
        paths: &[&str],
    ) -> Result<String, String> {
        let mut cmd = vec!["harness-restic-snapshot", repo, password_file];
        cmd.extend_from_slice(paths);
        let out = self.exec(&cmd);
        let id = text(&out.stdout).trim().to_string();
        if out.status.success() && !id.is_empty() {
            Ok(id)
        } else {
            Err(format!(
                "restic snapshot of {paths:?} into {repo}: {}",
                text(&out.stderr)
            ))
        }
    }

    /// Powers the container off now; returns how long that took.
    pub fn shutdown(mut self) -> Result<Duration, String> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<Duration, String> {
        if self.stopped {
            return Ok(Duration::ZERO);
        }
        self.stopped = true;
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(harness_dir().join("boot.sh"))
            .args(["stop", &self.name])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run boot.sh stop {}: {e}", self.name))?;
        let stdout = text(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "stopping {} failed: {}",
                self.name,
                text(&out.stderr)
            ));
        }
        if stdout.contains("forced=yes") {
            return Err(format!(
                "{} did not power off cleanly and was killed: {}",
                self.name,
                text(&out.stderr)
            ));
        }
        Ok(started.elapsed())
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Err(e) = self.stop_now() {
            eprintln!("appliance harness: {e}");
        }
    }
}

fn read_clamd_reply(s: &mut UnixStream) -> Result<String, String> {
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read clamd reply: {e}"))?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.last() == Some(&0) {
            reply.pop();
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn failed_output(message: &str) -> Output {
    use std::os::unix::process::ExitStatusExt;
    Output {
        status: std::process::ExitStatus::from_raw(127 << 8),
        stdout: Vec::new(),
        stderr: message.as_bytes().to_vec(),
    }
}

#[track_caller]
fn check(name: &str, cmd: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "in {name}: {cmd:?} failed ({}){}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        if out.status.code() == Some(124) {
            " (timed out)"
        } else {
            ""
        },
        text(&out.stdout),
        text(&out.stderr)
    );
}
