//! The channel's throughput: upload-queue operations per second, and a queue
//! drain after an outage, 10,000 bundles over mTLS on loopback to the central
//! server (`mcp-server`, in this process), with the agent's peak RSS.
//!
//! Run: `cargo bench -p compliance-agent --bench channel`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use compliance_agent::evidence::{Check, Draft, Outcome};
use compliance_agent::queue::{NewUpload, Queue, RetryPolicy};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const QUEUE_ROWS: usize = 10_000;
const SINGLE_TX: usize = 500;
const DRAIN_BUNDLES: usize = 10_000;

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn env_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from)
}

fn upload(i: usize) -> NewUpload {
    NewUpload {
        bundle_id: uuid::Uuid::new_v4().to_string(),
        seq: i as u64 + 1,
        dir: PathBuf::from(format!("/var/lib/compliance-agent/evidence/2026/11/29/{i}")),
        order_id: None,
    }
}

/// Queue operations on a real WAL database with synchronous=FULL.
fn queue_ops(dir: &Path) -> BenchResult<()> {
    let mut queue = Queue::open(&dir.join("bench.db"), RetryPolicy::default())?;

    let started = Instant::now();
    for i in 0..SINGLE_TX {
        queue.enqueue(&[upload(i)], 0)?;
    }
    let single = rate(SINGLE_TX, started.elapsed());

    let rows: Vec<NewUpload> = (SINGLE_TX..SINGLE_TX + QUEUE_ROWS).map(upload).collect();
    let started = Instant::now();
    for chunk in rows.chunks(1000) {
        queue.enqueue(chunk, 0)?;
    }
    let batched = rate(QUEUE_ROWS, started.elapsed());

    // Dequeue as delivery does: pages of due rows, each page acknowledged in batches of 64.
    let total = SINGLE_TX + QUEUE_ROWS;
    let started = Instant::now();
    let mut after = 0;
    let mut dequeued = 0;
    loop {
        let page = queue.due(1, after, 256)?;
        if page.is_empty() {
            break;
        }
        dequeued += page.len();
        after = page.last().map_or(after, |u| u.seq);
        for chunk in page.chunks(64) {
            let ids: Vec<String> = chunk.iter().map(|u| u.bundle_id.clone()).collect();
            queue.mark_delivered(&ids, 2)?;
        }
    }
    let drained = rate(dequeued, started.elapsed());
    assert_eq!(dequeued, total, "every row dequeued once");

    println!(
        "{:<58} {:>10}",
        "upload queue (WAL, synchronous=FULL)", "ops/s"
    );
    println!(
        "{:<58} {:>10.0}",
        "enqueue, one row per transaction (fsync each)", single
    );
    println!(
        "{:<58} {:>10.0}",
        "enqueue, 1,000 rows per transaction (reconcile)", batched
    );
    println!(
        "{:<58} {:>10.0}",
        "dequeue due rows + mark delivered (64 per transaction)", drained
    );
    Ok(())
}

fn write(path: &Path, text: &str) -> BenchResult<()> {
    std::fs::write(path, text)?;
    Ok(())
}

/// 10,000 bundles queued while the MCP is down, then drained by `queue flush`.
fn drain(dir: &Path) -> BenchResult<()> {
    let agent = env!("CARGO_BIN_EXE_compliance-agent");
    let keygen = Command::new(agent)
        .args(["keygen", "--out"])
        .arg(dir.join("keys"))
        .output()?;
    if !keygen.status.success() {
        return Err(String::from_utf8_lossy(&keygen.stderr).into_owned().into());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server_config = mcp_server::config::Config {
        state_dir: dir.join("mcp"),
        agent_listen: ([127, 0, 0, 1], port).into(),
        operator_listen: ([127, 0, 0, 1], 0).into(),
        ..mcp_server::config::Config::default()
    };
    // The box provisioned by hand (`mcp-server hosts add`) with a certificate of the CA.
    let (svc, _) = mcp_server::Services::open(server_config)?;
    mcp_server::cli::add_host(
        &svc,
        &mcp_server::auth::Caller::local("bench"),
        "clinic-1",
        "frontdesk-01",
        None,
        &std::fs::read_to_string(dir.join("keys/signing.pub.pem"))?,
    )?;
    let pki = dir.join("pki");
    svc.ca.write(&pki)?;
    svc.ca
        .client("clinic-1/frontdesk-01", mcp_server::pki::Validity::Days(30))?
        .write(&pki, "client")?;
    let config = dir.join("agent.toml");
    write(
        &config,
        &format!(
            "site_id = \"clinic-1\"\nhost_id = \"frontdesk-01\"\nsigning_key_file = {:?}\nevidence_dir = {:?}\nstate_dir = {:?}\n\
             mcp_url = \"https://127.0.0.1:{port}\"\nca_cert_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\nmcp_order_pubkey_file = {:?}\n",
            dir.join("keys/signing.key"),
            dir.join("evidence"),
            dir.join("state"),
            pki.join("ca.pem"),
            pki.join("client.pem"),
            pki.join("client.key"),
            svc.paths.order_pubkey,
        ),
    )?;
    let loaded = compliance_agent::config::Config::load(Some(&config))?;
    let evidence = compliance_agent::resources::open_evidence_store(&loaded)?;
    for chunk in 0..DRAIN_BUNDLES / 10 {
        let drafts = (0..10)
            .map(|i| {
                let mut d = Draft::new(Check::Backup, Outcome::Success);
                d.pre_state = serde_json::json!({
                    "unit": "restic-backups-ehr.service", "i": chunk * 10 + i,
                    "last_snapshot": { "age_hours": 30.5, "paths": ["/srv/ehr", "/var/lib/postgresql"] },
                });
                d.post_state = serde_json::json!({ "result": "success", "snapshot_age_hours": 0.1 });
                d
            })
            .collect();
        evidence.store_many(drafts)?;
    }

    // The outage: nothing listens; flush queues everything and fails.
    let down = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .args(["queue", "flush"])
        .output()?;
    assert_eq!(
        down.status.code(),
        Some(1),
        "flush fails while the MCP is down"
    );

    let server = mcp_server::Running::start(svc, mcp_server::StartOptions::default())?;
    let started = Instant::now();
    let up = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .args(["queue", "flush"])
        .output()?;
    let elapsed = started.elapsed();
    if !up.status.success() {
        return Err(String::from_utf8_lossy(&up.stderr).into_owned().into());
    }
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let stored = server.services.stats.snapshot().stored;
    server.stop();
    assert_eq!(stored as usize, DRAIN_BUNDLES, "every bundle stored once");

    println!();
    println!(
        "queue drain after an outage: {DRAIN_BUNDLES} bundles over mTLS on loopback in {:.1} s = {:.0} bundles/s",
        elapsed.as_secs_f64(),
        rate(DRAIN_BUNDLES, elapsed)
    );
    println!(
        "agent peak RSS (largest of the flush processes): {:.1} MB",
        usage.max_rss() as f64 / 1024.0
    );
    Ok(())
}

fn main() -> BenchResult<()> {
    let work = tempfile::Builder::new()
        .prefix("channel-bench")
        .tempdir_in(env_dir())?;
    std::fs::create_dir_all(work.path().join("queue"))?;
    queue_ops(&work.path().join("queue"))?;
    std::fs::create_dir_all(work.path().join("drain"))?;
    drain(&work.path().join("drain"))?;
    Ok(())
}
