//! Intake throughput of the central server: 1,000 enrolled hosts on 1,000 concurrent
//! mTLS connections on loopback (each from its own loopback address), each delivering
//! its own hash chain. Prints bundles/s accepted (verified, archived, committed: every
//! answer is `stored`), acknowledgement latency p50/p99, the server's peak RSS, and the
//! hosts one central box carries at one scan (7 bundles) per 5 minutes.
//!
//! Two phases on the same 1,000 connections:
//! - saturation: every host sends its next bundle as soon as the previous one is
//!   acknowledged (the most the server accepts);
//! - paced: every host sends one bundle per `1000 / PACED_RATE` s, staggered, an
//!   offered load of PACED_RATE bundles/s; latency counts from the scheduled send.
//!
//! Run: `cargo bench -p mcp-server --bench intake`
//!
//! Backends side by side: `INTAKE_BENCH_DATABASES` lists databases separated by spaces
//! (default `sqlite postgres`): `sqlite` is a fresh SQLite file in the state directory,
//! `postgres` a throwaway PostgreSQL cluster from Debian's `postgresql` package (the
//! tests' own, tests/support/postgres.rs: initdb in a temporary directory, a Unix
//! socket), and any other entry is passed as `database_url` (for example
//! `postgres://...`) to a server whose state is otherwise fresh. The server is the release `mcp-server` binary in a
//! process of its own, so its RSS is its own. BENCH_DIR sets where state goes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compliance_agent::config::DeploymentMode;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{Check, Draft, EvidenceStore, HostIdentity, Outcome};
use compliance_agent::nixos::RunningSystem;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use mcp_server::auth::Caller;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

// The tests' throwaway cluster; the benchmark uses only part of its API.
#[allow(dead_code)]
#[path = "../tests/support/postgres.rs"]
mod postgres_support;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOSTS: usize = 1_000;
/// Bundles per host in each phase (two scans of seven).
const SATURATION_BUNDLES: usize = 14;
const PACED_BUNDLES: usize = 14;
/// Offered load of the paced phase (the throughput target).
const PACED_RATE: f64 = 2_000.0;
const BUNDLES_PER_SCAN: f64 = 7.0;
const SCAN_INTERVAL_SEC: f64 = 300.0;
const BOUNDARY: &str = "intake-bench-boundary-7d1f";

fn env_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

/// Site and host of host number `i` (ten hosts per site).
fn names(i: usize) -> (String, String) {
    (format!("site-{:03}", i / 10), format!("box-{i:04}"))
}

