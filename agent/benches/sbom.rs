//! SBOM generation: time and peak RSS for a synthetic closure of 2,000 store paths (a Nix
//! store database made here in Nix's schema) and for a real closure built by nix-build.
//! Each generation runs in a child process so its peak RSS is its own.
//!
//! Run: `cargo bench -p compliance-agent --bench sbom`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use compliance_agent::sbom::{self, Source};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const PATHS: usize = 2_000;
const RUNS: usize = 10;
const CHILD_ENV: &str = "SBOM_BENCH_CHILD";

/// Nix 2's schema (ValidPaths, Refs and their indexes), as `nix-store --init` makes it.
const SCHEMA: &str = "
CREATE TABLE ValidPaths (
    id integer primary key autoincrement not null, path text unique not null,
    hash text not null, registrationTime integer not null, deriver text,
    narSize integer, ultimate integer, sigs text, ca text);
CREATE TABLE Refs (
    referrer integer not null, reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict);
CREATE INDEX IndexReferrer on Refs(referrer);
CREATE INDEX IndexReference on Refs(reference);
CREATE TABLE DerivationOutputs (
    drv integer not null, id text not null, path text not null,
    primary key (drv, id), foreign key (drv) references ValidPaths(id) on delete cascade);
CREATE INDEX IndexDerivationOutputs on DerivationOutputs(path);
";

/// A closure of `n` paths shaped like a NixOS system: each path references the
/// one before it and a few random older ones; the last is the system.
fn synthetic_db(dir: &Path, n: usize) -> BenchResult<(PathBuf, String, usize)> {
    let db = dir.join("db.sqlite");
    let mut conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch("PRAGMA journal_mode = WAL;")?;
    conn.execute_batch(SCHEMA)?;
    let mut x: u64 = 42;
    let mut next = move |m: u64| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 33) % m
    };
    let tx = conn.transaction()?;
    let mut paths = Vec::with_capacity(n);
    let mut edges = 0;
    {
        let mut add = tx.prepare("INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize) VALUES (?1, ?2, 1700000000, ?3, ?4)")?;
        let mut link =
            tx.prepare("INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?1, ?2)")?;
        for i in 0..n {
            let digest = compliance_agent::crypto::sha256(format!("path {i}").as_bytes());
            let hash_part = compliance_agent::nar::nixbase32(&digest[..20]);
            let name = if i + 1 == n {
                "nixos-system-bench-25.11.20251201.abc1234".to_owned()
            } else {
                format!("package{i}-{}.{}.{}", 1 + i % 7, i % 13, i % 5)
            };
            let path = format!("/nix/store/{hash_part}-{name}");
            let nar = compliance_agent::crypto::sha256(path.as_bytes());
            add.execute(rusqlite::params![
                path,
                format!("sha256:{}", hex::encode(nar)),
                format!("/nix/store/{hash_part}-{name}.drv"),
                (4096 + next(1 << 24)) as i64
            ])?;
            let id = tx.last_insert_rowid();
            if i > 0 {
                link.execute([id, id - 1])?;
                edges += 1;
                for _ in 0..next(8) {
                    let target = 1 + next(id as u64 - 1) as i64;
                    edges += link.execute([id, target])?;
                }
            }
            paths.push(path);
        }
    }
    tx.commit()?;
    let root = paths.pop().ok_or("no paths")?;
    Ok((db, root, edges))
}

