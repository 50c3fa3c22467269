//! A throwaway PostgreSQL for tests, from Debian's `postgresql` package: `initdb` in a
//! temporary directory, the server listening only on a Unix socket in that directory
//! (no TCP port, so parallel tests cannot collide), one database `mcp`, and
//! `pg_ctl stop -m immediate` when the guard drops.
//!
//! PostgreSQL refuses to run as root, and tests often run as root: then the cluster
//! belongs to `nobody` (the directory is chowned to it and initdb, pg_ctl run with
//! its uid and gid). As any other user it runs as that user.
//!
//! The binaries are found under `$MCP_TEST_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/*/bin`. Missing binaries fail the test, never skip it.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MISSING: &str = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under $MCP_TEST_PG_BINDIR or /usr/lib/postgresql/*/bin: install Debian's postgresql (tests/run does)";

pub struct TestPostgres {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    ids: Option<(u32, u32)>,
    /// `postgres://postgres@<socket dir>/mcp`.
    pub url: String,
    running: bool,
}

fn bindir() -> PathBuf {
    find_bindir(
        std::env::var_os("MCP_TEST_PG_BINDIR").map(PathBuf::from),
        Path::new("/usr/lib/postgresql"),
    )
}

/// `explicit`, else the newest `<root>/<version>/bin` holding initdb and pg_ctl;
/// panics with [`MISSING`] when there is none.
pub fn find_bindir(explicit: Option<PathBuf>, root: &Path) -> PathBuf {
    if let Some(dir) = explicit {
        assert!(dir.join("initdb").is_file(), "{MISSING}");
        return dir;
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("{MISSING}"))
}

/// uid and gid of `nobody` when this process is root (PostgreSQL will not run as root).
fn unprivileged_ids() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("tests run as root need the user nobody to own the throwaway PostgreSQL");
    let fields: Vec<&str> = line.split(':').collect();
    let uid = fields
        .get(2)
        .and_then(|f| f.parse().ok())
        .expect("nobody's uid");
    let gid = fields
        .get(3)
        .and_then(|f| f.parse().ok())
        .expect("nobody's gid");
    Some((uid, gid))
}

/// Percent-encodes a socket directory for the host part of a URL.
fn encode(path: &Path) -> String {
    path.to_string_lossy()
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl TestPostgres {
    /// Starts a cluster and creates the database `mcp`; panics saying what failed.
    pub fn start() -> Self {
        let bindir = bindir();
        let ids = unprivileged_ids();
        let dir = tempfile::Builder::new()
            .prefix("mcp-pg-")
            .tempdir()
            .expect("tempdir");
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the cluster directory to nobody");
        }
        let mut pg = Self {
            url: format!("postgres://postgres@{}/mcp", encode(dir.path())),
            dir,
            bindir,
            ids,
            running: false,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                "data",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ],
        );
        pg.start_server();
        let mut admin = postgres::Config::new()
            .host_path(pg.dir.path())
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the throwaway PostgreSQL: {e}\n{}", pg.log()));
        admin
            .batch_execute("CREATE DATABASE mcp")
            .expect("create database mcp");
        pg
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bindir.join(program));
        c.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}; {MISSING}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Starts (or restarts) the server on the cluster.
    pub fn start_server(&mut self) {
        let sock = self.dir.path().display().to_string();
        // fsync off: the tests need the semantics, not crash durability, and share cores.
        let options =
            format!("-c listen_addresses='' -k {sock} -c fsync=off -c max_connections=100");
        self.run(
            "pg_ctl",
            &[
                "-D",
                "data",
                "-l",
                "server.log",
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
        self.running = true;
    }

    /// Stops the server at once (the database "goes down"); the guard's drop does the same.
    pub fn stop_server(&mut self) {
        if self.running {
            self.running = false;
            let _ = self
                .command("pg_ctl")
                .args(["-D", "data", "-m", "immediate", "-w", "stop"])
                .output();
        }
    }

    /// An administrative connection, for tests that go around the store.
    pub fn admin(&self) -> postgres::Client {
        postgres::Config::new()
            .host_path(self.dir.path())
            .user("postgres")
            .dbname("mcp")
            .connect(postgres::NoTls)
            .expect("connect to the throwaway PostgreSQL")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}