/// Loopback source address of host `i`: 127.0.x.y, one per host, so the per-peer
/// connection cap applies per host as it would on a real network.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        (i / 250 + 1) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// One host as the benchmark drives it: its TLS identity and its bundles in chain order.
struct BenchHost {
    source: IpAddr,
    cert_pem: String,
    key_pem: String,
    /// (bundle.json, bundle.sig), seq ascending.
    bundles: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Makes the host's chain with the agent's own evidence store (on tmpfs when there is
/// one: the box's disk is not what is measured).
fn chain(dir: &Path, i: usize, n: usize) -> BenchResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let (site, host) = names(i);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    let store = EvidenceStore::open(
        &dir.join(&host),
        SigningKey::from_seed(&seed),
        HostIdentity {
            site_id: site,
            host_id: host,
            deployment_mode: DeploymentMode::Direct,
            reseller_id: None,
            policy_version: "bench".into(),
        },
        RunningSystem::default(),
    )?;
    let mut out = Vec::with_capacity(n);
    let mut k = 0;
    while out.len() < n {
        let drafts = (0..7.min(n - out.len()))
            .map(|j| {
                let mut d = Draft::new(Check::Backup, Outcome::Success);
                d.pre_state = serde_json::json!({
                    "unit": "restic-backups-ehr.service", "i": k * 7 + j,
                    "last_snapshot": { "age_hours": 30.5, "paths": ["/srv/ehr", "/var/lib/postgresql"] },
                });
                d.post_state = serde_json::json!({ "result": "success", "snapshot_age_hours": 0.1 });
                d
            })
            .collect();
        for b in store.store_many(drafts)? {
            out.push((
                std::fs::read(b.dir.join("bundle.json"))?,
                std::fs::read(b.dir.join("bundle.sig"))?,
            ));
        }
        k += 1;
    }
    Ok(out)
}

fn public_key_pem(i: usize) -> BenchResult<String> {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    Ok(SigningKey::from_seed(&seed).verifying_key().to_spki_pem()?)
}

fn multipart(json: &[u8], sig: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(json.len() + sig.len() + 400);
    for (name, data, ctype) in [
        ("bundle.json", json, "application/json"),
        ("bundle.sig", sig, "application/octet-stream"),
    ] {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: {ctype}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The server process and what it was started with.
struct Server {
    child: Child,
    addr: SocketAddr,
    ca_pem: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Prepares the state (hosts provisioned, certificates issued) and starts the server.
fn start_server(state: &Path, database: &str, hosts: &mut [BenchHost]) -> BenchResult<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut toml = format!(
        "state_dir = {state:?}\nagent_listen = \"127.0.0.1:{port}\"\noperator_listen = \"127.0.0.1:0\"\n"
    );
    if database != "sqlite" {
        toml.push_str(&format!("database_url = {database:?}\n"));
    }
    let config_path = state.with_extension("toml");
    std::fs::write(&config_path, &toml)?;
    let config = mcp_server::config::Config::load(Some(&config_path))?;
    let (svc, _) = mcp_server::Services::open(config)?;
    let caller = Caller::local("bench");
    for (i, h) in hosts.iter_mut().enumerate() {
        let (site, host) = names(i);
        mcp_server::cli::add_host(&svc, &caller, &site, &host, None, &public_key_pem(i)?)?;
        let issued = svc.ca.client(
            &format!("{site}/{host}"),
            mcp_server::pki::Validity::Days(2),
        )?;
        h.cert_pem = issued.cert_pem;
        h.key_pem = issued.key_pem;
    }
    let ca_pem = svc.ca.cert_pem.clone();
    drop(svc);
    let child = Command::new(env!("CARGO_BIN_EXE_mcp-server"))
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = Server {
        child,
        addr,
        ca_pem,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(format!("the server did not listen on {addr} within 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(
    server: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    host: &BenchHost,
) -> BenchResult<Sender> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(host.source, 0))?;
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(host.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(host.key_pem.as_bytes())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn post(sender: &mut Sender, body: Vec<u8>) -> BenchResult<()> {
    sender.ready().await?;
    let request = hyper::Request::post("/api/v1/evidence")
        .header("host", "127.0.0.1")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != 200 || !body.windows(8).any(|w| w == b"\"stored\"") {
        return Err(format!(
            "the server answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx].as_secs_f64() * 1000.0
}

struct Phase {
    bundles: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.bundles as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs one phase on the open connections; `pace` is the interval between one host's
/// sends (None: back to back). Latency counts from the scheduled send.
async fn phase(
    senders: &mut Vec<Sender>,
    hosts: &Arc<Vec<BenchHost>>,
    range: std::ops::Range<usize>,
    pace: Option<Duration>,
    server: SocketAddr,
    roots: &Arc<rustls::RootCertStore>,
) -> BenchResult<Phase> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(senders.len());
    for (i, mut sender) in std::mem::take(senders).into_iter().enumerate() {
        let hosts = hosts.clone();
        let range = range.clone();
        let roots = roots.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(range.len());
            let offset = pace.map(|p| p.mul_f64(i as f64 / HOSTS as f64));
            for (k, n) in range.enumerate() {
                let scheduled = match (pace, offset) {
                    (Some(p), Some(o)) => {
                        let at = started + o + p * k as u32;
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    _ => Instant::now(),
                };
                let (json, sig) = &hosts[i].bundles[n];
                // The server closes a connection idle past its header deadline (as it
                // should); a box reconnects, and so does the benchmark.
                if sender.is_closed() {
                    sender = connect(server, roots.clone(), &hosts[i]).await?;
                }
                post(&mut sender, multipart(json, sig)).await?;
                latencies.push(scheduled.elapsed());
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((sender, latencies))
        }));
    }
    let mut all = Vec::new();
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (sender, lat) = t.await??;
        back.push(sender);
        all.extend(lat);
    }
    let elapsed = started.elapsed();
    *senders = back;
    all.sort();
    Ok(Phase {
        bundles: all.len(),
        elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    })
}

struct Run {
    database: String,
    setup: Duration,
    saturation: Phase,
    paced: Phase,
    rss_mb: f64,
}

fn run(work: &Path, database: &str, template: &[Vec<(Vec<u8>, Vec<u8>)>]) -> BenchResult<Run> {
    let label = if database == "sqlite" {
        "sqlite"
    } else {
        "postgres"
    };
    let state = work.join(format!("state-{label}"));
    let mut hosts: Vec<BenchHost> = template
        .iter()
        .enumerate()
        .map(|(i, b)| BenchHost {
            source: source(i),
            cert_pem: String::new(),
            key_pem: String::new(),
            bundles: b.clone(),
        })
        .collect();
    let setup_started = Instant::now();
    let server = start_server(&state, database, &mut hosts)?;
    let hosts = Arc::new(hosts);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let (saturation, paced, setup) = runtime.block_on(async {
        let roots = Arc::new(roots);
        // 1,000 handshakes, at most 100 at a time (well inside the handshake deadline).
        let gate = Arc::new(tokio::sync::Semaphore::new(100));
        let mut pending = Vec::with_capacity(HOSTS);
        for i in 0..HOSTS {
            let (gate, hosts, roots) = (gate.clone(), hosts.clone(), roots.clone());
            let addr = server.addr;
            pending.push(tokio::spawn(async move {
                let _permit = gate.acquire().await?;
                connect(addr, roots, &hosts[i]).await
            }));
        }
        let mut senders = Vec::with_capacity(HOSTS);
        for p in pending {
            senders.push(p.await??);
        }
        let setup = setup_started.elapsed();
        let saturation = phase(
            &mut senders,
            &hosts,
            0..SATURATION_BUNDLES,
            None,
            server.addr,
            &roots,
        )
        .await?;
        let pace = Duration::from_secs_f64(HOSTS as f64 / PACED_RATE);
        let paced = phase(
            &mut senders,
            &hosts,
            SATURATION_BUNDLES..SATURATION_BUNDLES + PACED_BUNDLES,
            Some(pace),
            server.addr,
            &roots,
        )
        .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((saturation, paced, setup))
    })?;
    let rss_mb = peak_rss_mb(server.child.id());
    drop(server);
    Ok(Run {
        database: label.into(),
        setup,
        saturation,
        paced,
        rss_mb,
    })
}

fn main() -> BenchResult<()> {
    let databases: Vec<String> = std::env::var("INTAKE_BENCH_DATABASES")
        .unwrap_or_else(|_| "sqlite postgres".into())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // 2,000 client sockets and the server's 1,000 in this process tree.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(65_536),
        hard,
    )?;
    let work = tempfile::Builder::new()
        .prefix("intake-bench")
        .tempdir_in(env_dir())?;
    let boxes_root = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("intake-bench-boxes")
            .tempdir_in("/dev/shm")?
    } else {
        tempfile::Builder::new()
            .prefix("boxes")
            .tempdir_in(work.path())?
    };
    let started = Instant::now();
    let template: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..HOSTS)
        .map(|i| chain(boxes_root.path(), i, SATURATION_BUNDLES + PACED_BUNDLES))
        .collect::<BenchResult<_>>()?;
    drop(boxes_root);
    eprintln!(
        "made {HOSTS} chains of {} bundles in {:.1} s",
        SATURATION_BUNDLES + PACED_BUNDLES,
        started.elapsed().as_secs_f64()
    );

    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for db in &databases {
        let r = if db == "postgres" {
            let cluster = postgres_support::TestPostgres::start();
            run(work.path(), &cluster.url, &template)
        } else {
            run(work.path(), db, &template)
        };
        match r {
            Ok(r) => {
                eprintln!(
                    "{db}: {:.0} bundles/s at saturation, p99 {:.1} ms",
                    r.saturation.rate(),
                    r.saturation.p99_ms
                );
                runs.push(r);
            }
            // One backend failing does not hide the others' figures.
            Err(e) => {
                eprintln!("{db}: the run failed: {e}");
                failed.push(format!("{db}: {e}"));
            }
        }
    }

    println!();
    println!(
        "intake: {HOSTS} enrolled hosts, {HOSTS} concurrent mTLS connections on loopback, each its own chain"
    );
    print!("{:<44}", "");
    for r in &runs {
        print!("{:>14}", r.database);
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Run) -> String| {
        print!("{name:<44}");
        for r in &runs {
            print!("{:>14}", f(r));
        }
        println!();
    };
    row("setup: provision, certificates, handshakes (s)", &|r| {
        format!("{:.1}", r.setup.as_secs_f64())
    });
    row("saturation: bundles accepted", &|r| {
        r.saturation.bundles.to_string()
    });
    row("saturation: bundles/s accepted", &|r| {
        format!("{:.0}", r.saturation.rate())
    });
    row("saturation: ack latency p50 (ms)", &|r| {
        format!("{:.1}", r.saturation.p50_ms)
    });
    row("saturation: ack latency p99 (ms)", &|r| {
        format!("{:.1}", r.saturation.p99_ms)
    });
    row(
        &format!("paced at {PACED_RATE:.0}/s: bundles/s accepted"),
        &|r| format!("{:.0}", r.paced.rate()),
    );
    row(&format!("paced at {PACED_RATE:.0}/s: ack p50 (ms)"), &|r| {
        format!("{:.1}", r.paced.p50_ms)
    });
    row(&format!("paced at {PACED_RATE:.0}/s: ack p99 (ms)"), &|r| {
        format!("{:.1}", r.paced.p99_ms)
    });
    row("server peak RSS (MB)", &|r| format!("{:.1}", r.rss_mb));
    row("hosts per central box (7 bundles / 5 min)", &|r| {
        format!(
            "{:.0}",
            r.saturation.rate() * SCAN_INTERVAL_SEC / BUNDLES_PER_SCAN
        )
    });
    println!("targets: >= 2000 bundles/s (SQLite), p99 <= 250 ms, RSS <= 150 MB");
    for f in &failed {
        println!("FAILED {f}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} runs failed", failed.len(), databases.len()).into())
    }
}
