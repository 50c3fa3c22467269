//! The planner/executor loop under a burst: 1,000 hosts each deliver a drift bundle at
//! once (32 delivering threads through the server's intake, in this process), each opens
//! an incident, the background executor (site mode `auto`, rule-based planner) plans it
//! and signs its order. Prints incidents handled per second (first arrival to last order
//! signed) and the latency from a bundle's arrival to its order being signed (p50, p95,
//! p99, max).
//!
//! Side by side in one run: the executor woken by intake as it runs in the server, and
//! the alternative of an executor that only polls (every `worker_interval_ms`, 1 s).
//!
//! Run: `cargo bench -p mcp-server --bench incidents`. `INCIDENTS_BENCH_DATABASES` lists
//! database URLs separated by spaces (default `sqlite`, a fresh file; anything else is
//! passed as `database_url`, e.g. `postgres://...` of an empty database per entry).

use std::sync::Arc;
use std::time::{Duration, Instant};

use compliance_agent::config::DeploymentMode;
use compliance_agent::crypto::SigningKey;
use compliance_agent::evidence::{Check, Draft, EvidenceStore, HostIdentity, Outcome};
use compliance_agent::nixos::RunningSystem;
use jiff::Timestamp;
use mcp_server::auth::Caller;
use mcp_server::config::{Config, ExecutorMode};
use mcp_server::store::incidents::{IncidentFilter, IncidentState, PlanState};
use mcp_server::{Running, Services, StartOptions};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOSTS: usize = 1_000;
const THREADS: usize = 32;
const SITE: &str = "bench-site";

struct Prepared {
    host_id: String,
    json: Vec<u8>,
    sig: Vec<u8>,
}

/// One drift bundle per host, signed by its own key, and the hosts added to the server.
fn prepare(svc: &Services, dir: &std::path::Path) -> BenchResult<Vec<Prepared>> {
    let admin = Caller::local("bench");
    let mut out = Vec::with_capacity(HOSTS);
    for i in 0..HOSTS {
        let host_id = format!("h{i:04}");
        let key = SigningKey::from_seed(&rand::random());
        let pem = key.verifying_key().to_spki_pem()?;
        mcp_server::cli::add_host(svc, &admin, SITE, &host_id, None, &pem)?;
        let store = EvidenceStore::open(
            &dir.join(&host_id),
            key,
            HostIdentity {
                site_id: SITE.into(),
                host_id: host_id.clone(),
                deployment_mode: DeploymentMode::Direct,
                reseller_id: None,
                policy_version: "2026.12".into(),
            },
            RunningSystem::default(),
        )?;
        let mut d = Draft::new(Check::Backup, Outcome::Alert);
        d.error = Some("the last backup is older than 26 h".into());
        let stored = store.store(d)?;
        out.push(Prepared {
            host_id,
            json: std::fs::read(stored.dir.join("bundle.json"))?,
            sig: std::fs::read(stored.dir.join("bundle.sig"))?,
        });
    }
    Ok(out)
}

struct Figures {
    per_sec: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn run(database: &str, woken: bool) -> BenchResult<Figures> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        state_dir: dir.path().join("state"),
        agent_listen: ([127, 0, 0, 1], 0).into(),
        operator_listen: ([127, 0, 0, 1], 0).into(),
        database_url: (database != "sqlite").then(|| database.to_owned()),
        ..Config::default()
    };
    config.remediation.default_site_mode = ExecutorMode::Auto;
    let (svc, _) = Services::open(config)?;
    let prepared = prepare(&svc, &dir.path().join("boxes"))?;
    let running = Running::start(svc, StartOptions::default())?;
    let mut intake = running.services.clone();
    if !woken {
        // Intake wakes a Notify nobody waits on: the executor runs on its interval only.
        intake.remediation_wake = Arc::new(tokio::sync::Notify::new());
    }
    let hosts: Vec<_> = intake.store.hosts(&Caller::local("bench"))?;
    let started = Instant::now();
    let first_arrival = Timestamp::now();
    let chunks: Vec<Vec<Prepared>> = {
        let mut chunks: Vec<Vec<Prepared>> = (0..THREADS).map(|_| Vec::new()).collect();
        for (i, p) in prepared.into_iter().enumerate() {
            chunks[i % THREADS].push(p);
        }
        chunks
    };
    let arrivals: Vec<(String, Timestamp)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (svc, hosts) = (&intake, &hosts);
                s.spawn(move || -> Result<Vec<(String, Timestamp)>, String> {
                    let mut seen = Vec::new();
                    for p in chunk {
                        let host = hosts
                            .iter()
                            .find(|h| h.host_id == p.host_id)
                            .ok_or("host missing")?;
                        let caller = Caller::host(SITE, &p.host_id, None);
                        let at = Timestamp::now();
                        mcp_server::intake::receive(svc, &caller, host, &p.json, &p.sig, None)
                            .map_err(|e| e.to_string())?;
                        seen.push((p.host_id, at));
                    }
                    Ok(seen)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a delivering thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    let admin = Caller::local("bench");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let ordered = intake.store.incidents(
            &admin,
            &IncidentFilter {
                state: Some(IncidentState::Open),
                plan_state: Some(PlanState::Ordered),
                limit: Some(u32::MAX),
                ..IncidentFilter::default()
            },
        )?;
        if ordered.len() >= HOSTS {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {HOSTS} incidents ordered in 600 s",
                ordered.len()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = started.elapsed();
    let orders = intake.store.orders(&admin, None)?;
    let mut latencies: Vec<f64> = arrivals
        .iter()
        .filter_map(|(host, at)| {
            orders
                .iter()
                .find(|o| &o.host_id == host)
                .map(|o| o.created_at.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    if latencies.len() != HOSTS {
        return Err(format!("{} orders for {HOSTS} hosts", latencies.len()).into());
    }
    latencies.sort_by(f64::total_cmp);
    let last = orders
        .iter()
        .map(|o| o.created_at)
        .max()
        .unwrap_or(first_arrival);
    let span = last.duration_since(first_arrival).as_secs_f64().max(1e-6);
    tracing::debug!(wall_sec = wall.as_secs_f64(), "burst handled");
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    running.stop();
    Ok(Figures {
        per_sec: HOSTS as f64 / span,
        p50: pct(0.50),
        p95: pct(0.95),
        p99: pct(0.99),
        max: pct(1.0),
    })
}

fn main() -> BenchResult<()> {
    let databases = std::env::var("INCIDENTS_BENCH_DATABASES").unwrap_or_else(|_| "sqlite".into());
    println!(
        "{HOSTS} simultaneous incidents (one drift bundle per host, {THREADS} delivering threads), site mode auto, rule-based planner"
    );
    println!(
        "{:<12} {:<22} {:>12} {:>10} {:>10} {:>10} {:>10}",
        "database", "executor", "incidents/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    for database in databases.split_whitespace() {
        let label = if database == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        };
        for (woken, name) in [(true, "woken by intake"), (false, "polling every 1 s")] {
            let f = run(database, woken)?;
            println!(
                "{label:<12} {name:<22} {:>12.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                f.per_sec, f.p50, f.p95, f.p99, f.max
            );
        }
    }
    println!("latency: a bundle's arrival at intake to its order signed (created, pending)");
    Ok(())
}