/// A real closure: the system of the SBOM tests, built by nix-build with builder /bin/sh.
fn real_closure(dir: &Path) -> BenchResult<String> {
    let expr = dir.join("closure.nix");
    std::fs::write(
        &expr,
        r#"
let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  libs = builtins.genList (i: mk "benchlib${toString i}-1.${toString i}" "/bin/mkdir $out && echo ${toString i} > $out/v") 30;
in mk "nixos-system-benchbox-25.11"
  "/bin/mkdir $out && echo ${builtins.concatStringsSep " " (map toString libs)} > $out/needs"
"#,
    )?;
    let out = Command::new("nix-build")
        .env(
            "NIX_CONF_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nix-conf"),
        )
        .env_remove("NIX_CONFIG")
        .arg("--no-out-link")
        .arg(&expr)
        .output()?;
    if !out.status.success() {
        return Err(format!("nix-build: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// In the child: generate RUNS times, print the median and the last document's size.
fn child(spec: &str) -> BenchResult<()> {
    let (db, root) = spec.split_once('\n').ok_or("bad child spec")?;
    let source = Source {
        db: PathBuf::from(db),
        ..Default::default()
    };
    let mut times = Vec::with_capacity(RUNS);
    let mut reads = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let sbom = sbom::generate(&source, root)?;
        times.push(t.elapsed());
        last = Some(sbom);
        // The database part alone.
        let t = Instant::now();
        std::hint::black_box(sbom::read_closure(&source, root)?);
        reads.push(t.elapsed());
    }
    times.sort();
    reads.sort();
    let sbom = last.ok_or("no run")?;
    // This process's own peak (the parent's RUSAGE_CHILDREN would include nix-build).
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    println!(
        "{} {} {} {} {} {}",
        times[RUNS / 2].as_secs_f64() * 1000.0,
        sbom.components,
        sbom.dependency_edges,
        sbom.bytes.len(),
        usage.max_rss() as f64 / 1024.0,
        reads[RUNS / 2].as_secs_f64() * 1000.0,
    );
    Ok(())
}

struct Measured {
    median_ms: f64,
    read_ms: f64,
    components: usize,
    edges: usize,
    bytes: usize,
    peak_rss_mb: f64,
}

/// Runs one child, which reports its own time and peak RSS.
fn measure(db: &Path, root: &str) -> BenchResult<Measured> {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, format!("{}\n{root}", db.display()))
        .output()?;
    if !out.status.success() {
        return Err(format!("child failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let line = String::from_utf8(out.stdout)?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let [ms, comps, edges, bytes, rss, read] = f[..] else {
        return Err(format!("child printed {line:?}").into());
    };
    Ok(Measured {
        median_ms: ms.parse()?,
        components: comps.parse()?,
        edges: edges.parse()?,
        bytes: bytes.parse()?,
        peak_rss_mb: rss.parse()?,
        read_ms: read.parse()?,
    })
}

fn main() -> BenchResult<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    // Linux keeps ru_maxrss across execve, so a child starts at this
    // process's peak: spawn the children while this process is still small.
    let dir = tempfile::tempdir()?;
    let real = real_closure(dir.path());
    let (db, root, edges) = synthetic_db(dir.path(), PATHS)?;

    println!(
        "SBOM generation (CycloneDX 1.6 JSON from the Nix store database), median of {RUNS} runs in a child process"
    );
    println!();
    println!(
        "| closure | store paths | references | document | median time (database part) | peak RSS |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    match real {
        Ok(real_root) => {
            let m = measure(Path::new(sbom::NIX_DB), &real_root)?;
            println!(
                "| real, nix-build (live /nix/var/nix/db) | {} | {} | {:.1} kB | {:.2} ms ({:.2} ms) | {:.1} MB |",
                m.components,
                m.edges,
                m.bytes as f64 / 1024.0,
                m.median_ms,
                m.read_ms,
                m.peak_rss_mb
            );
        }
        Err(e) => println!("| real, nix-build | skipped: {e} | | | | |"),
    }
    let m = measure(&db, &root)?;
    assert_eq!(m.components, PATHS, "the synthetic closure is complete");
    assert_eq!(m.edges, edges, "every reference is a dependency");
    println!(
        "| synthetic, Nix schema | {} | {} | {:.1} kB | {:.2} ms ({:.2} ms) | {:.1} MB |",
        m.components,
        m.edges,
        m.bytes as f64 / 1024.0,
        m.median_ms,
        m.read_ms,
        m.peak_rss_mb
    );
    let t = Instant::now();
    let _ = sbom::generate(
        &Source {
            db: db.clone(),
            busy_timeout: Duration::from_secs(1),
        },
        &root,
    )?;
    println!();
    println!(
        "one more generation of the synthetic closure in this process: {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}
